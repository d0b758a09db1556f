"""The train step and the loop: one jitted, sharded step over packed multi-stream batches
with the fused weighted loss; logging, evaluation, checkpoints, preemption and resume.

Every recipe (TinyLLM, step-by-step, Mentor-KD, FAIR) runs this loop; they differ in
their configs (streams, weights) and in the data stages that run before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tinyllm_jax.config import Config
from tinyllm_jax.errors import Interrupted, UserError
from tinyllm_jax.eval.evaluate import Evaluation
from tinyllm_jax.model.family import family_of
from tinyllm_jax.train import loss as loss_lib
from tinyllm_jax.train.distill import Distillation, KDSpec, Teacher, kd_spec
from tinyllm_jax.train.objective import kd_total, make_loss_fn
from tinyllm_jax.runtime import sharding
from tinyllm_jax.runtime.checkpoint import Checkpointer
from tinyllm_jax.train.metrics import MetricsLog, peak_flops_per_device
from tinyllm_jax.train.optim import make_optimizer

log = logging.getLogger("tinyllm.train")


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf; the run stops, keeping its last good checkpoint."""


# --------------------------------------------------------------------------- the step


def make_train_step(arch: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    weights: np.ndarray, accum_steps: int, seed: int, label_smoothing: float = 0.0,
                    z_loss: float = 0.0, prng_impl: str = "threefry2x32", kd: KDSpec | Sequence[KDSpec] | None = None,
                    chunk_length: int = 0) -> Callable:
    """state, batch -> state, metrics. With `accum_steps` > 1 every batch array has a
    leading microbatch axis; the loss is normalised over the whole accumulated batch.
    With teachers (`kd`): state, batch, *online teachers' params -> state, metrics (metrics
    gain `kd_loss`, each teacher's divergence)."""
    specs = (kd,) if isinstance(kd, KDSpec) else tuple(kd or ())
    weights = jnp.asarray(weights, jnp.float32)
    num_streams = weights.shape[0]
    loss_fn = make_loss_fn(arch, weights, label_smoothing, z_loss, specs, chunk_length)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    base_key = jax.random.key(seed, impl=prng_impl)

    def step_fn(state, batch, *teachers):
        params, step = state["params"], state["step"]
        rng = jax.random.fold_in(base_key, step)
        flat = batch if accum_steps == 1 else jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        counts_S = loss_lib.stream_token_counts(flat, num_streams)
        if accum_steps == 1:
            (_, aux), grads = grad_fn(params, batch, counts_S, rng, *teachers)
        else:
            def micro(carry, mb_and_i):
                mb, i = mb_and_i
                g_acc, s_acc = carry
                (_, s), g = grad_fn(params, mb, counts_S, jax.random.fold_in(rng, i), *teachers)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

            sums_zeros = jnp.zeros((num_streams,), jnp.float32)
            zeros = (jax.tree.map(jnp.zeros_like, params),
                     sums_zeros if not specs else (sums_zeros, jnp.zeros((len(specs), num_streams), jnp.float32)))
            (grads, aux), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum_steps)))
        sums_S, kd_sums = (aux, None) if not specs else aux
        total, means_S = loss_lib.weighted_loss(sums_S, counts_S, weights)
        if specs:
            kd_weighted, kd_values = kd_total(specs, kd_sums, counts_S)
            total = total + kd_weighted
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": step + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        metrics = {
            "loss": total, "stream_loss": means_S, "stream_tokens": counts_S,
            "grad_norm": optax.global_norm(grads), "lr": schedule(step),
            "real_tokens": sum(jnp.sum(flat[k] > 0) for k in family_of(arch).real_token_keys),
        }
        if specs:
            metrics["kd_loss"] = kd_values  # each teacher's divergence, before weight and T^2
        return new_state, metrics

    return step_fn


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class Trainer:
    """The sharded state and the compiled step of one run."""

    cfg: Config
    arch: Any  # the student's architecture, of either family (model/family.py)
    mesh: jax.sharding.Mesh
    stream_names: list[str]
    state: dict[str, Any] = None
    step_fn: Callable = None
    state_shardings: Any = None
    param_shardings: Any = None
    distillation: Distillation | None = None  # the teachers; online ones' parameters are arguments of every step
    jitted_step: Callable = None  # (state, batch, *online teachers' params) -> (state, metrics)

    @classmethod
    def create(cls, cfg: Config, arch: Any, mesh, stream_names, weights, imported_params=None,
               teacher: Teacher | Distillation | None = None) -> "Trainer":
        """`teacher`: the teachers of `cfg.distill` (load_distillation), or its one online teacher."""
        if isinstance(teacher, Teacher):
            teacher = Distillation((kd_spec(cfg.distill, teacher.arch, list(stream_names), teacher.vocab),), (teacher,))
        self = cls(cfg, arch, mesh, list(stream_names), distillation=teacher)
        rules = sharding.logical_rules(cfg.mesh)
        init = lambda key: family_of(arch).init(arch, key)  # noqa: E731
        boxed = jax.eval_shape(init, jax.random.key(cfg.train.seed))
        self.param_shardings = sharding.param_shardings(boxed, mesh, rules)
        if imported_params is not None:
            params = jax.device_put(imported_params, self.param_shardings)
        else:
            params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=self.param_shardings)(jax.random.key(cfg.train.seed))
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
        opt_shardings = sharding.like_params_shardings(
            jax.eval_shape(tx.init, params), self.param_shardings, params, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        self.state_shardings = {"step": sharding.replicated(mesh), "params": self.param_shardings,
                                "opt_state": opt_shardings}
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
        self.state = jax.device_put(state, self.state_shardings)
        specs = () if teacher is None else teacher.specs
        step = make_train_step(arch, tx, schedule, weights, cfg.optim.grad_accum_steps, cfg.train.seed,
                               cfg.optim.label_smoothing, cfg.optim.z_loss, cfg.train.prng_impl, specs,
                               cfg.optim.loss_chunk_length)
        lead = 1 if cfg.optim.grad_accum_steps > 1 else 0
        bs = sharding.put_batch_shardings(mesh, lead)
        # online teachers' parameters: sharded like a student's, never donated (only the state is)
        frozen = () if teacher is None else teacher.shardings()
        self.jitted_step = jax.jit(step, in_shardings=(self.state_shardings, bs, *frozen),
                                   out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=0)
        self.step_fn = self.jitted_step if not frozen else self._step_with_teachers
        return self

    @property
    def teacher(self) -> Teacher | None:
        """The one online teacher, if there is exactly one."""
        online = () if self.distillation is None else self.distillation.online
        return online[0] if len(online) == 1 else None

    def _step_with_teachers(self, state, batch):
        return self.jitted_step(state, batch, *self.distillation.params())

    def abstract_state(self) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        a = self.cfg.optim.grad_accum_steps
        stored = [k for k in batch if k.startswith("kd.")]  # stored soft labels (see distill.KDSpec.prefix)
        keys = (*family_of(self.arch).model_inputs, "decoder_target_tokens", "decoder_stream_ids",
                "decoder_loss_weights", *stored)
        batch = {k: batch[k] for k in dict.fromkeys(keys) if k in batch}
        if a > 1:
            batch = {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}
        return sharding.put_batch(batch, self.mesh, leading=1 if a > 1 else 0)


# --------------------------------------------------------------------------- the loop


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test or a progress bar may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int | None = None) -> None:
    """Our loggers print to stderr whatever other libraries did to the root logger, at INFO
    unless TINYLLM_LOG_LEVEL says otherwise (e.g. WARNING)."""
    level = level if level is not None else logging.getLevelName(os.environ.get("TINYLLM_LOG_LEVEL", "INFO").upper())
    for name in ("tinyllm", "tinyllm_jax"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
        logger.propagate = False


class _Preemption:
    """SIGINT (Ctrl-C) and SIGTERM set a flag; the loop saves at the next step boundary and
    stops (`interrupted`). A second signal before that raises KeyboardInterrupt: Orbax
    commits a checkpoint only once it is complete, so the previous one stays the latest.
    With several processes (a signal may reach only some of them) JAX's preemption service
    catches SIGTERM instead, and `check(step)` turns true on every process at the same
    step, so that all of them save that step together."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM
        self._old: dict[int, Any] = {}
        self._synced = jax.process_count() > 1 and jax.distributed.is_initialized()

    def __enter__(self):
        if self._synced:
            return self
        for signum in self.SIGNALS:
            try:
                self._old[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def check(self, step: int) -> None:
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.warning("%s: saving at the end of this step, then stopping (%s again: stop without saving)",
                    signal.Signals(signum).name, signal.Signals(signum).name)

    def interrupted(self, step: int) -> Interrupted:
        name = signal.Signals(self.signum).name
        return Interrupted(f"{name}: saved step {step}, stopped; rerun the same command to resume from step {step}",
                           128 + self.signum)

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)


def _host_metrics(m: dict[str, Any], stream_names: list[str], kd_names: Sequence[str] = ()) -> dict[str, Any]:
    """Host floats of a step's metrics: each teacher's divergence is loss/kd/<name>, or
    loss/kd with one teacher."""
    m = jax.device_get(m)
    out = {"step": None, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
           "real_tokens": int(m["real_tokens"])}
    for name, v, n in zip(stream_names, m["stream_loss"], m["stream_tokens"]):
        out[f"loss/{name}"] = float(v) if n > 0 else None
    if "kd_loss" in m:
        values = np.atleast_1d(m["kd_loss"])
        if len(values) == 1:
            out["loss/kd"] = float(values[0])
        else:
            out |= {f"loss/kd/{name}": float(v) for name, v in zip(kd_names, values)}
    return out


def train(cfg: Config, evaluate_test: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the run described by `cfg`; returns the final summary. The test
    split is scored once at the end with the selected checkpoint, unless `evaluate_test`
    is False (the recipes score it in a stage of their own). Everything is read and checked
    before RUN_DIR is written (train/start.py); a finished run is not run again. SIGINT and
    SIGTERM save the step and raise `Interrupted`, which names the step a rerun resumes from."""
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, while the run runs
            return _train(cfg, evaluate_test, held)
    except KeyboardInterrupt:  # Ctrl-C outside the loop, or a second one before the save
        from tinyllm_jax.train.start import latest_checkpoint

        step = latest_checkpoint(Path(cfg.run_dir))
        where = f"resume from step {step}" if step else "start again (no checkpoint saved yet)"
        raise Interrupted(f"SIGINT: stopped without saving; rerun the same command to {where}", 130) from None


def _train(cfg: Config, evaluate_test: bool, held: contextlib.ExitStack) -> dict[str, Any]:
    import tempfile

    from tqdm.auto import tqdm

    from tinyllm_jax.data.streams import stream_weights
    from tinyllm_jax.runtime import distributed
    from tinyllm_jax.train import start as run_start

    primary = distributed.is_primary()  # process 0 writes the run directory; the others read
    setup_logging(None if primary else logging.WARNING)
    run_dir = Path(cfg.run_dir)
    run_start.check_run_dir(run_dir)
    finished = run_start.finished_summary(cfg, run_dir)
    distributed.barrier("checked whether the run is finished")
    if finished is not None:
        return _already_finished(finished, run_dir, cfg.checkpoint.best_metric, primary)
    if not primary:
        distributed.barrier("run directory written")
    with tempfile.TemporaryDirectory(prefix="tinyllm-start-") as scratch:
        prepared = run_start.prepare(cfg, run_dir, Path(scratch), primary)
        if primary:  # one command at a time in a run directory (runtime/run_lock.py)
            held.enter_context(run_start.lock_run_dir(run_dir))
            run_start.commit(prepared, run_dir)
            distributed.barrier("run directory written")
    cfg, arch, mesh, data = prepared.cfg, prepared.arch, prepared.mesh, prepared.data
    blocks, num_blocks = prepared.blocks, prepared.num_blocks
    family = family_of(arch)
    stream_names = [s.name for s in cfg.data.streams]
    trainer = Trainer.create(cfg, arch, mesh, stream_names, stream_weights(cfg.data.streams), prepared.imported,
                             prepared.distillation)
    kd_names = [] if prepared.distillation is None else [s.name for s in prepared.distillation.specs]
    prepared.imported = prepared.distillation = None

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = ckpt.latest_step() or 0
    if start:
        trainer.state, data_state = ckpt.restore(start, trainer.abstract_state())
        data.restore(data_state)
        log.info("resumed from step %d", start)
    elif cfg.train.continue_optimizer:
        trainer.state = {**trainer.state, "opt_state": _continued_optimizer(cfg, trainer)}
    metrics_log = MetricsLog(run_dir, resume_step=start if start else None)
    evaluator = _make_evaluator(cfg, prepared.evaluation, run_dir, metrics_log)

    peak = peak_flops_per_device()
    flops_of_shape: dict[tuple[int, int, int], float] = {}  # long batches have more attention FLOPs

    def flops(batch: dict[str, Any]) -> float:
        rows = batch["decoder_input_tokens"].shape[0] * num_blocks // len(blocks)
        key = (rows, *(batch[k].shape[1] for k in dict.fromkeys(("encoder_input_tokens", "decoder_input_tokens"))
                       if k in batch))
        if key not in flops_of_shape:
            flops_of_shape[key] = family.flops(arch, *key)
        return flops_of_shape[key]

    total = cfg.train.steps
    pending: tuple[int, Any] | None = None
    interval_tokens, interval_flops, interval_start = 0, 0.0, time.time()
    last_logged: dict[str, Any] = {}
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (cfg.train.progress and primary),
               dynamic_ncols=True)

    def flush(step_done: int, metrics: Any, step_flops: float) -> dict[str, Any]:
        """Reads step `step_done`'s metrics (after the next step was dispatched)."""
        nonlocal interval_tokens, interval_flops, interval_start, last_logged
        m = _host_metrics(metrics, stream_names, kd_names)
        if not np.isfinite(m["loss"]):
            raise NonFiniteLoss(
                f"loss is {m['loss']} at step {step_done}; stopping. The last good checkpoint "
                f"(step {ckpt.latest_step()}) is kept in {run_dir / 'checkpoints'}")
        interval_tokens += m["real_tokens"]
        interval_flops += step_flops
        if step_done % cfg.train.log_every == 0 or step_done == total:
            now = time.time()
            steps_in = cfg.train.log_every if step_done % cfg.train.log_every == 0 else step_done % cfg.train.log_every
            dt = max(now - interval_start, 1e-9)
            m.update(step=step_done, time=now, tokens_per_s=interval_tokens / dt, step_time_s=dt / max(steps_in, 1))
            if peak:
                m["mfu"] = interval_flops / dt / (peak * mesh.size)
            metrics_log.write(m)
            last_logged = m
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in m.items()
                             if k.startswith("loss") and v is not None} | {"tok/s": f"{m['tokens_per_s']:.0f}"})
            interval_tokens, interval_flops, interval_start = 0, 0.0, now
        return m

    result: dict[str, Any] = {}
    try:
        with _Preemption() as preempt:  # several processes: the JAX preemption service agrees on the step
            step = start
            while step < total:
                host_batch = next(data)
                trainer.state, metrics = trainer.step_fn(trainer.state, trainer.put(host_batch))
                step += 1
                preempt.check(step)
                if pending is not None:
                    flush(*pending)
                pending = (step, metrics, flops(host_batch))
                bar.update(1)
                eval_due = evaluator is not None and cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0
                save_due = step % cfg.checkpoint.every_steps == 0 or step == total or preempt.requested
                if eval_due or save_due:
                    flush(*pending)
                    pending = None
                    paused = time.time()
                    eval_metrics = evaluator(trainer.state["params"], step, "validation") if eval_due else None
                    ckpt.save(step, trainer.state, data.state(),
                              metrics=eval_metrics if eval_metrics and cfg.checkpoint.best_metric in eval_metrics else None)
                    interval_start = _leave_out_of_step_times(bar, interval_start, time.time() - paused)
                if preempt.requested:
                    ckpt.wait()
                    raise preempt.interrupted(step)
            if pending is not None:
                flush(*pending)
        ckpt.wait()
        result = {"steps": total, "final_loss": last_logged.get("loss")}
        if evaluator is not None and cfg.data.test and evaluate_test:
            best = ckpt.best_step()
            params = trainer.state["params"]
            if best is not None and best != total:
                restored, _ = ckpt.restore(best, trainer.abstract_state())
                params = restored["params"]
            result["test"] = evaluator(params, best or total, "test")
            result["test_checkpoint_step"] = best or total
        result |= _best_validation(run_dir, ckpt.best_step(), cfg.checkpoint.best_metric)
        if primary:
            (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
            print(_summary_line(result, run_dir / "summary.json", cfg.checkpoint.best_metric), flush=True)
        return result
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()


def _leave_out_of_step_times(bar, interval_start: float, seconds: float) -> float:
    """Evaluation and checkpoint time is no training time: the progress bar's rate (its ETA)
    and the next logged tokens/s leave it out. Returns the shifted interval start."""
    if not bar.disable:
        bar.last_print_t += seconds  # tqdm's smoothed rate uses the time since its last print
    return interval_start + seconds


def _best_validation(run_dir: Path, best: int | None, metric: str) -> dict[str, Any]:
    """The selected step and its validation `metric`, read back from metrics.jsonl (which a
    resumed run shares with the runs before it)."""
    value = None
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == best and metric in row:
            value = row[metric]
    return {"best_step": best, f"best_{metric}": value}


def _continued_optimizer(cfg: Config, trainer: "Trainer") -> Any:
    """The optimizer state of the run model.init names, at its selected checkpoint, with the
    schedule's step count at 0 (this run's own schedule, optim.schedule_offset, says where
    the learning rate stands); Adam's moments and its bias-correction count go on."""
    from tinyllm_jax.config import ConfigError, load_config
    from tinyllm_jax.runs import is_run_dir, selected_step

    init = cfg.model.init
    if not init or not is_run_dir(init):
        raise ConfigError(f"train.continue_optimizer: model.init={init!r} must be one of our runs (a folder with "
                          "config.yaml and checkpoints/), whose optimizer state the run starts from")
    step = selected_step(init)
    other = Checkpointer(Path(init) / "checkpoints", load_config(Path(init) / "config.yaml").checkpoint,
                         read_only=True)
    try:
        state, _ = other.restore(step, trainer.abstract_state())
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"train.continue_optimizer: the optimizer state of {init} (step {step}) does not fit this "
                        f"run's optimizer (optim.name and the parameters must be the same): "
                        f"{str(e).splitlines()[0][:200]}") from None
    finally:
        other.close()

    def zero_schedule(x):
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=x.count * 0)  # keeps the count's sharding
        return x

    log.info("optimizer state continued from %s, step %d", init, step)
    return jax.tree.map(zero_schedule, state["opt_state"],
                        is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def _already_finished(summary: dict[str, Any], run_dir: Path, metric: str, primary: bool) -> dict[str, Any]:
    """A finished run started again with the same settings: one line, nothing rerun."""
    if primary:
        print(f"{run_dir}: already finished (raise train.steps to train on); "
              + _summary_line(summary, run_dir / "summary.json", metric), flush=True)
    return summary


def _summary_line(result: dict[str, Any], summary: Path, metric: str) -> str:
    """One line to end a run on: the selected step, its validation score, test accuracy."""
    best, value = result.get("best_step"), result.get(f"best_{metric}")
    chosen = (f"best step {best} ({metric.removeprefix('eval_')} on validation {value:.4f})" if value is not None
              else f"kept step {best} (no validation score)")
    test = result.get("test") or {}
    tested = f", test accuracy {test['test_accuracy']:.4f}" if "test_accuracy" in test else ""
    return f"trained {result['steps']} steps: {chosen}{tested}; summary: {summary}"


def _make_evaluator(cfg: Config, evaluation: Evaluation | None, run_dir: Path, metrics_log: MetricsLog):
    """params, step, split -> metrics dict (logged), or None when there is nothing to evaluate."""
    from tinyllm_jax.data.sources import has_split

    if evaluation is None:
        return None

    def run(params, step: int, split: str) -> dict[str, float] | None:
        if not has_split(cfg.data, split):
            return None
        summary = evaluation.run(params, split, run_dir, step)
        prefix = "eval" if split == "validation" else "test"
        record = {"step": step, **{f"{prefix}_{k}": v for k, v in summary.items()
                                   if k != "step" and isinstance(v, (int, float))}}
        metrics_log.write(record)
        log.info("step %d %s: %s", step, split, {k: v for k, v in record.items() if k != "step"})
        return record

    return run
