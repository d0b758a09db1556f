"""Stored top-k soft labels on disk: what `tinyllm logits` writes and the trainer reads.

    LOGITS_DIR/plan.json                 settings and the examples, written first (resume checks it)
    LOGITS_DIR/shard-00000.safetensors   one shard of examples, written whole or not at all
    LOGITS_DIR/index.json                written last: the store is complete

A shard holds, for each target token of its examples in order, the teacher's top-k ids
(`ids` [T, k], uint16 when the vocabulary fits, else int32), their log-probabilities at
the teacher's temperature (`log_probs` [T, k], float32 or float16) and the log of the
probability mass left to every other id (`tail_log_prob` [T], float32; -inf: none), with
`offsets` [n + 1] cutting the tokens into its n examples. Its metadata (`examples`) names
each example by identity, "<stream>/<record id>/<sample>", and a digest of its encoder and
decoder tokens, so that a store used with other data (another tokenizer, a changed record, other
lengths) is refused, not silently misaligned.

Why safetensors: a real, documented format any framework reads, one file per shard with
its arrays and a JSON header (the metadata above) that is read without the data, and a
layout simple enough to memory-map: the trainer maps the shards and reads only the rows
of the tokens each batch holds, so a store larger than memory trains from disk, on every
process alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinyllm_jax.data.streams import Examples
from tinyllm_jax.errors import UserError

FORMAT = "tinyllm-soft-labels/1"
INDEX, PLAN = "index.json", "plan.json"
ARRAYS = ("ids", "log_probs", "tail_log_prob")  # what each target token has
_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64, "F32": np.float32, "F16": np.float16}


def example_keys(examples: Examples, indices: Sequence[int] | np.ndarray) -> list[str]:
    """The identity of each example: "<stream>/<record id>/<n>", n counting the examples
    of that stream and record (several samples of a teacher) in the examples' order."""
    seen: dict[tuple[int, int], int] = {}
    ordinal = np.zeros(len(examples), np.int64)
    for i, key in enumerate(zip(examples.stream_ids.tolist(), examples.record_index.tolist())):
        ordinal[i] = seen.get(key, 0)
        seen[key] = ordinal[i] + 1
    return [f"{examples.stream_names[examples.stream_ids[i]]}/{examples.record_ids[examples.record_index[i]]}/"
            f"{ordinal[i]}" for i in indices]


def example_digests(examples: Examples, indices: Sequence[int] | np.ndarray) -> list[str]:
    """A digest of each example's encoder and decoder tokens (what the teacher read)."""
    out = []
    for i in indices:
        h = hashlib.sha256(np.ascontiguousarray(examples.enc(i), np.int32).tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(examples.dec(i), np.int32).tobytes())
        out.append(h.hexdigest()[:16])
    return out


def ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)


