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

A decoder-only student reads one sequence a row (`CAUSAL`, seqio's decoder-only names):
example i is prompt + target (its `enc` and `dec` ids) as one segment, `decoder_input_tokens`
the sequence but its last token, `decoder_target_tokens` the sequence but its first, and
`decoder_loss_weights` 1 exactly where a target token is predicted (the prompt, a chat
template included, is never trained on). Packing fills that one length; a `Layout` says
which lengths an example takes and how rows become a batch.

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
CAUSAL_KEYS = (
    "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
    "decoder_stream_ids", "decoder_loss_weights",
)


# --------------------------------------------------------------------------- lengths


@dataclass(frozen=True)
class Lengths:
    """The encoder and decoder token counts of some examples: all that the length checks
    and suggestions below read, so a selection of examples needs no copy of its tokens."""

    enc_lengths: np.ndarray
    dec_lengths: np.ndarray

    @classmethod
    def of(cls, examples: Examples, mask: np.ndarray | None = None) -> "Lengths":
        enc, dec = examples.enc_lengths, examples.dec_lengths
        return cls(enc, dec) if mask is None else cls(enc[mask], dec[mask])


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


def length_report(examples: Examples | Lengths, encoder_length: int, decoder_length: int) -> LengthReport:
    enc, dec = int(examples.enc_lengths.sum()), int(examples.dec_lengths.sum())
    rows = max(enc / encoder_length, dec / decoder_length)  # at best the binding side is full
    return LengthReport(enc, dec, dec / max(enc, 1), int(examples.enc_lengths.max()),
                        int(examples.dec_lengths.max()), enc / (rows * encoder_length),
                        dec / (rows * decoder_length))


def suggest_decoder_length(examples: Examples | Lengths, encoder_length: int, multiple: int = 8,
                           cover_longest: bool = True) -> int:
    """The decoder row length matching the data's decoder/encoder token ratio, so that both
    sides can fill; the nearest multiple of `multiple`, with `cover_longest` never shorter
    than the longest target (else longer examples train in long batches)."""
    r = length_report(examples, encoder_length, encoder_length)
    matched = max(multiple, round(r.ratio * encoder_length / multiple) * multiple)
    return max(matched, -(-r.longest_dec // multiple) * multiple) if cover_longest else matched


def suggest_lengths(examples: Examples | Lengths, encoder_length: int | None = None,
                    examples_per_row: int = 8, multiple: int = 8, cover_longest: bool = True) -> tuple[int, int]:
    """(encoder_length, decoder_length) under which both sides of packed rows can fill.

    The encoder length is the one given, or the smallest power of two holding
    `examples_per_row` average inputs (rows of few examples pack coarsely); it is doubled
    while the ratio-matched decoder length could not hold the longest target. Longer rows
    pack better but cost attention compute that grows with the square of the row length.
    Without `cover_longest` rows are only matched to the data's ratio, and the examples that
    do not fit train in long batches (PackedIterator)."""
    enc = examples.enc_lengths
    if encoder_length is None:
        encoder_length = 1 << max(6, math.ceil(math.log2(examples_per_row * float(enc.mean()))))
    if not cover_longest:
        return encoder_length, suggest_decoder_length(examples, encoder_length, multiple, cover_longest=False)
    encoder_length = max(encoder_length, int(enc.max()))
    r = length_report(examples, encoder_length, encoder_length)
    while r.ratio * encoder_length < r.longest_dec:
        encoder_length *= 2
    return encoder_length, suggest_decoder_length(examples, encoder_length, multiple)


def check_lengths(examples: Examples | Lengths, encoder_length: int, decoder_length: int,
                  min_fill: float = 0.9, keys: tuple[str, str] = ("data.encoder_length", "data.decoder_length")
                  ) -> LengthReport:
    """Raises UserError when an example cannot fit a row; warns when the lengths' ratio is so
    far from the data's that one side would fill under `min_fill` even if packed perfectly."""
    r = length_report(examples, encoder_length, decoder_length)
    if r.longest_enc > encoder_length or r.longest_dec > decoder_length:
        one_side = keys[0] == keys[1]  # a causal row: one sequence
        longest = str(r.longest_enc) if one_side else f"{r.longest_enc} encoder and {r.longest_dec} decoder"
        rows = (f"{keys[0]}={encoder_length}" if one_side
                else f"{keys[0]}={encoder_length} and {keys[1]}={decoder_length}")
        raise UserError(
            f"packing: the longest example has {longest} tokens, rows hold "
            f"{rows}; raise them or lower data.max_input_length / data.max_target_length"
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
    return fill_rows(enc_lengths, dec_lengths, order, encoder_length, decoder_length, max_segments, pool_size)[0]


def fill_rows(enc_lengths: np.ndarray, dec_lengths: np.ndarray, order: np.ndarray,
              encoder_length: int, decoder_length: int, max_segments: int | None = None,
              pool_size: int = 1024, *, rows: Sequence[np.ndarray] = (),
              max_rows: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """`pack_rows`, first topping up the started `rows` (already holding examples), and
    stopping after `max_rows` rows in all. Returns (rows, the examples of `order` left out,
    in a deterministic order)."""
    cap = max_segments or len(order) + max((len(r) for r in rows), default=0)
    enc = np.asarray(enc_lengths, np.int64)
    dec = np.asarray(dec_lengths, np.int64)
    order = np.asarray(order, np.int64)
    size = min(pool_size, len(order))
    ids, refill = order[:size].copy(), size
    pool_e, pool_d = enc[ids], dec[ids]
    scale_e, scale_d = 1.0 / encoder_length, 1.0 / decoder_length
    started = [np.asarray(r, np.int64) for r in rows]
    out: list[np.ndarray] = []
    while (size or len(out) < len(started)) and (max_rows is None or len(out) < max_rows):
        row = started[len(out)].tolist() if len(out) < len(started) else []
        room_e = encoder_length - int(enc[row].sum())
        room_d = decoder_length - int(dec[row].sum())
        new_row = not row
        while len(row) < cap and size:
            e, d = pool_e[:size], pool_d[:size]
            fits = (e <= room_e) & (d <= room_d)
            if not fits.any():
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
        if new_row and not row:
            raise UserError("packing: an example is longer than a row; see check_lengths")
        out.append(np.asarray(row, np.int64))
    return out, np.concatenate([ids[:size], order[refill:]])


def long_factor(examples: Examples, encoder_length: int, decoder_length: int) -> int:
    """The smallest power of two f such that every example fits a row f times longer: the
    rows of long batches (see PackedIterator)."""
    need = max(examples.enc_lengths.max() / encoder_length, examples.dec_lengths.max() / decoder_length, 1.0)
    return 1 << math.ceil(math.log2(need) - 1e-9)


def rows_to_batch(examples: Examples, rows: Sequence[np.ndarray], batch_size: int,
                  encoder_length: int, decoder_length: int) -> dict[str, np.ndarray]:
    """The batch dict for `rows` (arrays of example indices; an empty one is an empty row);
    rows past len(rows) are empty."""
    b = {k: np.zeros((batch_size, encoder_length if k.startswith("encoder") else decoder_length), np.int32)
         for k in BATCH_KEYS}
    counts = np.asarray([len(r) for r in rows], np.int64)
    if not counts.sum():
        return b
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


def causal_rows_to_batch(examples: Examples, rows: Sequence[np.ndarray], batch_size: int,
                         sequence_length: int, _unused: int | None = None) -> dict[str, np.ndarray]:
    """The decoder-only batch dict (CAUSAL_KEYS) for `rows`: each example its prompt and
    target as one segment, inputs and targets one token apart, loss weights on the target."""
    b = {k: np.zeros((batch_size, sequence_length), np.int32) for k in CAUSAL_KEYS}
    counts = np.asarray([len(r) for r in rows], np.int64)
    if not counts.sum():
        return b
    ex = np.concatenate(rows).astype(np.int64)
    row = np.repeat(np.arange(len(rows)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    seg = np.arange(len(ex)) - first + 1
    n_enc = examples.enc_offsets[ex + 1] - examples.enc_offsets[ex]
    n = n_enc + examples.dec_offsets[ex + 1] - examples.dec_offsets[ex] - 1  # positions: the sequence less one
    ends = np.cumsum(n)
    col0 = ends - n - (ends - n)[first]
    pos = np.arange(ends[-1]) - np.repeat(ends - n, n)  # position within the segment
    at = (np.repeat(row, n), np.repeat(col0, n) + pos)

    def token(k):  # token k of each position's sequence (prompt, then target)
        in_enc = k < np.repeat(n_enc, n)
        enc_at = np.repeat(examples.enc_offsets[ex], n) + k
        dec_at = np.repeat(examples.dec_offsets[ex] - n_enc, n) + k
        return np.where(in_enc, examples.enc_tokens[np.minimum(enc_at, len(examples.enc_tokens) - 1)],
                        examples.dec_tokens[np.clip(dec_at, 0, max(len(examples.dec_tokens) - 1, 0))])

    b["decoder_input_tokens"][at] = token(pos)
    b["decoder_target_tokens"][at] = token(pos + 1)
    b["decoder_segment_ids"][at] = np.repeat(seg, n)
    b["decoder_positions"][at] = pos
    b["decoder_stream_ids"][at] = np.repeat(examples.stream_ids[ex], n)
    b["decoder_loss_weights"][at] = (pos + 1 >= np.repeat(n_enc, n)).astype(np.int32)
    return b


@dataclass(frozen=True)
class Layout:
    """How examples become rows: the two lengths packing fills for each example, the
    config keys that size them, and the batch a set of rows makes. An encoder-decoder row
    fills its encoder and decoder sides; a causal row one sequence (counted on both sides,
    so the same packer serves it)."""

    name: str
    keys: tuple[str, ...]
    length_keys: tuple[str, str]
    lengths: Any  # Examples -> Lengths
    batch: Any  # (examples, rows, batch_size, length_a, length_b) -> dict


ENCODER_DECODER = Layout("encoder-decoder", BATCH_KEYS, ("data.encoder_length", "data.decoder_length"),
                         lambda ex: Lengths(ex.enc_lengths, ex.dec_lengths), rows_to_batch)


def _causal_lengths(ex: Examples) -> Lengths:
    n = ex.enc_lengths + ex.dec_lengths - 1
    return Lengths(n, n)


CAUSAL = Layout("causal", CAUSAL_KEYS, ("data.sequence_length", "data.sequence_length"), _causal_lengths,
                causal_rows_to_batch)


LAYOUTS = {layout.name: layout for layout in (ENCODER_DECODER, CAUSAL)}


def layout_of(name: str) -> Layout:
    return LAYOUTS[name]


def row_lengths(data: Any, layout: Layout) -> tuple[int, int]:
    """The two lengths the rows of `layout` have under a `DataConfig`: (encoder, decoder), or a
    causal row's `sequence_length` (default: encoder_length + decoder_length) twice."""
    if layout is CAUSAL:
        n = data.sequence_length or data.encoder_length + data.decoder_length
        return n, n
    return data.encoder_length, data.decoder_length


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


@dataclass(frozen=True)
class RowShare:
    """The rows of each global batch that one process builds. Each of the batch's
    `microbatches` (gradient accumulation: consecutive row ranges) is cut into `num_blocks`
    equal blocks; the process takes `blocks` of every microbatch, in order, so its local
    batch reshaped to [microbatches, -1, length] holds its part of each microbatch. This is
    the row layout `runtime.sharding.put_batch` expects (`process_row_blocks`)."""

    blocks: tuple[int, ...] = (0,)
    num_blocks: int = 1
    microbatches: int = 1

    @classmethod
    def of_process(cls, process_index: int, process_count: int, microbatches: int = 1) -> "RowShare":
        return cls((process_index,), process_count, microbatches)

    @property
    def parts(self) -> int:
        """Equal parts a batch is cut into: its row count must divide by this."""
        return self.num_blocks * self.microbatches

    def rows(self, global_rows: Sequence[np.ndarray], batch_rows: int) -> list[np.ndarray]:
        """This share of a global batch of `batch_rows` rows made of `global_rows` (fewer
        only in a last, partial batch: the missing rows are empty)."""
        micro = batch_rows // self.microbatches
        block = micro // self.num_blocks
        empty = np.zeros(0, np.int64)
        out = []
        for m in range(self.microbatches):
            for b in self.blocks:
                start = m * micro + b * block
                part = list(global_rows[start:start + block])
                out += part + [empty] * (block - len(part))
        return out


class PackedIterator:
    """Packed batches over epochs, deterministic from `seed`, resumable, host-sharded.

    Epoch e shuffles the examples with (seed, e), packs them (`pack_rows`) and shuffles the
    rows; the epochs' rows follow one another and each global batch takes the next
    `batch_size` of them, so a batch may straddle two epochs and no row is ever empty,
    except in the last batch when `num_epochs` is set. Every example is in exactly one row
    an epoch. Each process builds only its share of every global batch (a `RowShare`; by
    default process p of n takes rows [p * B/n, (p + 1) * B/n)); every process packs alike
    (only example lengths are needed) and fills only its own rows. `state()` is
    JSON-serialisable and the same on every process, and does not depend on the share:
    `restore(state)` continues with exactly the global batches an uninterrupted iterator
    would have given, with any number of processes.

    Long batches. Rows only need to hold the common examples: attention costs grow with the
    square of the row length, and one outlier target should not set it for every batch. The
    examples too long for a row (`long_examples`) go, each epoch, into LONG batches of
    B / f rows f times longer (f = `long_factor`, a power of two; the same tokens a batch),
    topped up with ordinary examples; they come at even intervals through the epoch. The
    step compiles once more for that shape."""

    def __init__(self, examples: Examples, batch_size: int, encoder_length: int, decoder_length: int,
                 *, seed: int = 0, max_segments_per_row: int | None = None, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, pool_size: int = 1024,
                 share: RowShare | None = None, layout: Layout = ENCODER_DECODER):
        if len(examples) == 0:
            raise UserError("packing: no examples")
        if share is None:
            if process_index is None or process_count is None:
                import jax

                process_index = jax.process_index() if process_index is None else process_index
                process_count = jax.process_count() if process_count is None else process_count
            share = RowShare.of_process(process_index, process_count)
        if batch_size % share.parts:
            raise UserError(f"train.batch_size={batch_size} must be divisible by the {share.parts} parts it is "
                            f"shared in ({share.num_blocks} row blocks (processes) x {share.microbatches} microbatches)")
        if not all(0 <= b < share.num_blocks for b in share.blocks) or list(share.blocks) != sorted(set(share.blocks)):
            raise UserError(f"row share: blocks {share.blocks} are not distinct and in 0..{share.num_blocks - 1}")
        self.layout = layout
        self.lengths = sizes = layout.lengths(examples)
        ka, kb = layout.length_keys
        self.long_factor = long_factor(sizes, encoder_length, decoder_length)
        self.fits = (sizes.enc_lengths <= encoder_length) & (sizes.dec_lengths <= decoder_length)
        f = self.long_factor
        if f > 1:
            long_rows = batch_size // f
            if batch_size % f or long_rows % share.parts:
                r = length_report(sizes, encoder_length, decoder_length)
                raise UserError(
                    f"packing: {int((~self.fits).sum())} examples (the longest: "
                    f"{r.longest_enc if ka == kb else f'{r.longest_enc} encoder, {r.longest_dec} decoder'} "
                    f"tokens) do not fit rows of "
                    f"{f'{ka}={encoder_length}' if ka == kb else f'{ka}={encoder_length}, {kb}={decoder_length}'}; "
                    "they would train in long batches of "
                    f"{batch_size}/{f} rows {f}x longer, but train.batch_size={batch_size} is not divisible by "
                    f"{f * share.parts} ({f} x {share.parts} parts: processes x microbatches). Raise the lengths, make the batch "
                    "size a multiple, or lower data.max_input_length / data.max_target_length")
            log.info("packing: %d of %d examples are longer than rows of (%d, %d); they train in long "
                     "batches of %d rows of (%d, %d)", int((~self.fits).sum()), len(examples), encoder_length,
                     decoder_length, long_rows, encoder_length * f, decoder_length * f)
        if self.fits.any():  # the fill warning, for the examples ordinary rows take
            check_lengths(Lengths(sizes.enc_lengths[self.fits], sizes.dec_lengths[self.fits]), encoder_length,
                          decoder_length, keys=layout.length_keys)
        self.examples = examples
        self.batch_size = batch_size
        self.encoder_length = encoder_length
        self.decoder_length = decoder_length
        self.seed = seed
        self.max_segments = max_segments_per_row
        self.num_epochs = num_epochs
        self.share = share
        self.pool_size = pool_size
        self.epoch = 0
        self.position = 0  # ordinary rows of `epoch` already handed out
        self.long_taken = 0  # long batches of `epoch` already handed out
        self._plan: tuple[list[np.ndarray], list[list[np.ndarray]]] = ([], [])
        self._plan_epoch = -1

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.share.num_blocks * len(self.share.blocks)

    @property
    def long_examples(self) -> int:
        return int((~self.fits).sum())

    def epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """(the ordinary rows of `epoch` in the order batches take them, its long batches),
        the same on every process."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            enc, dec, f = self.lengths.enc_lengths, self.lengths.dec_lengths, self.long_factor
            pack = dict(max_segments=self.max_segments, pool_size=self.pool_size)
            long_batches: list[list[np.ndarray]] = []
            if f > 1:
                per = self.batch_size // f
                Le, Ld = self.encoder_length * f, self.decoder_length * f
                alone = pack_rows(enc, dec, order[~self.fits[order]], Le, Ld, **pack)
                n = -(-len(alone) // per) * per
                started = alone + [np.zeros(0, np.int64)] * (n - len(alone))
                long_rows, order = fill_rows(enc, dec, order[self.fits[order]], Le, Ld, **pack, rows=started, max_rows=n)
                long_rows = [long_rows[j] for j in rng.permutation(n)]
                long_batches = [long_rows[i:i + per] for i in range(0, n, per)]
            rows = pack_rows(enc, dec, order, self.encoder_length, self.decoder_length, **pack)
            self._plan = ([rows[j] for j in rng.permutation(len(rows))], long_batches)
            self._plan_epoch = epoch
        return self._plan

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """The ordinary rows of `epoch` in the order batches take them."""
        return self.epoch_plan(epoch)[0]

    def _long_due(self) -> list[np.ndarray] | None:
        """The next long batch of this epoch when its turn has come: long batch i of n is due
        once (i + 1) / (n + 1) of the epoch's ordinary rows are handed out, or at its end."""
        rows, longs = self.epoch_plan(self.epoch)
        i = self.long_taken
        if i < len(longs) and self.position >= (i + 1) * len(rows) // (len(longs) + 1):
            return longs[i]
        return None

    def _finished(self) -> bool:
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    def __iter__(self) -> "PackedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished():
            raise StopIteration
        long_rows = self._long_due()
        if long_rows is not None:
            self.long_taken += 1
            self._maybe_next_epoch()
            return self.batch(long_rows, self.long_factor)
        rows: list[np.ndarray] = []
        while len(rows) < self.batch_size and not self._finished():
            epoch_rows = self.epoch_rows(self.epoch)
            take = epoch_rows[self.position:self.position + self.batch_size - len(rows)]
            rows += take
            self.position += len(take)
            if not self._maybe_next_epoch() and self.position >= len(epoch_rows):
                break  # this epoch's last long batches come before the next epoch's rows
        if not rows:
            return next(self)
        return self.batch(rows)

    def batch(self, global_rows: Sequence[np.ndarray], factor: int = 1) -> dict[str, np.ndarray]:
        """This process's share of the global batch made of `global_rows`: rows of the
        ordinary lengths, or (factor = long_factor) of a long batch."""
        rows = self.share.rows(global_rows, self.batch_size // factor)
        return self.layout.batch(self.examples, rows, len(rows), self.encoder_length * factor,
                                 self.decoder_length * factor)

    def _maybe_next_epoch(self) -> bool:
        """Moves on to the next epoch once this one's rows and long batches are all handed out."""
        rows, longs = self.epoch_plan(self.epoch)
        if self.position >= len(rows) and self.long_taken >= len(longs):
            self.epoch, self.position, self.long_taken = self.epoch + 1, 0, 0
            return True
        return False

    def state(self) -> dict[str, Any]:
        """Where the iterator is, plus what must match for a restore to be exact."""
        return {"epoch": self.epoch, "position": self.position, "long_taken": self.long_taken, "seed": self.seed,
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
        self.long_taken = int(state.get("long_taken", 0))
        self._plan_epoch = -1


def train_iterator(cfg: Any, examples: Examples, **kwargs: Any) -> PackedIterator:
    """The training iterator a `Config` describes (data lengths, train batch size and seed)."""
    d = cfg.data
    return PackedIterator(examples, cfg.train.batch_size, d.encoder_length, d.decoder_length,
                          seed=d.shuffle_seed, max_segments_per_row=d.max_segments_per_row, **kwargs)
