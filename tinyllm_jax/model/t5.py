"""The T5 encoder-decoder in Flax Linen, for every Hugging Face T5 variant.

Covers t5 v1.0 (ReLU, tied embeddings with d_model**-0.5 output scaling), t5-v1_1 and
flan-t5 (gated-GELU, untied lm_head), any d_kv, unequal encoder/decoder depth. Inputs may
be PACKED: segment ids (0 = padding) make self-attention block-diagonal and restrict
cross-attention to the same example. Relative position buckets use the row's arange:
inside one contiguous segment a difference of aranges equals a difference of positions.

Parameters are fp32 and carry logical axis names (vocab, embed, heads, kv, mlp,
relpos_buckets) for sharding; compute runs in `config.dtype`; norms and softmax in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tinyllm_jax.model.layers import NEG_INF, Dropout, dense
from tinyllm_jax.model.layers import param as _param

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu", "gated-gelu", "gated-silu", ...
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True  # lm_head shares the input embedding
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before lm_head (v1.0)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # none | full | dots

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def relative_position_buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """[q_len, k_len] bucket ids, computed once at trace time (shapes are static), in
    float32 exactly as transformers does so that imported checkpoints match."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    return buckets_of(rel, bidirectional, num_buckets, max_distance)


def buckets_of(rel: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket ids of relative positions `rel` (key position minus query position)."""
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = np.where(rel < max_exact, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5's layer norm: no mean, no bias, fp32 statistics."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (self.cfg.d_model,), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.layer_norm_epsilon)
        return (scale * x32).astype(self.cfg.compute_dtype)


class RelativePositionBias(nn.Module):
    cfg: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int, by_distance: bool = False) -> Array:
        """[1, heads, q_len, k_len] additive attention bias. With `by_distance` (the decoder,
        k_len = 1), [heads, q_len]: the bias of a key d = 0 .. q_len - 1 positions before the query."""
        c = self.cfg
        table = _param(self, "embedding", c.d_model**-0.5, (c.relative_attention_num_buckets, c.num_heads),
                       ("relpos_buckets", "heads"))
        if by_distance:
            ids = buckets_of(-np.arange(q_len), self.bidirectional, c.relative_attention_num_buckets,
                             c.relative_attention_max_distance)
            return jnp.take(table, jnp.asarray(ids), axis=0).T.astype(jnp.float32)
        ids = relative_position_buckets(q_len, k_len, self.bidirectional,
                                        c.relative_attention_num_buckets, c.relative_attention_max_distance)
        bias_QxKxH = jnp.take(table, jnp.asarray(ids), axis=0)
        return jnp.transpose(bias_QxKxH, (2, 0, 1))[None].astype(jnp.float32)


@jax.custom_vjp
def add_position_bias(scores_BxHxQxK: Array, bias_1xHxQxK: Array) -> Array:
    """scores + bias, the bias broadcast over the batch. The bias's gradient sums the batch
    by a contraction with ones, which XLA CPU runs as a matmul: its reduce over the leading
    axis ran ~10x slower and was 8 % of a CPU train step."""
    return scores_BxHxQxK + bias_1xHxQxK


def _add_position_bias_fwd(scores, bias):
    return scores + bias, None


def _add_position_bias_bwd(_, g):
    return g, jnp.einsum("bhqk,b->hqk", g, jnp.ones((g.shape[0],), g.dtype))[None]


add_position_bias.defvjp(_add_position_bias_fwd, _add_position_bias_bwd)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (T5 folds it into the init)."""

    cfg: T5Config
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        D, H, K = c.d_model, c.num_heads, c.d_kv
        self.q = _param(self, "q", (D * K) ** -0.5, (D, H, K), ("embed", "heads", "kv"))
        self.k = _param(self, "k", D**-0.5, (D, H, K), ("embed", "heads", "kv"))
        self.v = _param(self, "v", D**-0.5, (D, H, K), ("embed", "heads", "kv"))
        self.o = _param(self, "o", (H * K) ** -0.5, (H, K, D), ("heads", "kv", "embed"))
        self.dropout = Dropout(c.dropout_rate)

    def _heads(self, x_BxLxD: Array, w_DxHxK: Array) -> Array:
        """x @ w as one 2-D matmul (XLA CPU transposes less than with 3-D dots), split
        into heads [B, H, L, K]: heads before length, the layout the attention and the
        decode cache use, so no per-step transposes."""
        B, L, D = x_BxLxD.shape
        _, H, K = w_DxHxK.shape
        y = dense(x_BxLxD.reshape(B * L, D), w_DxHxK.reshape(D, H * K).astype(self.cfg.compute_dtype))
        return y.reshape(B, L, H, K).transpose(0, 2, 1, 3)

    def project_kv(self, x_BxLxD: Array) -> tuple[Array, Array]:
        return self._heads(x_BxLxD, self.k), self._heads(x_BxLxD, self.v)

    def attend(self, x_BxQxD: Array, attend_fn) -> Array:
        """Attention whose keys and values are held elsewhere: `attend_fn` maps the queries
        [B, H, Q, K] to the attention outputs [B, H, Q, K] (the generation engine's paged cache)."""
        B, Q, D = x_BxQxD.shape
        return self._output(attend_fn(self._heads(x_BxQxD, self.q)), B, Q, D)

    def _output(self, out_BxHxQxK: Array, B: int, Q: int, D: int) -> Array:
        H, K = out_BxHxQxK.shape[1], out_BxHxQxK.shape[3]
        out = dense(out_BxHxQxK.transpose(0, 2, 1, 3).reshape(B * Q, H * K),
                    self.o.reshape(H * K, D).astype(self.cfg.compute_dtype))
        return out.reshape(B, Q, D)

    def __call__(self, x_BxQxD: Array, kv: tuple[Array, Array], mask_BxQxK: Array, bias: Optional[Array]) -> Array:
        dt = self.cfg.compute_dtype
        B, Q, D = x_BxQxD.shape
        q_BxHxQxK = self._heads(x_BxQxD, self.q)
        k_BxHxSxK, v_BxHxSxK = kv
        scores = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxQxK, k_BxHxSxK).astype(jnp.float32)
        if bias is not None:
            scores = add_position_bias(scores, bias)
        scores = jnp.where(mask_BxQxK[:, None], scores, NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1).astype(dt)
        weights = self.dropout(weights, deterministic=self.deterministic)
        return self._output(jnp.einsum("bhqs,bhsk->bhqk", weights, v_BxHxSxK), B, Q, D)


