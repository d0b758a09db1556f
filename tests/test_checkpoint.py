"""The checkpoint policy: the last K plus the best by the validation metric."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tinyllm_jax.config import CheckpointConfig
from tinyllm_jax.runtime.checkpoint import Checkpointer


def test_keeps_last_k_plus_best_and_restores_both(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=1, async_save=False))
    ckpt.save(1, {"x": jnp.full(3, 1.0)}, {"pos": 1})
    assert ckpt.best_step() == 1  # no metrics yet: the latest
    ckpt.save(2, {"x": jnp.full(3, 2.0)}, {"pos": 2}, metrics={"eval_accuracy": 0.9})
    ckpt.save(3, {"x": jnp.full(3, 3.0)}, {"pos": 3}, metrics={"eval_accuracy": 0.5})
    ckpt.save(4, {"x": jnp.full(3, 4.0)}, {"pos": 4})
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [2, 4]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 4
    state, data = ckpt.restore(2)
    np.testing.assert_array_equal(state["x"], [2.0, 2.0, 2.0])
    assert data == {"pos": 2}
    ckpt.close()


def test_min_mode_keeps_the_lowest(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=1, async_save=False, best_metric="eval_loss", best_mode="min"))
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        ckpt.save(step, {"x": jnp.zeros(2)}, {}, metrics={"eval_loss": loss})
    ckpt.wait()
    assert ckpt.best_step() == 2 and sorted(ckpt.manager.all_steps()) == [2, 4]
    ckpt.close()
