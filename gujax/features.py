"""Handcrafted image features: the 2-D wavelet scattering transform (ScatterNet).

Tramer & Boneh (ICLR 2021, "Differentially Private Learning Needs Better
Features") train DP-SGD on fixed scattering features instead of pixels: a
linear model on the J = 2, L = 8 scattering of CIFAR-10 reaches 67% at
epsilon = 3, where an end-to-end CNN reaches 59%. The transform has no
trainable parameters, so it is computed once per dataset, cached, and the
models of ``gujax.models.scatter`` train on its output.

    feats = scattering_features(load("cifar10", "train", data_dir=...))
    feats.images.shape    # (50000, 8, 8, 243) float32

The transform itself is kymatio's (``kymatio.jax.Scattering2D``: Morlet
filter bank, modulus, low-pass, order 2), run under ``jax.jit`` in fixed-size
batches so that it compiles once; tests/test_features.py checks it against
kymatio's numpy frontend.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from gujax.progress import progress_bar

from gujax import checks
from gujax.data import cache
from gujax.data.dataset import Dataset
from gujax.noise import clipped_gaussian_sum_numpy

# kymatio 0.3.0 imports scipy.special.sph_harm, which SciPy 1.15 deprecated
# and later removed in favour of sph_harm_y (degree and order swapped, and
# polar/azimuthal angles in the other order). kymatio's 2-D code never calls
# it; the alias only lets the package import.
if not hasattr(scipy.special, "sph_harm"):
    scipy.special.sph_harm = (
        lambda m, n, theta, phi: scipy.special.sph_harm_y(n, m, phi, theta))

# torchvision's ImageNet statistics, the normalisation Tramer & Boneh apply to
# CIFAR-10 before the scattering (their data.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when the cached feature layout changes.
_FORMAT = 1


def num_coefficients(J: int, L: int) -> int:
    """Scattering coefficients per input channel up to order 2: 1 low-pass,
    J L first-order and L^2 J (J - 1) / 2 second-order paths (81 for J = 2,
    L = 8)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


@functools.lru_cache(maxsize=8)
def _transform(J: int, L: int, height: int, width: int):
    from kymatio.jax import Scattering2D  # imported late: kymatio builds filters on import
    return jax.jit(Scattering2D(J=J, shape=(height, width), L=L).scattering)


def _check(images, J: int, L: int) -> tuple[int, int]:
    checks.positive_int(J, "J")
    checks.positive_int(L, "L")
    if np.ndim(images) != 4:
        raise ValueError(f"images must be (N, H, W, C); got shape {np.shape(images)}")
    height, width = np.shape(images)[1:3]
    if height % 2**J or width % 2**J:
        raise ValueError(f"image height and width must be multiples of 2^J = {2**J}; got "
                         f"{height} x {width}")
    return height, width


def scattering(images, *, J: int = 2, L: int = 8, batch_size: int = 500,
               progress: bool = False) -> np.ndarray:
    """The 2-D scattering transform of a batch of images, to order 2.

    Args:
      images: (N, H, W, C) float images, channels last (already normalised;
        see ``scattering_features`` for the published normalisation). H and
        W must be multiples of 2^J.
      J: number of scales; the output is subsampled by 2^J.
      L: number of orientations.
      batch_size: images per jitted call (the last batch is padded, so one
        compilation serves every call of a shape).
      progress: a bar over the batches.

    Returns:
      (N, C, K, H / 2^J, W / 2^J) float32 with K = ``num_coefficients(J, L)``
      (81 for J = 2, L = 8): kymatio's layout, each input channel's
      coefficients in kymatio's order (low-pass, first order, second order).
    """
    height, width = _check(images, J, L)
    checks.positive_int(batch_size, "batch_size")
    images = np.asarray(images, np.float32)
    n, channels = len(images), images.shape[-1]
    k = num_coefficients(J, L)
    out = np.empty((n, channels, k, height // 2**J, width // 2**J), np.float32)
    if n == 0:
        return out
    transform = _transform(J, L, height, width)
    batch_size = min(batch_size, n)
    bar = progress_bar(total=n, desc=f"scattering J={J} L={L}", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        count = len(chunk)
        if count < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - count, *chunk.shape[1:]),
                                                    np.float32)])
        # kymatio scatters the last two axes: (B, C, H, W) -> (B, C, K, H', W').
        result = transform(jnp.asarray(chunk.transpose(0, 3, 1, 2)))
        out[start:start + count] = np.asarray(result)[:count]
        bar.update(count)
    bar.close()
    return out


