"""One trainer for every arm and every number of runs.

A step is

    batch -> stage (engine + policy: per-example weights, the update)
          -> optimizer -> optax.apply_updates

jitted as one function. The stage (``gujax.engine.Stage``) is what differs
between arms: ``make_stage(ghost_engine(loss_fn), censor_policy(...))``, or
any optax transformation over per-example gradients through
``per_example_stage`` (``train(aggregator=...)`` does that for you).

``train_stacked`` runs M >= 1 independent runs at once, one step vmapped
over a leading run axis; ``train`` is the same loop with M = 1. Evaluation,
parameter snapshots at chosen epochs and metric logging happen at epoch ends
and checkpoints, the only points where values leave the device.

Runs are deterministic for a fixed ``TrainConfig.seed`` (the batch sampler and
the augmentation key are functions of (seed, step); DP-SGD noise is seeded by
the policy). With a ``workdir`` a run writes its folder (``gujax.workdir``:
config.json, metrics.jsonl, history.jsonl, snapshots/, checkpoints/; the
same layout for ``train`` and ``train_stacked``)
and a killed run restarted with ``resume=True`` continues from its last
checkpoint, re-running the steps after it, to the same result as an
uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from gujax.progress import progress_bar

from gujax import checks
from gujax import workdir as workdir_files
from gujax.data.dataset import model_inputs
from gujax.engine import Stage, per_example_stage
from gujax.sampling import fixed_batch, poisson_batch, poisson_padded_size, shuffled_batch

PyTree = Any
# The model inputs under any keys ({"image", "label"} for a classifier), plus
# "id" (B,) int and "mask" (B,) bool; see gujax.engine.
Batch = dict


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run.

    epochs: passes over the data; a pass is N // batch_size steps.
    batch_size: B for "shuffle" and "fixed"; the expected batch size q N for
      "poisson" (q = batch_size / N, batches padded to a fixed size).
    learning_rate, optimizer ("sgd" or "adam"), momentum (sgd only; 0 = none).
    seed: seeds batch sampling and augmentation.
    sampling: "shuffle" (epoch-wise permutation), "poisson" or "fixed"
      (see ``gujax.sampling``; use these two with DP-SGD accounting).
    eval_every: evaluate every this many epochs (and after the last).
    checkpoint_every: save a checkpoint every this many steps (and at the end).
    augment: optional ``augment(key, images (B,H,W,C) float32) -> images``,
      applied inside the jitted step with a key derived from (seed, step).
    chunk_size: passed to ``per_example_grads`` (bounds memory).
    progress: show a progress bar over the steps (``gujax.progress``).
    eval_batch_size: evaluation batch size.
    """
    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0
    sampling: str = "shuffle"
    eval_every: int = 1
    checkpoint_every: int = 500
    augment: Callable | None = None
    chunk_size: int | None = None
    progress: bool = True
    eval_batch_size: int = 1000

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every",
                     "eval_batch_size"):
            checks.positive_int(getattr(self, name), f"TrainConfig.{name}")
        checks.one_of(self.optimizer, ("sgd", "adam"), "optimizer")
        checks.one_of(self.sampling, ("shuffle", "poisson", "fixed"), "sampling")
        checks.positive_finite(self.learning_rate, "learning_rate")
        checks.fraction(self.momentum, "momentum")
        checks.seed(self.seed)

    def to_json(self) -> dict:
        """The fields that define the run's trajectory (not the bar, not the
        evaluation/checkpoint cadence), JSON-serialisable."""
        record = dataclasses.asdict(self)
        for name in ("progress", "eval_every", "checkpoint_every", "eval_batch_size"):
            record.pop(name)
        record["augment"] = None if self.augment is None else getattr(
            self.augment, "__qualname__", repr(self.augment))
        return record


class TrainState(NamedTuple):
    """Everything a step changes (and a checkpoint holds)."""
    step: jax.Array          # () int32, steps taken
    params: PyTree
    stage_state: PyTree
    opt_state: PyTree


