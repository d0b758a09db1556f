"""Evaluation.predict with sampling: each record draws from its own seed (the run's seed and
the record id), so its row does not depend on the slot count or on the other records."""

from __future__ import annotations

import dataclasses
import json

from tinyllm_jax.config import Config, DataConfig, EvalConfig, StreamConfig, TrainConfig
from tinyllm_jax.data.records import make_record
from tinyllm_jax.eval.evaluate import Evaluation
from tinyllm_jax.runtime.seeds import stable_seed
from tinyllm_jax.runs import load_model


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sampled_rows_follow_the_record_not_the_batch(tmp_path, tiny_t5_dir):
    model = load_model(str(tiny_t5_dir))
    records = [make_record(f"q{i}", f"what is {i} plus {i + 1}?", str(2 * i + 1), []) for i in range(7)]
    stream = StreamConfig(name="answer", prefix="predict: ", weight=1.0)

    def rows(recs, batch_size, seed):
        data = DataConfig(train=[_write(tmp_path / "t.jsonl", recs)], streams=[stream])
        cfg = Config(data=data, eval=EvalConfig(task="text", max_new_tokens=12, batch_size=batch_size),
                     train=TrainConfig(progress=False))
        sampling = {"temperature": 1.0, "top_k": 20, "seed": seed}
        return {r["id"]: r["prediction"] for r in Evaluation(cfg, model.arch, model.tokenizer).predict(
            model.params, "train", sampling)}

    a = rows(records, 2, 7)
    assert rows(records, 5, 7) == a                      # the slot count does not matter
    assert rows(records[::-1], 3, 7) == a                # nor the order of the records
    assert rows(records[2:5], 2, 7) == {k: a[k] for k in ("q2", "q3", "q4")}  # nor the others
    assert rows(records, 2, 8) != a                      # the seed does
    assert len(set(a.values())) > 1                      # and it samples
    assert stable_seed(7, "q1") == stable_seed("7", "q1") != stable_seed(7, "q2")
    assert 0 <= stable_seed(2**70, "x") < 2**31 and stable_seed("a", "bc") != stable_seed("ab", "c")
