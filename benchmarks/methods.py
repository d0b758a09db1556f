"""Does distillation help? Every method on one task, student and seeds, trained until the
validation curves flatten, selected on validation, tested once.

    python -m benchmarks.methods              # the full comparison (4.3 h of runs measured on 2 CPU cores)
    python -m benchmarks.methods --plan       # the design and each run's steps; trains nothing
    python -m benchmarks.methods --quick      # one seed of answer-only vs the scratchpad, small data

Writes benchmarks/results/methods-<kind>-<device>-<date>.json and .png, and prints the table.

The design, written down before any result of it was seen (and kept in the JSON as `plan`):

* Task: the embedded demo's word problems with FREE-FORM numeric answers: a start count and
  2-3 signed changes ("Tom has 9 apples, buys 5 more and loses 3. How many ..."); the answer
  (0-28) needs two or three additions or subtractions. Scored by `number` (exact value).
  Splits by ARITHMETIC SIGNATURE (the start and the signed changes): no test or validation
  problem shares its sum with a train problem, whatever its names and objects (the earlier
  split by question text put 195 of 500 test problems' sums in train). The JSON checks it
  (`data.test_signatures_in_train`) and gives the chance floor from the data (always
  answering train's most common answer).
* Tokenizer: one SentencePiece BPE of 256 pieces for every run, trained on every string any
  arm trains (inputs, answers, both teachers' rationales, Mentor-KD's "chain --> answer",
  FAIR's feedback and reviews), digits split, so a rationale's final number trains the same
  pieces the answer stream emits, and no target holds the unknown token.
* Student: the demo's T5 (d_model 128, 3+3 layers, 4 heads, ~2M parameters) from scratch;
  rows of 64 / 64 tokens (the inputs are ~28 tokens, the careful chains ~38), 16 a step;
  AdamW 2e-3, 10% warm-up, linear decay; dropout 0.
* Budget: 1200 steps for every student (equal compute: the same rows, the same steps),
  validation (200 problems) every 100 steps; the step with the best validation accuracy is
  the one tested (on 500 problems), once. Every run's validation curve is saved, so whether
  it had flattened can be read off the JSON (`curve`, `selected_step`). A pilot at the old
  budget stopped the scratchpad arm while its validation was still rising (0.26 at 400 steps,
  0.64 at 800): 1200 steps leaves every arm room to flatten.
* Arms (3 seeds each: init, data order; the data and teachers are fixed):
  - answer-only: `predict:` -> the answer.
  - scratchpad: the careful teacher's chains only (`explain:` -> "Tom starts with 9. ... So
    the answer is 11."); its answer is read from the chain it writes.
  - TinyLLM, both teachers: `predict:` answer, `explain:` careful, `rationale:` terse
    (weights 1/1/1, the reference's); validation selects on the answer stream (the paper's
    protocol); test is scored through the answer stream AND through each rationale stream.
  - Mentor-KD: a mentor twice the student's width trained on the careful teacher's correct
    chains in Mentor-KD's form ("chain --> answer") for 1500 steps, its best validation step
    kept (one teacher, as the paper's GPT-3.5; a first run that mixed the terse teacher's chains
    into the one stream gave a mentor of 0.205 validation, below the student it should teach);
    it samples 3 chains a train problem (T 0.7, top-k 50), the correct ones join the teacher's
    chains; the student learns them with 0.7 CE + 0.3 KL(mentor || student) at T 2. The
    mentor and its samples are made once (seed 0) and shared by the three student seeds, as
    the paper trains one mentor (so this arm's seeds vary the student's initialisation, not
    its data order, which the mentor's run shares); its training is reported, not charged.
  - FAIR: the student warms up for 800 steps on the teachers' rationales under `explain:`
    (the rounds' own format), then one round of 400 steps: its wrong answers on train are
    mined, both teachers give feedback and their own rationales, each reviews the other's,
    and the student trains on feedback + accepted rationales + a replay of every other train
    problem (fair.replay 1.0), its learning-rate schedule continuing the warm-up's.
  - FAIR control: the same warm-up (shared: it is the same run), then 400 steps on the replay
    alone, no mining, no committee. FAIR minus control is what the committee's data adds.
  Distilling step-by-step is not a separate arm: at alpha 0.5 it is TinyLLM with one teacher
  at weights 0.5/0.5, which Adam cannot tell from 1/1 (the earlier benchmark gave equal
  accuracy seed for seed).
* Data efficiency: answer-only and the rationale arm with the best mean VALIDATION accuracy
  among the one-run arms (scratchpad, TinyLLM), on 25% of the train problems (500, a stable
  hash of the id), same budget and seeds.
* Time: the sizes above were chosen for about 90 minutes on this 2-core CPU; the run of
  2026-12-05 took 15,335 s of runs (4.3 h, the machine shared with other jobs): training is
  compute-bound (0.2-0.3 s a step of 16 x 128 slots), and its ~30,000 steps (arms, sweep,
  mentor) alone outlast the aim. A rerun picks up where a stopped one left off.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PLAN = {
    "task": "demo word problems, free-form numeric answers, split by arithmetic signature",
    "data": {"n_train": 2000, "n_valid": 200, "n_test": 500, "seed": 0},
    "student": {"d_model": 128, "d_kv": 32, "d_ff": 512, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4},
    "mentor": {"d_model": 256, "d_ff": 1024, "num_heads": 8},
    "rows": {"batch_size": 16, "encoder_length": 64, "decoder_length": 64},
    "tokenizer_numbers": "whole",
    "steps": 1200,
    "mentor_steps": 1500,
    "fair": {"warmup_steps": 800, "replay": 1.0},
    "seeds": [0, 1, 2],
    "eval_every": 100,
    "fractions": [0.25],
}
QUICK = {**PLAN, "data": {"n_train": 400, "n_valid": 64, "n_test": 128, "seed": 0}, "steps": 300,
         "mentor_steps": 300, "fair": {"warmup_steps": 200, "replay": 1.0}, "seeds": [0], "eval_every": 100,
         "fractions": []}
TINY = {**QUICK, "data": {"n_train": 48, "n_valid": 16, "n_test": 16, "seed": 0},
        "student": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4},
        "mentor": {"d_model": 32, "d_ff": 64, "num_heads": 4},
        "steps": 6, "mentor_steps": 6, "fair": {"warmup_steps": 4, "replay": 1.0}, "eval_every": 3}

ARMS = ["answer-only", "scratchpad", "tinyllm-both", "mentor-kd", "fair", "fair-control"]
QUICK_ARMS = ["answer-only", "scratchpad"]
SWEEP_CANDIDATES = ["scratchpad", "tinyllm-both"]

ANSWER = {"name": "answer", "prefix": "predict: ", "weight": 1.0}
CAREFUL = {"name": "careful", "prefix": "explain: ", "weight": 1.0, "teacher": "careful"}
TERSE = {"name": "terse", "prefix": "rationale: ", "weight": 1.0, "teacher": "terse"}
CHAINS = {"name": "chains", "prefix": "solve: ", "weight": 0.7, "teacher": "chains", "target": "{rationale} --> {answer}"}
FAIR_STREAMS = [{"name": "feedback", "prefix": "feedback: ", "weight": 0.5, "teacher": "feedback"},
                {"name": "rationale", "prefix": "explain: ", "weight": 0.5, "teacher": "rationale"}]
STREAMS = {"answer-only": [ANSWER], "scratchpad": [CAREFUL], "tinyllm-both": [ANSWER, CAREFUL, TERSE],
           "mentor-kd": [CHAINS], "fair": FAIR_STREAMS, "fair-control": FAIR_STREAMS}
# the stream validation selects on (None: the answer stream), and the streams test is also scored through
SELECT_STREAM = {"scratchpad": "careful", "mentor-kd": "chains", "fair": "rationale", "fair-control": "rationale"}
ALSO_THROUGH = {"tinyllm-both": ["careful", "terse"]}
CHAIN_ANSWERS = ["scratchpad", "mentor-kd", "fair", "fair-control"]  # they answer through a chain
DEMO_TEACHERS = [{"name": "careful", "backend": "demo", "model": "careful"},
                 {"name": "terse", "backend": "demo", "model": "terse"}]


# --------------------------------------------------------------------------- data, configs


def prepare(work: Path, plan: dict[str, Any]) -> dict[str, Path]:
    """The records (with both teachers' rationales) and the shared tokenizer, made once."""
    from tinyllm_jax.config import StreamConfig
    from tinyllm_jax.data.demo import DEMO_PHRASES, write_demo_data
    from tinyllm_jax.data.records import read_jsonl
    from tinyllm_jax.data.streams import tokenizer_corpus
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    data = work / "data"
    paths = {k: Path(v) for k, v in write_demo_data(data, choices=False, **plan["data"]).items()}
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        streams = [StreamConfig(**s) for s in (ANSWER, CAREFUL, TERSE, {**CHAINS, "teacher": "careful"},
                                               {**CHAINS, "name": "c2", "teacher": "terse"}, *FAIR_STREAMS)]
        texts = tokenizer_corpus(read_jsonl(paths["train"])[0], streams, extra=list(DEMO_PHRASES))
        train_sentencepiece(texts, tok, vocab_size=256, model_type="bpe", numbers=plan.get("tokenizer_numbers", "whole"))
    paths["tokenizer"] = tok
    return paths


def data_facts(paths: dict[str, Path]) -> dict[str, Any]:
    """What the data is: sizes, the chance floor (train's most common answer, on test) and
    how many test problems share an arithmetic signature with a train problem (0 by design)."""
    from tinyllm_jax.data.records import read_jsonl

    train, test = read_jsonl(paths["train"])[0], read_jsonl(paths["test"])[0]
    common_answer, _ = collections.Counter(r["answer"] for r in train).most_common(1)[0]
    seen = {r["meta"]["signature"] for r in train}
    return {"n_train": len(train), "n_validation": len(read_jsonl(paths["validation"])[0]), "n_test": len(test),
            "chance_floor": sum(r["answer"] == common_answer for r in test) / len(test),
            "most_common_train_answer": common_answer,
            "test_signatures_in_train": sum(r["meta"]["signature"] in seen for r in test)}


def subset(paths: dict[str, Path], fraction: float, work: Path) -> dict[str, Path]:
    """The train problems whose id hashes below `fraction` (stable across seeds and runs)."""
    from tinyllm_jax.data.records import read_jsonl, write_jsonl

    keep = [r for r in read_jsonl(paths["train"])[0]
            if int(hashlib.sha256(r["id"].encode()).hexdigest()[:8], 16) / 16**8 < fraction]
    out = work / f"data-{fraction:g}" / "train.jsonl"
    write_jsonl(out, keep)
    return {**paths, "train": out}


def recipe(arm: str, seed: int, paths: dict[str, Path], plan: dict[str, Any], run_dir: Path) -> dict:
    """The recipe config of one run (every arm shares the model, rows, optimiser, eval)."""
    arch = {**plan["student"], "vocab_size": 256, "relative_attention_num_buckets": 16,
            "relative_attention_max_distance": 64, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
            "tokenizer": str(paths["tokenizer"])}
    rows, steps = plan["rows"], plan["steps"]
    chain = arm in CHAIN_ANSWERS
    cfg = {
        "run_dir": str(run_dir),
        "method": {"mentor-kd": "mentor_kd", "fair": "fair", "fair-control": "fair"}.get(arm, "tinyllm"),
        "source": {"train": [str(paths["train"])], "validation": [str(paths["validation"])],
                   "test": [str(paths["test"])]},
        "rationales": {"teachers": DEMO_TEACHERS if arm.startswith("fair") else [], "progress": False},
        "export": {"enabled": False},
        "model": arch,
        "data": {"streams": STREAMS[arm], "max_input_length": 96, "max_target_length": 96,
                 "encoder_length": rows["encoder_length"], "decoder_length": rows["decoder_length"],
                 # Mentor-KD's mentor learns from the student's data settings: fixed, so one mentor serves all
                 "shuffle_seed": 0 if arm == "mentor-kd" else seed},
        "train": {"steps": steps, "batch_size": rows["batch_size"], "seed": seed, "log_every": 1, "progress": False},
        "optim": {"name": "adamw", "learning_rate": 2e-3, "warmup_steps": max(1, steps // 10), "schedule": "linear",
                  "clip_norm": 1.0},
        "eval": {"every_steps": plan["eval_every"], "task": "number", "max_new_tokens": 64 if chain else 8,
                 "batch_size": 100, "stream": SELECT_STREAM.get(arm)},
        "checkpoint": {"every_steps": plan["eval_every"], "keep": 1},
    }
    if arm == "mentor-kd":  # the mentor's seeds are fixed: one mentor for every student seed
        m = plan["mentor"]
        cfg["mentor"] = {"model": {**arch, **m},
                         "train": {**cfg["train"], "steps": plan["mentor_steps"], "seed": 0},
                         "optim": {**cfg["optim"], "warmup_steps": max(1, plan["mentor_steps"] // 10)},
                         "samples": 3, "temperature": 0.7, "max_new_tokens": 64,
                         "teachers": ["careful"], "seed": 0}
        cfg["distill"] = {"weight": 0.3, "temperature": 2.0}
    if arm.startswith("fair"):
        warm = plan["fair"]["warmup_steps"]
        cfg["fair"] = {"rounds": 1, "warmup_steps": warm, "replay": plan["fair"]["replay"], "seed": 0,
                       "continue_schedule": True, "control": arm == "fair-control"}
        cfg["train"]["steps"] = steps - warm
        cfg["optim"]["warmup_steps"] = max(1, steps // 10)  # of the one schedule over warm-up and round
    return cfg


# --------------------------------------------------------------------------- runs


def run_recipe(cfg_dict: dict, path: Path, until: str | None = None) -> list[str]:
    """Runs (or resumes) a recipe; returns the names of the stages it ran (not skipped)."""
    import yaml

    from tinyllm_jax.recipes import method_stages
    from tinyllm_jax.recipes.config import load_recipe
    from tinyllm_jax.recipes.stages import run_stages

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_recipe(str(path))
    stages = method_stages(cfg)
    if until is not None:
        stages = stages[: [s.name for s in stages].index(until) + 1]
    said: list[str] = []
    run_stages(stages, Path(cfg.run_dir), echo=said.append)
    return said


def share_stages(src: Path, dst: Path, names: list[str]) -> None:
    """Copies finished stages of one run into another whose settings for them are the same
    (the recipe then finds them done: their fingerprints match)."""
    for name in names:
        if (src / name).is_dir() and not (dst / name).exists():
            shutil.copytree(src / name, dst / name)


def score_stream(run_path: Path, stream: str, max_new_tokens: int = 64) -> float:
    """Test accuracy of a trained run decoding `stream` (its final answer scored)."""
    import dataclasses

    import jax

    from tinyllm_jax.config import load_config
    from tinyllm_jax.eval.evaluate import Evaluation
    from tinyllm_jax.runs import load_run

    cfg = load_config(run_path / "config.yaml")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, stream=stream, max_new_tokens=max_new_tokens),
                              train=dataclasses.replace(cfg.train, progress=False))
    model = load_run(run_path)
    return Evaluation(cfg, model.arch, model.tokenizer).run(jax.device_put(model.params), "test")["accuracy"]


def curve(run_path: Path) -> list[list[float]]:
    """[[step, validation accuracy], ...] of a training run."""
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r["eval_accuracy"]] for r in rows if "eval_accuracy" in r]


def _real_tokens(run_path: Path) -> int:
    """Real (non-pad) tokens the run trained on: every step is logged (log_every 1)."""
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return int(sum(r["real_tokens"] for r in rows if "real_tokens" in r))


def mentor_result(run_dir: Path) -> dict[str, Any]:
    """The shared mentor: its validation curve, selected step, and test accuracy of its chains."""
    from tinyllm_jax.recipes.common import evaluate_run

    mentor = run_dir / "mentor"
    done = run_dir / "mentor-result.json"
    if done.is_file():
        return json.loads(done.read_text())
    summary = evaluate_run(mentor, run_dir / "mentor-evaluate")
    augment = json.loads((run_dir / "augment" / "stage.json").read_text()).get("result") or {}
    result = {"selected_step": summary["step"], "validation_accuracy": summary["validation_accuracy"],
              "test_accuracy": summary.get("test_accuracy"), "curve": curve(mentor),
              "real_tokens": _real_tokens(mentor), "augment": augment}
    done.write_text(json.dumps(result) + "\n")
    return result


def plan_digest(plan: dict[str, Any]) -> str:
    """The design a run was made under (the seeds aside: a run is one seed of it)."""
    return hashlib.sha256(json.dumps({k: v for k, v in plan.items() if k != "seeds"}, sort_keys=True).encode()).hexdigest()[:12]


def one_run(arm: str, seed: int, paths: dict[str, Path], plan: dict[str, Any], work: Path,
            tag: str = "") -> dict[str, Any]:
    run_dir = work / "runs" / f"{arm}{tag}-s{seed}"
    done = run_dir / "benchmark-result.json"
    digest = plan_digest(plan)
    if done.is_file():  # a rerun of the benchmark picks up where it was stopped (the same design only)
        result = json.loads(done.read_text())
        if result.get("plan_digest") == digest:
            print(time.strftime("%H:%M:%S"), "done before:",
                  json.dumps({k: result[k] for k in ("arm", "seed", "test_accuracy")}), flush=True)
            return result
        shutil.rmtree(run_dir)  # made under another design
    t0 = time.time()
    cfg = recipe(arm, seed, paths, plan, run_dir)
    config_path = work / "configs" / f"{run_dir.name}.yaml"
    extra: dict[str, Any] = {}
    shared: list[str] = []
    if arm == "mentor-kd":  # one mentor (seed 0) for every student seed
        mentor_dir = work / "runs" / f"mentor-kd{tag}-mentor-{digest}"
        mcfg = recipe(arm, 0, paths, plan, mentor_dir)
        run_recipe(mcfg, work / "configs" / f"{mentor_dir.name}.yaml", until="augment")
        shared = ["data", "chains", "mentor", "augment"]
        share_stages(mentor_dir, run_dir, shared)
        extra["mentor"] = mentor_result(mentor_dir)
    if arm == "fair-control":  # the same warm-up as FAIR's run of this seed: shared, not retrained
        one_run("fair", seed, paths, plan, work, tag)
        shared = ["data", "warmup"]
        share_stages(work / "runs" / f"fair{tag}-s{seed}", run_dir, shared)
    said = run_recipe(cfg, config_path)
    redone = [n for n in shared if any(line.startswith(f"stage {n}:") and "done" not in line for line in said)]
    if redone:
        raise RuntimeError(f"{run_dir}: shared stages {redone} ran again: their settings differ between the runs")
    summary_path = run_dir / ("round1/evaluate" if arm.startswith("fair") else "evaluate") / "summary.json"
    summary = json.loads(summary_path.read_text())
    student = Path(summary["run"])
    result = {"arm": arm, "seed": seed, "fraction": 1.0, "steps": plan["steps"],
              "test_accuracy": summary["test_accuracy"], "validation_accuracy": summary["validation_accuracy"],
              "selected_step": summary["step"], "curve": curve(student), "real_tokens": _real_tokens(student), **extra}
    if arm.startswith("fair"):
        warm = run_dir / "warmup"
        rnd = json.loads((run_dir / "round1" / "train" / "stage.json").read_text()).get("result") or {}
        mine = (json.loads((run_dir / "round1" / "mine" / "stage.json").read_text()).get("result") or {}
                if (run_dir / "round1" / "mine").is_dir() else {})
        result.update({"warmup_curve": curve(warm), "warmup_validation_accuracy": max((a for _, a in curve(warm)), default=None),
                       "round_curve": result["curve"], "curve": curve(warm) + [[s + plan["fair"]["warmup_steps"], a]
                                                                               for s, a in result["curve"]],
                       "mistakes": mine.get("mistakes"), "train_accuracy_at_mining": mine.get("train_accuracy"),
                       "round_records": rnd, "real_tokens": result["real_tokens"] + _real_tokens(warm)})
    for stream in ALSO_THROUGH.get(arm, []):
        result[f"test_accuracy_through_{stream}"] = score_stream(student, stream)
    result["wall_s"] = round(time.time() - t0, 1)
    result["plan_digest"] = digest
    done.write_text(json.dumps(result) + "\n")
    print(time.strftime("%H:%M:%S"), json.dumps({k: v for k, v in result.items() if "curve" not in k and k != "mentor"}),
          flush=True)
    return result


# --------------------------------------------------------------------------- report

FIGURES = ("test_accuracy", "validation_accuracy", "test_accuracy_through_careful", "test_accuracy_through_terse",
           "warmup_validation_accuracy", "selected_step", "mistakes", "real_tokens")


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[tuple, list] = {}
    for r in results:
        rows.setdefault((r["arm"], r["fraction"]), []).append(r)
    out = []
    for (arm, fraction), rs in rows.items():
        row = {"arm": arm, "fraction": fraction, "steps": rs[0]["steps"], "seeds": [r["seed"] for r in rs],
               "wall_s": sum(r["wall_s"] for r in rs)}
        for key in FIGURES:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                            "each": vals}
        out.append(row)
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "-"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("arm", "data", "steps", "val acc (selected)", "test acc", "test via careful", "test via terse",
            "selected step")
    lines = [head]
    for r in rows:
        step = r.get("selected_step")
        lines.append((r["arm"], f"{r['fraction']:.0%}", r["steps"], _cell(r, "validation_accuracy"),
                      _cell(r, "test_accuracy"), _cell(r, "test_accuracy_through_careful"),
                      _cell(r, "test_accuracy_through_terse"),
                      "/".join(str(int(s)) for s in step["each"]) if step else "-"))
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(x, widths)).rstrip() for x in lines)


