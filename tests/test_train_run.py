"""Whole training runs in subprocesses: exact resume after SIGKILL, SIGTERM preemption,
NaN stop, 1 vs 8 simulated devices, config errors, eval and export of a run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinyllm_jax.cli import main

TINY = {
    "demo": {"seed": 0, "n_train": 160, "n_valid": 16, "n_test": 16},
    "model": {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
              "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
              "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1},
    "data": {"streams": [{"name": "answer", "prefix": "predict: ", "weight": 1.0},
                         {"name": "careful", "prefix": "explain: ", "weight": 0.5, "teacher": "careful"},
                         {"name": "terse", "prefix": "rationale: ", "weight": 0.5, "teacher": "terse"}],
             "max_input_length": 96, "max_target_length": 64, "encoder_length": 128, "decoder_length": 40},
    "train": {"steps": 12, "batch_size": 8, "log_every": 1, "progress": False},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
    "eval": {"every_steps": 0, "max_new_tokens": 4, "batch_size": 8},
    "checkpoint": {"every_steps": 3, "keep": 2, "async_save": True},
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """One tokenizer for all runs, so that separate runs see identical token ids."""
    from tinyllm_jax.data.demo import demo_texts, make_demo_records
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("demo_tok")
    train_sentencepiece(demo_texts(make_demo_records(200, 0, "train"), extra=["predict: ", "explain: ", "rationale: "]),
                        out, vocab_size=128, model_type="bpe")
    return out


def write_config(path: Path, run_dir: Path, tok_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(run_dir)
    cfg["model"]["tokenizer"] = str(tok_dir)
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, *overrides: str, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "tinyllm_jax.cli", "train", str(config), *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def sigkill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int = 3, max_delay: float = 1.5) -> str:
    """SIGKILLs `proc` at a random moment (maybe mid-step, maybe mid-save) after checkpoint
    `step` exists; returns what its rerun must say: "resumed from step", or "already
    finished" where the short run ended within the delay (a fast, idle machine)."""
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, max_delay))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "already finished" if (run_dir / "summary.json").is_file() else "resumed from step"


def final_params(run_dir: Path, step: int):
    from tinyllm_jax.config import CheckpointConfig
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(), read_only=True)
    params = ckpt.restore_params(step)
    ckpt.close()
    return params


def test_sigkill_then_resume_gives_bitwise_identical_parameters(tmp_path, tok_dir):
    import jax

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    finish(run_train(write_config(tmp_path / "ref.yaml", ref_dir, tok_dir)))

    cfg = write_config(tmp_path / "kill.yaml", kill_dir, tok_dir)
    said = sigkill_after_first_checkpoint(run_train(cfg), kill_dir)
    killed_at = [json.loads(l)["step"] for l in (kill_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    out = finish(run_train(cfg))
    assert said in out

    a, b = final_params(ref_dir, 12), final_params(kill_dir, 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    steps = [json.loads(l)["step"] for l in (kill_dir / "metrics.jsonl").read_text().splitlines()
             if l.strip() and "loss" in json.loads(l)]
    assert steps == sorted(set(steps)) and steps[-1] == 12, (killed_at, steps)  # no duplicated log lines
    def train_losses(d):
        rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
        return [r["loss"] for r in rows if "loss" in r]

    assert train_losses(ref_dir) == train_losses(kill_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_and_exit_non_zero_naming_the_step_to_resume_from(tmp_path, tok_dir, sig):
    run_dir = tmp_path / "pre"
    cfg = write_config(tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 100000},
                       checkpoint={"every_steps": 1000})
    proc = run_train(cfg)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, out[-2000:]  # `train && export` does not export a partial run
    name = signal.Signals(sig).name
    step = int(out.split(f"{name}: saved step ")[1].split(",")[0])
    assert f"rerun the same command to resume from step {step}" in out.strip().splitlines()[-1]
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [step] and step >= 1
    if sig == signal.SIGINT:  # the rerun resumes where the message said
        out = finish(run_train(cfg, f"train.steps={step + 2}"))
        assert f"resumed from step {step}" in out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tok_dir):
    run_dir = tmp_path / "nan"
    cfg = write_config(tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 40},
                       optim={"learning_rate": 1e30, "warmup_steps": 0, "clip_norm": None, "schedule": "constant"},
                       checkpoint={"every_steps": 1, "async_save": False})
    proc = run_train(cfg)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-2000:]
    assert "loss is nan at step" in out or "loss is inf at step" in out
    bad = int(out.split(" at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad


def test_one_and_eight_devices_give_the_same_losses(tmp_path, tok_dir):
    losses = {}
    for name, env, overrides in [
        ("one", {}, []),
        ("eight", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    ]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", run_dir, tok_dir, train={"steps": 5},
                           model={"dropout_rate": 0.0}, checkpoint={"every_steps": 100})
        finish(run_train(cfg, *overrides, env_extra=env))
        losses[name] = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(l)]
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)


