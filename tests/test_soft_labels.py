"""Stored top-k soft labels (`tinyllm logits`, data/soft_labels.py): each example's labels are
its teacher's top k, whatever rows it was packed in; a run killed with SIGKILL finishes only
the shards it lacks, and its shards equal an uninterrupted run's byte for byte; a store made
for other data or settings is refused; training on labels stored at k = the vocabulary gives
the online teacher's losses, chunked or not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import make_hf_t5
from test_train_run import TINY, tok_dir  # noqa: F401 (tok_dir: fixture)
from tinyllm_jax.cli import main
from tinyllm_jax.config import ConfigError, load_config
from tinyllm_jax.data import soft_labels as store
from tinyllm_jax.errors import UserError

TEACHER = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok_dir):
    return make_hf_t5(tmp_path_factory.mktemp("teacher"), tok_dir, seed=4, **TEACHER)


def _config(path: Path, run_dir: Path, tok_dir: Path, teachers: list, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(run_dir)
    cfg["model"]["tokenizer"] = str(tok_dir)
    cfg["model"]["dropout_rate"] = 0.0
    cfg["distill"] = {"teachers": teachers, "logits_shard_examples": 64}
    cfg["train"]["steps"] = 3
    cfg["checkpoint"]["every_steps"] = 100
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _loaded(cfg_path: Path, *overrides: str):
    """The config as a run resolves it (the demo's data files), and its training examples."""
    from tinyllm_jax.data.streams import examples_for_split
    from tinyllm_jax.model.tokenizer import load_tokenizer
    from tinyllm_jax.train.student import prepare_demo_data

    cfg = load_config(cfg_path, list(overrides))
    cfg = prepare_demo_data(cfg, Path(cfg.run_dir), write=False)
    tok = load_tokenizer(cfg.model.tokenizer)
    return cfg, tok, examples_for_split(cfg.data, "train", tok)


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.safetensors"))}


def test_each_example_holds_its_teachers_top_k_and_the_report_counts_bytes(tmp_path, tok_dir, teacher_dir, capsys):
    from tinyllm_jax.model.hf import load_pretrained
    from tinyllm_jax.model.t5 import T5
    from tinyllm_jax.train import loss as loss_lib

    out = tmp_path / "top8"
    cfg = _config(tmp_path / "c.yaml", tmp_path / "run", tok_dir,
                  [{"name": "big", "model": str(teacher_dir), "logits": str(out), "top_k": 8, "temperature": 1.5}])
    assert main(["logits", str(cfg)]) == 0
    report = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["top_k"] == 8 and index["settings"]["ids_dtype"] == "uint16"
    assert index["array_bytes_per_token"] == 8 * (2 + 4) + 4
    assert index["bytes_per_token"] == pytest.approx(index["bytes"] / index["tokens"])
    assert f"{index['examples']} examples, {index['tokens']} target tokens, top 8; {len(index['shards'])} shards" in report
    assert f"= {index['bytes_per_token']:.0f} bytes a token" in report

    labels = store.SoftLabelStore.open(out)
    _, _, examples = _loaded(cfg)
    assert len(labels.where) == len(examples) == index["examples"]
    _, params, _, arch = load_pretrained(str(teacher_dir))
    teacher = T5(arch)
    keys = store.example_keys(examples, range(len(examples)))
    for i in [0, 7, len(examples) // 2, len(examples) - 1]:  # alone and unpacked, against the packed store
        enc, dec = examples.enc(i)[None], examples.dec(i)[None]
        logits = teacher.apply({"params": params}, jnp.asarray(enc), jnp.asarray(np.pad(dec[:, :-1], ((0, 0), (1, 0)))))
        ids, top, tail = (np.asarray(x[0]) for x in loss_lib.topk_soft_labels(logits, 8, 1.5))
        digest, first, n = labels.where[keys[i]]
        assert n == dec.shape[1] and digest == store.example_digests(examples, [i])[0]
        shard = int(np.searchsorted(labels.starts, first, side="right") - 1)
        rows = slice(first - labels.starts[shard], first - labels.starts[shard] + n)
        got = labels.arrays[shard]
        np.testing.assert_array_equal(got["ids"][rows], ids)
        np.testing.assert_allclose(got["log_probs"][rows], top, atol=1e-5)
        np.testing.assert_allclose(got["tail_log_prob"][rows], tail, atol=1e-5)


def test_sigkill_during_logits_then_rerun_finishes_only_the_missing_shards(tmp_path, tok_dir, teacher_dir):
    teachers = lambda d: [{"name": "big", "model": str(teacher_dir), "logits": str(d), "top_k": 16}]  # noqa: E731
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(["logits", str(_config(tmp_path / "ref.yaml", tmp_path / "run", tok_dir, teachers(ref))),
                 "distill.logits_shard_examples=4"]) == 0

    cfg = _config(tmp_path / "kill.yaml", tmp_path / "run", tok_dir, teachers(killed))
    args = [sys.executable, "-m", "tinyllm_jax.cli", "logits", str(cfg), "distill.logits_shard_examples=4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (killed / "shard-00005.safetensors").is_file():
        assert proc.poll() is None and time.time() < deadline, "the logits run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "index.json").is_file()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.glob("shard-*.safetensors")}
    n_ref = len(_shard_bytes(ref))
    assert 6 <= len(before) < n_ref, (len(before), n_ref)
    with pytest.raises(UserError, match=r"the logits run was started but did not finish"):
        store.SoftLabelStore.open(killed)

    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"({len(before)} already stored)" in out.stdout
    assert {p: (killed / p).stat().st_ino for p in before} == {p: v[0] for p, v in before.items()}  # none rewritten
    assert {p: (killed / p).stat().st_mtime_ns for p in before} == {p: v[1] for p, v in before.items()}
    assert _shard_bytes(killed) == _shard_bytes(ref)
    assert not list(killed.glob("*.tmp"))


def test_a_store_for_other_data_or_settings_is_refused(tmp_path, tok_dir, teacher_dir):
    from tinyllm_jax.model.t5 import T5Config
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import load_distillation

    out = tmp_path / "top8"
    teacher = {"name": "big", "model": str(teacher_dir), "logits": str(out), "top_k": 8, "streams": ["careful"]}
    cfg_path = _config(tmp_path / "c.yaml", tmp_path / "run", tok_dir, [teacher])
    assert main(["logits", str(cfg_path)]) == 0
    from tinyllm_jax.train.teacher_logits import logits_command

    with pytest.raises(UserError, match=rf"distill.teachers\[0\].logits={out}: holds soft labels of other settings "
                                        r"\(top_k\); remove it or give another directory"):
        logits_command(load_config(cfg_path, [f"distill.teachers={[{**teacher, 'top_k': 4}]}"]))

    arch = T5Config(vocab_size=128)
    mesh = sharding.make_mesh(load_config(cfg_path).mesh)

    def attach(*overrides):
        cfg, tok, examples = _loaded(cfg_path, *overrides)
        return load_distillation(cfg, arch, tok, mesh, examples)

    distillation, examples = attach()
    assert distillation.specs[0].stored and set(examples.target_arrays) == {
        "kd.big.ids", "kd.big.log_probs", "kd.big.tail_log_prob"}
    careful = examples.stream_names.index("careful")
    rows = examples.target_arrays["kd.big.log_probs"][np.arange(len(examples.dec_tokens))]
    on_careful = np.repeat(examples.stream_ids == careful, examples.dec_lengths)
    assert (rows[on_careful] < 0).all() and (rows[~on_careful] == 0).all()  # only its stream's tokens

    with pytest.raises(UserError, match=rf"the store holds soft labels of other tokens for \d+ of the \d+ training "
                                        r"examples it should cover \(the first: careful/demo-train-\d+/0\)"):
        attach("data.max_target_length=16")
    with pytest.raises(UserError, match=r"has no soft labels for \d+ of the \d+ training examples it should cover "
                                        r"\(the first: terse/"):
        attach("distill.teachers=[{name: big, logits: " + str(out) + ", streams: [terse]}]")
    with pytest.raises(ConfigError, match=r"distill.teachers\[0\].temperature=1.0: the soft labels in .* hold the "
                                          r"teacher's distribution at temperature 2.0"):
        attach("distill.teachers=[{name: big, logits: " + str(out) + ", streams: [careful], temperature: 1.0}]")
    with pytest.raises(UserError, match=r"no stored soft labels \(index.json missing: the logits run does not exist\); "
                                        r"run `tinyllm logits CONFIG` first"):
        attach("distill.teachers=[{name: big, logits: " + str(tmp_path / "nowhere") + "}]")


@pytest.mark.parametrize("chunk,accum", [(0, 1), (8, 1), (8, 2)])
def test_training_on_labels_stored_at_k_the_vocabulary_gives_the_online_losses(tmp_path, tok_dir, teacher_dir, chunk,
                                                                               accum):
    """k = 128 = the vocabulary: every step's loss and KD term equal the online teacher's
    (1e-5), with the whole sequence projected at once or 8 positions at a time, and with the
    stored labels split over 2 accumulated microbatches."""
    stored = tmp_path / "top128"
    online = {"name": "big", "model": str(teacher_dir), "temperature": 2.0, "divergence": "jsd", "weight": 0.5}
    chunking = {"optim": {"learning_rate": 1e-3, "warmup_steps": 2, "loss_chunk_length": chunk,
                          "grad_accum_steps": accum}}
    assert main(["logits", str(_config(tmp_path / "s.yaml", tmp_path / "s", tok_dir,
                                       [{**online, "logits": str(stored), "top_k": 128}], **chunking))]) == 0
    assert main(["train", str(_config(tmp_path / "s.yaml", tmp_path / "s", tok_dir,
                                      [{**online, "model": None, "logits": str(stored)}], **chunking))]) == 0
    assert main(["train", str(_config(tmp_path / "o.yaml", tmp_path / "o", tok_dir, [online]))]) == 0
    got, want = ([r for r in _rows(tmp_path / d) if "loss" in r] for d in ("s", "o"))
    assert len(got) == len(want) == 3 and all(r["loss/kd"] > 0.01 for r in want)
    for key in ("loss", "loss/kd", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, err_msg=key)