def channels_last(coefficients: np.ndarray) -> np.ndarray:
    """(N, C, K, H', W') scattering coefficients -> (N, H', W', C K) features,
    channel c K + k holding coefficient k of input channel c (the order of
    Tramer & Boneh's (N, C K, H', W') view, so GroupNorm groups of K / 9
    consecutive channels match theirs)."""
    n, c, k, h, w = coefficients.shape
    return np.ascontiguousarray(coefficients.reshape(n, c * k, h, w).transpose(0, 2, 3, 1))


def _fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for array in (dataset.images, dataset.labels, dataset.ids):
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def scattering_features(dataset: Dataset, *, J: int = 2, L: int = 8,
                        mean: Sequence[float] | None = IMAGENET_MEAN,
                        std: Sequence[float] | None = IMAGENET_STD,
                        cache_dir: str | pathlib.Path | None = None,
                        progress: bool = True) -> Dataset:
    """A dataset of scattering features in place of the images.

    The images (uint8 pixels, scaled to [0, 1]) are normalised per channel,
    ``(x - mean) / std``, scattered (``scattering``) and laid out channels
    last (``channels_last``). The result is cached on disk under a key made
    of the images' content, the labels, the ids, J, L, mean and std, so a
    second call (another run, another process) reads it back instead of
    recomputing it; a different subset or transform misses the cache.

    Args:
      dataset: a ``gujax.data.Dataset`` of uint8 images (N, H, W, C).
      J, L: scales and orientations (Tramer & Boneh: J = 2, L = 8).
      mean, std: (C,) per-channel statistics in [0, 1] units; the default is
        ImageNet's, as in Tramer & Boneh; None for neither.
      cache_dir: where features are cached (default ``$GUJAX_CACHE`` or
        ~/.cache/gujax).
      progress: a bar while the transform runs (not on a cache hit).

    Returns:
      A ``Dataset`` with the same labels, ids, class names and split, whose
      ``images`` are (N, H / 2^J, W / 2^J, C K) float32 features (8 x 8 x 243
      for CIFAR-10), and whose name is ``"<name>+scattering-J<J>-L<L>"``.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"scattering_features takes a gujax.data.Dataset; got "
                         f"{type(dataset).__name__}")
    if dataset.images.dtype != np.uint8:
        raise ValueError("scattering_features takes uint8 images (pixels); these are "
                         f"{dataset.images.dtype}: features already?")
    _check(dataset.images, J, L)
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    channels = dataset.images.shape[-1]
    if mean is not None:
        mean = np.asarray(mean, np.float32)
        std = np.asarray(std, np.float32)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"mean and std must be ({channels},); got {mean.shape} and "
                             f"{std.shape}")
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError(f"std must be positive and finite; got {std}")
    name = f"{dataset.name}+scattering-J{J}-L{L}"
    key = cache.cache_key(source="scattering", format=_FORMAT, content=_fingerprint(dataset),
                          J=J, L=L, mean=None if mean is None else mean.tolist(),
                          std=None if std is None else std.tolist())
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
    hit = cache.read(cache_dir, key)
    if hit is not None and "features" in hit and hit["features"].shape[0] == len(dataset):
        features = hit["features"]
    else:
        x = dataset.images.astype(np.float32) / 255.0
        if mean is not None:
            x = (x - mean) / std
        features = channels_last(scattering(x, J=J, L=L, progress=progress))
        cache.write(cache_dir, key, {"features": features})
    return Dataset(images=features, labels=dataset.labels, ids=dataset.ids,
                   class_names=dataset.class_names, name=name, split=dataset.split)


# ----------------------------------------------------------------------------
# Standardising features with (private) data-set statistics.

# torch.nn.BatchNorm's epsilon, as in Tramer & Boneh's standardisation.
_VARIANCE_FLOOR = 1e-5


class Standardizer(NamedTuple):
    """Per-channel standardisation ``(x - mean) / sqrt(var + 1e-5)``; channels
    whose variance is 0 are set to 0 (they carry nothing).

    mean, var: (C,) float64 statistics of the channels.
    releases: the noise multipliers of the Gaussian mechanisms that produced
      them (two for ``private_standardizer``, none for exact statistics):
      what a DP-SGD arm trained on the standardised features must compose
      into its epsilon (``gujax.arms.Arm.releases``).
    """
    mean: np.ndarray
    var: np.ndarray
    releases: tuple[float, ...]

    def __call__(self, dataset: Dataset) -> Dataset:
        """The dataset with its features standardised (float32)."""
        x = dataset.images
        if x.dtype != np.float32 or x.shape[-1] != len(self.mean):
            raise ValueError(f"a Standardizer of {len(self.mean)} channels takes float32 "
                             f"features (N, H, W, {len(self.mean)}); got {x.shape} {x.dtype}")
        scale = np.where(self.var > 0, 1.0 / np.sqrt(self.var + _VARIANCE_FLOOR), 0.0)
        out = np.empty_like(x)
        for start in range(0, len(x), 4096):       # chunked: no float64 copy of the set
            out[start:start + 4096] = (x[start:start + 4096] - self.mean) * scale
        return Dataset(images=out, labels=dataset.labels, ids=dataset.ids,
                       class_names=dataset.class_names, name=dataset.name,
                       split=dataset.split)


def _channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example spatial means of x and of x^2: two (N, C) float64 arrays."""
    n, c = len(x), x.shape[-1]
    first = np.empty((n, c))
    second = np.empty((n, c))
    for start in range(0, n, 4096):
        chunk = x[start:start + 4096].reshape(-1, x.shape[1] * x.shape[2], c).astype(np.float64)
        first[start:start + 4096] = chunk.mean(1)
        second[start:start + 4096] = np.square(chunk).mean(1)
    return first, second


