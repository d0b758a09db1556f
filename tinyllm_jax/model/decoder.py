"""Decoder-only transformers in Flax Linen: Llama, Mistral (with its sliding window), Qwen2, Qwen3.

One network covers the four families of Hugging Face checkpoints: RMSNorm, rotary positions
(default, `linear` and `llama3` scaling), grouped-query attention, a SwiGLU MLP; Qwen2's q/k/v
biases, Llama's optional attention and MLP biases, Qwen3's per-head q/k RMSNorm; tied or untied
embeddings; Mistral's sliding window (a query reads the `sliding_window` latest keys, itself
included, as transformers masks it). Rows may be PACKED: segment ids (0 = padding) make attention causal and
block-diagonal, and positions restart at 0 in each segment (they feed the rotary embedding).

Parameters are fp32 with logical axis names (vocab, embed, heads, kv_heads, kv, mlp) for
sharding; compute runs in `cfg.dtype`; norms, rotary tables and softmax run in fp32.

Incremental decoding is written for callers that own the key/value memory: `prefill` returns
each layer's keys and values (rotary applied), and `decode_step` runs one token a row, each row
at its own position, against per-layer cache objects with `write(k, v)` and `attend(q)`
(`DenseCache` in model/decoder_generate.py; the generation engine brings paged ones). Queries
reach `attend` already scaled by head_dim**-0.5, so a cache computes plain softmax(q.k) v.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tinyllm_jax.errors import UserError
from tinyllm_jax.model.layers import NEG_INF, Dropout, RMSNorm, dense, param, zeros_param

Array = jax.Array

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)  # hashable: a jit static argument and an lru_cache key
class DecoderConfig:
    vocab_size: int  # embedding rows (config.json's), which may exceed the tokenizer's size
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3, as config.json names it
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of config.json's dict; None: default
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # q/k/v biases, and o_proj's too except for qwen2
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # mistral: a query reads at most this many latest keys; None: all
    qk_norm: bool = False  # qwen3: RMSNorm of each query and key head
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    pad_token_id: Optional[int] = None
    dropout_rate: float = 0.0  # attention probabilities and residual branches, when training
    dtype: str = "float32"  # compute dtype; parameters stay fp32
    remat: str = "none"  # none | full | dots

    def __post_init__(self):
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_size % 2:
            problems.append(f"head_dim {self.head_size} is odd; rotary embeddings need an even head_dim")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_scaling type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.remat not in REMAT:
            problems.append(f"remat {self.remat!r} is not one of {', '.join(REMAT)}")
        # what each family's transformers class computes, so that every config exports
        if self.qk_norm != (self.model_type == "qwen3"):
            problems.append(f"qk_norm must be {self.model_type == 'qwen3'} for model_type {self.model_type!r} "
                            "(only qwen3 normalises query and key heads)")
        if self.model_type == "qwen2" and not self.attention_bias:
            problems.append("model_type 'qwen2' has q/k/v biases: attention_bias must be true")
        if self.model_type == "mistral" and self.attention_bias:
            problems.append("model_type 'mistral' has no attention biases: attention_bias must be false")
        if self.sliding_window is not None and (self.model_type != "mistral" or self.sliding_window < 1):
            problems.append(f"sliding_window {self.sliding_window} is mistral's and at least 1; "
                            f"model_type {self.model_type!r} attends every key (expected null)")
        if self.mlp_bias and self.model_type != "llama":
            problems.append(f"mlp_bias is llama's; model_type {self.model_type!r} has none")
        if problems:
            raise UserError("decoder config: " + "; ".join(problems))

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def out_bias(self) -> bool:
        """o_proj has a bias: Llama's attention_bias covers it, Qwen2's q/k/v biases do not."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        return self.rope_params.get("rope_type", "default")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "DecoderConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        """The inverse of `to_dict` after a JSON round trip (lists back to tuples)."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"decoder config: unknown keys {unknown}")
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple((k, v) for k, v in d["rope_scaling"])
        return cls(**d)


# --------------------------------------------------------------------------- rotary positions


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """[head_dim / 2] inverse frequencies, in float32 as transformers computes them (a trace-time
    constant), with `linear` or `llama3` scaling applied."""
    dim = cfg.head_size
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    p = cfg.rope_params
    if cfg.rope_type == "linear":
        inv = inv / np.float32(p["factor"])
    elif cfg.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary_tables(cfg: DecoderConfig, positions: Array) -> tuple[Array, Array]:
    """cos and sin [..., 1, L, head_dim] for positions [..., L], fp32 angles, compute dtype out."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :, :]
    return jnp.cos(angles).astype(cfg.compute_dtype), jnp.sin(angles).astype(cfg.compute_dtype)


