"""Packing: no token lost or duplicated, segments that cannot see each other, the decoder
shift, exact resume, disjoint host shares, and rows that fill on both sides."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from tinyllm_jax.data.packing import (
    BATCH_KEYS, PackedIterator, check_lengths, pack_rows, padded_batches, suggest_lengths,
)
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import Examples, build_examples, tinyllm_streams
from tinyllm_jax.errors import UserError


def synthetic(n: int = 300, seed: int = 0) -> Examples:
    """Answer-like (long input, short target) and rationale-like examples, random tokens 2..999
    ending with EOS (1), as streams 0, 1 and 2."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 3, n)
    enc_len = rng.integers(8, 60, n)
    dec_len = np.where(stream == 0, rng.integers(2, 6, n), rng.integers(10, 50, n))

    def flat(lengths):
        seqs = [np.append(rng.integers(2, 1000, k - 1), 1) for k in lengths]
        return np.concatenate(seqs).astype(np.int32), np.concatenate([[0], np.cumsum(lengths)])

    return Examples(*flat(enc_len), *flat(dec_len), stream.astype(np.int32), np.arange(n, dtype=np.int32),
                    ["answer", "t5", "llama"], [f"r{i}" for i in range(n)])


def segments(batch: dict[str, np.ndarray]):
    """(encoder tokens, decoder tokens, stream id) of every segment of every row."""
    out = []
    for r in range(batch["encoder_segment_ids"].shape[0]):
        for seg in range(1, int(batch["encoder_segment_ids"][r].max()) + 1):
            e = batch["encoder_segment_ids"][r] == seg
            d = batch["decoder_segment_ids"][r] == seg
            streams = set(batch["decoder_stream_ids"][r][d].tolist())
            assert len(streams) == 1
            out.append((tuple(batch["encoder_input_tokens"][r][e]), tuple(batch["decoder_target_tokens"][r][d]),
                        streams.pop()))
    return out


def example_set(ex: Examples) -> Counter:
    return Counter((tuple(ex.enc(i)), tuple(ex.dec(i)), int(ex.stream_ids[i])) for i in range(len(ex)))


def epoch(ex: Examples, **kw) -> list[dict]:
    kw = {"batch_size": 4, "encoder_length": 128, "decoder_length": 96, "process_index": 0,
          "process_count": 1, "num_epochs": 1, **kw}
    return list(PackedIterator(ex, kw.pop("batch_size"), kw.pop("encoder_length"), kw.pop("decoder_length"), **kw))


def test_no_token_lost_or_duplicated_in_an_epoch():
    ex = synthetic()
    batches = epoch(ex)
    assert Counter(s for b in batches for s in segments(b)) == example_set(ex)
    real = sum(int((b["decoder_segment_ids"] > 0).sum()) for b in batches)
    assert real == int(ex.dec_lengths.sum())


def test_batch_layout_segments_positions_and_shift():
    for b in epoch(synthetic()):
        assert set(b) == set(BATCH_KEYS) and all(v.dtype == np.int32 for v in b.values())
        assert b["encoder_input_tokens"].shape == (4, 128) and b["decoder_target_tokens"].shape == (4, 96)
        for side in ("encoder", "decoder"):
            seg, pos = b[f"{side}_segment_ids"], b[f"{side}_positions"]
            for r in range(seg.shape[0]):
                ids = seg[r][seg[r] > 0]
                # segments are contiguous runs 1, 2, 3 ... with all padding at the end, so an
                # equality mask on segment ids keeps every example to itself
                assert (np.diff(seg[r][: len(ids)]) >= 0).all() and (seg[r][len(ids):] == 0).all()
                assert ids.size == 0 or sorted(set(ids.tolist())) == list(range(1, ids.max() + 1))
                for s in set(ids.tolist()):
                    np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
                assert (pos[r][seg[r] == 0] == 0).all()
        assert (b["encoder_segment_ids"].max(1) == b["decoder_segment_ids"].max(1)).all()
        pad = b["decoder_segment_ids"] == 0
        for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_stream_ids"):
            assert (b[k][pad] == 0).all()
        assert (b["encoder_input_tokens"][b["encoder_segment_ids"] == 0] == 0).all()
        tgt, inp, seg = b["decoder_target_tokens"], b["decoder_input_tokens"], b["decoder_segment_ids"]
        for r in range(seg.shape[0]):
            for s in set(seg[r][seg[r] > 0].tolist()):
                t, i = tgt[r][seg[r] == s], inp[r][seg[r] == s]
                assert i[0] == 0 and (i[1:] == t[:-1]).all() and t[-1] == 1


