"""The fused packed loss and its gradient against transformers' PyTorch T5 running one
padded forward pass per stream (what the reference systems do)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_t5
from tinyllm_jax.config import StreamConfig
from tinyllm_jax.data.packing import PackedIterator
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import build_examples, stream_weights
from tinyllm_jax.model.hf import load_pretrained, params_to_hf
from tinyllm_jax.train import loss as loss_lib
from tinyllm_jax.train.loop import make_loss_fn

STREAMS = [
    StreamConfig(name="answer", prefix="predict: ", weight=1.0),
    StreamConfig(name="flan", prefix="explain: ", weight=0.7, teacher="flan"),
    StreamConfig(name="llama", prefix="rationale: ", weight=0.3, teacher="llama"),
]


def _records():
    return [
        make_record("q1", "which gas do plants take in?", "carbon dioxide", ["oxygen", "carbon dioxide"],
                    rationales={"flan": ["plants use carbon dioxide to make food"],
                                "llama": ["Let's think step by step. Plants breathe in carbon dioxide."]}),
        make_record("q2", "what is two plus three?", "five", ["four", "five", "six"],
                    rationales={"flan": ["two plus three is five"]}),  # no llama rationale
        make_record("q3", "a rock is heavier than a feather because", "it has more mass",
                    ["it is red", "it has more mass"],
                    rationales={"flan": ["the rock has more mass"], "llama": ["mass makes things heavy", "more mass"]}),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_tokenizer_dir):
    path = make_hf_t5(tmp_path_factory.mktemp("loss_t5"), spm_tokenizer_dir, seed=7, vocab_size=100,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    _, params, tok, cfg = load_pretrained(str(path))
    examples = build_examples(_records(), STREAMS, tok, 160, 64)
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(path).train()  # dropout_rate is 0
    return cfg, params, examples, hf


def _torch_reference(hf, examples, weights):
    hf.zero_grad()
    total = 0.0
    for s, w in enumerate(weights):
        idx = [i for i in range(len(examples)) if examples.stream_ids[i] == s]
        if not idx:
            continue
        enc = [examples.enc(i) for i in idx]
        dec = [examples.dec(i) for i in idx]
        ids = torch.zeros((len(idx), max(map(len, enc))), dtype=torch.long)
        labels = torch.full((len(idx), max(map(len, dec))), -100, dtype=torch.long)
        for r, (e, d) in enumerate(zip(enc, dec)):
            ids[r, :len(e)] = torch.tensor(e)
            labels[r, :len(d)] = torch.tensor(d)
        out = hf(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
        total = total + w * out.loss
    total.backward()
    grads = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    return float(total.detach()), grads


def test_fused_packed_loss_and_gradient_match_per_stream_pytorch(setup):
    cfg, params, examples, hf = setup
    weights = stream_weights(STREAMS)
    assert len(set(examples.stream_ids.tolist())) == 3
    it = PackedIterator(examples, 4, 320, 128, seed=0, num_epochs=1, process_index=0, process_count=1)
    batch = next(it)
    assert int((batch["decoder_positions"] == 0).sum() - (batch["decoder_segment_ids"] == 0).sum()) >= 0
    segments = sum(len(set(r[r > 0].tolist())) for r in batch["decoder_segment_ids"])
    assert segments == len(examples)  # every example is in this one packed batch
    assert (batch["decoder_segment_ids"].max(axis=1) > 1).any()  # and some rows really are packed

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = loss_lib.stream_token_counts(batch, 3)
    loss_fn = make_loss_fn(cfg, jnp.asarray(weights), 0.0, 0.0)
    (ours, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, counts, jax.random.key(0))

    want, want_grads = _torch_reference(hf, examples, weights)
    assert abs(float(ours) - want) <= 1e-4 * max(1.0, abs(want))
    got_grads = params_to_hf(jax.tree.map(np.asarray, grads), cfg)
    for name, g in got_grads.items():
        np.testing.assert_allclose(g, want_grads[name], atol=1e-4, rtol=1e-3, err_msg=name)


def test_stream_normalisation_is_per_stream_token_count():
    """Two streams with very different token counts: each is a mean over its own tokens."""
    tokens = jnp.array([[1.0, 2.0, 3.0, 10.0, 0.0]])
    streams = jnp.array([[0, 0, 0, 1, 0]])
    mask = jnp.array([[1, 1, 1, 1, 0]]) > 0
    sums = loss_lib.stream_sums(tokens, streams, mask, 2)
    counts = loss_lib.stream_sums(jnp.ones_like(tokens), streams, mask, 2)
    total, means = loss_lib.weighted_loss(sums, counts, jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(means, [2.0, 10.0])
    np.testing.assert_allclose(total, 0.5 * 2.0 + 2.0 * 10.0)


def test_label_smoothing_and_z_loss_change_the_loss():
    logits = jnp.array([[[2.0, 0.5, -1.0]]])
    targets = jnp.array([[0]])
    plain = loss_lib.token_losses(logits, targets)
    ref = -jax.nn.log_softmax(logits)[0, 0, 0]
    np.testing.assert_allclose(plain[0, 0], ref, rtol=1e-6)
    smooth = loss_lib.token_losses(logits, targets, label_smoothing=0.1)
    want = 0.9 * ref + 0.1 * -jnp.mean(jax.nn.log_softmax(logits)[0, 0])
    np.testing.assert_allclose(smooth[0, 0], want, rtol=1e-6)
    z = loss_lib.token_losses(logits, targets, z_loss=1e-2)
    np.testing.assert_allclose(z[0, 0] - plain[0, 0], 1e-2 * jax.nn.logsumexp(logits[0, 0]) ** 2, rtol=1e-5)
