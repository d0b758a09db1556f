"""Starting (or resuming) a run in its directory. Everything the run needs is read and
checked first (config, data files, tokenizer, lengths, the teacher); only then is RUN_DIR
written, so a start that fails leaves an existing run as it was.

    RUN_DIR/train_data.json   the training records' count and content digest

A resumed run must train on the records it started on: another digest stops it in one
line, unless `train.allow_data_change` says to go on. Other changed settings are allowed
(more steps, say) and named in a warning. A finished run started again with the same
settings says so and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from tinyllm_jax.config import Config, ConfigError, save_config, to_dict
from tinyllm_jax.errors import check_writable_dir, make_dir, path_error

log = logging.getLogger("tinyllm.train")

TRAIN_DATA = "train_data.json"
SUMMARY = "summary.json"
# settings that change how a run is shown or started, never what it trains
_NOT_SETTINGS = ("train.progress", "train.allow_data_change")


@dataclasses.dataclass
class Prepared:
    """What a run starts from, all read and checked; nothing is written yet."""

    cfg: Config  # as saved in RUN_DIR/config.yaml (the demo's data in RUN_DIR/data)
    arch: Any  # the student's architecture, of either family (model/family.py)
    tokenizer: Any
    imported: Any  # parameters from model.init, or None
    mesh: Any
    data: Any  # the PackedIterator over the training examples
    blocks: Any  # this process's row blocks of each batch, and their number
    num_blocks: int
    distillation: Any  # train.distill.Distillation (every teacher), or None
    evaluation: Any  # eval.evaluate.Evaluation with its splits read, or None (nothing to evaluate)
    train_data: dict[str, Any]  # {"records": n, "sha256": digest}
    staged_data: Path | None  # the demo's files, written into RUN_DIR/data by `commit`


def records_digest(records: list[dict[str, Any]]) -> str:
    """A digest of the records' content (not of the files' names or layout)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def latest_checkpoint(run_dir: Path) -> int | None:
    """The newest complete checkpoint step of the run (None: none yet)."""
    from tinyllm_jax.runtime.checkpoint import complete_steps

    return max(complete_steps(Path(run_dir) / "checkpoints"), default=None)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(cfg: Config, run_dir: Path) -> dict[str, tuple[Any, Any]] | None:
    """key -> (saved, now) for the settings that differ from RUN_DIR/config.yaml; None
    when there is none."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        old = _flat(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, OSError):
        return None
    new = _flat(to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in _NOT_SETTINGS}


def finished_summary(cfg: Config, run_dir: Path) -> dict[str, Any] | None:
    """The saved summary of a run that already trained `cfg.train.steps` steps with these
    settings; None when there is something left to do."""
    from tinyllm_jax.train.student import prepare_demo_data

    summary = Path(run_dir) / SUMMARY
    if not summary.is_file() or latest_checkpoint(run_dir) != cfg.train.steps:
        return None
    if changed_settings(prepare_demo_data(cfg, Path(run_dir) / "data", write=False), run_dir) != {}:
        return None
    try:
        return json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_training_data(cfg: Config, run_dir: Path, train_data: dict[str, Any]) -> None:
    """Resuming on other training records stops here, unless train.allow_data_change."""
    step = latest_checkpoint(run_dir)
    path = Path(run_dir) / TRAIN_DATA
    if step is None or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if saved.get("sha256") == train_data["sha256"]:
        return
    then = f"{saved.get('records')} records, sha256 {str(saved.get('sha256'))[:12]}"
    now = f"{train_data['records']} records, sha256 {train_data['sha256'][:12]}"
    if cfg.train.allow_data_change:
        log.warning("resuming %s from step %d on other training data (%s at the start, %s now): "
                    "train.allow_data_change=true", run_dir, step, then, now)
        return
    raise ConfigError(f"data.train: {run_dir} resumes from step {step} but its training records changed "
                      f"({then} at the start, {now} now); start a new run_dir, or set "
                      f"train.allow_data_change=true to go on with the new records")


def warn_on_changed_settings(cfg: Config, run_dir: Path) -> None:
    """Resuming with other settings is allowed (more steps, say) but never silent."""
    if latest_checkpoint(run_dir) is None:
        return
    changed = changed_settings(cfg, run_dir)
    if changed:
        log.warning("resuming %s with changed settings: %s", run_dir,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8]))


def prepare(cfg: Config, run_dir: Path, scratch: Path, primary: bool = True) -> Prepared:
    """Reads and checks everything the run needs; writes only into `scratch` (the demo's
    data and a trained tokenizer, until `commit`). The other processes of a multi-host run
    (`primary` false) read what process 0 committed."""
    from tinyllm_jax.data.packing import CAUSAL, PackedIterator, RowShare, layout_of, row_lengths
    from tinyllm_jax.data.sources import has_split, load_split
    from tinyllm_jax.data.streams import build_examples, prompt_of
    from tinyllm_jax.eval.evaluate import Evaluation
    from tinyllm_jax.model.family import family_of
    from tinyllm_jax.model.tokenizer import check_coverage
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import load_distillation, teacher_configs
    from tinyllm_jax.train.student import build_student, prepare_demo_data

    final = prepare_demo_data(cfg, run_dir / "data", write=False)
    staged_data = scratch / "data" if primary and cfg.demo else None
    read_cfg = prepare_demo_data(cfg, staged_data) if staged_data else final
    records, _ = load_split(read_cfg.data, "train")
    train_data = {"records": len(records), "sha256": records_digest(records)}
    if primary:
        check_training_data(cfg, run_dir, train_data)
    arch, tokenizer, imported = build_student(read_cfg, run_dir, scratch=scratch / "tokenizer")
    mesh = sharding.make_mesh(cfg.mesh)
    divisor = sharding.batch_divisor(mesh) * cfg.optim.grad_accum_steps
    if cfg.train.batch_size % divisor:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by data x fsdp "
                          f"({sharding.batch_divisor(mesh)}) x optim.grad_accum_steps ({cfg.optim.grad_accum_steps})")
    d = cfg.data
    layout = layout_of(family_of(arch).layout)
    examples = build_examples(records, d.streams, tokenizer, d.max_input_length, d.max_target_length,
                              d.answer_source, d.lenient, d.cache_dir, prompt_of(d, layout is CAUSAL))
    check_coverage(tokenizer, examples)  # a tokenizer that cannot read the data stops here
    # the teachers: online ones on the mesh, stored soft labels riding with their examples' tokens
    distillation, examples = (load_distillation(cfg, arch, tokenizer, mesh, examples)
                              if teacher_configs(cfg.distill) else (None, examples))
    blocks, num_blocks = sharding.process_row_blocks(mesh)  # this process's rows of each batch
    data = PackedIterator(examples, cfg.train.batch_size, *row_lengths(d, layout),
                          seed=d.shuffle_seed, max_segments_per_row=d.max_segments_per_row,
                          share=RowShare(blocks, num_blocks, cfg.optim.grad_accum_steps), layout=layout)
    long_rows = cfg.train.batch_size // data.long_factor
    if long_rows % divisor:
        raise ConfigError(f"{data.long_examples} training examples are longer than "
                          f"{' / '.join(dict.fromkeys(layout.length_keys))} and train in long batches of "
                          f"train.batch_size / {data.long_factor} = {long_rows} rows, which must be divisible by "
                          f"data x fsdp ({sharding.batch_divisor(mesh)}) x optim.grad_accum_steps "
                          f"({cfg.optim.grad_accum_steps}); raise the lengths or the batch size")
    evaluation = None
    if has_split(read_cfg.data, "validation") or has_split(read_cfg.data, "test"):
        evaluation = Evaluation(read_cfg, arch, tokenizer, mesh)
        for split in ("validation", "test"):  # read and checked now: a bad file fails in seconds, not hours
            if has_split(read_cfg.data, split):
                evaluation._inputs(split)
    return Prepared(final, arch, tokenizer, imported, mesh, data, blocks, num_blocks, distillation, evaluation,
                    train_data, staged_data)


def commit(p: Prepared, run_dir: Path) -> None:
    """The run directory written: the demo's data, config.yaml, the tokenizer, the
    architecture and the training records' digest. Every failure names run_dir."""
    from tinyllm_jax.train.student import save_student

    warn_on_changed_settings(p.cfg, run_dir)
    make_dir(run_dir, "run_dir")
    target = run_dir
    try:
        if p.staged_data is not None:
            for f in sorted(p.staged_data.iterdir()):
                target = run_dir / "data" / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
        target = run_dir / "config.yaml"
        save_config(p.cfg, target)
        target = run_dir / "tokenizer"
        save_student(run_dir, p.arch, p.tokenizer)
        target = run_dir / TRAIN_DATA
        target.write_text(json.dumps(p.train_data, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise path_error("run_dir", target, e) from None


def lock_run_dir(run_dir: Path, key: str = "run_dir"):
    """The run directory made (its parents checked before) and held by this process alone,
    as a context manager: another command in it is refused (runtime/run_lock.py)."""
    from tinyllm_jax.runtime import run_lock

    make_dir(run_dir, key)
    return run_lock.hold(run_dir, key)


def check_run_dir(run_dir: Path) -> None:
    """`run_dir` can be written (it is no file, its parents are folders we may write in)."""
    check_writable_dir(run_dir, "run_dir")