def test_same_seed_same_batches_other_seed_other_batches():
    ex = synthetic()
    a, b, c = epoch(ex, seed=3), epoch(ex, seed=3), epoch(ex, seed=4)
    assert all((x[k] == y[k]).all() for x, y in zip(a, b) for k in BATCH_KEYS) and len(a) == len(b)
    assert any((x["encoder_input_tokens"] != y["encoder_input_tokens"]).any() for x, y in zip(a, c))


@pytest.mark.parametrize("data, stop_after", [
    ("plain", 1), ("plain", 5), ("plain", 11),  # mid-epoch, and past the first epoch's end
    ("long", 3), ("long", 17), ("long", 40),  # before, between and after long batches
])
def test_restore_continues_exactly(data, stop_after):
    ex = synthetic(200) if data == "plain" else with_long_examples(200, 9)
    make = lambda: PackedIterator(ex, 4, 128, 96, seed=7, num_epochs=3, process_index=0, process_count=1)
    whole = list(make())
    if data == "long":
        assert any(b["encoder_input_tokens"].shape[1] == 256 for b in whole[:stop_after])
    first = make()
    for _ in range(stop_after):
        next(first)
    state = json.loads(json.dumps(first.state()))
    resumed = make()
    resumed.restore(state)
    rest = list(resumed)
    assert len(whole) == stop_after + len(rest)
    for x, y in zip(whole[stop_after:], rest):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_restore_refuses_a_state_from_other_settings():
    ex = synthetic(100)
    state = PackedIterator(ex, 4, 128, 96, process_index=0, process_count=1).state()
    other = PackedIterator(ex, 8, 128, 96, process_index=0, process_count=1)
    with pytest.raises(UserError, match="batch_size was 4, now 8"):
        other.restore(state)


def test_epochs_follow_each_other_without_empty_rows():
    ex = synthetic(200)
    batches = list(PackedIterator(ex, 4, 128, 96, seed=1, num_epochs=2, process_index=0, process_count=1))
    for b in batches[:-1]:  # a batch may straddle two epochs: only the very last has empty rows
        assert (b["encoder_segment_ids"].max(1) > 0).all()
    seen = Counter(s for b in batches for s in segments(b))
    assert seen == Counter({k: 2 * v for k, v in example_set(ex).items()})


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shares_are_disjoint_and_cover_the_global_batch(hosts):
    ex = synthetic()
    whole = epoch(ex, batch_size=8, seed=2)
    shares = [epoch(ex, batch_size=8, seed=2, process_index=p, process_count=hosts) for p in range(hosts)]
    assert all(len(s) == len(whole) for s in shares)
    for step, global_batch in enumerate(whole):
        for k in BATCH_KEYS:
            local = [s[step][k] for s in shares]
            assert all(x.shape[0] == 8 // hosts for x in local)
            np.testing.assert_array_equal(np.concatenate(local), global_batch[k])
    per_host = [Counter(seg for b in s for seg in segments(b)) for s in shares]
    assert sum(per_host, Counter()) == example_set(ex)
    with pytest.raises(UserError, match="divisible"):
        PackedIterator(ex, 6, 128, 96, process_index=0, process_count=4)


def test_max_segments_per_row_is_respected():
    batches = epoch(synthetic(), max_segments_per_row=2)
    assert max(int(b["encoder_segment_ids"].max()) for b in batches) == 2


def test_both_sides_fill_with_suggested_lengths():
    ex = synthetic(2000, seed=5)
    enc_len, dec_len = suggest_lengths(ex, 256)
    report = check_lengths(ex, enc_len, dec_len)
    assert min(report.expected_enc_fill, report.expected_dec_fill) > 0.95
    rows = pack_rows(ex.enc_lengths, ex.dec_lengths, np.random.default_rng(0).permutation(len(ex)), enc_len, dec_len)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(ex)))
    enc_fill = ex.enc_lengths.sum() / (len(rows) * enc_len)
    dec_fill = ex.dec_lengths.sum() / (len(rows) * dec_len)
    assert min(enc_fill, dec_fill) > 0.93, (enc_fill, dec_fill)