def chart(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, title: str, floor: float) -> None:
    """Left: test accuracy by arm (each seed a dot); right: the validation curves."""
    from matplotlib.figure import Figure

    main = [r for r in rows if r["fraction"] == 1.0]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    bars, curves = fig.subplots(1, 2)
    for i, r in enumerate(main):
        keys = [("test_accuracy", "C1" if r["arm"] in CHAIN_ANSWERS else "C0")]
        keys += [(f"test_accuracy_through_{s}", "C2") for s in ALSO_THROUGH.get(r["arm"], [])]
        width = 0.8 / len(keys)
        for j, (key, color) in enumerate(keys):
            if key in r:
                x = i - 0.4 + width * (j + 0.5)
                bars.bar(x, r[key]["mean"], width * 0.95, yerr=r[key]["std"], color=color, capsize=3)
                bars.scatter([x] * len(r[key]["each"]), r[key]["each"], s=8, color="black", zorder=3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bars.axhline(floor, color="grey", linestyle=":")
    bars.legend(handles=[Line2D([], [], color="grey", linestyle=":", label=f"chance floor {floor:.3f}"),
                         Patch(color="C0", label="answer stream"), Patch(color="C1", label="answer read from its chain"),
                         Patch(color="C2", label="TinyLLM through a rationale stream")], fontsize="small")
    bars.set_xticks(range(len(main)), [r["arm"] for r in main], rotation=25, ha="right")
    bars.set_ylabel("test accuracy (validation-selected step)")
    bars.set_ylim(0, 1)
    bars.grid(True, axis="y", alpha=0.3)
    colors = {arm: f"C{k}" for k, arm in enumerate(ARMS)}
    for run in runs:
        if run["fraction"] == 1.0 and run.get("curve"):
            steps, accs = zip(*run["curve"])
            curves.plot(steps, accs, color=colors.get(run["arm"], "grey"), alpha=0.7,
                        label=run["arm"] if run["seed"] == run_seeds(runs, run["arm"])[0] else None)
    curves.set_xlabel("step (FAIR: warm-up, then its round)")
    curves.set_ylabel("validation accuracy")
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def run_seeds(runs: list[dict[str, Any]], arm: str) -> list[int]:
    return sorted(r["seed"] for r in runs if r["arm"] == arm and r["fraction"] == 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed of answer-only and the scratchpad, small data")
    p.add_argument("--tiny", action="store_true", help="every arm's code path at toy size (the smoke test)")
    p.add_argument("--plan", action="store_true", help="print the design's sizes and stop")
    p.add_argument("--arms", nargs="*", help="a subset of: " + ", ".join(ARMS))
    p.add_argument("--seeds", nargs="*", type=int, help="a subset of the design's seeds (a pilot)")
    p.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "methods"), help="scratch directory")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/methods-...)")
    p.add_argument("--skip-sweep", action="store_true",
                   help="the arms only, not the data-efficiency sweep (the JSON says the sweep was skipped)")
    a = p.parse_args(argv)
    plan = TINY if a.tiny else QUICK if a.quick else PLAN
    if a.seeds:
        plan = {**plan, "seeds": a.seeds}
    arms = a.arms or (ARMS if a.tiny else QUICK_ARMS if a.quick else ARMS)
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    work = Path(a.work) / ("tiny" if a.tiny else "quick" if a.quick else "full")
    import os

    # one line a run, not the trainer's log; all restored at the end (a test may call main)
    saved_env = os.environ.get("TINYLLM_LOG_LEVEL")
    os.environ["TINYLLM_LOG_LEVEL"] = saved_env or "ERROR"
    quiet = {name: logging.getLogger(name).level for name in ("absl", "jax")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _main(a, plan, arms, work)
    finally:
        if saved_env is None:
            os.environ.pop("TINYLLM_LOG_LEVEL", None)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def _main(a: argparse.Namespace, plan: dict[str, Any], arms: list[str], work: Path) -> int:
    import os

    import jax

    from benchmarks.run import device_slug as device_name

    t0 = time.time()
    paths = prepare(work, plan)
    facts = data_facts(paths)
    if a.plan:
        print(json.dumps({"plan": plan, "arms": arms, "data": facts}, indent=1))
        return 0
    date = time.strftime("%Y-%m-%d")
    kind = "tiny" if a.tiny else "quick" if a.quick else "full"
    out = Path(a.out) if a.out else RESULTS / f"methods-{kind}-{device_name()}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(runs: list[dict[str, Any]], complete: bool, sweep_arm: str | None = None) -> list[dict[str, Any]]:
        """The result so far (after every run: a stopped benchmark leaves what it measured)."""
        rows = aggregate(runs)
        mentors = {json.dumps(r["mentor"], sort_keys=True): r["mentor"] for r in runs if "mentor" in r}
        doc = {"date": date, "device": device_name(), "jax": jax.__version__, "load_average": os.getloadavg(),
               "plan": plan, "arms": arms, "data": facts, "complete": complete, "wall_s": round(time.time() - t0, 1),
               "wall_s_runs": round(sum(r["wall_s"] for r in runs), 1),  # a resumed benchmark's total
               "mentor": list(mentors.values())[0] if mentors else None, "sweep_arm": sweep_arm,
               "sweep_skipped": bool(a.skip_sweep and plan["fractions"]),
               "rows": rows, "runs": runs}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        chart(rows, runs, out.with_suffix(".png"), f"{plan['task']} ({date}, {device_name()})", facts["chance_floor"])
        return rows

    results = []
    for arm in arms:
        for seed in plan["seeds"]:
            results.append(one_run(arm, seed, paths, plan, work))
            write(results, complete=False)
    rows = aggregate(results)
    candidates = [r for r in rows if r["arm"] in SWEEP_CANDIDATES and "validation_accuracy" in r]
    best = max(candidates, key=lambda r: r["validation_accuracy"]["mean"], default=None)  # chosen on validation
    sweep_arm = best["arm"] if best else None
    sweep = []
    for fraction in ([] if a.skip_sweep else plan["fractions"]):
        part = subset(paths, fraction, work)
        for arm in ["answer-only"] + ([sweep_arm] if sweep_arm else []):
            for seed in plan["seeds"]:
                r = one_run(arm, seed, part, plan, work, tag=f"-f{fraction:g}")
                r["fraction"] = fraction
                sweep.append(r)
                write(results + sweep, complete=False, sweep_arm=sweep_arm)
    rows = write(results + sweep, complete=True, sweep_arm=sweep_arm)
    print(table(rows))
    print(f"chance floor {facts['chance_floor']:.3f}; test problems sharing a train signature: "
          f"{facts['test_signatures_in_train']}")
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
