"""Layers shared by the model families: a parameter helper, the CPU-friendly matmul, hash
dropout and RMSNorm. Written by hand where flax's own (nn.Dense, nn.Dropout) were measured
slower on XLA CPU; each says why below."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
NEG_INF = -1e9  # masked scores; finite so that fully masked (padding) rows stay NaN-free


def param(module: nn.Module, name: str, std: float, shape: tuple, axes: tuple) -> Array:
    """An fp32 parameter drawn from N(0, std), annotated with logical axis names."""
    init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    return module.param(name, init, shape, jnp.float32)


def zeros_param(module: nn.Module, name: str, shape: tuple, axes: tuple) -> Array:
    return module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.float32)


def _hash32(x: Array) -> Array:
    """A well-mixing 32-bit integer hash (the "lowbias32" finaliser)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


class Dropout(nn.Module):
    """Inverted dropout whose mask is a counter-based hash of (one PRNG draw, element index).

    Written by hand because drawing a PRNG value for every element (flax's nn.Dropout) was a
    quarter of a CPU train step for attention-probability dropout over packed rows; the hash
    is elementwise, so XLA fuses it into the op that consumes the mask. Deterministic in the
    dropout key, like nn.Dropout; a different mask stream than nn.Dropout's."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        seed = jax.random.bits(self.make_rng("dropout"), (), jnp.uint32)
        index = jnp.zeros(x.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(x.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
            stride *= x.shape[axis]
        bits = _hash32(_hash32(index ^ seed) + seed)
        keep = bits >= jnp.uint32(min(2**32 - 1, round(self.rate * 2**32)))
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros((), x.dtype)).astype(x.dtype)


@jax.custom_vjp
def dense(x_NxD: Array, w_DxF: Array) -> Array:
    """x @ w, with a backward pass laid out for XLA CPU's fast matmul path: the weight
    gradient is x^T @ g with x^T materialised (a small copy). Left to autodiff, that dot
    contracts over x's leading axis, which XLA CPU runs in a slow generic kernel: ~9 % of
    a CPU train step for the vocabulary projection alone."""
    return x_NxD @ w_DxF


def _dense_fwd(x, w):
    return x @ w, (x, w)


def _dense_bwd(res, g):
    x, w = res
    x_t = jax.lax.optimization_barrier(x.T)  # keeps XLA from folding the transpose into the dot
    return (g @ w.T).astype(x.dtype), (x_t @ g).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis: fp32 statistics, output in `dtype`. `axis`
    names the scale's logical axis ("embed" for the residual stream, "kv" inside a head)."""

    eps: float
    dtype: str = "float32"
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32).astype(self.dtype)
