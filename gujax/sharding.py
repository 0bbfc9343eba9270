"""Data parallelism: the batch split across devices, GNQ of the global batch.

GNQ needs the Gram matrix of the *global* batch (every example against
every other), so it cannot be computed shard by shard and averaged. With
``jax.jit`` and ``jax.sharding`` it does not have to be: place the batch
sharded along its leading axis over a 1-D device mesh and the parameters
(and optimiser / ledger state) replicated, and XLA's SPMD partitioner
runs the per-example work (forward, backward, ghost factors) on each
device's shard and inserts the collectives the B x B Gram matrix and the
weighted gradient sum need. The result equals the single-device one to
rounding; the code is the same on one CPU, several GPUs or a TPU pod slice
(on several hosts, build the global batch with
``jax.make_array_from_process_local_data``; see docs/performance.md).

    mesh = data_mesh()                           # all devices, axis "data"
    step = sharded_jit(train_step, mesh, batch_argnums=(1,))
    state = replicate(state, mesh)
    state, metrics = step(state, shard_batch(batch, mesh))

Many runs (shadow models) are the other axis to split: ``run_mesh()`` over
the local devices makes ``gujax.train.train_stacked(..., mesh=)`` put M / D
of its stacked runs on each device, and on several hosts
(``jax.distributed.initialize()``) ``process_share`` gives each process its
own model indices, trained on its own devices with nothing exchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gujax.grads import batch_size

PyTree = Any
DATA_AXIS = "data"
RUN_AXIS = "runs"


def data_mesh(devices: Sequence[jax.Device] | None = None, *,
              axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devices), (axis_name,))


def batch_sharding(mesh: Mesh, *, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) axis split over ``axis_name``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: PyTree, mesh: Mesh, *, axis_name: str = DATA_AXIS) -> PyTree:
    """Place every leaf of ``batch`` (common leading axis B) split along B.

    Raises ValueError if B is not a multiple of the number of devices on
    ``axis_name`` (pad the batch with masked rows, as ``gujax.sampling``
    does for Poisson sampling, to make it one).
    """
    n = batch_size(batch)
    shards = mesh.shape[axis_name]
    if n % shards:
        raise ValueError(f"batch size {n} is not a multiple of the {shards} devices on "
                         f"mesh axis {axis_name!r}; pad it with masked rows")
    return jax.device_put(batch, batch_sharding(mesh, axis_name=axis_name))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A full copy of ``tree`` on every device of ``mesh`` (parameters, states)."""
    return jax.device_put(tree, replicated(mesh))


def sharded_jit(fn: Callable, mesh: Mesh, *, batch_argnums: Sequence[int] = (1,),
                axis_name: str = DATA_AXIS) -> Callable:
    """``jax.jit(fn)`` with the arguments in ``batch_argnums`` split along
    their leading axis over the mesh, every other argument and every output
    replicated.

    ``fn`` is written as for one device and sees global shapes; e.g. a GNQ
    step computes the (B, B) Gram matrix of the whole batch.
    """
    batch_argnums = tuple(batch_argnums)
    jitted = jax.jit(fn, out_shardings=replicated(mesh))

    def run(*args):
        # Placing an argument where it already is costs nothing.
        placed = [shard_batch(a, mesh, axis_name=axis_name) if i in batch_argnums
                  else replicate(a, mesh) for i, a in enumerate(args)]
        return jitted(*placed)

    return run


def run_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "runs" over ``devices`` (default: this process's
    ``jax.local_devices()``: stacked runs never talk to each other, so a
    host keeps its runs on its own devices)."""
    return data_mesh(jax.local_devices() if devices is None else devices, axis_name=RUN_AXIS)


def process_share(indices: Sequence[int], *, process_index: int | None = None,
                  process_count: int | None = None) -> list[int]:
    """This process's share of ``indices``: every ``process_count``-th one,
    starting at ``process_index`` (defaults: ``jax.process_index()`` and
    ``jax.process_count()``, so one process gets them all).

    Each index goes to exactly one process, fixed by the two numbers alone,
    so a host that dies can be restarted on its share without the others.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"process_count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
            or not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, {count}), got {index!r}")
    return list(indices)[index::count]
