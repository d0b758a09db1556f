"""The KD term of the packed train step and its gradient against a PyTorch reference: a
larger transformers T5 teacher and a T5 student run on padded batches of the KD stream's
examples, the divergence taken over the real target tokens (labels != -100) only; and two
teachers at once, each with its streams, weight, temperature and divergence, chunked or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_t5
from tinyllm_jax.config import DistillConfig, StreamConfig
from tinyllm_jax.data.packing import PackedIterator
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import build_examples
from tinyllm_jax.model.hf import load_pretrained, params_to_hf
from tinyllm_jax.train import loss as loss_lib
from tinyllm_jax.train.distill import kd_spec
from tinyllm_jax.train.loop import make_loss_fn

STREAMS = [
    StreamConfig(name="answer", prefix="predict: ", weight=1.0),
    StreamConfig(name="chain", prefix="explain: ", weight=0.7, teacher="t", target="{rationale} --> {answer}"),
]


def _records():
    return [
        make_record("q1", "which gas do plants take in?", "carbon dioxide", ["oxygen", "carbon dioxide"],
                    rationales={"t": ["Let's think step by step. Plants use sunlight to make food from carbon "
                                      "dioxide, so they take it in.", "plants breathe carbon dioxide"]}),
        make_record("q2", "what is two plus three?", "five", [], rationales={"t": ["two plus three is five"]}),
        make_record("q3", "a rock is heavier than a feather because", "it has more mass",
                    ["it is red", "it has more mass"], rationales={"t": ["mass"]}),
        make_record("q4", "what is 12 times 3?", "36", []),  # no chain: answer stream only
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_tokenizer_dir):
    from transformers import T5ForConditionalGeneration

    s_dir = make_hf_t5(tmp_path_factory.mktemp("kd_student"), spm_tokenizer_dir, seed=3, vocab_size=100,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    # larger, and the other T5 layout (v1.0: ReLU, tied embeddings): the same vocabulary is all KD needs
    t_dir = make_hf_t5(tmp_path_factory.mktemp("kd_teacher"), spm_tokenizer_dir, seed=5, vocab_size=100,
                       d_model=48, d_kv=12, d_ff=96, num_layers=3, num_heads=4)
    _, s_params, tok, s_cfg = load_pretrained(str(s_dir))
    _, t_params, _, t_cfg = load_pretrained(str(t_dir))
    assert t_cfg.scale_decoder_outputs and not t_cfg.is_gated and s_cfg.is_gated
    examples = build_examples(_records(), STREAMS, tok, 160, 64)
    it = PackedIterator(examples, 4, 320, 128, seed=0, num_epochs=1, process_index=0, process_count=1)
    batch = next(it)
    assert sum(len(set(r[r > 0].tolist())) for r in batch["decoder_segment_ids"]) == len(examples)  # all here
    assert (batch["decoder_segment_ids"].max(axis=1) > 1).any()  # and rows are really packed
    # a second teacher: the student's layout, wider, with 28 padding rows beyond the tokenizer's 100
    u_dir = make_hf_t5(tmp_path_factory.mktemp("kd_teacher2"), spm_tokenizer_dir, seed=9, vocab_size=128,
                       d_model=40, d_kv=10, d_ff=80, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False)
    _, u_params, _, u_cfg = load_pretrained(str(u_dir))
    student = T5ForConditionalGeneration.from_pretrained(s_dir).train()  # dropout_rate is 0
    teacher = T5ForConditionalGeneration.from_pretrained(t_dir).eval()
    teacher2 = T5ForConditionalGeneration.from_pretrained(u_dir).eval()
    return dict(s_cfg=s_cfg, s_params=s_params, t_cfg=t_cfg, t_params=t_params, u_cfg=u_cfg, u_params=u_params,
                examples=examples, batch={k: jnp.asarray(v) for k, v in batch.items()}, student=student,
                teacher=teacher, teacher2=teacher2)


def _padded(examples, stream: int):
    idx = [i for i in range(len(examples)) if examples.stream_ids[i] == stream]
    enc = [examples.enc(i) for i in idx]
    dec = [examples.dec(i) for i in idx]
    ids = torch.zeros((len(idx), max(map(len, enc))), dtype=torch.long)
    labels = torch.full((len(idx), max(map(len, dec))), -100, dtype=torch.long)
    for r, (e, d) in enumerate(zip(enc, dec)):
        ids[r, :len(e)] = torch.tensor(e)
        labels[r, :len(d)] = torch.tensor(d)
    return ids, labels


def _torch_divergence(s_logits, t_logits, divergence, T, beta):
    """Per-token divergences [N] from their definitions, written independently of ours."""
    log_s, log_t = F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1)
    if divergence == "forward_kl":  # what Mentor-KD's KLDivLoss(log p_s, p_t) computes per token
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    m = beta * log_t.exp() + (1 - beta) * log_s.exp()
    return (beta * (log_t.exp() * (log_t - m.log())).sum(-1)
            + (1 - beta) * (log_s.exp() * (log_s - m.log())).sum(-1))


def _torch_reference(setup, divergence, T, beta, scale, ce_weight=0.0, kd_weight=1.0, kd_streams=(1,)):
    """ce_weight * CE(chain stream) + kd_weight * scale * KD, KD the token mean over the
    `kd_streams`' real target tokens, each stream one padded batch; and its gradients."""
    student, teacher = setup["student"], setup["teacher"]
    student.zero_grad()
    divs, ce = [], None
    for stream in sorted({1, *kd_streams}):
        ids, labels = _padded(setup["examples"], stream)
        out = student(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
        if stream == 1:
            ce = out.loss
        if stream in kd_streams:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
            mask = labels != -100  # the real targets: the fix of the reference's `labels != 0`
            divs.append(_torch_divergence(out.logits[mask], t_logits[mask], divergence, T, beta))
    kd = torch.cat(divs).mean()
    total = ce_weight * ce + kd_weight * scale * kd
    total.backward()
    grads = {k: p.grad.numpy() for k, p in student.named_parameters() if p.grad is not None}
    return float(total.detach()), float(kd.detach()), grads


def _ours(setup, distill: DistillConfig, weights):
    names = [s.name for s in STREAMS]
    spec = kd_spec(distill, setup["t_cfg"], names)
    batch = setup["batch"]
    counts = loss_lib.stream_token_counts(batch, len(names))
    loss_fn = make_loss_fn(setup["s_cfg"], jnp.asarray(weights, jnp.float32), 0.0, 0.0, spec)
    (total, (_, (kd_sums,))), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        setup["s_params"], batch, counts, jax.random.key(0), setup["t_params"])
    kd = loss_lib.kd_mean(kd_sums, counts, spec.streams_S())
    return float(total), float(kd), params_to_hf(jax.tree.map(np.asarray, grads), setup["s_cfg"])