class TrainResult(NamedTuple):
    params: PyTree
    stage_state: PyTree  # the stage's state (the policy's: ledger, noise key)
    history: list[dict]       # one record per evaluation (see ``train``)
    snapshots: dict | None = None  # epoch -> params, for ``snapshot_epochs``
    iterates: PyTree | None = None  # observe(params) after every step, leading axis T


# ----------------------------------------------------------------------------
# Building blocks.

def softmax_cross_entropy(model) -> Callable[[PyTree, dict], jax.Array]:
    """``loss(params, example)`` for a Flax Linen classifier: example is
    ``{"image": (H,W,C) float32, "label": () int}``; returns the scalar loss
    in nats."""
    def loss(params, example):
        logits = model.apply({"params": params}, example["image"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])
    return loss


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate, momentum=config.momentum or None)


def _step_body(stage: Stage, optimizer: optax.GradientTransformation,
               augment: Callable | None):
    """``body(state, batch, key) -> (state, metrics)``, un-jitted; ``key`` is
    ``jax.random.key(TrainConfig.seed)``, an argument so that one body serves a
    single run and a vmapped stack of runs alike."""
    def body(state: TrainState, batch: Batch, run_key):
        if "image" in batch:
            batch = dict(batch, image=model_inputs(batch["image"]))
        if augment is not None:
            key = jax.random.fold_in(run_key, state.step)
            batch["image"] = augment(key, batch["image"])
        update, stage_state, metrics = stage(state.params, batch,
                                                  state.stage_state)
        updates, opt_state = optimizer.update(update, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, stage_state, opt_state), metrics
    return body


def make_train_step(stage: Stage, optimizer: optax.GradientTransformation,
                    *, seed: int, augment: Callable | None = None):
    """The jitted ``step(state, batch) -> (state, metrics)``."""
    body = _step_body(stage, optimizer, augment)
    return jax.jit(lambda state, batch: body(state, batch, jax.random.key(seed)))


def _eval_sums(model):
    """Jitted (sum of loss, number correct) of a batch, compiled once per run."""
    @jax.jit
    def sums(params, x, y):
        logits = model.apply({"params": params}, model_inputs(x))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == y)
    return sums


def evaluate(model, params, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 1000, _sums=None) -> dict:
    """Mean softmax cross-entropy (nats) and accuracy of ``model`` on a set."""
    sums = _sums or _eval_sums(model)
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        loss, right = sums(params, images[start:start + batch_size],
                           labels[start:start + batch_size])
        total_loss += float(loss)
        correct += int(right)
    return {"eval_loss": total_loss / len(labels), "eval_accuracy": correct / len(labels)}


def _check_data(data, name="data") -> dict[str, np.ndarray]:
    """The training set as a dict of (N, ...) numpy arrays with "id" (N,) int32.

    ``data`` is (images, labels, ids) for a classifier (keys "image" and
    "label"), or a dict of arrays sharing a leading axis N with an "id" entry
    (e.g. {"tokens": (N, T), "id": (N,)} for a language model); every entry
    but "id" is handed to the loss one example at a time.
    """
    if isinstance(data, dict):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        if "id" not in arrays:
            raise ValueError(f"{name} must have an 'id' entry (N,) int")
        if "mask" in arrays:
            raise ValueError(f"{name}: 'mask' is reserved for the trainer's padding")
    else:
        if len(data) != 3:
            raise ValueError(f"{name} must be (images, labels, ids) or a dict with 'id'")
        images, labels, ids = (np.asarray(a) for a in data)
        n = len(images)
        if n and (images.ndim < 2 or labels.shape != (n,) or ids.shape != (n,)):
            raise ValueError(f"{name}: images (N, ...), labels (N,), ids (N,) with one N; "
                             f"got {images.shape}, {labels.shape}, {ids.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels and ids must be integers")
        if n and labels.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0 (class indices), got "
                             f"{int(labels.min())} at row {int(np.argmin(labels))}")
        arrays = {"image": images, "label": labels.astype(np.int32), "id": ids}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"{name}: every entry needs the same leading axis N, got {sizes}")
    if sizes["id"] == 0:
        raise ValueError(f"{name} is empty")
    ids = arrays["id"]
    if ids.shape != (sizes["id"],) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: labels and ids must be integers (ids of shape (N,))")
    if ids.min() < 0:
        raise ValueError(f"{name}: ids must be >= 0")
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValueError(f"{name}: {'images' if key == 'image' else key} contain NaN or Inf")
    arrays["id"] = ids.astype(np.int32)
    return arrays


