"""Optimisers from optax: AdamW (the reference systems: lr 5e-5, linear decay) and
Adafactor (the T5 standard), with warmup, schedules and global-norm clipping.
Gradient accumulation lives in the train step, where the loss is normalised."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from tinyllm_jax.config import ConfigError, OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate by step of a run of `total_steps`; with `schedule_offset` the run's
    step s takes the rate of step offset + s of a schedule `schedule_steps` long (a run that
    continues another's schedule instead of warming up again)."""
    offset = cfg.schedule_offset
    if offset < 0 or (cfg.schedule_steps is not None and cfg.schedule_steps < offset + total_steps):
        raise ConfigError(f"optim.schedule_offset={offset}, optim.schedule_steps={cfg.schedule_steps}: expected an "
                          f"offset >= 0 and a schedule at least offset + train.steps ({offset + total_steps}) long")
    base = _schedule(cfg, cfg.schedule_steps or offset + total_steps)
    return base if not offset else (lambda step: base(step + offset))


def _schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    lr, warm = cfg.learning_rate, max(0, cfg.warmup_steps)
    total = max(total_steps, warm + 1)
    if cfg.schedule == "linear":  # the references' get_linear_schedule_with_warmup
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm) if warm else optax.constant_schedule(lr),
             optax.linear_schedule(lr, 0.0, total - warm)], [warm])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, total, end_value=0.0)
    if cfg.schedule == "rsqrt":  # T5: constant through warmup, then lr * sqrt(warm / step)
        w = max(warm, 1)
        return lambda step: lr * jnp.sqrt(w / jnp.maximum(step, w).astype(jnp.float32))
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    return optax.constant_schedule(lr)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, opt), schedule
