"""Shadow models on disk: the run's identity, one model per file pair, resume.

Layout of a workdir (files written atomically; a model's ``.npz`` is its
"done" marker, written last):

    workdir/shadow.json           the run's identity (arm, config, pool, seed, M)
    workdir/model_{m:03d}.npz     logits (N, A, C) on the pool and (Z, A, C) on
                                  the population, ledger arrays (N,)
    workdir/model_{m:03d}.json    accuracies, wall time, sigma / epsilon
    workdir/training_{first:03d}-{last:03d}/   the trainer's checkpoints while a
                                  group of models trains (removed when it is done)

``ShadowStore.open`` checks that a workdir holds models of the same run
(``check_resume``: a ``ResumeMismatch`` names the settings that changed) or
clears it; finished models are
read back, never retrained.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Callable, Iterator, Sequence

import numpy as np

from gujax import files
from gujax.audit.shadow.record import (MODEL_ARRAYS, ShadowModel, ShadowRecord, ShadowSpec,
                                       assemble_record, canary_group_index)
from gujax.data.dataset import Dataset

MANIFEST = "shadow.json"


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def identity(spec: ShadowSpec, pool: Dataset, population: Dataset) -> dict:
    """The run's identity as ``shadow.json`` holds it (JSON-normalised)."""
    record = {
        "arm": spec.arm.to_json(), "config": spec.config.to_json(),
        "num_models": spec.num_models, "seed": spec.seed,
        "augmentations": list(spec.augmentations), "model": repr(spec.model),
        "pool": {"name": pool.name, "split": pool.split, "size": len(pool),
                 "fingerprint": _fingerprint(pool.ids, pool.labels, pool.images)},
        "population": {"name": population.name, "split": population.split,
                       "size": len(population),
                       "fingerprint": _fingerprint(population.ids, population.labels)}}
    if spec.canary_protocol:     # absent otherwise: earlier runs keep their identity
        record["always_in"] = spec.always_in
        record["canary_groups"] = [list(b) for b in spec.canary_groups]
    return json.loads(json.dumps(record))


def _groups_of(identity: dict, num_rows: int) -> np.ndarray | None:
    """The canary groups a run's identity describes (None: population protocol)."""
    if "always_in" not in identity:
        return None
    return canary_group_index(identity["always_in"],
                              [tuple(b) for b in identity["canary_groups"]], num_rows)


_ABSENT = object()