def _gather_rows(datasets: list[dict], rows: jax.Array) -> dict:
    """The batch of rows[m] of datasets[m] for every run m, stacked: (M, P, ...)."""
    return {key: jnp.stack([d[key][r] for d, r in zip(datasets, rows)]) for key in datasets[0]}


def _sampler(config: TrainConfig, n: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    if config.batch_size > n:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training examples")
    if config.sampling == "poisson":
        rate = config.batch_size / n
        size = poisson_padded_size(n, rate)
        return lambda step: poisson_batch(config.seed, step, n, rate, size)
    sample = fixed_batch if config.sampling == "fixed" else shuffled_batch
    return lambda step: sample(config.seed, step, n, config.batch_size)


def _evaluation_epoch(step: int, steps_per_epoch: int, config: TrainConfig) -> int:
    """The epoch that ``step`` (0-based) completes if a history record is due
    after it, else 0."""
    epoch, into_epoch = divmod(step + 1, steps_per_epoch)
    due = into_epoch == 0 and (epoch % config.eval_every == 0 or epoch == config.epochs)
    return epoch if due else 0


def _checkpoint_due(step: int, total_steps: int, config: TrainConfig) -> bool:
    return (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps


# ----------------------------------------------------------------------------


# The loop.

def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: PyTree, m: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[m], tree)


def _pad_batch(rows: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    extra = size - len(rows)
    return (np.concatenate([rows, np.zeros(extra, rows.dtype)]),
            np.concatenate([mask, np.zeros(extra, bool)]))


def _run_placement(mesh, runs: int) -> Callable[[PyTree], PyTree]:
    """Puts a tree with a leading run axis (M, ...) where it belongs: split
    over ``mesh``'s one axis, or left as it is without a mesh."""
    if mesh is None:
        return lambda tree: tree
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D (the run axis), got axes {mesh.axis_names}")
    if runs % mesh.size:
        raise ValueError(f"{runs} stacked runs do not split over the {mesh.size} devices "
                         f"of the mesh; give a multiple of {mesh.size} runs")
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return lambda tree: jax.device_put(tree, sharding)


def make_stacked_train_step(stage: Stage, optimizer: optax.GradientTransformation,
                            *, augment: Callable | None = None):
    """The jitted ``step(states, batches, keys, active) -> (states, metrics)``
    of M runs at once: the single-run step vmapped over a leading run axis of
    the state (M, ...), the batch (M, B, ...) and the keys (M,), each
    ``jax.random.key(seed)`` of its run. Runs whose ``active`` (M,) bool is
    False keep their state unchanged."""
    body = _step_body(stage, optimizer, augment)

    @jax.jit
    def step(states: TrainState, batches: Batch, keys: jax.Array, active: jax.Array):
        stepped, metrics = jax.vmap(body)(states, batches, keys)

        def hold(new, old):
            return jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
        return jax.tree_util.tree_map(hold, stepped, states), metrics
    return step


def _resolve_stage(stage: Stage | None, aggregator, model, loss_fn, config) -> Stage:
    if (stage is None) == (aggregator is None):
        raise ValueError("give exactly one of stage= (a gujax.engine.Stage) and "
                         "aggregator= (an optax transformation over per-example gradients)")
    if stage is not None:
        if not isinstance(stage, Stage):
            raise ValueError(f"stage must be a gujax.engine.Stage (init, apply), got "
                             f"{type(stage).__name__}")
        return stage
    if loss_fn is None:
        if model is None:
            raise ValueError("give a model (for the default loss) or a loss_fn")
        loss_fn = softmax_cross_entropy(model)
    return per_example_stage(loss_fn, aggregator, chunk_size=config.chunk_size)


def _check_eval_data(eval_data, model):
    if eval_data is None:
        return None
    if model is None:
        raise ValueError("evaluation needs the model")
    images, labels = (np.asarray(a) for a in eval_data)
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError("eval_data must be (images, labels) of one non-zero length")
    return images, labels, _eval_sums(model)


def _check_snapshot_epochs(epochs, config: TrainConfig) -> tuple[int, ...]:
    epochs = tuple(epochs)
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, (int, np.integer))
           or not 1 <= e <= config.epochs]
    if bad:
        raise ValueError(f"snapshot_epochs must be epochs in [1, {config.epochs}], got {bad}")
    return tuple(sorted(set(int(e) for e in epochs)))


