"""The fused objective of one train step: every stream's cross-entropy and every teacher's KD
term, from one forward pass of the student over a packed batch.

    total = sum_s w_s * CE_s + sum_t weight_t * scale_t * KD_t

CE_s the token mean of stream s's cross-entropy, KD_t the token mean of teacher t's
divergence over the target tokens of its streams (train/loss.py keeps the sums; they are
normalised once, over the whole accumulated, data-parallel batch). A teacher is online (its
model runs here, on the same batch, without gradients) or stored (its top-k soft labels
ride in the batch, `<prefix>.ids` / `.log_probs` / `.tail_log_prob`). The student's and
every online teacher's vocabulary projections run over `chunk_length` positions at a time
(0: all at once), so no [B, L, V] logits need exist (loss.sequence_losses).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from tinyllm_jax.model.family import family_of
from tinyllm_jax.train import loss as loss_lib
from tinyllm_jax.train.distill import KDSpec


def soft_labels(spec: KDSpec, batch: dict[str, jax.Array], inputs: Sequence[jax.Array],
                teacher_params: Any) -> loss_lib.SoftLabels:
    """Teacher `spec`'s soft labels for the loss: an online teacher's final hidden states and
    its projection, or its stored top-k read from the batch."""
    def divergence_of(fn):
        return lambda student_logits, *chunk: fn(student_logits, *chunk, spec.divergence, spec.temperature,
                                                 spec.jsd_beta, spec.vocab)

    if spec.stored:
        arrays = tuple(batch[f"{spec.prefix}.{name}"] for name in ("ids", "log_probs", "tail_log_prob"))
        return loss_lib.SoftLabels(divergence_of(loss_lib.topk_divergences), arrays)
    teacher = family_of(spec.arch).module(spec.arch, True)  # the student's family: it reads the same batch
    hidden = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, *inputs, method="hidden"))

    def divergences(student_logits, hidden_chunk, *settings):
        t_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, hidden_chunk, method="project"))
        return loss_lib.token_divergences(student_logits, t_logits, *settings)

    return loss_lib.SoftLabels(divergence_of(divergences), (hidden,))


def make_loss_fn(arch: Any, weights: jax.Array, label_smoothing: float, z_loss: float,
                 kd: KDSpec | Sequence[KDSpec] | None = None, chunk_length: int = 0) -> Callable:
    """(params, batch, counts_S, rng, *online teachers' params) -> (total, aux) for a student of
    either family: aux the per-stream CE sums [S], or with teachers (CE sums [S], KD
    divergence sums [teachers, S])."""
    specs = (kd,) if isinstance(kd, KDSpec) else tuple(kd or ())
    family = family_of(arch)
    model = family.module(arch, arch.dropout_rate == 0.0)
    num_streams = weights.shape[0]

    def loss_fn(params, batch, counts_S, rng, *teacher_params):
        inputs = [batch[k] for k in family.model_inputs]
        hidden = model.apply({"params": params}, *inputs, method="hidden", rngs={"dropout": rng})
        online = iter(teacher_params)
        soft = [soft_labels(s, batch, inputs, None if s.stored else next(online)) for s in specs]
        project = lambda x: model.apply({"params": params}, x, method="project")  # noqa: E731
        ce, divs = loss_lib.sequence_losses(project, hidden, batch["decoder_target_tokens"], label_smoothing, z_loss,
                                            soft, chunk_length)
        mask, stream_ids = loss_lib.loss_mask(batch), batch["decoder_stream_ids"]
        sums_S = loss_lib.stream_sums(ce, stream_ids, mask, num_streams)
        total, _ = loss_lib.weighted_loss(sums_S, counts_S, weights)
        if not specs:
            return total, sums_S
        kd_sums = jnp.stack([loss_lib.stream_sums(d, stream_ids, mask, num_streams) for d in divs])
        return total + kd_total(specs, kd_sums, counts_S)[0], (sums_S, kd_sums)

    return loss_fn


def kd_total(specs: Sequence[KDSpec], kd_sums_TxS: jax.Array, counts_S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum_t weight_t * scale_t * KD_t, each teacher's KD_t [teachers]: its divergence's token mean)."""
    values = jnp.stack([loss_lib.kd_mean(kd_sums_TxS[i], counts_S, s.streams_S()) for i, s in enumerate(specs)])
    weights = jnp.asarray([s.weight * s.scale for s in specs], jnp.float32)
    return jnp.sum(weights * values), values
