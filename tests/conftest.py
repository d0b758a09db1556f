"""Shared test fixtures: every model and tokenizer is made here, nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The reference systems' published data as archives (see README, "Converting the reference
# systems' data"): TINYLLM_SHARED_DATA names the folder, else ../shared/data beside the repo.
SHARED_DATA_ENV = "TINYLLM_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data")

def pytest_configure(config):
    """One persistent JAX compilation cache for the session, shared with every subprocess the
    tests start: the many small training runs compile the same steps, and each compiles once.
    A fresh folder each session (removed at exit), so no entry outlives the code it came from."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import atexit
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="tinyllm-test-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus three? the answer is five",
    "Answer Choices: (a) red (b) blue (c) green (d) yellow",
    "predict: explain: rationale: so the answer is (b)",
    "Question: which gas do plants take in? Options: (a) oxygen (b) carbon dioxide",
    "Let's think step by step. Plants use sunlight to make food.",
    "Thus, the answer is (c) the sun. Q: what is 12 times 3?",
    "A rock is heavier than a feather because it has more mass.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals",
]


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece T5 tokenizer (vocab about 100) trained on a few sentences."""
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("spm_tok")
    train_sentencepiece(SENTENCES * 20, out, vocab_size=100)
    return out


@pytest.fixture(scope="session")
def spm_tokenizer(spm_tokenizer_dir):
    from tinyllm_jax.model.tokenizer import load_tokenizer

    return load_tokenizer(str(spm_tokenizer_dir))


def make_hf_t5(out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """A tiny random transformers T5ForConditionalGeneration saved with save_pretrained."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20,
              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**kw)).eval()
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """A tiny random v1.1-style (gated-GELU, untied) HF T5 with the test tokenizer."""
    return make_hf_t5(tmp_path_factory.mktemp("tiny_t5"), spm_tokenizer_dir,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def shared_data_or_skip(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present: real reference data lives outside the repo; set "
                    f"{SHARED_DATA_ENV}=/path/to/folder holding {name} to run this test")
    return path
