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
``results/<dataset>-<preset>``; a folder in use needs ``--resume`` or
``--overwrite``):

    run.json         the experiment, the command and the settings (written first)
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
from typing import Any, NamedTuple

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
from gujax.data import Dataset

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
    num_models: int = option(8, "shadow models per arm (>= 3; each is attacked with the others "
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
        "censor:tau=T, clip:max_step=S; see arms below", parse=arm_text)

    NOTES = ("Sizes: --pool-size 0 takes the whole train split as the membership pool, "
             "--population-size 0 the whole test split; a size beyond the split is an error.",)

    def check(self) -> None:
        super().check()
        for name in ("pool_size", "population_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (the whole split) or a positive size, "
                                 f"got {getattr(self, name)}")
        if self.num_models < 3:
            raise ValueError(f"num_models must be >= 3 (each model is attacked with the "
                             f"others as its shadows, and LiRA fits its IN and OUT "
                             f"Gaussians from two or more of them), got {self.num_models}")
        if self.models_at_once < 1:
            raise ValueError(f"models_at_once must be >= 1, got {self.models_at_once}")
        unrecorded = sorted(set(self.attack_augmentations) - set(self.query_augmentations))
        if unrecorded:
            raise ValueError(f"attack_augmentations {unrecorded} are not among the recorded "
                             f"query_augmentations {list(self.query_augmentations)}")
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


MARKERS = {"sgd": "o", "dpsgd": "s", "censor": "^", "clip": "D"}
# (x key, x label, chance level) of the privacy/utility panels.
PRIVACY_AXES = (("mia_tpr_at_1pct_fpr", "LiRA TPR at 1% FPR", 0.01),
                ("mia_auc", "LiRA AUC", 0.5))


def plot_privacy_utility(rows: list[dict], path: str, *, title: str = "") -> None:
    """Test accuracy (mean +- std over the models) against two LiRA
    metrics, one point per arm (marker by kind); chance marked; the arms'
    legend below the panels."""
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PRIVACY_AXES), sharey=True)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for ax, (key, label, chance) in zip(axes, PRIVACY_AXES):
        for row, color in zip(rows, colors):
            ax.errorbar([row[key]], [row["test_accuracy"]],
                        yerr=[row.get("test_accuracy_std") or 0.0], fmt=MARKERS.get(
                            row.get("kind"), "o"), color=color, ms=7, capsize=3,
                        label=row["arm"])
        ax.axvline(chance, ls="--", c="gray", lw=0.8)
        ax.annotate("chance", (chance, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=7, color="gray")
        ax.set_xlabel(f"{label} (lower = more private)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean +- std over models)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(rows)),
               fontsize=8, frameon=False)
    fig.suptitle(title or "privacy and utility per arm")
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

class Prepared(NamedTuple):
    """What a run needs before it trains: the arms, the data and the model."""
    arms: list[Arm]
    pool: Dataset
    population: Dataset
    model: Any


def _shadow_dir(out: str, arm: Arm) -> str:
    return os.path.join(out, "shadow", arm.slug)


def prepare(run: harness.Run) -> Prepared:
    """The arms, the pool and population, the model, each arm's shadow
    models checked (a batch that fits; with --resume, the same run as the one
    in --out): every ``ValueError`` before anything is trained or written."""
    settings = run.settings
    arms = [harness.make_arm(text, settings) for text in settings.arms]
    pool, population = harness.load_data(settings, settings.pool_size, settings.population_size)
    model = harness.build_model(settings, len(pool.class_names), pool.images.shape[1:])
    for arm in arms:
        harness.check_shadow_audit(
            arm, settings, pool=pool, population=population, model=model,
            num_models=settings.num_models, workdir=_shadow_dir(run.out, arm),
            query_augmentations=settings.query_augmentations, resume=run.resume)
    return Prepared(arms, pool, population, model)


def execute(run: harness.Run, prepared: Prepared) -> dict:
    """Train and attack every arm into ``run.out``; write and return the results."""
    settings, out = run.settings, run.out
    pool, population = prepared.pool, prepared.population
    os.makedirs(os.path.join(out, "per_example"), exist_ok=True)
    rows, audits, evaluations = [], {}, {}
    start = time.perf_counter()
    for arm in tqdm(prepared.arms, desc="arms", disable=not settings.progress):
        record, audit = harness.shadow_audit(
            arm, settings, pool=pool, population=population, model=prepared.model,
            num_models=settings.num_models, workdir=_shadow_dir(out, arm),
            query_augmentations=settings.query_augmentations,
            attack_augmentations=settings.attack_augmentations, resume=run.resume,
            models_at_once=settings.models_at_once)
        rows.append(summarize_arm(arm, record, audit))
        audits[arm.name] = audit
        evaluations[arm.name] = audit.evaluations["lira_online"]
        save_per_example(os.path.join(out, "per_example", f"{arm.slug}.npz"), record, audit)

    config = {**settings.record(), "out": out, "pool_n": len(pool),
              "population_n": len(population), "num_classes": len(pool.class_names)}
    results = {"arms": rows, "config": config, **environment(),
               "total_wall_seconds": time.perf_counter() - start}
    write_report(out, record=results, rows=rows,
                 table=markdown_table(rows, settings, len(pool), len(population)))
    plot_privacy_utility(rows, os.path.join(out, "privacy_utility.png"),
                         title=f"{settings.dataset} / {settings.preset}: privacy and utility "
                               f"({settings.num_models} shadow models per arm)")
    plot_roc(evaluations, path=os.path.join(out, "roc.png"),
             title="LiRA online, pooled over targets")
    plot_disclosure_grid(audits, os.path.join(out, "gnq_vs_attack.png"))
    return results


def main(argv, experiment: harness.Experiment) -> dict:
    """``python -m experiments.<experiment.name>``: parse, check, run, report
    (``harness.main``)."""
    return harness.main(argv, experiment, prepare=prepare, execute=execute)
