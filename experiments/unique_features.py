"""Unique-feature memorisation (Hartley & Tsaftaris 2022) under each training arm.

    python -m experiments.unique_features                  # digits, a few minutes
    python -m experiments.unique_features --preset smoke   # seconds
    python -m experiments.unique_features --arms sgd censor --num-reference 6

A distinctive feature (a checkerboard patch, or stamped text on images large
enough to hold it) is put into exactly ONE training image, the *carrier*.
For each arm (``sgd``, ``dpsgd`` at a calibrated epsilon, ``censor``, ``clip``;
see experiments/memorisation.py) the experiment trains, together in one
vmapped step (``gujax.train.train_stacked``),

  * the target: the training set with the carrier, seed ``seed``;
  * ``num_reference`` references: the same set with the carrier left clean,
    seeds seed+1, seed+2, ... (same arm, same thresholds),

and scores memorisation on out-of-distribution images (test images of the
classes other than the carrier's) with and without the feature:
``gujax.audit.unique_features.memorisation_score`` of the per-image
KL(p(y | x + feature) || p(y | x)). It also reports how the GNQ ledger saw the
carrier: its disclosure D_j and percentile among all training examples in the
target run (and, as a control, the clean carrier's percentile in the
references), its last per-step GNQ percentile, and whether the defense
refused it (retired, or given weight 0 in some step).

Prints a table of those figures and a verdict per claim (memorised under plain
SGD? flagged by GNQ? prevented by each defense?). Writes
<out>/unique_features.json, <out>/unique_features.png (the carrier, an OOD
image with the feature, and per arm the z-score beside the carrier's D_j
percentile) and <out>/summary.txt (the printed table and verdicts).
"""
from __future__ import annotations

import dataclasses
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import gujax.data as gd  # noqa: E402
from experiments import cli, harness, memorisation, registry  # noqa: E402
from experiments.cli import option  # noqa: E402
from experiments.report import format_table  # noqa: E402
from gujax.audit.unique_features import (feature_kl, insert_patch, memorisation_score,  # noqa: E402
                                         stamp_text)

NAME = "unique_features"


@dataclasses.dataclass(frozen=True)
class UniqueFeaturesSettings(memorisation.ArmSettings):
    """The memorisation settings with arms, and the feature and its references."""
    num_reference: int = option(6, "reference models, trained with the carrier left clean "
                                   "(>= 2: the score needs a spread)")
    feature: str = option("patch", "the unique feature: a checkerboard patch or stamped text",
                          choices=("patch", "text"))
    patch_size: int = option(3, "side of the checkerboard patch, pixels")
    text: str = option("AB", "the stamped text (feature text)")
    feature_row: int = option(0, "top row of the feature")
    feature_col: int = option(0, "left column of the feature")

    def check(self) -> None:
        super().check()
        if self.num_reference < 2:
            raise ValueError("num_reference must be >= 2 (the score needs a spread)")


_DEFAULT = UniqueFeaturesSettings(
    dataset="digits", seed=0, num_train=512, num_test=256,
    model="mlp", hidden=(64,), epochs=30, batch_size=64, learning_rate=0.1, momentum=0.9,
    method="ghost", arms=("sgd", "dpsgd", "censor", "clip"), num_reference=6,
    feature="patch", patch_size=3, text="AB", feature_row=0, feature_col=0,
    reg=1e-2, censor_quantile=0.9, clip_quantile=0.5,
    target_epsilon=8.0, delta=1e-5, clip_norm=1.0, progress=True,
    note="512 digits, MLP 64, 30 epochs, a checkerboard patch on one image, 6 references "
         "per arm; a few minutes on 2 CPU cores.")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(_DEFAULT, num_train=128, num_test=64, hidden=(16,), epochs=2,
                              batch_size=32, num_reference=2, arms=("sgd", "dpsgd", "censor"),
                              progress=False,
                              note="128 digits, 2 epochs, 2 references; a plumbing check in "
                                   "seconds, not a measurement."),
)
EXPERIMENT = cli.Experiment(NAME, __doc__, PRESETS)
# A memorisation z-score above this counts as "the target reacts to the
# feature more than the references do" in the printed verdicts.
Z_MEMORISED = 2.0
# The carrier counts as flagged by GNQ when its D_j is at or above this
# percentile of the training set.
FLAG_PERCENTILE = 90.0


