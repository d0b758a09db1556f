"""Decoding entry points: `generate_ids` and `generate_texts`, what every caller uses
(`tinyllm predict`, evaluation, the local-T5 teacher, the recipes' bulk generation). They run
on the generation engine (eval/engine.py: continuous batching over slots, greedy or sampled
with per-request seeds).

`generate` is the fixed-batch decoder: one `lax.while_loop` inside one `jax.jit` over a
[B, L] batch; the encoder runs once, the cross-attention keys and values are projected once,
and the loop stops when every row has emitted EOS. It stays as the simple reference the
engine is tested against, and for callers that hold one batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from tinyllm_jax.eval.engine import Engine, Sampling, bucket_length, filter_logits, strip_after_eos  # noqa: F401
from tinyllm_jax.model.t5 import T5, T5Config


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
                logits = filter_logits(logits / temperature, top_k, top_p)
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


def generate_ids(cfg: Any, params: Any, token_lists: Sequence[Sequence[int]],
                 max_new_tokens: int | Sequence[int], batch_size: int = 32, progress: bool = False,
                 shard_batch: Callable | None = None, *, mesh: Mesh | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seeds: Sequence[int] | None = None,
                 eos_id: int | None = None, admit_rows: int | None = None,
                 on_result: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """Decodes many inputs through the generation engine (eval/engine.py): `batch_size`
    slots, each taking the next input as soon as its row stops. Returns each input's
    generated ids in input order, cut before EOS. `max_new_tokens` is one limit or one a
    request. Greedy unless `temperature` > 0; sampling needs `seeds`, one integer a request,
    and a request's output then depends on its input, the settings and its seed only, not
    on the slot count or the order of the inputs. `mesh` splits the slots over its batch
    axes; `shard_batch` (a callable placing a [rows, length] array, the older way to name
    the mesh) is read for the same. `progress` shows a bar of rows and generated tokens;
    `on_result(i, ids)` is called as each input finishes."""
    n = len(token_lists)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, (int, np.integer)) else [int(m) for m in max_new_tokens]
    row_axes = None
    if mesh is None and shard_batch is not None:
        mesh, row_axes = _mesh_of(shard_batch, batch_size)
    engine = Engine(cfg, min(batch_size, max(1, n)), sampling=Sampling(float(temperature), int(top_k), float(top_p)),
                    eos_id=eos_id, mesh=mesh, row_axes=row_axes, admit_rows=admit_rows)
    return engine.generate(params, token_lists, limits, seeds, progress, on_result)


def _mesh_of(shard_batch: Callable, rows: int) -> tuple[Mesh | None, tuple | None]:
    """The mesh and row axes a `shard_batch` callable places rows on (None: one device)."""
    placed = shard_batch(np.zeros((rows, 1), np.int32))
    sharding = getattr(placed, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return None, None
    axes = sharding.spec[0]
    return sharding.mesh, tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def input_ids(cfg: Any, tokenizer, texts: Sequence[str], max_input_length: int | None = None) -> list[list[int]]:
    """Token ids of each text as the model reads an input: a T5's with its tokenizer's special
    tokens (the closing EOS); a decoder-only model's as its tokenizer writes a prompt, the
    leading specials kept (BOS where it adds one) and no EOS after it. Long inputs keep
    their first `max_input_length` tokens."""
    from tinyllm_jax.model.family import family_of

    if family_of(cfg).layout != "causal":
        return tokenizer(list(texts), truncation=max_input_length is not None, max_length=max_input_length)["input_ids"]
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    ids = [x[:-1] if len(x) > 1 and x[-1] == tokenizer.eos_token_id else x for x in ids]
    return [x[:max_input_length] for x in ids] if max_input_length is not None else ids


def generate_texts(cfg: Any, params: Any, tokenizer, texts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 32, max_input_length: int | None = None, progress: bool = False,
                   shard_batch: Callable | None = None, **sampling) -> list[str]:
    """Text in, text out: tokenises (`input_ids`), decodes with `generate_ids`, detokenises."""
    enc = input_ids(cfg, tokenizer, texts, max_input_length)
    ids = generate_ids(cfg, params, enc, max_new_tokens, batch_size, progress, shard_batch, **sampling)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