def test_suggest_lengths_makes_room_for_the_longest_target():
    ex = synthetic(300)
    enc_len, dec_len = suggest_lengths(ex, 64)
    assert dec_len >= ex.dec_lengths.max() and dec_len % 8 == 0
    assert enc_len > 64 and enc_len >= ex.enc_lengths.max()


def test_lengths_that_cannot_hold_an_example_or_fill_are_reported(caplog):
    ex = synthetic(100)
    with pytest.raises(UserError, match=r"longest: \d+ encoder, \d+ decoder tokens.*not divisible by 4"):
        PackedIterator(ex, 6, 32, 96, process_index=0, process_count=2)  # long batches of 6/2 rows, 2 hosts
    with pytest.raises(UserError, match=r"longest example has \d+ encoder and \d+ decoder tokens"):
        check_lengths(ex, 32, 96)
    with caplog.at_level(logging.WARNING, logger="tinyllm_jax.data.packing"):
        check_lengths(ex, 128, 512)
    assert "would fill at most" in caplog.text and "decoder" in caplog.text


def with_long_examples(n: int = 300, n_long: int = 7, seed: int = 0) -> Examples:
    """synthetic() plus `n_long` rationale examples with 150-190 token targets (rows of
    (128, 96) cannot hold them; rows twice as long can)."""
    base = synthetic(n, seed)
    rng = np.random.default_rng(seed + 1)
    dec_len = np.concatenate([base.dec_lengths, rng.integers(150, 190, n_long)])
    enc_len = np.concatenate([base.enc_lengths, rng.integers(8, 60, n_long)])
    enc = np.concatenate([base.enc_tokens, *(np.append(rng.integers(2, 1000, k - 1), 1) for k in enc_len[n:])])
    dec = np.concatenate([base.dec_tokens, *(np.append(rng.integers(2, 1000, k - 1), 1) for k in dec_len[n:])])
    return Examples(enc.astype(np.int32), np.concatenate([[0], np.cumsum(enc_len)]), dec.astype(np.int32),
                    np.concatenate([[0], np.cumsum(dec_len)]), np.append(base.stream_ids, [2] * n_long).astype(np.int32),
                    np.arange(n + n_long, dtype=np.int32), base.stream_names, [f"r{i}" for i in range(n + n_long)])


