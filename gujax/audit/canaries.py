"""Canaries for privacy auditing: examples planted in a training set, each
included or left out at random, whose inclusion an auditor then guesses
(``gujax.audit.epsilon`` turns the guesses into an epsilon lower bound).

    canaries = make_canaries("mislabel", source=held_out, num=32, seed=0, copies=4)
    in_mask = canary_membership(len(canaries), num_runs=8, seed=1)     # (R, n) bool
    images, labels, rows = insert_canaries(base.images, base.labels, canaries, in_mask[r])
    runs = train_canary_runs(arm, model=model, config=config,
                             sets=[(images, labels), ...], seeds=[...])

Kinds (``KINDS``):

- ``mislabel``: real images (from a set disjoint from the training and test
  data) with a label drawn uniformly among the wrong ones: memorised only
  by fitting the example itself.
- ``ood``: out-of-distribution inputs, uniform pixel noise, each with a
  label drawn uniformly at random (or one fixed label): a random label per
  canary keeps the included canaries from teaching the model the label of
  the left-out ones.
- ``dirac``: the input-space form of a Dirac gradient canary (Nasr et al.
  2023), for white-box audits of a model whose first layer is dense on the
  flattened input (``gujax.models.MLP``): an image that is 0 except one pixel
  at 255, at the pixels the data light least, with a random label. Its
  gradient on the first layer's kernel lies in that pixel's row alone, a row
  the other examples (almost) never touch, so the row's change from
  initialisation says whether the canary was trained on
  (``gujax.audit.epsilon.dirac_scores``). The training step computes the
  gradients itself, so a canary written directly in gradient space is not
  possible; this is the closest the algorithm allows.

Every kind takes ``copies`` = k: an included canary enters the training set
as k rows of identical content and distinct ids (positions), so copies can
share a batch. GNQ measures how much of an example's gradient the rest of
the batch does not explain; a copy in the same batch explains it entirely,
and each copy has its own per-example budget, so duplication is the natural
way to slip a canary past the GNQ censor (``experiments.audit_epsilon``
measures how far it goes for k = 1, 2, 4, 8).

Membership: ``canary_membership`` draws every (run, canary) bit
independently with probability 1/2 from a fixed seed (never a balanced
design: see docs/audit.md, "Shadow masks").
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from gujax import checks
from gujax.arms import TrainingRun, train_runs
from gujax.data.dataset import Dataset, model_inputs

KINDS = ("mislabel", "ood", "dirac")


@dataclasses.dataclass(frozen=True, eq=False)
class CanarySet:
    """n canaries of one kind.

    kind: one of ``KINDS``.
    images: (n, H, W, C) uint8 pixels, or float32 features (the
      ``gujax.features`` layout: mislabelled canaries of a featurised
      source), one per canary.
    labels: (n,) int32, the label each canary is trained (and scored) with.
    ids: (n,) int64 canary ids 0..n-1 (the canary's index in this set; the
      rows it becomes in a training set get their own ids, ``insert_canaries``).
    copies: k >= 1 training rows per included canary.
    num_classes: C of the task.
    pixels: (n,) int64 flat index (into H * W * C) of a dirac canary's lit
      pixel; None for the other kinds.
    source_ids: (n,) int64 ids of the source images (mislabel), else None.
    """
    kind: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    copies: int
    num_classes: int
    pixels: np.ndarray | None = None
    source_ids: np.ndarray | None = None

    def __post_init__(self):
        checks.one_of(self.kind, KINDS, "kind")
        n = len(self.images)
        if (self.images.ndim != 4 or self.images.dtype not in (np.uint8, np.float32)
                or n == 0):
            raise ValueError(f"canary images must be a non-empty (n, H, W, C) uint8 or "
                             f"float32 array, got {self.images.shape} {self.images.dtype}")
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise ValueError(f"canary labels and ids must be ({n},), got {self.labels.shape} "
                             f"and {self.ids.shape}")
        checks.positive_int(self.copies, "copies")
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"canary labels must lie in [0, {self.num_classes})")
        if (self.kind == "dirac") != (self.pixels is not None):
            raise ValueError("pixels are given for dirac canaries and only for them")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def name(self) -> str:
        """``mislabel``, or ``mislabel x4`` with 4 copies."""
        return self.kind if self.copies == 1 else f"{self.kind} x{self.copies}"


def _check_count(num: int, available: int | None = None) -> int:
    checks.positive_int(num, "num (canaries)")
    if available is not None and num > available:
        raise ValueError(f"num ({num}) exceeds the {available} source images available")
    return num


def mislabelled_canaries(source: Dataset, num: int, *, seed: int, copies: int = 1,
                         num_classes: int | None = None) -> CanarySet:
    """``num`` distinct images of ``source`` (drawn without replacement),
    each with a label drawn uniformly among the C - 1 wrong ones.
    ``source`` must be disjoint from the training and test data."""
    checks.seed(seed)
    _check_count(num, len(source))
    num_classes = len(source.class_names) if num_classes is None else num_classes
    if num_classes < 2:
        raise ValueError(f"mislabelled canaries need >= 2 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(source), num, replace=False))
    shift = rng.integers(1, num_classes, size=num)   # never 0: the label is always wrong
    labels = ((source.labels[pick].astype(np.int64) + shift) % num_classes).astype(np.int32)
    return CanarySet("mislabel", source.images[pick].copy(), labels,
                     np.arange(num, dtype=np.int64), copies, num_classes,
                     source_ids=source.ids[pick].copy())


def canary_copies(canaries: CanarySet, copies: int, *, near: bool = False, seed: int = 0,
                  shift: int = 1, noise: float = 8.0, flip: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The training rows of the adaptive canary families: ``copies`` = k rows
    per canary, canary i's rows at i k .. i k + k - 1 (to enter a pool as one
    group that is IN or OUT together), copy 0 the canary itself.

    near=False: duplicated canaries, the k rows identical (distinct ids are
      the pool positions they take).
    near=True: a near-duplicate cluster: copies 1..k-1 are small random
      perturbations of the canary, each with its label: for uint8 images a
      shift by up to ``shift`` pixels along each image axis (zero fill), a
      horizontal flip with probability 1/2 when ``flip`` (off by default: a
      mirrored digit is another digit), then Gaussian pixel noise of standard
      deviation ``noise`` (pixel units, clipped to [0, 255]); for float
      features (a featurised source) Gaussian noise of ``noise / 255`` times
      the canary's own feature standard deviation (a shift or flip has no
      meaning in feature space). The copies' gradients are near-parallel, so
      in a batch holding several of them each one's GNQ (the part the rest of
      the batch does not explain) is small, while together they teach the
      model the wrong label.

    Returns (images (n k, ...), labels (n k,) int32).
    """
    checks.positive_int(copies, "copies")
    checks.seed(seed)
    if shift < 0 or noise < 0:
        raise ValueError(f"shift and noise must be >= 0, got {shift} and {noise}")
    images = np.repeat(canaries.images, copies, axis=0)
    labels = np.repeat(canaries.labels, copies).astype(np.int32)
    if not near or copies == 1:
        return images, labels
    rng = np.random.default_rng(seed)
    perturbed = np.flatnonzero(np.arange(len(images)) % copies != 0)
    if images.dtype == np.uint8:
        out = images.astype(np.float64)
        for row in perturbed:
            x = out[row]
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            x = np.roll(x, (dy, dx), axis=(0, 1))
            if dy > 0:
                x[:dy] = 0
            elif dy < 0:
                x[dy:] = 0
            if dx > 0:
                x[:, :dx] = 0
            elif dx < 0:
                x[:, dx:] = 0
            if flip and rng.random() < 0.5:
                x = x[:, ::-1]
            out[row] = x + rng.normal(0.0, noise, size=x.shape)
        images = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    else:
        scale = images[perturbed].reshape(len(perturbed), -1).std(1)
        images = images.copy()
        images[perturbed] += (rng.normal(size=images[perturbed].shape)
                              * (noise / 255.0 * scale)[:, None, None, None]).astype(images.dtype)
    return images, labels


