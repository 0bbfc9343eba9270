"""The privacy/utility comparison on CIFAR-10: DP-SGD against the GNQ defenses.

    python -m experiments.cifar --preset cpu --data-dir /tmp/data/cifar10   # ~40 min, 2 CPU cores
    python -m experiments.cifar --preset paper        # full CIFAR-10, WRN-16-4: for a GPU
    python -m experiments.cifar --preset smoke --data-dir DIR   # minutes; what the tests run

The data comes through ``gujax.data.load("cifar10", ...)``: TFDS by default
(prepared beforehand, gujax never downloads), or ``--data-dir`` pointing at an
image folder ``DIR/{train,test}/<class>/<image>`` or the CIFAR python batches.
Any preset value can be overridden, e.g. ``--num-models 16 --epochs 30``.
Outputs default to results/cifar10-<preset>; see ``experiments/comparison.py``.
"""
import dataclasses

from experiments import comparison, harness
from experiments.comparison import ComparisonSettings

# The DP-SGD literature's CIFAR-10 setting (De et al. 2022 train WRN-16-4 with
# GroupNorm, augmentation and large batches); LiRA needs many shadow models
# (Carlini et al. use 64-256).
_PAPER = ComparisonSettings(
    dataset="cifar10", model="wrn", hidden=(512,), widths=(32, 64, 128), depth=16, width=4,
    pool_size=0, population_size=0,
    num_models=64, epochs=60, batch_size=256, learning_rate=0.5, optimizer="sgd",
    momentum=0.9, augment=True, method="ghost", models_at_once=1,
    query_augmentations=("identity", "flip"), attack_augmentations=("identity", "flip"),
    reg=0.1, delta=1e-5, clip_norm=1.0,
    arms=("sgd", "dpsgd:eps=1", "dpsgd:eps=3", "dpsgd:eps=8",
          "censor:tau=2", "censor:tau=8", "censor:tau=32", "clip:max_step=0.05"),
    seed=0, checkpoint_every=500,
    note="Paper preset: full CIFAR-10 train split as the membership pool (each model "
         "trains on a random half), WRN-16-4 with GroupNorm, 64 shadow models per arm.")

PRESETS = harness.presets(
    paper=_PAPER,
    # What fits in about 20 minutes on a 2-core CPU, chosen so that the
    # non-private model overfits (train accuracy well above test accuracy):
    # without that, membership inference has nothing to find and no arm can
    # be told apart (the SmallCNN setting measured on 2026-11-23 underfit,
    # train = test = 0.27, and every attack sat at chance). Probes of one arm,
    # 4 models, 60 epochs: lr 0.02 -> train 0.64 / test 0.33, LiRA AUC 0.69;
    # lr 0.05 with momentum 0.9 diverged (0.27 / 0.20).
    cpu=dataclasses.replace(
        _PAPER, model="mlp", hidden=(512,), pool_size=2000, population_size=2000,
        num_models=8, models_at_once=8, epochs=100, batch_size=64, learning_rate=0.02,
        momentum=0.0, augment=False,
        attack_augmentations=("identity", "flip"),
        arms=("sgd", "dpsgd:eps=1", "dpsgd:eps=3", "dpsgd:eps=8",
              "censor:tau=8", "censor:tau=16", "censor:tau=32", "clip:max_step=0.1"),
        note="CPU preset, reduced from the paper setting: a random 2,000-image subset of the "
             "train split as the membership pool (each model trains on ~1,000), 2,000 test "
             "images, an MLP 3072-512-10 instead of WRN-16-4 (so that it overfits on a CPU "
             "budget), 100 epochs without augmentation, 8 shadow models per arm trained at "
             "once (LiRA with 7 shadows and a global variance)."),
    smoke=dataclasses.replace(
        _PAPER, model="smallcnn", widths=(8, 16), pool_size=200, population_size=100,
        num_models=4, epochs=2, batch_size=50, learning_rate=0.1, momentum=0.0, augment=True,
        checkpoint_every=10_000,
        arms=("sgd", "dpsgd:eps=3", "censor:tau=2", "clip:max_step=0.05"),
        note="Smoke preset: 200 images, 4 models, 2 epochs; a plumbing check, not a "
             "measurement."),
)
EXPERIMENT = harness.Experiment("cifar", __doc__, PRESETS, default_preset="cpu",
                                results_name="cifar10", resumable=True)


def main(argv=None):
    return comparison.main(argv, EXPERIMENT)


if __name__ == "__main__":
    main()
