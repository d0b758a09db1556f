"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints in and out.

As for T5 (model/hf.py) the parameter name map is ONE table (`NAME_MAP`) read both ways: each
row names our parameter path, the transformers state-dict key, a layout transform with a forward
(HF -> ours) and an inverse (ours -> HF), and the architecture feature that makes the row exist.
Import and export walk the same rows, one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn

from tinyllm_jax.errors import UserError
from tinyllm_jax.model.decoder import MODEL_TYPES, ROPE_TYPES, DecoderConfig, init_params
from tinyllm_jax.model.hf import (MAX_SHARD_BYTES, ModelLoadError, convert_state, read_state_dict,
                                  resolve_model_dir, traced_shapes, write_weights)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# --------------------------------------------------------------------------- the name map

# transform name -> (HF tensor -> ours, ours -> HF tensor). torch Linear weights are [out, in];
# ours are [in, out] with the head axes split out: q/k/v [D, N, K], o [H, K, D].
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda w, c: w, lambda w, c: w),
    "linear": (lambda w, c: w.T, lambda w, c: w.T),
    "heads_in": (lambda w, c: w.T.reshape(w.shape[1], -1, c.head_size),
                 lambda w, c: w.reshape(w.shape[0], -1).T),
    "heads_out": (lambda w, c: w.T.reshape(-1, c.head_size, w.shape[0]),
                  lambda w, c: w.reshape(-1, w.shape[-1]).T),
    "head_bias": (lambda w, c: w.reshape(-1, c.head_size), lambda w, c: w.reshape(-1)),
}

# feature -> whether a config has the rows that name it
FEATURES: dict[str, Callable[[DecoderConfig], bool]] = {
    "always": lambda c: True,
    "untied": lambda c: not c.tie_word_embeddings,
    "attention_bias": lambda c: c.attention_bias,
    "out_bias": lambda c: c.out_bias,
    "qk_norm": lambda c: c.qk_norm,
    "mlp_bias": lambda c: c.mlp_bias,
}

_L = "layers_{i}"
_HF = "model.layers.{i}"
# (our path, HF key, transform, feature); "{i}" is a layer index.
NAME_MAP: list[tuple[str, str, str, str]] = [
    ("embed_tokens", "model.embed_tokens.weight", "same", "always"),
    ("lm_head", "lm_head.weight", "linear", "untied"),
    ("norm/scale", "model.norm.weight", "same", "always"),
    (f"{_L}/input_norm/scale", f"{_HF}.input_layernorm.weight", "same", "always"),
    (f"{_L}/post_attention_norm/scale", f"{_HF}.post_attention_layernorm.weight", "same", "always"),
    *[(f"{_L}/attention/{p}", f"{_HF}.self_attn.{p}_proj.weight", "heads_in", "always") for p in "qkv"],
    (f"{_L}/attention/o", f"{_HF}.self_attn.o_proj.weight", "heads_out", "always"),
    *[(f"{_L}/attention/{p}_bias", f"{_HF}.self_attn.{p}_proj.bias", "head_bias", "attention_bias") for p in "qkv"],
    (f"{_L}/attention/o_bias", f"{_HF}.self_attn.o_proj.bias", "same", "out_bias"),
    *[(f"{_L}/attention/{p}_norm/scale", f"{_HF}.self_attn.{p}_norm.weight", "same", "qk_norm") for p in "qk"],
    *[(f"{_L}/mlp/{p}", f"{_HF}.mlp.{p}_proj.weight", "linear", "always") for p in ("gate", "up", "down")],
    *[(f"{_L}/mlp/{p}_bias", f"{_HF}.mlp.{p}_proj.bias", "same", "mlp_bias") for p in ("gate", "up", "down")],
]

