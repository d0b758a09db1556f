"""Hugging Face T5 checkpoints in and out.

The parameter name map is ONE table (`NAME_MAP`) read both ways: each row names our
parameter path, the transformers state-dict key, and a layout transform that has a forward
(HF -> ours) and an inverse (ours -> HF). Import and export walk the same rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinyllm_jax.errors import UserError
from tinyllm_jax.model.t5 import T5, T5Config

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3


class ModelLoadError(UserError):
    """A model path, its config or its weights cannot be used."""


# --------------------------------------------------------------------------- the name map

# transform name -> (HF tensor -> ours, ours -> HF tensor); cfg gives heads and d_kv.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda w, c: w, lambda w, c: w),
    "linear": (lambda w, c: w.T, lambda w, c: w.T),  # torch Linear is [out, in]
    "qkv": (
        lambda w, c: w.T.reshape(c.d_model, c.num_heads, c.d_kv),
        lambda w, c: w.reshape(c.d_model, c.num_heads * c.d_kv).T,
    ),
    "out": (
        lambda w, c: w.T.reshape(c.num_heads, c.d_kv, c.d_model),
        lambda w, c: w.reshape(c.num_heads * c.d_kv, c.d_model).T,
    ),
}

_ATTN = [("q", "qkv"), ("k", "qkv"), ("v", "qkv"), ("o", "out")]

# (our path, HF key, transform); "{i}" is a layer index, "{w}" an attention/MLP weight.
NAME_MAP: list[tuple[str, str, str]] = [
    ("shared", "shared.weight", "same"),
    ("lm_head", "lm_head.weight", "linear"),
    ("encoder_relpos/embedding", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
    ("decoder_relpos/embedding", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
    ("encoder_norm/scale", "encoder.final_layer_norm.weight", "same"),
    ("decoder_norm/scale", "decoder.final_layer_norm.weight", "same"),
    ("encoder_layers_{i}/attention/{w}", "encoder.block.{i}.layer.0.SelfAttention.{w}.weight", _ATTN),
    ("encoder_layers_{i}/pre_attention_norm/scale", "encoder.block.{i}.layer.0.layer_norm.weight", "same"),
    ("encoder_layers_{i}/mlp/{w}", "encoder.block.{i}.layer.1.DenseReluDense.{w}.weight", "mlp"),
    ("encoder_layers_{i}/pre_mlp_norm/scale", "encoder.block.{i}.layer.1.layer_norm.weight", "same"),
    ("decoder_layers_{i}/self_attention/{w}", "decoder.block.{i}.layer.0.SelfAttention.{w}.weight", _ATTN),
    ("decoder_layers_{i}/pre_self_attention_norm/scale", "decoder.block.{i}.layer.0.layer_norm.weight", "same"),
    ("decoder_layers_{i}/cross_attention/{w}", "decoder.block.{i}.layer.1.EncDecAttention.{w}.weight", _ATTN),
    ("decoder_layers_{i}/pre_cross_attention_norm/scale", "decoder.block.{i}.layer.1.layer_norm.weight", "same"),
    ("decoder_layers_{i}/mlp/{w}", "decoder.block.{i}.layer.2.DenseReluDense.{w}.weight", "mlp"),
    ("decoder_layers_{i}/pre_mlp_norm/scale", "decoder.block.{i}.layer.2.layer_norm.weight", "same"),
]


def expand_name_map(cfg: T5Config) -> list[tuple[str, str, str]]:
    """The table's rows for one architecture: (our path, HF key, transform), all concrete."""
    mlp = [("wi_0", "linear"), ("wi_1", "linear"), ("wo", "linear")] if cfg.is_gated else [("wi", "linear"), ("wo", "linear")]
    rows = []
    for ours, theirs, how in NAME_MAP:
        if ours == "lm_head" and cfg.tie_word_embeddings:
            continue
        n = cfg.num_layers if ours.startswith("encoder_layers") else cfg.decoder_layers
        layers = range(n) if "{i}" in ours else [None]
        weights = mlp if how == "mlp" else how if isinstance(how, list) else [(None, how)]
        for i in layers:
            for w, t in weights:
                rows.append((ours.format(i=i, w=w), theirs.format(i=i, w=w), t))
    return rows


