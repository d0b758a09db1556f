"""Where records come from: local files (JSON Lines, JSON lists, Parquet), Hugging Face hub
datasets through `datasets`, or TensorFlow Datasets (the optional `tfds` extra).

Every source goes through the same field mapping (`data.fields`: record field -> source
field) and the same row check as `records.validate_record`; a bad row is an error naming
where it is, or with `lenient` a line in the returned `skipped` list. Ids must be unique
across everything one call loads, because predictions are matched back to records by id.
"""

from __future__ import annotations

import hashlib

import glob
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from tinyllm_jax.config import ConfigError, DataConfig
from tinyllm_jax.data.records import UNDECODABLE, RecordError, iter_located_records, map_fields, validate_record
from tinyllm_jax.errors import UserError

log = logging.getLogger(__name__)

SOURCES = ("files", "hf", "tfds")


def load_records(
    paths_or_name: str | Path | Sequence[str | Path],
    source: str = "files",
    fields: Mapping[str, str] | None = None,
    lenient: bool = False,
    split: str | Sequence[str] = "train",
    hf_config: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Loads and validates records; returns them with the list of skipped rows.

    source "files": `paths_or_name` is one path, a glob, or a list of them; `.parquet`
    files are read through `datasets`, anything else as JSON Lines or a JSON list.
    source "hf": a hub dataset name (or a local dataset folder) for `datasets.load_dataset`,
    with `hf_config` and `split` (one split or several, e.g. "train[:90%]").
    source "tfds": a TFDS name and `split`; needs `pip install tinyllm-jax[tfds]`.
    Raises RecordError on the first bad row unless `lenient`; with `lenient` the skipped
    rows are returned (file:line: reason) and counted in a warning. Never returns no records."""
    skipped: list[str] = []
    if source == "files":
        rows = _file_rows(_expand(paths_or_name), fields, lenient, skipped)
        what = ", ".join(map(str, _as_list(paths_or_name)))
    elif source in ("hf", "tfds"):
        if not isinstance(paths_or_name, (str, Path)):
            raise ConfigError(f"source {source!r}: expected one dataset name, found {paths_or_name!r}")
        splits = [split] if isinstance(split, str) else list(split)
        reader = _hf_rows if source == "hf" else _tfds_rows
        rows = _checked(
            ((where, row) for s in splits for where, row in reader(str(paths_or_name), hf_config, s)),
            fields, lenient, skipped,
        )
        what = f"{paths_or_name} [{', '.join(splits)}]"
    else:
        raise ConfigError(f"data.source: expected one of {list(SOURCES)}, found {source!r}")
    records = _unique_ids(rows, lenient, skipped)
    if skipped:
        log.warning("%s: skipped %d bad row(s) (lenient): %s%s", what, len(skipped),
                    "; ".join(skipped[:3]), " ..." if len(skipped) > 3 else "")
    if not records:
        raise RecordError(f"{what}: no records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return records, skipped


def has_split(cfg: DataConfig, split: str) -> bool:
    return bool(getattr(cfg, split)) or (split == "validation" and _held_out(cfg))


def _held_out(cfg: DataConfig) -> bool:
    return not cfg.validation and cfg.validation_from_train > 0.0


def _in_validation(record_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load_split(cfg: DataConfig, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of `split` ("train", "validation" or "test") as `cfg` describes them:
    for files, `data.<split>` lists paths; for hf/tfds, it lists split names of `hf_name`.
    With `data.validation_from_train` (and no data.validation), validation is a stable
    hashed fraction of train and train is the rest."""
    if split in ("train", "validation") and _held_out(cfg):
        if not 0.0 < cfg.validation_from_train < 1.0:
            raise ConfigError(f"data.validation_from_train: expected a fraction in (0, 1), found {cfg.validation_from_train}")
        records, skipped = _load_listed(cfg, "train")
        want = split == "validation"
        part = [r for r in records if _in_validation(r["id"], cfg.validation_from_train, cfg.shuffle_seed) == want]
        if not part:
            raise ConfigError(f"data.validation_from_train={cfg.validation_from_train}: the {split} part is empty")
        return part, skipped
    return _load_listed(cfg, split)


def _load_listed(cfg: DataConfig, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    entries = getattr(cfg, split, None)
    if entries is None:
        raise ConfigError(f"data.{split}: unknown split (expected train, validation or test)")
    if not entries:
        raise ConfigError(f"data.{split}: nothing given (expected a list of "
                          + ("files)" if cfg.source == "files" else f"{cfg.source} split names)"))
    if cfg.source == "files":
        return load_records(entries, "files", cfg.fields, cfg.lenient)
    if not cfg.hf_name:
        raise ConfigError(f"data.hf_name: required when data.source is {cfg.source!r}")
    return load_records(cfg.hf_name, cfg.source, cfg.fields, cfg.lenient, split=entries,
                        hf_config=cfg.hf_config)


# --------------------------------------------------------------------------- files


def _as_list(x: Any) -> list:
    return [x] if isinstance(x, (str, Path)) else list(x)


def _expand(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    out = []
    for p in _as_list(paths):
        p = str(p)
        if glob.has_magic(p):
            matched = sorted(glob.glob(p))
            if not matched:
                raise RecordError(f"{p}: no file matches this pattern")
            out += [Path(m) for m in matched]
        else:
            out.append(Path(p))
    for p in out:
        if not p.is_file():
            raise RecordError(f"{p}: file not found")
    return out


def _file_rows(paths: list[Path], fields, lenient: bool, skipped: list[str]) -> Iterator[tuple[str, dict]]:
    for path in paths:
        if path.suffix == ".parquet":
            yield from _checked(_parquet_rows(path), fields, lenient, skipped)
        else:
            yield from iter_located_records(path, lenient, skipped, fields)


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    ds = _load_dataset("parquet", data_files=str(path), split="train", what=str(path))
    for i, row in enumerate(ds):
        yield f"{path}: row {i + 1}", dict(row)


# --------------------------------------------------------------------------- hub / tfds


def _load_dataset(*args: Any, what: str, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise RecordError(f"{what}: cannot load with datasets.load_dataset: {e}") from None


def _hf_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    ds = _load_dataset(name, config, split=split, what=f"{name} [{split}]")
    for i, row in enumerate(ds):
        yield f"{name} [{split}] row {i + 1}", dict(row)


def _tfds_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(
            "data.source 'tfds' needs TensorFlow Datasets, which is not installed: "
            "pip install 'tinyllm-jax[tfds]' (or use source 'hf' or 'files')"
        ) from None
    full = f"{name}/{config}" if config else name
    try:
        ds = tfds.load(full, split=split)
    except Exception as e:  # tfds raises many unrelated types for a missing dataset
        raise RecordError(f"{full} [{split}]: cannot load with tfds.load: {e}") from None
    for i, row in enumerate(tfds.as_numpy(ds)):
        yield f"{full} [{split}] row {i + 1}", {k: _from_numpy(v) for k, v in row.items()}


def _from_numpy(v: Any) -> Any:
    """TFDS rows hold bytes and numpy arrays; records hold str and lists."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="surrogateescape")
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [_from_numpy(x) for x in v]
    if isinstance(v, dict):
        return {k: _from_numpy(x) for k, x in v.items()}
    return v


# --------------------------------------------------------------------------- checks


def _checked(rows: Iterable[tuple[str, Any]], fields, lenient: bool, skipped: list[str]) -> Iterator[tuple[str, dict]]:
    """Maps and validates rows read through `datasets` or TFDS, as files' rows are."""
    for where, row in rows:
        try:
            if any(UNDECODABLE.search(v) for v in _strings(row)):
                raise RecordError(f"{where}: not valid UTF-8")
            yield where, validate_record(map_fields(row, fields, where), where)
        except RecordError as err:
            if not lenient:
                raise
            skipped.append(str(err))


def _strings(x: Any) -> Iterator[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def _unique_ids(rows: Iterable[tuple[str, dict]], lenient: bool, skipped: list[str]) -> list[dict]:
    first: dict[str, str] = {}
    out = []
    for where, rec in rows:
        if rec["id"] in first:
            err = RecordError(f"{where}: duplicate id {rec['id']!r} (first seen at {first[rec['id']]})")
            if not lenient:
                raise err
            skipped.append(str(err))
            continue
        first[rec["id"]] = where
        out.append(rec)
    return out
