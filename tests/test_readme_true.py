"""Issue 23, "the README and the configs true": config headers name real keys and say what
their configs set; the CLI's help shows what every subcommand does and its defaults; the
configs' comments are current; an export's files share one mode; FAIR's rounds start from
round 0; `tinyllm plot` draws a recipe's stages and a recipe refuses another method's
settings; the README's "Your own data" runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tinyllm_jax.cli import build_parser, main

from test_train_run import tok_dir  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ item 9: help and version


def test_version_and_every_subcommand_has_a_one_line_description_and_shows_its_defaults(capsys):
    from tinyllm_jax import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tinyllm {__version__}"

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    top = parser.format_help()
    for name, sub in commands.items():
        summary = next(a.help for a in parser._subparsers._group_actions[0]._choices_actions if a.dest == name)
        assert summary and "\n" not in summary and re.search(rf"\b{name}\s+{re.escape(summary[:20])}", top), name
        assert sub.description and sub.description.lower().startswith(summary.lower()), name
    assert "(default: 64)" in commands["predict"].format_help()  # --max-new-tokens
    assert "(default: test)" in commands["eval"].format_help()  # --split
    assert "(default: None)" not in "".join(c.format_help() for c in commands.values())

    checkpoint = next(a for a in commands["eval"]._actions if a.dest == "checkpoint")
    assert checkpoint.metavar == "STEP" and "step" in checkpoint.help
    rationales = next(a for a in commands["rationales"]._actions if a.dest == "overrides")
    assert re.search(r"e\.g\. rationales\.\S+=", rationales.help)


def test_config_comments_say_that_overrides_index_the_stream_list():
    from tinyllm_jax.config import load_config

    stale = [p.name for p in sorted((REPO / "configs").rglob("*.yaml")) if "cannot index" in p.read_text()]
    assert not stale
    cfg = load_config(REPO / "configs" / "tinyllm_obqa.yaml", ["data.streams.1.weight=2.0"])
    assert cfg.data.streams[1].weight == 2.0


# ------------------------------------------------------------------ item 10: export


def test_exported_weights_have_the_mode_of_the_other_files(tmp_path, tiny_t5_dir, capsys):
    out = tmp_path / "export"
    assert main(["export", str(tiny_t5_dir), str(out)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes


# ------------------------------------------------------------------ item 8: plot a recipe; other methods' settings


def write_metrics(folder: Path, start_time: float, steps: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "time": start_time + s, "loss": 3.0 / s, "loss/answer": 2.0 / s} for s in range(1, steps + 1)]
    rows.append({"step": steps, "eval_accuracy": 0.25})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_of_a_recipe_run_folder_draws_every_training_stage_in_order(tmp_path, capsys):
    from tinyllm_jax.train.plot import make_recipe_figure, training_stages

    run = tmp_path / "recipe"
    write_metrics(run / "train", 2000.0)
    write_metrics(run / "mentor", 1000.0)  # trained first
    write_metrics(run / "previous" / "train" / "0123abcd", 500.0)  # an old output kept aside: not a stage
    (run / "recipe.yaml").write_text("method: mentor_kd\n")
    assert list(training_stages(run)) == ["mentor", "train"]
    fig = make_recipe_figure(training_stages(run), title="recipe")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["mentor: training loss", "mentor: evaluation", "train: training loss", "train: evaluation"]

    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "plot.png") and (run / "plot.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no training stage below" in capsys.readouterr().err


@pytest.mark.parametrize("method, override, key, owner", [
    ("tinyllm", "fair.rounds=3", "fair.rounds", "fair"),
    ("fair", "mentor.samples=5", "mentor.samples", "mentor_kd"),
    ("step_by_step", "mentor.model.d_model=64", "mentor.model.d_model", "mentor_kd"),
])
def test_settings_of_another_method_are_refused_by_name(tmp_path, capsys, method, override, key, owner):
    config = {"tinyllm": "demo_tinyllm", "fair": "demo_fair", "step_by_step": "demo_step_by_step"}[method]
    assert main(["recipe", str(REPO / "configs" / "recipes" / f"{config}.yaml"), override, "--dry-run",
                 f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"{key}: a setting of method {owner}, but this recipe's method is {method}" in err


# ------------------------------------------------------------------ item 6: FAIR's round 0


def test_fair_rounds_table_and_chart_start_from_round_0_the_warm_up_student(tmp_path):
    from tinyllm_jax.recipes import fair
    from tinyllm_jax.recipes.config import load_recipe
    from tinyllm_jax.train.plot import make_rounds_figure

    run = tmp_path / "run"
    cfg = load_recipe(str(REPO / "configs" / "recipes" / "demo_fair.yaml"), [f"run_dir={run}", "fair.rounds=1"])
    (run / "warmup").mkdir(parents=True)
    (run / "warmup" / "summary.json").write_text(json.dumps({"best_step": 40, "best_eval_accuracy": 0.414}))
    for stage, result in {"mine": {"mistakes": 120, "train_accuracy": 0.4},
                          "evaluate": {"validation_accuracy": 0.227, "test_accuracy": 0.21}}.items():
        (run / "round1" / stage).mkdir(parents=True)
        (run / "round1" / stage / "stage.json").write_text(json.dumps({"status": "done", "result": result}))
    rep = fair.report(cfg, run)
    assert [r["round"] for r in rep["rounds"]] == [0, 1]
    assert rep["rounds"][0]["validation_accuracy"] == 0.414 and rep["rounds"][0]["student"] == "warmup"
    assert json.loads((run / "rounds.json").read_text()) == rep
    table = fair.format_report(rep).splitlines()
    assert table[1].split()[:2] == ["0", "(warmup)"] and "0.4140" in table[1]
    assert table[2].split()[0] == "1" and "0.2270" in table[2]  # the round that made the student worse shows

    ax = make_rounds_figure(rep["rounds"]).axes[0]
    validation = next(line for line in ax.get_lines() if line.get_label() == "validation")
    assert list(validation.get_xdata()) == [0, 1] and list(validation.get_ydata()) == [0.414, 0.227]


# ------------------------------------------------------------------ item 7: "Your own data", as written


def readme_section(title: str) -> str:
    """The README's `### title` section, up to the next heading."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"### {title}\n")
    return text[start:re.compile(r"\n##+ ").search(text, start + 1).start()]


