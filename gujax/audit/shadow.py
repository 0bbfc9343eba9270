"""Shadow models: train M models of one arm on random halves of a pool, then
attack each in turn with the others as its shadows.

    record = run_shadow_models(arm, pool=pool, population=test, model=model,
                               config=TrainConfig(...), num_models=8, workdir="runs/sgd")
    audit = attack(record)           # LiRA online/offline, loss, RMIA + D_j vs LiRA

or ``audit_arm(...)`` for both. Membership is drawn independently: each model
takes each pool example with probability 1/2 (``shadow_membership(...,
balanced=False)``), so the shadow group sizes carry no information about the
target's membership (docs/audit.md, "Shadow masks").

On disk, per model m (written atomically; the ``.npz`` is the "done" marker):

    workdir/shadow.json           the run's identity (arm, config, pool, seed, M)
    workdir/model_{m:03d}.npz     logits (N, A, C) on the pool and (Z, A, C) on
                                  the population, ledger arrays (N,)
    workdir/model_{m:03d}.json    accuracies, wall time, sigma / epsilon
    workdir/training_{first:03d}-{last:03d}/   the trainer's checkpoints while a
                                  group of models trains (removed when it is done)

Models train ``models_at_once`` at a time, one step vmapped over the group
(``gujax.train.train_stacked``). A killed run called again continues with the
first unfinished group (from its last checkpoint, if it is the same group);
finished models are read back, never retrained.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gujax.arms import Arm, Pipeline, build_pipeline, ledger
from gujax.audit.attacks import (AttackEvaluation, evaluate_attack, lira_offline,
                                 lira_online, logit_scaled_confidence, loss_scores, rmia)
from gujax.audit.vulnerability import (DisclosureVsVulnerability,
                                       disclosure_vs_vulnerability,
                                       per_example_vulnerability)
from gujax.data.dataset import Dataset, to_float
from gujax.data.splits import shadow_membership
from gujax.train import TrainConfig, softmax_cross_entropy, train_stacked

# Query augmentations: name -> function of a float batch (B, H, W, C).
AUGMENTATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "flip": lambda x: x[:, :, ::-1],
}


class ShadowRecord(NamedTuple):
    """Everything M trained shadow models of one arm left behind.

    Pool of N examples, population of Z, A query augmentations, C classes.
      arm: the arm's ``to_json()``.
      pool_ids (N,) int64, pool_labels (N,) int32: the pool, in order.
      population_labels (Z,) int32.
      augmentations: names of the A query augmentations.
      in_mask (M, N) bool: model m trained on pool example j.
      logits (M, N, A, C) float32; population_logits (M, Z, A, C) float32.
      disclosure (M, N) float32: D_j in nats in model m's run (0 when OUT).
      cumulative_gnq (M, N) float32: sum of realised GNQ (0 when OUT).
      steps_used (M, N) int32: steps whose update contained j.
      retired (M, N) bool: refused for good by a censoring arm.
      train_accuracy, test_accuracy (M,): accuracy (identity query) on the
        model's own training examples and on the population (the test split).
      wall_seconds (M,): training time of each model (s), compilation included.
      noise_multiplier, epsilon (M,): DP-SGD's sigma and accounted epsilon
        (NaN for arms without them).
    """
    arm: dict
    pool_ids: np.ndarray
    pool_labels: np.ndarray
    population_labels: np.ndarray
    augmentations: tuple[str, ...]
    in_mask: np.ndarray
    logits: np.ndarray
    population_logits: np.ndarray
    disclosure: np.ndarray
    cumulative_gnq: np.ndarray
    steps_used: np.ndarray
    retired: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    wall_seconds: np.ndarray
    noise_multiplier: np.ndarray
    epsilon: np.ndarray


class ShadowAudit(NamedTuple):
    """Attacks on a ``ShadowRecord`` (each model the target, the rest shadows).

      evaluations: attack name -> ``AttackEvaluation`` for "lira_online",
        "lira_offline", "loss" and "rmia" (offline, a = 0.5, the population
        as reference).
      lira_scores (M, N): online LiRA scores (nats of log-likelihood ratio;
        NaN where an example lacks IN or OUT shadows).
      vulnerability (N,): mean online LiRA score of j over the models that
        trained on it (``per_example_vulnerability``).
      disclosure (N,): mean D_j (nats) over the models that trained on j
        (NaN if none did).
      disclosure_vs_vulnerability: Spearman rho and top-k precision of
        disclosure against vulnerability.
    """
    evaluations: dict[str, AttackEvaluation]
    lira_scores: np.ndarray
    vulnerability: np.ndarray
    disclosure: np.ndarray
    disclosure_vs_vulnerability: DisclosureVsVulnerability


# ----------------------------------------------------------------------------
# Training.

def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def _identity(arm: Arm, config: TrainConfig, pool: Dataset, population: Dataset,
              num_models: int, seed: int, augmentations, model) -> dict:
    return {"arm": arm.to_json(), "config": config.to_json(), "num_models": num_models,
            "seed": seed, "augmentations": list(augmentations), "model": repr(model),
            "pool": {"name": pool.name, "split": pool.split, "size": len(pool),
                     "fingerprint": _fingerprint(pool.ids, pool.labels, pool.images)},
            "population": {"name": population.name, "split": population.split,
                           "size": len(population),
                           "fingerprint": _fingerprint(population.ids, population.labels)}}


def _check_inputs(pool: Dataset, population: Dataset, num_models: int, augmentations):
    if len(pool) < 2:
        raise ValueError(f"the pool needs at least 2 examples, got {len(pool)}")
    if len(population) < 1:
        raise ValueError("the population (held-out examples) is empty")
    if pool.images.shape[1:] != population.images.shape[1:]:
        raise ValueError(f"pool images {pool.images.shape[1:]} and population images "
                         f"{population.images.shape[1:]} differ in shape")
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2 (each target needs shadows), "
                         f"got {num_models!r}")
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if not augmentations or unknown:
        raise ValueError(f"augmentations must be a non-empty subset of "
                         f"{sorted(AUGMENTATIONS)}, got {list(augmentations)}")


def _query_fn(model, augmentations):
    """Jitted logits (B, A, C) of a uint8 batch under each augmentation."""
    @jax.jit
    def query(params, images):
        x = to_float(images)
        return jnp.stack([model.apply({"params": params}, AUGMENTATIONS[a](x))
                          for a in augmentations], axis=1)
    return query


def _logits(query, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = [np.asarray(query(params, images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _save_atomic(path: str, write: Callable[[str], None]) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


class _Run(NamedTuple):
    """Model m of an arm, ready to train."""
    m: int
    rows: np.ndarray          # its members: positions in the pool
    pipeline: Pipeline
    params: dict
    config: TrainConfig


def _prepare(m: int, arm: Arm, *, pool: Dataset, in_mask: np.ndarray, model,
             config: TrainConfig, seed: int, method: str) -> _Run:
    rows = np.flatnonzero(in_mask)
    model_seed = seed * 100_003 + m  # distinct per (run seed, model)
    pipeline = build_pipeline(arm, loss_fn=softmax_cross_entropy(model), train_size=len(rows),
                              batch_size=config.batch_size, epochs=config.epochs,
                              seed=model_seed, num_examples=len(pool), method=method)
    run_config = dataclasses.replace(
        config, seed=model_seed, sampling=pipeline.sampling,
        learning_rate=arm.learning_rate or config.learning_rate)
    params = model.init(jax.random.key(model_seed), to_float(pool.images[:1]))["params"]
    return _Run(m, rows, pipeline, params, run_config)


def _train_group(runs: list[_Run], *, pool: Dataset, population: Dataset, model,
                 workdir: str, query, checkpoints: bool, eval_batch_size: int) -> None:
    """Train ``runs`` together (one vmapped step) and write each model's npz/json.

    Ids are pool positions: the ledger is (N,) for every model, so all models
    of an arm share state shapes and (with a persistent compilation cache)
    one compiled step. The models differ only in what lives in their state
    (init, DP-SGD's sigma and noise key) and data, so the first model's
    aggregator and gradient stage serve them all.
    """
    name = f"training_{runs[0].m:03d}-{runs[-1].m:03d}"
    # Groups train in order, so only the first unfinished one can have left
    # checkpoints worth resuming; others are from a run with another grouping.
    for stale in os.listdir(workdir):
        if stale.startswith("training_") and stale != name:
            shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    train_dir = os.path.join(workdir, name)
    first = runs[0].pipeline
    start = time.perf_counter()
    results = train_stacked(
        params=[r.params for r in runs], aggregator=first.aggregator,
        aggregator_states=[r.pipeline.aggregator.init(r.params) for r in runs],
        data=[(pool.images[r.rows], pool.labels[r.rows], r.rows) for r in runs],
        configs=[r.config for r in runs], model=model,
        workdir=train_dir if checkpoints else None, resume=True,
        gradient_stage=first.gradient_stage)
    jax.block_until_ready([r.params for r in results])
    wall = time.perf_counter() - start

    for run, result in zip(runs, results):
        logits = _logits(query, result.params, pool.images, eval_batch_size)
        population_logits = _logits(query, result.params, population.images, eval_batch_size)
        # The ledger is already indexed by pool position; OUT entries are 0.
        book = jax.device_get(ledger(result.aggregator_state))
        correct = np.argmax(logits[:, 0], -1) == pool.labels
        summary = {
            "model": run.m, "num_train": len(run.rows),
            # Models trained together share their wall time equally.
            "wall_seconds": wall / len(runs), "trained_with": [r.m for r in runs],
            "group_wall_seconds": wall,
            "train_accuracy": float(correct[run.rows].mean()),
            "test_accuracy": float((np.argmax(population_logits[:, 0], -1)
                                    == population.labels).mean()),
            "noise_multiplier": run.pipeline.noise_multiplier,
            "epsilon": run.pipeline.epsilon,
            "learning_rate": run.config.learning_rate, "sampling": run.config.sampling,
            "final_loss": (result.history[-1].get("loss") if result.history else None),
        }
        arrays = dict(logits=logits, population_logits=population_logits,
                      disclosure=np.asarray(book.disclosure, np.float32),
                      cumulative_gnq=np.asarray(book.cumulative_gnq, np.float32),
                      steps_used=np.asarray(book.steps_used, np.int32),
                      retired=np.asarray(book.retired, bool))
        stem = os.path.join(workdir, f"model_{run.m:03d}")
        _save_atomic(stem + ".json", lambda p: json.dump(summary, open(p, "w"), indent=1))
        # The npz last: its presence marks the model as done.
        _save_atomic(stem + ".npz", lambda p: np.savez(open(p, "wb"), **arrays))
    shutil.rmtree(train_dir, ignore_errors=True)


def run_shadow_models(arm: Arm, *, pool: Dataset, population: Dataset, model,
                      config: TrainConfig, num_models: int, workdir: str, seed: int = 0,
                      augmentations=("identity", "flip"), resume: bool = True,
                      checkpoints: bool = True, method: str = "ghost",
                      models_at_once: int = 1, progress: bool = True) -> ShadowRecord:
    """Train (resumably) ``num_models`` models of ``arm`` on random halves of
    ``pool`` and collect what the attacks need.

    Args:
      arm: the training algorithm (``gujax.arms.Arm``).
      pool: the N examples membership is drawn over (uint8 images).
      population: Z held-out examples no model trains on (the test split):
        test accuracy and RMIA's reference population.
      model: Flax Linen classifier; ``config``: ``TrainConfig`` (its seed and
        sampling are set per model and per arm; its learning rate unless the
        arm overrides it; ``eval_batch_size`` is the query batch).
      num_models: M >= 2.
      workdir: this arm's folder (created).
      seed: seeds the membership masks, inits, sampling and noise.
      augmentations: query augmentations, names in ``AUGMENTATIONS``.
      resume: keep finished models in ``workdir`` (they must come from the
        same run: ``shadow.json`` is checked); False deletes them first.
      checkpoints: let the trainer checkpoint inside the model being trained
        (so a kill loses at most ``config.checkpoint_every`` steps).
      method: gradient engine, "ghost" or "explicit" (``gujax.arms.build_pipeline``).
      models_at_once: train this many models together, one step vmapped over
        them (``gujax.train.train_stacked``; the same models to rounding).
        Pays on small models, whose steps leave the machine idle: 12 digits
        MLPs train about 2x faster 6 at a time on 2 CPU cores
        (``python -m experiments.stacked``); a killed run resumes group by
        group.
      progress: show a bar over the models.

    Returns:
      ``ShadowRecord``.
    """
    augmentations = tuple(augmentations)
    _check_inputs(pool, population, num_models, augmentations)
    if isinstance(models_at_once, bool) or not isinstance(models_at_once, int) \
            or models_at_once < 1:
        raise ValueError(f"models_at_once must be a positive integer, got {models_at_once!r}")
    identity = _identity(arm, config, pool, population, num_models, seed, augmentations, model)
    os.makedirs(workdir, exist_ok=True)
    manifest = os.path.join(workdir, "shadow.json")
    if os.path.exists(manifest) and resume:
        with open(manifest) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(identity)):
            changed = sorted(k for k in identity if saved.get(k) != json.loads(
                json.dumps(identity[k])))
            raise ValueError(f"{workdir} holds shadow models of a different run (differs in "
                             f"{changed}); use another workdir or resume=False")
    elif os.path.exists(manifest):
        for name in os.listdir(workdir):
            if name.startswith("model_"):
                path = os.path.join(workdir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with open(manifest, "w") as f:
        json.dump(identity, f, indent=1)

    # Independent Bernoulli(1/2) membership (see the module docstring).
    in_mask = shadow_membership(len(pool), num_models, seed, balanced=False)
    query = _query_fn(model, augmentations)
    todo = [m for m in range(num_models)
            if not os.path.exists(os.path.join(workdir, f"model_{m:03d}.npz"))]
    quiet = dataclasses.replace(config, progress=False)
    bar = tqdm(desc=f"shadow models [{arm.name}]", disable=not progress,
               initial=num_models - len(todo), total=num_models)
    for i in range(0, len(todo), models_at_once):
        runs = [_prepare(m, arm, pool=pool, in_mask=in_mask[m], model=model, config=quiet,
                         seed=seed, method=method) for m in todo[i:i + models_at_once]]
        _train_group(runs, pool=pool, population=population, model=model, workdir=workdir,
                     query=query, checkpoints=checkpoints,
                     eval_batch_size=config.eval_batch_size)
        bar.update(len(runs))
    bar.close()
    return load_shadow_record(workdir, pool=pool, population=population, in_mask=in_mask)


def load_shadow_record(workdir: str, *, pool: Dataset, population: Dataset,
                       in_mask: np.ndarray) -> ShadowRecord:
    """Read back the finished models of ``workdir`` (all must be done)."""
    with open(os.path.join(workdir, "shadow.json")) as f:
        identity = json.load(f)
    stems = [os.path.join(workdir, f"model_{m:03d}") for m in range(identity["num_models"])]
    missing = [s for s in stems if not os.path.exists(s + ".npz")]
    if missing:
        raise ValueError(f"{len(missing)} shadow models are not finished in {workdir}")
    arrays = [dict(np.load(s + ".npz")) for s in stems]
    summaries = [json.load(open(s + ".json")) for s in stems]

    def stack(key):
        return np.stack([a[key] for a in arrays])

    def column(key):
        return np.array([np.nan if s[key] is None else s[key] for s in summaries], np.float64)

    return ShadowRecord(
        arm=identity["arm"], pool_ids=pool.ids, pool_labels=pool.labels,
        population_labels=population.labels,
        augmentations=tuple(identity["augmentations"]), in_mask=np.asarray(in_mask, bool),
        logits=stack("logits"), population_logits=stack("population_logits"),
        disclosure=stack("disclosure"), cumulative_gnq=stack("cumulative_gnq"),
        steps_used=stack("steps_used"), retired=stack("retired"),
        train_accuracy=column("train_accuracy"), test_accuracy=column("test_accuracy"),
        wall_seconds=column("wall_seconds"), noise_multiplier=column("noise_multiplier"),
        epsilon=column("epsilon"))


# ----------------------------------------------------------------------------
# Attacks.

def _true_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y (M, n, A) from logits (M, n, A, C), in float64."""
    log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1),
                       np.float64)
    return np.exp(np.take_along_axis(log_p, labels[None, :, None, None], -1)[..., 0])


