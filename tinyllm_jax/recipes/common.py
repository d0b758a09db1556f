"""The stage functions the recipes are made of: records in, teacher rationales, training,
evaluation on test, export. Each returns a `Stage` whose folder is RUN_DIR/<name>/; a stage
that produces records leaves a `splits.json` there naming its file for each split, and
the next stage reads the latest one, so no path is ever typed twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, to_dict
from tinyllm_jax.data.streams import DEFAULT_TARGET, render_target
from tinyllm_jax.errors import UserError
from tinyllm_jax.recipes.config import SPLITS, RecipeConfig
from tinyllm_jax.recipes.stages import Stage, stage_dir

log = logging.getLogger("tinyllm.recipe")

MANIFEST = "splits.json"
# settings that change how a stage prints or starts, never what it writes
_DISPLAY_KEYS = {"progress", "allow_data_change"}


def settings_of(section: Any) -> Any:
    """A config section as JSON settings, without display-only keys."""
    d = to_dict(section) if dataclasses.is_dataclass(section) else section
    if isinstance(d, dict):
        return {k: settings_of(v) for k, v in d.items() if k not in _DISPLAY_KEYS}
    return d


def write_manifest(folder: Path, splits: dict[str, Path]) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps({k: str(v) for k, v in splits.items()}, indent=1) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, Path]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: missing (the stage that writes {folder.name}/ has not run)")
    return {k: Path(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def train_config(cfg: RecipeConfig, run_dir: Path, splits: dict[str, Path], **sections: Any) -> Config:
    """The recipe's training sections as a plain training config for one run directory and
    the given record files; `sections` replace whole sections (e.g. a mentor's model)."""
    base = Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})
    data = dataclasses.replace(sections.pop("data", base.data), **{s: [str(splits[s])] if s in splits else []
                                                                    for s in SPLITS})
    model = sections.pop("model", base.model)
    if model.train_tokenizer_vocab:  # the tokenizer trained now also serves the recipe's later streams
        later = [s.prefix for s in cfg.data.streams if s.prefix]
        later += [render_target(s.target, "", "") for s in cfg.data.streams if s.target != DEFAULT_TARGET]
        model = dataclasses.replace(model, tokenizer_texts=list(dict.fromkeys(model.tokenizer_texts + later)))
    return dataclasses.replace(base, run_dir=str(run_dir), data=data, model=model, **sections)


def training_settings(cfg: Config) -> dict[str, Any]:
    return {k: settings_of(getattr(cfg, k)) for k in ("model", "data", "mesh", "optim", "checkpoint", "eval", "train")}


def rationale_distillation_stages(cfg: RecipeConfig, run_dir: Path) -> list[Stage]:
    """data -> rationales (every configured teacher; none: the records carry them) -> train
    -> evaluate -> export (when enabled): TinyLLM and step-by-step alike."""
    out = [data_stage(cfg, run_dir)]
    records = "data"
    if cfg.rationales.teachers:
        out.append(rationales_stage(cfg, run_dir, records_from="data"))
        records = "rationales"
    out += [train_stage(cfg, run_dir, records_from=records), evaluate_stage(cfg, run_dir)]
    if cfg.export.enabled:
        out.append(export_stage(cfg, run_dir))
    return out


# --------------------------------------------------------------------------- records


def data_stage(cfg: RecipeConfig, run_dir: Path, name: str = "data") -> Stage:
    """Records from the embedded demo, from published reference data (converted), or from
    record files (read and checked, one file a split)."""
    out = stage_dir(run_dir, name)
    src = cfg.source
    user_files = {Path(p): f"source.{s}" for s in SPLITS for p in getattr(src, s)}
    if src.convert is not None:
        user_files[Path(src.convert.src)] = "source.convert.src"

    def run() -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        if src.demo is not None:
            splits = _demo_records(src.demo, src.keep_rationales, out)
        elif src.convert is not None:
            splits = _converted_records(src.convert, out)
        else:
            splits = _record_files(src, out)
        write_manifest(out, splits)
        counts = {s: sum(1 for line in open(p, encoding="utf-8") if line.strip()) for s, p in splits.items()}
        log.info("records: %s", ", ".join(f"{s} {n}" for s, n in counts.items()))
        return {"records": counts}

    return Stage(name, run, settings={"source": settings_of(src)}, writes=[out / MANIFEST], user_files=user_files)


