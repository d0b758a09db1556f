"""A dense key/value cache for the decoder family and a fixed-batch generation reference.

`DenseCache` is the simplest object `Decoder.decode_step` accepts: each row's keys in one
[B, G, T, K] buffer. `generate` runs prefill and the decode loop in one `jax.jit` with a
`lax.while_loop`: the reference that the continuous-batching engine is checked against, and
what a caller without the engine can use.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyllm_jax.errors import UserError
from tinyllm_jax.model.decoder import Decoder, DecoderConfig, grouped_attention


class DenseCache(NamedTuple):
    """One layer's keys and values, row by row (a pytree)."""

    k: jax.Array  # [B, G, T, K]
    v: jax.Array
    valid: jax.Array  # [B, T] slots holding a token of the row
    pos: jax.Array  # [B] the slot this step's key is written to: the row's position
    window: jax.Array  # () how many latest keys a query reads (Mistral's sliding window; else all slots)

    @classmethod
    def from_prefill(cls, kv: tuple[jax.Array, jax.Array], mask_BxL: jax.Array, max_len: int,
                     window: Optional[int] = None) -> "DenseCache":
        """A cache of `max_len` slots holding a prefill's keys where `mask` is set; `pos` is
        left at 0 for the caller to set; `window` is the config's `sliding_window`."""
        k, v = kv
        pad = ((0, 0), (0, 0), (0, max_len - k.shape[2]), (0, 0))
        valid = jnp.pad(mask_BxL.astype(bool), ((0, 0), (0, max_len - mask_BxL.shape[1])))
        return cls(jnp.pad(k, pad), jnp.pad(v, pad), valid, jnp.zeros((k.shape[0],), jnp.int32),
                   jnp.int32(max_len if window is None else window))

    def write(self, k_BxGx1xK: jax.Array, v_BxGx1xK: jax.Array) -> "DenseCache":
        rows = jnp.arange(self.k.shape[0])
        k = self.k.at[rows, :, self.pos].set(k_BxGx1xK[:, :, 0].astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, :, self.pos].set(v_BxGx1xK[:, :, 0].astype(self.v.dtype), mode="drop")
        return self._replace(k=k, v=v, valid=self.valid.at[rows, self.pos].set(True, mode="drop"))

    def attend(self, q_BxHx1xK: jax.Array) -> jax.Array:
        slots = jnp.arange(self.k.shape[2])[None, :]
        readable = self.valid & (slots > (self.pos - self.window)[:, None])
        return grouped_attention(q_BxHx1xK, self.k, self.v, readable[:, None, :])


def generate(cfg: DecoderConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_ids: Optional[Sequence[int]] = None, *, key: Optional[jax.Array] = None,
             temperature: float = 1.0) -> list[list[int]]:
    """New tokens for each prompt (token ids, no padding), at most `max_new_tokens` each: a row
    stops after any of `eos_ids` (default: the config's), which it keeps as its last token.
    Greedy without `key`; with one, sampled from softmax(logits / temperature)."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise UserError("generate: every prompt needs at least one token (e.g. the BOS token)")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    eos = tuple(int(e) for e in (cfg.eos_token_ids if eos_ids is None else eos_ids))
    run = _generate_fn(cfg, int(max_new_tokens), eos, key is not None)
    out, n = run(params, tokens, lengths, key if key is not None else jax.random.PRNGKey(0), jnp.float32(temperature))
    out, n = np.asarray(out), np.asarray(n)
    return [out[row, :n[row]].tolist() for row in range(len(prompts))]


@functools.lru_cache(maxsize=16)
def _generate_fn(cfg: DecoderConfig, max_new: int, eos: tuple, sampled: bool):
    model = Decoder(cfg)
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)

    @jax.jit
    def run(params, tokens_BxL, lengths_B, key, temperature):
        variables = {"params": params}
        B, L = tokens_BxL.shape
        # The prompt's last token goes through decode_step: its logits give the first new token.
        mask = jnp.arange(L)[None, :] < (lengths_B - 1)[:, None]
        kvs = model.apply(variables, tokens_BxL, mask, method=Decoder.prefill)
        caches = [DenseCache.from_prefill(kv, mask, L + max_new, cfg.sliding_window) for kv in kvs]

        last = tokens_BxL[jnp.arange(B), lengths_B - 1]
        z = jnp.zeros((B,), jnp.int32)

        def body(state):
            step, token, pos, caches, out, n, done = state
            caches = [c._replace(pos=pos) for c in caches]
            logits, caches = model.apply(variables, token, pos, caches, method=Decoder.decode_step)
            if sampled:
                nxt = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature, axis=-1)
            else:
                nxt = jnp.argmax(logits, axis=-1)
            nxt = jnp.where(done, 0, nxt.astype(jnp.int32))
            out = out.at[:, step].set(nxt)
            n = n + (~done).astype(jnp.int32)
            done = done | jnp.isin(nxt, eos_ids)
            return step + 1, nxt, pos + 1, caches, out, n, done

        def cond(state):
            return (state[0] < max_new) & ~jnp.all(state[-1])

        state = (jnp.int32(0), last, lengths_B - 1, caches, jnp.zeros((B, max_new), jnp.int32), z, z > 0)
        _, _, _, _, out, n, _ = jax.lax.while_loop(cond, body, state)
        return out, n

    return run
