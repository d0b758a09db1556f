"""Our Flax decoder against transformers' PyTorch Llama / Mistral / Qwen2 / Qwen3: same
weights, same logits (padded and packed rows), same gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decoder_fixtures import FIRST_PLAIN_TOKEN, PAD, VARIANTS, bpe_tokenizer, decoder_dir, load_hf  # noqa: F401
from tinyllm_jax.model.decoder import Decoder, causal_chunk, segment_positions
from tinyllm_jax.model.decoder_hf import load_pretrained, params_to_hf

TOL = 1e-4  # fp32 logits and gradients


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, decoder_dir):
    path = decoder_dir(request.param)
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    return request.param, load_hf(path), params, cfg


def _tokens(rng, n, vocab=120):
    return rng.integers(FIRST_PLAIN_TOKEN, vocab, n)


def _hf_logits(hf, ids_BxL, mask_BxL=None):
    with torch.no_grad():
        mask = None if mask_BxL is None else torch.tensor(mask_BxL).long()
        return hf(input_ids=torch.tensor(ids_BxL), attention_mask=mask).logits.numpy()


def test_padded_batch_matches_transformers(variant):
    """Right-padded rows, one of them past llama3's original context (64) so that every rotary
    frequency band is used; with and without segment ids; hidden then project is __call__."""
    name, hf, params, cfg = variant
    rng = np.random.default_rng(0)
    lengths = [150, 37, 5]
    ids = np.full((3, max(lengths)), PAD, np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = _tokens(rng, n)
    real = ids != PAD
    want = _hf_logits(hf, ids, real)
    model = Decoder(cfg)
    tokens = jnp.asarray(ids, jnp.int32)
    got = np.asarray(model.apply({"params": params}, tokens))
    got_seg = np.asarray(model.apply({"params": params}, tokens, jnp.asarray(real, jnp.int32)))
    hidden = model.apply({"params": params}, tokens, method=Decoder.hidden)
    got_split = np.asarray(model.apply({"params": params}, hidden, method=Decoder.project))
    assert got.dtype == np.float32 and got.shape == (3, max(lengths), cfg.vocab_size)
    assert np.abs(got[real] - want[real]).max() <= TOL, name
    assert np.abs(got_seg[real] - want[real]).max() <= TOL, name
    np.testing.assert_array_equal(got_split, got)


def test_packed_row_matches_each_example_alone(variant):
    """Three examples packed in a row (segment ids 1, 2, 3, then padding) each give the logits
    transformers gives for that example alone; positions derived or given agree. The row spans
    four query blocks of the causal attention (32 queries each), examples crossing their edges."""
    name, hf, params, cfg = variant
    rng = np.random.default_rng(1)
    examples = [_tokens(rng, n) for n in (41, 30, 17)]
    L = 100
    assert causal_chunk(L) == 32
    ids = np.full((1, L), PAD, np.int32)
    seg = np.zeros((1, L), np.int32)
    pos = np.zeros((1, L), np.int32)
    start = 0
    for s, ex in enumerate(examples, 1):
        ids[0, start:start + len(ex)], seg[0, start:start + len(ex)] = ex, s
        pos[0, start:start + len(ex)] = np.arange(len(ex))
        start += len(ex)
    np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(seg)))[seg > 0], pos[seg > 0])
    model = Decoder(cfg)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(seg)))
    got_pos = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)))
    start = 0
    for ex in examples:
        want = _hf_logits(hf, ex[None].astype(np.int64))[0]
        assert np.abs(got[0, start:start + len(ex)] - want).max() <= TOL, name
        assert np.abs(got_pos[0, start:start + len(ex)] - want).max() <= TOL, name
        start += len(ex)


def _packed_batch(rng):
    """Two rows: [a x 40, b x 29, pad..] and [c x 50, pad..] (three query blocks of the causal
    attention), with a loss weight on every token that has a next token in its own example."""
    rows = [[_tokens(rng, 40), _tokens(rng, 29)], [_tokens(rng, 50)]]
    L = 80
    ids, seg = np.full((2, L), PAD, np.int32), np.zeros((2, L), np.int32)
    for r, exs in enumerate(rows):
        start = 0
        for s, ex in enumerate(exs, 1):
            ids[r, start:start + len(ex)], seg[r, start:start + len(ex)] = ex, s
            start += len(ex)
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), PAD, np.int32)], axis=1)
    weights = ((seg > 0) & (np.concatenate([seg[:, 1:], np.zeros((2, 1), np.int32)], axis=1) == seg)).astype(np.float32)
    return rows, ids, seg, targets, weights


@pytest.mark.parametrize("name", ["llama_tied_llama3_bias", "qwen3_head_dim_16"])
def test_packed_loss_gradients_match_torch(name, decoder_dir):
    """d(mean next-token loss of a packed batch)/d(every weight) equals torch's over the same
    examples run one by one, weight by weight through the name map."""
    path = decoder_dir(name)
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    rows, ids, seg, targets, weights = _packed_batch(np.random.default_rng(2))
    model = Decoder(cfg)

    def loss_fn(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(seg)))
        picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return -jnp.sum(picked * weights) / weights.sum()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    hf = load_hf(path)
    total = sum(
        torch.nn.functional.cross_entropy(hf(input_ids=torch.tensor(ex[None].astype(np.int64))).logits[0, :-1],
                                          torch.tensor(ex[1:].astype(np.int64)), reduction="sum")
        for exs in rows for ex in exs) / float(weights.sum())
    total.backward()
    assert abs(float(loss) - float(total.detach())) <= TOL
    theirs = dict(hf.named_parameters())
    ours = params_to_hf(jax.tree.map(np.asarray, grads), cfg)
    assert set(ours) == set(theirs)
    for key, g in ours.items():
        assert np.abs(g - theirs[key].grad.numpy()).max() <= TOL, key


def test_remat_and_bf16_compute(decoder_dir):
    """Remat changes memory, not numbers; bf16 compute keeps fp32 params and fp32 logits, close
    to fp32 compute."""
    params, cfg, _ = load_pretrained(str(decoder_dir("qwen2_bias_tied")), tokenizer=False)
    _, ids, seg, targets, weights = _packed_batch(np.random.default_rng(3))

    def loss(p, c):
        logp = jax.nn.log_softmax(Decoder(c).apply({"params": p}, jnp.asarray(ids), jnp.asarray(seg)))
        return -jnp.sum(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0] * weights)

    base, g_base = jax.value_and_grad(loss)(params, cfg)
    for policy in ("full", "dots"):
        value, g = jax.value_and_grad(loss)(params, cfg.replace(remat=policy))
        assert abs(float(value) - float(base)) < 1e-5
        for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    logits32 = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(seg)))
    logits16 = Decoder(cfg.replace(dtype="bfloat16")).apply({"params": params}, jnp.asarray(ids), jnp.asarray(seg))
    assert logits16.dtype == jnp.float32 and all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    real = seg > 0
    err = np.abs(np.asarray(logits16)[real] - logits32[real])
    assert np.isfinite(err).all() and err.max() < 0.05 * np.abs(logits32[real]).max(), err.max()
    assert (np.asarray(logits16)[real].argmax(-1) == logits32[real].argmax(-1)).mean() > 0.8


def test_dropout_when_training_only(decoder_dir):
    """dropout_rate acts only with deterministic=False, reproducibly in the dropout key."""
    params, cfg, _ = load_pretrained(str(decoder_dir("llama_gqa")), tokenizer=False)
    _, ids, seg, _, _ = _packed_batch(np.random.default_rng(4))
    args = ({"params": params}, jnp.asarray(ids), jnp.asarray(seg))
    cfg = cfg.replace(dropout_rate=0.2)
    plain = np.asarray(Decoder(cfg.replace(dropout_rate=0.0)).apply(*args))
    np.testing.assert_array_equal(np.asarray(Decoder(cfg).apply(*args)), plain)
    train = Decoder(cfg, deterministic=False)
    a = np.asarray(train.apply(*args, rngs={"dropout": jax.random.PRNGKey(0)}))
    b = np.asarray(train.apply(*args, rngs={"dropout": jax.random.PRNGKey(0)}))
    c = np.asarray(train.apply(*args, rngs={"dropout": jax.random.PRNGKey(1)}))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-2 and np.abs(a - c).max() > 1e-2
