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

import dataclasses
from typing import Any, Callable, Sequence

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
NEG_INF = -1e9  # a masked logit: finite, so that 0 * (log p - log q) stays 0, never NaN


def compared_logits(student_logits: jax.Array, teacher_logits: jax.Array, vocab: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """The two models' logits over the tokens their shared tokenizer has: each cut to the
    smaller row count (Qwen ships 151,936 tokens in 152,064 embedding rows), then the
    rows from `vocab` on (padding rows, never a token) masked out of the softmax."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student_logits, teacher_logits = student_logits[..., :v], teacher_logits[..., :v]
    return mask_vocab(student_logits, vocab), mask_vocab(teacher_logits, vocab)


def mask_vocab(logits: jax.Array, vocab: int | None) -> jax.Array:
    """`logits` with the columns from `vocab` on set to NEG_INF (unchanged when there are none)."""
    if vocab is None or vocab >= logits.shape[-1]:
        return logits
    real = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) < vocab
    return jnp.where(real, logits, NEG_INF)


def divergence_of_log_probs(log_s: jax.Array, log_t: jax.Array, divergence: str, jsd_beta: float = 0.5) -> jax.Array:
    """The divergence between two distributions given as log-probabilities over the last
    axis (the student's `log_s`, the teacher's `log_t`), summed over that axis."""

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


def token_divergences(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, divergence: str,
                      temperature: float = 1.0, jsd_beta: float = 0.5, vocab: int | None = None) -> jax.Array:
    """[B, L] divergence in fp32 between softmax(teacher / T) = p_t and softmax(student / T) = p_s:
    `forward_kl` KL(p_t || p_s) (Hinton's KD, Mentor-KD), `reverse_kl` KL(p_s || p_t), `jsd` the
    generalised Jensen-Shannon divergence beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
    m = beta p_t + (1 - beta) p_s (beta 0.5: the symmetric JSD). With `vocab`, over the
    first `vocab` ids only (see `compared_logits`)."""
    if vocab is not None or student_logits_BxLxV.shape[-1] != teacher_logits_BxLxV.shape[-1]:
        student_logits_BxLxV, teacher_logits_BxLxV = compared_logits(student_logits_BxLxV, teacher_logits_BxLxV, vocab)
    log_s = jax.nn.log_softmax(student_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    return divergence_of_log_probs(log_s, log_t, divergence, jsd_beta)


def topk_divergences(student_logits_BxLxV: jax.Array, ids_BxLxK: jax.Array, log_probs_BxLxK: jax.Array,
                     tail_log_prob_BxL: jax.Array, divergence: str, temperature: float = 1.0,
                     jsd_beta: float = 0.5, vocab: int | None = None) -> jax.Array:
    """[B, L] divergence between a teacher known by its top-k (stored soft labels) and the student.

    The teacher gives, at temperature T, the log-probabilities of its k most likely ids S and
    the log of the mass it leaves to every other id, tail = 1 - sum_S p_t. Both
    distributions are read over the k + 1 outcomes {each id of S, "any other id"}: the
    teacher's (p_t(S), tail), the student's (p_s(S), 1 - sum_S p_s) from softmax(z_s / T)
    over the whole vocabulary (less the padding rows beyond `vocab`); the divergence is the
    one of `token_divergences` between these two. For forward KL this is
    sum_S p_t log(p_t / p_s) + tail_t log(tail_t / tail_s), the data-processing bound below
    the full-vocabulary KL, equal to it when the teacher's tail is spread over the other ids
    in proportion to the student's; with k = the vocabulary (tail 0) it is the full term."""
    z = mask_vocab(student_logits_BxLxV.astype(jnp.float32) / temperature, vocab)
    log_z = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    ids = ids_BxLxK.astype(jnp.int32)
    log_s_top = jnp.take_along_axis(z, ids, axis=-1) - log_z
    # the student's mass outside S: its logits with S's masked out (not 1 - sum, which
    # loses every digit when S holds nearly all the mass)
    b, l = jnp.indices(ids.shape[:2])
    rest = z.at[b[..., None], l[..., None], ids].set(NEG_INF)
    log_s_tail = jax.nn.logsumexp(rest, axis=-1, keepdims=True) - log_z
    log_t_tail = jnp.maximum(tail_log_prob_BxL.astype(jnp.float32), NEG_INF)[..., None]  # -inf: no tail
    log_s = jnp.concatenate([log_s_top, log_s_tail], axis=-1)
    log_t = jnp.concatenate([log_probs_BxLxK.astype(jnp.float32), log_t_tail], axis=-1)
    return divergence_of_log_probs(log_s, log_t, divergence, jsd_beta)


def topk_soft_labels(teacher_logits_BxLxV: jax.Array, k: int, temperature: float = 1.0,
                     vocab: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What `topk_divergences` reads of a teacher: (its k most likely ids [B, L, k] int32,
    their log-probabilities at temperature T [B, L, k], the log of the mass left to the
    other ids [B, L], -inf when there is none), over the first `vocab` ids."""
    z = mask_vocab(teacher_logits_BxLxV.astype(jnp.float32) / temperature, vocab)
    log_p = jax.nn.log_softmax(z, axis=-1)
    top, ids = jax.lax.top_k(log_p, k)
    b, l = jnp.indices(ids.shape[:2])
    tail = jax.nn.logsumexp(log_p.at[b[..., None], l[..., None], ids].set(NEG_INF), axis=-1)
    return ids.astype(jnp.int32), top, jnp.where(tail < NEG_INF / 2, -jnp.inf, tail)


# --------------------------------------------------------------------------- chunks


def over_sequence_chunks(fn: Callable[..., Any], chunk_length: int, *arrays_BxL: jax.Array) -> Any:
    """`fn(*chunks)` over chunks of `chunk_length` positions of [B, L, ...] arrays, its [B, C, ...]
    outputs joined back to [B, L, ...]. The chunks run in a `lax.scan` whose body is
    rematerialised (`jax.checkpoint`): the backward pass recomputes each chunk's
    intermediates (a vocabulary projection's logits) instead of keeping them, so only one
    chunk's live at a time. Chunks cut the sequence, not the rows, so that rows sharded
    over devices stay where they are. L need not divide: the last chunk is zero-padded."""
    L = arrays_BxL[0].shape[1]
    n = -(-L // chunk_length)
    pad = n * chunk_length - L

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(a.shape[0], n, chunk_length, *a.shape[2:]), 1, 0)

    def join(o):
        o = jnp.moveaxis(o, 0, 1)
        return o.reshape(o.shape[0], n * chunk_length, *o.shape[3:])[:, :L]

    body = jax.checkpoint(lambda chunk: fn(*chunk), prevent_cse=False)  # prevent_cse: not needed in a scan
    _, out = jax.lax.scan(lambda carry, chunk: (carry, body(chunk)), None, tuple(split(a) for a in arrays_BxL))
    return jax.tree.map(join, out)


@dataclasses.dataclass(frozen=True)
class SoftLabels:
    """One teacher's soft labels as the loss reads them: `divergence(student_logits, *chunk)`
    -> [B, C] for any chunk of positions of `arrays` ([B, L, ...]: the teacher's final
    hidden states, or its stored top-k)."""

    divergence: Callable[..., jax.Array]
    arrays: tuple[jax.Array, ...]


def sequence_losses(project: Callable[[jax.Array], jax.Array], hidden_BxLxD: jax.Array, targets_BxL: jax.Array,
                    label_smoothing: float = 0.0, z_loss: float = 0.0, soft_labels: Sequence[SoftLabels] = (),
                    chunk_length: int = 0) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(cross-entropy [B, L], one divergence [B, L] per `soft_labels`) of the student whose
    final hidden states are `hidden` and vocabulary projection `project`. With
    `chunk_length` the logits exist `chunk_length` positions at a time, the student's
    and every teacher's, in the forward and the backward pass (`over_sequence_chunks`);
    0 projects the whole sequence at once. The same numbers either way."""

    def chunk_losses(x, targets, *teacher_chunks):
        logits = project(x)
        ce = token_losses(logits, targets, label_smoothing, z_loss)
        divs, at = [], 0
        for soft in soft_labels:
            divs.append(soft.divergence(logits, *teacher_chunks[at:at + len(soft.arrays)]))
            at += len(soft.arrays)
        return ce, tuple(divs)

    arrays = (hidden_BxLxD, targets_BxL, *(a for soft in soft_labels for a in soft.arrays))
    if chunk_length <= 0 or chunk_length >= targets_BxL.shape[1]:
        return chunk_losses(*arrays)
    return over_sequence_chunks(chunk_losses, chunk_length, *arrays)


def kd_mean(kd_sums_S: jax.Array, counts_S: jax.Array, kd_streams_S: jax.Array) -> jax.Array:
    """The KD term: divergence summed over the KD streams' tokens / their number (0 with none)."""
    return jnp.sum(kd_streams_S * kd_sums_S) / jnp.maximum(jnp.sum(kd_streams_S * counts_S), 1.0)