def apply_rotary(x_BxNxLxK: Array, cos: Array, sin: Array) -> Array:
    x1, x2 = jnp.split(x_BxNxLxK, 2, axis=-1)
    return x_BxNxLxK * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def segment_positions(segment_ids_BxL: Array) -> Array:
    """Positions that restart at 0 where the segment id changes (packed rows)."""
    L = segment_ids_BxL.shape[1]
    index = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BxL.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], bool),
                              segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


# --------------------------------------------------------------------------- layers


def grouped_attention(q_BxHxQxK: Array, k_BxGxSxK: Array, v_BxGxSxK: Array, mask_BxQxS: Array,
                      dropout=None) -> Array:
    """softmax(q.k) v with H query heads over G key/value heads (head h reads kv head h // (H/G),
    as transformers' repeat_kv does), without repeating the keys. `q` comes scaled; softmax in
    fp32. `mask` is boolean, or an additive fp32 bias (0 or NEG_INF, see `attention_bias`)."""
    B, H, Q, K = q_BxHxQxK.shape
    G = k_BxGxSxK.shape[1]
    q = q_BxHxQxK.reshape(B, G, H // G, Q, K)
    scores = jnp.einsum("bgrqk,bgsk->bgrqs", q, k_BxGxSxK, preferred_element_type=jnp.float32)
    if mask_BxQxS.dtype == jnp.bool_:
        scores = jnp.where(mask_BxQxS[:, None, None], scores, NEG_INF)
    else:  # an add: its gradient needs no mask, where a select's reads it again
        scores = scores + mask_BxQxS[:, None, None]
    weights = jax.nn.softmax(scores, axis=-1).astype(v_BxGxSxK.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bgrqs,bgsk->bgrqk", weights, v_BxGxSxK).reshape(B, H, Q, K)


def attention_bias(segment_ids_BxL: Optional[Array], L: int, window: Optional[int] = None) -> Array:
    """[B, L, L] (or [1, L, L] without segment ids) fp32 additive attention bias, 0 where a query
    may read a key (causal; the same segment, not padding; at most `window` places back, itself
    included) and NEG_INF elsewhere; made once a forward pass and shared by the layers. A segment
    is contiguous, so distance along the row is distance in its positions."""
    query, key = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    allowed = (key <= query)[None]
    if window is not None:
        allowed = allowed & (query - key < window)[None]
    if segment_ids_BxL is not None:
        seg = segment_ids_BxL
        allowed = allowed & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def causal_chunk(L: int) -> int:
    """Queries a block of `causal_attention`: eight blocks a row, at least 32 queries each."""
    return max(32, -(-L // 8))


def causal_attention(q_BxHxLxK: Array, k_BxGxLxK: Array, v_BxGxLxK: Array, bias_BxLxL: Array,
                     dropout=None) -> Array:
    """`grouped_attention` of every position of causal rows, in blocks of queries: a block reads
    only the keys up to its last query, since the causal bias gives every later key a weight of
    exactly 0 (exp(NEG_INF) underflows in fp32). Eight blocks compute 9/16 of the L x L scores;
    on XLA CPU those [B, H, L, L] tensors, not the matmuls, set the attention's time."""
    L = q_BxHxLxK.shape[2]
    chunk = causal_chunk(L)
    out = [grouped_attention(q_BxHxLxK[:, :, s:s + chunk], k_BxGxLxK[:, :, :s + chunk], v_BxGxLxK[:, :, :s + chunk],
                             bias_BxLxL[:, s:s + chunk, :s + chunk], dropout) for s in range(0, L, chunk)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=2)


class Attention(nn.Module):
    cfg: DecoderConfig
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        D, H, G, K = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_size
        self.q = param(self, "q", D**-0.5, (D, H, K), ("embed", "heads", "kv"))
        self.k = param(self, "k", D**-0.5, (D, G, K), ("embed", "kv_heads", "kv"))
        self.v = param(self, "v", D**-0.5, (D, G, K), ("embed", "kv_heads", "kv"))
        self.o = param(self, "o", (H * K) ** -0.5, (H, K, D), ("heads", "kv", "embed"))
        if c.attention_bias:
            self.q_bias = zeros_param(self, "q_bias", (H, K), ("heads", "kv"))
            self.k_bias = zeros_param(self, "k_bias", (G, K), ("kv_heads", "kv"))
            self.v_bias = zeros_param(self, "v_bias", (G, K), ("kv_heads", "kv"))
        if c.out_bias:
            self.o_bias = zeros_param(self, "o_bias", (D,), ("embed",))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps, c.dtype, axis="kv")
            self.k_norm = RMSNorm(c.rms_norm_eps, c.dtype, axis="kv")
        self.dropout = Dropout(c.dropout_rate)

    def qkv(self, x_BxLxD: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """Scaled, rotated queries [B, H, L, K]; rotated keys and values [B, G, L, K].

        The three projections run as ONE 2-D matmul over their concatenated weights: the key and
        value ones are narrow (G heads), and on XLA CPU one [D, (H + 2G) K] product, with one
        transposed copy of x for its weight gradient, beats three."""
        c = self.cfg
        B, L, D = x_BxLxD.shape
        H, G, K = c.num_attention_heads, c.num_key_value_heads, c.head_size
        dt = c.compute_dtype
        w = jnp.concatenate([self.q.reshape(D, H * K), self.k.reshape(D, G * K), self.v.reshape(D, G * K)], axis=1)
        y = dense(x_BxLxD.reshape(B * L, D), w.astype(dt))
        if c.attention_bias:
            y = y + jnp.concatenate([self.q_bias.reshape(-1), self.k_bias.reshape(-1), self.v_bias.reshape(-1)]).astype(dt)

        def heads(start, n):  # -> [B, n, L, K]: heads before length, as attention and the caches read them
            return y[:, start * K:(start + n) * K].reshape(B, L, n, K).transpose(0, 2, 1, 3)

        q, k, v = heads(0, H), heads(H, G), heads(H + G, G)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        q = (q.astype(jnp.float32) * c.head_size**-0.5).astype(q.dtype)
        return q, apply_rotary(k, cos, sin), v

    def output(self, out_BxHxLxK: Array) -> Array:
        B, H, L, K = out_BxHxLxK.shape
        D = self.cfg.hidden_size
        dt = self.cfg.compute_dtype
        y = dense(out_BxHxLxK.transpose(0, 2, 1, 3).reshape(B * L, H * K), self.o.reshape(H * K, D).astype(dt))
        if self.cfg.out_bias:
            y = y + self.o_bias.astype(dt)
        return y.reshape(B, L, D)

    def __call__(self, x_BxLxD: Array, cos: Array, sin: Array, bias_BxLxL: Array) -> tuple[Array, tuple]:
        """Causal self-attention over whole rows (`bias` from `attention_bias`)."""
        q, k, v = self.qkv(x_BxLxD, cos, sin)
        drop = lambda w: self.dropout(w, deterministic=self.deterministic)
        return self.output(causal_attention(q, k, v, bias_BxLxL, drop)), (k, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with optional biases (Llama's mlp_bias). Gate and up
    run as one matmul over their concatenated weights (one product and one transposed copy of x
    for the weight gradients, where two would each make their own)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        c = self.cfg
        dt = c.compute_dtype
        D, F = c.hidden_size, c.intermediate_size
        B, L, _ = x_BxLxD.shape
        x_NxD = x_BxLxD.reshape(B * L, D)  # 2-D matmuls: far fewer transposing copies on CPU
        def linear(name, n_in, n_out, axes):  # (weight, bias or None), made in the checkpoints' order
            w = param(self, name, n_in**-0.5, (n_in, n_out), axes).astype(dt)
            return w, zeros_param(self, f"{name}_bias", (n_out,), axes[1:]).astype(dt) if c.mlp_bias else None

        (gate_w, gate_b), (up_w, up_b) = linear("gate", D, F, ("embed", "mlp")), linear("up", D, F, ("embed", "mlp"))
        gate_up = dense(x_NxD, jnp.concatenate([gate_w, up_w], axis=1))
        if c.mlp_bias:
            gate_up = gate_up + jnp.concatenate([gate_b, up_b])
        h_NxF = jax.nn.silu(gate_up[:, :F]) * gate_up[:, F:]
        down_w, down_b = linear("down", F, D, ("mlp", "embed"))
        y = dense(h_NxF, down_w)
        if c.mlp_bias:
            y = y + down_b
        return y.reshape(B, L, D)


class Block(nn.Module):
    cfg: DecoderConfig
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        self.input_norm = RMSNorm(c.rms_norm_eps, c.dtype)
        self.attention = Attention(c, self.deterministic)
        self.post_attention_norm = RMSNorm(c.rms_norm_eps, c.dtype)
        self.mlp = MLP(c)
        self.drop = Dropout(c.dropout_rate)

    def __call__(self, x: Array, cos: Array, sin: Array, bias: Array) -> tuple[Array, tuple]:
        """(x after the block, this layer's (k, v))."""
        attn, kv = self.attention(self.input_norm(x), cos, sin, bias)
        x = x + self.drop(attn, deterministic=self.deterministic)
        return x + self.drop(self.mlp(self.post_attention_norm(x)), deterministic=self.deterministic), kv

    def step(self, x_Bx1xD: Array, cos: Array, sin: Array, cache) -> tuple[Array, Any]:
        """One token a row against a cache that writes and attends itself."""
        q, k, v = self.attention.qkv(self.input_norm(x_Bx1xD), cos, sin)
        cache = cache.write(k, v)
        x = x_Bx1xD + self.attention.output(cache.attend(q))
        return x + self.mlp(self.post_attention_norm(x)), cache


def _maybe_remat(cfg: DecoderConfig):
    if cfg.remat == "none":
        return Block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(Block, policy=policy)


class Decoder(nn.Module):
    """LlamaForCausalLM and its relatives. `__call__` gives fp32 logits [B, L, V]; `hidden` and
    `project` split it for losses computed chunk by chunk; `prefill` and `decode_step` serve
    incremental decoding."""

    cfg: DecoderConfig
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        D = c.hidden_size
        self.embed_tokens = param(self, "embed_tokens", D**-0.5, (c.vocab_size, D), ("vocab", "embed"))
        block = _maybe_remat(c)
        self.layers = [block(c, self.deterministic) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = param(self, "lm_head", D**-0.5, (D, c.vocab_size), ("embed", "vocab"))

    def _embed(self, tokens: Array) -> Array:
        return jnp.take(self.embed_tokens, tokens, axis=0).astype(self.cfg.compute_dtype)

    def _layers(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array], positions_BxL: Optional[Array]):
        """Runs every block; returns (residual stream [B, L, D], per layer (k, v))."""
        L = tokens_BxL.shape[1]
        if positions_BxL is None:
            positions_BxL = (jnp.arange(L, dtype=jnp.int32)[None] if segment_ids_BxL is None
                             else segment_positions(segment_ids_BxL))
        cos, sin = rotary_tables(self.cfg, positions_BxL)
        bias = attention_bias(segment_ids_BxL, L, self.cfg.sliding_window)
        x = self._embed(tokens_BxL)
        kvs = []
        for layer in self.layers:
            x, kv = layer(x, cos, sin, bias)
            kvs.append(kv)
        return x, kvs

    def hidden(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array] = None,
               positions_BxL: Optional[Array] = None) -> Array:
        """Final-normed hidden states [B, L, D] in the compute dtype. Without segment ids each row
        is one causal sequence (right padding is harmless: no real token attends to it); with
        them, attention stays inside each segment and positions restart per segment unless given."""
        return self.norm(self._layers(tokens_BxL, segment_ids_BxL, positions_BxL)[0])

    def project(self, hidden_xD: Array) -> Array:
        """fp32 logits [..., V] of hidden states [..., D]."""
        c = self.cfg
        dt = c.compute_dtype
        lead = hidden_xD.shape[:-1]
        w_DxV = self.embed_tokens.T if c.tie_word_embeddings else self.lm_head
        logits = dense(hidden_xD.reshape(-1, c.hidden_size).astype(dt), w_DxV.astype(dt))
        return logits.astype(jnp.float32).reshape(*lead, c.vocab_size)

    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None) -> Array:
        return self.project(self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL))

    # ---- incremental decoding

    def prefill(self, tokens_BxL: Array, mask_BxL: Array) -> list[tuple[Array, Array]]:
        """Per layer (k, v) [B, G, L, K] of left-aligned prompts (`mask` marks their tokens), rotary
        applied at positions 0 .. L-1. Keys at unmasked places are junk: a cache must not attend them."""
        L = tokens_BxL.shape[1]
        positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens_BxL.shape)
        return self._layers(tokens_BxL, mask_BxL.astype(jnp.int32), positions)[1]

    def decode_step(self, token_B: Array, position_B: Array, caches: list) -> tuple[Array, list]:
        """One token a row at each row's own position: (fp32 logits [B, V], the updated caches).
        Each layer calls `cache = cache.write(k [B, G, 1, K], v)` then `cache.attend(q [B, H, 1, K])`."""
        cos, sin = rotary_tables(self.cfg, position_B[:, None])
        x = self._embed(token_B[:, None])
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.step(x, cos, sin, cache)
            new_caches.append(cache)
        return self.project(self.norm(x))[:, 0], new_caches


def init_params(cfg: DecoderConfig, rng: Array, batch: int = 1, length: int = 8) -> Any:
    """Randomly initialised parameters (boxed with logical axis names)."""
    return Decoder(cfg).init(rng, jnp.ones((batch, length), jnp.int32))["params"]
