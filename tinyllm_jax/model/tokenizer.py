"""Tokenizers: loaded through transformers' AutoTokenizer; for the demo and the tests, a
SentencePiece model trained in a second on the texts at hand, saved with a transformers form
that segments exactly as the SentencePiece model does."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from tinyllm_jax.errors import UserError


_ADVISORY = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def _transformers():
    """transformers, imported without the "PyTorch was not found" banner it prints on import
    when torch is absent: tokenizers need no torch, and here torch is only the tests' oracle.
    Only that import is quieted; later advisory warnings print as usual."""
    if "transformers" not in sys.modules and importlib.util.find_spec("torch") is None:
        before = os.environ.get(_ADVISORY)
        os.environ[_ADVISORY] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if before is None:
                del os.environ[_ADVISORY]
            else:
                os.environ[_ADVISORY] = before
    import transformers

    return transformers


def load_tokenizer(name_or_path: str):
    """An HF tokenizer from a local directory or a hub id."""
    AutoTokenizer = _transformers().AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"{name_or_path}: cannot load a tokenizer: {e}") from None


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, model_type: str = "unigram",
                       split_digits: bool = True):
    """Trains a SentencePiece model (unigram or bpe) with T5's special ids (pad 0, eos 1, unk 2),
    saves it in `out_dir` in both forms (`spiece.model`, and `tokenizer.json` that segments
    exactly as it does) and returns the transformers tokenizer loaded back from there.

    `split_digits` (default) makes every digit its own piece, so a number tokenizes the same
    way wherever it stands ("13" alone and "13." at the end of a sentence share "1", "3").
    Training on every string the model will be asked to emit (answers, rationales, the
    separators of target forms) keeps them free of the unknown token."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_prefix=f"{tmp}/spiece",
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            split_digits=split_digits,
            minloglevel=2,
        )
        shutil.copy(f"{tmp}/spiece.model", out_dir / "spiece.model")
    fast_tokenizer(out_dir / "spiece.model").save_pretrained(str(out_dir))
    return load_tokenizer(str(out_dir))


def fast_tokenizer(spiece_model: str | Path):
    """The transformers form of a T5-style SentencePiece model (pad 0, eos 1, unk 2), built
    with the `tokenizers` library so that it segments exactly as SentencePiece does.

    transformers' own T5Tokenizer always builds a *unigram* model from the pieces' scores:
    right for a unigram SentencePiece model, but a BPE model's scores are merge ranks, and
    read as unigram log-probabilities they split what BPE merged (`▁answer` -> `▁an swer`,
    ~11 % more pieces on the demo's texts). Here a BPE model becomes a `tokenizers` BPE with
    the merges ordered by the merged piece's rank (SentencePiece's BPE applies the best
    scoring merge first), a unigram model a Unigram with its scores; the normaliser is the
    model's own compiled character map, and the whitespace handling is SentencePiece's
    (runs of whitespace collapsed, a `▁` before every word). EOS follows each sequence when
    special tokens are added, as with T5's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    t = _transformers()
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, generate_merges

    proto = SentencePieceExtractor(str(spiece_model)).proto
    pieces = [(p.piece, p.score) for p in proto.pieces]
    special = {0: "<pad>", 1: "</s>", 2: "<unk>"}
    found = {i: pieces[i][0] for i in special if i < len(pieces)}
    if found != special:
        raise UserError(f"{spiece_model}: expected T5's special pieces {special}, found {found}")
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", fuse_unk=True)
    elif proto.trainer_spec.model_type == 1:  # unigram
        model = models.Unigram(pieces, unk_id=2)
    else:
        raise UserError(f"{spiece_model}: SentencePiece model type {proto.trainer_spec.model_type} is not supported "
                        "(expected a unigram or BPE model)")
    tok = Tokenizer(model)
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    metaspace = dict(replacement="\u2581", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return t.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


UNKNOWN_FRACTION_LIMIT = 0.05  # real tokenizers leave well under 1 % of English text unknown
COVERAGE_SAMPLE = 2000  # examples looked at


def unknown_fraction(tokenizer, id_arrays) -> float | None:
    """The share of tokens (pad and eos left out) that are the unknown token; None when the
    tokenizer has no unknown token or there are no tokens."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    ignore = {i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None and i != unk}
    total = unknown = 0
    for ids in id_arrays:
        ids = [int(i) for i in ids if int(i) not in ignore]
        total += len(ids)
        unknown += sum(1 for i in ids if i == unk)
    return unknown / total if total else None


def check_coverage(tokenizer, examples, limit: float = UNKNOWN_FRACTION_LIMIT, sample: int = COVERAGE_SAMPLE) -> float | None:
    """Stops a run whose tokenizer maps more than `limit` of the training tokens to the
    unknown token. `examples` has `len()` and `enc(i)` / `dec(i)` token ids (data.streams.Examples);
    an even sample of `sample` of them is looked at. Returns the fraction measured."""
    n = len(examples)
    picks = sorted({int(i * n / min(n, sample)) for i in range(min(n, sample))})
    fraction = unknown_fraction(tokenizer, (ids for i in picks for ids in (examples.enc(i), examples.dec(i))))
    if fraction is not None and fraction > limit:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"tokenizer {name} ({len(tokenizer)} tokens): {fraction:.0%} of the tokens of {len(picks)} training "
            f"examples are the unknown token {tokenizer.unk_token!r} (at most {limit:.0%} expected): it does not "
            "cover the text. A transformers 5 trap: T5Tokenizer(vocab_file=...) ignores the SentencePiece model "
            "and builds a 4-token vocabulary. Load the tokenizer with AutoTokenizer.from_pretrained(DIR) (or from "
            "its tokenizer.json), save that, and point model.tokenizer at it"
        )
    return fraction