def ood_canaries(image_shape: Sequence[int], num: int, num_classes: int, *, seed: int,
                 copies: int = 1, label: int | None = None) -> CanarySet:
    """``num`` images of uniform uint8 noise of ``image_shape`` (H, W, C),
    each labelled at random (``label=None``) or with one fixed ``label``."""
    checks.seed(seed)
    _check_count(num)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    checks.positive_int(num_classes, "num_classes")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, *shape), dtype=np.uint8)
    if label is None:
        labels = rng.integers(0, num_classes, size=num).astype(np.int32)
    else:
        if not 0 <= label < num_classes:
            raise ValueError(f"label must be in [0, {num_classes}), got {label}")
        labels = np.full(num, label, np.int32)
    return CanarySet("ood", images, labels, np.arange(num, dtype=np.int64), copies,
                     num_classes)


def dirac_canaries(reference: Dataset, num: int, *, seed: int, copies: int = 1
                   ) -> CanarySet:
    """``num`` one-pixel images (255 at one position, 0 elsewhere), each
    with a random label. The positions are the ones ``reference`` (the
    training data) lights least (smallest mean intensity), used in that
    order and cycled when ``num`` exceeds H * W * C; canaries sharing a
    position differ in label."""
    checks.seed(seed)
    _check_count(num)
    shape = reference.images.shape[1:]
    if reference.images.dtype != np.uint8:
        raise ValueError("dirac canaries are pixel images: the reference must be uint8 images")
    size = int(np.prod(shape))
    mean = reference.images.reshape(len(reference), size).mean(0, dtype=np.float64)
    order = np.argsort(mean, kind="stable")                  # least-lit first
    pixels = order[np.arange(num) % size].astype(np.int64)
    num_classes = len(reference.class_names)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num).astype(np.int32)
    images = np.zeros((num, size), np.uint8)
    images[np.arange(num), pixels] = 255
    return CanarySet("dirac", images.reshape(num, *shape), labels,
                     np.arange(num, dtype=np.int64), copies, num_classes, pixels=pixels)


