"""The shipped configs: every YAML loads; each recipe's streams, data paths and lengths are
what its header says; and, with the real reference data present, the TinyLLM OBQA and
distilling step-by-step CQA recipes train for two steps on a tiny student."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import make_hf_t5, shared_data_or_skip
from tinyllm_jax.config import load_config
from tinyllm_jax.data.streams import step_by_step_streams, tinyllm_streams

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINYLLM_DATASETS = ("obqa", "arc", "piqa", "riddle", "pubmedqa", "bioasq")
RECIPES = [ROOT / "configs" / f"tinyllm_{d}.yaml" for d in TINYLLM_DATASETS] + [ROOT / "configs" / "step_by_step_cqa.yaml"]

# "#   loss = 1.0 * L(predict: -> answer) + 0.5 * L(explain: -> palm)" in a recipe's header
LOSS_LINE = re.compile(r"^#\s+loss = (.+)$")
LOSS_TERM = re.compile(r"^([0-9.]+) \* L\((\w+): -> ([\w-]+)\)$")


def header(path: Path) -> str:
    """The comment block a config starts with."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def header_streams(path: Path) -> list[tuple[float, str, str]]:
    """(weight, prefix, target) of each term of the header's `loss =` line."""
    found = [m.group(1) for line in header(path).splitlines() if (m := LOSS_LINE.match(line))]
    assert len(found) == 1, f"{path.name}: expected one '#   loss = ...' line in the header, found {len(found)}"
    terms = []
    for term in found[0].split(" + "):
        m = LOSS_TERM.match(term.strip())
        assert m, f"{path.name}: cannot read loss term {term!r}"
        terms.append((float(m.group(1)), m.group(2) + ": ", m.group(3)))
    return terms


# --------------------------------------------------------------------------- every config


def test_the_recipes_are_shipped():
    assert set(RECIPES) <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    load_config(path)  # raises ConfigError naming the key on any unknown key or wrong type


def test_every_config_has_its_own_run_dir():
    """Two configs sharing a run directory would resume each other's checkpoints."""
    run_dirs = [load_config(p).run_dir for p in CONFIGS]
    assert len(set(run_dirs)) == len(run_dirs)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_streams_are_as_the_header_says(path):
    cfg = load_config(path)
    said = header_streams(path)
    have = [(s.weight, s.prefix, s.teacher or "answer") for s in cfg.data.streams]
    assert have == said
    assert [s.name for s in cfg.data.streams] == [s.teacher or "answer" for s in cfg.data.streams]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_says_how_to_run_on_what_and_what_to_expect(path):
    text = header(path)
    assert "tinyllm convert" in text
    assert "Hardware:" in text and "Expect:" in text
    commands = [line.split("tinyllm train ", 1)[1].split("#")[0].split()
                for line in text.splitlines() if "tinyllm train " in line]
    assert len(commands) >= 2  # the recipe as shipped, and with another student (or labels)
    for config, *overrides in commands:
        assert config == f"configs/{path.name}"
        cfg = load_config(ROOT / config, overrides)  # every documented override is a real key
        assert cfg.run_dir != load_config(path).run_dir or not overrides


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_lengths_hold_any_example(path):
    """No example the limits allow can fail to fit a packed row."""
    d = load_config(path).data
    assert d.encoder_length >= d.max_input_length
    assert d.decoder_length >= d.max_target_length


@pytest.mark.parametrize("dataset", TINYLLM_DATASETS)
def test_tinyllm_recipe(dataset):
    path = ROOT / "configs" / f"tinyllm_{dataset}.yaml"
    cfg = load_config(path)
    # TinyLLM's prefixes and teachers (the weights are checked against the header above);
    # PIQA's published teacher strings carry no LLaMA rationale, so its recipe has no beta stream
    n = 2 if dataset == "piqa" else 3
    preset = tinyllm_streams(*(s.weight for s in cfg.data.streams), *([1.0] * (3 - n)))
    assert cfg.data.streams == preset[:n]
    assert cfg.data.train == [f"data/tinyllm/{dataset}/train.jsonl"]
    assert cfg.data.validation == [f"data/tinyllm/{dataset}/valid.jsonl"]
    assert cfg.data.test == [f"data/tinyllm/{dataset}/test.jsonl"]
    assert cfg.data.answer_source == "gold"
    assert cfg.model.init == "google/flan-t5-base"
    assert cfg.eval.task == "choice"
    assert cfg.optim.learning_rate == 5e-5
    # the student size is a dotted override, documented in the header
    assert "model.init=google/flan-t5-large" in header(path)
    assert load_config(path, ["model.init=google/flan-t5-large"]).model.init == "google/flan-t5-large"