def _run(*, params: Sequence[PyTree], data: Sequence, configs: Sequence[TrainConfig],
         stage: Stage, stage_states, model, eval_data, workdir, resume, snapshot_epochs,
         stacked: bool, mesh, observe: Callable | None = None) -> list[TrainResult]:
    """The loop behind ``train`` (one run, ``stacked=False``) and ``train_stacked``."""
    runs = len(params)
    if runs == 0 or not (len(data) == len(configs) == runs):
        raise ValueError(f"need one or more runs with one params, data and config each; got "
                         f"{runs} params, {len(data)} data, {len(configs)} configs")
    config = configs[0]
    if any(dataclasses.replace(c, seed=config.seed) != config for c in configs):
        raise ValueError("the stacked runs' TrainConfigs may differ in seed alone")
    if stage_states is None:
        stage_states = [stage.init(p) for p in params]
    if len(stage_states) != runs:
        raise ValueError(f"{len(stage_states)} stage states for {runs} runs")
    datasets = [_check_data(d, f"data[{m}]" if stacked else "data") for m, d in enumerate(data)]
    shapes = {tuple((k, v.shape[1:], str(v.dtype)) for k, v in sorted(d.items()))
              for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"the runs' data differ in shape or dtype: {sorted(map(str, shapes))}")
    evaluation = _check_eval_data(eval_data, model)
    snapshot_epochs = _check_snapshot_epochs(snapshot_epochs, config)
    sizes = [len(d["id"]) for d in datasets]
    samplers = [_sampler(c, n) for c, n in zip(configs, sizes)]
    per_epoch = [n // config.batch_size for n in sizes]
    totals = np.array([config.epochs * e for e in per_epoch])
    keys = jnp.stack([jax.random.key(c.seed) for c in configs])
    optimizer = _optimizer(config)
    step_fn = make_stacked_train_step(stage, optimizer, augment=config.augment)
    place = _run_placement(mesh, runs)
    state = place(_stack([TrainState(jnp.zeros((), jnp.int32), p, s, optimizer.init(p))
                          for p, s in zip(params, stage_states)]))
    keys = place(keys)

    if observe is not None and workdir is not None:
        # The observed iterates live in memory only: a resumed run would
        # return those of its last part alone.
        raise ValueError("observe needs workdir=None (iterates are not checkpointed)")
    watch = None if observe is None else jax.jit(jax.vmap(observe))
    observed = []

    history: list[dict] = []
    manager = None
    snapshots = workdir_files.Snapshots(workdir, runs)
    if workdir is not None:
        # One layout for M = 1 and M > 1: per-run values are lists.
        identity = dict(config.to_json(), seed=[c.seed for c in configs], num_examples=sizes)
        state, manager, history = workdir_files.open_workdir(workdir, identity, state, resume)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        history_path = os.path.join(workdir, "history.jsonl")
        steps_done = np.asarray(jax.device_get(state.step)).reshape(runs)
        snapshots.restore(snapshot_epochs, [int(s) // e for s, e in zip(steps_done, per_epoch)],
                          jax.device_get(params[0]))

    def flush(pending):
        """Bring the pending steps' metrics to the host (one transfer) and log them."""
        host = jax.device_get([metrics for _, _, metrics in pending])
        records = {}
        for (step, active, _), values in zip(pending, host):
            values = {k: np.asarray(v).tolist() for k, v in values.items()}
            per_run = [{k: v[m] for k, v in values.items()} if active[m] else None
                       for m in range(runs)]
            records[step] = per_run
            if workdir is not None:
                line = {k: [r[k] if r else None for r in per_run] for k in values}
                workdir_files.append_jsonl(metrics_path, {"step": step + 1, **line})
        return records

    # The data moves to the device once; each step sends only its rows. (A
    # host-side gather, stack and transfer of a large batch of features cost
    # several times the step itself: 1.3 s against 0.9 s at B = 8192 x 15,552.)
    on_device = jax.device_put(datasets)
    gather = jax.jit(_gather_rows, out_shardings=None if mesh is None
                     else NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])))
    total = int(totals.max())
    start = int(jnp.max(state.step))
    pending = []
    for step in progress_bar(range(start, total), initial=start, total=total,
                             disable=not config.progress,
                             desc=f"train x{runs}" if stacked else "train"):
        drawn = [sample(step) for sample in samplers]
        size = max(len(rows) for rows, _ in drawn)
        drawn = [_pad_batch(rows, mask, size) for rows, mask in drawn]
        batch = gather(on_device, np.stack([rows for rows, _ in drawn]))
        batch["mask"] = place(np.stack([mask for _, mask in drawn]))
        active = step < totals
        state, metrics = step_fn(state, batch, keys, active)
        if watch is not None:
            observed.append(watch(state.params))
        pending.append((step, active, metrics))
        ends = {int(m): divmod(step + 1, per_epoch[m]) for m in np.flatnonzero(active)}
        ends = {m: epoch for m, (epoch, into) in ends.items() if into == 0}
        checkpoint = manager is not None and _checkpoint_due(step, total, config)
        if not (ends or checkpoint or step + 1 == total):
            continue
        records = flush(pending)
        pending = []
        for m, epoch in ends.items():
            if epoch in snapshot_epochs:
                snapshots.take(m, epoch, _unstack(state.params, m))
            if not _evaluation_epoch(step, per_epoch[m], config):
                continue
            record = {"run": m, "epoch": epoch, "step": step + 1, **records[step][m]}
            if evaluation is not None:
                images, labels, sums = evaluation
                record.update(evaluate(model, _unstack(state.params, m), images, labels,
                                       batch_size=config.eval_batch_size, _sums=sums))
            history.append(record)
            if workdir is not None:
                workdir_files.append_jsonl(history_path, record)
        if checkpoint:
            workdir_files.save_checkpoint(manager, step + 1, state)
    workdir_files.close(manager)
    iterates = [None] * runs
    if watch is not None:
        observed = jax.device_get(observed)
        iterates = [jax.tree_util.tree_map(lambda *xs: np.stack([x[m] for x in xs]),
                                           *observed[:int(totals[m])]) for m in range(runs)]
    return [TrainResult(_unstack(state.params, m), _unstack(state.stage_state, m),
                        [{k: v for k, v in r.items() if k != "run"}
                         for r in history if r["run"] == m],
                        snapshots.taken[m], iterates[m])
            for m in range(runs)]