def make_canaries(kind: str, *, source: Dataset, num: int, seed: int, copies: int = 1,
                  reference: Dataset | None = None) -> CanarySet:
    """One ``CanarySet`` of ``kind``: ``mislabel`` draws from ``source``
    (held out from training and test); ``ood`` takes its shape and classes
    from it; ``dirac`` chooses its pixels from ``reference`` (the training
    data; default ``source``)."""
    checks.one_of(kind, KINDS, "kind")
    if kind == "mislabel":
        return mislabelled_canaries(source, num, seed=seed, copies=copies)
    if kind != "mislabel" and source.images.dtype != np.uint8:
        raise ValueError(f"{kind} canaries are pixel images; for a featurised source "
                         f"(float features) only mislabelled canaries apply")
    if kind == "ood":
        return ood_canaries(source.images.shape[1:], num, len(source.class_names), seed=seed,
                            copies=copies)
    return dirac_canaries(source if reference is None else reference, num, seed=seed,
                          copies=copies)


def canary_membership(num_canaries: int, num_runs: int, seed: int) -> np.ndarray:
    """(num_runs, num_canaries) bool: every bit an independent fair coin
    from ``seed`` (True: the canary is in that run's training set)."""
    checks.positive_int(num_canaries, "num_canaries")
    checks.positive_int(num_runs, "num_runs")
    checks.seed(seed)
    return np.random.default_rng(seed).random((num_runs, num_canaries)) < 0.5


