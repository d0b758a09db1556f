"""Streams: the student input layout, one example per stream and rationale sample, stream
ids in config order, truncation that spares question and choices, and the stream checks."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllm_jax.config import ConfigError, StreamConfig
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import (
    Examples, build_examples, format_input, step_by_step_streams, stream_weights, tinyllm_streams,
)
from tinyllm_jax.errors import UserError


def records() -> list[dict]:
    return [
        make_record("a", "which gas do plants take in?", "carbon dioxide", ["oxygen", "carbon dioxide"],
                    rationales={"flan-t5": ["plants use sunlight"], "llama": ["step by step", "a rock is heavier"]}),
        make_record("b", "what is two plus three?", "five", ["four", "five", "six"],
                    rationales={"flan-t5": ["two plus three is five"]}),
    ]


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def test_format_input_is_the_reference_layout_with_context_first():
    rec = make_record("x", "The sun is responsible for", "b", ["puppies", "plants"], context="Stars shine.")
    assert format_input(rec, "predict: ") == (
        "predict: Stars shine.\nThe sun is responsible for\nAnswer Choices:\n(a) puppies\n(b) plants")
    assert format_input(make_record("y", "2+3?", "5")) == "2+3?"


def test_inputs_match_tokenizing_the_whole_text(spm_tokenizer):
    ex = build_examples(records(), tinyllm_streams(), spm_tokenizer, 512, 64)
    for i in range(len(ex)):
        stream = tinyllm_streams()[ex.stream_ids[i]]
        text = format_input(records()[ex.record_index[i]], stream.prefix)
        assert ex.enc(i).tolist() == spm_tokenizer(text)["input_ids"]


def test_one_example_per_stream_and_rationale_sample_in_config_order(spm_tokenizer):
    streams = tinyllm_streams(gamma=1.0, alpha=0.5, beta=0.25)
    ex = build_examples(records(), streams, spm_tokenizer, 512, 64)
    assert ex.stream_names == ["answer", "flan-t5", "llama"]
    got = [(ex.stream_names[s], ex.record_ids[r]) for s, r in zip(ex.stream_ids, ex.record_index)]
    assert got == [("answer", "a"), ("answer", "b"), ("flan-t5", "a"), ("flan-t5", "b"),
                   ("llama", "a"), ("llama", "a")]
    assert ex.stats["llama"].records_without_rationale == 1 and ex.stats["llama"].examples == 2
    eos = spm_tokenizer.eos_token_id
    assert all(ex.dec(i)[-1] == eos and ex.enc(i)[-1] == eos for i in range(len(ex)))
    assert decode(spm_tokenizer, ex.dec(5)) == "a rock is heavier"
    assert decode(spm_tokenizer, ex.enc(4)).startswith("rationale:")
    np.testing.assert_allclose(stream_weights(streams), [1.0, 0.5, 0.25])
    assert [(s.prefix, s.weight) for s in step_by_step_streams(0.3, "palm")] == [("predict: ", 0.3), ("explain: ", 0.7)]


def test_truncation_cuts_context_first_and_keeps_question_and_choices(spm_tokenizer):
    long_context = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    rec = make_record("c", "which gas do plants take in?", "oxygen", ["oxygen", "carbon dioxide"],
                      context=long_context)
    ex = build_examples([rec], tinyllm_streams()[:1], spm_tokenizer, 80, 16)
    text = decode(spm_tokenizer, ex.enc(0))
    assert len(ex.enc(0)) == 80
    assert text.startswith("predict: the quick brown fox")
    assert "which gas do plants take in?" in text
    assert text.endswith("Answer Choices: (a) oxygen (b) carbon dioxide")
    st = ex.stats["answer"]
    assert st.context_truncated == 1 and st.question_truncated == 0


def test_question_is_cut_only_when_unavoidable_and_counted(spm_tokenizer):
    rec = make_record("q", "the quick brown fox jumps over the lazy dog and then what is two plus three?",
                      "five", ["four", "five"], context="numbers 0 1 2 3")
    full = len(spm_tokenizer(format_input({**rec, "context": ""}, "predict: "))["input_ids"])
    ex = build_examples([rec], tinyllm_streams()[:1], spm_tokenizer, full - 5, 16)
    text = decode(spm_tokenizer, ex.enc(0))
    assert "numbers" not in text and "what is two plus three?" in text  # the ask survives
    assert text.endswith("Answer Choices: (a) four (b) five")
    assert ex.stats["answer"].question_truncated == 1 and ex.stats["answer"].context_truncated == 1


def test_choices_that_cannot_fit_are_an_error_or_skipped_when_lenient(spm_tokenizer):
    fits = max(len(spm_tokenizer(format_input(r, "predict: "))["input_ids"]) for r in records())
    recs = records() + [make_record("long", "q?", "x", ["the quick brown fox jumps over the lazy dog"] * 4)]
    with pytest.raises(UserError, match=rf"record 'long', stream 'answer': prefix and answer choices.*max_input_length {fits}"):
        build_examples(recs, tinyllm_streams()[:1], spm_tokenizer, fits, 16)
    ex = build_examples(recs, tinyllm_streams()[:1], spm_tokenizer, fits, 16, lenient=True)
    assert ex.record_ids[ex.record_index[-1]] == "b" and len(ex.stats["answer"].skipped) == 1


def test_targets_are_cut_at_max_target_length_and_counted(spm_tokenizer):
    ex = build_examples(records(), tinyllm_streams(), spm_tokenizer, 512, 6)
    assert ex.dec_lengths.max() == 6 and all(ex.dec(i)[-1] == spm_tokenizer.eos_token_id for i in range(len(ex)))
    assert ex.stats["flan-t5"].target_truncated == 2


def test_unknown_teacher_and_duplicate_streams_are_config_errors(spm_tokenizer):
    streams = tinyllm_streams() + [StreamConfig("gpt", "gpt: ", 1.0, teacher="gpt4")]
    with pytest.raises(ConfigError, match=r"data.streams\[3\] \('gpt'\): teacher 'gpt4'.*teachers found: flan-t5, llama"):
        build_examples(records(), streams, spm_tokenizer)
    with pytest.raises(ConfigError, match="unique"):
        build_examples(records(), tinyllm_streams()[:1] * 2, spm_tokenizer)


def test_answer_source_takes_the_teachers_answer_and_counts_gold_fallbacks(spm_tokenizer):
    recs = records()
    recs[0]["teacher_answers"] = {"flan-t5": ["oxygen"]}
    ex = build_examples(recs, tinyllm_streams()[:1], spm_tokenizer, answer_source="flan-t5")
    assert decode(spm_tokenizer, ex.dec(0)) == "oxygen" and decode(spm_tokenizer, ex.dec(1)) == "five"
    assert ex.stats["answer"].answer_from_gold == 1
    with pytest.raises(ConfigError, match="answer_source: teacher 'llama'"):
        build_examples(recs, tinyllm_streams()[:1], spm_tokenizer, answer_source="llama")


def test_examples_are_cached_and_reloaded(spm_tokenizer, tmp_path):
    first = build_examples(records(), tinyllm_streams(), spm_tokenizer, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("examples-*.npz")
    cached.write_bytes(cached.read_bytes())  # the file, not a rebuild, answers next time
    again = build_examples(records(), tinyllm_streams(), spm_tokenizer, cache_dir=tmp_path)
    for name in ("enc_tokens", "enc_offsets", "dec_tokens", "dec_offsets", "stream_ids", "record_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert again.stats == first.stats and again.record_ids == first.record_ids
    build_examples(records(), step_by_step_streams(0.5, "flan-t5"), spm_tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("examples-*.npz"))) == 2  # other streams, other key


def test_subset_and_stream_selection(spm_tokenizer):
    ex = build_examples(records(), tinyllm_streams(), spm_tokenizer)
    llama = ex.stream("llama")
    assert len(llama) == 2 and set(llama.stream_ids.tolist()) == {2}
    assert [llama.dec(i).tolist() for i in range(2)] == [ex.dec(4).tolist(), ex.dec(5).tolist()]
    assert isinstance(ex.subset([]), Examples) and len(ex.subset([])) == 0