def train(*, params: PyTree, data, config: TrainConfig, stage: Stage | None = None,
          aggregator: optax.GradientTransformationExtraArgs | None = None, model=None,
          loss_fn=None, eval_data=None, workdir: str | None = None, resume: bool = True,
          snapshot_epochs: Sequence[int] = ()) -> TrainResult:
    """Train ``params`` with a gradient stage.

    Args:
      params: initial parameters (e.g. ``model.init(key, x)["params"]``).
      data: (images (N,H,W,C) float32 or uint8, labels (N,) int, ids (N,) int),
        numpy arrays, or a dict of (N, ...) arrays with an "id" entry (see
        ``gujax.engine`` for the batch schema); ids are the training-set
        indices the policy keys its per-example state by (usually
        ``arange(N)``).
      config: ``TrainConfig``.
      stage: the ``gujax.engine.Stage`` (``make_stage(engine, policy)``, or
        the stage ``gujax.arms.train_runs`` builds); its ``num_examples`` must
        exceed every id.
      aggregator: instead of ``stage``, an optax transformation over
        per-example gradients (``mean_aggregate()``, ``dpsgd_aggregate(...)``,
        ``gnq_censor(...)``), run on the explicit engine with ``loss_fn``.
      model: Flax Linen module; needed for the default loss and for evaluation.
      loss_fn: ``loss_fn(params, example) -> scalar`` for ``aggregator``;
        default softmax cross-entropy of ``model``.
      eval_data: optional (images, labels) evaluated every ``eval_every``
        epochs and after the last.
      workdir: where metrics, history, snapshots and checkpoints go (None:
        nothing is written and nothing can be resumed).
      resume: continue from the latest checkpoint in ``workdir`` if any.
      snapshot_epochs: keep the parameters at the end of these epochs.

    Returns:
      TrainResult(params, stage_state (the stage's state), history,
      snapshots {epoch: params}). Each history record has "epoch", "step",
      the eval metrics if any, and the last step's metrics.
    """
    stage = _resolve_stage(stage, aggregator, model, loss_fn, config)
    return _run(params=[params], data=[data], configs=[config], stage=stage,
                stage_states=None, model=model, eval_data=eval_data, workdir=workdir,
                resume=resume, snapshot_epochs=snapshot_epochs, stacked=False, mesh=None)[0]