def convert_state(state: dict[str, np.ndarray], rows: list[tuple[str, str, str]], transforms: dict[str, tuple],
                  cfg: Any, shapes: dict[str, tuple[int, ...]], where: str, pop: bool = False) -> dict[str, Any]:
    """A transformers state dict -> our nested parameter dict (fp32 numpy), walking the name
    map's `rows` (our path, HF key, transform); every tensor must land in the shape `shapes`
    gives our parameter (a config.json that disagrees with its weights is refused here, in
    one line, not deep in the model's first call). `pop` drops tensors from `state` as they
    are converted, so a checkpoint is not held twice."""
    params: dict[str, Any] = {}
    missing = []
    for ours, theirs, how in rows:
        if theirs not in state:
            missing.append(theirs)
            continue
        hf = np.asarray(state.pop(theirs) if pop else state[theirs], np.float32)
        try:
            w = transforms[how][0](hf, cfg)
        except ValueError:  # a reshape by config.json's heads that the tensor cannot take
            w = None
        if w is None or w.shape != shapes[ours]:
            raise ModelLoadError(f"{where}: {theirs} has the wrong shape for config.json (expected "
                                 f"{shapes[ours]} in our layout, found {hf.shape} in the checkpoint's)")
        node = params
        *parents, leaf = ours.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = w
    if missing:
        raise ModelLoadError(f"{where}: lacks {len(missing)} weights that config.json implies, e.g. {missing[:3]}")
    return params