def bytes_per_token(k: int, vocab: int, log_prob_dtype: str) -> int:
    return k * (ids_dtype(vocab).itemsize + np.dtype(log_prob_dtype).itemsize) + 4


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: Path, keys: list[str], digests: list[str], offsets: np.ndarray, arrays: dict[str, np.ndarray]) -> int:
    """Writes one shard atomically (a killed write leaves no shard); returns its size in bytes."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: np.ascontiguousarray(arrays[k]) for k in ARRAYS} | {"offsets": np.asarray(offsets, np.int64)}
    # one metadata entry: safetensors keeps the metadata in a hash map, so several entries
    # would be written in an order that changes from process to process
    save_file(tensors, str(tmp), metadata={"examples": json.dumps([[k, d] for k, d in zip(keys, digests)])})
    os.replace(tmp, path)
    return path.stat().st_size


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data begins."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _mapped(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A shard's arrays memory-mapped (read-only), and its metadata."""
    header, start = _header(path)
    meta = header.pop("__metadata__", {})
    arrays = {}
    for name, t in header.items():
        dtype = np.dtype(_DTYPES[t["dtype"]])
        begin, end = t["data_offsets"]
        shape = tuple(t["shape"])
        arrays[name] = (np.memmap(path, dtype, "r", start + begin, shape) if end > begin
                        else np.zeros(shape, dtype))
    return arrays, meta


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class StoredRows:
    """One per-token array of a store, read lazily: row t is the stored row of target token
    t of some `Examples` (`token_row[t]`, -1: none, read as zeros). Fancy indexing reads
    only the rows asked for, from the memory-mapped shards (see Examples.target_arrays)."""

    def __init__(self, token_row: np.ndarray, shards: list[np.ndarray], starts: np.ndarray):
        self.token_row, self.shards, self.starts = token_row, shards, starts
        self.dtype = shards[0].dtype
        self.shape = (len(token_row), *shards[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        rows = self.token_row[idx]
        out = np.zeros((len(rows), *self.shape[1:]), self.dtype)
        have = np.flatnonzero(rows >= 0)
        shard = np.searchsorted(self.starts, rows[have], side="right") - 1
        for s in np.unique(shard):
            sel = have[shard == s]
            out[sel] = self.shards[s][rows[sel] - self.starts[s]]
        return out


@dataclass
class SoftLabelStore:
    """A finished store (its index.json), its shards mapped, every example's place in it."""

    path: Path
    index: dict[str, Any]
    arrays: list[dict[str, np.ndarray]]  # per shard
    starts: np.ndarray  # the first global row of each shard
    where: dict[str, tuple[str, int, int]]  # example key -> (digest, first global row, tokens)

    @classmethod
    def open(cls, path: str | Path, what: str = "distill logits") -> "SoftLabelStore":
        path = Path(path)
        index = read_json(path / INDEX)
        if index is None:
            state = "was started but did not finish" if (path / PLAN).is_file() else "does not exist"
            raise UserError(f"{what}={path}: no stored soft labels ({INDEX} missing: the logits run {state}); "
                            "run `tinyllm logits CONFIG` first")
        if index.get("format") != FORMAT:
            raise UserError(f"{path / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
        arrays, starts, where, at = [], [], {}, 0
        for shard in index["shards"]:
            mapped, meta = _mapped(path / shard["file"])
            offsets = np.asarray(mapped.pop("offsets"))
            for (key, digest), a, b in zip(json.loads(meta["examples"]), offsets[:-1], offsets[1:]):
                where[key] = (digest, at + int(a), int(b - a))
            arrays.append(mapped)
            starts.append(at)
            at += int(offsets[-1])
        return cls(path, index, arrays, np.asarray(starts, np.int64), where)

    @property
    def settings(self) -> dict[str, Any]:
        return self.index["settings"]

    def rows_for(self, examples: Examples, indices: np.ndarray, what: str) -> np.ndarray:
        """token_row for `examples` (-1 outside `indices`); UserError naming the first example
        the store lacks or holds for other tokens, and how many."""
        token_row = np.full(len(examples.dec_tokens), -1, np.int64)
        keys, digests = example_keys(examples, indices), example_digests(examples, indices)
        missing, changed = [], []
        starts, lengths, firsts = [], [], []
        for i, key, digest in zip(indices, keys, digests):
            hit = self.where.get(key)
            n = int(examples.dec_offsets[i + 1] - examples.dec_offsets[i])
            if hit is None:
                missing.append(key)
            elif hit[0] != digest or hit[2] != n:
                changed.append(key)
            else:
                starts.append(int(examples.dec_offsets[i]))
                lengths.append(n)
                firsts.append(hit[1])
        if missing or changed:
            bad, why = (missing, "has no soft labels for") if missing else (changed, "holds soft labels of other tokens for")
            raise UserError(
                f"{what}={self.path}: the store {why} {len(bad)} of the {len(indices)} training examples it should "
                f"cover (the first: {bad[0]}); it was computed for other data, another tokenizer or other lengths: "
                "rerun `tinyllm logits CONFIG` into an empty directory")
        lengths = np.asarray(lengths, np.int64)
        if lengths.sum():
            offset = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            token_row[np.repeat(starts, lengths) + offset] = np.repeat(firsts, lengths) + offset
        return token_row

    def attach(self, examples: Examples, indices: np.ndarray, prefix: str, what: str) -> Examples:
        """`examples` carrying this store's arrays as target arrays `<prefix>.<array>`, for the
        examples at `indices` (every other target token reads zeros)."""
        token_row = self.rows_for(examples, np.asarray(indices, np.int64), what)
        return examples.with_target_arrays({
            f"{prefix}.{name}": StoredRows(token_row, [a[name] for a in self.arrays], self.starts) for name in ARRAYS})
