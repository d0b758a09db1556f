"""Examples -> fixed-shape batches: several examples packed into each row, seqio-style.

A packed batch is a dict of int32 numpy arrays, B rows each:

    encoder_input_tokens, encoder_segment_ids, encoder_positions        [B, encoder_length]
    decoder_target_tokens, decoder_input_tokens, decoder_segment_ids,
    decoder_positions, decoder_stream_ids                               [B, decoder_length]

Segment k (1, 2, ...) of a row's encoder and segment k of its decoder are the same example;
0 is padding everywhere. Positions restart at 0 in each segment. `decoder_input_tokens` is
the target shifted right within its segment, each segment starting with 0 (T5's decoder
start token, also the pad id). `decoder_stream_ids` holds the example's stream index;
the loss mask is `decoder_segment_ids > 0`.

The packer is written by hand: seqio's needs TensorFlow and fills rows in arrival order,
while here each row picks, from a pool of candidates, the examples that keep its two sides
filling together, so answer examples (long input, short target) and rationale examples
(the reverse) share rows. On the TinyLLM data that takes both sides from about 0.90
(in-order best-fit) to 0.96-0.99 (benchmarks/packing.py). Packing costs about 10 us an
example an epoch on one CPU core.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from tinyllm_jax.data.streams import Examples
from tinyllm_jax.errors import UserError

log = logging.getLogger(__name__)

BATCH_KEYS = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
    "decoder_positions", "decoder_stream_ids",
)


# --------------------------------------------------------------------------- lengths


@dataclass
class LengthReport:
    """How the data's encoder and decoder token counts compare with the row lengths."""

    enc_tokens: int
    dec_tokens: int
    ratio: float  # decoder tokens per encoder token
    longest_enc: int
    longest_dec: int
    expected_enc_fill: float  # if rows filled the binding side completely
    expected_dec_fill: float


def length_report(examples: Examples, encoder_length: int, decoder_length: int) -> LengthReport:
    enc, dec = int(examples.enc_lengths.sum()), int(examples.dec_lengths.sum())
    rows = max(enc / encoder_length, dec / decoder_length)  # at best the binding side is full
    return LengthReport(enc, dec, dec / max(enc, 1), int(examples.enc_lengths.max()),
                        int(examples.dec_lengths.max()), enc / (rows * encoder_length),
                        dec / (rows * decoder_length))