def _check_features(dataset: Dataset, what: str) -> np.ndarray:
    if not isinstance(dataset, Dataset) or dataset.images.dtype != np.float32:
        raise ValueError(f"{what} takes a Dataset of float32 features "
                         "(scattering_features)")
    if len(dataset) == 0:
        raise ValueError(f"{what} needs at least one example")
    return dataset.images


def moment_norms(dataset: Dataset, quantile: float = 0.5) -> tuple[float, float]:
    """The ``quantile`` of the per-example L2 norms of the channel means and of
    the channel mean squares: clip norms for ``private_standardizer``.

    Compute them on data whose privacy is not at stake (a public or held-out
    split): computed on the private training set they would leak, unaccounted.
    """
    checks.probability(quantile, "quantile")
    first, second = _channel_moments(_check_features(dataset, "moment_norms"))
    return (float(np.quantile(np.linalg.norm(first, axis=1), quantile)),
            float(np.quantile(np.linalg.norm(second, axis=1), quantile)))


def private_standardizer(dataset: Dataset, *, noise_multiplier: float, clip_mean: float,
                         clip_square: float, seed: int = 0) -> Standardizer:
    """Per-channel mean and variance of features, with differential privacy.

    Tramer & Boneh's private normalisation: each example's channel means m_j
    (spatial mean of each channel, (C,)) and mean squares s_j are clipped to
    L2 norms ``clip_mean`` and ``clip_square``; their sums get Gaussian noise
    of standard deviation ``noise_multiplier`` times the clip norm (two
    Gaussian mechanisms, each of L2 sensitivity its clip norm under
    add-or-remove-one) and are divided by N. var = max(E[s] - E[m]^2, 0).
    Unlike the published code, the clip norms are arguments, to be computed
    on public data (``moment_norms``), not the private set's median.

    Args:
      dataset: the training set's float32 features (N, H, W, C).
      noise_multiplier: sigma of both mechanisms (Tramer & Boneh: 8); 0 for
        the exact, non-private statistics (no clipping, no releases).
      clip_mean, clip_square: the clip norms (> 0).
      seed: seeds the noise.

    Returns:
      A ``Standardizer`` whose ``releases`` are ``(sigma, sigma)``.
    """
    x = _check_features(dataset, "private_standardizer")
    checks.positive_finite(noise_multiplier, "noise_multiplier", allow_zero=True)
    checks.positive_finite(clip_mean, "clip_mean")
    checks.positive_finite(clip_square, "clip_square")
    checks.seed(seed)
    first, second = _channel_moments(x)
    n = len(x)
    if noise_multiplier == 0:
        mean, square = first.mean(0), second.mean(0)
        return Standardizer(mean, np.maximum(square - mean**2, 0.0), ())
    rng = np.random.default_rng(seed)

    # The Gaussian mechanism of gujax.noise (its numpy twin: host statistics).
    mean = clipped_gaussian_sum_numpy(first, clip_mean, noise_multiplier, rng) / n
    square = clipped_gaussian_sum_numpy(second, clip_square, noise_multiplier, rng) / n
    return Standardizer(mean, np.maximum(square - mean**2, 0.0),
                        (float(noise_multiplier), float(noise_multiplier)))
