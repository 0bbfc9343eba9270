"""The privacy/utility comparison shared by every dataset.

For each training arm (non-private SGD, DP-SGD at several epsilons, the GNQ
censoring defense at several budgets, GNQ clipping), train M shadow models on
random halves of a data pool (``gujax.audit.shadow``), attack each in turn
with the others as shadows, and report utility, membership-inference metrics,
per-example disclosure and its relation to LiRA vulnerability.

A dataset module supplies typed presets (``ComparisonSettings``, built on
``experiments.harness.Settings``) and calls ``main``:

    PRESETS = harness.presets(default=ComparisonSettings(...), smoke=...)
    EXPERIMENT = harness.Experiment("digits", __doc__, PRESETS, resumable=True)
    main(argv, EXPERIMENT)

Every settings field is a command-line option (``--num-models 16``,
``--arms sgd dpsgd:eps=1 censor:tau=4``, ``--no-augment``); ``--help`` lists
them with each preset's value. Outputs go to ``--out`` (default
``results/<dataset>-<preset>``):

    results.json     {"arms": [one object per arm], "config": ..., "gujax_version": ...}
    results.csv      the same rows, flat
    table.md         the headline table
    privacy_utility.png, roc.png, gnq_vs_attack.png
    per_example/<arm>.npz   ids, labels, disclosure, cumulative GNQ and LiRA
                            vulnerability (N,); LiRA scores, in_mask, D (M, N)
    shadow/<arm>/    the shadow models (resumable with --resume)
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from experiments import harness
# Re-exported: experiments.stacked imports it from here.
from experiments.harness import enable_compilation_cache  # noqa: F401
from experiments.harness import Settings, arm_text, option
from experiments.report import environment, finite_or_none, format_table, write_report
from gujax.arms import Arm
from gujax.audit.plots import plot_disclosure_vs_attack, plot_roc
from gujax.audit.shadow import (AUGMENTATIONS, ShadowAudit, ShadowRecord,
                                mean_over_members)

# Keys every results.json arm object carries (the notebooks rely on them).
REQUIRED_KEYS = ("arm", "test_accuracy", "train_accuracy", "mia_auc",
                 "mia_tpr_at_0.1pct_fpr", "mia_tpr_at_1pct_fpr", "disclosure_mean_nats",
                 "disclosure_max_nats", "refused_fraction", "epsilon", "wall_seconds")


# ----------------------------------------------------------------------------
# Settings.

@dataclasses.dataclass(frozen=True)
class ComparisonSettings(Settings):
    """The comparison's settings: the shared ones (``harness.Settings``) and
    the pool, the shadow models, their queries and the arms."""
    pool_size: int = option(0, "membership pool: a random subset of the train split of this "
                               "size (0: all of it); each shadow model trains on a random half")
    population_size: int = option(0, "held-out population: a random subset of the test split "
                                     "(0: all of it); test accuracy and RMIA's reference")
    num_models: int = option(8, "shadow models per arm (>= 2; each is attacked with the others "
                                "as its shadows)")
    models_at_once: int = option(1, "shadow models trained together, one step vmapped over "
                                    "them (the same models to rounding)")
    query_augmentations: tuple[str, ...] = option(
        ("identity", "flip"), "queries of every pool example recorded per model",
        choices=tuple(AUGMENTATIONS))
    attack_augmentations: tuple[str, ...] = option(
        ("identity",), "the recorded queries the attacks use", choices=tuple(AUGMENTATIONS))
    arms: tuple[str, ...] = option(
        ("sgd", "dpsgd:eps=3", "censor:tau=8", "clip:max_step=0.1"),
        "training arms, kind[:key=value,...] (gujax.arms.parse_arm): sgd, dpsgd:eps=E, "
        "censor:tau=T, clip:max_step=S", parse=arm_text)
    note: str = option("", "what the preset measures or reduces, printed above the table")

    def check(self) -> None:
        harness.check_arms(self.arms, self, by_name=True)


# ----------------------------------------------------------------------------
# One arm's row of the results.

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
        "mia_tpr_at_0.1pct_fpr": lira.tpr_at(0.001),
        "mia_tpr_at_1pct_fpr": lira.tpr_at(0.01),
        "mia_balanced_accuracy": lira.balanced_accuracy,
    }
    for name, evaluation in audit.evaluations.items():
        if name == "lira_online":
            continue
        row[f"{name}_auc"] = evaluation.auc
        row[f"{name}_tpr_at_0.1pct_fpr"] = evaluation.tpr_at(0.001)
        row[f"{name}_tpr_at_1pct_fpr"] = evaluation.tpr_at(0.01)
    relation = audit.disclosure_vs_vulnerability
    row.update({
        "disclosure_mean_nats": float(np.mean(d)),
        "disclosure_median_nats": float(np.median(d)),
        "disclosure_max_nats": float(np.max(d)),
        "refused_fraction": float(np.mean(record.retired[members])),
        "unused_fraction": float(np.mean(record.steps_used[members] == 0)),
        "epsilon": finite_or_none(np.mean(record.epsilon)),
        "noise_multiplier": finite_or_none(np.mean(record.noise_multiplier)),
        "spearman_disclosure_vs_lira": finite_or_none(relation.spearman_rho),
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


def markdown_table(rows: list[dict], settings: ComparisonSettings, pool_n: int,
                   population_n: int) -> str:
    """The headline table, with the run's settings above it."""
    lines = [f"# {settings.dataset} / {settings.preset}", ""]
    if settings.note:
        lines += [settings.note, ""]
    lines += [f"{settings.num_models} shadow models per arm, model {settings.model}, "
              f"{settings.epochs} epochs, batch {settings.batch_size}, pool "
              f"{pool_n} examples, population {population_n}. "
              "MIA = LiRA online (each model the target, the others its shadows); "
              "D in nats over (model, member) pairs; refused = retired members; "
              "rho = Spearman of mean D_j against mean LiRA score of j as a member.", ""]
    return "\n".join(lines + [format_table(rows, TABLE_COLUMNS, markdown=True)]) + "\n"


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

