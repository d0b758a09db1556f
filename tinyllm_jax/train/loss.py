"""The fused multi-stream loss, with the reference systems' meaning.

For each stream s: L_s = (sum of token cross-entropies of stream s in the global batch) /
(number of target tokens of stream s in the global batch); loss = sum_s w_s * L_s. The
sums are kept per stream and normalised once, here, so that gradient accumulation and
data parallelism give the same number as one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> jax.Array:
    """Per-token cross-entropy in fp32, optionally label-smoothed, plus z_loss * log(Z)^2."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing > 0.0:
        mean_logit = jnp.mean(logits, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - mean_logit)
    if z_loss > 0.0:
        nll = nll + z_loss * jnp.square(log_z)
    return nll


def stream_sums(values_BxL: jax.Array, stream_ids_BxL: jax.Array, mask_BxL: jax.Array, num_streams: int) -> jax.Array:
    """[num_streams] sums of `values` over the masked tokens of each stream."""
    onehot = jax.nn.one_hot(stream_ids_BxL, num_streams, dtype=jnp.float32) * mask_BxL[..., None]
    return jnp.einsum("bl,bls->s", values_BxL.astype(jnp.float32), onehot)


def stream_token_counts(batch: dict[str, jax.Array], num_streams: int) -> jax.Array:
    mask = batch["decoder_segment_ids"] > 0
    return stream_sums(jnp.ones(mask.shape, jnp.float32), batch["decoder_stream_ids"], mask, num_streams)


def weighted_loss(sums_S: jax.Array, counts_S: jax.Array, weights_S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(total, per-stream means). A stream with no tokens in the batch contributes 0."""
    means = sums_S / jnp.maximum(counts_S, 1.0)
    return jnp.sum(weights_S * means), means