def test_step_by_step_recipe():
    path = ROOT / "configs" / "step_by_step_cqa.yaml"
    cfg = load_config(path)
    assert cfg.data.streams == step_by_step_streams(0.5, "palm")
    assert cfg.data.answer_source == "gold"
    assert "data.answer_source=palm" in header(path)
    assert load_config(path, ["data.answer_source=palm"]).data.answer_source == "palm"
    assert cfg.data.train == ["data/dss/cqa/train.jsonl"]
    assert cfg.data.test == ["data/dss/cqa/test.jsonl"]
    assert cfg.optim.learning_rate == 5e-5
    assert cfg.eval.task == "choice"


# --------------------------------------------------------------------------- real data

# "Data: 4957 train / 500 valid / 500 test records" ("9741 train / 1221 test" for CQA)
RECORD_COUNTS = re.compile(r"(\d+) train / (?:(\d+) valid / )?(\d+) test records")


def _converted(format: str, archive: str, dest: Path) -> Path:
    from tinyllm_jax.data.formats import convert

    with tarfile.open(shared_data_or_skip(archive)) as tar:
        tar.extractall(dest / "src", filter="data")
    convert(format, dest / "src", dest / "data")
    return dest / "data"


@pytest.fixture(scope="module")
def tinyllm_data(tmp_path_factory) -> Path:
    """data/tinyllm as `tinyllm convert tinyllm` writes it from the shared archive."""
    return _converted("tinyllm", "tinyllm.tar.xz", tmp_path_factory.mktemp("tinyllm"))


@pytest.fixture(scope="module")
def dss_data(tmp_path_factory) -> Path:
    return _converted("dss", "dss.tar.xz", tmp_path_factory.mktemp("dss"))


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("dataset", ["obqa", "arc", "piqa", "pubmedqa"])
def test_tinyllm_header_record_counts_match_the_converted_data(dataset, tinyllm_data):
    train, valid, test = map(int, RECORD_COUNTS.search(header(ROOT / "configs" / f"tinyllm_{dataset}.yaml")).groups())
    have = [_lines(tinyllm_data / dataset / f"{split}.jsonl") for split in ("train", "valid", "test")]
    if dataset == "piqa":  # the shared archive's gold train file is empty: no train split
        assert have == [0, valid, test] and train == 16113
    else:
        assert have == [train, valid, test]


def test_step_by_step_header_record_counts_match_the_converted_data(dss_data):
    train, valid, test = RECORD_COUNTS.search(header(ROOT / "configs" / "step_by_step_cqa.yaml")).groups()
    assert valid is None
    assert [_lines(dss_data / "cqa" / f"{split}.jsonl") for split in ("train", "test")] == [int(train), int(test)]


