"""The local-T5 teacher on the generation engine: each sampled answer comes from its
request's own seed, so it does not depend on how many prompts decode at once."""

from __future__ import annotations

from test_teachers_support import load, read_lines, write_config
from tinyllm_jax.teachers.generate import generate_rationales


def _answers(tmp_path, model_dir, batch_size):
    cfg = write_config(tmp_path, {"backend": "local-t5", "model": str(model_dir), "batch_size": batch_size,
                                  "max_tokens": 8, "num_samples": 2, "temperature": 1.0, "top_k": 20},
                       records=5, examples=3)
    assert generate_rationales(load(cfg))["complete"]
    return {(e["record_id"], e["sample"]): (e["seed"], e["raw"]) for e in read_lines(tmp_path / "out" / "cache.jsonl")}


def test_sampled_answers_do_not_depend_on_the_batch_size(tmp_path, tiny_t5_dir):
    one = _answers(tmp_path / "one", tiny_t5_dir, 1)
    three = _answers(tmp_path / "three", tiny_t5_dir, 3)
    assert len(one) == 10 and one == three
    assert len({raw for _, raw in one.values()}) > 1, "every sample alike: the test would prove little"