def fenced(section: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_your_own_data_config_and_commands_run_as_written(tmp_path, monkeypatch, capsys, tok_dir):  # noqa: F811
    import shlex

    from conftest import make_hf_t5
    from tinyllm_jax.data.demo import make_demo_records
    from tinyllm_jax.data.records import write_jsonl

    section = readme_section("Your own data")
    config_text = fenced(section, "yaml")
    name = config_text.splitlines()[0].removeprefix("# ").strip()
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(config_text)
    config = yaml.safe_load(config_text)
    for split, n in (("train", 64), ("validation", 8), ("test", 8)):  # the teacher the config names: gpt
        records = [{**r, "rationales": {"gpt": r["rationales"]["careful"]}} for r in make_demo_records(n, 3, split)]
        (path,) = config["data"][split]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
    Path("questions.jsonl").write_text('{"input": "predict: Ann has 3 pens and finds 2 more. How many pens?"}\n')

    few_steps = ["train.steps=2", "eval.every_steps=2", "checkpoint.every_steps=2"]
    commands = [shlex.split(line, comments=True) for line in fenced(section, "sh").splitlines() if line.strip()]
    assert [c[1] for c in commands] == ["train", "eval", "predict", "export", "plot"]
    for argv in commands:
        assert argv[0] == "tinyllm"
        extra = few_steps if argv[1] == "train" else []
        assert main(argv[1:] + extra) == 0, (argv, capsys.readouterr().err[-2000:])
    run = Path(config["run_dir"])
    assert (run / "tokenizer" / "tokenizer_config.json").is_file()  # trained on the records
    assert json.loads(Path("answers.jsonl").read_text())["prediction"] is not None
    assert (Path("runs/my-data-hf") / "model.safetensors").is_file() and (run / "plot.png").is_file()

    # a pretrained T5 instead, as the section says (here a tiny local one, for the hub id)
    hub = re.search(r"`(tinyllm train [^`]*model\.init=[^`]*)`", section.replace("\n", " ")).group(1)
    argv = shlex.split(hub.replace("google/flan-t5-base", str(make_hf_t5(tmp_path / "t5", tok_dir))))
    assert main(argv[1:] + few_steps) == 0
    assert json.loads(Path("runs/my-data-flan/model_config.json").read_text())["d_model"] == 32  # the init's size


# ------------------------------------------------------------------ item 5: what config headers name exists


SECTIONS = ("run_dir", "model", "data", "mesh", "optim", "checkpoint", "eval", "train", "distill", "rationales",
            "demo", "method", "source", "rationale_splits", "export", "fair", "mentor")
KEY = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_0-9]+)*)(=|: )(\S*)")


def header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return lines


def resolve(cls, parts: list[str]) -> bool:
    """Whether the dotted key names a config field (a number indexes a list)."""
    import dataclasses
    import types
    import typing

    tp = cls
    for part in parts:
        while typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return False
            tp = hints[part]
        elif typing.get_origin(tp) is list:
            if not part.isdigit():
                return False
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict or tp is typing.Any:
            return True  # free-form mappings (demo options, templates)
        else:
            return False
    return True


