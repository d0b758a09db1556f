"""Whole KD training runs in subprocesses (the helpers of test_train_run.py): 8 simulated
devices give the losses of 1, and a run killed with SIGKILL and rerun ends with bitwise the
parameters of an uninterrupted one, with a teacher read from one of our run directories."""

from __future__ import annotations

import json
import random
import signal
import time

import jax
import numpy as np

from conftest import make_hf_t5
from test_train_run import final_params, finish, run_train, tok_dir, write_config  # noqa: F401 (tok_dir: fixture)

TEACHER_ARCH = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_kd_on_eight_devices_gives_the_losses_of_one(tmp_path, tok_dir):
    teacher = make_hf_t5(tmp_path / "teacher", tok_dir, seed=4, vocab_size=128, feed_forward_proj="gated-gelu",
                         **{k: v for k, v in TEACHER_ARCH.items() if k != "num_decoder_layers"})
    rows = {}
    for name, env, overrides in [
        ("one", {}, []),
        ("eight", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
         ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    ]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", run_dir, tok_dir, train={"steps": 5},
                           model={"dropout_rate": 0.0}, checkpoint={"every_steps": 100},
                           distill={"teacher": str(teacher), "weight": 0.3, "temperature": 2.0,
                                    "divergence": "jsd", "streams": ["careful", "terse"]})
        finish(run_train(cfg, *overrides, env_extra=env))
        rows[name] = [r for r in _rows(run_dir) if "loss" in r]
    assert len(rows["one"]) == 5 and all(r["loss/kd"] > 0 for r in rows["one"])
    for key in ("loss", "loss/kd", "loss/answer"):
        np.testing.assert_allclose([r[key] for r in rows["eight"]], [r[key] for r in rows["one"]], rtol=1e-4, err_msg=key)


def test_sigkill_during_kd_training_then_rerun_gives_bitwise_identical_parameters(tmp_path, tok_dir):
    teacher_dir = tmp_path / "teacher-run"  # one of our runs: its selected checkpoint is the teacher
    finish(run_train(write_config(tmp_path / "teacher.yaml", teacher_dir, tok_dir, model=TEACHER_ARCH,
                                  train={"steps": 4}, checkpoint={"every_steps": 4})))
    distill = {"teacher": str(teacher_dir), "weight": 0.3, "temperature": 2.0}

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    out = finish(run_train(write_config(tmp_path / "ref.yaml", ref_dir, tok_dir, distill=distill)))
    assert f"distill: teacher {teacher_dir} (step 4)" in out
    cfg = write_config(tmp_path / "kill.yaml", kill_dir, tok_dir, distill=distill)
    proc = run_train(cfg)
    deadline = time.time() + 300
    while not (kill_dir / "checkpoints" / "3").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = finish(run_train(cfg))
    assert "resumed from step" in out

    a, b = final_params(ref_dir, 12), final_params(kill_dir, 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    ref_rows = [r for r in _rows(ref_dir) if "loss" in r]
    assert [r["loss/kd"] for r in ref_rows] == [r["loss/kd"] for r in _rows(kill_dir) if "loss" in r]
    assert all(r["loss/kd"] > 0 for r in ref_rows)