def _assert_grads_close(got, want):
    assert set(got) <= set(want)
    for name, g in got.items():
        np.testing.assert_allclose(g, want[name], atol=1e-4, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("scale_by_t2", [False, True])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_packed_kd_term_and_gradient_match_padded_pytorch(setup, divergence, beta, scale_by_t2):
    T = 2.0
    distill = DistillConfig(teacher="x", weight=1.0, temperature=T, divergence=divergence, jsd_beta=beta,
                            scale_by_t2=scale_by_t2, streams=["chain"])
    total, kd, grads = _ours(setup, distill, [0.0, 0.0])  # the KD term alone
    scale = T * T if scale_by_t2 else 1.0
    want_total, want_kd, want_grads = _torch_reference(setup, divergence, T, beta, scale)
    assert kd > 1e-3  # random teacher and student disagree: the term is not trivially 0
    assert abs(kd - want_kd) <= 1e-4 * max(1.0, want_kd), (kd, want_kd)
    assert abs(total - want_total) <= 1e-4 * max(1.0, want_total), (total, want_total)
    _assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kd_over_every_stream_matches_pytorch_over_both_streams_real_tokens(setup, divergence):
    """`distill.streams` empty: all streams, one token mean over the targets of both (padding
    in the packed rows and in the padded batches alike left out)."""
    distill = DistillConfig(teacher="x", weight=1.0, temperature=1.5, divergence=divergence)
    total, kd, grads = _ours(setup, distill, [0.0, 0.0])
    want_total, want_kd, want_grads = _torch_reference(setup, divergence, 1.5, 0.5, 1.0, kd_streams=(0, 1))
    assert kd > 1e-3  # random teacher and student disagree: the term is not trivially 0
    assert abs(kd - want_kd) <= 1e-4 * max(1.0, want_kd), (kd, want_kd)
    assert abs(total - want_total) <= 1e-4 * max(1.0, want_total), (total, want_total)
    _assert_grads_close(grads, want_grads)


def test_stream_weight_and_distill_weight_give_mentor_kds_loss(setup):
    """Stream weight 1 - lambda and distill.weight lambda: (1 - lambda) * CE + lambda * KL, the
    reference's loss with the mask on real tokens. Only the chain stream trains here."""
    lam, T = 0.3, 2.0
    distill = DistillConfig(teacher="x", weight=lam, temperature=T, streams=["chain"])
    total, _, grads = _ours(setup, distill, [0.0, 1.0 - lam])
    want_total, _, want_grads = _torch_reference(setup, "forward_kl", T, 0.5, 1.0, ce_weight=1.0 - lam, kd_weight=lam)
    assert abs(total - want_total) <= 1e-4 * max(1.0, want_total), (total, want_total)
    _assert_grads_close(grads, want_grads)


def test_kd_covers_only_the_named_streams_target_tokens(setup):
    """KD over every stream is a token mean over both streams' targets; over one stream, that
    stream's alone: the per-stream sums agree, and padding adds nothing."""
    names = [s.name for s in STREAMS]
    batch = setup["batch"]
    counts = loss_lib.stream_token_counts(batch, 2)
    both = kd_spec(DistillConfig(teacher="x", weight=1.0, temperature=1.0), setup["t_cfg"], names)
    assert both.streams == (1.0, 1.0)
    loss_fn = make_loss_fn(setup["s_cfg"], jnp.zeros(2), 0.0, 0.0, both)
    total, (_, (kd_sums,)) = loss_fn(setup["s_params"], batch, counts, jax.random.key(0), setup["t_params"])
    np.testing.assert_allclose(float(total), float(kd_sums.sum() / counts.sum()), rtol=1e-6)
    for s, spec in enumerate([(1.0, 0.0), (0.0, 1.0)]):
        np.testing.assert_allclose(float(loss_lib.kd_mean(kd_sums, counts, jnp.asarray(spec))),
                                   float(kd_sums[s] / counts[s]), rtol=1e-6)


@pytest.mark.parametrize("chunk", [0, 5])
def test_two_teachers_fused_loss_and_gradient_match_pytorch(setup, chunk):
    """CE 1.0 * answer + 0.7 * chain, plus 0.3 * KL(t1 || s) at T = 2 over the chain stream's
    tokens, plus 0.5 * JSD(0.3) at T = 1 of the second teacher (128 rows, the tokenizer's 100
    compared) over both streams' tokens: one fused loss, one backward pass."""
    from tinyllm_jax.config import KDTeacherConfig
    from tinyllm_jax.train.objective import make_loss_fn as make_objective

    names = [s.name for s in STREAMS]
    first = KDTeacherConfig(name="big", model="x", weight=0.3, temperature=2.0, streams=["chain"])
    second = KDTeacherConfig(name="wide", model="y", weight=0.5, temperature=1.0, divergence="jsd", jsd_beta=0.3)
    specs = [kd_spec(first, setup["t_cfg"], names), kd_spec(second, setup["u_cfg"], names, vocab=100)]
    batch = setup["batch"]
    counts = loss_lib.stream_token_counts(batch, 2)
    loss_fn = make_objective(setup["s_cfg"], jnp.asarray([1.0, 0.7]), 0.0, 0.0, specs, chunk)
    (total, (_, kd_sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        setup["s_params"], batch, counts, jax.random.key(0), setup["t_params"], setup["u_params"])
    grads = params_to_hf(jax.tree.map(np.asarray, grads), setup["s_cfg"])

    student = setup["student"]
    student.zero_grad()
    ce, divs1, divs2 = 0.0, [], []
    for stream, w in enumerate([1.0, 0.7]):
        ids, labels = _padded(setup["examples"], stream)
        out = student(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
        ce = ce + w * out.loss
        mask = labels != -100
        with torch.no_grad():
            t1 = setup["teacher"](input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
            t2 = setup["teacher2"](input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits[..., :100]
        if stream == 1:
            divs1.append(_torch_divergence(out.logits[mask], t1[mask], "forward_kl", 2.0, 0.5))
        divs2.append(_torch_divergence(out.logits[mask], t2[mask], "jsd", 1.0, 0.3))
    want = ce + 0.3 * torch.cat(divs1).mean() + 0.5 * torch.cat(divs2).mean()
    want.backward()
    assert float(kd_sums[0].sum()) > 1e-3 and float(kd_sums[1].sum()) > 1e-3
    assert abs(float(total) - float(want.detach())) <= 1e-4 * max(1.0, float(want.detach())), (float(total), float(want.detach()))
    _assert_grads_close(grads, {k: p.grad.numpy() for k, p in student.named_parameters() if p.grad is not None})
