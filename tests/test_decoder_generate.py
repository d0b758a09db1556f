"""Incremental decoding of the decoder family: prefill + decode_step against the full forward,
and the jitted generate loop against transformers' generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decoder_fixtures import BOS, FIRST_PLAIN_TOKEN, PAD, VARIANTS, bpe_tokenizer, decoder_dir, load_hf  # noqa: F401
from tinyllm_jax.model.decoder import Decoder
from tinyllm_jax.model.decoder_generate import DenseCache, generate
from tinyllm_jax.model.decoder_hf import load_pretrained

TOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, decoder_dir):
    path = decoder_dir(request.param)
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    return request.param, path, params, cfg


def test_prefill_then_decode_steps_equal_full_forward(variant):
    """Rows with prompts of 3 and 11 tokens are prefilled, then fed the rest of their tokens one
    a step, each row at its own position: every step's logits equal the full forward's."""
    name, _, params, cfg = variant
    rng = np.random.default_rng(0)
    L, lengths = 20, np.array([3, 11])
    tokens = jnp.asarray(rng.integers(FIRST_PLAIN_TOKEN, 120, (2, L)), jnp.int32)
    model = Decoder(cfg)
    full = np.asarray(model.apply({"params": params}, tokens))
    mask = jnp.arange(L)[None] < lengths[:, None]
    kvs = model.apply({"params": params}, tokens, mask, method=Decoder.prefill)
    assert kvs[0][0].shape == (2, cfg.num_key_value_heads, L, cfg.head_size)
    caches = [DenseCache.from_prefill(kv, mask, L, cfg.sliding_window) for kv in kvs]
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Decoder.decode_step))
    for i in range(L - lengths.max()):
        pos = jnp.asarray(lengths + i, jnp.int32)
        caches = [c._replace(pos=pos) for c in caches]
        logits, caches = step(params, tokens[jnp.arange(2), pos], pos, caches)
        want = full[np.arange(2), np.asarray(pos)]
        assert np.abs(np.asarray(logits) - want).max() <= TOL, (name, i)


def _hf_greedy(hf, prompts, max_new, eos):
    out = []
    for p in prompts:
        with torch.no_grad():
            seq = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                              max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos) or None,
                              pad_token_id=PAD)
        out.append(seq[0, len(p):].tolist())
    return out


def test_greedy_generate_equals_transformers(variant):
    """Ragged prompts (one of them BOS alone), greedy: token for token what transformers'
    generate gives each prompt alone; then again stopping at either of two eos ids, which some
    rows meet early."""
    name, path, params, cfg = variant
    rng = np.random.default_rng(1)
    prompts = [[BOS], [BOS, *rng.integers(FIRST_PLAIN_TOKEN, 120, 8)], [BOS, *rng.integers(FIRST_PLAIN_TOKEN, 120, 3)]]
    prompts = [[int(t) for t in p] for p in prompts]
    hf = load_hf(path)
    n = 12
    free = generate(cfg, params, prompts, n, eos_ids=())
    assert [len(row) for row in free] == [n] * len(prompts)
    assert free == _hf_greedy(hf, prompts, n, ()), name
    eos = (free[1][4], free[2][6])
    stopped = generate(cfg, params, prompts, n, eos_ids=eos)
    assert stopped == _hf_greedy(hf, prompts, n, eos), name
    assert min(len(row) for row in stopped) < n
    for row in stopped:
        assert all(t not in eos for t in row[:-1]) and (len(row) == n or row[-1] in eos)


def test_sampled_generate(decoder_dir):
    """Sampling: the same key gives the same tokens, another key others; near temperature 0 it
    is greedy."""
    params, cfg, _ = load_pretrained(str(decoder_dir("qwen2_bias_tied")), tokenizer=False)
    prompts = [[BOS, 10, 11, 12], [BOS]]
    a = generate(cfg, params, prompts, 10, eos_ids=(), key=jax.random.PRNGKey(1))
    assert a == generate(cfg, params, prompts, 10, eos_ids=(), key=jax.random.PRNGKey(1))
    assert a != generate(cfg, params, prompts, 10, eos_ids=(), key=jax.random.PRNGKey(2))
    assert all(0 <= t < cfg.vocab_size for row in a for t in row)
    cold = generate(cfg, params, prompts, 10, eos_ids=(), key=jax.random.PRNGKey(1), temperature=1e-4)
    assert cold == generate(cfg, params, prompts, 10, eos_ids=())
