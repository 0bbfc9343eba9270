"""The privacy/utility comparison shared by every dataset.

For each training arm (non-private SGD, DP-SGD at several epsilons, the GNQ
censoring defense at several budgets, GNQ clipping), train M shadow models on
random halves of a data pool (``gujax.audit.shadow``), attack each in turn
with the others as shadows, and report utility, membership-inference metrics,
per-example disclosure and its relation to LiRA vulnerability.

A dataset module supplies presets and calls ``main``:

    PRESETS = {"default": {...}, "smoke": {...}}
    main(argv, dataset="digits", presets=PRESETS)

Every preset key becomes a command-line option (``--num-models 16``,
``--arms sgd dpsgd:eps=1 censor:tau=4``, ``--no-augment``). Outputs go to
``--out`` (default ``results/<dataset>-<preset>``):

    results.json     {"arms": [one object per arm], "config": ..., "gujax_version": ...}
    results.csv      the same rows, flat
    table.md         the headline table
    privacy_utility.png, roc.png, gnq_vs_attack.png
    per_example/<arm>.npz   ids, labels, disclosure, cumulative GNQ and LiRA
                            vulnerability (N,); LiRA scores, in_mask, D (M, N)
    shadow/<arm>/    the shadow models (resumable with --resume)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import jax
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import gujax
from gujax.arms import Arm, parse_arm
from gujax.audit.plots import plot_disclosure_vs_attack, plot_roc
from gujax.audit.shadow import ShadowAudit, ShadowRecord, audit_arm, mean_over_members
from gujax.data import default_cache_dir, load, random_crop_flip, random_subset
from gujax.models import MLP, SmallCNN, WideResNet
from gujax.train import TrainConfig

# Keys every results.json arm object carries (the notebooks rely on them).
REQUIRED_KEYS = ("arm", "test_accuracy", "train_accuracy", "mia_auc",
                 "mia_tpr_at_0.1pct_fpr", "mia_tpr_at_1pct_fpr", "disclosure_mean_nats",
                 "disclosure_max_nats", "refused_fraction", "epsilon", "wall_seconds")


# ----------------------------------------------------------------------------
# Settings: preset values, overridden from the command line.

def build_parser(dataset: str, presets: dict[str, dict], default_preset: str = "default"
                 ) -> argparse.ArgumentParser:
    """One option per preset key; its type is that of the default preset's value."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}",
        description=f"Privacy/utility comparison of training arms on {dataset}.")
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset)
    parser.add_argument("--out", default=None,
                        help="output folder (default results/<dataset>-<preset>)")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished shadow models in --out (default: start over)")
    parser.add_argument("--data-dir", default=None,
                        help="local data (image folder, CIFAR python batches or TFDS dir)")
    examples: dict = {}
    for preset in presets.values():
        for key, value in preset.items():
            examples.setdefault(key, value)
    for key, value in examples.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction,
                                default=None)
        elif isinstance(value, (list, tuple)):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, dest=key, nargs="+", type=kind, default=None)
        else:
            parser.add_argument(flag, dest=key, type=type(value), default=None)
    return parser


def settings_from_args(args: argparse.Namespace, dataset: str, presets: dict) -> dict:
    """The chosen preset with every option given on the command line applied."""
    settings = dict(presets[args.preset])
    for key in list(vars(args)):
        value = getattr(args, key)
        if key in ("preset", "out", "resume", "data_dir"):
            continue
        if value is not None:
            settings[key] = value
    settings.update(dataset=dataset, preset=args.preset, data_dir=args.data_dir,
                    out=args.out or os.path.join("results", f"{dataset}-{args.preset}"))
    return settings


def build_model(settings: dict):
    """The Flax classifier named by ``settings["model"]``."""
    name = settings["model"]
    classes = settings["num_classes"]
    if name == "mlp":
        return MLP(hidden=tuple(settings["hidden"]), num_classes=classes)
    if name == "smallcnn":
        return SmallCNN(num_classes=classes, widths=tuple(settings["widths"]))
    if name == "wrn":
        return WideResNet(depth=settings["depth"], width=settings["width"], num_classes=classes)
    raise ValueError(f"model must be 'mlp', 'smallcnn' or 'wrn', got {name!r}")


def load_data(settings: dict):
    """(pool, population): a random subset of the train split (``pool_size``,
    0 = all) and of the test split (``population_size``, 0 = all)."""
    train = load(settings["dataset"], "train", data_dir=settings["data_dir"])
    test = load(settings["dataset"], "test", data_dir=settings["data_dir"])

    def take(data, size, seed):
        if size <= 0 or size >= len(data):
            return data
        return random_subset(data, size, seed)

    return (take(train, settings["pool_size"], settings["seed"]),
            take(test, settings["population_size"], settings["seed"] + 1))


