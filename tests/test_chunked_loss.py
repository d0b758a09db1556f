"""The chunked vocabulary losses (train/loss.py: sequence_losses) against the whole-sequence
path: cross-entropy (label smoothing, z-loss) and every divergence, loss and gradients, on
packed and padded batches, tied and untied projections; stored top-k soft labels against
the online term; the padding rows of a vocabulary left out of every comparison; and the
compiled gradient's temporaries, which must no longer hold [B, L, V] logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tinyllm_jax.model.t5 import T5, T5Config, init_params
from tinyllm_jax.train import loss as loss_lib

VOCAB = 96  # the tokenizer's tokens; the models have more rows (padding, as Qwen's do)
STUDENT = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
TEACHER = T5Config(vocab_size=128, d_model=48, d_kv=12, d_ff=96, num_layers=3, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20)  # v1.0: tied, ReLU


def _batch(packed: bool, rows: int = 3, enc_len: int = 14, dec_len: int = 11, seed: int = 0):
    """Random tokens; packed rows hold two examples each, padded rows one, then padding."""
    r = np.random.default_rng(seed)
    b = {"encoder_input_tokens": r.integers(2, VOCAB, (rows, enc_len)),
         "decoder_target_tokens": r.integers(2, VOCAB, (rows, dec_len))}
    eseg, dseg = np.zeros((rows, enc_len), np.int32), np.zeros((rows, dec_len), np.int32)
    for i in range(rows):
        e, d = enc_len - i - 1, dec_len - i - 1
        if packed:
            eseg[i, :e // 2], eseg[i, e // 2:e] = 1, 2
            dseg[i, :d // 2], dseg[i, d // 2:d] = 1, 2
        else:
            eseg[i, :e], dseg[i, :d] = 1, 1
    b["encoder_input_tokens"] = np.where(eseg > 0, b["encoder_input_tokens"], 0)
    b["decoder_target_tokens"] = np.where(dseg > 0, b["decoder_target_tokens"], 0)
    starts = np.concatenate([np.ones((rows, 1), bool), dseg[:, 1:] != dseg[:, :-1]], axis=1)
    b["decoder_input_tokens"] = np.where(starts, 0, np.roll(b["decoder_target_tokens"], 1, axis=1))
    b["encoder_segment_ids"], b["decoder_segment_ids"] = eseg, dseg
    return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}


INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids", "decoder_segment_ids")


@pytest.fixture(scope="module")
def models():
    s = jax.device_get(nn.unbox(init_params(STUDENT, jax.random.key(0))))
    t = jax.device_get(nn.unbox(init_params(TEACHER, jax.random.key(1))))
    return s, t


def _losses(student_params, teacher_params, batch, *, chunk, ls=0.0, z=0.0, divergence="forward_kl",
            temperature=2.0, beta=0.5, vocab=None, stored=None):
    """Token-mean CE + token-mean divergence over the real targets, and its per-token parts.
    chunk None: today's path (whole logits from __call__); else sequence_losses."""
    student, teacher = T5(STUDENT), T5(TEACHER)
    mask = (batch["decoder_segment_ids"] > 0).astype(jnp.float32)
    inputs = [batch[k] for k in INPUTS]
    if chunk is None:
        logits = student.apply({"params": student_params}, *inputs)
        ce = loss_lib.token_losses(logits, batch["decoder_target_tokens"], ls, z)
        t_logits = teacher.apply({"params": teacher_params}, *inputs)
        div = loss_lib.token_divergences(logits, t_logits, divergence, temperature, beta, vocab)
    else:
        hidden = student.apply({"params": student_params}, *inputs, method=T5.hidden)
        project = functools.partial(student.apply, {"params": student_params}, method=T5.project)
        if stored is None:
            t_hidden = teacher.apply({"params": teacher_params}, *inputs, method=T5.hidden)
            t_project = functools.partial(teacher.apply, {"params": teacher_params}, method=T5.project)
            soft = loss_lib.SoftLabels(
                lambda s_logits, t_x: loss_lib.token_divergences(s_logits, t_project(t_x), divergence,
                                                                 temperature, beta, vocab), (t_hidden,))
        else:
            soft = loss_lib.SoftLabels(
                lambda s_logits, *top: loss_lib.topk_divergences(s_logits, *top, divergence, temperature, beta,
                                                                 vocab), stored)
        ce, (div,) = loss_lib.sequence_losses(project, hidden, batch["decoder_target_tokens"], ls, z, [soft], chunk)
    n = jnp.sum(mask)
    return jnp.sum(ce * mask) / n + jnp.sum(div * mask) / n, (ce * mask, div * mask)


