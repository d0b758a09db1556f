"""Decoding under 8 simulated CPU devices (slots and pages over the data axes, parameters
sharded by the training rules) gives the same predictions as on one device: greedy through
`shard_batch` (as evaluation passes it) and through `mesh=`, and sampled with seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax import linen as nn
from tinyllm_jax.config import MeshConfig
from tinyllm_jax.eval.decode import generate_ids
from tinyllm_jax.eval.engine import Engine, Sampling
from tinyllm_jax.model.hf import load_pretrained
from tinyllm_jax.model.t5 import T5
from tinyllm_jax.runtime import sharding

assert jax.device_count() == 8, jax.devices()
_, params, tok, cfg = load_pretrained(sys.argv[1])
texts = ["what is two plus three?", "the quick brown fox", "plants use sunlight", "12 times 3",
         "Answer Choices: (a) red (b) blue", "a rock is heavier", "so the answer is", "Q: what is 12 times 3?",
         "numbers 0 1 2", "the lazy dog"]
ids = tok(texts)["input_ids"]
limits = [10, 3, 10, 7, 10, 1, 10, 5, 10, 9]
seeds = list(range(100, 110))
single = jax.device_put(params, jax.devices()[0])
one = generate_ids(cfg, single, ids, limits, batch_size=8)
one_sampled = generate_ids(cfg, single, ids, 10, batch_size=3, temperature=1.0, top_k=20, seeds=seeds)
mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
boxed = jax.eval_shape(lambda k: T5(cfg).init(k, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"], jax.random.key(0))
shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(MeshConfig()))
sharded = jax.device_put(params, shardings)
assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
put = lambda arr: jax.device_put(arr, sharding.batch_sharding(mesh))
eight = generate_ids(cfg, sharded, ids, limits, batch_size=8, shard_batch=put)
engine = Engine(cfg, 3, mesh=mesh, sampling=Sampling(1.0, 20))  # 3 slots: rounded up to the 4 row shards
eight_sampled = engine.generate(sharded, ids, [10] * len(ids), seeds)
print(json.dumps({"one": one, "eight": eight, "one_sampled": one_sampled, "eight_sampled": eight_sampled,
                  "slots": engine.slots, "row_axes": engine.stats["row_axes"]}))
"""


def test_decoding_on_eight_devices_matches_one(tiny_t5_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_t5_dir)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["one"] == out["eight"]
    assert sum(map(len, out["one"])) > 0
    assert out["one_sampled"] == out["eight_sampled"]
    assert len({tuple(s) for s in out["one_sampled"]}) > 1
    assert out["slots"] == 4
    assert out["row_axes"] == {"slots": ["data", "fsdp"], "pages": ["data", "fsdp"]}
