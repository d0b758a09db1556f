"""Jitted decoding with a KV cache: greedy, or sampled (temperature, top-k, top-p).

The whole loop is one `lax.while_loop` inside one `jax.jit`: the encoder runs once, the
cross-attention keys and values are projected once, and the loop stops as soon as every
sequence has emitted EOS. Inputs may carry a batch sharding; XLA propagates it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyllm_jax.model.t5 import T5, T5Config


def _filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    if top_k > 0:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
    return logits_BxV


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg: T5Config, max_new_tokens: int, temperature: float, top_k: int, top_p: float, eos_id: int) -> Callable:
    model = T5(cfg)

    def run(params, tokens_BxL, rng):
        B = tokens_BxL.shape[0]
        enc_mask = tokens_BxL != 0
        variables = {"params": params}
        encoded = model.apply(variables, tokens_BxL, enc_mask.astype(jnp.int32), method=T5.encode)
        cross = model.apply(variables, encoded, method=T5.cross_kv)
        cache = model.apply(variables, B, max_new_tokens, method=T5.init_cache)
        bias = model.apply(variables, max_new_tokens, method=T5.decoder_bias)
        out = jnp.zeros((B, max_new_tokens), jnp.int32)
        start = jnp.full((B,), cfg.decoder_start_token_id, jnp.int32)
        done = jnp.zeros((B,), bool)

        def cond(state):
            step, _, _, done, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, token, cache, done, out = state
            logits, cache = model.apply(variables, token, step, cache, cross, enc_mask, bias,
                                        method=T5.decode_step)
            if temperature > 0.0:
                logits = _filter_logits(logits / temperature, top_k, top_p)
                nxt = jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1).astype(jnp.int32)
            else:
                nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, 0, nxt)
            out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
            return step + 1, nxt, cache, done | (nxt == eos_id), out

        return jax.lax.while_loop(cond, body, (jnp.int32(0), start, cache, done, out))[-1]

    return jax.jit(run)


def generate(model_or_cfg: T5 | T5Config, params: Any, encoder_tokens: Any, max_new_tokens: int, *,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None) -> jax.Array:
    """Decodes [B, L] 0-padded encoder tokens into [B, max_new_tokens] ids: EOS included,
    zeros after it. Greedy unless `temperature` > 0 (then `rng` is required)."""
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, T5) else model_or_cfg
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key `rng`")
    rng = rng if rng is not None else jax.random.key(0)
    fn = _decode_fn(cfg, int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                    cfg.eos_token_id if eos_id is None else int(eos_id))
    return fn(params, jnp.asarray(encoder_tokens, jnp.int32), rng)


def bucket_length(n: int, multiple: int = 16) -> int:
    """Pads lengths to a few shapes so that batches of similar length share one compile."""
    if n <= 64:
        return max(multiple, -(-n // multiple) * multiple)
    return 1 << (n - 1).bit_length()


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_ids(cfg: T5Config, params: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: int,
                 batch_size: int = 32, progress: bool = False, shard_batch: Callable | None = None,
                 **sampling) -> list[list[int]]:
    """Decodes many inputs: length-sorted batches padded to bucketed lengths and to a fixed
    batch size (so shapes repeat), results returned in input order, cut at EOS."""
    from tqdm.auto import tqdm

    results: list[list[int]] = [[] for _ in token_lists]
    batches = length_sorted_batches([len(t) for t in token_lists], batch_size)
    for idx in tqdm(batches, desc="decode", unit="batch", disable=not progress):
        L = bucket_length(max(len(token_lists[i]) for i in idx))
        arr = np.zeros((batch_size, L), np.int32)
        for r, i in enumerate(idx):
            arr[r, :len(token_lists[i])] = token_lists[i]
        tokens = shard_batch(arr) if shard_batch is not None else arr
        out = generate(cfg, params, tokens, max_new_tokens, **sampling)
        if not out.is_fully_addressable:  # multi-host: every process gets every row
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        out = np.asarray(jax.device_get(out))
        for r, i in enumerate(idx):
            results[i] = strip_after_eos(out[r].tolist(), cfg.eos_token_id)
    return results


def strip_after_eos(ids: Iterable[int], eos_id: int) -> list[int]:
    res = []
    for t in ids:
        if t == eos_id:
            break
        res.append(int(t))
    return res


def generate_texts(cfg: T5Config, params: Any, tokenizer, texts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 32, max_input_length: int | None = None, progress: bool = False,
                   shard_batch: Callable | None = None, **sampling) -> list[str]:
    """Text in, text out: tokenises, decodes with `generate_ids`, detokenises."""
    enc = tokenizer(list(texts), truncation=max_input_length is not None, max_length=max_input_length)["input_ids"]
    ids = generate_ids(cfg, params, enc, max_new_tokens, batch_size, progress, shard_batch, **sampling)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
