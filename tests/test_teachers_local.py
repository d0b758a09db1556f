"""The local JAX T5 teacher: batched greedy and sampled decoding of a batch of records."""

from __future__ import annotations

import pytest

from conftest import make_hf_t5
from test_teachers_support import load, read_lines, write_config
from tinyllm_jax.teachers.generate import generate_rationales
from tinyllm_jax.teachers.prompts import load_template


def _run(tmp_path, model_dir, **teacher):
    cfg = write_config(tmp_path, {"backend": "local-t5", "model": str(model_dir), "batch_size": 2, "max_tokens": 8,
                                  **teacher}, records=5, examples=3)
    report = generate_rationales(load(cfg))
    assert report["complete"]
    return report, read_lines(tmp_path / "out" / "train.jsonl"), read_lines(tmp_path / "out" / "cache.jsonl")


@pytest.fixture(scope="module")
def sharp_t5_dir(tmp_path_factory, spm_tokenizer_dir):
    """The tiny test T5 with a larger init: its greedy answers depend on the prompt (the
    default init answers every prompt alike, which would hide a prompt mix-up)."""
    return make_hf_t5(tmp_path_factory.mktemp("sharp_t5"), spm_tokenizer_dir, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, initializer_factor=5.0)


def test_local_t5_greedy_matches_the_decoder_on_each_prompt(tmp_path, sharp_t5_dir):
    from tinyllm_jax.eval.decode import generate_texts
    from tinyllm_jax.model.hf import load_pretrained

    report, recs, cache = _run(tmp_path, sharp_t5_dir)
    assert len({e["raw"] for e in cache}) >= 3, "the model answers every prompt alike: the test would prove nothing"
    assert report["teachers"]["t1"]["train"]["new"] == 5 and len(cache) == 5
    # the oracle: the same prompts decoded one by one (no batching, no length buckets shared)
    seeds = {r["id"]: r for r in read_lines(tmp_path / "data" / "seed.jsonl")}
    template = load_template("teacher_forcing", {})
    _, params, tok, cfg = load_pretrained(str(sharp_t5_dir))
    entries = {e["record_id"]: e for e in cache}
    for rec in recs:
        entry = entries[rec["id"]]
        assert entry["settings"]["backend"] == "local-t5" and entry["settings"]["temperature"] == 0.0
        assert len(entry["examples"]) == 2 and rec["id"] not in entry["examples"]
        prompt = template.prompt(rec, [(seeds[i], seeds[i]["rationales"]["t1"][0]) for i in entry["examples"]])
        expected = generate_texts(cfg, params, tok, [prompt], 8, batch_size=1)[0]
        assert entry["raw"] == expected
        if expected.strip():
            assert rec["rationales"]["t1"] == [expected.strip()]
        else:  # an empty answer is never stored as a rationale
            assert "t1" not in rec["rationales"]


def test_local_t5_sampling_is_seeded_and_resumable(tmp_path, tiny_t5_dir):
    sampling = {"num_samples": 2, "temperature": 1.0, "top_k": 20, "top_p": 0.95}
    _, recs, cache = _run(tmp_path / "a", tiny_t5_dir, **sampling)
    assert sorted((e["record_id"], e["sample"]) for e in cache) == [(f"q{i}", s) for i in range(5) for s in (0, 1)]
    assert len({e["raw"] for e in cache}) > 1, "sampling gave one text for every request"
    _, recs_b, cache_b = _run(tmp_path / "b", tiny_t5_dir, **sampling)  # same seed, fresh output: same texts
    assert sorted((e["request_hash"], e["raw"]) for e in cache_b) == sorted((e["request_hash"], e["raw"]) for e in cache)
    assert recs_b == recs
    # a rerun over the full cache decodes nothing and writes the same records
    (tmp_path / "a" / "out" / "train.jsonl").unlink()
    report, recs_again, _ = _run(tmp_path / "a", tiny_t5_dir, **sampling)
    assert report["teachers"]["t1"]["train"]["cached"] == 10 and report["teachers"]["t1"]["train"]["new"] == 0
    assert recs_again == recs