def _demo_records(options: dict[str, Any], keep_rationales: bool, out: Path) -> dict[str, Path]:
    from tinyllm_jax.data.demo import write_demo_from_options
    from tinyllm_jax.data.records import read_jsonl, write_jsonl

    opts = {k: v for k, v in options.items() if k != "vocab_size"}
    paths = {s: Path(p) for s, p in write_demo_from_options(out, opts).items()}
    if not keep_rationales:  # the teachers stage writes them
        for path in paths.values():
            records = read_jsonl(path)[0]
            write_jsonl(path, [{**r, "rationales": {}, "meta": {"dataset": "demo"}} for r in records])
    return paths


def _converted_records(conv, out: Path) -> dict[str, Path]:
    from tinyllm_jax.data.formats import convert
    from tinyllm_jax.data.records import read_jsonl, write_jsonl

    converted = out / "converted"
    report = convert(conv.format, conv.src, converted)
    print(report.table())
    folder = converted / conv.dataset
    available = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
    if not available:
        found = sorted(p.name for p in converted.iterdir() if p.is_dir())
        raise UserError(f"source.convert.dataset: {conv.dataset!r} not among the converted datasets "
                        f"({', '.join(found) or 'none'})")
    names = {"train": ["train"], "validation": ["valid", "validation", "dev"], "test": ["test"]}
    splits = {}
    for split in SPLITS:
        wanted = [conv.splits[split]] if split in conv.splits else names[split]
        hit = next((n for n in wanted if n in available), None)
        if hit is None and split in conv.splits:
            raise UserError(f"source.convert.splits.{split}: {conv.splits[split]!r} is not a converted split of "
                            f"{conv.dataset} ({', '.join(available)})")
        if hit is not None:
            splits[split] = out / f"{split}.jsonl"
            write_jsonl(splits[split], read_jsonl(folder / f"{hit}.jsonl")[0])
    if "train" not in splits:
        raise UserError(f"source.convert: {conv.dataset} has no train split ({', '.join(available)}); "
                        "name it with source.convert.splits.train")
    return splits


def _record_files(src, out: Path) -> dict[str, Path]:
    from tinyllm_jax.data.sources import load_records
    from tinyllm_jax.data.records import write_jsonl

    splits = {}
    for split in SPLITS:
        files = getattr(src, split)
        if files:
            records, _ = load_records(files, "files")
            splits[split] = out / f"{split}.jsonl"
            write_jsonl(splits[split], records)
    return splits


# --------------------------------------------------------------------------- teachers


def rationales_stage(cfg: RecipeConfig, run_dir: Path, records_from: str, name: str = "rationales") -> Stage:
    """Every configured teacher's rationales for the records of `rationale_splits`
    (`tinyllm rationales`, resumable through its cache; the cache survives setting changes)."""
    out = stage_dir(run_dir, name)
    src = stage_dir(run_dir, records_from)

    def rationales_config() -> Config:
        splits = read_manifest(src)
        files = [str(splits[s]) for s in cfg.rationale_splits if s in splits]
        rc = dataclasses.replace(cfg.rationales, input=files, output=str(out))
        return dataclasses.replace(Config(), eval=cfg.eval, rationales=rc)

    def run() -> dict[str, Any]:
        from tinyllm_jax.teachers.generate import generate_command

        report = generate_command(rationales_config())
        splits = read_manifest(src)
        for s in cfg.rationale_splits:
            if s in splits:
                splits[s] = out / splits[s].name
        write_manifest(out, splits)
        return {"new_requests": sent_requests(report)}

    def plan() -> str:
        from tinyllm_jax.teachers.generate import plan_rationales

        if not (src / MANIFEST).is_file():
            return _estimate_requests(cfg)
        lines = []
        total = 0
        for teacher, per_file in plan_rationales(rationales_config()).items():
            for file, p in per_file.items():
                n = p["pool"] + p["requests"]
                total += n
                lines.append(f"{teacher} {file}: {n}" + ("" if p["exact"] else " at most") +
                             (f" ({p['pool']} for in-context examples)" if p["pool"] else ""))
        return f"{total} teacher requests to send" + (": " + "; ".join(lines) if lines else "")

    settings = {"rationales": settings_of(dataclasses.replace(cfg.rationales, input=[], output="")),
                "splits": cfg.rationale_splits, "task": cfg.rationales.task or cfg.eval.task}
    return Stage(name, run, settings, writes=[out / MANIFEST], reads=[src / MANIFEST], fresh_on_change=False, plan=plan)


def sent_requests(report: dict[str, Any]) -> int:
    """The requests a `tinyllm rationales` run sent: the records' and, where it ran, the
    zero-shot pass that found the in-context examples (what --dry-run counted)."""
    counts = [c for per_file in report["teachers"].values() for c in per_file.values()]
    return report["new"] + sum((c.get("pool") or {}).get("new", 0) for c in counts)


