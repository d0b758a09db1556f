"""data.validation_from_train: a stable hashed hold-out of train selects checkpoints."""

from __future__ import annotations

import dataclasses

import pytest

from tinyllm_jax.config import ConfigError, DataConfig
from tinyllm_jax.data.records import make_record, write_jsonl
from tinyllm_jax.data.sources import has_split, load_split


def test_hold_out_is_disjoint_covering_and_stable(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [make_record(f"q{i}", f"question {i}?", "yes") for i in range(400)])
    cfg = DataConfig(train=[str(path)], validation_from_train=0.25)
    assert has_split(cfg, "validation") and not has_split(DataConfig(train=[str(path)]), "validation")
    train, _ = load_split(cfg, "train")
    valid, _ = load_split(cfg, "validation")
    ids_t, ids_v = {r["id"] for r in train}, {r["id"] for r in valid}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 400
    assert 70 <= len(ids_v) <= 130
    assert {r["id"] for r in load_split(cfg, "validation")[0]} == ids_v  # stable
    other = {r["id"] for r in load_split(dataclasses.replace(cfg, shuffle_seed=1), "validation")[0]}
    assert other != ids_v
    # an explicit validation split wins over the hold-out
    write_jsonl(tmp_path / "valid.jsonl", [make_record("v1", "q?", "no")])
    explicit = dataclasses.replace(cfg, validation=[str(tmp_path / "valid.jsonl")])
    assert [r["id"] for r in load_split(explicit, "validation")[0]] == ["v1"]
    assert len(load_split(explicit, "train")[0]) == 400
    with pytest.raises(ConfigError, match="validation_from_train"):
        load_split(dataclasses.replace(cfg, validation_from_train=1.5), "train")
