"""A training run directory, read back: its config, architecture, tokenizer and a chosen
checkpoint's parameters; and the one loader for "a model" wherever the CLI or a recipe
takes one (a run directory, an HF directory or a hub id). Export of a run lives here too,
above both the model's HF name map and the checkpoints.

    RUN_DIR/config.yaml          the resolved run config
    RUN_DIR/model_config.json    the student's architecture (T5Config)
    RUN_DIR/tokenizer/           its tokenizer
    RUN_DIR/checkpoints/<step>/  Orbax checkpoints (last K plus the best on validation)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm_jax.errors import UserError


@dataclass
class LoadedModel:
    """Host (numpy) parameters with their architecture and tokenizer; `step` is the run
    checkpoint they came from (None for an HF model)."""

    arch: Any  # the architecture, of either family (model/family.py)
    params: Any
    tokenizer: Any
    source: str
    step: int | None = None


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "model_config.json").is_file()


def run_model_config(run_dir: str | Path) -> Any:
    """The run's student architecture (either family: model/family.py)."""
    from tinyllm_jax.model.family import arch_from_json

    path = Path(run_dir) / "model_config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a training run directory (no model_config.json); train first or set run_dir=")
    return arch_from_json(path.read_text(), str(path))


def selected_step(run_dir: str | Path, step: int | None = None) -> int:
    """`step` if the run saved it, else the run's selected checkpoint (best on validation,
    else the latest)."""
    from tinyllm_jax.config import load_config
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        saved = sorted(ckpt.manager.all_steps())
        if not saved:
            raise UserError(f"{run_dir}/checkpoints: no checkpoint saved yet")
        if step is None:
            return ckpt.best_step()
        if step not in saved:
            raise UserError(f"{run_dir}/checkpoints: no step {step} (saved: {saved})")
        return step
    finally:
        ckpt.close()


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedModel:
    """A run's checkpoint `step` (default: its selected checkpoint) as host arrays."""
    from tinyllm_jax.config import load_config
    from tinyllm_jax.model.tokenizer import load_tokenizer
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    arch = run_model_config(run_dir)
    step = selected_step(run_dir, step)
    ckpt = Checkpointer(run_dir / "checkpoints", load_config(run_dir / "config.yaml").checkpoint, read_only=True)
    try:
        params = ckpt.restore_params(step)
    finally:
        ckpt.close()
    return LoadedModel(arch, params, load_tokenizer(str(run_dir / "tokenizer")), str(run_dir), step)


def load_model(name_or_path: str, step: int | None = None, tokenizer: bool = True) -> LoadedModel:
    """A run directory (its selected checkpoint, or `step`), an HF directory or a hub id."""
    if is_run_dir(name_or_path):
        return load_run(name_or_path, step)
    if step is not None:
        raise UserError(f"{name_or_path}: a checkpoint step applies to a training run directory only")
    from tinyllm_jax.model.family import load_pretrained

    params, arch, tok = load_pretrained(name_or_path, tokenizer=tokenizer)
    return LoadedModel(arch, params, tok, name_or_path)


def export_command(src: str, out_dir: str, step: int | None = None) -> Path:
    """`tinyllm export`: a training run (its selected checkpoint, or `step`), an HF
    directory or a hub id, written as an HF checkpoint of its family (T5, or a causal LM)."""
    from tinyllm_jax.model.family import save_pretrained

    model = load_model(src, step)
    out = save_pretrained(model.params, model.arch.replace(dtype="float32"), out_dir, model.tokenizer)
    what = f"{src} step {model.step}" if model.step is not None else src
    print(f"exported {what} to {out} ({sum(1 for _ in out.iterdir())} files)")
    return out
