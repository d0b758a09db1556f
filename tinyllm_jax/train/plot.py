"""`tinyllm plot`: one PNG of a run's training curves, from RUN_DIR/metrics.jsonl.

Top panel: the total loss and the loss of each stream (`loss/<stream>`), with evaluation
losses (`eval_*loss*`) as markers; long curves are drawn faint with a centred moving
mean on top. Bottom panel, when the run has evaluated: the
`eval_*accuracy*` metrics over steps. A recipe's run folder has no metrics of its own:
each of its training stages (every folder below it with a metrics.jsonl) gets a row, loss
on the left and accuracy on the right, under FAIR's accuracy over rounds when there is a
rounds.json. Drawn on a bare matplotlib Figure (Agg canvas), so nothing here touches
pyplot's global backend or needs a display.
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
    steps into a PNG; for a recipe's run folder, every training stage under it (and FAIR's
    accuracy over rounds, RUN_DIR/rounds.json). Returns the PNG's path (default RUN_DIR/plot.png)."""
    folder = Path(run_dir)
    metrics = folder / METRICS_FILE
    title = folder.resolve().name
    if metrics.is_file():
        fig = make_figure(read_metrics(metrics), title=title, where=str(metrics))
    else:
        stages = training_stages(folder)
        rounds = folder / ROUNDS_FILE
        rounds_rows = json.loads(rounds.read_text(encoding="utf-8"))["rounds"] if rounds.is_file() else None
        if not stages and rounds_rows is None:
            raise UserError(f"{metrics}: metrics file not found, and no training stage below {folder} has one "
                            "(expected a training run directory or a recipe's run folder)")
        fig = make_recipe_figure(stages, rounds_rows, title=title)
    path = Path(out) if out else folder / "plot.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def training_stages(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """A recipe's training runs below `folder` (outputs kept aside under previous/ left out),
    named by their path and in the order they trained (by their first logged time)."""
    runs = {}
    for path in folder.rglob(METRICS_FILE):
        name = str(path.parent.relative_to(folder))
        if name.split("/")[0] == "previous":
            continue
        runs[name] = read_metrics(path)
    started = {name: min((r.get("time", float("inf")) for r in rows), default=float("inf")) for name, rows in runs.items()}
    return {name: runs[name] for name in sorted(runs, key=lambda n: (started[n], n))}


def _draw_losses(ax, rows: list[dict[str, Any]], keys: list[str], title: str) -> None:
    colors = [f"C{i}" for i in range(10)]
    stream_keys = [k for k in keys if k.startswith("loss/")]
    eval_loss_keys = [k for k in keys if k.startswith("eval_") and "loss" in k]
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
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper right")


def _draw_accuracy(ax, rows: list[dict[str, Any]], acc_keys: list[str], title: str = "evaluation") -> None:
    colors = [f"C{i}" for i in range(10)]
    for i, key in enumerate(acc_keys):
        steps, values = _series(rows, key)
        if not values:
            continue
        ax.plot(steps, values, marker="o", markersize=4, color=colors[i % 10], label=key.replace("_", " "))
        ax.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                    xytext=(-6, 8), ha="right", fontsize="small", color=colors[i % 10])
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower right")


def _plotted_keys(rows: list[dict[str, Any]], where: str) -> tuple[list[str], list[str]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    acc_keys = [k for k in keys if k.startswith("eval_") and "accuracy" in k]
    if "loss" not in keys and not any(k.startswith("loss/") for k in keys) and not acc_keys:
        raise UserError(f"{where}: no 'loss', 'loss/<stream>' or 'eval_*accuracy' values to plot")
    return keys, acc_keys


def make_figure(rows: list[dict[str, Any]], title: str = "", where: str = "metrics"):
    """A matplotlib Figure: a loss panel, and an accuracy panel when any row has one."""
    from matplotlib.figure import Figure

    keys, acc_keys = _plotted_keys(rows, where)
    fig = Figure(figsize=(9, 7.5 if acc_keys else 4.5), layout="constrained")
    axes = fig.subplots(2 if acc_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    _draw_losses(axes[0], rows, keys, f"{title}: training loss per stream" if title else "training loss per stream")
    if acc_keys:
        _draw_accuracy(axes[1], rows, acc_keys)
    axes[-1].set_xlabel("step")
    return fig


def make_recipe_figure(stages: dict[str, list[dict[str, Any]]], rounds: list[dict[str, Any]] | None = None,
                       title: str = ""):
    """A recipe's training stages, a row each (loss left, validation accuracy right), under
    FAIR's accuracy over rounds when `rounds` is given."""
    from matplotlib.figure import Figure

    top = 1 if rounds is not None else 0
    fig = Figure(figsize=(12, 3.6 * (len(stages) + top)), layout="constrained")
    grid = fig.add_gridspec(len(stages) + top, 2)
    if rounds is not None:
        _draw_rounds(fig.add_subplot(grid[0, :]), rounds, f"{title}: accuracy over rounds" if title else "")
    for i, (name, rows) in enumerate(stages.items(), start=top):
        keys, acc_keys = _plotted_keys(rows, name)
        loss_ax = fig.add_subplot(grid[i, 0])
        _draw_losses(loss_ax, rows, keys, f"{name}: training loss")
        loss_ax.set_xlabel("step")
        acc_ax = fig.add_subplot(grid[i, 1], sharex=loss_ax)
        _draw_accuracy(acc_ax, rows, acc_keys, f"{name}: evaluation")
        acc_ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def make_rounds_figure(rounds: list[dict[str, Any]], title: str = ""):
    """Accuracy per round: train (1 - mistakes mined / questions), validation and test,
    from round 0 (the warm-up student or the initial model) on."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    _draw_rounds(fig.subplots(), rounds, f"{title}: accuracy over rounds" if title else "accuracy over rounds")
    return fig


def _draw_rounds(ax, rounds: list[dict[str, Any]], title: str) -> None:
    if not rounds:
        raise UserError("rounds.json: no rounds to plot")
    for key, label, color in (("train_accuracy", "train (mined)", "C0"), ("validation_accuracy", "validation", "C1"),
                              ("test_accuracy", "test", "C2")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
            ax.annotate(f"{pts[-1][1]:.3f}", pts[-1], textcoords="offset points", xytext=(-6, 8), ha="right",
                        fontsize="small", color=color)
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xlabel("round (0: the warm-up student or the initial model; train accuracy: the student mined in that round)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower right")
    ax.set_title(title)
