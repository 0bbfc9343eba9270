"""The privacy/utility comparison shared by every dataset.

For each training arm (non-private SGD, DP-SGD at several epsilons, the GNQ
censoring defense at several budgets, GNQ clipping), train M shadow models on
random halves of a data pool (``gujax.audit.shadow``), attack each in turn
with the others as shadows, and report utility, membership-inference metrics,
per-example disclosure and its relation to LiRA vulnerability.

A dataset module supplies typed presets (``ComparisonSettings``, built on
``experiments.cli.Settings``) and calls ``main``:

    PRESETS = cli.presets(default=ComparisonSettings(...), smoke=...)
    EXPERIMENT = cli.Experiment("digits", __doc__, PRESETS, resumable=True)
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
                     (every accuracy and LiRA figure with a 95% bootstrap interval,
                     ``<key>_ci``; table.md and results.json's "verdicts" read
                     the GNQ arms against DP-SGD from them)
    per_example/<arm>.npz   ids, labels, disclosure, cumulative GNQ and LiRA
                            vulnerability (N,); LiRA scores, in_mask, D (M, N)
    shadow/<arm>/    the shadow models (resumable with --resume)
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
from typing import Any, Callable, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from experiments import cli, harness, registry
from experiments.cli import Settings, arm_text, option
from experiments.report import (environment, finite_or_none, format_interval, format_table,
                                write_report)
from gujax import files
from gujax.arms import ARM_KINDS, Arm
from gujax.audit.intervals import attack_intervals, compare, interval_order, mean_interval
from gujax.audit.attacks import MembershipScores
from gujax.audit.plots import TradeoffPoint, plot_disclosure_grid, plot_roc, plot_tradeoff
from gujax.audit.shadow import (AUGMENTATIONS, ShadowAudit, ShadowRecord,
                                mean_over_members)
from gujax.data import Dataset
from gujax.progress import progress_bar

# The figures with a 95% interval beside them, under "<key>_ci" ([lo, hi]).
INTERVAL_KEYS = ("test_accuracy", "train_accuracy", "mia_auc", "mia_tpr_at_0.1pct_fpr",
                 "mia_tpr_at_1pct_fpr")
# Keys every results.json arm object carries (the notebooks rely on them).
REQUIRED_KEYS = ("arm", "test_accuracy", "train_accuracy", "mia_auc",
                 "mia_tpr_at_0.1pct_fpr", "mia_tpr_at_1pct_fpr", "disclosure_mean_nats",
                 "disclosure_max_nats", "refused_fraction", "epsilon", "wall_seconds",
                 *(f"{key}_ci" for key in INTERVAL_KEYS))


# ----------------------------------------------------------------------------
# Settings.

@dataclasses.dataclass(frozen=True)
class ComparisonSettings(Settings):
    """The comparison's settings: the shared ones (``cli.Settings``) and
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
    bootstrap_resamples: int = option(
        1000, "resamples of the bootstrap behind every 95% confidence interval (over the "
              "shadow models and, independently, the examples: gujax.audit.intervals)")

    NOTES = ("Sizes: --pool-size 0 takes the whole train split as the membership pool, "
             "--population-size 0 the whole test split; a size beyond the split is an error.",
             "Rebuilding a report: --replot DIR (alone) rewrites table.md and the figures of "
             "the finished run in DIR from its results.json (roc.png and gnq_vs_attack.png "
             "also need its per_example/ files), training nothing.")

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
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be >= 100 (the 2.5% and 97.5% "
                             f"quantiles of fewer are noise), got {self.bootstrap_resamples}")
        if self.models_at_once < 1:
            raise ValueError(f"models_at_once must be >= 1, got {self.models_at_once}")
        unrecorded = sorted(set(self.attack_augmentations) - set(self.query_augmentations))
        if unrecorded:
            raise ValueError(f"attack_augmentations {unrecorded} are not among the recorded "
                             f"query_augmentations {list(self.query_augmentations)}")
        cli.check_arms(self.arms, self, by_name=True)


