"""A new user's first hour (issue 14): bad validation or test files and a tokenizer that
cannot read the data stop a run before its first step; a run ends with one summary line;
`predict` takes a run directory; override errors name the override; data/ and runs/ are
ignored by git; no "PyTorch was not found" banner without torch; the shared data is found
through TINYLLM_SHARED_DATA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinyllm_jax.cli import main
from tinyllm_jax.data.demo import make_demo_records
from tinyllm_jax.data.records import write_jsonl

from conftest import make_hf_t5
from test_train_run import TINY, tok_dir  # noqa: F401  (tok_dir is a fixture)

REPO = Path(__file__).resolve().parents[1]


def files_config(tmp_path: Path, tok: Path, **data) -> Path:
    """TINY, with data from files (no demo section): train, validation and test."""
    paths = {}
    for split, n in (("train", 64), ("validation", 8), ("test", 8)):
        paths[split] = tmp_path / f"{split}.jsonl"
        write_jsonl(paths[split], make_demo_records(n, 1, split))
    cfg = json.loads(json.dumps(TINY))
    del cfg["demo"]
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["model"]["tokenizer"] = str(tok)
    cfg["data"].update({k: [str(v)] for k, v in paths.items()}, **data)
    cfg["train"].update(steps=4)
    cfg["eval"].update(every_steps=2)
    cfg["checkpoint"].update(every_steps=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps_taken(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(l)["step"] for l in lines if "loss" in json.loads(l)]


# ------------------------------------------------------------------ item 5: every data file checked first


@pytest.mark.parametrize("split", ["validation", "test"])
def test_a_bad_validation_or_test_file_fails_before_the_first_step(tmp_path, tok_dir, capsys, split):  # noqa: F811
    config = files_config(tmp_path, tok_dir)
    bad = tmp_path / f"{split}.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = '{"id": "x", "question": "unfinished'
    bad.write_text("\n".join(lines) + "\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "malformed JSON" in err
    assert steps_taken(tmp_path / "run") == []
    assert not list((tmp_path / "run" / "checkpoints").glob("*")) if (tmp_path / "run" / "checkpoints").exists() else True


# ------------------------------------------------------------------ item 6: tokenizer coverage


def broken_tokenizer(spm_dir: Path, out: Path) -> Path:
    """The transformers 5 trap: T5Tokenizer(vocab_file=...) ignores the SentencePiece model."""
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab_file=str(spm_dir / "spiece.model"))
    assert tok("the quick brown fox").input_ids.count(tok.unk_token_id) >= 3  # what the trap does
    tok.save_pretrained(str(out))
    return out


def test_a_tokenizer_that_maps_the_text_to_unknown_stops_the_run(tmp_path, tok_dir, capsys):  # noqa: F811
    config = files_config(tmp_path, broken_tokenizer(tok_dir, tmp_path / "bad_tok"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"\d+% of the tokens of \d+ training examples are the unknown token", err), err
    assert "T5Tokenizer(vocab_file=...)" in err and "AutoTokenizer.from_pretrained" in err and "model.tokenizer" in err
    assert steps_taken(tmp_path / "run") == []


def test_coverage_of_a_good_tokenizer_passes(spm_tokenizer):
    from tinyllm_jax.model.tokenizer import check_coverage, unknown_fraction

    class Ex:
        ids = [spm_tokenizer("the quick brown fox jumps").input_ids, spm_tokenizer("what is two plus three").input_ids]

        def __len__(self):
            return 2

        def enc(self, i):
            return self.ids[i]

        dec = enc

    assert check_coverage(spm_tokenizer, Ex()) == 0.0
    unk = spm_tokenizer.unk_token_id
    assert unknown_fraction(spm_tokenizer, [[unk, 5, 6, 1], [7, unk]]) == pytest.approx(2 / 5)  # eos left out


# ------------------------------------------------------------------ item 10: summary line, predict on a run


def test_training_ends_with_one_summary_line_and_predict_takes_the_run_dir(tmp_path, tok_dir, capsys):  # noqa: F811
    config = files_config(tmp_path, tok_dir)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    summary_path = tmp_path / "run" / "summary.json"
    summary = json.loads(summary_path.read_text())
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"trained 4 steps: best step (\d+) \(accuracy on validation ([\d.]+)\), "
                     r"test accuracy ([\d.]+); summary: (.+)", last)
    assert m, last
    assert int(m.group(1)) == summary["best_step"] == summary["test_checkpoint_step"]
    assert float(m.group(2)) == pytest.approx(summary["best_eval_accuracy"], abs=1e-4)
    assert float(m.group(3)) == pytest.approx(summary["test"]["test_accuracy"], abs=1e-4)
    assert m.group(4) == str(summary_path)

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "predict: what is 2 plus 3?"}\n')
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(inputs),
                 "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"]) == 0
    assert f"step {summary['best_step']}" in capsys.readouterr().out
    (row,) = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert isinstance(row["prediction"], str)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert f"{tmp_path / 'run'} step {summary['best_step']} to " in capsys.readouterr().out  # the step exported


def test_override_errors_name_the_override_not_the_file(tmp_path, tok_dir, capsys):  # noqa: F811
    from tinyllm_jax.config import ConfigError, load_config

    config = files_config(tmp_path, tok_dir)
    with pytest.raises(ConfigError) as e:
        load_config(config, ["train.steps=8", "train.steps=many"])
    assert str(e.value).startswith("override 'train.steps=many': key 'train.steps': expected int")
    assert str(config) not in str(e.value)
    assert main(["train", str(config), "optim.learning_rat=1e-3"]) == 2
    assert "override 'optim.learning_rat=1e-3': unknown key 'optim.learning_rat'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: unknown key 'train.stepz'"):
        load_config(bad, ["train.steps=4"])  # the file's own error still names the file


def test_data_and_runs_are_git_ignored_but_the_package_is_not():
    paths = ["data/obqa/train.jsonl", "runs/demo/summary.json", "tinyllm_jax/data/formats/new_layout.py"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == paths[:2]


# ------------------------------------------------------------------ no torch: no banner


def test_no_pytorch_banner_in_a_torch_free_install(tmp_path, spm_tokenizer_dir):
    model = make_hf_t5(tmp_path / "m", spm_tokenizer_dir, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hide = tmp_path / "notorch"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None  # as if torch were not installed\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(REPO)]), "JAX_PLATFORMS": "cpu"}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # torch is hidden
    plain = subprocess.run([sys.executable, "-c", "import transformers"], env=env, capture_output=True, text=True)
    assert "PyTorch was not found" in plain.stderr  # the banner the project must not show
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "the quick brown fox"}\n')
    r = subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "predict", "--model", str(model), "--input", str(inputs),
                        "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "3"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyTorch was not found" not in r.stderr + r.stdout
    assert (tmp_path / "o.jsonl").is_file()


# ------------------------------------------------------------------ item 9: where the shared data is


def test_shared_data_is_found_through_the_environment_and_the_skip_says_how(tmp_path):
    probe = ("import conftest, pytest\n"
             "print(conftest.SHARED_DATA)\n"
             "try:\n    conftest.shared_data_or_skip('nothing.tar.xz')\n"
             "except pytest.skip.Exception as e:\n    print(e)\n")
    env = {**os.environ, "TINYLLM_SHARED_DATA": str(tmp_path), "PYTHONPATH": str(REPO / "tests")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO).stdout
    first, reason = out.splitlines()[:2]
    assert first == str(tmp_path)
    assert "TINYLLM_SHARED_DATA" in reason and "nothing.tar.xz" in reason
    readme = (REPO / "README.md").read_text()
    assert "tar xJf ../shared/data" not in readme  # a user has no such folder
    for repo in ("YikunHan42/TinyLLM", "google-research/distilling-step-by-step", "2hojae/mentor-kd",
                 "zhuochunli/Learn-from-Committee"):
        assert repo in readme


def test_a_command_without_its_config_names_only_what_is_missing(capsys):
    """`tinyllm train` alone: the config is required, the key=value overrides are not (argparse
    listed both while a `*` positional had no default)."""
    from tinyllm_jax.cli import main

    for command in ("train", "recipe", "eval", "rationales", "logits"):
        with pytest.raises(SystemExit) as e:
            main([command])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.endswith("the following arguments are required: config"), (command, err)
