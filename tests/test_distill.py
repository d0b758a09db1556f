"""Distillation around the step: loading the teacher (vocabulary check, sharding, bf16), a
frozen teacher through training, KD under gradient accumulation, the `distill:` checks, the
rationale+answer target form and evaluation through a rationale stream."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_t5
from tinyllm_jax.config import (
    Config, ConfigError, DataConfig, DistillConfig, EvalConfig, MeshConfig, OptimConfig, StreamConfig, TrainConfig,
)
from tinyllm_jax.data.packing import PackedIterator
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import build_examples, stream_weights
from tinyllm_jax.errors import UserError
from tinyllm_jax.runtime import sharding
from tinyllm_jax.train.distill import check_distill, load_teacher

CHAIN = StreamConfig(name="chain", prefix="explain: ", weight=0.7, teacher="t", target="{rationale} --> {answer}")
STREAMS = [StreamConfig(name="answer", prefix="predict: ", weight=1.0), CHAIN]


def _records():
    return [
        make_record("q1", "which gas do plants take in?", "carbon dioxide", ["oxygen", "carbon dioxide"],
                    rationales={"t": ["plants use sunlight to make food", "plants breathe carbon dioxide"]}),
        make_record("q2", "what is two plus three?", "five", [], rationales={"t": ["two plus three is five"]}),
        make_record("q3", "a rock is heavier than a feather because", "it has more mass",
                    ["it is red", "it has more mass"], rationales={"t": ["mass"]}),
        make_record("q4", "what is 12 times 3?", "36", []),
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory, spm_tokenizer_dir):
    root = tmp_path_factory.mktemp("distill_models")
    student = make_hf_t5(root / "student", spm_tokenizer_dir, seed=1, vocab_size=100, feed_forward_proj="gated-gelu")
    teacher = make_hf_t5(root / "teacher", spm_tokenizer_dir, seed=2, vocab_size=100, d_model=48, d_kv=12,
                         d_ff=96, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu")
    return student, teacher


def _config(teacher, **distill) -> Config:
    return Config(data=DataConfig(streams=list(STREAMS), encoder_length=320, decoder_length=128),
                  mesh=MeshConfig(), optim=OptimConfig(learning_rate=1e-3, clip_norm=None),
                  train=TrainConfig(steps=10, batch_size=4, progress=False),
                  distill=DistillConfig(teacher=str(teacher) if teacher else None, **distill))


def _student(models):
    from tinyllm_jax.model.hf import load_pretrained

    _, params, tok, cfg = load_pretrained(str(models[0]))
    return cfg, params, tok


def _trainer(cfg, s_cfg, s_params, teacher):
    from tinyllm_jax.train.loop import Trainer

    mesh = sharding.make_mesh(cfg.mesh)
    return Trainer.create(cfg, s_cfg, mesh, [s.name for s in cfg.data.streams], stream_weights(cfg.data.streams),
                          s_params, teacher)


def _batches(tok, n, rows=4):
    examples = build_examples(_records(), STREAMS, tok, 160, 64)
    it = PackedIterator(examples, rows, 320, 128, seed=0, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- the teacher


def test_teacher_with_another_vocabulary_is_refused(models, tmp_path, spm_tokenizer_dir, spm_tokenizer):
    s_cfg, _, tok = _student(models)
    mesh = sharding.make_mesh(MeshConfig())
    bigger = make_hf_t5(tmp_path / "v120", spm_tokenizer_dir, vocab_size=120)
    with pytest.raises(UserError, match=rf"distill.teacher={bigger}: the teacher's vocabulary has 120 entries "
                                        r"but the student's has 100.*must share the student's tokenizer"):
        load_teacher(_config(bigger), s_cfg, tok, mesh)

    from tinyllm_jax.model.tokenizer import train_sentencepiece

    other_tok = tmp_path / "other_tok"
    train_sentencepiece(["zebra yak quokka walrus"] * 50 + ["the answer is 42"] * 50, other_tok, vocab_size=40)
    same_size = make_hf_t5(tmp_path / "other", other_tok, vocab_size=100)
    with pytest.raises(UserError, match=r"the teacher's tokenizer differs from the student's \(token id \d+ is"):
        load_teacher(_config(same_size), s_cfg, tok, mesh)


def test_teacher_is_sharded_by_the_students_rules_and_cast_to_bf16(models):
    s_cfg, _, tok = _student(models)
    cfg = _config(models[1], dtype="bfloat16")
    teacher = load_teacher(cfg, s_cfg, tok, sharding.make_mesh(cfg.mesh))
    assert teacher.arch.dtype == "bfloat16" and teacher.arch.d_model == 48
    leaves = jax.tree.leaves(teacher.params)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert jax.tree.structure(teacher.params) == jax.tree.structure(teacher.shardings)
    for x, sh in zip(leaves, jax.tree.leaves(teacher.shardings)):
        assert x.sharding == sh


def test_distill_config_errors_name_the_key():
    names = ["answer", "chain"]
    with pytest.raises(ConfigError, match=r"distill.streams\[1\]: no stream named 'chian'; data.streams: answer, chain"):
        check_distill(DistillConfig(teacher="x", streams=["chain", "chian"]), names)
    with pytest.raises(ConfigError, match=r"distill.jsd_beta: expected a number strictly between 0 and 1, found 1.0"):
        check_distill(DistillConfig(teacher="x", divergence="jsd", jsd_beta=1.0), names)
    with pytest.raises(ConfigError, match=r"distill.temperature: expected a positive number, found 0.0"):
        check_distill(DistillConfig(teacher="x", temperature=0.0), names)
    with pytest.raises(ConfigError, match=r"distill.weight: expected a number >= 0"):
        check_distill(DistillConfig(teacher="x", weight=-1.0), names)
    from tinyllm_jax.config import load_config

    with pytest.raises(ConfigError, match=r"key 'distill.divergence': expected one of \['forward_kl', 'reverse_kl', 'jsd'\]"):
        load_config(None, ["distill.divergence=kl"])


# --------------------------------------------------------------------------- the step


def test_teacher_stays_bitwise_frozen_and_has_no_optimizer_state(models):
    s_cfg, s_params, tok = _student(models)
    cfg = _config(models[1])
    teacher = load_teacher(cfg, s_cfg, tok, sharding.make_mesh(cfg.mesh))
    before = jax.tree.map(np.array, teacher.params)
    trainer = _trainer(cfg, s_cfg, s_params, teacher)
    plain = _trainer(dataclasses.replace(cfg, distill=DistillConfig()), s_cfg, s_params, None)
    assert len(jax.tree.leaves(trainer.state["opt_state"])) == len(jax.tree.leaves(plain.state["opt_state"]))
    start = jax.tree.map(np.array, trainer.state["params"])
    kd = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in _batches(tok, 3):
            trainer.state, metrics = trainer.step_fn(trainer.state, trainer.put(batch))
            kd.append(float(metrics["kd_loss"]))
    # only the state is donated: a donated teacher draws "Some donated buffers were not usable"
    assert not [w for w in caught if "donat" in str(w.message)], [str(w.message)[:80] for w in caught]
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.teacher.params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trainer.state["params"]))]
    assert all(moved)
    assert kd[-1] < kd[0]  # the student moves towards the teacher


def test_kd_under_gradient_accumulation_equals_one_batch(models):
    s_cfg, s_params, tok = _student(models)
    (batch,) = _batches(tok, 1)
    out = {}
    for accum in (1, 2):
        cfg = _config(models[1], divergence="jsd", scale_by_t2=True, streams=["chain"])
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=accum))
        teacher = load_teacher(cfg, s_cfg, tok, sharding.make_mesh(cfg.mesh))
        trainer = _trainer(cfg, s_cfg, s_params, teacher)
        trainer.state, m = trainer.step_fn(trainer.state, trainer.put(batch))
        out[accum] = (float(m["loss"]), float(m["kd_loss"]), float(m["grad_norm"]))
    np.testing.assert_allclose(out[2], out[1], rtol=1e-5)
    assert out[1][1] > 0


def test_bf16_teacher_gives_nearly_the_fp32_kd_term(models):
    s_cfg, s_params, tok = _student(models)
    (batch,) = _batches(tok, 1)
    kd = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _config(models[1], dtype=dtype)
        trainer = _trainer(cfg, s_cfg, s_params, load_teacher(cfg, s_cfg, tok, sharding.make_mesh(cfg.mesh)))
        _, m = trainer.step_fn(trainer.state, trainer.put(batch))
        kd[dtype] = float(m["kd_loss"])
    assert kd["float32"] > 0 and kd["bfloat16"] != kd["float32"]
    np.testing.assert_allclose(kd["bfloat16"], kd["float32"], rtol=3e-2)


# --------------------------------------------------------------------------- target form and evaluation


def test_rationale_then_answer_target_form(spm_tokenizer):
    recs = _records() + [make_record("q5", "what is one plus one?", "two", [],
                                     rationales={"t": ["a {answer} placeholder in the text stays"]})]
    ex = build_examples(recs, STREAMS, spm_tokenizer, 160, 64)
    eos = spm_tokenizer.eos_token_id
    chains = [i for i in range(len(ex)) if ex.stream_ids[i] == 1]
    want = [f"{x} --> {r['answer']}" for r in recs for x in r.get("rationales", {}).get("t", [])]
    assert [ex.dec(i).tolist() for i in chains] == [spm_tokenizer(w, add_special_tokens=False)["input_ids"] + [eos]
                                                    for w in want]
    assert want[-1] == "a {answer} placeholder in the text stays --> two"
    plain = build_examples(recs, [dataclasses.replace(CHAIN, target="{rationale}")], spm_tokenizer, 160, 64)
    assert spm_tokenizer.decode(plain.dec(0).tolist(), skip_special_tokens=True) == "plants use sunlight to make food"

    with pytest.raises(ConfigError, match=r"data.streams\[0\].target \('chain'\): expected a form of \{rationale\}.*"
                                          r"\(unknown field \{gold\}\)"):
        build_examples(recs, [dataclasses.replace(CHAIN, target="{rationale} --> {gold}")], spm_tokenizer, 160, 64)
    with pytest.raises(ConfigError, match=r"\(no \{rationale\}\)"):
        build_examples(recs, [dataclasses.replace(CHAIN, target="{answer}")], spm_tokenizer, 160, 64)
    with pytest.raises(ConfigError, match=r"data.streams\[0\].target \('answer'\): a target form applies to teacher"):
        build_examples(recs, [dataclasses.replace(STREAMS[0], target="{rationale} --> {answer}")], spm_tokenizer, 160, 64)


def test_evaluation_answers_through_the_rationale_stream(tmp_path, spm_tokenizer):
    from tinyllm_jax.eval import scoring
    from tinyllm_jax.eval.evaluate import Evaluation

    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    data = DataConfig(validation=[str(path)], streams=[CHAIN])  # no answer stream at all
    cfg = Config(data=data, eval=EvalConfig(stream="chain", task="text"))
    records, inputs = Evaluation(cfg, None, spm_tokenizer)._inputs("validation")
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]  # q4 has no chain: still evaluated
    texts = [spm_tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in inputs]
    assert all(t.startswith("explain:") for t in texts), texts
    with pytest.raises(ConfigError, match=r"eval.stream: no stream named 'answer'; data.streams: chain"):
        Evaluation(dataclasses.replace(cfg, eval=EvalConfig(stream="answer")), None, spm_tokenizer)._inputs("validation")
    with pytest.raises(ConfigError, match=r"evaluation needs an answer stream.*or eval.stream"):
        Evaluation(dataclasses.replace(cfg, eval=EvalConfig()), None, spm_tokenizer)._inputs("validation")

    # the answer after Mentor-KD's "-->" is the one scored, whatever the chain says before it
    assert scoring.is_correct("number", "3 + 4 = 7 apples, and 11 more: 18 --> 18", "18")
    assert not scoring.is_correct("number", "the answer is 18 wait --> 17", "18")
    assert scoring.extract("choice", "Alice has the ball (a) --> (b)", ["red", "blue"]) == "blue"
