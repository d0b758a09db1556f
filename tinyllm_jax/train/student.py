"""The student and its tokenizer for a run: imported from a Hugging Face checkpoint, or
built from the config's architecture (with the demo's own SentencePiece tokenizer)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, ConfigError
from tinyllm_jax.model.t5 import T5Config


def prepare_demo_data(cfg: Config, data_dir: Path, write: bool = True) -> Config:
    """With a `demo:` section, writes the generated data set into `data_dir` (without
    `write`: only points at it, as a resumed run and the other processes of a multi-host
    run do) and points data.train/validation/test at it."""
    if not cfg.demo:
        return cfg
    from tinyllm_jax.data.demo import FILE_NAMES, write_demo_from_options

    opts = {k: v for k, v in cfg.demo.items() if k != "vocab_size"}  # vocab_size: the tokenizer's
    paths = (write_demo_from_options(data_dir, opts) if write
             else {split: str(Path(data_dir) / name) for split, name in FILE_NAMES.items()})
    data = dataclasses.replace(cfg.data, train=[str(paths["train"])], validation=[str(paths["validation"])],
                               test=[str(paths["test"])])
    return dataclasses.replace(cfg, data=data)


def build_student(cfg: Config, run_dir: Path, scratch: Path | None = None) -> tuple[T5Config, Any, Any | None]:
    """(architecture, tokenizer, imported params or None); writes nothing into RUN_DIR. A
    resumed run takes the tokenizer saved in RUN_DIR/tokenizer; one trained here
    (`model.train_tokenizer_vocab`, the demo) is trained into `scratch` (a temporary
    folder) until `save_student` keeps it."""
    m = cfg.model
    tok_dir = run_dir / "tokenizer"
    params = None
    if m.init:  # an HF directory, a hub id, or one of our runs (its selected checkpoint)
        from tinyllm_jax.runs import load_model

        loaded = load_model(m.init, tokenizer=m.tokenizer is None)
        params, tokenizer = loaded.params, loaded.tokenizer
        t5cfg = loaded.t5cfg.replace(dtype=m.dtype, remat=m.remat, dropout_rate=m.dropout_rate)
    else:
        shared = {f.name: getattr(m, f.name) for f in dataclasses.fields(T5Config) if hasattr(m, f.name)}
        t5cfg = T5Config(**shared, scale_decoder_outputs=m.tie_word_embeddings)
        tokenizer = None
    if m.tokenizer:
        from tinyllm_jax.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(m.tokenizer)
    elif tokenizer is None and (tok_dir / "tokenizer_config.json").is_file():
        from tinyllm_jax.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tok_dir))  # a resumed run keeps the tokenizer it trained
    elif tokenizer is None and (cfg.demo or m.train_tokenizer_vocab):
        tokenizer = _train_demo_tokenizer(cfg, scratch if scratch is not None else tok_dir)
    elif tokenizer is None:
        raise ConfigError("model.tokenizer: required when model.init is not set (an HF tokenizer directory or hub id; "
                          "or model.train_tokenizer_vocab to train one on the training records)")
    if len(tokenizer) > t5cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={t5cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return t5cfg, tokenizer, params


def save_student(run_dir: Path, t5cfg: T5Config, tokenizer) -> None:
    """RUN_DIR/tokenizer and RUN_DIR/model_config.json, for evaluation and export."""
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(t5cfg), indent=2))


def _train_demo_tokenizer(cfg: Config, tok_dir: Path):
    """A SentencePiece BPE tokenizer trained on every training record (all of data.train,
    through data.fields) and the stream prefixes."""
    from tinyllm_jax.data.demo import DEMO_PHRASES, demo_texts
    from tinyllm_jax.data.sources import load_split
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    records, _ = load_split(cfg.data, "train")
    extra = [s.prefix for s in cfg.data.streams]
    if cfg.model.train_tokenizer_vocab:  # a recipe's later stages also train on the demo teachers' feedback
        extra += list(DEMO_PHRASES)
    texts = demo_texts(records, extra=extra)
    # BPE: on a corpus this small, unigram stops near single characters
    vocab = cfg.model.train_tokenizer_vocab or int(cfg.demo.get("vocab_size", 256))
    return train_sentencepiece(texts, tok_dir, vocab_size=vocab, model_type="bpe")
