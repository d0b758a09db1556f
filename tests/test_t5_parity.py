"""Our Flax T5 against transformers' PyTorch T5: same weights, same numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tinyllm_jax.model.hf import load_pretrained
from conftest import make_hf_t5

VARIANTS = {
    "v1_0_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1_gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "odd_heads": dict(num_heads=3, d_kv=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "d_kv_not_d_model_over_heads": dict(num_heads=4, d_kv=12, feed_forward_proj="relu"),
    "deeper_decoder": dict(num_layers=1, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "deeper_encoder": dict(num_layers=3, num_decoder_layers=1, feed_forward_proj="relu"),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    path = make_hf_t5(tmp_path_factory.mktemp(request.param), seed=1, **VARIANTS[request.param])
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(path).eval()
    model, params, _, cfg = load_pretrained(str(path), tokenizer=False)
    return request.param, hf, model, params, cfg


def _random_batch(rng, lengths, vocab, min_tok=2):
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(min_tok, vocab, n)
    return ids


def _hf_logits(hf, enc_ids, dec_ids):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_ids != 0).long(),
                 decoder_input_ids=torch.tensor(dec_ids))
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def test_padded_batch_matches_pytorch(variant):
    name, hf, model, params, cfg = variant
    rng = np.random.default_rng(0)
    enc = _random_batch(rng, [7, 4, 9], cfg.vocab_size)
    dec = _random_batch(rng, [5, 5, 5], cfg.vocab_size)
    dec[:, 0] = 0  # decoder start token
    want_logits, want_enc = _hf_logits(hf, enc, dec)
    enc_j = jnp.asarray(enc, jnp.int32)
    got_enc = model.apply({"params": params}, enc_j, method=model.encode)
    got_logits = model.apply({"params": params}, enc_j, jnp.asarray(dec, jnp.int32))
    mask = enc != 0
    assert np.abs(np.asarray(got_enc)[mask] - want_enc[mask]).max() <= TOL, name
    assert np.abs(np.asarray(got_logits) - want_logits).max() <= TOL, name


def test_packed_row_matches_examples_one_by_one(variant):
    """Two examples packed in one row (segment ids 1, 2) give each example's own logits."""
    name, hf, model, params, cfg = variant
    rng = np.random.default_rng(1)
    enc_a, enc_b = rng.integers(2, cfg.vocab_size, 6), rng.integers(2, cfg.vocab_size, 4)
    dec_a, dec_b = rng.integers(2, cfg.vocab_size, 3), rng.integers(2, cfg.vocab_size, 5)
    dec_a[0] = dec_b[0] = 0
    Le, Ld = 12, 10  # room for padding after both segments
    enc = np.zeros((1, Le), np.int32); eseg = np.zeros((1, Le), np.int32)
    enc[0, :6], enc[0, 6:10] = enc_a, enc_b
    eseg[0, :6], eseg[0, 6:10] = 1, 2
    dec = np.zeros((1, Ld), np.int32); dseg = np.zeros((1, Ld), np.int32)
    dec[0, :3], dec[0, 3:8] = dec_a, dec_b
    dseg[0, :3], dseg[0, 3:8] = 1, 2
    got = np.asarray(model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec),
                                 jnp.asarray(eseg), jnp.asarray(dseg)))
    want_a, _ = _hf_logits(hf, enc_a[None], dec_a[None])
    want_b, _ = _hf_logits(hf, enc_b[None], dec_b[None])
    assert np.abs(got[0, :3] - want_a[0]).max() <= TOL, name
    assert np.abs(got[0, 3:8] - want_b[0]).max() <= TOL, name


def test_bucket_ids_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from tinyllm_jax.model.t5 import relative_position_buckets

    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20), (16, 33)):
            ours = relative_position_buckets(300, 300, bidirectional, nb, md)
            rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
            theirs = T5Attention._relative_position_bucket(rel, bidirectional, nb, md).numpy()
            np.testing.assert_array_equal(ours, theirs)


def test_remat_and_bf16_compute(tiny_t5_dir):
    """Remat changes memory, not numbers; bf16 compute keeps fp32 params and stays close."""
    model, params, _, cfg = load_pretrained(str(tiny_t5_dir), tokenizer=False)
    from tinyllm_jax.model.t5 import T5

    rng = np.random.default_rng(2)
    enc = jnp.asarray(_random_batch(rng, [9, 5], cfg.vocab_size), jnp.int32)
    dec = jnp.asarray(_random_batch(rng, [6, 6], cfg.vocab_size), jnp.int32).at[:, 0].set(0)

    def loss(p, m):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, enc, dec))[..., 3])

    base, g_base = jax.value_and_grad(loss)(params, model)
    for policy in ("full", "dots"):
        remat, g_remat = jax.value_and_grad(loss)(params, T5(cfg.replace(remat=policy)))
        assert abs(float(remat) - float(base)) < 1e-6
        for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_remat)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    bf16 = T5(cfg.replace(dtype="bfloat16"))
    logits16 = bf16.apply({"params": params}, enc, dec)
    assert logits16.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits32 = model.apply({"params": params}, enc, dec)
    assert float(jnp.abs(logits16 - logits32).max()) < 0.1 * float(jnp.abs(logits32).max())


def test_dropout_mask_rate_scaling_and_determinism():
    from tinyllm_jax.model.t5 import Dropout

    x = jnp.ones((64, 128, 96))
    drop = Dropout(0.1)
    a = drop.apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    b = drop.apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    c = drop.apply({}, x, False, rngs={"dropout": jax.random.key(2)})
    kept = np.asarray(a) > 0
    assert abs(1 - kept.mean() - 0.1) < 0.002
    np.testing.assert_allclose(np.asarray(a)[kept], 1 / 0.9, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(c) > 0).mean() != kept.mean() or not np.array_equal(a, c)
    assert abs(((np.asarray(c) > 0) == kept).mean() - (0.9**2 + 0.1**2)) < 0.003  # independent masks
    assert abs(kept[:, :, ::2].mean() - kept[:, :, 1::2].mean()) < 0.005  # no parity pattern
    np.testing.assert_array_equal(drop.apply({}, x, True), x)


def test_hand_written_backward_passes_equal_autodiff():
    """`dense` and `add_position_bias` have custom VJPs (for XLA CPU's speed): their
    gradients must be autodiff's."""
    import jax
    import jax.numpy as jnp

    from tinyllm_jax.model.t5 import add_position_bias, dense

    k = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(k[0], (24, 16)), jax.random.normal(k[1], (16, 40))
    s, b = jax.random.normal(k[2], (3, 4, 8, 8)), jax.random.normal(k[3], (1, 4, 8, 8))
    for ours, plain, args in ((dense, lambda x, w: x @ w, (x, w)),
                              (add_position_bias, lambda s, b: s + b, (s, b))):
        f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1))(*args)  # noqa: E731
        for got, want in zip(f(ours), f(plain)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