def _short(value) -> str:
    text = "absent" if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(saved, current, path: str = "") -> list[str]:
    """'setting (saved X, now Y)' for each leaf that differs, settings dotted."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = list(current) + [k for k in saved if k not in current]
        return [line for k in keys for line in _differences(
            saved.get(k, _ABSENT), current.get(k, _ABSENT), f"{path}.{k}" if path else k)]
    if saved == current:
        return []
    return [f"{path} (saved {_short(saved)}, now {_short(current)})"]


class ResumeMismatch(ValueError):
    """A workdir holds shadow models of another run: ``changes`` lists each
    setting that differs as 'setting (saved X, now Y)'."""

    def __init__(self, workdir: str, changes: Sequence[str]):
        self.workdir, self.changes = workdir, list(changes)
        super().__init__(f"{workdir} holds shadow models of a different run; it differs in "
                         f"{', '.join(self.changes)}; use another workdir or resume=False")


def check_resume(workdir: str, identity: dict) -> None:
    """``ResumeMismatch`` if ``workdir`` holds the models of a run other than
    ``identity``; nothing to check (and nothing created) if it holds none."""
    manifest = os.path.join(workdir, MANIFEST)
    if not os.path.exists(manifest):
        return
    saved = files.read_json(manifest, _manifest_remedy(workdir))
    changed = _differences(saved, identity)
    if changed:
        raise ResumeMismatch(workdir, changed)


def _manifest_remedy(workdir: str) -> str:
    return f"delete {workdir} (its models are then trained again)"


def _save_atomic(path: str, mode: str, write: Callable) -> None:
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)


class ShadowStore:
    """The models of one run in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.identity = files.read_json(os.path.join(workdir, MANIFEST),
                                        _manifest_remedy(workdir))

    @classmethod
    def open(cls, workdir: str, identity: dict, *, resume: bool) -> ShadowStore:
        """Create ``workdir`` or take it over for the run ``identity``.

        resume: keep the finished models (a ``shadow.json`` of another run is
          a ``ResumeMismatch`` naming the settings that differ); False deletes
          the models and checkpoints of the run it holds first.
        """
        manifest = os.path.join(workdir, MANIFEST)
        if resume:
            check_resume(workdir, identity)
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(manifest) and not resume:
            for name in os.listdir(workdir):
                if name.startswith(("model_", "training_")):
                    path = os.path.join(workdir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        files.write_json(manifest, identity, indent=1)
        return cls(workdir)

    @property
    def num_models(self) -> int:
        return self.identity["num_models"]

    def _stem(self, m: int) -> str:
        return os.path.join(self.workdir, f"model_{m:03d}")

    def finished(self) -> list[int]:
        """The models whose files are complete."""
        return [m for m in range(self.num_models) if self._done(m)]

    def _done(self, m: int) -> bool:
        return all(os.path.exists(self._stem(m) + ext) for ext in (".npz", ".json"))

    def save(self, m: int, model: ShadowModel) -> None:
        """Write model m: its summary, then (marking it done) its arrays."""
        stem = self._stem(m)
        _save_atomic(stem + ".json", "w", lambda f: json.dump(model.summary, f, indent=1))
        _save_atomic(stem + ".npz", "wb", lambda f: np.savez(f, **model.arrays))

    def load(self, m: int) -> ShadowModel:
        stem = self._stem(m)
        remedy = f"delete {stem}.npz (that model is then trained again)"
        return ShadowModel(files.load_npz(stem + ".npz", remedy, names=tuple(MODEL_ARRAYS)),
                           files.read_json(stem + ".json", remedy))

    @contextlib.contextmanager
    def training(self, models: Sequence[int], *, share: tuple[int, int] = (0, 1)
                 ) -> Iterator[str]:
        """The checkpoint folder of a group of models while it trains.

        Groups train in order, so only the first unfinished one of a share
        (``gujax.sharding.process_share``; (0, 1) is every model) can have
        left checkpoints worth resuming; the share's others (from a run with
        another grouping) are removed, other shares' folders are left to
        them. The folder goes when the block completes, and stays for the
        next call if it raises.
        """
        index, count = share
        tag = "" if count == 1 else f"_share{index}of{count}"
        name = f"training_{models[0]:03d}-{models[-1]:03d}{tag}"
        for stale in os.listdir(self.workdir):
            if stale.startswith("training_") and stale != name and (count == 1
                                                                   or stale.endswith(tag)):
                shutil.rmtree(os.path.join(self.workdir, stale), ignore_errors=True)
        path = os.path.join(self.workdir, name)
        yield path
        shutil.rmtree(path, ignore_errors=True)

    def record(self, models: dict[int, ShadowModel], *, pool: Dataset, population: Dataset,
               in_mask: np.ndarray) -> ShadowRecord:
        """The run's record from ``models`` (m -> model, e.g. those trained by
        this call), the other models read from disk (all must be finished)."""
        missing = [m for m in range(self.num_models)
                   if m not in models and not self._done(m)]
        if missing:
            raise ValueError(f"{len(missing)} shadow models are not finished in "
                             f"{self.workdir}")
        every = [models[m] if m in models else self.load(m) for m in range(self.num_models)]
        return assemble_record(every, arm=self.identity["arm"],
                               augmentations=self.identity["augmentations"], pool=pool,
                               population=population, in_mask=in_mask,
                               groups=_groups_of(self.identity, len(pool)))


def load_shadow_record(workdir: str, *, pool: Dataset, population: Dataset,
                       in_mask: np.ndarray) -> ShadowRecord:
    """Read back the finished models of ``workdir`` (all must be done)."""
    return ShadowStore(workdir).record({}, pool=pool, population=population, in_mask=in_mask)