def traced_shapes(init: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of the parameters `init()` makes, by "/"-joined path, traced without
    allocating them."""
    import flax.linen as nn
    import jax

    abstract = nn.unbox(jax.eval_shape(init))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}


def hf_to_params(state: dict[str, np.ndarray], cfg: T5Config, where: str = "checkpoint") -> dict[str, Any]:
    """transformers state dict -> our nested parameter dict (fp32 numpy)."""
    import jax

    from tinyllm_jax.model.t5 import init_params

    shapes = traced_shapes(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    return convert_state(state, expand_name_map(cfg), TRANSFORMS, cfg, shapes, where)


def params_to_hf(params: dict[str, Any], cfg: T5Config) -> dict[str, np.ndarray]:
    """Our parameter dict -> transformers state dict (contiguous fp32 numpy)."""
    state = {}
    for ours, theirs, how in expand_name_map(cfg):
        node = params
        for p in ours.split("/"):
            node = node[p]
        state[theirs] = np.ascontiguousarray(TRANSFORMS[how][1](np.asarray(node, np.float32), cfg))
    return state


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], has_separate_lm_head: bool, where: str = "config.json") -> T5Config:
    model_type = hf.get("model_type")
    if model_type not in ("t5", "mt5"):
        raise ModelLoadError(f"{where}: model_type is {model_type!r}; tinyllm-jax students are T5 models (model_type 't5')")
    scale = hf["scale_decoder_outputs"] if "scale_decoder_outputs" in hf else hf.get("tie_word_embeddings", True) is not False
    try:
        return T5Config(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
            num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers"),
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            feed_forward_proj=hf.get("feed_forward_proj", "relu"),
            dropout_rate=hf.get("dropout_rate", 0.1),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            tie_word_embeddings=not has_separate_lm_head,
            scale_decoder_outputs=bool(scale),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            eos_token_id=_first(hf.get("eos_token_id", 1)),
            decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
        )
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing field {e.args[0]!r}") from None


def _first(x):
    return x[0] if isinstance(x, list) else x


def config_to_hf(cfg: T5Config) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": cfg.feed_forward_proj, "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "initializer_factor": 1.0,
        # transformers < 5 reads tie_word_embeddings as "lm_head shared and outputs scaled";
        # transformers 5 reads scale_decoder_outputs and ties only when lm_head is absent.
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "use_cache": True,
        "dtype": "float32",
    }


# --------------------------------------------------------------------------- files


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory as it is; otherwise a hub id, fetched (config, weights, tokenizer)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"{name_or_path}: model path not found (expected an HF model directory or hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "generation_config.json", "chat_template.jinja", "*.safetensors", "*.safetensors.index.json",
            "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "spiece.model", "special_tokens_map.json"]))
    except Exception as e:  # offline, unknown id, gated repo: all user-facing
        raise ModelLoadError(f"{name_or_path}: not a local directory, and the hub download failed: {e}") from None


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint as fp32 numpy: safetensors (single or sharded), or
    PyTorch .bin through torch's weights_only loader (no arbitrary unpickling). A file cut
    short (an interrupted download) or not a weights file is refused naming it."""
    files = _weight_files(model_dir)
    state: dict[str, np.ndarray] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="flax") as sf:
                    for k in sf.keys():
                        state[k] = np.asarray(sf.get_tensor(k), dtype=np.float32)
            except OSError:
                raise
            except Exception as e:  # safetensors' own error: a bad header, a truncated file
                raise ModelLoadError(f"{f}: not a readable safetensors file ({e}); "
                                     "if it was downloaded, the download may have been cut short") from None
        else:
            try:
                import torch
            except ImportError:
                raise ModelLoadError(f"{f}: PyTorch .bin weights need torch installed (loaded with weights_only=True); "
                                     "or convert the checkpoint to safetensors") from None
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except OSError:
                raise
            except Exception as e:  # a truncated archive, or a pickle that weights_only refuses
                raise ModelLoadError(f"{f}: not a readable PyTorch weights file ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
            state.update({k: v.float().numpy() for k, v in sd.items()})
    return state


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in (WEIGHTS_INDEX, "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{index}:{e.lineno}: malformed JSON: {e.msg}") from None
            except (KeyError, TypeError, AttributeError):
                raise ModelLoadError(f"{index}: expected an object with a \"weight_map\" of tensor name -> "
                                     "shard file") from None
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: names {len(missing)} shard(s) that are not in {model_dir}, "
                                     f"e.g. {missing[0]}")
            return [model_dir / s for s in shards]
    for name in (WEIGHTS, "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ModelLoadError(f"{model_dir}: no model weights (expected {WEIGHTS} or pytorch_model.bin)")


def load_pretrained(name_or_path: str, dtype: str = "float32", tokenizer: bool = True):
    """(model, params, tokenizer or None, cfg) from an HF directory or hub id."""
    model_dir = resolve_model_dir(name_or_path)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if hf_cfg.get("model_type") not in ("t5", "mt5"):  # fail before reading gigabytes of weights
        config_from_hf(hf_cfg, False, str(cfg_path))
    state = read_state_dict(model_dir)
    separate = "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], state.get("shared.weight"))
    cfg = config_from_hf(hf_cfg, separate, str(cfg_path)).replace(dtype=dtype)
    params = hf_to_params(state, cfg, str(model_dir))
    tok = None
    if tokenizer:
        from tinyllm_jax.model.tokenizer import load_tokenizer

        tok = load_tokenizer(str(model_dir))
    return T5(cfg), params, tok, cfg


def save_pretrained(params: dict[str, Any], cfg: T5Config, out_dir: str | Path, tokenizer=None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes config.json, generation_config.json, model.safetensors (sharded with an index
    when larger than `max_shard_bytes`) and the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = params_to_hf(jax_to_numpy(params), cfg)
    write_weights(out, [(k, v.nbytes, lambda v=v: v) for k, v in state.items()], max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    gen = {"decoder_start_token_id": cfg.decoder_start_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def write_weights(out: Path, tensors: list[tuple[str, int, Callable[[], np.ndarray]]],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes (HF key, bytes, make tensor) rows as model.safetensors, or as numbered shards of at
    most `max_shard_bytes` (a tensor larger than that alone) with model.safetensors.index.json.
    Shards are planned from the sizes and each tensor is made only while its shard is written:
    rows that convert lazily never hold a second copy of the whole checkpoint."""
    from safetensors.numpy import save_file

    shards: list[list[tuple[str, int, Callable[[], np.ndarray]]]] = [[]]
    size = 0
    for row in tensors:
        if size and size + row[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += row[1]
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                                                 for n in range(1, len(shards) + 1)]
    mode = _default_file_mode()
    for name, shard in zip(names, shards):
        save_file({k: make() for k, _, make in shard}, str(out / name), metadata={"format": "pt"})
        # safetensors writes through a private temporary file (0600): give the weights the mode
        # the other files get from the umask, so whoever may read the config may read them
        (out / name).chmod(mode)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k, _, _ in shard}
        total = sum(nbytes for shard in shards for _, nbytes, _ in shard)
        (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def jax_to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)