# state-dict keys that transformers drops on load and so do we
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expand_name_map(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
    """The table's rows for one architecture: (our path, HF key, transform), all concrete."""
    rows = []
    for ours, theirs, how, feature in NAME_MAP:
        if not FEATURES[feature](cfg):
            continue
        for i in range(cfg.num_hidden_layers) if "{i}" in ours else [None]:
            rows.append((ours.format(i=i), theirs.format(i=i), how))
    return rows


def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Our parameters' shapes by "/"-joined path, traced without allocating them."""
    return traced_shapes(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def hf_to_params(state: dict[str, np.ndarray], cfg: DecoderConfig, where: str = "checkpoint") -> dict[str, Any]:
    """transformers state dict -> our nested parameter dict (fp32 numpy). Tensors are popped from
    `state` as they are converted, so the checkpoint is not held twice."""
    params = convert_state(state, expand_name_map(cfg), TRANSFORMS, cfg, param_shapes(cfg), where, pop=True)
    unused = [k for k in state if not k.endswith(_IGNORED_SUFFIXES) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if unused:
        raise ModelLoadError(f"{where}: has {len(unused)} weights that config.json does not use, e.g. {unused[:3]} "
                             "(config.json and the weights disagree)")
    return params


def hf_tensors(params: dict[str, Any], cfg: DecoderConfig) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """Rows (HF key, bytes, make the contiguous fp32 tensor) for `hf.write_weights`: each HF
    tensor is made from our parameter only when its shard is written."""
    rows = []
    for ours, theirs, how in expand_name_map(cfg):
        node = params
        for p in ours.split("/"):
            node = node[p]
        make = lambda w=node, how=how: np.ascontiguousarray(TRANSFORMS[how][1](np.asarray(w, np.float32), cfg))
        rows.append((theirs, int(np.prod(np.shape(node))) * 4, make))
    return rows


def params_to_hf(params: dict[str, Any], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """Our parameter dict -> transformers state dict (contiguous fp32 numpy)."""
    return {k: make() for k, _, make in hf_tensors(params, cfg)}


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], has_lm_head: bool = True, where: str = "config.json") -> DecoderConfig:
    """Our config from config.json's dict, read as transformers reads it; `has_lm_head` False
    (the checkpoint has no lm_head.weight) means tied embeddings. Refuses, naming the key, any
    architecture the network does not compute exactly."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{where}: model_type is {model_type!r}; decoder-only students are one of "
                             f"{', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{where}: hidden_act is {act!r}; the {model_type} MLP here is SwiGLU (expected 'silu')")
    _check_sliding_window(hf, model_type, where)
    try:
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim", 128 if model_type == "qwen3" else None)
        if head_dim == hf["hidden_size"] // heads:
            head_dim = None  # one spelling of the default, so that equal configs compare equal
        eos = hf.get("eos_token_id")
        cfg = DecoderConfig(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(_rope_dict(hf, where).get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(hf, where),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            attention_bias={"qwen2": True, "mistral": False}.get(model_type, bool(hf.get("attention_bias", False))),
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)) or not has_lm_head,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing field {e.args[0]!r}") from None
    except UserError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    return cfg


def _check_sliding_window(hf: dict[str, Any], model_type: str, where: str) -> None:
    """Mistral slides in every layer whenever sliding_window is set (computed here, as
    transformers masks it); Qwen2/3 only with use_sliding_window and some layer past
    max_window_layers (or named so in layer_types): that per-layer mix is refused; Llama never."""
    window = hf.get("sliding_window")
    if window is None or model_type in ("llama", "mistral"):
        if model_type == "mistral" and window is not None and (not isinstance(window, int) or window < 1):
            raise ModelLoadError(f"{where}: sliding_window is {window!r}; expected a whole number of at least 1, "
                                 "or null")
        return
    if not hf.get("use_sliding_window", False):
        return
    types = hf.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return
    if types is None and hf.get("num_hidden_layers", 0) <= hf.get("max_window_layers", 28):
        return
    raise ModelLoadError(f"{where}: sliding_window is {window} and active (use_sliding_window is true); "
                         f"{model_type}'s sliding window in some layers only is not supported (expected "
                         "use_sliding_window: false)")


def _rope_dict(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """config.json's rope parameters: transformers 5 writes rope_parameters, earlier ones rope_scaling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ModelLoadError(f"{where}: rope_parameters per layer type are not supported (expected one dict)")
    return rope


def _rope_scaling(hf: dict[str, Any], where: str):
    rope = _rope_dict(hf, where)
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{where}: {key}.rope_type is {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ModelLoadError(f"{where}: partial_rotary_factor is {partial}; only full rotary embeddings are supported")
    if rope_type == "default":
        return None
    names = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rope_type]
    values = {"original_max_position_embeddings": hf.get("max_position_embeddings", 2048)}  # as transformers defaults it
    values.update({k: rope[k] for k in names if k in rope})
    absent = [k for k in names if k not in values]
    if absent:
        raise ModelLoadError(f"{where}: {key} of type {rope_type!r} lacks {absent}")
    return tuple(sorted([("rope_type", rope_type), *((k, values[k]) for k in names)]))


def config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """config.json for `cfg`, in the format transformers 5 writes, with rope_theta and
    rope_scaling beside rope_parameters for readers of the older format."""
    rope = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type, **cfg.rope_params}
    eos = list(cfg.eos_token_ids)
    out = {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)
    if cfg.model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def generation_config(cfg: DecoderConfig) -> dict[str, Any]:
    """generation_config.json: bos, pad and every eos id."""
    eos = list(cfg.eos_token_ids)
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": cfg.pad_token_id}


# --------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None


def load_pretrained(name_or_path: str, dtype: str = "float32", tokenizer: bool = True):
    """(params, cfg, tokenizer or None) from an HF directory or hub id. The config's eos ids are
    config.json's and generation_config.json's together (chat models stop at either); the
    tokenizer is None when not asked for or when the directory has none."""
    model_dir = resolve_model_dir(name_or_path)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    hf_cfg = _read_json(cfg_path)
    config_from_hf(hf_cfg, where=str(cfg_path))  # refuse before reading gigabytes of weights
    state = read_state_dict(model_dir)
    cfg = config_from_hf(hf_cfg, "lm_head.weight" in state, str(cfg_path))
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    gen_eos = gen.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *gen_eos]))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else gen.get("pad_token_id")
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else gen.get("bos_token_id")
    cfg = cfg.replace(dtype=dtype, eos_token_ids=eos, pad_token_id=pad, bos_token_id=bos)
    params = hf_to_params(state, cfg, str(model_dir))
    tok = None
    if tokenizer and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from tinyllm_jax.model.tokenizer import load_tokenizer

        tok = load_tokenizer(str(model_dir))
    return params, cfg, tok


def save_pretrained(params: dict[str, Any], cfg: DecoderConfig, out_dir: str | Path, tokenizer=None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes config.json, generation_config.json, model.safetensors (sharded with an index when
    larger than `max_shard_bytes`) and the tokenizer with its chat template. `params` may be
    boxed or on device: each tensor is fetched when its shard is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, hf_tensors(nn.unbox(params), cfg), max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