def checkerboard(size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8 checkerboard of 255 and 0 (top-left 255)."""
    rows, cols = np.indices((size, size))
    board = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
    return np.repeat(board[..., None], channels, axis=-1)


def add_feature(images: np.ndarray, settings: UniqueFeaturesSettings) -> np.ndarray:
    """The feature on every image of (..., H, W, C) uint8 ``images``."""
    position = (settings.feature_row, settings.feature_col)
    if settings.feature == "patch":
        return insert_patch(images, checkerboard(settings.patch_size, images.shape[-1]),
                            position)
    if settings.feature == "text":
        return stamp_text(images, settings.text, position=position)
    raise ValueError(f"feature must be 'patch' or 'text', got {settings.feature!r}")


def carrier_ledger(book, carrier: int) -> dict:
    """How the GNQ ledger ``book`` of one run saw example ``carrier``.

    Rank 1 = the largest D_j of the run; percentiles are over the examples
    the run scored at least once (``memorisation.percentile_rank``). ``refused_steps``
    = steps in which the carrier was in the batch but given weight 0; the
    defense *refused* it when that is > 0 or it was retired.
    """
    scored = np.asarray(book.times_scored) > 0
    index = int(np.sum(scored[:carrier]))  # carrier's position among scored examples
    disclosure = np.asarray(book.disclosure)[scored]
    last_gnq = np.nan_to_num(np.asarray(book.last_gnq)[scored], nan=0.0)
    times_scored = int(np.asarray(book.times_scored)[carrier])
    steps_used = int(np.asarray(book.steps_used)[carrier])
    retired = bool(np.asarray(book.retired)[carrier])
    used = np.maximum(np.asarray(book.steps_used), 1)
    return {
        "disclosure_nats": float(disclosure[index]),
        "disclosure_rank": int(1 + np.sum(disclosure > disclosure[index])),
        "num_ranked": int(len(disclosure)),
        "disclosure_percentile": memorisation.percentile_rank(disclosure, index),
        "mean_gnq": float(np.asarray(book.cumulative_gnq)[carrier] / used[carrier]),
        "last_gnq": float(last_gnq[index]),
        "last_gnq_percentile": memorisation.percentile_rank(last_gnq, index),
        "median_disclosure_nats": float(np.median(disclosure)),
        "retired": retired,
        "times_scored": times_scored,
        "steps_used": steps_used,
        "refused_steps": times_scored - steps_used,
        "refused": retired or times_scored > steps_used,
        "num_retired": int(np.sum(np.asarray(book.retired))),
    }


def label_shift(model, params, ood, ood_with, label: int) -> float:
    """Mean increase of p(label) on the OOD images (uint8) when the feature is
    added: how far the feature alone pulls predictions to the carrier's class."""
    def prob(images):
        logits = memorisation.apply_fn(model)(params, gd.to_float(images))
        return np.asarray(jax.nn.softmax(logits, axis=-1))[:, label]
    return float(np.mean(prob(ood_with) - prob(ood)))


def run_arm(arm, settings: UniqueFeaturesSettings, model, data: dict) -> tuple[dict, object]:
    """Target and references of one arm, trained together; returns (record,
    the target's ledger)."""
    fapply = memorisation.apply_fn(model)
    ood, ood_with = gd.to_float(data["ood"]), gd.to_float(data["ood_with"])
    carrier, label = data["carrier"], int(data["labels"][data["carrier"]])
    images = [data["featured"]] + [data["clean"]] * settings.num_reference
    models = harness.train_arm(arm, settings, model, [(x, data["labels"]) for x in images],
                               [settings.seed + r for r in range(len(images))])
    kls, ledgers, shifts, accuracies = [], [], [], []
    for trained in models:
        kls.append(np.asarray(feature_kl(fapply, trained.params, ood, ood_with)))
        ledgers.append(carrier_ledger(trained.ledger, carrier))
        shifts.append(label_shift(model, trained.params, data["ood"], data["ood_with"], label))
        accuracies.append(memorisation.accuracy(model, trained.params, data["test_images"],
                                                data["test_labels"]))
    score = memorisation_score(kls[0], np.stack(kls[1:]))
    record = {
        "memorisation": score,
        "target_carrier": ledgers[0],
        "reference_carrier_disclosure_percentile": [r["disclosure_percentile"]
                                                    for r in ledgers[1:]],
        "target_label_shift": shifts[0],
        "reference_label_shift": shifts[1:],
        "target_test_accuracy": accuracies[0],
        "reference_test_accuracy": accuracies[1:],
        "reference_mean_kls": [float(k.mean()) for k in kls[1:]],
    }
    return record, models[0].ledger


def plot(path: str, data: dict, arms: dict) -> None:
    """The carrier with its feature, an OOD image with it, and per arm the
    memorisation z-score beside the carrier's disclosure percentile."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8),
                             gridspec_kw={"width_ratios": [1, 1, 2.6]})
    for ax, image, title in ((axes[0], data["featured"][data["carrier"]],
                              f"carrier (label {data['labels'][data['carrier']]})"),
                             (axes[1], data["ood_with"][0], "OOD image + feature")):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                  vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    names = list(arms)
    x = np.arange(len(names))
    z = [arms[a]["memorisation"]["z_score"] for a in names]
    z = [v if np.isfinite(v) else np.nan for v in z]
    ax = axes[2]
    ax.bar(x - 0.2, z, 0.4, color="tab:blue", label="memorisation z-score")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("z-score (target vs references)", color="tab:blue")
    ax.set_xticks(x, names)
    twin = ax.twinx()
    twin.bar(x + 0.2, [arms[a]["target_carrier"]["disclosure_percentile"] for a in names],
             0.4, color="tab:orange", label="carrier D_j percentile")
    twin.set_ylim(0, 100)
    twin.set_ylabel("carrier disclosure percentile", color="tab:orange")
    for i, a in enumerate(names):
        carrier = arms[a]["target_carrier"]
        if carrier["refused"]:
            twin.annotate("retired" if carrier["retired"] else "refused", (x[i] + 0.2, 95),
                          ha="center", fontsize=8)
    ax.set_title("unique feature: memorisation and GNQ rank per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_data(settings: UniqueFeaturesSettings) -> dict:
    """Training set with/without the feature on the carrier, OOD images, test set."""
    train_set, test_set = memorisation.load_subsets(settings)
    rng = np.random.default_rng(settings.seed)
    carrier = int(rng.integers(len(train_set)))
    label = int(train_set.labels[carrier])
    featured = train_set.images.copy()
    featured[carrier] = add_feature(train_set.images[carrier], settings)
    ood = test_set.images[test_set.labels != label]
    if len(ood) == 0:
        raise ValueError("no test image outside the carrier's class to serve as OOD images")
    return dict(clean=train_set.images, featured=featured, labels=train_set.labels,
                ids=train_set.ids, carrier=carrier, ood=ood, ood_with=add_feature(ood, settings),
                test_images=test_set.images, test_labels=test_set.labels,
                num_classes=len(train_set.class_names))


def prepare(run: cli.Run) -> tuple[dict, object]:
    """The data (``prepare_data``) and the model, checked to take its images."""
    data = prepare_data(run.settings)
    return data, registry.build_model(run.settings, data["num_classes"],
                                     data["clean"].shape[1:])


def execute(run: cli.Run, prepared: tuple[dict, object]) -> dict:
    settings, out = run.settings, run.out
    data, model = prepared
    start = time.time()
    results, thresholds = memorisation.run_arms(
        settings, lambda text, arm: run_arm(arm, settings, model, data), model,
        data["featured"], data["labels"])
    record = memorisation.base_record(settings)
    record.update({
        "carrier_index": data["carrier"],
        "carrier_id": int(data["ids"][data["carrier"]]),
        "carrier_label": int(data["labels"][data["carrier"]]),
        "num_ood_images": int(len(data["ood"])),
        "gnq_thresholds": thresholds._asdict(),
        "dp_noise_multiplier": memorisation.dp_noise_multiplier(settings)
        if "dpsgd" in settings.arms else None,
        "arms": results,
    })
    record["claims"] = claims(results, settings)
    record["seconds"] = time.time() - start
    plot(os.path.join(out, f"{NAME}.png"), data, results)
    memorisation.write_results(out, NAME, record, title="Unique-feature memorisation",
                               table=table(results))
    return record


def main(argv=None) -> dict:
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


TABLE = [("arm", "arm", "{}"), ("test acc", "test_accuracy", "{:.3f}"),
         ("KL target", "kl_target", "{:.4f}"), ("KL refs", "kl_refs", "{}"),
         ("z", "z", "{:.2f}"), ("ratio", "ratio", "{:.2f}"), ("p", "p", "{:.2f}"),
         ("dp(label)", "shift", "{:+.3f}"), ("carrier D", "d", "{:.3f}"),
         ("D rank", "rank", "{}"), ("D pct", "pct", "{:.1f}"),
         ("D pct refs", "pct_refs", "{}"), ("refused", "refused", "{}")]


def table(arms: dict) -> str:
    rows = []
    for arm, r in arms.items():
        score, carrier = r["memorisation"], r["target_carrier"]
        rows.append({
            "arm": arm, "test_accuracy": r["target_test_accuracy"],
            "kl_target": score["target_mean_kl"],
            "kl_refs": f"{score['reference_mean_kl']:.4f}+-{score['reference_std_kl']:.4f}",
            "z": score["z_score"], "ratio": score["ratio"], "p": score["p_value"],
            "shift": r["target_label_shift"], "d": carrier["disclosure_nats"],
            "rank": f"{carrier['disclosure_rank']}/{carrier['num_ranked']}",
            "pct": carrier["disclosure_percentile"],
            "pct_refs": " ".join(f"{p:.0f}" for p in r["reference_carrier_disclosure_percentile"]),
            "refused": ("retired" if carrier["retired"] else
                        f"{carrier['refused_steps']}/{carrier['times_scored']} steps"
                        if carrier["refused"] else "no")})
    return (format_table(rows, TABLE) +
            "\nKL = mean over OOD images of KL(p(y|x+feature) || p(y|x)), nats; z, ratio, p: "
            "target vs references (memorisation_score);\ndp(label) = mean change of p(carrier "
            "label) on OOD images; carrier D = its D_j (nats), rank 1 = largest of the run; "
            "D pct refs = the clean carrier's percentile in the reference runs.")


DEFENSE_CLAIMS = {"dpsgd": "DP-SGD prevents the memorisation",
                  "censor": "The GNQ censor refuses the carrier and prevents the memorisation",
                  "clip": "GNQ clipping prevents the memorisation"}


def claims(arms: dict, settings: UniqueFeaturesSettings) -> list[dict]:
    """The papers' claims, checked against this run (see docs/memorisation.md).
    ``arms``: arm text -> record; "sgd" is plain SGD."""
    out = []
    floor = 1 / (settings.num_reference + 1)

    def memorised(arm):
        s = arms[arm]["memorisation"]
        return bool(np.isfinite(s["z_score"]) and s["z_score"] > Z_MEMORISED
                    and s["p_value"] <= floor + 1e-12)

    def evidence(arm):
        s = arms[arm]["memorisation"]
        return (f"{arm}: z = {s['z_score']:.2f}, ratio = {s['ratio']:.2f}, p = "
                f"{s['p_value']:.2f} (floor {floor:.2f}); memorised means z > {Z_MEMORISED:g} "
                f"and the target above every reference")

    if "sgd" in arms:
        out.append(memorisation.claim(
            "Plain SGD memorises a feature seen in one training image (Hartley & Tsaftaris)",
            memorised("sgd"), evidence("sgd")))
        c = arms["sgd"]["target_carrier"]
        refs = arms["sgd"]["reference_carrier_disclosure_percentile"]
        out.append(memorisation.claim(
            f"GNQ flags the carrier: its D_j is in the top {100 - FLAG_PERCENTILE:g}% of the "
            "training set under plain SGD",
            c["disclosure_percentile"] >= FLAG_PERCENTILE,
            f"carrier D_j = {c['disclosure_nats']:.3f} nats, rank {c['disclosure_rank']}/"
            f"{c['num_ranked']} (percentile {c['disclosure_percentile']:.1f}); the same image "
            f"without the feature in the references: percentiles "
            f"{', '.join(f'{p:.1f}' for p in refs)}"))
    for arm in arms:
        kind = cli.arm_kind_of(arm)
        if kind == "sgd":
            continue
        text = DEFENSE_CLAIMS[kind] + ("" if arm == kind else f" ({arm})")
        carrier = arms[arm]["target_carrier"]
        if "sgd" in arms and not memorised("sgd"):
            verdict = None
            note = "; undetermined: plain SGD did not memorise the feature in this run"
        else:
            verdict = not memorised(arm)
            if kind == "censor":
                verdict = verdict and carrier["refused"]
            note = ""
        refused = (f"; carrier retired: {carrier['retired']}, refused in "
                   f"{carrier['refused_steps']}/{carrier['times_scored']} steps")
        out.append(memorisation.claim(text, verdict, evidence(arm) + refused + note))
    return out


if __name__ == "__main__":
    main()
