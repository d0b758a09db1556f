"""Whole KD training runs in subprocesses (the helpers of test_train_run.py): 8 simulated
devices give the losses of 1 (one online teacher; an online and a stored teacher, chunked,
their stored labels the same from 8 devices as from 1), and a run killed with SIGKILL and
rerun ends with bitwise the parameters of an uninterrupted one, with a teacher read from one
of our run directories, or from stored soft labels."""

from __future__ import annotations

import json

import jax
import numpy as np

from conftest import make_hf_t5
from test_train_run import (final_params, finish, run_train, sigkill_after_first_checkpoint,  # noqa: F401 (tok_dir: fixture)
                            tok_dir, write_config)

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
    assert f"distill: teacher teacher: {teacher_dir} (step 4)" in out
    cfg = write_config(tmp_path / "kill.yaml", kill_dir, tok_dir, distill=distill)
    said = sigkill_after_first_checkpoint(run_train(cfg), kill_dir)
    assert said in finish(run_train(cfg))

    a, b = final_params(ref_dir, 12), final_params(kill_dir, 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    ref_rows = [r for r in _rows(ref_dir) if "loss" in r]
    assert [r["loss/kd"] for r in ref_rows] == [r["loss/kd"] for r in _rows(kill_dir) if "loss" in r]
    assert all(r["loss/kd"] > 0 for r in ref_rows)


def _run_logits(config, *overrides, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "tinyllm_jax.cli", "logits", str(config), *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_teachers_online_and_stored_on_eight_devices_give_the_losses_of_one(tmp_path, tok_dir):
    """An online teacher and another's stored top-16, chunked losses: 8 simulated devices
    (data x fsdp x tensor = 2 x 2 x 2) train as 1 does; and the soft labels stored on 8
    devices are those stored on 1."""
    from tinyllm_jax.data.soft_labels import SoftLabelStore

    online = make_hf_t5(tmp_path / "online", tok_dir, seed=4, vocab_size=128, feed_forward_proj="gated-gelu",
                        **{k: v for k, v in TEACHER_ARCH.items() if k != "num_decoder_layers"})
    stored = make_hf_t5(tmp_path / "stored", tok_dir, seed=6, vocab_size=128, d_model=48, d_kv=12, d_ff=96,
                        num_layers=2, num_heads=4)
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    mesh8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    stores = {}
    for name, env, overrides in [("one", {}, []), ("eight", eight, mesh8)]:
        stores[name] = tmp_path / f"top16-{name}"
        teachers = [{"name": "wide", "model": str(stored), "logits": str(stores[name]), "top_k": 16,
                     "temperature": 1.0, "divergence": "reverse_kl", "weight": 0.2, "streams": ["terse"]}]
        cfg = write_config(tmp_path / f"logits-{name}.yaml", tmp_path / f"lrun-{name}", tok_dir,
                           distill={"teachers": teachers, "logits_shard_examples": 100})
        finish(_run_logits(cfg, *overrides, env_extra=env))
    a, b = (SoftLabelStore.open(stores[n]) for n in ("one", "eight"))
    assert a.where == b.where
    for x, y in zip(a.arrays, b.arrays):
        np.testing.assert_array_equal(x["ids"], y["ids"])
        np.testing.assert_allclose(x["log_probs"], y["log_probs"], atol=1e-5)

    rows = {}
    for name, env, overrides in [("one", {}, []), ("eight", eight, mesh8)]:
        run_dir = tmp_path / name
        teachers = [{"name": "big", "model": str(online), "weight": 0.3, "temperature": 2.0, "divergence": "jsd",
                     "streams": ["careful", "terse"]},
                    {"name": "wide", "logits": str(stores["one"]), "temperature": 1.0, "divergence": "reverse_kl",
                     "weight": 0.2, "streams": ["terse"]}]
        cfg = write_config(tmp_path / f"{name}.yaml", run_dir, tok_dir, train={"steps": 5},
                           model={"dropout_rate": 0.0}, checkpoint={"every_steps": 100},
                           optim={"learning_rate": 1e-3, "warmup_steps": 2, "loss_chunk_length": 8},
                           distill={"teachers": teachers})
        finish(run_train(cfg, *overrides, env_extra=env))
        rows[name] = [r for r in _rows(run_dir) if "loss" in r]
    assert len(rows["one"]) == 5 and all(r["loss/kd/big"] > 0 and r["loss/kd/wide"] > 0 for r in rows["one"])
    for key in ("loss", "loss/kd/big", "loss/kd/wide", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows["eight"]], [r[key] for r in rows["one"]], rtol=1e-4, err_msg=key)


def test_sigkill_during_training_on_stored_labels_then_rerun_gives_bitwise_identical_parameters(tmp_path, tok_dir):
    teacher = make_hf_t5(tmp_path / "teacher", tok_dir, seed=4, vocab_size=128, feed_forward_proj="gated-gelu",
                         **{k: v for k, v in TEACHER_ARCH.items() if k != "num_decoder_layers"})
    logits = tmp_path / "top8"
    distill = {"teachers": [{"name": "big", "model": str(teacher), "logits": str(logits), "top_k": 8}]}
    finish(_run_logits(write_config(tmp_path / "logits.yaml", tmp_path / "lrun", tok_dir, distill=distill)))
    distill = {"teachers": [{"name": "big", "logits": str(logits)}]}  # no model: only the stored labels

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    out = finish(run_train(write_config(tmp_path / "ref.yaml", ref_dir, tok_dir, distill=distill)))
    assert f"soft labels stored in {logits}" in out
    cfg = write_config(tmp_path / "kill.yaml", kill_dir, tok_dir, distill=distill)
    said = sigkill_after_first_checkpoint(run_train(cfg), kill_dir)
    assert said in finish(run_train(cfg))

    a, b = final_params(ref_dir, 12), final_params(kill_dir, 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    ref_rows = [r for r in _rows(ref_dir) if "loss" in r]
    assert [r["loss/kd"] for r in ref_rows] == [r["loss/kd"] for r in _rows(kill_dir) if "loss" in r]
    assert all(r["loss/kd"] > 0 for r in ref_rows)
