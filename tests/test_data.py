"""gujax.data: loaders (digits, image folder, CIFAR python, TFDS), cache, splits, augmentations."""
import pickle
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import gujax.data as gd
from gujax.data import sources


# ----------------------------------------------------------------------------- digits

def test_digits_shapes_values_and_fixed_stratified_split():
    raw = load_digits()
    train, test = gd.load("digits", "train"), gd.load("digits", "test")
    assert len(train) + len(test) == len(raw.target)
    for ds in (train, test):
        assert ds.images.shape[1:] == (8, 8, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and ds.ids.dtype == np.int64
        np.testing.assert_array_equal(ds.ids, np.arange(len(ds)))
        assert ds.class_names == tuple(str(c) for c in range(10))
    # Reference from the documented rule: within each class, the examples at
    # within-class positions 0, 5, 10, ... are the test split.
    test_idx = np.concatenate([np.flatnonzero(raw.target == c)[::5] for c in range(10)])
    is_test = np.zeros(len(raw.target), bool)
    is_test[test_idx] = True
    for ds, mask in ((train, ~is_test), (test, is_test)):
        np.testing.assert_array_equal(ds.labels, raw.target[mask])
        # 0..16 -> round(v * 255 / 16), and back exactly.
        np.testing.assert_array_equal(ds.images[..., 0], np.rint(raw.images[mask] * 255 / 16))
        np.testing.assert_array_equal(np.rint(ds.images[..., 0].astype(float) * 16 / 255), raw.images[mask])
    counts = np.bincount(raw.target)
    np.testing.assert_array_equal(np.bincount(test.labels), -(-counts // 5))


def test_digits_rejects_data_dir_and_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="embedded"):
        gd.load("digits", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="splits"):
        gd.load("digits", "validation")
    with pytest.raises(ValueError, match="slicing"):
        gd.load("digits", "train[:10]")


# ----------------------------------------------------------------------------- image folder

def _pixel(index, channels=3):
    """A 4x5 image whose pixels encode ``index`` (so the order can be checked)."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (4, 5, channels), dtype=np.uint8)


def _write_folder(root, layout, channels=3):
    """layout: {split: {class: [file names]}}; file k of the layout gets _pixel(k)."""
    k = 0
    written = {}
    for split, classes in layout.items():
        for cls, names in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for name in names:
                array = _pixel(k, channels)
                Image.fromarray(array[..., 0] if channels == 1 else array).save(root / split / cls / name)
                written[(split, cls, name)] = array
                k += 1
    return written


LAYOUT = {
    "train": {"dog": ["b.png", "a.png", "10.png", "2.png"], "cat": ["x.PNG", "notes.txt"]},
    "test": {"cat": ["0.png"], "emu": ["1.png"]},
}


def _fake_txt(path):
    path.write_text("not an image")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    layout = {s: {c: [n for n in names if n.lower().endswith(".png")] for c, names in cls.items()}
              for s, cls in LAYOUT.items()}
    written = _write_folder(root, layout)
    _fake_txt(root / "train" / "cat" / "notes.txt")
    return root, written


def test_image_folder_labels_order_and_dtype(folder, tmp_path):
    root, written = folder
    ds = gd.load("pets", "train", data_dir=root, cache_dir=tmp_path / "cache")
    # Class names: sorted union over every split (emu only in test).
    assert ds.class_names == ("cat", "dog", "emu")
    expected = [("cat", "x.PNG"), ("dog", "10.png"), ("dog", "2.png"), ("dog", "a.png"),
                ("dog", "b.png")]  # by class, then file name in string order
    assert ds.images.dtype == np.uint8 and ds.images.shape == (5, 4, 5, 3)
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 1, 1])
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.ids, np.arange(5))
    for i, (cls, name) in enumerate(expected):
        np.testing.assert_array_equal(ds.images[i], written[("train", cls, name)])
    test = gd.load("pets", "test", data_dir=root, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(test.labels, [0, 2])
    assert (test.name, test.split) == ("pets", "test")


def test_image_folder_grayscale_has_one_channel(tmp_path):
    written = _write_folder(tmp_path / "g", {"train": {"a": ["0.png"], "b": ["1.png"]}}, channels=1)
    ds = gd.load("gray", "train", data_dir=tmp_path / "g", cache_dir=tmp_path / "cache")
    assert ds.images.shape == (2, 4, 5, 1)
    np.testing.assert_array_equal(ds.images[1], written[("train", "b", "1.png")])


def test_second_load_hits_the_cache_and_edits_miss_it(folder, tmp_path, monkeypatch):
    root, _ = folder
    calls = []
    decode = sources.decode_images
    monkeypatch.setattr(sources, "decode_images", lambda paths: calls.append(1) or decode(paths))
    cache_dir = tmp_path / "cache"
    first = gd.load("pets", "train", data_dir=root, cache_dir=cache_dir)
    second = gd.load("pets", "train", data_dir=root, cache_dir=cache_dir)
    assert len(calls) == 1 and len(list(cache_dir.glob("*.npz"))) == 1
    for a, b in ((first.images, second.images), (first.labels, second.labels),
                 (first.ids, second.ids)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert first.class_names == second.class_names
    # A changed file changes the fingerprint: decoded again, new content seen.
    new = np.full((4, 5, 3), 7, np.uint8)
    Image.fromarray(new).save(root / "train" / "dog" / "a.png")
    third = gd.load("pets", "train", data_dir=root, cache_dir=cache_dir)
    assert len(calls) == 2
    np.testing.assert_array_equal(third.images[3], new)
    # GUJAX_CACHE is the default cache directory.
    monkeypatch.setenv("GUJAX_CACHE", str(tmp_path / "env_cache"))
    gd.load("pets", "train", data_dir=root)
    assert list((tmp_path / "env_cache").glob("*.npz"))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_image_error_names_the_file(tmp_path, suffix):
    root = tmp_path / "bad"
    (root / "train" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "train" / "a" / f"{i}.{suffix}")
    victim = root / "train" / "a" / f"1.{suffix}"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot decode image file .*1\\.{suffix}"):
        gd.load("bad", "train", data_dir=root, cache_dir=tmp_path / "cache")


def test_sixteen_bit_image_is_refused_not_clipped(tmp_path):
    root = tmp_path / "deep"
    (root / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 4000, np.uint16)).save(root / "train" / "a" / "deep.png")
    with pytest.raises(ValueError, match="deep.png.*16-bit"):
        gd.load("deep", "train", data_dir=root, cache_dir=tmp_path / "cache")


def test_mismatched_image_sizes_are_refused(tmp_path):
    root = tmp_path / "sizes"
    (root / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "a" / "0.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "train" / "a" / "1.png")
    with pytest.raises(ValueError, match="1.png"):
        gd.load("sizes", "train", data_dir=root, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- CIFAR python

def _write_cifar_python(root, name, per_file=3):
    """Tiny files in the canonical format: dicts with bytes keys, pickle protocol 2."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10"
             else ["train", "test"])
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    num_classes = 10 if name == "cifar10" else 100
    content = {}
    for file in files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        with open(root / file, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f, protocol=2)
        content[file] = (data, labels)
    meta_name, names_key = (("batches.meta", b"label_names") if name == "cifar10"
                            else ("meta", b"fine_label_names"))
    names = [f"class{i}".encode() for i in range(num_classes)]
    with open(root / meta_name, "wb") as f:
        pickle.dump({names_key: names}, f, protocol=2)
    return content


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_reader(tmp_path, name):
    root = tmp_path / name
    content = _write_cifar_python(root, name)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    ds = gd.load(name, "train", data_dir=root, cache_dir=tmp_path / "cache")
    data = np.concatenate([content[f][0] for f in train_files])
    labels = np.concatenate([content[f][1] for f in train_files])
    assert ds.images.shape == (len(data), 32, 32, 3) and ds.images.dtype == np.uint8
    # Naive reference: pixel (i, j) of channel c is data[c * 1024 + i * 32 + j].
    n, i, j, c = 2, 5, 17, 1
    assert ds.images[n, i, j, c] == data[n, c * 1024 + i * 32 + j]
    for n in range(len(data)):
        for c in range(3):
            np.testing.assert_array_equal(ds.images[n, :, :, c].ravel(),
                                          data[n, c * 1024:(c + 1) * 1024])
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names[:2] == ("class0", "class1")
    test = gd.load(name, "test", data_dir=root, cache_dir=tmp_path / "cache")
    assert len(test) == 3


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_python_refuses_arbitrary_pickles(tmp_path):
    root = tmp_path / "cifar10"
    _write_cifar_python(root, "cifar10")
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3"):
        gd.load("cifar10", "train", data_dir=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("bad", [15, -1])
def test_labels_out_of_range_are_refused_where_the_data_enters(tmp_path, bad):
    """A label outside [0, num_classes) gives a NaN (15) or a wrong finite
    (-1) loss with finite gradients downstream; the loader refuses it."""
    root = tmp_path / "cifar"
    _write_cifar_python(root, "cifar10")
    with open(root / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"][1] = bad
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=rf"must lie in \[0, 10\); got \[{bad}\] at rows \[4\]"):
        gd.load("cifar10", "train", data_dir=root, cache_dir=tmp_path / "cache")
    images = np.zeros((3, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="must lie in"):
        gd.Dataset(images, np.array([0, bad, 1], np.int32), np.arange(3, dtype=np.int64),
                   class_names=("a", "b", "c"), name="toy", split="train")


# ----------------------------------------------------------------------------- TFDS

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_path_under_mock_data(tmp_path, no_network, name, shape):
    import tensorflow_datasets as tfds

    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    with tfds.testing.mock_data(num_examples=6):
        ds = gd.load(name, "train", data_dir=tfds_dir, cache_dir=tmp_path / "cache")
        again = gd.load(name, "train", data_dir=tfds_dir, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (6, *shape) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and np.all((0 <= ds.labels) & (ds.labels < 10))
    assert len(ds.class_names) == 10
    np.testing.assert_array_equal(ds.ids, np.arange(6))
    np.testing.assert_array_equal(ds.images, again.images)  # mock data is deterministic
    # Mock data has no files to fingerprint, so nothing is cached.
    assert not (tmp_path / "cache").exists()


def test_missing_tfds_dataset_offline_gives_clear_error(tmp_path, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        gd.load("cifar10", "train", data_dir=empty, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "not available offline" in message
    assert "digits" in message and "data_dir" in message and "tfds build cifar10" in message
    with pytest.raises(ValueError, match="unknown dataset"):
        gd.load("imagenet_typo", "train", data_dir=empty)
    with pytest.raises(ValueError, match="not a directory"):
        gd.load("cifar10", "train", data_dir=tmp_path / "does_not_exist")


# ----------------------------------------------------------------------------- splits and ids

def test_subsets_keep_stable_ids_and_are_deterministic():
    ds = gd.load("digits", "train")
    again = gd.load("digits", "train")
    np.testing.assert_array_equal(ds.ids, again.ids)
    a = gd.random_subset(ds, 100, seed=3)
    b = gd.random_subset(again, 100, seed=3)
    c = gd.random_subset(ds, 100, seed=4)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)
    assert np.all(np.diff(a.ids) > 0)  # original order kept
    # The id points back at the same example of the full split.
    np.testing.assert_array_equal(a.images, ds.images[a.ids])
    np.testing.assert_array_equal(a.labels, ds.labels[a.ids])
    nested = gd.subset(a, [5, 0, 7])
    np.testing.assert_array_equal(nested.ids, a.ids[[5, 0, 7]])
    np.testing.assert_array_equal(nested.images, ds.images[nested.ids])
    for bad in ([0, 0], [len(a)], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError):
            gd.subset(a, bad)
    with pytest.raises(ValueError):
        gd.random_subset(ds, 0, seed=0)
    with pytest.raises(ValueError):
        gd.random_subset(ds, 10, seed=-1)


def test_member_split_is_disjoint_complete_and_deterministic():
    ds = gd.load("digits", "test")
    members, non_members = gd.member_split(ds, 100, seed=0)
    members2, _ = gd.member_split(ds, 100, seed=0)
    members3, _ = gd.member_split(ds, 100, seed=1)
    assert len(members) == 100 and len(non_members) == len(ds) - 100
    assert not set(members.ids) & set(non_members.ids)
    np.testing.assert_array_equal(np.sort(np.concatenate([members.ids, non_members.ids])), ds.ids)
    np.testing.assert_array_equal(members.ids, members2.ids)
    assert not np.array_equal(members.ids, members3.ids)
    with pytest.raises(ValueError):
        gd.member_split(ds, len(ds), seed=0)


def test_shadow_membership_each_example_in_exactly_half_the_models():
    keep = gd.shadow_membership(500, 8, seed=0)
    assert keep.shape == (8, 500) and keep.dtype == bool
    np.testing.assert_array_equal(keep.sum(0), np.full(500, 4))
    np.testing.assert_array_equal(keep, gd.shadow_membership(500, 8, seed=0))
    assert not np.array_equal(keep, gd.shadow_membership(500, 8, seed=1))
    # Random halves: model sizes vary around N / 2, and no two models share a set.
    sizes = keep.sum(1)
    assert np.all(np.abs(sizes - 250) < 60) and len(set(sizes.tolist())) > 1
    assert len({row.tobytes() for row in keep}) == 8
    # Per example, the IN set is uniform over models: each model holds ~half.
    np.testing.assert_allclose(gd.shadow_membership(4000, 4, seed=2).mean(1), 0.5, atol=0.05)
    for bad in (3, 0):
        with pytest.raises(ValueError, match="even"):
            gd.shadow_membership(10, bad, seed=0)


def test_shadow_membership_unbalanced_is_independent_bernoulli():
    keep = gd.shadow_membership(20000, 3, seed=0, balanced=False)  # odd M allowed
    assert keep.shape == (3, 20000) and keep.dtype == bool
    np.testing.assert_array_equal(keep, gd.shadow_membership(20000, 3, seed=0, balanced=False))
    # Mean 1/2 (4 sigma = 0.007), and per-example counts Binomial(3, 1/2):
    # 0 or 3 INs each with probability 1/8, impossible when balanced.
    np.testing.assert_allclose(keep.mean(1), 0.5, atol=0.01)
    counts = np.bincount(keep.sum(0), minlength=4) / 20000
    np.testing.assert_allclose(counts, [1 / 8, 3 / 8, 3 / 8, 1 / 8], atol=0.015)
    # Models independent: P(IN in both model 0 and 1) = 1/4.
    np.testing.assert_allclose(np.mean(keep[0] & keep[1]), 0.25, atol=0.015)
    with pytest.raises(ValueError):
        gd.shadow_membership(10, 1, seed=0, balanced=False)


# ----------------------------------------------------------------------------- float conversion

def test_to_float_and_channel_stats_against_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(gd.to_float(images), images / 255.0, rtol=1e-6)
    mean, std = gd.channel_stats(images)
    flat = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-10)
    x = jax.jit(lambda im: gd.to_float(im, mean, std))(images)
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x).reshape(-1, 3).mean(0), 0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        gd.to_float(images.astype(np.float32))
    with pytest.raises(ValueError, match="both"):
        gd.to_float(images, mean=mean)


# ----------------------------------------------------------------------------- augmentation

def _reference_crop(images, shifts, padding, mode):
    np_mode = "reflect" if mode == "reflect" else "constant"
    out = np.empty_like(images)
    h, w = images.shape[1:3]
    for b, (dy, dx) in enumerate(shifts):
        padded = np.pad(images[b], ((padding, padding), (padding, padding), (0, 0)), mode=np_mode)
        out[b] = padded[padding + dy:padding + dy + h, padding + dx:padding + dx + w]
    return out


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_crop_matches_numpy_and_zero_shift_is_identity(mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 9, 2), dtype=np.uint8)
    crop = jax.jit(gd.crop, static_argnums=(2, 3))
    np.testing.assert_array_equal(crop(images, jnp.zeros((6, 2), jnp.int32), 3, mode), images)
    shifts = rng.integers(-3, 4, (6, 2))
    np.testing.assert_array_equal(crop(images, jnp.asarray(shifts), 3, mode),
                                  _reference_crop(images, shifts, 3, mode))


def test_random_crop_and_flip_under_jit():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    images = np.repeat(image[None], 64, axis=0)
    key = jax.random.key(0)
    flipped = jax.jit(gd.random_flip)(key, images)
    assert flipped.shape == images.shape and flipped.dtype == images.dtype
    is_flipped = np.array([np.array_equal(f, image[:, ::-1]) for f in np.asarray(flipped)])
    is_same = np.array([np.array_equal(f, image) for f in np.asarray(flipped)])
    assert np.all(is_flipped | is_same)  # exact mirror or untouched, nothing else
    assert is_flipped.any() and is_same.any()  # per-example randomness
    np.testing.assert_array_equal(flipped, jax.jit(gd.random_flip)(key, images))

    cropped = jax.jit(gd.random_crop, static_argnums=2)(key, images, 2)
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    # Every output is one of the 25 possible shifts of the image...
    candidates = {_reference_crop(image[None], [(dy, dx)], 2, "reflect")[0].tobytes()
                  for dy in range(-2, 3) for dx in range(-2, 3)}
    assert all(c.tobytes() in candidates for c in np.asarray(cropped))
    # ...and different examples draw different shifts.
    assert len({c.tobytes() for c in np.asarray(cropped)}) > 5

    both = jax.jit(gd.random_crop_flip)(key, images.astype(np.float32))
    assert both.shape == images.shape and both.dtype == np.float32
    with pytest.raises(ValueError, match="batch"):
        gd.random_flip(key, image)


@pytest.mark.parametrize("bad", [-1, 15])
def test_dataset_refuses_out_of_range_labels_naming_split_and_value(bad):
    from gujax.data.dataset import Dataset
    labels = np.array([0, bad, 3], np.int32)
    with pytest.raises(ValueError, match=rf"'train'.*\[{bad}\]"):
        Dataset(images=np.zeros((3, 2, 2, 1), np.uint8), labels=labels,
                ids=np.arange(3, dtype=np.int64), class_names=tuple(map(str, range(10))),
                name="toy", split="train")
