"""The privacy/utility comparison on scikit-learn's embedded 8x8 digits (no download).

    python -m experiments.digits                  # default preset, a few minutes on 2 CPU cores
    python -m experiments.digits --preset smoke   # seconds; what the tests run
    python -m experiments.digits --num-models 16 --arms sgd dpsgd:eps=3 censor:tau=20

See docs/experiments.md for the arms, the outputs and measured figures.
"""
import dataclasses

from experiments import cli, comparison
from experiments.comparison import ComparisonSettings

# A wide MLP on a 500-example pool (each model trains on ~250 digits) overfits
# enough for membership inference to have something to find; on the whole
# 1,433-example split the MLP generalises and LiRA sits near chance for every
# arm, which makes a comparison of defenses uninformative.
_DEFAULT = ComparisonSettings(
    dataset="digits", model="mlp", hidden=(512,), widths=(16, 32), depth=16, width=4,
    pool_size=500, population_size=0,         # 0 = the whole test split
    num_models=12, epochs=60, batch_size=64, learning_rate=0.2, optimizer="sgd",
    momentum=0.0, augment=False, method="ghost",
    # All 12 shadow models of an arm in one vmapped step: 4x faster than one
    # at a time on 2 CPU cores (python -m experiments.stacked).
    models_at_once=12,
    # Both queries are recorded; the attacks use the identity alone, because a
    # mirrored 8x8 digit is another digit and only adds noise to LiRA.
    query_augmentations=("identity", "flip"), attack_augmentations=("identity",),
    reg=0.1, delta=1e-5, clip_norm=1.0,
    arms=("sgd", "dpsgd:eps=1", "dpsgd:eps=3", "dpsgd:eps=8",
          "censor:tau=8", "censor:tau=16", "censor:tau=32", "clip:max_step=0.1"),
    seed=0, checkpoint_every=10_000,
    note="Digits preset: a random 500-example pool of the train split (each shadow "
         "model trains on a random half), 12 shadow models per arm, MLP 64-512-10, "
         "60 epochs.")

PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(
        _DEFAULT, pool_size=0, num_models=4, epochs=3, hidden=(64,), bootstrap_resamples=200,
        arms=("sgd", "dpsgd:eps=1", "censor:tau=8", "clip:max_step=0.1"),
        note="Smoke preset: 4 shadow models, 3 epochs; a plumbing check, not a measurement."),
)
# 8x8 images: an MLP or a small CNN on the pixels (no WideResNet, no
# scattering, so --help offers no --depth, --width, --features or
# --normalisation).
EXPERIMENT = cli.Experiment("digits", __doc__, PRESETS, resumable=True,
                            choices={"model": ("mlp", "smallcnn"), "features": ("pixels",)})


def main(argv=None):
    return comparison.main(argv, EXPERIMENT)


if __name__ == "__main__":
    main()