def train_stacked(*, params: Sequence[PyTree], data: Sequence, configs: Sequence[TrainConfig],
                  stage: Stage | None = None,
                  aggregator: optax.GradientTransformationExtraArgs | None = None,
                  stage_states: Sequence | None = None, model=None, loss_fn=None,
                  eval_data=None, workdir: str | None = None, resume: bool = True,
                  snapshot_epochs: Sequence[int] = (), mesh=None,
                  observe: Callable | None = None) -> list[TrainResult]:
    """Train M independent runs at once, one jitted step vmapped over the runs.

    Small models leave a CPU (or an accelerator) mostly idle between the
    dispatches of their small steps; stacking M of them into one step amortises
    that overhead (what it gains: ``python -m experiments.stacked``). Every run
    follows the trajectory ``train`` would give it alone, to rounding
    (tests/test_train.py): its own initial parameters, data (of its own size),
    seed (hence its own batches and augmentation keys) and stage state (e.g.
    DP-SGD's noise key and sigma), and its own number of steps: a run that has
    finished keeps its state while the others go on.

    Args:
      params: M initial parameter pytrees of one structure and shape.
      data: M training sets as ``train`` takes them; sizes may differ.
      configs: M ``TrainConfig`` equal in every field but ``seed``. Their
        batch_size, epochs and sampling give each run's steps as in ``train``;
        Poisson batches are padded to the largest run's padded size.
      stage, aggregator, model, loss_fn, eval_data, snapshot_epochs: as
        ``train``; one stage serves every run, so what differs between runs
        must live in its state.
      stage_states: M initial stage states (default ``stage.init(params[m])``).
      workdir: metrics.jsonl (per step, one value per run, None where a run has
        finished), history.jsonl (per run and epoch, with "run"), snapshots and
        orbax checkpoints of the stacked state; ``resume`` continues from the
        latest.
      mesh: a 1-D ``jax.sharding.Mesh`` (``gujax.sharding.run_mesh()``: every
        local device) to split the run axis over, M / devices runs on each;
        M must be a multiple of the mesh size. Runs never exchange values,
        so each device steps its own runs and the models are those of an
        unsharded call to rounding (tests/test_multidevice.py). None: the
        default device.
      observe: ``observe(params) -> pytree``, applied after every step: each
        result's ``iterates`` stacks its run's observations over its T steps
        (leading axis T). The all-iterates view of a white-box auditor
        (``gujax.audit.whitebox``); needs ``workdir=None``.

    Returns:
      M ``TrainResult``s, in the order of the runs.
    """
    if not configs:
        raise ValueError("need one or more runs with one params, data and config each; got "
                         f"{len(params)} params, {len(data)} data, 0 configs")
    stage = _resolve_stage(stage, aggregator, model, loss_fn, configs[0])
    return _run(params=params, data=data, configs=configs, stage=stage,
                stage_states=stage_states, model=model, eval_data=eval_data, workdir=workdir,
                resume=resume, snapshot_epochs=snapshot_epochs, stacked=True, mesh=mesh,
                observe=observe)
