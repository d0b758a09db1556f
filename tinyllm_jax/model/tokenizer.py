"""Tokenizers: loaded through transformers' AutoTokenizer; for the demo and the tests, a
SentencePiece model trained in a second on the texts at hand, saved as a T5 tokenizer."""

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


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, model_type: str = "unigram"):
    """Trains a SentencePiece model (unigram or bpe) with T5's special ids (pad 0, eos 1, unk 2),
    saves it in `out_dir` as a transformers T5 tokenizer and returns the tokenizer."""
    import sentencepiece as spm

    T5Tokenizer = _transformers().T5Tokenizer

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
            minloglevel=2,
        )
        shutil.copy(f"{tmp}/spiece.model", out_dir / "spiece.model")
    tok = T5Tokenizer.from_pretrained(str(out_dir), extra_ids=0)
    tok.save_pretrained(str(out_dir))
    return tok


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
