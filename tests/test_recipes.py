"""`tinyllm recipe`: the demo TinyLLM recipe end to end, done stages skipped, a changed
setting rerunning only what it touches, --dry-run costs, --only, bad input, and SIGKILL
during training (the rerun ends with the same parameters as an uninterrupted run)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinyllm_jax.cli import main

TINY_RECIPE = {
    "method": "tinyllm",
    "source": {"demo": {"seed": 0, "n_train": 120, "n_valid": 16, "n_test": 16}},
    "rationales": {"num_examples": 2, "zero_shot_pool": 8, "progress": False,
                   "teachers": [{"name": "careful", "backend": "demo", "model": "careful"},
                                {"name": "terse", "backend": "demo", "model": "terse"}]},
    "model": {"train_tokenizer_vocab": 128, "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64,
              "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4, "relative_attention_num_buckets": 8,
              "relative_attention_max_distance": 32, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1},
    "data": {"streams": [{"name": "answer", "prefix": "predict: ", "weight": 1.0},
                         {"name": "careful", "prefix": "explain: ", "weight": 0.5, "teacher": "careful"},
                         {"name": "terse", "prefix": "rationale: ", "weight": 0.5, "teacher": "terse"}],
             "max_input_length": 200, "max_target_length": 64, "encoder_length": 128, "decoder_length": 48},
    "train": {"steps": 8, "batch_size": 8, "log_every": 1, "progress": False},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
    "eval": {"every_steps": 4, "max_new_tokens": 4, "batch_size": 8},
    "checkpoint": {"every_steps": 2, "keep": 2},
}


def write_recipe(path: Path, run_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY_RECIPE))
    cfg["run_dir"] = str(run_dir)
    for sec, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(sec), dict):
            cfg[sec].update(values)
        else:
            cfg[sec] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def finished(run_dir: Path) -> dict[str, float]:
    """When each stage last finished (from its stage.json)."""
    out = {}
    for record in sorted(run_dir.glob("*/stage.json")):
        out[record.parent.name] = json.loads(record.read_text())["finished"]
    return out


def test_demo_recipe_end_to_end_then_skipped_then_only_training_reruns(tmp_path, capsys):
    from transformers import T5ForConditionalGeneration

    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir)
    assert main(["recipe", str(cfg)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["done"] * 5
    assert list(summary["stages"]) == ["data", "rationales", "train", "evaluate", "export"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["step"] in (4, 8)
    assert "test accuracy" in out.splitlines()[-1]

    # the teachers wrote every split's rationales; training read them, not the bare records
    train_records = [json.loads(l) for l in (run_dir / "rationales" / "train.jsonl").read_text().splitlines()]
    assert len(train_records) == 120
    assert all(set(r["rationales"]) == {"careful", "terse"} for r in train_records)
    assert all(r["provenance"]["careful"]["gold_in_prompt"] and len(r["provenance"]["careful"]["examples"]) == 2
               for r in train_records)
    wrong = sum(r["teacher_answers"]["terse"][0] != r["answer"] for r in train_records)
    assert 0 < wrong < 40  # the terse teacher slips on ~15 % of the questions, the careful one never
    assert all(r["teacher_answers"]["careful"][0] == r["answer"] for r in train_records)
    saved = yaml.safe_load((run_dir / "train" / "config.yaml").read_text())
    assert saved["data"]["train"] == [str(run_dir / "rationales" / "train.jsonl")]
    _, info = T5ForConditionalGeneration.from_pretrained(run_dir / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    first = finished(run_dir)
    assert main(["recipe", str(cfg)]) == 0
    assert "nothing to do: all 5 stages are done" in capsys.readouterr().out
    assert finished(run_dir) == first

    assert main(["recipe", str(cfg), "data.streams.1.weight=1.0"]) == 0
    out = capsys.readouterr().out
    assert "stage train: settings changed (data.streams.1.weight: 0.5 -> 1.0)" in out
    again = finished(run_dir)
    assert {k for k in again if again[k] != first[k]} == {"train", "evaluate", "export"}
    weights = yaml.safe_load((run_dir / "train" / "config.yaml").read_text())["data"]["streams"]
    assert [s["weight"] for s in weights] == [1.0, 1.0, 0.5]


def test_dry_run_counts_teacher_requests_and_sends_none(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir)
    assert main(["recipe", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 2 teachers x (152 records + 3 zero-shot pools of 8)
    assert "stage rationales: to run" in out and "352 teacher requests to send" in out
    assert not (run_dir / "rationales").exists()

    assert main(["recipe", str(cfg), "--only", "data"]) == 0
    capsys.readouterr()
    assert main(["recipe", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage data: done" in out and "careful train: 128 at most (8 for in-context examples)" in out


def test_only_a_stage_whose_input_is_missing_is_one_clear_error(tmp_path, capsys):
    cfg = write_recipe(tmp_path / "r.yaml", tmp_path / "run")
    assert main(["recipe", str(cfg), "--only", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: stage train: needs stage data first, which is not done" in err[0]
    assert main(["recipe", str(cfg), "--only", "training"]) == 2
    assert "--only training: no such stage (stages: data, rationales, train, evaluate, export)" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("sourse.demo.n_train=3", "unknown key 'sourse'; did you mean 'source'"),
    ("rationales.teachers.0.tempreature=1", "unknown key 'rationales.teachers[0].tempreature'"),
    ("source.demo.n_trian=3", "source.demo.n_trian: unknown key"),
    ("data.train=[x.jsonl]", "data.train: set by the recipe from its data stage"),
    ("data.streams.1.teacher=llama", "data.streams[1].teacher: 'llama' is not one of rationales.teachers"),
])
def test_bad_recipe_keys_are_one_line_errors(tmp_path, capsys, override, message):
    cfg = write_recipe(tmp_path / "r.yaml", tmp_path / "run")
    assert main(["recipe", str(cfg), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unreachable_teacher_stops_the_stage_and_keeps_what_was_collected(tmp_path, capsys):
    from test_teachers_support import free_port

    port = free_port()  # nothing listens there
    teachers = [{"name": "careful", "backend": "demo", "model": "careful"},
                {"name": "terse", "backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1"}]
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, rationales={**TINY_RECIPE["rationales"], "teachers": teachers})
    assert main(["recipe", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tinyllm recipe: error: ") and sum("error" in line for line in err) == 1, err
    assert (f"stage rationales: teacher 'terse': rationales.teachers[1].base_url = http://127.0.0.1:{port}/v1: "
            "connection refused") in err[-1]
    cache = [json.loads(l) for l in (run_dir / "rationales" / "cache.jsonl").read_text().splitlines()]
    assert len(cache) == 152 + 24 and {e["teacher"] for e in cache} == {"careful"}  # kept for the rerun
    assert json.loads((run_dir / "rationales" / "stage.json").read_text())["status"] == "running"


# --------------------------------------------------------------------------- SIGKILL


def _recipe_process(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "tinyllm_jax.cli", "recipe", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(run_dir: Path):
    from tinyllm_jax.runs import load_run

    return load_run(run_dir / "train", step=200).params


def test_sigkill_during_training_then_rerun_equals_an_uninterrupted_recipe(tmp_path):
    import jax

    sections = {"train": {**TINY_RECIPE["train"], "steps": 200}, "eval": {**TINY_RECIPE["eval"], "every_steps": 0},
                "checkpoint": {"every_steps": 20, "keep": 2}}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _recipe_process(write_recipe(tmp_path / "ref.yaml", ref, **sections))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    cfg = write_recipe(tmp_path / "kill.yaml", killed, **sections)
    proc = _recipe_process(cfg)
    deadline = time.time() + 300
    while not (killed / "train" / "checkpoints" / "20").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the recipe ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "train" / "stage.json").read_text())["status"] == "running"
    proc = _recipe_process(cfg)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "stage data: done, skipped" in out and "stage train: resuming (interrupted)" in out
    assert "resumed from step" in out
    for a, b in zip(jax.tree.leaves(_final_params(ref)), jax.tree.leaves(_final_params(killed))):
        np.testing.assert_array_equal(a, b)
    assert json.loads((ref / "summary.json").read_text())["test_accuracy"] == \
        json.loads((killed / "summary.json").read_text())["test_accuracy"]


def test_step_by_step_demo_recipe_cuts_the_answer_from_rationales_and_trains_on_teacher_labels(tmp_path):
    run_dir = tmp_path / "run"
    teacher = {"name": "terse", "backend": "demo", "model": "terse", "template": "few_shot_cot"}
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, method="step_by_step", rationale_splits=["train"],
                       rationales={**TINY_RECIPE["rationales"], "teachers": [teacher]}, export={"enabled": False},
                       data={**TINY_RECIPE["data"], "answer_source": "terse",
                             "streams": [{"name": "answer", "prefix": "predict: ", "weight": 0.5},
                                         {"name": "terse", "prefix": "explain: ", "weight": 0.5, "teacher": "terse"}]})
    assert main(["recipe", str(cfg)]) == 0
    recs = [json.loads(l) for l in (run_dir / "rationales" / "train.jsonl").read_text().splitlines()]
    for r in recs:
        (rationale,), (label,) = r["rationales"]["terse"], r["teacher_answers"]["terse"]
        assert "answer is" not in rationale and rationale.endswith(f"= {label}.")
        assert not r["provenance"]["terse"]["gold_in_prompt"]
    assert 0 < sum(r["teacher_answers"]["terse"][0] != r["answer"] for r in recs) < 40
    assert (run_dir / "evaluate" / "summary.json").is_file() and not (run_dir / "export").exists()


@pytest.mark.parametrize("override, message", [
    ("data.streams.1.teacher=nobody", "the rationale stream's teacher 'nobody' is not the configured teacher"),
    ("data.answer_source=llama", "data.answer_source: expected 'gold' or the teacher 'careful'"),
])
def test_step_by_step_checks_its_one_teacher(tmp_path, capsys, override, message):
    teacher = {"name": "careful", "backend": "demo", "model": "careful", "template": "few_shot_cot"}
    cfg = write_recipe(tmp_path / "r.yaml", tmp_path / "run", method="step_by_step",
                       rationales={**TINY_RECIPE["rationales"], "teachers": [teacher]},
                       data={**TINY_RECIPE["data"], "streams": [{"name": "answer", "prefix": "predict: ", "weight": 0.5},
                                                                {"name": "careful", "prefix": "explain: ", "weight": 0.5,
                                                                 "teacher": "careful"}]})
    assert main(["recipe", str(cfg), override]) == 2
    assert message in capsys.readouterr().err
