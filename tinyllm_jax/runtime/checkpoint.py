"""Orbax checkpoints: async saves, the last K kept plus the best by a validation metric,
exact resume (train state and data iterator state), parameters alone for export and evaluation.

Orbax writes each step into a temporary directory and renames it when complete, so a
kill during a save leaves the previous checkpoint as the latest good one. With several
processes every one of them calls `save` and `restore` at the same step: each writes the
array shards its devices own (one copy of replicated data), process 0 writes the metadata
and the data iterator state and commits the step once all are done. The directory must be
the same shared path for every process. A state saved by N processes restores into any
other number of processes (the arrays are resharded to the new mesh on read)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tinyllm_jax.config import CheckpointConfig


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
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_state: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, metrics=metrics, force=True)

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

