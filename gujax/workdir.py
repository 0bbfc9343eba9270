"""A training run's folder: its identity, metrics, history, parameter
snapshots and orbax checkpoints (``gujax.train`` writes it; one layout for
one run and for M stacked runs).

    workdir/config.json          the run's identity (checked on resume)
    workdir/metrics.jsonl        one JSON record per step, one value per run
    workdir/history.jsonl        one JSON record per run and evaluation
    workdir/snapshots/           parameters at chosen epochs, per run
    workdir/checkpoints/         orbax checkpoints of the whole (stacked) TrainState

Typed PRNG keys (DP-SGD's noise key) are stored as raw key data. Every
file is written atomically or appended one whole line at a time, and read
back through ``gujax.files``: a damaged one is a ``CorruptFile`` naming it
(and saying to delete the workdir), a line cut short by a kill is dropped.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import serialization

from gujax import files

PyTree = Any


def to_saveable(tree):
    """``tree`` with typed PRNG keys replaced by their key data."""
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def from_saveable(saved, like):
    """The inverse of ``to_saveable``, with ``like``'s key implementations."""
    return jax.tree_util.tree_map(
        lambda s, l: jax.random.wrap_key_data(s, impl=jax.random.key_impl(l))
        if _is_key(l) else s, saved, like)


def _manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                             enable_async_checkpointing=False))


def _remedy(workdir: str) -> str:
    return f"delete {workdir} (that training then starts over)"


def read_jsonl(path: str, up_to_step: int) -> list[dict]:
    """The records of a JSONL file with "step" <= ``up_to_step`` ([] if none)."""
    records = files.read_jsonl(path, _remedy(os.path.dirname(path)))
    with files.reading(path, _remedy(os.path.dirname(path))):
        return [r for r in records if int(r["step"]) <= up_to_step]


def write_jsonl(path: str, records: list[dict]) -> None:
    with files.atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def open_workdir(workdir: str, config_json: dict, state, resume: bool):
    """Restore ``state`` from ``workdir``'s latest checkpoint (``resume``, and
    the saved config equal to ``config_json`` but for "epochs"), or clear the
    old checkpoints. Writes config.json, truncates metrics.jsonl and
    history.jsonl to the restored step. Returns (state, manager, history)."""
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    manager = _manager(workdir)
    remedy = _remedy(workdir)
    with files.reading(manager.directory, remedy):
        latest = manager.latest_step() if resume else None
    current = json.loads(json.dumps(config_json))
    if latest is not None:
        saved = files.read_json(config_path, remedy)
        changed = {k for k in current if k != "epochs" and saved.get(k) != current[k]}
        if changed:
            raise ValueError(f"{workdir} holds a run with a different config "
                             f"({sorted(changed)}); use another workdir or resume=False")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, to_saveable(state))
        with files.reading(os.path.join(manager.directory, str(latest)), remedy):
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            state = from_saveable(restored, state)
    else:
        for step in manager.all_steps():
            manager.delete(step)
    # A stacked run's finished members stop counting steps: the run is as far
    # as its furthest member.
    done = int(jnp.max(state.step))
    files.write_json(config_path, current, indent=1)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history_path = os.path.join(workdir, "history.jsonl")
    # Drop records written after the checkpoint: those steps run again.
    write_jsonl(metrics_path, read_jsonl(metrics_path, done))
    history = read_jsonl(history_path, done)
    write_jsonl(history_path, history)
    return state, manager, history


def save_checkpoint(manager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(to_saveable(state)))


def close(manager) -> None:
    """Wait for and close a checkpoint manager (None: nothing to do)."""
    if manager is not None:
        manager.wait_until_finished()
        manager.close()


class Snapshots:
    """Parameters at chosen epochs, per run; kept on disk with a workdir so
    that a resumed run still returns the snapshots taken before the kill."""

    def __init__(self, workdir: str | None, runs: int):
        self.folder = None if workdir is None else os.path.join(workdir, "snapshots")
        self.taken: list[dict[int, PyTree]] = [{} for _ in range(runs)]

    def _path(self, run: int, epoch: int) -> str:
        return os.path.join(self.folder, f"run{run:03d}_epoch{epoch:04d}.msgpack")

    def take(self, run: int, epoch: int, params: PyTree) -> None:
        params = jax.device_get(params)
        self.taken[run][epoch] = params
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)
            with files.atomic_write(self._path(run, epoch), "wb") as f:
                f.write(serialization.to_bytes(params))

    def restore(self, epochs: tuple[int, ...], done_epochs: list[int], like: PyTree) -> None:
        """Read back the snapshots of epochs each run has already completed."""
        if self.folder is None:
            return
        for run, done in enumerate(done_epochs):
            for epoch in epochs:
                path = self._path(run, epoch)
                if epoch <= done and os.path.exists(path):
                    with files.reading(path, _remedy(os.path.dirname(self.folder))), \
                            open(path, "rb") as f:
                        self.taken[run][epoch] = serialization.from_bytes(like, f.read())


