"""The student and its tokenizer for a run: imported from a Hugging Face checkpoint, or
built from the config's architecture (with the demo's own SentencePiece tokenizer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, ConfigError, ModelConfig
from tinyllm_jax.model.family import arch_to_json
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


def build_student(cfg: Config, run_dir: Path, scratch: Path | None = None) -> tuple[Any, Any, Any | None]:
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
        arch = loaded.arch.replace(dtype=m.dtype, remat=m.remat, dropout_rate=m.dropout_rate)
    elif m.family == "t5":
        shared = {f.name: getattr(m, f.name) for f in dataclasses.fields(T5Config) if hasattr(m, f.name)}
        arch = T5Config(**shared, scale_decoder_outputs=m.tie_word_embeddings)
        tokenizer = None
    else:
        arch, tokenizer = None, None  # a decoder-only student: built once its tokenizer's special ids are known
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
    if arch is None:
        arch = decoder_from_scratch(m, tokenizer)
    if len(tokenizer) > arch.vocab_size:
        raise ConfigError(f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return arch, tokenizer, params


def decoder_from_scratch(m: ModelConfig, tokenizer) -> Any:
    """A decoder-only architecture (`model.family`: llama, mistral, qwen2, qwen3) from the
    model section's sizes, with its tokenizer's special ids."""
    from tinyllm_jax.model.decoder import DecoderConfig
    from tinyllm_jax.errors import UserError

    try:
        return DecoderConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads, model_type=m.family,
            head_dim=m.d_kv, rms_norm_eps=m.layer_norm_epsilon, rope_theta=m.rope_theta,
            max_position_embeddings=m.max_position_embeddings, attention_bias=m.family == "qwen2",
            qk_norm=m.family == "qwen3", tie_word_embeddings=m.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
            pad_token_id=tokenizer.pad_token_id, dropout_rate=m.dropout_rate, dtype=m.dtype, remat=m.remat)
    except UserError as e:
        raise ConfigError(f"model (family {m.family}): {e}") from None


def save_student(run_dir: Path, arch: Any, tokenizer) -> None:
    """RUN_DIR/tokenizer and RUN_DIR/model_config.json, for evaluation and export."""
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    (run_dir / "model_config.json").write_text(arch_to_json(arch))


def _train_demo_tokenizer(cfg: Config, tok_dir: Path):
    """A SentencePiece BPE tokenizer trained on every training record (all of data.train,
    through data.fields), the stream prefixes and `model.tokenizer_texts`."""
    from tinyllm_jax.data.demo import DEMO_PHRASES
    from tinyllm_jax.data.sources import load_split
    from tinyllm_jax.data.streams import tokenizer_corpus
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    records, _ = load_split(cfg.data, "train")
    extra = list(cfg.model.tokenizer_texts)
    if cfg.demo or any(r["id"].startswith("demo-") for r in records[:1]):
        extra += list(DEMO_PHRASES)  # what the demo teachers say in feedback and reviews
    texts = tokenizer_corpus(records, cfg.data.streams, extra=extra)
    # BPE: on a corpus this small, unigram stops near single characters
    vocab = cfg.model.train_tokenizer_vocab or int(cfg.demo.get("vocab_size", 256))
    return train_sentencepiece(texts, tok_dir, vocab_size=vocab, model_type="bpe", numbers=cfg.model.tokenizer_numbers)