def run(settings: ComparisonSettings, out: str, *, resume: bool = False) -> dict:
    """Run the comparison described by ``settings`` into ``out``; write and
    return the results."""
    harness.start(out, "per_example")
    pool, population = harness.load_data(settings, settings.pool_size, settings.population_size)
    model = harness.build_model(settings, len(pool.class_names))
    arms = [harness.make_arm(text, settings) for text in settings.arms]

    rows, audits, evaluations = [], {}, {}
    start = time.perf_counter()
    for arm in tqdm(arms, desc="arms", disable=not settings.progress):
        record, audit = harness.shadow_audit(
            arm, settings, pool=pool, population=population, model=model,
            num_models=settings.num_models, workdir=os.path.join(out, "shadow", arm.slug),
            query_augmentations=settings.query_augmentations,
            attack_augmentations=settings.attack_augmentations, resume=resume,
            models_at_once=settings.models_at_once)
        rows.append(summarize_arm(arm, record, audit))
        audits[arm.name] = audit
        evaluations[arm.name] = audit.evaluations["lira_online"]
        save_per_example(os.path.join(out, "per_example", f"{arm.slug}.npz"), record, audit)

    config = {**dataclasses.asdict(settings), "out": out, "pool_n": len(pool),
              "population_n": len(population), "num_classes": len(pool.class_names)}
    results = {"arms": rows, "config": config, **environment(),
               "total_wall_seconds": time.perf_counter() - start}
    write_report(out, record=results, rows=rows,
                 table=markdown_table(rows, settings, len(pool), len(population)))
    plot_privacy_utility(rows, os.path.join(out, "privacy_utility.png"))
    plot_roc(evaluations, path=os.path.join(out, "roc.png"),
             title="LiRA online, pooled over targets")
    plot_disclosure_grid(audits, os.path.join(out, "gnq_vs_attack.png"))
    return results


def main(argv, experiment: harness.Experiment) -> dict:
    """``python -m experiments.<experiment.name>``: parse, run, report."""
    command = harness.parse_command_line(argv, experiment)
    return run(command.settings, command.out, resume=command.resume)