def enable_compilation_cache(path: str) -> None:
    """Persist compiled steps: every shadow model of an arm has the same step
    (same shapes), so only its first model pays for compilation."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------
# One arm's row of the results.

def _number(x):
    """float, or None for NaN (JSON null)."""
    x = float(x)
    return None if math.isnan(x) else x


def summarize_arm(arm: Arm, record: ShadowRecord, audit: ShadowAudit) -> dict:
    """The results.json object of one arm (means over the M models)."""
    members = record.in_mask
    d = record.disclosure[members].astype(np.float64)
    lira = audit.evaluations["lira_online"]
    row = {
        "arm": arm.name, "kind": arm.kind,
        "test_accuracy": float(np.mean(record.test_accuracy)),
        "test_accuracy_std": float(np.std(record.test_accuracy)),
        "train_accuracy": float(np.mean(record.train_accuracy)),
        "mia_auc": lira.auc,
        "mia_tpr_at_0.1pct_fpr": float(lira.tpr_at_fpr[0]),
        "mia_tpr_at_1pct_fpr": float(lira.tpr_at_fpr[1]),
        "mia_balanced_accuracy": lira.balanced_accuracy,
    }
    for name, evaluation in audit.evaluations.items():
        if name == "lira_online":
            continue
        row[f"{name}_auc"] = evaluation.auc
        row[f"{name}_tpr_at_0.1pct_fpr"] = float(evaluation.tpr_at_fpr[0])
        row[f"{name}_tpr_at_1pct_fpr"] = float(evaluation.tpr_at_fpr[1])
    relation = audit.disclosure_vs_vulnerability
    row.update({
        "disclosure_mean_nats": float(np.mean(d)),
        "disclosure_median_nats": float(np.median(d)),
        "disclosure_max_nats": float(np.max(d)),
        "refused_fraction": float(np.mean(record.retired[members])),
        "unused_fraction": float(np.mean(record.steps_used[members] == 0)),
        "epsilon": _number(np.mean(record.epsilon)),
        "noise_multiplier": _number(np.mean(record.noise_multiplier)),
        "spearman_disclosure_vs_lira": _number(relation.spearman_rho),
        "precision_at_k_disclosure_vs_lira": {
            str(int(k)): float(p) for k, p in zip(relation.ks, relation.precision_at_k)},
        "chance_precision_at_k": {
            str(int(k)): float(p) for k, p in zip(relation.ks, relation.chance_precision)},
        "wall_seconds": float(np.sum(record.wall_seconds)),
        "wall_seconds_per_model": float(np.mean(record.wall_seconds)),
        "num_models": int(members.shape[0]),
        "lira_excluded_pairs": int(lira.num_excluded),
        "arm_spec": arm.to_json(),
        "per_example_file": f"per_example/{arm.slug}.npz",
        "shadow_dir": f"shadow/{arm.slug}",
    })
    return row


# ----------------------------------------------------------------------------
# Outputs.

TABLE_COLUMNS = (
    ("arm", "arm", "{}"), ("test acc", "test_accuracy", "{:.3f}"),
    ("train acc", "train_accuracy", "{:.3f}"), ("LiRA AUC", "mia_auc", "{:.3f}"),
    ("LiRA TPR@0.1%", "mia_tpr_at_0.1pct_fpr", "{:.3f}"),
    ("LiRA TPR@1%", "mia_tpr_at_1pct_fpr", "{:.3f}"),
    ("loss AUC", "loss_auc", "{:.3f}"), ("loss TPR@1%", "loss_tpr_at_1pct_fpr", "{:.3f}"),
    ("D mean", "disclosure_mean_nats", "{:.2f}"),
    ("D median", "disclosure_median_nats", "{:.2f}"),
    ("D max", "disclosure_max_nats", "{:.2f}"), ("refused", "refused_fraction", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
    ("rho(D, LiRA)", "spearman_disclosure_vs_lira", "{:.2f}"),
    ("wall s", "wall_seconds", "{:.0f}"))


def markdown_table(rows: list[dict], settings: dict) -> str:
    """The headline table, with the run's settings above it."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    lines = [f"# {settings['dataset']} / {settings['preset']}", ""]
    if settings.get("note"):
        lines += [settings["note"], ""]
    lines += [f"{settings['num_models']} shadow models per arm, model {settings['model']}, "
              f"{settings['epochs']} epochs, batch {settings['batch_size']}, pool "
              f"{settings['pool_n']} examples, population {settings['population_n']}. "
              "MIA = LiRA online (each model the target, the others its shadows); "
              "D in nats over (model, member) pairs; refused = retired members; "
              "rho = Spearman of mean D_j against mean LiRA score of j as a member.", ""]
    lines.append("| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k, f) for _, k, f in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()}
            for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)