def _estimate_requests(cfg: RecipeConfig) -> str:
    """Before the records exist: the requests their counts imply (nothing is cached yet)."""
    counts = source_counts(cfg)
    if counts is None:
        return "known once the data stage has converted the records"
    rc = cfg.rationales
    total = 0
    for t in rc.teachers:
        for split in cfg.rationale_splits:
            n = counts.get(split, 0)
            pool = min(n, rc.zero_shot_pool) if rc.num_examples > 0 and not rc.examples_file and n else 0
            total += n * t.num_samples + pool
    return f"{total} teacher requests to send (from the source's record counts)"


def source_counts(cfg: RecipeConfig) -> dict[str, int] | None:
    """Records per split that the data stage will write, when known without running it."""
    src = cfg.source
    if src.demo is not None:
        return {"train": int(src.demo.get("n_train", 2000)), "validation": int(src.demo.get("n_valid", 200)),
                "test": int(src.demo.get("n_test", 200))}
    if src.convert is not None:
        return None
    from tinyllm_jax.data.sources import load_records

    return {s: len(load_records(getattr(src, s), "files")[0]) for s in SPLITS if getattr(src, s)}


# --------------------------------------------------------------------------- student


def train_stage(cfg: RecipeConfig, run_dir: Path, records_from: str, name: str = "train",
                **sections: Any) -> Stage:
    """One training run in RUN_DIR/<name>/ (a full run directory: `tinyllm eval`, `export`
    and `predict --model` take it), on the latest records; resumes from its checkpoint."""
    out = stage_dir(run_dir, name)
    src = stage_dir(run_dir, records_from)
    settings = training_settings(train_config(cfg, out, {}, **dict(sections)))

    def run() -> dict[str, Any]:
        from tinyllm_jax.train.loop import train

        result = train(train_config(cfg, out, read_manifest(src), **dict(sections)), evaluate_test=False)
        return {"final_loss": result.get("final_loss")}

    return Stage(name, run, settings, writes=[out / "summary.json"], reads=[src / MANIFEST])


def evaluate_stage(cfg: RecipeConfig, run_dir: Path, train_from: str = "train", records_from: str | None = None,
                   name: str = "evaluate") -> Stage:
    """The test split, once, with the checkpoint that validation selected."""
    out = stage_dir(run_dir, name)
    run_path = stage_dir(run_dir, train_from)

    def run() -> dict[str, Any]:
        summary = evaluate_run(run_path, out)
        log.info("test accuracy %s (checkpoint step %s, validation accuracy %s)", summary.get("test_accuracy"),
                 summary["step"], summary.get("validation_accuracy"))
        return summary

    return Stage(name, run, {"eval": settings_of(cfg.eval)}, writes=[out / "summary.json"],
                 reads=[run_path / "summary.json"])


def evaluate_run(run_path: Path, out: Path, split: str = "test") -> dict[str, Any]:
    """Scores `split` of a training run with its selected checkpoint; writes out/summary.json."""
    import jax

    from tinyllm_jax.config import load_config
    from tinyllm_jax.data.sources import has_split
    from tinyllm_jax.eval.evaluate import Evaluation
    from tinyllm_jax.runs import load_run
    from tinyllm_jax.runtime import sharding

    cfg = load_config(run_path / "config.yaml")
    model = load_run(run_path)
    summary: dict[str, Any] = {"run": str(run_path), "step": model.step,
                               "validation_accuracy": validation_accuracy(run_path, model.step)}
    if has_split(cfg.data, split):
        mesh = sharding.make_mesh(cfg.mesh)
        params = jax.device_put(model.params, sharding.replicated(mesh))
        result = Evaluation(cfg, model.arch, model.tokenizer, mesh).run(params, split, out, model.step)
        summary.update({f"{split}_accuracy": result["accuracy"], f"{split}_n": result["n"],
                        f"{split}_extracted": result["extracted"]})
    else:
        summary["note"] = f"no {split} split"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def validation_accuracy(run_path: Path, step: int | None) -> float | None:
    path = run_path / "metrics.jsonl"
    if not path.is_file():
        return None
    value = None
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == step and "eval_accuracy" in row:
            value = row["eval_accuracy"]
    return value


def export_stage(cfg: RecipeConfig, run_dir: Path, train_from: str = "train", name: str = "export") -> Stage:
    """The selected checkpoint as a Hugging Face T5 in RUN_DIR/export/."""
    out = stage_dir(run_dir, name)
    run_path = stage_dir(run_dir, train_from)

    def run() -> dict[str, Any]:
        from tinyllm_jax.runs import export_command

        export_command(str(run_path), str(out))
        return {"dir": str(out)}

    return Stage(name, run, {"export": settings_of(cfg.export)}, writes=[out / "config.json"],
                 reads=[run_path / "summary.json"])
