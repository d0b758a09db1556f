"""The embedded demos as a new user runs them: each demo config from a fresh clone, several
seeds, wall time and accuracies. The figures the configs' headers and the README quote come
from here (issue 23, item 5: ranges over seeds, from a fresh copy, with the date).

    python -m benchmarks.demos                        # every demo, seeds 0 1 2 (about an hour here)
    python -m benchmarks.demos --configs configs/recipes/demo_fair.yaml --seeds 0 1

Each run is `tinyllm train` (a training config) or `tinyllm recipe` (a recipe) in a clean
`git clone` of this checkout's HEAD, one run at a time, with `train.seed` set (a recipe's
mentor and FAIR's rounds draw from their own fixed seeds; the student's initialisation and
data order move). Writes benchmarks/results/demos-<device>-<date>.json and prints a table:
per config, wall time, validation and test accuracy, each as min-max over the seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ["configs/demo.yaml", "configs/demo_decoder.yaml", "configs/recipes/demo_tinyllm.yaml",
           "configs/recipes/demo_step_by_step.yaml", "configs/recipes/demo_mentor_kd.yaml",
           "configs/recipes/demo_fair.yaml"]


def run_one(clone: Path, config: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """One demo run in `clone`; its wall time and the accuracies of its summary."""
    command = "recipe" if "/recipes/" in config else "train"
    args = [sys.executable, "-m", "tinyllm_jax.cli", command, config, f"run_dir={run_dir}", f"train.seed={seed}"]
    if command == "train":
        args.append("train.progress=false")
    t0 = time.time()
    done = subprocess.run(args, cwd=clone, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode:
        raise RuntimeError(f"{config} seed {seed} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    test = summary.get("test_accuracy", (summary.get("test") or {}).get("test_accuracy"))  # a recipe's, a train run's
    out = {"config": config, "seed": seed, "wall_s": round(wall, 1),
           "validation_accuracy": summary.get("validation_accuracy", summary.get("best_eval_accuracy")),
           "test_accuracy": test}
    rounds = run_dir / "rounds.json"
    if rounds.is_file():  # FAIR: every round, 0 the warm-up
        out["rounds"] = [{k: r.get(k) for k in ("round", "mistakes", "validation_accuracy", "test_accuracy")}
                         for r in json.loads(rounds.read_text())["rounds"]]
    return out


def span(values: list[float | None], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    lo, hi = min(v), max(v)
    return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}-{hi:.{digits}f}"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'config':42} {'seeds':>5} {'wall s':>11} {'validation':>12} {'test':>12}"]
    for config in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == config]
        lines.append(f"{config:42} {len(rs):>5} {span([r['wall_s'] for r in rs], 0):>11} "
                     f"{span([r['validation_accuracy'] for r in rs]):>12} {span([r['test_accuracy'] for r in rs]):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import device_slug

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=CONFIGS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/demos-<device>-<date>.json)")
    a = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = Path(a.out or RESULTS / f"demos-{device_slug()}-{date}.json")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs = []
    if out.is_file():  # a rerun of some configs keeps the others' runs of the same commit
        before = json.loads(out.read_text())
        if before.get("commit") == commit:
            runs = [r for r in before["runs"] if r["config"] not in a.configs]
    with tempfile.TemporaryDirectory(prefix="tinyllm-demos-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for config in a.configs:
            for seed in a.seeds:
                r = run_one(clone, config, seed, Path(tmp) / "runs" / f"{Path(config).stem}-s{seed}")
                print(json.dumps(r), flush=True)
                runs.append(r)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"benchmark": "demos", "date": date, "commit": commit,
                                           "device": device_slug(), "runs": runs}, indent=1) + "\n")
    print(table(runs))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
