"""Tokenizers: loaded through transformers' AutoTokenizer; for the demo and the tests, a
SentencePiece model trained in a second on the texts at hand, saved as a T5 tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from tinyllm_jax.errors import UserError


def load_tokenizer(name_or_path: str):
    """An HF tokenizer from a local directory or a hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"{name_or_path}: cannot load a tokenizer: {e}") from None


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, model_type: str = "unigram"):
    """Trains a SentencePiece model (unigram or bpe) with T5's special ids (pad 0, eos 1, unk 2),
    saves it in `out_dir` as a transformers T5 tokenizer and returns the tokenizer."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

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
