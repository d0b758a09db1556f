"""The tokenizer we train is the tokenizer we use: its transformers form segments exactly as
its SentencePiece model does, numbers split the same way wherever they stand, and every
target of every demo stream has pieces of its own (no unknown token)."""

from __future__ import annotations

import pytest

from tinyllm_jax.config import StreamConfig
from tinyllm_jax.data.demo import DEMO_PHRASES, feedback_text, make_demo_records
from tinyllm_jax.data.streams import render_target, tokenizer_corpus
from tinyllm_jax.model.tokenizer import load_tokenizer, train_sentencepiece

STREAMS = [StreamConfig("answer", "predict: ", 1.0), StreamConfig("careful", "explain: ", 1.0, teacher="careful"),
           StreamConfig("terse", "rationale: ", 1.0, teacher="terse"),
           StreamConfig("chains", "solve: ", 1.0, teacher="careful", target="{rationale} --> {answer}")]
AWKWARD = ["  leading and   repeated   spaces ", "tabs\tand\nnew\n\nlines", "ﬁ ligature, Ａ full width",
           "unseen ✓ ☃ 中文 characters", "13 13. 13, 21.5 1,000 -7", "", " ", "-->", "a-->b --> c"]


@pytest.fixture(scope="module")
def demo_corpus():
    records = make_demo_records(400, 0, "train")
    return records, tokenizer_corpus(records, STREAMS, extra=list(DEMO_PHRASES))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_transformers_segments_as_sentencepiece(tmp_path, demo_corpus, model_type):
    import sentencepiece as spm

    _, texts = demo_corpus
    train_sentencepiece(texts, tmp_path, vocab_size=256, model_type=model_type)
    hf = load_tokenizer(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    differ = [t for t in texts + AWKWARD if hf(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    assert not differ, f"{len(differ)} of {len(texts) + len(AWKWARD)} texts differ, e.g. {differ[:3]}"
    # T5's special ids, EOS after a sequence, and text back out
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    ids = hf("Tom has 13 apples.")["input_ids"]
    assert ids[-1] == 1 and hf.decode(ids, skip_special_tokens=True) == "Tom has 13 apples."


def test_bpe_pieces_are_the_merged_ones(tmp_path, demo_corpus):
    """The words the BPE model merged stay whole (transformers' T5Tokenizer splits them)."""
    _, texts = demo_corpus
    hf = train_sentencepiece(texts, tmp_path, vocab_size=256, model_type="bpe")
    assert hf.tokenize("So the answer is") == ["▁So", "▁the", "▁answer", "▁is"]


def test_a_rationales_final_answer_has_the_answer_streams_pieces(tmp_path, demo_corpus):
    records, texts = demo_corpus
    tok = train_sentencepiece(texts, tmp_path, vocab_size=256, model_type="bpe")
    for r in records[:200]:
        answer = tok(r["answer"], add_special_tokens=False)["input_ids"]
        for rationale in r["rationales"]["careful"] + r["rationales"]["terse"]:
            ids = tok(rationale, add_special_tokens=False)["input_ids"]
            final = tok(rationale.rsplit(" ", 1)[1], add_special_tokens=False)["input_ids"]  # "13."
            assert final[:-1] == answer or not rationale.endswith(f" {r['answer']}."), (rationale, final, answer)
            assert ids[-len(final):] == final
    for n in range(0, 40):  # every number, alone, in a sentence, before a full stop
        alone = tok(str(n), add_special_tokens=False)["input_ids"]
        inside = tok(f"is {n}.", add_special_tokens=False)["input_ids"]
        assert inside[-1 - len(alone):-1] == alone, n


def test_no_unknown_token_in_any_demo_stream(tmp_path, demo_corpus):
    """Every target the demo recipes train (answers, both teachers, Mentor-KD's chains with
    `-->`, FAIR's feedback and review replies) and every prefix reads without <unk>."""
    records, texts = demo_corpus
    tok = train_sentencepiece(texts, tmp_path, vocab_size=256, model_type="bpe")
    targets = [s.prefix for s in STREAMS]
    for r in records:
        targets.append(r["answer"])
        for s in STREAMS[1:]:
            targets += [render_target(s.target, x, r["answer"]) for x in r["rationales"][s.teacher]]
    targets += [feedback_text("Eva", 12, [3, -8], 7, "9"), "The rationale is sound. Score: [5]"]
    unknown = [t for t in targets if tok.unk_token_id in tok(t, add_special_tokens=False)["input_ids"]]
    assert not unknown, unknown[:3]
    assert tok.tokenize("x --> 5")[-3:] in (["▁-->", "▁", "5"], ["▁--", ">", "▁", "5"], ["▁-", "-", ">", "▁", "5"])