def mean_over_members(values: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """(N,) mean of values (M, N) over the models whose mask is True (NaN if none)."""
    counts = in_mask.sum(0)
    total = np.where(in_mask, values, 0.0).sum(0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def attack(record: ShadowRecord, *, augmentations=None, global_variance: bool | None = None,
           ks=(10, 50, 100), rmia_offline_a: float = 0.5) -> ShadowAudit:
    """Each model in turn as the target, the other M - 1 as its shadows.

    LiRA online and offline, the loss attack (log p_y averaged over the
    queries) and RMIA (offline, a = ``rmia_offline_a``, the population as
    reference).

    Args:
      record: a ``ShadowRecord``.
      augmentations: names of the recorded queries the attacks use (default
        all). On 8x8 digits a flipped digit is a noisy query and lowers LiRA's
        power; see docs/experiments.md.
      global_variance: LiRA's variance estimate; None = pooled when the
        shadows are few (M - 1 < 64), as Carlini et al. advise.
      ks: top-k precision of D_j against LiRA vulnerability (k > N dropped).
    """
    names = tuple(record.augmentations if augmentations is None else augmentations)
    unknown = [a for a in names if a not in record.augmentations]
    if not names or unknown:
        raise ValueError(f"augmentations must be a non-empty subset of the recorded "
                         f"{record.augmentations}, got {list(names)}")
    queries = [record.augmentations.index(a) for a in names]
    logits = record.logits[:, :, queries]
    population_logits = record.population_logits[:, :, queries]
    labels = record.pool_labels
    in_mask = record.in_mask
    if global_variance is None:
        global_variance = in_mask.shape[0] - 1 < 64
    phi = np.asarray(logit_scaled_confidence(logits, labels[:, None]), np.float64)
    online = lira_online(phi, in_mask, global_variance=global_variance)
    evaluations = {
        "lira_online": evaluate_attack(*online),
        "lira_offline": evaluate_attack(*lira_offline(phi, in_mask,
                                                      global_variance=global_variance)),
        "loss": evaluate_attack(np.asarray(loss_scores(logits, labels[:, None]),
                                           np.float64).mean(-1), in_mask),
    }
    evaluations["rmia"] = evaluate_attack(*rmia(
        _true_label_probability(logits, labels), in_mask,
        _true_label_probability(population_logits, record.population_labels),
        offline_a=rmia_offline_a))
    vulnerability = per_example_vulnerability(*online)
    disclosure = mean_over_members(record.disclosure.astype(np.float64), in_mask)
    # top-k is over the examples that have both a D_j and a LiRA score.
    both = int(np.sum(np.isfinite(disclosure) & np.isfinite(vulnerability)))
    ks = tuple(k for k in ks if k <= both) or (1,)
    relation = disclosure_vs_vulnerability(disclosure, vulnerability, ks=ks)
    return ShadowAudit(evaluations, np.asarray(online.scores), vulnerability, disclosure,
                       relation)


def audit_arm(arm: Arm, *, attack_augmentations=None, **kwargs
              ) -> tuple[ShadowRecord, ShadowAudit]:
    """``run_shadow_models(arm, **kwargs)`` then ``attack`` on its record
    (with ``augmentations=attack_augmentations``)."""
    record = run_shadow_models(arm, **kwargs)
    return record, attack(record, augmentations=attack_augmentations)