class MLP(nn.Module):
    cfg: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        c = self.cfg
        dt = c.compute_dtype
        D, F = c.d_model, c.d_ff
        act = ACTIVATIONS[c.activation]
        B, L, _ = x_BxLxD.shape
        x_NxD = x_BxLxD.reshape(B * L, D)  # 2-D matmuls: far fewer transposing copies on CPU
        if c.is_gated:
            wi_0 = _param(self, "wi_0", D**-0.5, (D, F), ("embed", "mlp"))
            wi_1 = _param(self, "wi_1", D**-0.5, (D, F), ("embed", "mlp"))
            h_NxF = act(dense(x_NxD, wi_0.astype(dt))) * dense(x_NxD, wi_1.astype(dt))
        else:
            wi = _param(self, "wi", D**-0.5, (D, F), ("embed", "mlp"))
            h_NxF = act(dense(x_NxD, wi.astype(dt)))
        h_NxF = Dropout(c.dropout_rate)(h_NxF, deterministic=self.deterministic)
        wo = _param(self, "wo", F**-0.5, (F, D), ("mlp", "embed"))
        return dense(h_NxF, wo.astype(dt)).reshape(B, L, D)


class EncoderBlock(nn.Module):
    cfg: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array, bias: Array) -> Array:
        drop = Dropout(self.cfg.dropout_rate)
        attn = Attention(self.cfg, self.deterministic, name="attention")
        h = RMSNorm(self.cfg, name="pre_attention_norm")(x)
        x = x + drop(attn(h, attn.project_kv(h), mask, bias), deterministic=self.deterministic)
        h = RMSNorm(self.cfg, name="pre_mlp_norm")(x)
        return x + drop(MLP(self.cfg, self.deterministic, name="mlp")(h), deterministic=self.deterministic)