def insert_canaries(images: np.ndarray, labels: np.ndarray, canaries: CanarySet,
                    is_in: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training set of one run: the N base rows, then ``canaries.copies``
    rows for each included canary (identical content, distinct rows, hence
    distinct ids when ids are positions, as in ``gujax.train``).

    Args:
      images: (N, H, W, C) base images, of the canaries' dtype; labels: (N,) int.
      is_in: (n,) bool, which canaries this run includes.

    Returns:
      (images (N + k I, H, W, C), labels (N + k I,) int32, canary_of_row
      (N + k I,) int64: the canary index of each row, -1 for base rows),
      I = is_in.sum().
    """
    images, labels = np.asarray(images), np.asarray(labels)
    is_in = checks.boolean_array(is_in, "is_in")
    if is_in.shape != (len(canaries),):
        raise ValueError(f"is_in must be ({len(canaries)},) bool, got {is_in.shape}")
    if (images.shape[1:], images.dtype) != (canaries.images.shape[1:], canaries.images.dtype):
        raise ValueError(f"base images {images.shape[1:]} {images.dtype} do not match the "
                         f"canaries' {canaries.images.shape[1:]} {canaries.images.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be ({len(images)},), got {labels.shape}")
    chosen = np.repeat(np.flatnonzero(is_in), canaries.copies)
    return (np.concatenate([images, canaries.images[chosen]]),
            np.concatenate([labels.astype(np.int32), canaries.labels[chosen]]),
            np.concatenate([np.full(len(images), -1, np.int64), chosen.astype(np.int64)]))


# ----------------------------------------------------------------------------
# Training runs with canaries.

class CanaryRun(NamedTuple):
    """One trained run.

    init_params, params: the parameters before and after training.
    disclosure, retired: (N_r,) the run's ledger (D_j in nats, retired by a
      censor) per training row; None for an arm without a ledger.
    noise_multiplier, epsilon: DP-SGD's sigma and accounted epsilon (at the
      arm's delta) for this run's training-set size; None otherwise.
    wall_seconds: this run's share of its group's training time.
    """
    init_params: Any
    params: Any
    disclosure: np.ndarray | None
    retired: np.ndarray | None
    noise_multiplier: float | None
    epsilon: float | None
    wall_seconds: float


def train_canary_runs(arm, *, model, config, sets: Sequence[tuple[np.ndarray, np.ndarray]],
                      seeds: Sequence[int], method: str = "ghost") -> list[CanaryRun]:
    """Train one model of ``arm`` (``gujax.arms.Arm``) per (images,
    labels) of ``sets`` (uint8 pixels or float32 features), all together
    (``gujax.arms.train_runs``), model r initialised, sampled and noised from
    ``seeds[r]``; ``config`` is a ``TrainConfig`` whose seed, sampling,
    batch size and learning rate ``train_runs`` sets per run and arm.

    The sets may differ in size (a run holds the canaries it drew): every
    ledger is sized to the largest set, ids being row positions, so the
    stage states stack. DP-SGD's sigma is calibrated for each run's own size.
    """
    if len(sets) != len(seeds) or not sets:
        raise ValueError(f"need one seed per training set, got {len(seeds)} for {len(sets)}")
    inits = [model.init(jax.random.key(seed), model_inputs(images[:1]))["params"]
             for (images, _), seed in zip(sets, seeds)]
    start = time.perf_counter()
    trained = train_runs(arm, [TrainingRun((images, labels, np.arange(len(labels))), seed, p)
                               for (images, labels), seed, p in zip(sets, seeds, inits)],
                         config, model=model, method=method)
    jax.block_until_ready([t.params for t in trained])
    wall = (time.perf_counter() - start) / len(sets)
    runs = []
    for t, init, (_, labels) in zip(trained, inits, sets):
        book = None if t.ledger is None else jax.device_get(t.ledger)
        n = len(labels)
        runs.append(CanaryRun(
            init_params=init, params=t.params,
            disclosure=None if book is None else np.asarray(book.disclosure)[:n],
            retired=None if book is None else np.asarray(book.retired, bool)[:n],
            noise_multiplier=t.noise_multiplier, epsilon=t.epsilon, wall_seconds=wall))
    return runs
