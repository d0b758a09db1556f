"""`tinyllm recipe`: each method as one resumable command over one config. A method is a
short module that lists its stages in order (tinyllm.py, step_by_step.py); the stage
plumbing (done records, resume, reruns on changed settings, --dry-run) is stages.py, and
the stage functions they share are common.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyllm_jax.recipes.config import RecipeConfig, load_recipe
from tinyllm_jax.recipes.stages import Stage, run_stages


def method_stages(cfg: RecipeConfig) -> list[Stage]:
    return method_module(cfg).stages(cfg, Path(cfg.run_dir))


def method_module(cfg: RecipeConfig):
    from tinyllm_jax.recipes import fair, mentor_kd, step_by_step, tinyllm

    return {"tinyllm": tinyllm, "step_by_step": step_by_step, "fair": fair, "mentor_kd": mentor_kd}[cfg.method]


def recipe_command(config: str, overrides: list[str], dry_run: bool = False, only: str | None = None) -> dict[str, Any]:
    """Runs (or, with `dry_run`, describes) the recipe; writes and prints its summary."""
    import contextlib

    from tinyllm_jax.config import save_config
    from tinyllm_jax.errors import check_writable_dir
    from tinyllm_jax.runtime import distributed
    from tinyllm_jax.train.loop import setup_logging
    from tinyllm_jax.train.start import lock_run_dir

    setup_logging()
    cfg = load_recipe(config, overrides)
    stages = method_stages(cfg)
    run_dir = Path(cfg.run_dir)
    check_writable_dir(run_dir, "run_dir")
    if dry_run:
        print(f"recipe {cfg.method} in {run_dir}: {len(stages)} stages")
        return {"stages": [s.__dict__ for s in run_stages(stages, run_dir, dry_run=True, only=only)]}
    # one recipe command at a time in RUN_DIR (runtime/run_lock.py); its training stages lock their own
    with lock_run_dir(run_dir) if distributed.is_primary() else contextlib.nullcontext():
        save_config(cfg, run_dir / "recipe.yaml")
        run_stages(stages, run_dir, only=only)
        return _summarise(cfg, stages, run_dir)


def _summarise(cfg: RecipeConfig, stages: list[Stage], run_dir: Path) -> dict[str, Any]:
    """The recipe's summary.json and its one line (FAIR: a report per round first)."""
    summary = recipe_summary(cfg, stages)
    report = getattr(method_module(cfg), "report", None)
    if report is not None:  # FAIR: a report per round
        summary["rounds"] = report(cfg, run_dir)["rounds"]
        print(method_module(cfg).format_report(summary))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(summary_line(summary))
    return summary


def recipe_summary(cfg: RecipeConfig, stages: list[Stage]) -> dict[str, Any]:
    from tinyllm_jax.recipes.stages import read_record

    run_dir = Path(cfg.run_dir)
    out: dict[str, Any] = {"method": cfg.method, "run_dir": str(run_dir), "stages": {}}
    for stage in stages:
        record = read_record(run_dir, stage.name) or {}
        out["stages"][stage.name] = {"status": record.get("status", "not run"), **(record.get("result") or {})}
    last_eval = [name for name in out["stages"] if name.endswith("evaluate")]
    evaluation = out["stages"][last_eval[-1]] if last_eval else {}
    for key in ("step", "validation_accuracy", "test_accuracy"):
        if key in evaluation:
            out[key] = evaluation[key]
    return out


def summary_line(summary: dict[str, Any]) -> str:
    done = sum(s["status"] == "done" for s in summary["stages"].values())
    parts = [f"recipe {summary['method']}: {done}/{len(summary['stages'])} stages done"]
    if "step" in summary:
        parts.append(f"checkpoint step {summary['step']}")
    for key in ("validation_accuracy", "test_accuracy"):
        if summary.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {summary[key]:.4f}")
    parts.append(f"summary {Path(summary['run_dir']) / 'summary.json'}")
    return "; ".join(parts)