class DecoderBlock(nn.Module):
    cfg: T5Config
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        self.pre_self_attention_norm = RMSNorm(c)
        self.self_attention = Attention(c, self.deterministic)
        self.pre_cross_attention_norm = RMSNorm(c)
        self.cross_attention = Attention(c, self.deterministic)
        self.pre_mlp_norm = RMSNorm(c)
        self.mlp = MLP(c, self.deterministic)
        self.drop = Dropout(c.dropout_rate)

    def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
        return self.cross_attention.project_kv(encoded)

    def __call__(self, x, self_mask, bias, cross_kv, cross_mask, cache=None, index=None):
        """With `cache` x is one step: `cache` is (k, v) of [B, H, max_len, K] and `index` the
        step's position, or an object with `write(k, v)` (returning the updated cache) and
        `attend(q)` that keeps each row's keys and values itself (the generation engine's
        pages; `self_mask`, `bias` and `index` are then unused). Returns (x, new_cache)."""
        det = self.deterministic
        h = self.pre_self_attention_norm(x)
        kv = self.self_attention.project_kv(h)
        if hasattr(cache, "attend"):
            cache = cache.write(*kv)
            attn = self.self_attention.attend(h, cache.attend)
        else:
            if cache is not None:
                kv = tuple(jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=2)
                           for c, n in zip(cache, kv))
                cache = kv
            attn = self.self_attention(h, kv, self_mask, bias)
        x = x + self.drop(attn, deterministic=det)
        h = self.pre_cross_attention_norm(x)
        x = x + self.drop(self.cross_attention(h, cross_kv, cross_mask, None), deterministic=det)
        h = self.pre_mlp_norm(x)
        x = x + self.drop(self.mlp(h), deterministic=det)
        return x, cache


def _maybe_remat(block_cls, cfg: T5Config):
    if cfg.remat == "none":
        return block_cls
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(block_cls, policy=policy)


def _segments(tokens: Array, segment_ids: Optional[Array]) -> Array:
    return segment_ids if segment_ids is not None else (tokens != 0).astype(jnp.int32)