def plot_privacy_utility(rows: list[dict], path: str) -> None:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for row in rows:
        x, y = row["mia_tpr_at_1pct_fpr"], row["test_accuracy"]
        ax.scatter([x], [y])
        ax.annotate(row["arm"], (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.axvline(0.01, ls="--", c="gray", lw=0.8, label="chance (TPR = FPR)")
    ax.set_xlabel("LiRA TPR at 1% FPR (lower = more private)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def plot_disclosure_grid(audits: dict[str, ShadowAudit], path: str) -> None:
    cols = min(4, len(audits))
    rows = math.ceil(len(audits) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows))
    for i, (name, audit) in enumerate(audits.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        try:
            plot_disclosure_vs_attack(audit.disclosure, audit.vulnerability, ax=ax,
                                      ylabel="mean LiRA score as member")
            ax.set_title(f"{name}\n{ax.get_title()}", fontsize=8)
        except ValueError as err:  # too few examples with finite values
            ax.set_title(f"{name}\n{err}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_per_example(path: str, record: ShadowRecord, audit: ShadowAudit) -> None:
    """Per pool example j (N,): id, label, mean D_j and mean cumulative GNQ over
    the models that trained on j, LiRA vulnerability; per (model, example)
    (M, N): LiRA scores, membership, D, retirement."""
    np.savez(path, ids=record.pool_ids, labels=record.pool_labels,
             disclosure=audit.disclosure, lira_vulnerability=audit.vulnerability,
             cumulative_gnq=mean_over_members(record.cumulative_gnq.astype(np.float64),
                                              record.in_mask),
             lira_scores=audit.lira_scores, in_mask=record.in_mask,
             disclosure_per_model=record.disclosure, retired=record.retired)


# ----------------------------------------------------------------------------

def run(settings: dict, *, resume: bool = False, progress: bool = True) -> dict:
    """Run the comparison described by ``settings``; write and return results."""
    out = settings["out"]
    os.makedirs(os.path.join(out, "per_example"), exist_ok=True)
    enable_compilation_cache(os.path.join(default_cache_dir(), "jax"))
    pool, population = load_data(settings)
    settings = dict(settings, pool_n=len(pool), population_n=len(population),
                    num_classes=len(pool.class_names))
    model = build_model(settings)
    config = TrainConfig(
        epochs=settings["epochs"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], optimizer=settings["optimizer"],
        momentum=settings["momentum"], seed=settings["seed"],
        augment=random_crop_flip if settings["augment"] else None,
        checkpoint_every=settings["checkpoint_every"],
        progress=settings["step_progress"])
    arms = [parse_arm(text, reg=settings["reg"], delta=settings["delta"],
                      clip_norm=settings["clip_norm"]) for text in settings["arms"]]
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"two arms have the same name: {[a.name for a in arms]}")

    rows, audits, evaluations = [], {}, {}
    start = time.perf_counter()
    for arm in tqdm(arms, desc="arms", disable=not progress):
        record, audit = audit_arm(
            arm, pool=pool, population=population, model=model, config=config,
            num_models=settings["num_models"], workdir=os.path.join(out, "shadow", arm.slug),
            seed=settings["seed"], augmentations=settings["query_augmentations"],
            attack_augmentations=settings["attack_augmentations"], resume=resume,
            method=settings["method"], models_at_once=settings["models_at_once"],
            progress=progress)
        rows.append(summarize_arm(arm, record, audit))
        audits[arm.name] = audit
        evaluations[arm.name] = audit.evaluations["lira_online"]
        save_per_example(os.path.join(out, "per_example", f"{arm.slug}.npz"), record, audit)

    results = {"arms": rows, "config": settings, "gujax_version": gujax.__version__,
               "jax_version": jax.__version__, "total_wall_seconds": time.perf_counter() - start,
               "command": " ".join(sys.argv)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_csv(rows, os.path.join(out, "results.csv"))
    table = markdown_table(rows, settings)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    plot_privacy_utility(rows, os.path.join(out, "privacy_utility.png"))
    plot_roc(evaluations, path=os.path.join(out, "roc.png"),
             title="LiRA online, pooled over targets")
    plot_disclosure_grid(audits, os.path.join(out, "gnq_vs_attack.png"))
    if progress:
        print(table)
        print(f"results in {out}")
    return results


def main(argv=None, *, dataset: str, presets: dict[str, dict],
         default_preset: str = "default") -> dict:
    parser = build_parser(dataset, presets, default_preset)
    args = parser.parse_args(argv)
    return run(settings_from_args(args, dataset, presets), resume=args.resume)