# ----------------------------------------------------------------------------
# One arm's row of the results.

# The confidence level of every interval.
CONFIDENCE = 0.95


def _pair(interval) -> list[float]:
    return [float(interval[0]), float(interval[1])]


def summarize_arm(arm: Arm, record: ShadowRecord, audit: ShadowAudit, *,
                  num_resamples: int = 1000, seed: int = 0) -> dict:
    """The results.json object of one arm (means over the M models).

    Beside test and train accuracy and LiRA online's AUC and TPR at 0.1% and
    1% FPR, ``<key>_ci``: the [lo, hi] 95% interval of the crossed bootstrap
    (``num_resamples`` resamples of the models and, independently, of the
    examples; ``gujax.audit.intervals``), deterministic in ``seed``.
    """
    members = record.in_mask
    d = record.disclosure[members].astype(np.float64)
    lira = audit.evaluations["lira_online"]
    boot = dict(num_resamples=num_resamples, confidence=CONFIDENCE, seed=seed)
    # Query 0 is the one the record's accuracies come from (shadow/training.py).
    test_correct = np.argmax(record.population_logits[:, :, 0], -1) == record.population_labels
    train_correct = np.argmax(record.logits[:, :, 0], -1) == record.pool_labels
    lira_ci = attack_intervals(audit.lira_scores, members, fpr_levels=(0.001, 0.01), **boot)
    row = {
        "arm": arm.name, "kind": arm.kind,
        "test_accuracy": float(np.mean(record.test_accuracy)),
        "test_accuracy_ci": _pair(mean_interval(test_correct, **boot)),
        "test_accuracy_std": float(np.std(record.test_accuracy)),
        "train_accuracy": float(np.mean(record.train_accuracy)),
        "train_accuracy_ci": _pair(mean_interval(train_correct, members, **boot)),
        "mia_auc": lira.auc,
        "mia_auc_ci": _pair(lira_ci.auc),
        "mia_tpr_at_0.1pct_fpr": lira.tpr_at(0.001),
        "mia_tpr_at_0.1pct_fpr_ci": _pair(lira_ci.tpr_at(0.001)),
        "mia_tpr_at_1pct_fpr": lira.tpr_at(0.01),
        "mia_tpr_at_1pct_fpr_ci": _pair(lira_ci.tpr_at(0.01)),
        "mia_balanced_accuracy": lira.balanced_accuracy,
    }
    for name, evaluation in audit.evaluations.items():
        if name == "lira_online":
            continue
        row[f"{name}_auc"] = evaluation.auc
        row[f"{name}_tpr_at_0.1pct_fpr"] = evaluation.tpr_at(0.001)
        row[f"{name}_tpr_at_1pct_fpr"] = evaluation.tpr_at(0.01)
    relation = audit.disclosure_vs_vulnerability
    if relation is None:       # no ledger kept (dpsgd ledger=false): no D_j, no relation
        relation = types.SimpleNamespace(spearman_rho=float("nan"), ks=(), precision_at_k=(),
                                         chance_precision=())
    measured = bool(np.all(np.isfinite(d))) and d.size > 0
    row.update({
        "disclosure_mean_nats": float(np.mean(d)) if measured else None,
        "disclosure_median_nats": float(np.median(d)) if measured else None,
        "disclosure_max_nats": float(np.max(d)) if measured else None,
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
        "confidence_level": CONFIDENCE, "bootstrap_resamples": num_resamples,
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


def _with_intervals(row: dict) -> dict:
    """``row`` with each table value that has a ``<key>_ci`` written as
    "value [lo, hi]" in its column's format."""
    shown = dict(row)
    for _, key, fmt in TABLE_COLUMNS:
        if row.get(f"{key}_ci") is not None and row.get(key) is not None:
            shown[key] = format_interval(row[key], row[f"{key}_ci"], fmt)
    return shown


def markdown_table(rows: list[dict], settings: ComparisonSettings, pool_n: int,
                   population_n: int, *, details: bool = True) -> str:
    """The headline table, with the run's settings above it and the verdicts
    read from its intervals (``verdict_text``; ``details``: with the orders
    behind each pair, as table.md has them) below it."""
    lines = settings.heading(f"{settings.dataset} / {settings.preset}")
    lines += [f"{settings.num_models} shadow models per arm, model {settings.model}, "
              f"{settings.epochs} epochs, batch {settings.batch_size}, pool "
              f"{pool_n} examples, population {population_n}. "
              "MIA = LiRA online (each model the target, the others its shadows); "
              "D in nats over (model, member) pairs; refused = retired members; "
              "rho = Spearman of mean D_j against mean LiRA score of j as a member. "
              f"[lo, hi]: {CONFIDENCE:.0%} bootstrap interval over the shadow models and "
              f"the examples ({settings.bootstrap_resamples} resamples).", ""]
    table = format_table([_with_intervals(r) for r in rows],
                         [(h, k, "{}" if any(f"{k}_ci" in r for r in rows) else f)
                          for h, k, f in TABLE_COLUMNS], markdown=True)
    return "\n".join(lines + [table, "", verdict_text(rows, details=details)]) + "\n"


# ----------------------------------------------------------------------------
# Verdicts: the GNQ arms against DP-SGD, read from the intervals.

# (key, name) of the attack figures the verdicts compare at.
VERDICT_ATTACKS = (("mia_tpr_at_1pct_fpr", "LiRA TPR at 1% FPR", "TPR@1%"),
                   ("mia_auc", "LiRA AUC", "AUC"))


def verdicts(rows: list[dict]) -> dict:
    """Each GNQ arm (censor, clip) against each DP-SGD arm of ``rows``, by
    test accuracy and each attack of ``VERDICT_ATTACKS``
    (``gujax.audit.intervals.compare`` on their ``_ci`` intervals).

    Returns {"pairs": [{"arm", "against", "attack", "verdict", "accuracy",
    "attack_order"}], "arms": {arm: {attack: summary}}, "versus_sgd": {arm:
    {attack: order}}}; "accuracy", "attack_order" and "versus_sgd" are
    +1 / 0 / -1 (the GNQ arm's interval above, overlapping, below the other
    arm's; versus_sgd: its attack interval against the sgd arm's, None
    without one). An arm's summary: "worse" if some DP-SGD arm beats it (the
    arm lies below DP-SGD's curve), else "better" if it beats one, else "not
    distinguishable" if it matches one, else "trade-off".
    """
    gnq = [r for r in rows if r.get("kind") in ARM_KINDS and ARM_KINDS[r["kind"]].defense]
    dpsgd = [r for r in rows if r.get("kind") == "dpsgd"]
    sgd = next((r for r in rows if r.get("kind") == "sgd"), None)
    pairs, arms, versus_sgd = [], {}, {}
    for row in gnq:
        arms[row["arm"]], versus_sgd[row["arm"]] = {}, {}
        for key, _, _ in VERDICT_ATTACKS:
            # An attack interval that overlaps non-private SGD's shows no
            # privacy at all: "better than DP-SGD" then means the measure is
            # too noisy to separate anything, not that the defense works.
            versus_sgd[row["arm"]][key] = (None if sgd is None else
                                           interval_order(row[f"{key}_ci"], sgd[f"{key}_ci"]))
            found = []
            for other in dpsgd:
                found.append({
                    "arm": row["arm"], "against": other["arm"], "attack": key,
                    "verdict": compare(row["test_accuracy_ci"], row[f"{key}_ci"],
                                       other["test_accuracy_ci"], other[f"{key}_ci"]),
                    "accuracy": interval_order(row["test_accuracy_ci"],
                                               other["test_accuracy_ci"]),
                    "attack_order": interval_order(row[f"{key}_ci"], other[f"{key}_ci"])})
            pairs += found
            words = {p["verdict"] for p in found}
            arms[row["arm"]][key] = next(
                (w for w in ("worse", "better", "not distinguishable") if w in words),
                "trade-off" if words else "no DP-SGD arm")
    return {"pairs": pairs, "arms": arms, "versus_sgd": versus_sgd}


_ORDER_SIGNS = {1: "+", 0: "=", -1: "-"}
_SGD_WORDS = {1: "above", 0: "overlaps", -1: "below", None: "-"}
# The short word of each verdict in the compact table.
_SHORT = {"better": "better", "worse": "worse", "not distinguishable": "same",
          "trade-off": "trade-off", "no DP-SGD arm": "-"}


def _claim_groups(found: dict, key: str) -> dict[str, list[str]]:
    summary = {arm: v[key] for arm, v in found["arms"].items()}
    below_sgd = {arm: v[key] == -1 for arm, v in found["versus_sgd"].items()}
    return {
        "supported (better than a DP-SGD arm, beaten by none, less attackable than SGD)":
            [a for a, v in summary.items() if v == "better" and below_sgd[a]],
        "better than a DP-SGD arm but not distinguishable from SGD either":
            [a for a, v in summary.items() if v == "better" and not below_sgd[a]],
        "worse (beaten by a DP-SGD arm)": [a for a, v in summary.items() if v == "worse"],
        "not distinguishable": [a for a, v in summary.items() if v == "not distinguishable"],
        "trade-off only": [a for a, v in summary.items() if v == "trade-off"]}


def verdict_text(rows: list[dict], *, details: bool = True) -> str:
    """Markdown: the GNQ arms against DP-SGD (``verdicts``), once, compactly:
    one table row per GNQ arm (its verdict by each attack of
    ``VERDICT_ATTACKS``, one short word per DP-SGD arm and attack, its
    attack interval against SGD's), the paper's claim (the GNQ defense gives
    privacy comparable to DP-SGD with better accuracy) per attack in one
    line, and with ``details`` the orders behind each pair, one line per
    arm (the intervals themselves are in the headline table)."""
    found = verdicts(rows)
    if not found["arms"] or not any(r.get("kind") == "dpsgd" for r in rows):
        return "No verdict: the run needs a GNQ arm (censor, clip) and a DP-SGD arm."
    dpsgd = [r["arm"] for r in rows if r.get("kind") == "dpsgd"]
    shorts = [short for _, _, short in VERDICT_ATTACKS]
    by_pair = {(p["arm"], p["against"], p["attack"]): p for p in found["pairs"]}
    lines = [f"## The GNQ arms against DP-SGD ({CONFIDENCE:.0%} intervals)", "",
             "Each cell reads " + " / ".join(shorts) + ". *better*: ahead (higher accuracy "
             "or lower attack success, intervals apart) on one axis and not behind on the "
             "other; *worse*: the reverse; *same*: both pairs of intervals overlap; "
             "*trade-off*: ahead on one axis, behind on the other. An arm is *worse* if some "
             "DP-SGD arm beats it, else *better* if it beats one, else *same* if it matches "
             "one. vs sgd: its attack interval below, overlapping or above SGD's.", ""]
    header = ["arm", "verdict"] + [f"vs {name}" for name in dpsgd] + ["vs sgd"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, summary in found["arms"].items():
        cells = [arm, " / ".join(f"**{_SHORT[summary[key]]}**" for key, _, _ in VERDICT_ATTACKS)]
        cells += [" / ".join(_SHORT[by_pair[(arm, other, key)]["verdict"]]
                             for key, _, _ in VERDICT_ATTACKS) for other in dpsgd]
        cells.append(" / ".join(_SGD_WORDS[found["versus_sgd"][arm][key]]
                                for key, _, _ in VERDICT_ATTACKS))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, name, _ in VERDICT_ATTACKS:
        groups = _claim_groups(found, key)
        lines.append(f"**The claim, by {name}**: " + "; ".join(
            f"{group}: {', '.join(members)}" for group, members in groups.items() if members)
            + ".")
        lines.append("")
    if details:
        lines += ["### The pairs in detail", "",
                  "The orders behind each cell above: the GNQ arm's interval against the "
                  "DP-SGD arm's, + above, = overlapping, - below (test accuracy, then each "
                  "attack); the intervals are in the table at the top.", ""]
        for arm in found["arms"]:
            parts = []
            for other in dpsgd:
                first = by_pair[(arm, other, VERDICT_ATTACKS[0][0])]
                orders = [f"acc {_ORDER_SIGNS[first['accuracy']]}"] + [
                    f"{short} {_ORDER_SIGNS[by_pair[(arm, other, key)]['attack_order']]}"
                    for key, _, short in VERDICT_ATTACKS]
                parts.append(f"vs {other}: {', '.join(orders)}")
            lines.append(f"- {arm}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------
# The privacy/utility figure.

MARKERS = {"SGD": "o", "DP-SGD": "s", "GNQ censor": "^", "GNQ clip": "D"}
# kind -> (family name, the arm_spec field the family is ordered by, its label).
FAMILIES = {"sgd": ("SGD", None, ""), "dpsgd": ("DP-SGD", "epsilon", "eps"),
            "censor": ("GNQ censor", "budget", "tau"), "clip": ("GNQ clip", "max_step", "s")}
# (x key, x label, chance level, log x) of the privacy/utility panels.
PRIVACY_AXES = (("mia_tpr_at_1pct_fpr", "LiRA TPR at 1% FPR", 0.01, True),
                ("mia_auc", "LiRA AUC", 0.5, False))


def families(rows: list[dict], key: str) -> dict[str, list[TradeoffPoint]]:
    """The points (test accuracy against ``key``, with their intervals) of
    each family of arms, ordered by epsilon, budget or cap."""
    grouped: dict[str, list[tuple[float, TradeoffPoint]]] = {}
    for row in rows:
        name, field, short = FAMILIES.get(row["kind"], (row["kind"], None, ""))
        value = row["arm_spec"].get(field) if field else None
        label = f"{short}={value:g}" if value is not None else row["arm"]
        grouped.setdefault(name, []).append((value if value is not None else 0.0, TradeoffPoint(
            label, row[key], tuple(row[f"{key}_ci"]), row["test_accuracy"],
            tuple(row["test_accuracy_ci"]))))
    return {name: [p for _, p in sorted(points, key=lambda vp: vp[0])]
            for name, points in grouped.items()}


def plot_privacy_utility(rows: list[dict], path: str, *, title: str = "") -> None:
    """Test accuracy against LiRA TPR at 1% FPR (log axis) and against LiRA
    AUC, one curve per family of arms (DP-SGD over epsilon, censor over its
    budget, clip over its cap), 95% interval error bars both ways, chance
    marked."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PRIVACY_AXES), sharey=True)
    for ax, (key, label, chance, log_x) in zip(axes, PRIVACY_AXES):
        plot_tradeoff(families(rows, key), ax, chance=chance, log_x=log_x, markers=MARKERS,
                      xlabel=f"{label} (lower = more private)",
                      ylabel=f"test accuracy ({CONFIDENCE:.0%} interval)")
    fig.suptitle(title or "privacy and utility per arm")
    fig.savefig(path, dpi=150)


def write_figures(out: str, rows: list[dict], config: dict,
                  per_example: dict[str, dict] | None = None) -> list[str]:
    """The run's figures in ``out``: privacy_utility.png from the rows and,
    given each arm's per-example arrays (arm name -> the arrays of
    ``save_per_example``), roc.png (LiRA online pooled over the targets,
    with each arm's TPR interval at 0.1% and 1% FPR) and gnq_vs_attack.png
    (one disclosure axis for every arm). Returns the files written."""
    written = [os.path.join(out, "privacy_utility.png")]
    plot_privacy_utility(rows, written[0], title=(
        f"{config['dataset']} / {config['preset']}: privacy and utility "
        f"({config['num_models']} shadow models per arm, {CONFIDENCE:.0%} bootstrap intervals)"))
    if per_example:
        levels = {0.001: "mia_tpr_at_0.1pct_fpr_ci", 0.01: "mia_tpr_at_1pct_fpr_ci"}
        by_name = {r["arm"]: r for r in rows}
        scores = {name: MembershipScores(np.asarray(a["lira_scores"], np.float64).ravel(),
                                         np.asarray(a["in_mask"], bool).ravel())
                  for name, a in per_example.items()}
        intervals = {name: {level: by_name[name][key] for level, key in levels.items()
                            if by_name.get(name, {}).get(key) is not None}
                     for name in per_example}
        written.append(os.path.join(out, "roc.png"))
        plot_roc(scores, path=written[-1], intervals=intervals,
                 title=f"LiRA online, pooled over targets ({CONFIDENCE:.0%} intervals at "
                       "0.1% and 1% FPR)")
        written.append(os.path.join(out, "gnq_vs_attack.png"))
        plot_disclosure_grid({name: (a["disclosure"], a["lira_vulnerability"])
                              for name, a in per_example.items()}, written[-1])
    return written


def save_per_example(path: str, record: ShadowRecord, audit: ShadowAudit) -> dict:
    """Per pool example j (N,): id, label, mean D_j and mean cumulative GNQ over
    the models that trained on j, LiRA vulnerability; per (model, example)
    (M, N): LiRA scores, membership, D, retirement. Returns the arrays."""
    arrays = dict(ids=record.pool_ids, labels=record.pool_labels,
                  disclosure=audit.disclosure, lira_vulnerability=audit.vulnerability,
                  cumulative_gnq=mean_over_members(record.cumulative_gnq.astype(np.float64),
                                                   record.in_mask),
                  lira_scores=audit.lira_scores, in_mask=record.in_mask,
                  disclosure_per_model=record.disclosure, retired=record.retired)
    np.savez(path, **arrays)
    return arrays


# ----------------------------------------------------------------------------

class Prepared(NamedTuple):
    """What a run needs before it trains: the arms, the data and the model."""
    arms: list[Arm]
    pool: Dataset
    population: Dataset
    model: Any


def _shadow_dir(out: str, arm: Arm) -> str:
    return os.path.join(out, "shadow", arm.slug)


def prepare(run: cli.Run) -> Prepared:
    """The arms, the pool and population, the model, each arm's shadow
    models checked (a batch that fits; with --resume, the same run as the one
    in --out): every ``ValueError`` before anything is trained or written."""
    settings = run.settings
    arms = [cli.make_arm(text, settings) for text in settings.arms]
    pool, population = registry.load_data(settings, settings.pool_size, settings.population_size)
    model = registry.build_model(settings, len(pool.class_names), pool.images.shape[1:])
    for arm in arms:
        harness.check_shadow_audit(
            arm, settings, pool=pool, population=population, model=model,
            num_models=settings.num_models, workdir=_shadow_dir(run.out, arm),
            query_augmentations=settings.query_augmentations, resume=run.resume)
    return Prepared(arms, pool, population, model)


def execute(run: cli.Run, prepared: Prepared) -> dict:
    """Train and attack every arm into ``run.out``; write and return the results."""
    settings, out = run.settings, run.out
    pool, population = prepared.pool, prepared.population
    os.makedirs(os.path.join(out, "per_example"), exist_ok=True)
    rows, per_example = [], {}
    start = time.perf_counter()
    for arm in progress_bar(prepared.arms, desc="arms", disable=not settings.progress):
        record, audit = harness.shadow_audit(
            arm, settings, pool=pool, population=population, model=prepared.model,
            num_models=settings.num_models, workdir=_shadow_dir(out, arm),
            query_augmentations=settings.query_augmentations,
            attack_augmentations=settings.attack_augmentations, resume=run.resume,
            models_at_once=settings.models_at_once)
        rows.append(summarize_arm(arm, record, audit,
                                  num_resamples=settings.bootstrap_resamples,
                                  seed=settings.seed))
        per_example[arm.name] = save_per_example(
            os.path.join(out, "per_example", f"{arm.slug}.npz"), record, audit)

    config = {**settings.record(), "out": out, "pool_n": len(pool),
              "population_n": len(population), "num_classes": len(pool.class_names)}
    results = {"arms": rows, "config": config, "verdicts": verdicts(rows), **environment(),
               "total_wall_seconds": time.perf_counter() - start}
    write_report(out, record=results, rows=rows,
                 table=markdown_table(rows, settings, len(pool), len(population)),
                 printed=markdown_table(rows, settings, len(pool), len(population),
                                        details=False))
    write_figures(out, rows, config, per_example)
    return results


# ----------------------------------------------------------------------------
# Rebuilding a finished run's report.

def _settings_of(config: dict, experiment: cli.Experiment) -> ComparisonSettings:
    """The settings a results.json "config" records (lists as tuples; the
    fields it leaves out, such as other models' settings, from the default
    preset)."""
    base = experiment.presets[experiment.default_preset]
    values = {f.name: (tuple(config[f.name]) if isinstance(config[f.name], list)
                       else config[f.name])
              for f in dataclasses.fields(base) if f.name in config}
    return dataclasses.replace(base, **values)


def replot(out: str, experiment: cli.Experiment, *,
           appendix: Callable[[dict], str] | None = None) -> dict:
    """Rebuild table.md and the figures of the finished run in ``out`` from
    its results.json (and, where present, per_example/<arm>.npz: roc.png and
    gnq_vs_attack.png), training nothing; print the compact table. For a run
    made before the figures or tables changed, or whose per-example files
    were not kept. ``appendix(results)``: markdown added to table.md (the
    cifar check). Returns the results."""
    results = files.read_json(os.path.join(out, "results.json"),
                              "it is the run's record: run the experiment again")
    rows, config = results["arms"], results["config"]
    settings = _settings_of(config, experiment)
    pool_n, population_n = config.get("pool_n", 0), config.get("population_n", 0)
    table = markdown_table(rows, settings, pool_n, population_n)
    extra = appendix(results) if appendix is not None else ""
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + extra)
    per_example = {}
    for row in rows:
        path = os.path.join(out, row.get("per_example_file", ""))
        if row.get("per_example_file") and os.path.exists(path):
            per_example[row["arm"]] = files.load_npz(path, "run the experiment again")
    if len(per_example) < len(rows):
        per_example = None                  # roc.png needs every arm
    written = write_figures(out, rows, config, per_example)
    print(markdown_table(rows, settings, pool_n, population_n, details=False) + extra)
    print(f"rebuilt in {out}: table.md, " + ", ".join(os.path.basename(p) for p in written))
    return results


def main(argv, experiment: cli.Experiment, *, execute: Callable = execute,
         appendix: Callable[[dict], str] | None = None) -> dict:
    """``python -m experiments.<experiment.name>``: parse, check, run, report
    (``cli.main``); ``--replot DIR``: ``replot`` the run in DIR."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--replot" in args:
        if len(args) != 2 or args[0] != "--replot":
            cli._fail("error: --replot takes one folder and no other option (see --help)", 2)
        try:
            return replot(args[1], experiment, appendix=appendix)
        except (OSError, files.CorruptFile, KeyError) as err:
            cli._fail(f"error: cannot rebuild {args[1]}: {err}", 2)
    return cli.main(argv, experiment, prepare=prepare, execute=execute)