class T5(nn.Module):
    """T5ForConditionalGeneration. `__call__` gives fp32 logits [B, Ld, V] for (packed)
    teacher-forced inputs; `encode`, `init_cache`, `cross_kv`, `decoder_bias` and `decode_step` serve
    incremental decoding with a KV cache."""

    cfg: T5Config
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        self.shared = self.param(
            "shared", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (c.vocab_size, c.d_model), jnp.float32)
        enc_cls = _maybe_remat(EncoderBlock, c)
        dec_cls = _maybe_remat(DecoderBlock, c)
        self.encoder_relpos = RelativePositionBias(c, bidirectional=True)
        self.encoder_layers = [enc_cls(c, self.deterministic) for _ in range(c.num_layers)]
        self.encoder_norm = RMSNorm(c)
        self.decoder_relpos = RelativePositionBias(c, bidirectional=False)
        self.decoder_layers = [dec_cls(c, self.deterministic) for _ in range(c.decoder_layers)]
        self.decoder_norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", 1.0, (c.d_model, c.vocab_size), ("embed", "vocab"))
        self.drop = Dropout(c.dropout_rate)

    def _embed(self, tokens: Array) -> Array:
        return jnp.take(self.shared, tokens, axis=0).astype(self.cfg.compute_dtype)

    def encode(self, tokens_BxL: Array, segment_ids: Optional[Array] = None) -> Array:
        seg = _segments(tokens_BxL, segment_ids)
        mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
        L = tokens_BxL.shape[1]
        bias = self.encoder_relpos(L, L)
        x = self.drop(self._embed(tokens_BxL), deterministic=self.deterministic)
        for layer in self.encoder_layers:
            x = layer(x, mask, bias)
        return self.drop(self.encoder_norm(x), deterministic=self.deterministic)

    def _logits(self, x_BxLxD: Array) -> Array:
        c = self.cfg
        x = self.drop(self.decoder_norm(x_BxLxD), deterministic=self.deterministic)
        if c.scale_decoder_outputs:
            x = x * (c.d_model**-0.5)
        dt = c.compute_dtype
        if c.tie_word_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, self.shared.astype(dt))
        else:
            B, L, D = x.shape
            logits = dense(x.reshape(B * L, D), self.lm_head.astype(dt)).reshape(B, L, -1)
        return logits.astype(jnp.float32)

    def decode(self, encoded: Array, encoder_segment_ids: Array, decoder_input_tokens: Array,
               decoder_segment_ids: Optional[Array] = None) -> Array:
        B, Ld = decoder_input_tokens.shape
        dseg = decoder_segment_ids if decoder_segment_ids is not None else jnp.ones((B, Ld), jnp.int32)
        causal = jnp.tril(jnp.ones((Ld, Ld), bool))[None]
        self_mask = causal & (dseg[:, :, None] == dseg[:, None, :]) & (dseg[:, None, :] > 0)
        cross_mask = (dseg[:, :, None] == encoder_segment_ids[:, None, :]) & (encoder_segment_ids[:, None, :] > 0)
        if decoder_segment_ids is None:  # unpacked: any non-padding encoder token
            cross_mask = jnp.broadcast_to(encoder_segment_ids[:, None, :] > 0, cross_mask.shape)
        bias = self.decoder_relpos(Ld, Ld)
        x = self.drop(self._embed(decoder_input_tokens), deterministic=self.deterministic)
        for layer in self.decoder_layers:
            x, _ = layer(x, self_mask, bias, layer.cross_kv(encoded), cross_mask)
        return self._logits(x)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
                 encoder_positions: Optional[Array] = None, decoder_positions: Optional[Array] = None) -> Array:
        # Positions are implied by contiguous segments (see the module docstring); they are
        # accepted so that a packed batch dict can be passed as it is.
        del encoder_positions, decoder_positions
        eseg = _segments(encoder_input_tokens, encoder_segment_ids)
        encoded = self.encode(encoder_input_tokens, eseg)
        return self.decode(encoded, eseg, decoder_input_tokens, decoder_segment_ids)

    # ---- incremental decoding

    def cross_kv(self, encoded: Array) -> list[tuple[Array, Array]]:
        return [layer.cross_kv(encoded) for layer in self.decoder_layers]

    def init_cache(self, batch: int, max_len: int) -> list[tuple[Array, Array]]:
        c = self.cfg
        shape = (batch, c.num_heads, max_len, c.d_kv)
        return [(jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)) for _ in range(c.decoder_layers)]

    def decoder_bias(self, max_len: int) -> Array:
        """[1, H, max_len, max_len] decoder position bias: computed once per decode, sliced per step."""
        return self.decoder_relpos(max_len, max_len)

    def decoder_bias_by_distance(self, max_len: int) -> Array:
        """[H, max_len] decoder position bias of a key d positions before the query: for
        caches that place each row's keys themselves (see DecoderBlock)."""
        return self.decoder_relpos(max_len, 1, by_distance=True)

    def decode_step(self, token_B: Array, index: Array, cache, cross_kv, encoder_mask_BxL: Array, bias_full: Array):
        """One decoder step at position `index` (scalar): returns (logits [B, V], new cache).
        With caches that attend themselves (see DecoderBlock) `index` and `bias_full` are unused."""
        self_mask = bias = None
        if not hasattr(cache[0], "attend"):
            max_len = cache[0][0].shape[2]
            k_valid = (jnp.arange(max_len) <= index)[None, None, :]
            self_mask = jnp.broadcast_to(k_valid, (token_B.shape[0], 1, max_len))
            bias = jax.lax.dynamic_slice_in_dim(bias_full, index, 1, axis=2)
        cross_mask = encoder_mask_BxL[:, None, :]
        x = self.drop(self._embed(token_B[:, None]), deterministic=self.deterministic)
        new_cache = []
        for layer, layer_cache, kv in zip(self.decoder_layers, cache, cross_kv):
            x, layer_cache = layer(x, self_mask, bias, kv, cross_mask, cache=layer_cache, index=index)
            new_cache.append(layer_cache)
        return self._logits(x)[:, 0], new_cache


def init_params(cfg: T5Config, rng: Array, batch: int = 1, enc_len: int = 8, dec_len: int = 8) -> Any:
    """Randomly initialised parameters (boxed with logical axis names)."""
    model = T5(cfg)
    return model.init(rng, jnp.ones((batch, enc_len), jnp.int32), jnp.ones((batch, dec_len), jnp.int32))["params"]
