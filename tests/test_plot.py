"""tinyllm plot: a PNG of per-stream losses and eval accuracy from metrics.jsonl."""

import json
import math

import pytest

from tinyllm_jax.cli import main
from tinyllm_jax.errors import UserError
from tinyllm_jax.train.plot import make_figure, plot_run, read_metrics


def _write_run(run_dir, steps=60, eval_every=20, partial_last_line=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        answer = 3.0 * math.exp(-step / 30) + 0.1
        flan = 4.0 * math.exp(-step / 40) + 0.3
        lines.append({"step": step, "time": step * 0.5, "loss": answer + 0.5 * flan,
                      "loss/answer": answer, "loss/flan-t5": flan, "lr": 1e-3, "grad_norm": 1.0,
                      "real_tokens": 900, "tokens_per_s": 1800.0})
        if step % eval_every == 0:
            lines.append({"step": step, "eval_accuracy": step / (steps + 10), "eval_loss": answer})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_last_line:
        text += '{"step": 61, "loss": 0.'
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def _labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_run_writes_a_png_with_loss_and_accuracy(tmp_path):
    run = _write_run(tmp_path / "run")
    path = plot_run(str(run))
    assert path == str(run / "plot.png")
    data = (run / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_figure_has_total_every_stream_and_eval_panels(tmp_path):
    rows = read_metrics(_write_run(tmp_path / "run") / "metrics.jsonl")
    fig = make_figure(rows, title="run")
    loss_ax, acc_ax = fig.axes
    assert _labels(loss_ax) == ["total (weighted)", "answer", "flan-t5", "eval loss"]
    assert _labels(acc_ax) == ["eval accuracy"]
    (acc_line,) = acc_ax.get_lines()
    assert list(acc_line.get_xdata()) == [20, 40, 60]
    assert list(acc_line.get_ydata()) == pytest.approx([20 / 70, 40 / 70, 60 / 70])


def test_without_eval_rows_there_is_one_panel(tmp_path):
    run = _write_run(tmp_path / "run", steps=5, eval_every=1000)
    fig = make_figure(read_metrics(run / "metrics.jsonl"))
    assert len(fig.axes) == 1
    assert _labels(fig.axes[0]) == ["total (weighted)", "answer", "flan-t5"]


def test_custom_output_path_and_cli(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_run_still_writing_its_last_line_plots(tmp_path):
    run = _write_run(tmp_path / "run", steps=5, eval_every=1000, partial_last_line=True)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_missing_or_empty_metrics_name_the_path(tmp_path, capsys):
    with pytest.raises(UserError, match=r"run/metrics.jsonl: metrics file not found"):
        plot_run(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"run/metrics.jsonl: empty metrics file"):
        plot_run(str(tmp_path / "run"))
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "metrics.jsonl: empty" in capsys.readouterr().err


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: malformed JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"loss": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1: expected a JSON object with a numeric 'step'"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_rows_with_nothing_to_plot_are_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(UserError, match="no 'loss'"):
        plot_run(str(tmp_path))


def test_smoothing_does_not_lag_behind_the_curve():
    from tinyllm_jax.train.plot import _smooth

    ramp = [float(i) for i in range(100)]
    smooth = _smooth(ramp)
    assert smooth[5:95] == pytest.approx(ramp[5:95])  # a lagging (causal) average sits below
    assert len(smooth) == 100
