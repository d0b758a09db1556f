"""The packer and the model together: every example's loss is the same whether it shares a
packed row with others or sits alone in a padded row (segments never attend across)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tinyllm_jax.config import StreamConfig
from tinyllm_jax.data.packing import PackedIterator, padded_batches
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import build_examples
from tinyllm_jax.model.hf import load_pretrained
from tinyllm_jax.train.loss import token_losses

STREAMS = [StreamConfig(name="answer", prefix="predict: "),
           StreamConfig(name="why", prefix="explain: ", teacher="t")]


def _per_token_loss(model, params, batch):
    logits = model.apply({"params": params}, *(jnp.asarray(batch[k]) for k in (
        "encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids", "decoder_segment_ids")))
    return np.asarray(token_losses(logits, jnp.asarray(batch["decoder_target_tokens"])))


def test_packed_and_padded_give_the_same_per_example_loss(tiny_t5_dir, spm_tokenizer):
    model, params, _, _ = load_pretrained(str(tiny_t5_dir), tokenizer=False)
    words = "the quick brown fox jumps over the lazy dog plants use sunlight".split()
    rng = np.random.default_rng(0)
    records = [make_record(f"r{i}", " ".join(rng.choice(words, rng.integers(3, 9))), str(i % 7),
                           ["1", "2", "3"][: 1 + i % 3],
                           rationales={"t": [" ".join(rng.choice(words, rng.integers(2, 12)))]})
               for i in range(10)]
    ex = build_examples(records, STREAMS, spm_tokenizer, 96, 48)
    assert len(ex) == 20

    padded = np.zeros(len(ex))
    start = 0
    for batch in padded_batches(ex, 8):
        tl = _per_token_loss(model, params, batch)
        n = min(8, len(ex) - start)
        padded[start:start + n] = (tl * (batch["decoder_segment_ids"] > 0))[:n].sum(axis=1)
        start += n

    it = PackedIterator(ex, 8, 160, 64, seed=3, num_epochs=1, process_index=0, process_count=1)
    packed = np.full(len(ex), np.nan)
    row_offset = 0
    for batch in it:
        rows = it.epoch_rows(0)[row_offset:row_offset + 8]
        tl = _per_token_loss(model, params, batch)
        for r, row in enumerate(rows):
            for seg, i in enumerate(row.tolist(), 1):
                packed[i] = tl[r][batch["decoder_segment_ids"][r] == seg].sum()
        row_offset += 8
    assert not np.isnan(packed).any()  # every example was packed once
    assert max(len(r) for r in it.epoch_rows(0)) > 1  # and rows really hold several
    np.testing.assert_allclose(packed, padded, rtol=1e-5, atol=1e-5)
