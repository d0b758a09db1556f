"""The model families a student (or a teacher) can be, and everything about a model that
differs between them, in one table. Packing, the fused loss, the train loop, checkpoints,
evaluation, the generation engine and the recipes are written once, against this.

    family    architecture     a packed row (data/packing.py)       forward
    t5        T5Config         encoder side + decoder side          encode the input, decode the target
    decoder   DecoderConfig    one sequence: prompt, then target;   causal over the sequence
              (llama, mistral, loss only where a target token is
               qwen2, qwen3)   predicted

What each family keeps to itself: its network module and parameter init, the batch keys its
forward pass reads, its row layout, its Hugging Face checkpoint format (name map, config.json),
how a run directory records its architecture, its FLOPs, and (eval/engine.py) how it fills the
generation engine's slots. A family is told by the architecture's type; a checkpoint's family
by config.json's `model_type`, as transformers' Auto classes tell theirs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tinyllm_jax.errors import UserError
from tinyllm_jax.model.t5 import T5, T5Config

T5_TYPES = ("t5", "mt5")
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    layout: str  # the row layout: "encoder-decoder" or "causal" (data/packing.py)
    model_inputs: tuple[str, ...]  # the batch keys the module's __call__ takes, in order
    module: Callable[..., Any]  # (arch, deterministic) -> the Flax module
    dummy_inputs: Callable[[], tuple]  # inputs to initialise parameters with
    arch_from_dict: Callable[[dict], Any]  # model_config.json -> architecture
    real_token_keys: tuple[str, ...]  # segment-id keys whose non-zero entries are real tokens
    flops: Callable[..., float]  # (arch, rows, length_a, length_b) -> train FLOPs of a step
    hf_types: tuple[str, ...]  # config.json model_types

    def init(self, arch: Any, rng: jax.Array) -> Any:
        """Randomly initialised parameters, boxed with their logical axis names."""
        return self.module(arch, True).init(rng, *self.dummy_inputs())["params"]

    def apply(self, arch: Any, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None,
              deterministic: bool | None = None) -> jax.Array:
        """fp32 logits [B, L, V] of a packed batch (dropout from `rng` unless deterministic)."""
        det = arch.dropout_rate == 0.0 if deterministic is None else deterministic
        model = self.module(arch, det)
        return model.apply({"params": params}, *(batch[k] for k in self.model_inputs),
                           rngs={"dropout": rng} if rng is not None and not det else {})


def _t5_flops(arch: T5Config, rows: int, enc_len: int, dec_len: int) -> float:
    from tinyllm_jax.train.metrics import train_flops_per_step

    return train_flops_per_step(arch, rows, enc_len, dec_len)


def _decoder_module(arch, deterministic: bool):
    from tinyllm_jax.model.decoder import Decoder

    return Decoder(arch, deterministic=deterministic)


def _decoder_from_dict(d: dict) -> Any:
    from tinyllm_jax.model.decoder import DecoderConfig

    return DecoderConfig.from_dict(d)


def decoder_flops(arch, rows: int, length: int, _unused: int = 0) -> float:
    """Forward-plus-backward FLOPs (3x forward) of a step over `rows` causal rows of `length`:
    every matmul at 2 FLOPs a multiply-add, full (unmasked) attention counted, as computed."""
    D, F, V = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    Hq, Hkv = arch.num_attention_heads * arch.head_size, arch.num_key_value_heads * arch.head_size
    per_token = arch.num_hidden_layers * (D * Hq * 2 + D * Hkv * 2 + 3 * D * F) + D * V
    attn = arch.num_hidden_layers * 2 * length * length * Hq
    return 3.0 * 2 * rows * (length * per_token + attn)


T5_FAMILY = Family(
    name="t5", layout="encoder-decoder",
    model_inputs=("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids", "decoder_segment_ids"),
    module=lambda arch, deterministic: T5(arch, deterministic=deterministic),
    dummy_inputs=lambda: (jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)),
    arch_from_dict=lambda d: T5Config(**d),
    real_token_keys=("encoder_segment_ids", "decoder_segment_ids"),
    flops=_t5_flops, hf_types=T5_TYPES)

DECODER_FAMILY = Family(
    name="decoder", layout="causal",
    model_inputs=("decoder_input_tokens", "decoder_segment_ids", "decoder_positions"),
    module=_decoder_module,
    dummy_inputs=lambda: (jnp.ones((1, 8), jnp.int32),),
    arch_from_dict=_decoder_from_dict,
    real_token_keys=("decoder_segment_ids",),
    flops=decoder_flops, hf_types=DECODER_TYPES)

FAMILIES = {f.name: f for f in (T5_FAMILY, DECODER_FAMILY)}


def family_of(arch: Any) -> Family:
    """The family of an architecture config."""
    if isinstance(arch, T5Config):
        return T5_FAMILY
    from tinyllm_jax.model.decoder import DecoderConfig

    if isinstance(arch, DecoderConfig):
        return DECODER_FAMILY
    raise TypeError(f"no model family for {type(arch).__name__}")


# --------------------------------------------------------------------------- run directories


def arch_to_json(arch: Any) -> str:
    """model_config.json of a run: the architecture, with its family named."""
    return json.dumps({"family": family_of(arch).name, **dataclasses.asdict(arch)}, indent=2)


def arch_from_json(text: str, where: str = "model_config.json") -> Any:
    """The inverse of `arch_to_json`; a file without `family` is a T5 (runs made before there
    were two families)."""
    d = json.loads(text)
    name = d.pop("family", "t5")
    if name not in FAMILIES:
        raise UserError(f"{where}: family {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name].arch_from_dict(d)


# --------------------------------------------------------------------------- Hugging Face checkpoints


def hf_family(model_type: Any, where: str) -> Family:
    """The family of a checkpoint whose config.json names `model_type`; refused in one line
    naming it when no family reads it."""
    for family in FAMILIES.values():
        if model_type in family.hf_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.hf_types)
    raise_load_error(f"{where}: model_type is {model_type!r}; tinyllm-jax students and teachers are one of: "
                     f"{supported}")


def raise_load_error(message: str):
    from tinyllm_jax.model.hf import ModelLoadError

    raise ModelLoadError(message)


def load_pretrained(name_or_path: str, dtype: str = "float32", tokenizer: bool = True) -> tuple[Any, Any, Any]:
    """(host params, architecture, tokenizer or None) of an HF directory or hub id, of either
    family (told by config.json's model_type)."""
    from tinyllm_jax.model import hf

    model_dir = hf.resolve_model_dir(name_or_path)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise_load_error(f"{model_dir}: no config.json: neither a Hugging Face model directory nor one of our runs "
                         "(a run directory holds config.yaml and model_config.json)")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise_load_error(f"{cfg_path}: malformed JSON: {e}")
    family = hf_family(model_type, str(cfg_path))
    if family is T5_FAMILY:
        _, params, tok, arch = hf.load_pretrained(str(model_dir), dtype=dtype, tokenizer=tokenizer)
        return params, arch, tok
    from tinyllm_jax.model import decoder_hf

    return decoder_hf.load_pretrained(str(model_dir), dtype=dtype, tokenizer=tokenizer)


# the files of a checkpoint's weights: one left from an earlier export beside new ones would be
# read instead of them (an index beside a new unsharded file is read first, by us and transformers)
WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def save_pretrained(params: Any, arch: Any, out_dir: str | Path, tokenizer=None) -> Path:
    """An HF checkpoint of either family: config.json, weights, generation config, tokenizer.

    Written into a hidden sibling folder and swapped in whole: a crash leaves the earlier export
    as it was, and no weight file of an earlier export (another sharding) stays beside the new
    ones. Other files of the earlier export (a model card) are kept. A training run's own folder
    is refused."""
    import glob
    import os
    import shutil

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; name a folder to export into")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        raise UserError(f"{out}: is a training run's folder; export into another folder (nothing was written)")
    # "." and "a/.." have no name to put a sibling beside; a link is followed (it keeps pointing at the export)
    full = Path(os.path.realpath(out))
    if Path.cwd() == full or full in Path.cwd().parents:
        raise UserError(f"{out}: is the current folder or holds it; export into a folder of its own")
    full.parent.mkdir(parents=True, exist_ok=True)
    for leftover in full.parent.glob(f".{glob.escape(full.name)}.export-*"):  # of an export that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = full.parent / f".{full.name}.export-{os.getpid()}"
    if family_of(arch) is T5_FAMILY:
        from tinyllm_jax.model.hf import save_pretrained as save_family
    else:
        from tinyllm_jax.model.decoder_hf import save_pretrained as save_family
    save_family(params, arch, staging, tokenizer)
    if full.is_dir():
        for path in full.iterdir():
            if not (staging / path.name).exists() and not WEIGHT_FILES.fullmatch(path.name):
                os.replace(path, staging / path.name)
        replaced = full.parent / f".{full.name}.export-{os.getpid()}-replaced"
        os.replace(full, replaced)
        os.replace(staging, full)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, full)
    return out