def _value_and_grad(models, batch, **kw):
    s, t = models
    (total, parts), grads = jax.jit(jax.value_and_grad(
        lambda p: _losses(p, t, batch, **kw), has_aux=True))(s)
    return total, parts, grads


def _assert_close(got, want, tol=1e-5):
    (g_total, g_parts, g_grads), (w_total, w_parts, w_grads) = got, want
    np.testing.assert_allclose(g_total, w_total, rtol=tol, atol=tol)
    for g, w in zip(g_parts, w_parts):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(g_grads), jax.tree.leaves(w_grads)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def test_hidden_then_project_is_bitwise_the_forward_pass(models):
    s, _ = models
    batch = _batch(True)
    inputs = [batch[k] for k in INPUTS]
    for cfg, params in ((STUDENT, s), (TEACHER, models[1])):
        model = T5(cfg)
        whole = model.apply({"params": params}, *inputs)
        hidden = model.apply({"params": params}, *inputs, method=T5.hidden)
        np.testing.assert_array_equal(model.apply({"params": params}, hidden, method=T5.project), whole)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(models, packed, divergence, beta):
    batch = _batch(packed)
    kw = dict(ls=0.1, z=1e-3, divergence=divergence, beta=beta)
    want = _value_and_grad(models, batch, chunk=None, **kw)
    assert float(jnp.sum(want[1][1])) > 1e-3  # random models disagree: the divergence is not trivially 0
    for chunk in (1, 4, 11):  # 4 does not divide the 11 positions: the last chunk is padded
        _assert_close(_value_and_grad(models, batch, chunk=chunk, **kw), want)


def test_chunking_never_holds_the_whole_logits(models):
    """XLA's buffer assignment of the gradient: the whole-sequence function's temporaries hold
    [B, L, V] logits for the student and the teacher, their softmaxes and gradients; the
    chunked one's hold a chunk's, and what is left is the models' own activations."""
    big_s, big_t = STUDENT.replace(vocab_size=8192), TEACHER.replace(vocab_size=8192)
    s = nn.unbox(jax.eval_shape(lambda k: init_params(big_s, k), jax.random.key(0)))
    t = nn.unbox(jax.eval_shape(lambda k: init_params(big_t, k), jax.random.key(0)))
    batch = _batch(True, rows=8, enc_len=64, dec_len=64)
    temps = {}
    for chunk in (None, 4):
        def total(p, tp, b, chunk=chunk):
            student, teacher = T5(big_s), T5(big_t)
            inputs = [b[k] for k in INPUTS]
            if chunk is None:
                logits = student.apply({"params": p}, *inputs)
                div = loss_lib.token_divergences(logits, teacher.apply({"params": tp}, *inputs), "forward_kl", 2.0)
                ce = loss_lib.token_losses(logits, b["decoder_target_tokens"])
            else:
                t_hidden = teacher.apply({"params": tp}, *inputs, method=T5.hidden)
                soft = loss_lib.SoftLabels(lambda z, x: loss_lib.token_divergences(
                    z, teacher.apply({"params": tp}, x, method=T5.project), "forward_kl", 2.0), (t_hidden,))
                ce, (div,) = loss_lib.sequence_losses(
                    functools.partial(student.apply, {"params": p}, method=T5.project),
                    student.apply({"params": p}, *inputs, method=T5.hidden), b["decoder_target_tokens"],
                    soft_labels=[soft], chunk_length=chunk)
            return jnp.sum(ce) + jnp.sum(div)

        compiled = jax.jit(jax.grad(total)).lower(s, t, batch).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 8 * 64 * 8192 * 4
    assert temps[None] - temps[4] > 3 * logits_bytes, temps  # at least three [B, L, V] arrays fewer
    assert temps[4] < 0.25 * temps[None], temps