def value_at(cfg, parts: list[str]):
    for part in parts:
        cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
    return cfg


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_key_a_config_header_names_exists_and_its_overrides_load(path):
    from tinyllm_jax.config import Config, load_config
    from tinyllm_jax.recipes.config import RecipeConfig, load_recipe

    recipe = "recipes" in path.parts
    cls = RecipeConfig if recipe else Config
    named = [(m.group(1), m.group(2), m.group(3)) for line in header(path) for m in KEY.finditer(line)]
    unknown = [key for key, _, _ in named if not resolve(cls, key.split("."))]
    assert not unknown, f"{path.name}: its header names keys that do not exist: {unknown}"
    cfg = (load_recipe if recipe else load_config)(str(path))
    for key, sep, value in named:
        value = value.rstrip(",;:.)`'")  # prose punctuation after the value
        if sep == "=":  # an override in a command line: it loads
            (load_recipe if recipe else load_config)(str(path), [f"{key}={value}"])
        elif "." in key and value:  # "key: value" in prose describes this config: it says what it sets
            assert yaml.safe_load(value) == value_at(cfg, key.split(".")), (
                f"{path.name}: its header says {key}: {value}, the config sets {value_at(cfg, key.split('.'))!r}")


# ------------------------------------------------------------------ item 11: small things


def test_a_teacher_streams_log_line_says_which_records_its_examples_come_from(spm_tokenizer):
    """FAIR's training records are of two kinds: feedback records feed the feedback stream,
    rationale records the rationale stream; each stream's line must not read as if records
    it trains on lacked what it trains on ("300 examples, 300 records without rationale")."""
    from tinyllm_jax.config import StreamConfig
    from tinyllm_jax.data.records import make_record
    from tinyllm_jax.data.streams import build_examples

    records = [{**make_record(f"r{i}", "what is two plus three?", "five"), "rationales": {"rationale": ["so five"]}}
               for i in range(2)]
    records += [{**make_record(f"r{i}~feedback", "the answer is four?", "five"), "rationales": {"feedback": ["no"]}}
                for i in range(3)]
    streams = [StreamConfig("feedback", "feedback: ", 0.5, "feedback"), StreamConfig("rationale", "explain: ", 0.5,
                                                                                      "rationale")]
    stats = build_examples(records, streams, spm_tokenizer, 128, 32).stats
    assert stats["feedback"].summary() == "3 examples from the 3 of 5 records that have a 'feedback' rationale"
    assert stats["rationale"].summary() == "2 examples from the 2 of 5 records that have a 'rationale' rationale"


def test_the_dry_runs_request_count_is_what_the_run_sends(tmp_path, capsys):
    """Before the records exist, after the data stage, and as sent: one number (the records'
    requests and the zero-shot pass for in-context examples)."""
    from test_recipes import write_recipe

    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run)

    def planned() -> int:
        assert main(["recipe", str(cfg), "--dry-run"]) == 0
        return int(re.search(r"to do: +(\d+) teacher requests to send", capsys.readouterr().out).group(1))

    before = planned()
    assert main(["recipe", str(cfg), "--only", "data"]) == 0
    capsys.readouterr()
    after_data = planned()
    assert main(["recipe", str(cfg), "--only", "rationales"]) == 0
    sent = json.loads((run / "rationales" / "stage.json").read_text())["result"]["new_requests"]
    cache = (run / "rationales" / "cache.jsonl").read_text().splitlines()
    assert before == after_data == sent == len(cache) == 352  # 2 teachers x (152 records + 3 pools of 8)


def test_evaluation_time_stays_out_of_the_progress_bars_rate(tmp_path, tok_dir, monkeypatch, capsys):  # noqa: F811
    """tqdm's ETA comes from a smoothed time per step; the steps whose interval also held a
    10 s evaluation must not make that estimate jump (it would say the run has hours left)."""
    import time

    import tqdm.auto

    from test_first_hour import files_config
    from tinyllm_jax.eval import evaluate

    seen: list[tuple[int, float]] = []  # (step, the training bar's smoothed seconds a step) at each redraw

    class RecordingBar(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            if self.desc == "train" and self.last_print_n == self.n and self._ema_dn():
                seen.append((self.n, self._ema_dt() / self._ema_dn()))
            return out

    run = evaluate.Evaluation.run

    def slow_run(self, *a, **k):
        time.sleep(10.0)
        return run(self, *a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(evaluate.Evaluation, "run", slow_run)
    config = files_config(tmp_path, tok_dir)
    # 32 steps first, so that the estimate has forgotten the first step's compilation
    assert main(["train", str(config), "train.steps=48", "eval.every_steps=32", "checkpoint.every_steps=32",
                 "train.progress=true"]) == 0
    before = [v for step, v in seen if step <= 32][-1]
    after = next(v for step, v in seen if step > 32)
    assert after - before < 0.25, seen  # with the 10 s in it, about 0.7 s more (the redraw covers ~10 steps)
