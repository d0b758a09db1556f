"""Does distillation help? Every method on the same task, student and seeds, at two budgets.

    python -m benchmarks.methods              # the full comparison (93 min on 2 CPU cores, 2026-12-02)
    python -m benchmarks.methods --plan       # the steps each run would take; trains nothing
    python -m benchmarks.methods --quick      # one seed, answer-only vs TinyLLM, a couple of minutes

Writes benchmarks/results/methods-<device>-<date>.json and .png, and prints the table.

The design, fixed before any result was looked at (and kept in the JSON as `plan`):

* Task: the embedded demo's word problems with FREE-FORM numeric answers (demo choices off):
  a start count and 2-3 signed changes, e.g. "Tom has 9 apples, buys 5 more and loses 3".
  The answer (0-28) needs two or three additions or subtractions of numbers that appear in
  the question; with no choices to pick from nothing gives it away (guessing the most common
  answer scores about 7%). Scored by `number` (exact value). Questions are assigned to a
  split by a hash of their text, so no test question is in train.
* Why this task: it is the demo's own task, so it answers why the demo's three streams scored
  below answer-only; free-form answers remove the 4-choice guessing floor (25%) that could
  hide differences.
* Sizes: 2000 train / 200 validation / 500 test questions (the demo's train set; a larger
  test set for a tighter estimate); the demo's student (T5, d_model 128, 3+3 layers, 4
  heads, ~2M parameters) from scratch, with ONE SentencePiece tokenizer trained once on the
  data and shared by every run; rows of 128 / 48 tokens, 16 a step, AdamW 2e-3, linear decay.
* Teachers: the demo's two: careful (step by step, always right) and terse (one equation,
  wrong on 15% of questions).
* Methods: answer only; distilling step-by-step (careful teacher, alpha 0.5); TinyLLM with
  careful alone, terse alone, and both (weights 1/1/1, the reference's defaults); Mentor-KD
  (mentor 2x the student's width, trained on both teachers' correct chains, 3 samples a
  question at T 0.7, KD weight 0.3 at T 2); FAIR (one round; the student first learns the
  answers for half its budget, its mistakes are mined, the two teachers give feedback and
  rationales and review each other).
* Budgets, side by side: COMPUTE: 400 steps for every student (the shipped demo's budget;
  packed rows hold about the same number of real tokens in every method, and the JSON has
  each run's real-token count); PASSES: 4 epochs over every stream's examples, so each
  question's answer (or its chains) is seen 4 times by every method. The mentor's own
  training is not counted in the student's budget; it is reported.
  Mentor-KD and FAIR run at the compute budget only (changed during the first full run, for
  time alone: a Mentor-KD run takes ~7 min here, its mentor's training and sampling
  included, and both budgets would take the benchmark past two hours; neither has an
  answer stream whose passes could be matched; `PASSES_METHODS`; `--methods mentor-kd fair`
  runs them at both).
* Evaluation: validation (every 100 steps) selects the checkpoint; the test split is scored
  once. Methods with an answer stream are scored on it (the papers' protocol: `predict:`);
  methods trained on rationales are ALSO scored by decoding their rationale stream and
  reading its final answer ("cot" column). Mentor-KD and FAIR have no answer stream: their
  students answer through their chains.
* Seeds: 3 (model init, dropout and data order; the data and teachers are fixed).
* Data efficiency: answer-only and the best rationale method of the compute budget, on 12.5%,
  25% and 50% of the train questions (a stable hash of the id) at the compute budget. The
  best is chosen among the one-run methods (step-by-step and the TinyLLM variants,
  `SWEEP_CANDIDATES`; changed during the first full run, for time alone: Mentor-KD came out
  best by 0.007 and its 9 sweep runs would have taken another hour).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PLAN = {
    "task": "demo word problems, free-form numeric answers, scored by `number`",
    "data": {"n_train": 2000, "n_valid": 200, "n_test": 500, "seed": 0},
    "student": {"d_model": 128, "d_kv": 32, "d_ff": 512, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4},
    "mentor": {"d_model": 256, "d_ff": 1024, "num_heads": 8},
    "rows": {"batch_size": 16, "encoder_length": 128, "decoder_length": 48},
    "budgets": {"compute_steps": 400, "passes_epochs": 4},
    "seeds": [0, 1, 2],
    "eval_every": 100,
    "fractions": [0.125, 0.25, 0.5],
}
QUICK = {**PLAN, "data": {"n_train": 400, "n_valid": 64, "n_test": 128, "seed": 0},
         "budgets": {"compute_steps": 120, "passes_epochs": 2}, "seeds": [0], "eval_every": 60, "fractions": []}
TINY = {**QUICK, "data": {"n_train": 48, "n_valid": 16, "n_test": 16, "seed": 0},
        "student": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4},
        "budgets": {"compute_steps": 6, "passes_epochs": 1}, "eval_every": 6}

METHODS = ["answer-only", "step-by-step", "tinyllm-careful", "tinyllm-terse", "tinyllm-both", "mentor-kd", "fair"]
QUICK_METHODS = ["answer-only", "tinyllm-both"]
CHAIN_ANSWERS = ["mentor-kd", "fair"]  # no answer stream: the student answers through its chain
SWEEP_CANDIDATES = ["step-by-step", "tinyllm-careful", "tinyllm-terse", "tinyllm-both"]
PASSES_METHODS = ["answer-only", "step-by-step", "tinyllm-careful", "tinyllm-terse", "tinyllm-both"]

ANSWER = {"name": "answer", "prefix": "predict: ", "weight": 1.0}
CAREFUL = {"name": "careful", "prefix": "explain: ", "weight": 1.0, "teacher": "careful"}
TERSE = {"name": "terse", "prefix": "rationale: ", "weight": 1.0, "teacher": "terse"}
STREAMS = {
    "answer-only": [ANSWER],
    "step-by-step": [{**ANSWER, "weight": 0.5}, {**CAREFUL, "weight": 0.5}],
    "tinyllm-careful": [ANSWER, CAREFUL],
    "tinyllm-terse": [ANSWER, TERSE],
    "tinyllm-both": [ANSWER, CAREFUL, TERSE],
    "mentor-kd": [{"name": "chains", "prefix": "solve: ", "weight": 0.7, "teacher": "chains",
                   "target": "{rationale} --> {answer}"}],
    "fair": [{"name": "feedback", "prefix": "feedback: ", "weight": 0.5, "teacher": "feedback"},
             {"name": "rationale", "prefix": "explain: ", "weight": 0.5, "teacher": "rationale"}],
}
RATIONALE_STREAM = {"step-by-step": "careful", "tinyllm-careful": "careful", "tinyllm-terse": "terse",
                    "tinyllm-both": "careful", "mentor-kd": "chains", "fair": "rationale"}
DEMO_TEACHERS = [{"name": "careful", "backend": "demo", "model": "careful"},
                 {"name": "terse", "backend": "demo", "model": "terse"}]


# --------------------------------------------------------------------------- data, configs


def prepare(work: Path, plan: dict[str, Any]) -> dict[str, Path]:
    """The records (with both teachers' rationales) and the shared tokenizer, made once."""
    from tinyllm_jax.data.demo import DEMO_PHRASES, demo_texts, write_demo_data
    from tinyllm_jax.data.records import read_jsonl
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    data = work / "data"
    paths = {k: Path(v) for k, v in write_demo_data(data, choices=False, **plan["data"]).items()}
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        prefixes = sorted({s["prefix"] for streams in STREAMS.values() for s in streams})
        texts = demo_texts(read_jsonl(paths["train"])[0], extra=prefixes + list(DEMO_PHRASES))
        train_sentencepiece(texts, tok, vocab_size=256, model_type="bpe")
    paths["tokenizer"] = tok
    return paths


def subset(paths: dict[str, Path], fraction: float, work: Path) -> dict[str, Path]:
    """The train questions whose id hashes below `fraction` (stable across seeds and runs)."""
    from tinyllm_jax.data.records import read_jsonl, write_jsonl

    keep = [r for r in read_jsonl(paths["train"])[0]
            if int(hashlib.sha256(r["id"].encode()).hexdigest()[:8], 16) / 16**8 < fraction]
    out = work / f"data-{fraction:g}" / "train.jsonl"
    write_jsonl(out, keep)
    return {**paths, "train": out}


def recipe(method: str, seed: int, steps: int, paths: dict[str, Path], plan: dict[str, Any], run_dir: Path) -> dict:
    """The recipe config of one run (every method shares the model, rows, optimiser, eval)."""
    arch = {**plan["student"], "vocab_size": 256, "relative_attention_num_buckets": 16,
            "relative_attention_max_distance": 64, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
            "tokenizer": str(paths["tokenizer"])}
    rows = plan["rows"]
    cot = method in ("mentor-kd", "fair")
    cfg = {
        "run_dir": str(run_dir),
        "method": {"mentor-kd": "mentor_kd", "fair": "fair", "step-by-step": "step_by_step"}.get(method, "tinyllm"),
        "source": {"train": [str(paths["train"])], "validation": [str(paths["validation"])],
                   "test": [str(paths["test"])]},
        "rationales": {"teachers": DEMO_TEACHERS if method == "fair" else [], "progress": False},
        "export": {"enabled": False},
        "model": arch,
        "data": {"streams": STREAMS[method], "max_input_length": 160, "max_target_length": 96,
                 "encoder_length": rows["encoder_length"], "decoder_length": rows["decoder_length"],
                 "shuffle_seed": seed},
        "train": {"steps": steps, "batch_size": rows["batch_size"], "seed": seed, "log_every": 1, "progress": False},
        "optim": {"name": "adamw", "learning_rate": 2e-3, "warmup_steps": max(1, steps // 10), "schedule": "linear",
                  "clip_norm": 1.0},
        "eval": {"every_steps": plan["eval_every"], "task": "number", "max_new_tokens": 48 if cot else 8,
                 "batch_size": 100},
        "checkpoint": {"every_steps": plan["eval_every"], "keep": 1},
    }
    if method == "mentor-kd":
        m = plan["mentor"]
        cfg["mentor"] = {"model": {**arch, **m}, "train": {**cfg["train"], "steps": plan["budgets"]["compute_steps"]},
                         "optim": cfg["optim"], "samples": 3, "temperature": 0.7, "max_new_tokens": 48,
                         "teachers": ["careful", "terse"], "seed": seed}
        cfg["distill"] = {"weight": 0.3, "temperature": 2.0}
    if method == "fair":
        cfg["fair"] = {"rounds": 1, "warmup_steps": steps // 2, "seed": seed}
        cfg["train"]["steps"] = steps - steps // 2
    return cfg


# --------------------------------------------------------------------------- runs


def steps_for_epochs(cfg_dict: dict, records_path: Path, epochs: int) -> int:
    """Steps in which every example of every stream is seen `epochs` times (packed batches)."""
    import math

    from tinyllm_jax.config import DataConfig, StreamConfig, from_dict
    from tinyllm_jax.data.packing import PackedIterator
    from tinyllm_jax.data.records import read_jsonl
    from tinyllm_jax.data.streams import build_examples
    from tinyllm_jax.model.tokenizer import load_tokenizer

    data = from_dict(DataConfig, {k: v for k, v in cfg_dict["data"].items()})
    streams = [dataclasses.replace(s, optional=True) if isinstance(s, StreamConfig) else s for s in data.streams]
    tok = load_tokenizer(cfg_dict["model"]["tokenizer"])
    ex = build_examples(read_jsonl(records_path)[0], streams, tok, data.max_input_length, data.max_target_length)
    it = PackedIterator(ex, cfg_dict["train"]["batch_size"], data.encoder_length, data.decoder_length, seed=0,
                        process_index=0, process_count=1)
    rows, long = it.epoch_plan(0)
    return epochs * (math.ceil(len(rows) / cfg_dict["train"]["batch_size"]) + len(long))


def run_recipe(cfg_dict: dict, path: Path, until: str | None = None) -> None:
    import yaml

    from tinyllm_jax.recipes import method_stages
    from tinyllm_jax.recipes.config import load_recipe
    from tinyllm_jax.recipes.stages import run_stages

    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_recipe(str(path))
    stages = method_stages(cfg)
    if until is not None:
        stages = stages[: [s.name for s in stages].index(until) + 1]
    run_stages(stages, Path(cfg.run_dir), echo=lambda s: None)


def score_stream(run_path: Path, stream: str, max_new_tokens: int = 48) -> float:
    """Test accuracy of a trained run decoding `stream` (its final answer scored)."""
    import jax

    from tinyllm_jax.config import load_config
    from tinyllm_jax.eval.evaluate import Evaluation
    from tinyllm_jax.runs import load_run

    cfg = load_config(run_path / "config.yaml")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, stream=stream, max_new_tokens=max_new_tokens),
                              train=dataclasses.replace(cfg.train, progress=False))
    model = load_run(run_path)
    return Evaluation(cfg, model.t5cfg, model.tokenizer).run(jax.device_put(model.params), "test")["accuracy"]


def one_run(method: str, budget: str, seed: int, paths: dict[str, Path], plan: dict[str, Any], work: Path,
            tag: str = "") -> dict[str, Any]:
    run_dir = work / "runs" / f"{method}-{budget}{tag}-s{seed}"
    done = run_dir / "benchmark-result.json"
    if done.is_file():  # a rerun of the benchmark picks up where it was stopped
        result = json.loads(done.read_text())
        print(time.strftime("%H:%M:%S"), "done before:", json.dumps(result), flush=True)
        return result
    t0 = time.time()
    steps = plan["budgets"]["compute_steps"]
    cfg = recipe(method, seed, steps, paths, plan, run_dir)
    path = work / "configs" / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if budget == "passes":
        epochs = plan["budgets"]["passes_epochs"]
        if method == "mentor-kd":  # the chains stream is known once the mentor has sampled
            run_recipe(cfg, path, until="augment")
            steps = steps_for_epochs(cfg, run_dir / "augment" / "train.jsonl", epochs)
            cfg["train"]["steps"] = steps
        elif method == "fair":  # warmup: answers; the round: its mistakes' material
            warm = steps_for_epochs({**cfg, "data": {**cfg["data"], "streams": [
                {"name": "rationale", "prefix": "explain: "}]}}, paths["train"], epochs)
            cfg["fair"]["warmup_steps"] = warm
            review = "round1/review"
            run_recipe(cfg, path, until=review)
            from tinyllm_jax.recipes import fair as fair_recipe
            from tinyllm_jax.recipes.config import load_recipe
            from tinyllm_jax.data.records import read_jsonl, write_jsonl

            rc = load_recipe(str(path))
            material = fair_recipe.training_records(rc, "round1", read_jsonl(run_dir / "round1/feedback/mistakes.jsonl")[0],
                                                    read_jsonl(run_dir / "round1/review/mistakes.jsonl")[0])
            write_jsonl(run_dir / "round1-material.jsonl", material)
            cfg["train"]["steps"] = steps_for_epochs(cfg, run_dir / "round1-material.jsonl", epochs)
            steps = warm + cfg["train"]["steps"]
        else:
            steps = steps_for_epochs(cfg, paths["train"], epochs)
            cfg["train"]["steps"] = steps
            cfg["optim"]["warmup_steps"] = max(1, steps // 10)
    run_recipe(cfg, path)
    summary_path = run_dir / "evaluate" / "summary.json"
    if method == "fair":
        summary_path = run_dir / "round1" / "evaluate" / "summary.json"
    summary = json.loads(summary_path.read_text())
    student = Path(summary["run"])
    result = {"method": method, "budget": budget, "seed": seed, "steps": steps, "fraction": 1.0,
              "test_accuracy": summary["test_accuracy"], "validation_accuracy": summary["validation_accuracy"],
              "checkpoint_step": summary["step"], "real_tokens": _real_tokens(student)}
    if method == "mentor-kd":
        result["real_tokens_mentor"] = _real_tokens(run_dir / "mentor")
    if method == "fair":
        result["real_tokens"] += _real_tokens(run_dir / "warmup")
    stream = RATIONALE_STREAM.get(method)
    if stream is not None and method not in ("mentor-kd", "fair"):
        result["test_accuracy_cot"] = score_stream(student, stream)
        if method in ("tinyllm-both",):
            result["test_accuracy_cot_terse"] = score_stream(student, "terse")
    result["wall_s"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(result) + "\n")
    print(time.strftime("%H:%M:%S"), json.dumps(result), flush=True)
    return result


def _real_tokens(run_path: Path) -> int:
    """Real (non-pad) tokens the run trained on: every step is logged (log_every 1)."""
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return int(sum(r["real_tokens"] for r in rows if "real_tokens" in r))


# --------------------------------------------------------------------------- report


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = {}
    for r in results:
        rows.setdefault((r["method"], r["budget"], r["fraction"]), []).append(r)
    out = []
    for (method, budget, fraction), rs in rows.items():
        row = {"method": method, "budget": budget, "fraction": fraction, "seeds": [r["seed"] for r in rs],
               "steps": [r["steps"] for r in rs], "wall_s": sum(r["wall_s"] for r in rs)}
        for key in ("test_accuracy", "test_accuracy_cot", "test_accuracy_cot_terse", "real_tokens"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                            "each": vals}
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "budget", "data", "steps", "test acc (answer)", "test acc (cot)", "real tokens")
    lines = [head]
    for r in rows:
        acc = r.get("test_accuracy")
        cot = r.get("test_accuracy_cot")
        lines.append((r["method"], r["budget"], f"{r['fraction']:.0%}", "/".join(map(str, sorted(set(r["steps"])))),
                      f"{acc['mean']:.3f} ± {acc['std']:.3f}" if acc else "-",
                      f"{cot['mean']:.3f} ± {cot['std']:.3f}" if cot else "-",
                      f"{r['real_tokens']['mean'] / 1e6:.2f}M" if "real_tokens" in r else "-"))
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(x, widths)).rstrip() for x in lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    main = [r for r in rows if r["fraction"] == 1.0]
    budgets = [b for b in ("compute", "passes") if any(r["budget"] == b for r in main)]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        rs = [r for r in main if r["budget"] == budget]
        names = [r["method"] for r in rs]
        best = [max(r.get("test_accuracy", {}).get("mean", 0), r.get("test_accuracy_cot", {}).get("mean", 0)) for r in rs]
        for i, r in enumerate(rs):
            chains_only = r["method"] in CHAIN_ANSWERS  # their one figure is read after the chain
            for key, dx, color, label in (("test_accuracy", -0.2, "C0", "answer stream"),
                                          ("test_accuracy_cot", 0.2, "C1", "through its rationale")):
                if chains_only:
                    dx, color, label = 0.0, "C1", "through its rationale"
                if key in r:
                    ax.bar(i + dx, r[key]["mean"], 0.38, yerr=r[key]["std"], color=color, capsize=3,
                           label=label if i == 0 or key not in rs[0] else None)
                    ax.scatter([i + dx] * len(r[key]["each"]), r[key]["each"], s=8, color="black", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, max(0.05, min(1.0, max(best) * 1.25)))
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{budget} budget")
        ax.grid(True, axis="y", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed of two methods, small data (a couple of minutes)")
    p.add_argument("--tiny", action="store_true", help="the quick path at toy size (the smoke test)")
    p.add_argument("--plan", action="store_true", help="print each run's steps and stop")
    p.add_argument("--methods", nargs="*", help="a subset of: " + ", ".join(METHODS))
    p.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "methods"), help="scratch directory")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/methods-...)")
    a = p.parse_args(argv)
    plan = TINY if a.tiny else QUICK if a.quick else PLAN
    methods = a.methods or (QUICK_METHODS if (a.quick or a.tiny) else METHODS)
    work = Path(a.work) / ("tiny" if a.tiny else "quick" if a.quick else "full")
    import os

    # one line a run, not the trainer's log; all restored at the end (a test may call main)
    saved_env = os.environ.get("TINYLLM_LOG_LEVEL")
    os.environ["TINYLLM_LOG_LEVEL"] = saved_env or "ERROR"
    quiet = {name: logging.getLogger(name).level for name in ("absl", "jax")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _main(a, plan, methods, work)
    finally:
        if saved_env is None:
            os.environ.pop("TINYLLM_LOG_LEVEL", None)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def _main(a: argparse.Namespace, plan: dict[str, Any], methods: list[str], work: Path) -> int:
    import os

    import jax

    from benchmarks.run import device_slug as device_name

    t0 = time.time()
    paths = prepare(work, plan)
    if a.plan:
        for m in methods:
            cfg = recipe(m, 0, plan["budgets"]["compute_steps"], paths, plan, work / "plan")
            if m in ("mentor-kd", "fair"):
                print(f"{m}: compute {plan['budgets']['compute_steps']} steps; passes known once its data is made")
            else:
                print(f"{m}: compute {plan['budgets']['compute_steps']} steps; passes "
                      f"{steps_for_epochs(cfg, paths['train'], plan['budgets']['passes_epochs'])} steps")
        return 0
    date = time.strftime("%Y-%m-%d")
    kind = "tiny" if a.tiny else "quick" if a.quick else "full"
    out = Path(a.out) if a.out else RESULTS / f"methods-{kind}-{device_name()}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(runs: list[dict[str, Any]], complete: bool) -> list[dict[str, Any]]:
        """The result so far (after every run: a stopped benchmark leaves what it measured)."""
        rows = aggregate(runs)
        doc = {"date": date, "device": device_name(), "jax": jax.__version__, "load_average": os.getloadavg(),
               "plan": plan, "methods": methods, "complete": complete, "wall_s": round(time.time() - t0, 1),
               "wall_s_runs": round(sum(r["wall_s"] for r in runs), 1),  # a resumed benchmark's total
               "rows": rows, "runs": runs}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        chart(rows, out.with_suffix(".png"), f"{plan['task']} ({date}, {device_name()})")
        return rows

    results = []
    for budget in ("compute", "passes"):
        for m in methods:
            if budget == "passes" and m not in PASSES_METHODS and not a.methods:
                continue  # named with --methods, they run at both budgets
            for seed in plan["seeds"]:
                results.append(one_run(m, budget, seed, paths, plan, work))
                write(results, complete=False)
    rows = aggregate(results)
    best = max((r for r in rows if r["budget"] == "compute" and r["method"] in SWEEP_CANDIDATES),
               key=lambda r: max(r.get("test_accuracy", {}).get("mean", 0), r.get("test_accuracy_cot", {}).get("mean", 0)),
               default=None)
    sweep = []
    for fraction in plan["fractions"]:
        part = subset(paths, fraction, work)
        for m in ["answer-only"] + ([best["method"]] if best else []):
            for seed in plan["seeds"]:
                r = one_run(m, "compute", seed, part, plan, work, tag=f"-f{fraction:g}")
                r["fraction"] = fraction
                sweep.append(r)
                write(results + sweep, complete=False)
    rows = write(results + sweep, complete=True)
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    import os
    import sys

    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("benchmarks.methods", sys.argv[1:])  # the trainer's speed, as `tinyllm` runs it
    # the runs compile the same decoders again and again: a persistent cache compiles each once
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "runs" / "benchmarks" / "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    raise SystemExit(main())