def suggest_decoder_length(examples: Examples, encoder_length: int, multiple: int = 8) -> int:
    """The decoder row length matching the data's decoder/encoder token ratio, so that both
    sides can fill; the nearest multiple of `multiple`, never shorter than the longest target."""
    r = length_report(examples, encoder_length, encoder_length)
    matched = max(multiple, round(r.ratio * encoder_length / multiple) * multiple)
    return max(matched, -(-r.longest_dec // multiple) * multiple)


def suggest_lengths(examples: Examples, encoder_length: int | None = None,
                    examples_per_row: int = 8, multiple: int = 8) -> tuple[int, int]:
    """(encoder_length, decoder_length) under which both sides of packed rows can fill.

    The encoder length is the one given, or the smallest power of two holding
    `examples_per_row` average inputs (rows of few examples pack coarsely); it is doubled
    while the ratio-matched decoder length could not hold the longest target. Longer rows
    pack better but cost attention compute that grows with the square of the row length."""
    enc = examples.enc_lengths
    if encoder_length is None:
        encoder_length = 1 << max(6, math.ceil(math.log2(examples_per_row * float(enc.mean()))))
    encoder_length = max(encoder_length, int(enc.max()))
    r = length_report(examples, encoder_length, encoder_length)
    while r.ratio * encoder_length < r.longest_dec:
        encoder_length *= 2
    return encoder_length, suggest_decoder_length(examples, encoder_length, multiple)


def check_lengths(examples: Examples, encoder_length: int, decoder_length: int,
                  min_fill: float = 0.9) -> LengthReport:
    """Raises UserError when an example cannot fit a row; warns when the lengths' ratio is so
    far from the data's that one side would fill under `min_fill` even if packed perfectly."""
    r = length_report(examples, encoder_length, decoder_length)
    if r.longest_enc > encoder_length or r.longest_dec > decoder_length:
        raise UserError(
            f"packing: the longest example has {r.longest_enc} encoder and {r.longest_dec} decoder "
            f"tokens, rows hold data.encoder_length={encoder_length} and "
            f"data.decoder_length={decoder_length}; raise them or lower data.max_input_length / "
            "data.max_target_length"
        )
    if min(r.expected_enc_fill, r.expected_dec_fill) < min_fill:
        log.warning(
            "packing: data has %.2f decoder tokens per encoder token; with encoder_length=%d and "
            "decoder_length=%d rows would fill at most %.0f%% (encoder) / %.0f%% (decoder); "
            "(encoder_length, decoder_length) = %s would suit this data",
            r.ratio, encoder_length, decoder_length, 100 * r.expected_enc_fill,
            100 * r.expected_dec_fill, suggest_lengths(examples, encoder_length),
        )
    return r


# --------------------------------------------------------------------------- packing


def pack_rows(enc_lengths: np.ndarray, dec_lengths: np.ndarray, order: np.ndarray,
              encoder_length: int, decoder_length: int, max_segments: int | None = None,
              pool_size: int = 1024) -> list[np.ndarray]:
    """Packs the examples in `order` into rows, one row at a time, from a pool of candidates.

    The pool holds the next `pool_size` examples of `order`. A row takes, again and again,
    the pool example after which its larger remaining room (encoder or decoder, each as a
    fraction of its length) is smallest, until none fits; the pool refills from `order`.
    Choosing by the larger room keeps both sides filling together, so answer examples (long
    input, short target) and rationale examples (the reverse) end up sharing rows. Returns
    each row's example indices. Deterministic for a given `order`; every example is placed
    exactly once (callers check beforehand that each fits an empty row)."""
    cap = max_segments or len(order)
    enc = np.asarray(enc_lengths, np.int64)
    dec = np.asarray(dec_lengths, np.int64)
    order = np.asarray(order, np.int64)
    size = min(pool_size, len(order))
    ids, refill = order[:size].copy(), size
    pool_e, pool_d = enc[ids], dec[ids]
    scale_e, scale_d = 1.0 / encoder_length, 1.0 / decoder_length
    rows: list[np.ndarray] = []
    while size:
        room_e, room_d = encoder_length, decoder_length
        row: list[int] = []
        while len(row) < cap:
            e, d = pool_e[:size], pool_d[:size]
            fits = (e <= room_e) & (d <= room_d)
            if not fits.any():
                if not row:
                    raise UserError("packing: an example is longer than a row; see check_lengths")
                break
            left = np.maximum((room_e - e) * scale_e, (room_d - d) * scale_d)
            j = int(np.argmin(np.where(fits, left, np.inf)))
            row.append(int(ids[j]))
            room_e -= int(pool_e[j])
            room_d -= int(pool_d[j])
            if refill < len(order):  # the next example of `order` takes the freed place
                ids[j] = order[refill]
                refill += 1
            else:  # order exhausted: the pool shrinks
                size -= 1
                ids[j] = ids[size]
            pool_e[j], pool_d[j] = enc[ids[j]], dec[ids[j]]
        rows.append(np.asarray(row, np.int64))
    return rows


def rows_to_batch(examples: Examples, rows: Sequence[np.ndarray], batch_size: int,
                  encoder_length: int, decoder_length: int) -> dict[str, np.ndarray]:
    """The batch dict for `rows` (arrays of example indices); rows past len(rows) are empty."""
    b = {k: np.zeros((batch_size, encoder_length if k.startswith("encoder") else decoder_length), np.int32)
         for k in BATCH_KEYS}
    if not rows:
        return b
    counts = np.asarray([len(r) for r in rows])
    ex = np.concatenate(rows).astype(np.int64)
    row = np.repeat(np.arange(len(rows)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)  # index of the row's first segment
    seg = np.arange(len(ex)) - first + 1
    for side, tokens, offsets in (("encoder", examples.enc_tokens, examples.enc_offsets),
                                  ("decoder", examples.dec_tokens, examples.dec_offsets)):
        n = offsets[ex + 1] - offsets[ex]
        ends = np.cumsum(n)
        col0 = ends - n - (ends - n)[first]  # where each segment starts in its row
        pos = np.arange(ends[-1]) - np.repeat(ends - n, n)  # position within the segment
        src = np.repeat(offsets[ex], n) + pos
        at = (np.repeat(row, n), np.repeat(col0, n) + pos)
        b[f"{side}_segment_ids"][at] = np.repeat(seg, n)
        b[f"{side}_positions"][at] = pos
        if side == "encoder":
            b["encoder_input_tokens"][at] = tokens[src]
        else:
            b["decoder_target_tokens"][at] = tokens[src]
            b["decoder_input_tokens"][at] = np.where(pos == 0, 0, tokens[src - 1])  # shift within segment
            b["decoder_stream_ids"][at] = np.repeat(examples.stream_ids[ex], n)
    return b


def padded_batches(examples: Examples, batch_size: int, encoder_length: int | None = None,
                   decoder_length: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One example a row, in order (for evaluation); the last batch is topped up with empty
    rows. Lengths default to the longest example, so every batch has the same shape."""
    if len(examples) == 0:
        return
    enc_len = encoder_length or int(examples.enc_lengths.max())
    dec_len = decoder_length or int(examples.dec_lengths.max())
    check_lengths(examples, enc_len, dec_len, min_fill=0.0)
    for start in range(0, len(examples), batch_size):
        rows = [np.asarray([i]) for i in range(start, min(start + batch_size, len(examples)))]
        yield rows_to_batch(examples, rows, batch_size, enc_len, dec_len)


# --------------------------------------------------------------------------- iterator


class PackedIterator:
    """Packed batches over epochs, deterministic from `seed`, resumable, host-sharded.

    Epoch e shuffles the examples with (seed, e), packs them (`pack_rows`) and shuffles the
    rows; the epochs' rows follow one another and each global batch takes the next
    `batch_size` of them, so a batch may straddle two epochs and no row is ever empty,
    except in the last batch when `num_epochs` is set. Every example is in exactly one row
    an epoch. Process p of n gets rows [p * B/n, (p + 1) * B/n) of each global batch, shape
    [B/n, length]; every process packs alike (only example lengths are needed) and fills
    only its own rows. `state()` is JSON-serialisable; `restore(state)` continues with
    exactly the batches an uninterrupted iterator would have given."""

    def __init__(self, examples: Examples, batch_size: int, encoder_length: int, decoder_length: int,
                 *, seed: int = 0, max_segments_per_row: int | None = None, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, pool_size: int = 1024):
        if len(examples) == 0:
            raise UserError("packing: no examples")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size % process_count:
            raise UserError(f"train.batch_size={batch_size} must be divisible by the {process_count} processes")
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} is outside 0..{process_count - 1}")
        check_lengths(examples, encoder_length, decoder_length)
        self.examples = examples
        self.batch_size = batch_size
        self.encoder_length = encoder_length
        self.decoder_length = decoder_length
        self.seed = seed
        self.max_segments = max_segments_per_row
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self.pool_size = pool_size
        self.epoch = 0
        self.position = 0  # rows of `epoch` already handed out
        self._rows: list[np.ndarray] = []
        self._rows_epoch = -1

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """All rows of `epoch` in the order batches take them (the same on every process)."""
        if self._rows_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            rows = pack_rows(self.examples.enc_lengths, self.examples.dec_lengths, order,
                             self.encoder_length, self.decoder_length, self.max_segments, self.pool_size)
            self._rows = [rows[j] for j in rng.permutation(len(rows))]
            self._rows_epoch = epoch
        return self._rows

    def __iter__(self) -> "PackedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[np.ndarray] = []
        while len(rows) < self.batch_size:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                break
            epoch_rows = self.epoch_rows(self.epoch)
            take = epoch_rows[self.position:self.position + self.batch_size - len(rows)]
            rows += take
            self.position += len(take)
            if self.position >= len(epoch_rows):
                self.epoch, self.position = self.epoch + 1, 0
        if not rows:
            raise StopIteration
        start = self.process_index * self.local_batch_size
        return rows_to_batch(self.examples, rows[start:start + self.local_batch_size],
                             self.local_batch_size, self.encoder_length, self.decoder_length)

    def state(self) -> dict[str, Any]:
        """Where the iterator is, plus what must match for a restore to be exact."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size,
                "encoder_length": self.encoder_length, "decoder_length": self.decoder_length,
                "max_segments_per_row": self.max_segments, "pool_size": self.pool_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from `state()` of an iterator over the same examples)."""
        mine = self.state()
        for key in ("num_examples", "batch_size", "encoder_length", "decoder_length",
                    "max_segments_per_row", "pool_size"):
            if key in state and state[key] != mine[key]:
                raise UserError(f"data iterator state: {key} was {state[key]!r}, now {mine[key]!r}; "
                                "resuming would not give the same batches")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._rows_epoch = -1


def train_iterator(cfg: Any, examples: Examples, **kwargs: Any) -> PackedIterator:
    """The training iterator a `Config` describes (data lengths, train batch size and seed)."""
    d = cfg.data
    return PackedIterator(examples, cfg.train.batch_size, d.encoder_length, d.decoder_length,
                          seed=d.shuffle_seed, max_segments_per_row=d.max_segments_per_row, **kwargs)
