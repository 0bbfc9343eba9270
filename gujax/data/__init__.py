"""Datasets for gujax experiments: loaders with stable example ids, splits, augmentations.

``load(name, split, data_dir=...)`` reads TFDS (offline), a local image
folder, the CIFAR python batches or scikit-learn's embedded digits into a
``Dataset`` of uint8 images, int32 labels and int64 stable ids; decoded
arrays are cached on disk. See docs/data.md.
"""
from gujax.data.augment import crop, random_crop, random_crop_flip, random_flip
from gujax.data.cache import default_cache_dir
from gujax.data.dataset import Dataset, channel_stats, model_inputs, to_float
from gujax.data.sources import TFDS_NAMES, load
from gujax.data.splits import member_split, random_subset, shadow_membership, subset

__all__ = [
    "Dataset",
    "TFDS_NAMES",
    "channel_stats",
    "crop",
    "default_cache_dir",
    "load",
    "member_split",
    "model_inputs",
    "random_crop",
    "random_crop_flip",
    "random_flip",
    "random_subset",
    "shadow_membership",
    "subset",
    "to_float",
]
