"""Orbax checkpoints: async saves, the last K kept plus the best by a validation metric,
exact resume (train state and data iterator state), parameters alone for export and evaluation.

Orbax writes each step into a temporary directory and renames it when complete, so a
kill during a save leaves the previous checkpoint as the latest good one. With several
processes every one of them calls `save` and `restore` at the same step: each writes the
array shards its devices own (one copy of replicated data), process 0 writes the metadata
and the data iterator state and commits the step once all are done. The directory must be
the same shared path for every process. A state saved by N processes restores into any
other number of processes (the arrays are resharded to the new mesh on read).

A save that fails on the file system (disk full, a quota, permissions) stops the run with
`CheckpointError`, one line naming the step, the folder and the reason; the step's
unfinished folder is never committed, so the last complete checkpoint stays the latest."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tinyllm_jax.config import CheckpointConfig
from tinyllm_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint could not be written; the previous one is kept."""


def complete_steps(directory: str | Path) -> list[int]:
    """The steps saved completely in `directory`, read without Orbax (an unfinished save
    carries a temporary suffix: only complete steps are plain numbers)."""
    folder = Path(directory)
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _io_reason(err: BaseException) -> str | None:
    """The operating system's reason for a failed write: an OSError's, or the errno that
    TensorStore quotes in its ValueError; None for anything else (a bug, not the disk)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    found = re.search(r"os_error_code='(\d+)'", str(err))
    return os.strerror(int(found.group(1))) if found else None


def _ignore_closed_loop_callbacks() -> None:
    """When a save fails, Orbax closes its event loop while TensorStore still holds callbacks
    for the writes in flight; each then reports "Event loop is closed" as an unraisable
    exception (a traceback each, dozens of them). Only those are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_tinyllm", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._tinyllm = True
    sys.unraisablehook = hook


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save at length (tracebacks, TensorStore specs) before
    it raises; we report it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_A_SAVE_FAILED = False  # set once a save failed on the file system: its writes in flight are abandoned


class _QuietUnretrievedWriteErrors(logging.Filter):
    """When one of a save's parallel writes fails, asyncio's gather raises that one; the
    others' failures (the same full disk) are never retrieved, and asyncio logs each with its
    traceback when the task is collected; once a save has failed, its writes still pending
    are destroyed with the loop ("Task was destroyed but it is pending!"). The save's failure
    is reported in one line, so those are dropped here; any other error is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = str(record.msg)
        if "never retrieved" in message and exc is not None and _io_reason(exc) is not None:
            return False
        return not (_A_SAVE_FAILED and message.startswith("Task was destroyed but it is pending"))


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        self.cfg = cfg
        metric = cfg.best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(1, cfg.keep))]
        if cfg.keep_best:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=cfg.best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        if read_only:  # orbax warns at length that a read-only manager will not save
            logging.getLogger("absl").setLevel(logging.ERROR)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=(lambda m: m[metric]) if cfg.keep_best else None,
            best_mode=cfg.best_mode,
            enable_async_checkpointing=cfg.async_save,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        self._unsaved: int | None = None  # the step being written in the background
        self._failed = False
        if not read_only:
            _ignore_closed_loop_callbacks()
            if not any(isinstance(f, _QuietOrbaxErrors) for f in logging.getLogger("absl").filters):
                logging.getLogger("absl").addFilter(_QuietOrbaxErrors())
            if not any(isinstance(f, _QuietUnretrievedWriteErrors) for f in logging.getLogger("asyncio").filters):
                logging.getLogger("asyncio").addFilter(_QuietUnretrievedWriteErrors())

    def _guarded(self, step: int | None, write: Callable[[], Any]) -> Any:
        """Runs `write`; a failure of the file system becomes one CheckpointError."""
        global _A_SAVE_FAILED
        try:
            return write()
        except (OSError, ValueError) as e:
            reason = _io_reason(e)
            if reason is None:
                raise
            self._failed = _A_SAVE_FAILED = True
            # the failed save's other writes are coroutines nobody will await now; Python warns
            # of each as it collects them, maybe at exit, after our one line
            warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
            kept = complete_steps(self.directory)
            keeps = f"the last complete checkpoint, step {kept[-1]}, is kept" if kept else "no checkpoint is complete yet"
            raise CheckpointError(f"run_dir: cannot save checkpoint step {step if step is not None else '?'} in "
                                  f"{self.directory}: {reason}; {keeps} (free space, then rerun the same command "
                                  f"to resume)") from None

    def save(self, step: int, state: Any, data_state: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self._guarded(self._unsaved, self.manager.wait_until_finished)  # the previous save's failure is its own
        self._unsaved = step
        self._guarded(step, lambda: self.manager.save(step, args=args, metrics=metrics, force=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best validation metric, else the latest."""
        best = self.manager.best_step() if self.cfg.keep_best else None  # None: no metrics saved
        return best if best is not None else self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any | None = None) -> tuple[Any, dict[str, Any]]:
        state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_params(self, step: int) -> Any:
        """Only the parameters, as host arrays (for export and stand-alone evaluation)."""
        import jax
        import numpy as np

        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # every process its own copy
        meta = self.manager.item_metadata(step)["state"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return jax.tree.map(np.asarray, out["state"]["params"])

    def wait(self) -> None:
        self._guarded(self._unsaved, self.manager.wait_until_finished)

    def close(self) -> None:
        if self._failed:  # reported; closing would raise it again and strand TensorStore's callbacks
            return
        self.wait()
        self.manager.close()

