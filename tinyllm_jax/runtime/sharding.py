"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place parameters
and batches on it. The rules are data from the config; nothing here names a layer."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinyllm_jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """(data, fsdp, tensor) over `devices` (default: every device of every process, placed
    by `jax.make_mesh` to suit the interconnect: on a TPU pod, neighbouring chips)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fsdp, tensor = cfg.fsdp, cfg.tensor
    data = cfg.data if cfg.data > 0 else n // max(1, fsdp * tensor)
    if data * fsdp * tensor != n or min(data, fsdp, tensor) < 1:
        raise ConfigError(
            f"mesh: data={cfg.data} x fsdp={fsdp} x tensor={tensor} does not cover the {n} devices "
            f"(set mesh.data=-1 to use all devices left over by fsdp and tensor)")
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    rules = []
    for item in cfg.rules:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"mesh.rules: expected [logical_axis, mesh_axis or list or null], found {item!r}")
        logical, physical = item
        physical = tuple(physical) if isinstance(physical, list) else physical
        for ax in (physical if isinstance(physical, tuple) else (physical,)):
            if ax is not None and ax not in AXES:
                raise ConfigError(f"mesh.rules: {logical!r} maps to unknown mesh axis {ax!r} (known: {AXES})")
        rules.append((logical, physical))
    return tuple(rules)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. 3 heads over tensor=2):
    such a dimension is replicated rather than unevenly split."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if size == 1 or dim % size == 0 else None)
    return P(*out)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for parameters from their logical axis annotations."""
    logical = nn.get_partition_spec(abstract_boxed_params)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    shapes = nn.unbox(abstract_boxed_params)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s.spec, x.shape, mesh)), shardings, shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp); the length dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


@functools.lru_cache(maxsize=16)
def process_row_blocks(mesh: Mesh) -> tuple[tuple[int, ...], int]:
    """Which rows of a batch this process's devices hold: the batch is cut into
    data x fsdp equal blocks (the batch axes) and this process holds `blocks` of the
    `num_blocks`, in order. One process: all of them. Processes whose devices replicate the
    same rows (a tensor axis spanning hosts) get the same blocks."""
    num_blocks = batch_divisor(mesh)
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((num_blocks,))
    blocks = sorted({idx[0].indices(num_blocks)[0] for idx in index_map.values()})
    return tuple(blocks), num_blocks


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """Host numpy batch -> global jax arrays sharded over the batch axes. With `leading`
    extra dimensions (gradient accumulation), rows are dimension `leading`. With several
    processes each passes only the rows its devices hold (`process_row_blocks`, in order)
    and the global batch is assembled from the parts."""
    blocks, num_blocks = process_row_blocks(mesh)

    def put(x):
        spec = P(*([None] * leading), BATCH_AXES, *([None] * (x.ndim - leading - 1)))
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        rows = x.shape[leading] // len(blocks) * num_blocks
        return jax.make_array_from_process_local_data(sharding, x, (*x.shape[:leading], rows, *x.shape[leading + 1:]))

    return {k: put(v) for k, v in batch.items()}


def local_mesh() -> Mesh:
    """This process's own devices as a data-parallel mesh (work each process does alone)."""
    return make_mesh(MeshConfig(), jax.local_devices())


def replicate_on(tree: Any, mesh: Mesh) -> Any:
    """Host arrays or global jax arrays (sharded over any mesh, possibly spanning processes)
    -> a full copy on every device of `mesh`, a mesh of this process's devices. Global
    arrays are first replicated over their own mesh (a collective: every process calls it)."""
    target = replicated(mesh)
    spanning = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if not spanning:
        return jax.device_put(tree, target)
    full = _replicator(spanning[0].sharding.mesh)(tree)
    mine = set(mesh.devices.flat)

    def local(x):
        shards = [s.data for s in x.addressable_shards if s.device in mine]
        return jax.make_array_from_single_device_arrays(x.shape, target, shards)

    return jax.tree.map(local, full)


@functools.lru_cache(maxsize=16)
def _replicator(mesh: Mesh):
    """One compiled identity per mesh: anything in, a full copy on every device out."""
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def put_batch_shardings(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """The sharding `put_batch` gives 2-D (or, with `leading`, 3-D) batch arrays."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, None))


def like_params_shardings(tree_shapes: Any, params_shardings: Any, params_shapes: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (an optimizer state) whose leaves mirror parameters: a leaf
    whose key path ends with a parameter's path and has its shape takes that parameter's
    sharding; anything else (counts, Adafactor's factored moments) is replicated."""
    by_path = {}
    for (path, sh), (_, shape) in zip(jax.tree_util.tree_leaves_with_path(params_shardings),
                                      jax.tree_util.tree_leaves_with_path(params_shapes)):
        by_path[tuple(str(k) for k in path)] = (sh, shape.shape)

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree_shapes)