def test_examples_longer_than_rows_train_in_long_batches():
    ex = with_long_examples()
    it = PackedIterator(ex, 4, 128, 96, seed=3, num_epochs=2, process_index=0, process_count=1)
    assert it.long_factor == 2 and it.long_examples == 7
    batches = list(it)
    shapes = Counter((b["encoder_input_tokens"].shape, b["decoder_target_tokens"].shape) for b in batches)
    assert set(shapes) == {((4, 128), (4, 96)), ((2, 256), (2, 192))}
    # each epoch: every example exactly once, the long ones in long batches
    assert Counter(s for b in batches for s in segments(b)) == Counter({k: 2 * v for k, v in example_set(ex).items()})
    long_segments = [s for b in batches if b["encoder_input_tokens"].shape[1] == 256 for s in segments(b)]
    assert sum(len(s[1]) > 96 for s in long_segments) == 14
    assert len(long_segments) > 14  # long rows are topped up with ordinary examples
    # long batches come spread through the epoch, not all at its start or end
    where = [i for i, b in enumerate(batches) if b["encoder_input_tokens"].shape[1] == 256]
    assert 0 < where[0] and where[-1] < len(batches) - 1
    for b in batches[:-1]:
        assert (b["encoder_segment_ids"].max(1) > 0).all()


def test_host_shares_of_long_batches_cover_the_global_batch():
    ex = with_long_examples()
    whole = epoch(ex, batch_size=8, seed=2)
    shares = [epoch(ex, batch_size=8, seed=2, process_index=p, process_count=2) for p in range(2)]
    for step, global_batch in enumerate(whole):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([s[step][k] for s in shares]), global_batch[k])
    assert any(b["encoder_input_tokens"].shape == (4, 256) for b in whole)


def test_only_long_examples_still_make_batches():
    ex = with_long_examples(10, 10)
    ex = ex.subset(np.flatnonzero(ex.dec_lengths > 96))
    batches = epoch(ex)
    assert batches and all(b["encoder_input_tokens"].shape == (2, 256) for b in batches)
    assert Counter(s for b in batches for s in segments(b)) == example_set(ex)


def test_padded_batches_one_example_a_row_in_order():
    ex = synthetic(10)
    batches = list(padded_batches(ex, 4))
    assert len(batches) == 3 and set(batches[0]) == set(BATCH_KEYS)
    assert batches[0]["encoder_input_tokens"].shape == (4, int(ex.enc_lengths.max()))
    got = [s for b in batches for s in segments(b)]
    assert got == [(tuple(ex.enc(i)), tuple(ex.dec(i)), int(ex.stream_ids[i])) for i in range(10)]
    assert (batches[-1]["encoder_segment_ids"][2:] == 0).all()


def test_tokenized_examples_pack_end_to_end(spm_tokenizer):
    recs = [make_record(f"r{i}", "what is two plus three?", "five", ["four", "five"],
                        rationales={"flan-t5": ["two plus three is five"], "llama": ["step by step"] * (i % 2)})
            for i in range(12)]
    ex = build_examples(recs, tinyllm_streams(), spm_tokenizer, 64, 32)
    batches = epoch(ex, batch_size=2, encoder_length=256, decoder_length=128)
    assert Counter(s for b in batches for s in segments(b)) == example_set(ex)
    assert max(b["decoder_stream_ids"].max() for b in batches) == 2


def test_long_batches_when_few_ordinary_examples_are_left_to_top_them_up():
    """Most examples too long for a row: the long batches' padding rows outnumber the ordinary
    examples that could top them up, and the spare rows stay empty (it raised 'an example is
    longer than a row' once the pool ran dry)."""
    from tinyllm_jax.data.streams import Examples

    enc = [90] * 46 + [10] * 48
    dec = [90] * 46 + [10] * 48
    offsets = lambda n: np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    ex = Examples(np.ones(sum(enc), np.int32), offsets(enc), np.ones(sum(dec), np.int32), offsets(dec),
                  np.zeros(94, np.int32), np.arange(94, dtype=np.int32), ["s"], [str(i) for i in range(94)])
    it = PackedIterator(ex, 16, 64, 64, seed=0, num_epochs=1, process_index=0, process_count=1)
    batches = list(it)
    assert batches and all(np.isfinite(b["decoder_segment_ids"]).all() for b in batches)
    rows, longs = it.epoch_plan(0)
    assert sorted(np.concatenate([*rows, *[r for lb in longs for r in lb]]).tolist()) == list(range(94))