def test_padding_rows_of_the_vocabulary_are_left_out_of_the_divergence():
    """Teacher and student with more rows than the tokenizer's 96 tokens, and not the same
    number: the divergence is the one over the 96 tokens alone, whatever the extra rows hold."""
    r = np.random.default_rng(0)
    s = jnp.asarray(r.normal(size=(2, 5, 128)) * 3, jnp.float32)
    t = jnp.asarray(r.normal(size=(2, 5, 136)) * 3, jnp.float32)
    for divergence in loss_lib.DIVERGENCES:
        want = loss_lib.token_divergences(s[..., :VOCAB], t[..., :VOCAB], divergence, 2.0)
        got = loss_lib.token_divergences(s, t, divergence, 2.0, vocab=VOCAB)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        # the extra rows could hold anything: the comparison does not move
        s2, t2 = s.at[..., VOCAB:].set(50.0), t.at[..., VOCAB:].set(-7.0)
        np.testing.assert_allclose(loss_lib.token_divergences(s2, t2, divergence, 2.0, vocab=VOCAB), want,
                                   rtol=1e-6, atol=1e-6)
    ids, top, tail = loss_lib.topk_soft_labels(t, 8, 2.0, VOCAB)
    assert int(ids.max()) < VOCAB  # a padding row is never a soft label
    np.testing.assert_allclose(jnp.exp(jax.nn.logsumexp(jnp.concatenate([top, tail[..., None]], -1), -1)), 1.0,
                               rtol=1e-6)


@pytest.mark.parametrize("divergence", loss_lib.DIVERGENCES)
def test_stored_top_k_with_k_the_vocabulary_equals_the_online_term(models, divergence):
    """Soft labels stored at k = every token (tail 0) give the online loss and gradients,
    chunked as well; at k < V the divergence differs but stays finite and non-negative."""
    s, t = models
    batch = _batch(True)
    inputs = [batch[k] for k in INPUTS]
    teacher_logits = T5(TEACHER).apply({"params": t}, *inputs)
    want = _value_and_grad(models, batch, chunk=None, divergence=divergence, vocab=VOCAB)
    full = loss_lib.topk_soft_labels(teacher_logits, VOCAB, 2.0, VOCAB)
    assert bool(jnp.all(jnp.isneginf(full[2])))  # nothing left outside the top k
    for chunk in (11, 4):
        _assert_close(_value_and_grad(models, batch, chunk=chunk, divergence=divergence, vocab=VOCAB, stored=full),
                      want)
    _, (_, div8), _ = _value_and_grad(models, batch, chunk=4, divergence=divergence, vocab=VOCAB,
                                      stored=loss_lib.topk_soft_labels(teacher_logits, 8, 2.0, VOCAB))
    assert bool(jnp.all(jnp.isfinite(div8))) and float(div8.min()) >= -1e-6
    assert not np.allclose(div8, want[1][1], atol=1e-4)


def test_stored_forward_kl_is_the_k_plus_one_bucket_formula():
    """forward KL on top-k = sum_S p_t log(p_t / p_s) + tail_t log(tail_t / tail_s), written out."""
    r = np.random.default_rng(1)
    s = r.normal(size=(1, 3, 40)) * 2
    t = r.normal(size=(1, 3, 40)) * 2
    ids, top, tail = (np.asarray(x) for x in loss_lib.topk_soft_labels(jnp.asarray(t, jnp.float32), 5, 1.5))
    got = np.asarray(loss_lib.topk_divergences(jnp.asarray(s, jnp.float32), ids, top, tail, "forward_kl", 1.5))
    log_ps = s / 1.5 - np.log(np.exp(s / 1.5).sum(-1, keepdims=True))
    for i in range(3):
        S = ids[0, i]
        ps_top = np.exp(log_ps[0, i, S])
        pt_top, pt_tail = np.exp(top[0, i]), np.exp(tail[0, i])
        ps_tail = 1.0 - ps_top.sum()
        want = np.sum(pt_top * np.log(pt_top / ps_top)) + pt_tail * np.log(pt_tail / ps_tail)
        np.testing.assert_allclose(got[0, i], want, rtol=1e-5)


def test_stored_labels_of_padding_positions_give_finite_values():
    """Positions with no stored labels (padding, other streams) hold zeros: duplicate ids,
    log-probability 0, tail 0. They are masked out later, and must not be NaN (NaN * 0 is NaN)."""
    s = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 32)), jnp.float32)
    zeros = (jnp.zeros((2, 4, 6), jnp.int32), jnp.zeros((2, 4, 6)), jnp.zeros((2, 4)))
    for divergence in loss_lib.DIVERGENCES:
        value, grad = jax.value_and_grad(lambda z: jnp.sum(loss_lib.topk_divergences(z, *zeros, divergence)))(s)
        assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad))), divergence
