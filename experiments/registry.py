"""The experiments' registry: the models a ``--model`` names, the data a
``Settings`` loads (``--dataset``, ``--features``, ``--normalisation``), and
their initial parameters."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gujax.data import Dataset, load, random_subset
from gujax.features import moment_norms, private_standardizer, scattering_features
from gujax.models import MLP, ScatterCNN, ScatterLinear, SmallCNN, WideResNet

if TYPE_CHECKING:
    from experiments.cli import Settings


MODELS: dict[str, Callable[[Any, int], Any]] = {
    # MLP: flatten, Dense-ReLU per ``hidden`` width, Dense head.
    "mlp": lambda s, k: MLP(hidden=tuple(s.hidden), num_classes=k),
    # SmallCNN: Conv-GroupNorm-ReLU-pool per ``widths`` entry.
    "smallcnn": lambda s, k: SmallCNN(num_classes=k, widths=tuple(s.widths),
                                      groups=min(8, *s.widths)),
    # WRN-depth-width with GroupNorm.
    "wrn": lambda s, k: WideResNet(depth=s.depth, width=s.width, num_classes=k),
    # Tramer & Boneh's models on ScatterNet features (--features scattering):
    # GroupNorm(27) in the model, or none after --normalisation private.
    "scatter_linear": lambda s, k: ScatterLinear(num_classes=k, groups=_groups(s)),
    "scatter_cnn": lambda s, k: ScatterCNN(num_classes=k, groups=_groups(s)),
}
# The settings each model reads (the others are not recorded for its runs).
MODEL_FIELDS = {"mlp": ("hidden",), "smallcnn": ("widths",), "wrn": ("depth", "width"),
                "scatter_linear": (), "scatter_cnn": ()}
SCATTER_MODELS = ("scatter_linear", "scatter_cnn")


def _groups(settings) -> int | None:
    return 27 if settings.normalisation == "group" else None


# ----------------------------------------------------------------------------
# Data and models.

def _take(data: Dataset, size: int, seed: int, name: str) -> Dataset:
    if size == 0:
        return data
    if not 1 <= size <= len(data):
        raise ValueError(f"{name} must be 0 (all) or in [1, {len(data)}], got {size}")
    return random_subset(data, size, seed)


def load_data(settings: Settings, pool_size: int, population_size: int, *,
              names: tuple[str, str] = ("pool_size", "population_size")
              ) -> tuple[Dataset, Dataset]:
    """(pool, population): random subsets (original order and ids kept) of
    ``settings.dataset``'s train split (``pool_size`` examples, seeded by
    ``settings.seed``) and test split (``population_size``, seed + 1); a size
    of 0 takes the whole split. ``names`` name the sizes in errors. With
    ``--features scattering`` the images are ScatterNet features, and with
    ``--normalisation private`` standardised with the pool's private
    statistics."""
    train_set = load(settings.dataset, "train", data_dir=settings.data_dir)
    test_set = load(settings.dataset, "test", data_dir=settings.data_dir)
    if settings.features == "scattering":       # whole splits: one cache entry each
        train_set, test_set = (scattering_features(d, progress=settings.progress)
                               for d in (train_set, test_set))
    pool = _take(train_set, pool_size, settings.seed, names[0])
    population = _take(test_set, population_size, settings.seed + 1, names[1])
    if settings.normalisation == "private" and settings.features == "scattering":
        # Statistics of the pool, the data under protection, with DP (their
        # cost is in every dpsgd arm's epsilon: Settings.arm_defaults); the
        # clip norms from the held-out population, whose privacy is not at
        # stake. The population is standardised with the same statistics.
        clip_mean, clip_square = moment_norms(population)
        standardize = private_standardizer(
            pool, noise_multiplier=settings.normalisation_noise, clip_mean=clip_mean,
            clip_square=clip_square, seed=settings.seed)
        pool, population = standardize(pool), standardize(population)
    return pool, population


def build_model(settings: Settings, num_classes: int, image_shape: Sequence[int] | None = None):
    """The Flax Linen classifier ``settings.model`` names (``MODELS``); with
    ``image_shape`` (H, W, C), checked to take such images (traced, not run:
    a ``ValueError`` says why not)."""
    if settings.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {settings.model!r}")
    model = MODELS[settings.model](settings, num_classes)
    if image_shape is not None:
        try:
            jax.eval_shape(lambda: init_params(model, tuple(image_shape), 0))
        except (ValueError, TypeError) as err:
            raise ValueError(f"--model {settings.model} cannot take {tuple(image_shape)} "
                             f"images: {err}") from None
    return model


def init_params(model, image_shape, seed: int):
    """``model``'s initial parameters for images of ``image_shape`` (H, W, C)."""
    return model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))["params"]