def _head(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, spm_tokenizer_dir) -> Path:
    # one layer each side: the test is about the recipe, and compile time grows with depth
    return make_hf_t5(tmp_path_factory.mktemp("student"), spm_tokenizer_dir, num_layers=1,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _train(config: Path, run_dir: Path, student: Path, split_files: dict[str, Path]) -> list[dict]:
    """`tinyllm train CONFIG` in a subprocess, shrunk to two steps of a tiny student."""
    overrides = [
        f"run_dir={run_dir}",
        f"model.init={student}", "model.dtype=float32", "model.dropout_rate=0.0", "model.remat=none",
        *(f"data.{split}=[{path}]" for split, path in split_files.items()),
        # the test tokenizer is nearly character-level: ~4 examples fill an encoder row and
        # 8 a decoder row, so a step of 8 rows holds examples of every stream
        "data.max_input_length=384", "data.max_target_length=16",
        "data.encoder_length=1024", "data.decoder_length=128",
        "train.steps=2", "train.batch_size=8", "train.log_every=1", "train.progress=false",
        "optim.grad_accum_steps=1",
        "eval.every_steps=2", "eval.max_examples=4", "eval.max_new_tokens=4", "eval.batch_size=8",
        "checkpoint.every_steps=2", "checkpoint.async_save=false",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "train", str(config), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_stream_losses(metrics: list[dict], config: Path) -> None:
    cfg = load_config(config)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        losses = [m[f"loss/{s.name}"] for s in cfg.data.streams]
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in losses), m
        # the config's weights reach the loss: total = sum of weight x stream mean
        assert m["loss"] == pytest.approx(sum(s.weight * v for s, v in zip(cfg.data.streams, losses)), rel=1e-5)


def test_tinyllm_obqa_recipe_trains_on_real_data(tmp_path, tinyllm_data, tiny_student):
    obqa = tinyllm_data / "obqa"
    files = {"train": _head(obqa / "train.jsonl", tmp_path / "train200.jsonl", 200),
             "validation": obqa / "valid.jsonl",
             "test": _head(obqa / "test.jsonl", tmp_path / "test8.jsonl", 8)}
    config = ROOT / "configs" / "tinyllm_obqa.yaml"
    metrics = _train(config, tmp_path / "run", tiny_student, files)
    _check_stream_losses(metrics, config)
    assert [m["eval_n"] for m in metrics if "eval_n" in m] == [4]  # validation, capped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test"]["test_n"] == 8


def test_step_by_step_cqa_recipe_trains_on_real_data(tmp_path, dss_data, tiny_student):
    cqa = dss_data / "cqa"
    files = {"train": _head(cqa / "train.jsonl", tmp_path / "train200.jsonl", 200),
             "test": _head(cqa / "test.jsonl", tmp_path / "test8.jsonl", 8)}
    config = ROOT / "configs" / "step_by_step_cqa.yaml"
    metrics = _train(config, tmp_path / "run", tiny_student, files)
    _check_stream_losses(metrics, config)
    assert [m["eval_n"] for m in metrics if "eval_n" in m] == [4]  # held out from train, capped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test"]["test_n"] == 8


def test_overrides_index_lists(tmp_path):
    from tinyllm_jax.config import ConfigError, load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.streams.1.weight=2", "data.streams.2.prefix=why: "])
    assert cfg.data.streams[1].weight == 2.0 and cfg.data.streams[2].prefix == "why: "
    with pytest.raises(ConfigError, match=r"data.streams is a list of 3; '7' is not an index"):
        load_config(ROOT / "configs" / "demo.yaml", ["data.streams.7.weight=2"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=-5", "key 'train.steps': expected a whole number at least 1, found -5"),  # trained 0 steps
    ("train.batch_size=0", "key 'train.batch_size': expected a whole number at least 1, found 0"),  # RecursionError
    ("data.decoder_length=0", "key 'data.decoder_length': expected a whole number at least 1"),  # OverflowError
    ("checkpoint.every_steps=0", "key 'checkpoint.every_steps': expected a whole number at least 1"),  # step % 0
    ("optim.learning_rate=-1e-3", "key 'optim.learning_rate': expected a number at least 0, found -0.001"),
    ("data.streams.0.weight=-1", "key 'data.streams[0].weight': expected a number at least 0"),
    ("model.dropout_rate=1.5", "key 'model.dropout_rate': expected a number at least 0 and below 1, found 1.5"),
    ("optim.clip_norm=0", "key 'optim.clip_norm': expected a number above 0, found 0.0"),
    ("eval.every_steps=-1", "key 'eval.every_steps': expected a whole number at least 0"),
    ("rationales.teachers=[{name: t, top_p: 2}]", "key 'rationales.teachers[0].top_p': expected a number above 0 and at most 1"),
])
def test_numbers_out_of_range_are_refused_naming_the_key(override, message):
    """Each was accepted and trained the wrong way, or failed deep in the run with a traceback."""
    from tinyllm_jax.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert str(err.value) == f"override {override!r}: {message}" or message in str(err.value), str(err.value)
    assert load_config(ROOT / "configs" / "demo.yaml", ["eval.every_steps=0", "data.streams.0.weight=0"])  # 0: off


def test_recipe_numbers_out_of_range_are_refused_naming_the_key():
    from tinyllm_jax.config import ConfigError
    from tinyllm_jax.recipes.config import load_recipe

    for override, message in [("fair.rounds=0", "key 'fair.rounds': expected a whole number at least 1, found 0"),
                              ("fair.replay=1.5", "key 'fair.replay': expected a number at least 0 and at most 1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_recipe(str(ROOT / "configs" / "recipes" / "demo_fair.yaml"), [override])
    # no sampling, no samples: allowed (the Mentor-KD check asks for samples only when the mentor samples)
    assert load_recipe(str(ROOT / "configs" / "recipes" / "demo_mentor_kd.yaml"),
                       ["mentor.augment=false", "mentor.samples=0"]).mentor.samples == 0