def test_config_errors_name_the_key(tmp_path, tok_dir, capsys):
    from tinyllm_jax.config import ConfigError, load_config

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "r", tok_dir)
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rat'.*did you mean 'optim.learning_rate'"):
        load_config(cfg, ["optim.learning_rat=1e-3"])
    with pytest.raises(ConfigError, match=r"key 'train.steps': expected int, found 'many'"):
        load_config(cfg, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"key 'model.dtype': expected one of \['float32', 'bfloat16'\]"):
        load_config(cfg, ["model.dtype=fp8"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad_yaml}: unknown key 'train.stepz'; did you mean 'train.steps'"):
        load_config(bad_yaml)

    missing = write_config(tmp_path / "m.yaml", tmp_path / "r2", tok_dir)
    raw = yaml.safe_load(missing.read_text())
    del raw["demo"]
    raw["data"]["train"] = [str(tmp_path / "nope.jsonl")]
    missing.write_text(yaml.safe_dump(raw))
    assert main(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "not found" in err


def test_a_config_that_is_not_yaml_says_where_in_one_line(tmp_path):
    """A tab, an unclosed brace, a binary file, a folder: one line naming the file (and the line
    and column), never PyYAML's multi-line report."""
    from tinyllm_jax.config import ConfigError, load_config

    cases = {"tab.yaml": ("train:\n\tsteps: 3\n", r"line 2, column 1: found character '\\t' that cannot start any "
                                                   r"token \(YAML indents with spaces, not tabs\)$"),
             "brace.yaml": ("train: {steps: 3\n", r"line 2, column 1: expected ',' or '\}', but got '<stream end>'$")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert "\n" not in str(err.value) and re.search(f"^{re.escape(str(tmp_path / name))}: invalid YAML: {message}",
                                                         str(err.value)), str(err.value)
    (tmp_path / "binary.yaml").write_bytes(b"run_dir: x\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary.yaml: not UTF-8 text \(byte 11\); expected a YAML config file$"):
        load_config(tmp_path / "binary.yaml")
    with pytest.raises(ConfigError, match=r": is a folder; expected a YAML config file"):
        load_config(tmp_path)


def test_eval_command_matches_in_training_eval_and_export_loads(tmp_path, tok_dir):
    run_dir = tmp_path / "evalrun"
    cfg = write_config(tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 6},
                       eval={"every_steps": 6, "max_new_tokens": 4, "batch_size": 8},
                       checkpoint={"every_steps": 6})
    finish(run_train(cfg))
    in_training = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "eval_accuracy" in l][-1]
    proc = subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "eval", str(cfg), "--split", "validation"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["accuracy"] == in_training["eval_accuracy"] and summary["step"] == 6

    from transformers import T5ForConditionalGeneration

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    _, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_examples_longer_than_rows_train_in_long_batches(tmp_path, tok_dir):
    """Rows shorter than the longest example: those examples train in long batches (half the
    rows, twice as long), the run compiles both shapes and logs every step."""
    run_dir = tmp_path / "long"
    cfg = write_config(tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 30},
                       data={"decoder_length": 32}, checkpoint={"every_steps": 100})
    out = finish(run_train(cfg))
    # 41 of the 480 examples; 11 long batches an epoch, the first at step 5 (of ~45)
    assert "examples are longer than rows of (128, 32); they train in long batches of 4 rows of (256, 64)" in out
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31)) and all(np.isfinite(r["loss"]) for r in train)


def test_continue_optimizer_starts_from_the_init_runs_adam_state_with_this_runs_schedule(tmp_path, tok_dir):
    """train.continue_optimizer: Adam's moments and count go on from model.init's selected
    checkpoint; the schedule's count starts at 0 (optim.schedule_offset places the rate)."""
    from tinyllm_jax.config import CheckpointConfig
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    first, second = tmp_path / "first", tmp_path / "second"
    finish(run_train(write_config(tmp_path / "a.yaml", first, tok_dir, train={"steps": 6})))
    finish(run_train(write_config(tmp_path / "b.yaml", second, tok_dir, train={"steps": 3, "continue_optimizer": True},
                                  model={"init": str(first)})))

    def counts(run_dir, step):
        ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(), read_only=True)
        state, _ = ckpt.restore(step)
        ckpt.close()
        import jax

        return {jax.tree_util.keystr(path): int(leaf) for path, leaf in
                jax.tree_util.tree_flatten_with_path(state["opt_state"])[0] if "count" in jax.tree_util.keystr(path)}

    before, after = counts(first, 6), counts(second, 3)
    assert sorted(before.values()) == [6, 6] and sorted(after.values()) == [3, 9], (before, after)

    out = subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "train",
                          str(write_config(tmp_path / "c.yaml", tmp_path / "third", tok_dir,
                                           train={"steps": 3, "continue_optimizer": True}))],
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "train.continue_optimizer" in out.stderr + out.stdout, out.stderr[-2000:]
