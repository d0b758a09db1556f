"""`tinyllm plot`: one PNG of a run's training curves, from RUN_DIR/metrics.jsonl.

Top panel: the total loss and the loss of each stream (`loss/<stream>`), with evaluation
losses (`eval_*loss*`) as markers; long curves are drawn faint with a centred moving
mean on top. Bottom panel, when the run has evaluated: the
`eval_*accuracy*` metrics over steps. Drawn on a bare matplotlib Figure (Agg canvas), so
nothing here touches pyplot's global backend or needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyllm_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
ROUNDS_FILE = "rounds.json"  # a FAIR recipe's report per round
SMOOTH_FROM = 20  # with this many points or more, a smoothed line is drawn over the raw one


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file. A cut-off last line (a run still writing) is
    skipped; any other unreadable line raises UserError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: metrics file not found (a training run writes it in its run directory)")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise UserError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UserError(f"{path}:{lineno}: expected a JSON object with a numeric 'step', found {line[:60]!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: empty metrics file: no rows yet")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(values: list[float]) -> list[float]:
    """Centred moving mean over about a twentieth of the curve: no lag, unlike an EMA."""
    import numpy as np

    half = max(1, len(values) // 40)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return list((cumsum[hi] - cumsum[lo]) / (hi - lo))


def _draw_curve(ax, steps, values, label, color, width=1.3):
    if not values:
        return
    if len(values) >= SMOOTH_FROM:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=color, linewidth=width, label=label)
    else:
        ax.plot(steps, values, color=color, linewidth=width, label=label, marker="." if len(values) < 3 else None)


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draws RUN_DIR/metrics.jsonl's losses (total and per stream) and eval accuracy over
    steps into a PNG; for a FAIR recipe's directory (RUN_DIR/rounds.json), the accuracy over
    rounds. Returns the PNG's path (default RUN_DIR/plot.png)."""
    rounds = Path(run_dir) / ROUNDS_FILE
    metrics = Path(run_dir) / METRICS_FILE
    if rounds.is_file() and not metrics.is_file():
        fig = make_rounds_figure(json.loads(rounds.read_text(encoding="utf-8"))["rounds"],
                                 title=Path(run_dir).resolve().name)
    else:
        fig = make_figure(read_metrics(metrics), title=Path(run_dir).resolve().name, where=str(metrics))
    path = Path(out) if out else Path(run_dir) / "plot.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def make_figure(rows: list[dict[str, Any]], title: str = "", where: str = "metrics"):
    """A matplotlib Figure: a loss panel, and an accuracy panel when any row has one."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(k for r in rows for k in r))
    stream_keys = [k for k in keys if k.startswith("loss/")]
    eval_loss_keys = [k for k in keys if k.startswith("eval_") and "loss" in k]
    acc_keys = [k for k in keys if k.startswith("eval_") and "accuracy" in k]
    if "loss" not in keys and not stream_keys and not acc_keys:
        raise UserError(f"{where}: no 'loss', 'loss/<stream>' or 'eval_*accuracy' values to plot")

    fig = Figure(figsize=(9, 7.5 if acc_keys else 4.5), layout="constrained")
    axes = fig.subplots(2 if acc_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(10)]

    ax = axes[0]
    if "loss" in keys:
        _draw_curve(ax, *_series(rows, "loss"), "total (weighted)", "black", width=2.0)
    for i, key in enumerate(stream_keys):
        _draw_curve(ax, *_series(rows, key), key.removeprefix("loss/"), colors[i % 10])
    for i, key in enumerate(eval_loss_keys):
        ax.plot(*_series(rows, key), linestyle="--", marker="o", markersize=4,
                color=colors[(len(stream_keys) + i) % 10], label=key.replace("_", " "))
    ax.set_ylabel("loss")
    if all(v > 0 for k in ["loss", *stream_keys] for v in _series(rows, k)[1]):
        ax.set_yscale("log")
    ax.set_title(f"{title}: training loss per stream" if title else "training loss per stream")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")

    if acc_keys:
        ax = axes[1]
        for i, key in enumerate(acc_keys):
            steps, values = _series(rows, key)
            if not values:
                continue
            ax.plot(steps, values, marker="o", markersize=4, color=colors[i % 10], label=key.replace("_", " "))
            ax.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                        xytext=(-6, 8), ha="right", fontsize="small", color=colors[i % 10])
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("evaluation")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    axes[-1].set_xlabel("step")
    return fig


def make_rounds_figure(rounds: list[dict[str, Any]], title: str = ""):
    """Accuracy per round (train: 1 - mistakes mined / questions; validation; test) and the
    mistakes mined each round."""
    from matplotlib.figure import Figure

    if not rounds:
        raise UserError("rounds.json: no rounds to plot")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    x = [r["round"] for r in rounds]
    for key, label, color in (("train_accuracy", "train (mined)", "C0"), ("validation_accuracy", "validation", "C1"),
                              ("test_accuracy", "test", "C2")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
    ax.set_xticks(x)
    ax.set_xlabel("round (train accuracy: the student that was mined in that round)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(f"{title}: accuracy over rounds" if title else "accuracy over rounds")
    return fig
