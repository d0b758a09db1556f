"""The fused multi-stream loss, with the reference systems' meaning.

For each stream s: L_s = (sum of token cross-entropies of stream s in the global batch) /
(number of target tokens of stream s in the global batch); loss = sum_s w_s * L_s. The
sums are kept per stream and normalised once, here, so that gradient accumulation and
data parallelism give the same number as one big batch.

Distillation (`distill:`) adds weight * KD, KD = (sum over the target tokens of the KD
streams of a per-token divergence between the teacher's and the student's softened
distributions over the full vocabulary) / (the number of those tokens), kept as per-stream
sums like the cross-entropy and normalised once.
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


def loss_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, L] the target tokens the loss is taken over: every real decoder token of an
    encoder-decoder batch; in a decoder-only batch the predicted target tokens only
    (`decoder_loss_weights`), never the prompt."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"] > 0
    return batch["decoder_segment_ids"] > 0


def stream_token_counts(batch: dict[str, jax.Array], num_streams: int) -> jax.Array:
    mask = loss_mask(batch)
    return stream_sums(jnp.ones(mask.shape, jnp.float32), batch["decoder_stream_ids"], mask, num_streams)


def weighted_loss(sums_S: jax.Array, counts_S: jax.Array, weights_S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(total, per-stream means). A stream with no tokens in the batch contributes 0."""
    means = sums_S / jnp.maximum(counts_S, 1.0)
    return jnp.sum(weights_S * means), means


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergences(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, divergence: str,
                      temperature: float = 1.0, jsd_beta: float = 0.5) -> jax.Array:
    """[B, L] divergence in fp32 between softmax(teacher / T) = p_t and softmax(student / T) = p_s:
    `forward_kl` KL(p_t || p_s) (Hinton's KD, Mentor-KD), `reverse_kl` KL(p_s || p_t), `jsd` the
    generalised Jensen-Shannon divergence beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
    m = beta p_t + (1 - beta) p_s (beta 0.5: the symmetric JSD)."""
    log_s = jax.nn.log_softmax(student_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)

    def kl(log_p, log_q):
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

    if divergence == "forward_kl":
        return kl(log_t, log_s)
    if divergence == "reverse_kl":
        return kl(log_s, log_t)
    if divergence == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must lie strictly between 0 and 1, found {jsd_beta}")
        log_m = jnp.logaddexp(log_t + jnp.log(jsd_beta), log_s + jnp.log1p(-jsd_beta))
        return jsd_beta * kl(log_t, log_m) + (1.0 - jsd_beta) * kl(log_s, log_m)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")


def kd_mean(kd_sums_S: jax.Array, counts_S: jax.Array, kd_streams_S: jax.Array) -> jax.Array:
    """The KD term: divergence summed over the KD streams' tokens / their number (0 with none)."""
    return jnp.sum(kd_streams_S * kd_sums_S) / jnp.maximum(jnp.sum(kd_streams_S * counts_S), 1.0)
