"""Most-vulnerable-sample membership inference (Aerni, Zhang & Tramer 2024,
"Evaluations of machine learning privacy defenses are misleading"): every
arm attacked on its canaries, with the adaptive canary families that target
the GNQ censor's blind spot, against DP-SGD at matched test accuracy.

    python -m experiments.vulnerable                  # digits, 64 shadow models per arm
    python -m experiments.vulnerable --preset smoke   # seconds; what the tests run
    python -m experiments.vulnerable --preset cifar --data-dir DIR   # CIFAR-10, ScatterNet
    python -m experiments.vulnerable --resume --out DIR               # continue a killed run
    python -m experiments.vulnerable --resume --out DIR --arms A B    # keep A, B; report them

Protocol. A base set (``--base-size`` images of the train split) is IN in
every shadow model; the canaries follow it in the pool, and each canary
group is IN in exactly half of the ``--num-models`` models
(``gujax.audit.shadow.ShadowSpec(always_in=..., canary_groups=...)``). The
canaries are mislabelled images (a random wrong label) drawn from the train
split outside the base set, in families:

- ``mislabel``: ``--num-canaries`` single canaries;
- ``dup k`` (k in ``--copies``): ``--family-groups`` canaries, each as k
  identical rows (distinct ids), IN or OUT together;
- ``cluster k`` (k in ``--cluster-copies``): ``--family-groups`` canaries,
  each as a near-duplicate cluster of k rows (the canary and k - 1 small
  shifts plus pixel noise of it: ``gujax.audit.canaries.canary_copies``), IN
  or OUT together; each copy's gradient is explained by its neighbours in a
  batch, so its GNQ stays low while the cluster is memorised.

All families share one pool (one shadow run per arm); every group is drawn
independently. Attack: leave-one-out online LiRA (each model the target, the
other M - 1 its shadows), per-example Gaussians per query augmentation
(``--attack-augmentations``), the augmentations' log-likelihood ratios
summed; a group is scored by the mean of its copies' scores (identical for
``dup k``). Reported per arm and family: canary TPR at 0.1% and 1% FPR and
AUC with 95% crossed-bootstrap intervals (over targets and groups), the
test accuracy with its interval (over models and test images), and for the
arms with a ledger the steps that admitted the IN canary rows (per epoch),
the fraction never retired, and their mean disclosure D (nats). Each GNQ arm (censor, clip) is
matched to the most private DP-SGD arm whose accuracy interval overlaps its
own, else to the nearest in test accuracy ("matched" when the
accuracy intervals overlap), and the two compared family by family
(``gujax.audit.intervals.compare``): the GNQ arm is worse if it is worse on
any family, better only if better on every one (``overall_verdict``).

Outputs (``--out``, default results/vulnerable-<preset>):

    run.json        the experiment, the command and the settings (written first)
    results.json    {"arms": [...], "units": [per arm and family], "matches": [...],
                     "config": ..., "total_wall_seconds": ...}
    results.csv     the units, flat;   table.md   verdict table and per-family table
    tpr_vs_accuracy.png   canary TPR at 1% FPR against test accuracy, per family
    scores/<arm>.npz      group scores (M, G), membership (M, G), family of each group
    arms/<arm>.json       each finished arm: --resume keeps it (and --resume may
                          change --arms: kept arms reused, new ones trained)
    shadow/<arm>/         the shadow models (resumed model by model)

CPU budget (2 cores): the digits preset, 64 models x 60 epochs of the MLP
64-512-10 on about 1,300 rows, takes about 2-6 min per arm stacked 16 at a
time (measured: 41-118 s per arm, docs/results/vulnerable-digits). The
cifar preset (ScatterNet + linear on a 10,000-image base set plus 500
canaries and the families, 13,100 rows, 64 models, 30 epochs) trains 8
models at once in about 13.6 GB (each model holds its own copy of its
training features, ~0.7 GB; 32 at once were killed for memory on a 24 GB
machine). Measured: the censor at tau = 8 11.8 min per 8, 1.8 h for its 64
and DP-SGD at epsilon 1000 10-12 min per 8, 1.7 h (docs/results/vulnerable-cifar);
the sgd arm keeps the monitor's GNQ ledger, so it costs about what the censor
does: 17 min for its first 8 on a machine shared with a benchmark (2026-12-07).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from experiments import cli, registry
from experiments.cli import Settings, arm_text, option
from experiments.report import environment, format_interval, format_table, jsonable, \
    write_report
from gujax import files
from gujax.arms import Arm
from gujax.audit.canaries import canary_copies, mislabelled_canaries
from gujax.audit.intervals import compare, interval_order, mean_interval
from gujax.audit.shadow import (AUGMENTATIONS, ShadowSpec, attack, canary_evaluation,
                                check_shadow_run, run_shadow_models)
from gujax.data import Dataset
from gujax.data.splits import subset

CONFIDENCE = 0.95
GNQ_KINDS = ("censor", "clip")


@dataclasses.dataclass(frozen=True)
class VulnerableSettings(Settings):
    """The shared settings plus the base set, the canary families, the
    shadow models and the arms."""
    base_size: int = option(1000, "train-split images IN in every shadow model (the rest of "
                                  "the split is the canaries' source)")
    population_size: int = option(0, "test images for the test accuracy (0: the whole split)")
    num_canaries: int = option(500, "single mislabelled canaries (family 'mislabel')")
    family_groups: int = option(25, "canaries (groups) per adaptive family (dup k, cluster k)")
    copies: tuple[int, ...] = option((2, 4, 8), "k of the duplicated families 'dup k' "
                                                "(none: leave out)")
    cluster_copies: tuple[int, ...] = option((4, 8), "k of the near-duplicate families "
                                                     "'cluster k' (none: leave out)")
    cluster_shift: int = option(1, "a cluster copy's largest shift, pixels per axis")
    cluster_noise: float = option(8.0, "a cluster copy's Gaussian pixel noise (std, 0..255 "
                                       "units)")
    cluster_flip: bool = option(False, "cluster copies also flipped at random (off for digits: "
                                       "a mirrored digit is another digit)")
    num_models: int = option(64, "shadow models per arm (even; each canary group IN in "
                                 "exactly half)")
    models_at_once: int = option(16, "shadow models trained together, one step vmapped")
    query_augmentations: tuple[str, ...] = option(
        ("identity", "flip"), "queries recorded per model", choices=tuple(AUGMENTATIONS))
    attack_augmentations: tuple[str, ...] = option(
        ("identity", "flip"), "the recorded queries LiRA uses (per-example Gaussians per "
                              "augmentation, log-likelihood ratios summed)",
        choices=tuple(AUGMENTATIONS))
    bootstrap_resamples: int = option(1000, "resamples behind every 95% interval")
    population_results: str = option("", "results.json of a population-level comparison "
                                         "(experiments.digits / cifar) whose LiRA figures of "
                                         "the same arms are shown beside the canary ones")
    arms: tuple[str, ...] = option(
        ("sgd", "censor:tau=8", "clip:max_step=0.1", "dpsgd:eps=1", "dpsgd:eps=8",
         "dpsgd:eps=1000"),
        "training arms, kind[:key=value,...] (gujax.arms.parse_arm)", parse=arm_text)

    def check(self) -> None:
        super().check()
        for name, minimum in (("base_size", 1), ("num_canaries", 1), ("family_groups", 1),
                              ("num_models", 4), ("models_at_once", 1),
                              ("bootstrap_resamples", 100)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.num_models % 2:
            raise ValueError(f"num_models must be even (each canary IN in exactly half), got "
                             f"{self.num_models}")
        for name in ("copies", "cluster_copies"):
            values = getattr(self, name)
            if any(k < 2 for k in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct integers >= 2, got {list(values)}")
        if self.cluster_shift < 0 or self.cluster_noise < 0:
            raise ValueError("cluster_shift and cluster_noise must be >= 0")
        unrecorded = sorted(set(self.attack_augmentations) - set(self.query_augmentations))
        if unrecorded:
            raise ValueError(f"attack_augmentations {unrecorded} are not recorded "
                             f"(query_augmentations {list(self.query_augmentations)})")
        cli.check_arms(self.arms, self, by_name=True)

    def families(self) -> list[tuple[str, int, int, bool]]:
        """(name, groups, copies, near) of every canary family, in pool order."""
        out = [("mislabel", self.num_canaries, 1, False)]
        out += [(f"dup {k}", self.family_groups, k, False) for k in self.copies]
        out += [(f"cluster {k}", self.family_groups, k, True) for k in self.cluster_copies]
        return out


_DIGITS = VulnerableSettings(
    dataset="digits", model="mlp", hidden=(512,), epochs=60, batch_size=64,
    learning_rate=0.2, optimizer="sgd", momentum=0.0, augment=False, method="ghost",
    reg=0.1, delta=1e-5, clip_norm=1.0, seed=0, checkpoint_every=10_000,
    base_size=1000, num_canaries=100, family_groups=25, num_models=64, models_at_once=16,
    # A mirrored 8x8 digit is another digit: the flip query only adds noise.
    attack_augmentations=("identity",),
    # DP-SGD tuned for utility on a small grid (8 models; docs/results/
    # vulnerable-digits/README.md): lr 0.5 beats 0.2, 1 and 2 at eps 1000,
    # and 1 at eps 8; eps 8 is also kept at the shared lr 0.2.
    arms=("sgd", "censor:tau=8", "censor:tau=32", "clip:max_step=0.1",
          "dpsgd:eps=1", "dpsgd:eps=8", "dpsgd:eps=8,lr=0.5", "dpsgd:eps=100,lr=0.5",
          "dpsgd:eps=1000,lr=0.5"),
    note="Digits preset: MLP 64-512-10, 60 epochs, B 64, lr 0.2; base set 1,000 train "
         "digits (always IN), 100 mislabelled canaries + 25 canaries per adaptive family "
         "(dup 2/4/8, cluster 4/8) from the other 433 train digits; 64 shadow models per arm; "
         "LiRA on the identity query.")

PRESETS = cli.presets(
    default=_DIGITS,
    smoke=dataclasses.replace(
        _DIGITS, hidden=(32,), epochs=2, batch_size=32, base_size=120, num_canaries=24,
        family_groups=6, copies=(2,), cluster_copies=(3,), num_models=8, models_at_once=8,
        bootstrap_resamples=100, arms=("sgd", "censor:tau=8", "dpsgd:eps=8"),
        note="Smoke preset: 8 models of 2 epochs; a plumbing check, not a measurement."),
    cifar=dataclasses.replace(
        _DIGITS, dataset="cifar10", features="scattering", model="scatter_linear",
        normalisation="private", normalisation_noise=8.0, epochs=30, batch_size=256,
        learning_rate=0.01, momentum=0.9, clip_norm=0.1, base_size=10_000,
        num_canaries=500, family_groups=100, copies=(2, 4, 8), cluster_copies=(4, 8),
        cluster_flip=True, num_models=64, models_at_once=8,
        attack_augmentations=("identity", "flip"),
        arms=("sgd", "censor:tau=2", "censor:tau=8", "clip:max_step=0.1",
              *(f"dpsgd:eps={e},batch=164,lr=1,ledger=false" for e in (1, 3, 8, 1000)),
              # DP-SGD tuned for utility (docs/results/vulnerable-cifar/tuning): at
              # eps 1000 it reaches the censor's accuracy, so the two are compared
              # at equal accuracy rather than with DP-SGD handicapped.
              "dpsgd:eps=1000,batch=512,lr=2,ledger=false"),
        note="CIFAR-10 preset: ScatterNet J=2 L=8 + linear (experiments.cifar's cpu "
             "protocol: private standardisation, 30 epochs, B 256, lr 0.01, momentum 0.9; "
             "DP-SGD clip 0.1, batch 164, lr 1, and the tuned batch 512, lr 2); base set 10,000 train images, 500 "
             "mislabelled canaries + 100 per adaptive family, 64 shadow models, LiRA on "
             "identity + flip. Needs --data-dir. 8 models at once (~13.6 GB); each arm "
             "takes about 1.7-1.8 h on 2 cores (10-12 min per 8 models)."),
)
EXPERIMENT = cli.Experiment("vulnerable", __doc__, PRESETS, resumable=True, arms_apart=True)


# ----------------------------------------------------------------------------

class Prepared(NamedTuple):
    arms: list[Arm]
    pool: Dataset             # base rows, then the canary rows family by family
    population: Dataset
    always_in: int
    canary_groups: tuple[tuple[int, int], ...]
    group_family: np.ndarray  # (G,) family index of each canary group
    families: list[str]
    model: Any


def build_pool(base: Dataset, source: Dataset, settings: VulnerableSettings
               ) -> tuple[Dataset, tuple[tuple[int, int], ...], np.ndarray]:
    """The pool (base, then each family's canary rows), its canary group
    blocks and the family of each group. The canaries are distinct source
    images, one mislabelled draw for all families."""
    families = settings.families()
    total = sum(groups for _, groups, _, _ in families)
    canaries = mislabelled_canaries(source, total, seed=settings.seed + 17,
                                    num_classes=len(base.class_names))
    images, labels, blocks, family_of = [base.images], [base.labels], [], []
    start = 0
    for f, (_, groups, k, near) in enumerate(families):
        part = dataclasses.replace(canaries, images=canaries.images[start:start + groups],
                                   labels=canaries.labels[start:start + groups],
                                   ids=canaries.ids[start:start + groups],
                                   source_ids=canaries.source_ids[start:start + groups])
        rows_images, rows_labels = canary_copies(
            part, k, near=near, seed=settings.seed * 1000 + f, shift=settings.cluster_shift,
            noise=settings.cluster_noise, flip=settings.cluster_flip)
        images.append(rows_images.astype(base.images.dtype))
        labels.append(rows_labels)
        blocks.append((groups, k))
        family_of.append(np.full(groups, f))
        start += groups
    images = np.concatenate(images)
    # Canary rows get fresh ids after every id of the split.
    first = int(max(base.ids.max(), source.ids.max())) + 1
    ids = np.concatenate([base.ids, first + np.arange(len(images) - len(base), dtype=np.int64)])
    pool = dataclasses.replace(base, images=images, labels=np.concatenate(labels).astype(
        base.labels.dtype), ids=ids.astype(np.int64))
    return pool, tuple(blocks), np.concatenate(family_of)


def _spec(arm: Arm, settings: VulnerableSettings, prepared_model, always_in, blocks
          ) -> ShadowSpec:
    return ShadowSpec(arm, model=prepared_model, config=cli.train_config(settings),
                      num_models=settings.num_models, seed=settings.seed,
                      augmentations=tuple(settings.query_augmentations),
                      method=settings.method, always_in=always_in, canary_groups=blocks)


def _shadow_dir(out: str, arm: Arm) -> str:
    return os.path.join(out, "shadow", arm.slug)


def prepare(run: cli.Run) -> Prepared:
    """Arms, data, pool and model; every shadow run checked (a batch that
    fits, with --resume the same run) before anything is trained."""
    s = run.settings
    arms = [cli.make_arm(text, s) for text in s.arms]
    train, population = registry.load_data(s, 0, s.population_size)
    needed = sum(groups for _, groups, _, _ in s.families())
    if s.base_size + needed > len(train):
        raise ValueError(f"base_size ({s.base_size}) plus {needed} canary source images "
                         f"exceed the {len(train)}-image train split")
    order = np.random.default_rng(s.seed).permutation(len(train))
    base = subset(train, np.sort(order[:s.base_size]))
    source = subset(train, np.sort(order[s.base_size:]))
    pool, blocks, group_family = build_pool(base, source, s)
    model = registry.build_model(s, len(train.class_names), train.images.shape[1:])
    for arm in arms:
        check_shadow_run(_spec(arm, s, model, len(base), blocks), pool=pool,
                         population=population, workdir=_shadow_dir(run.out, arm),
                         resume=run.resume)
    return Prepared(arms, pool, population, len(base), blocks, group_family,
                    [name for name, *_ in s.families()], model)


def _pair(interval) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


def _ledger_fields(record, in_rows, epochs: int, has_ledger: bool) -> dict:
    fields = ("canary_admitted_fraction", "canary_admitted_step_fraction",
              "canary_used_fraction", "canary_steps_used_mean")
    if not has_ledger:
        return dict.fromkeys(fields)
    used = record.steps_used[in_rows]
    return dict(zip(fields, (float(1 - record.retired[in_rows].mean()),
                             float(used.mean() / epochs), float((used > 0).mean()),
                             float(used.mean()))))


def _disclosure_interval(record, rows: np.ndarray, boot: dict) -> list[float] | None:
    """95% interval of the mean D of the IN canary rows (crossed bootstrap
    over models and rows); None when too few rows to bootstrap."""
    try:
        return _pair(mean_interval(record.disclosure[:, rows].astype(np.float64),
                                   record.in_mask[:, rows], **boot))
    except ValueError:
        return None


def _population_rows(settings: VulnerableSettings) -> dict[str, dict]:
    if not settings.population_results:
        return {}
    saved = files.read_json(settings.population_results, "pass another --population-results")
    return {row["arm"]: row for row in saved.get("arms", [])}


def audit_vulnerable_arm(arm: Arm, settings: VulnerableSettings, prepared: Prepared, out: str,
                         resume: bool) -> tuple[dict, list[dict]]:
    """Train (resumably) and attack one arm: its summary and one unit per family."""
    start = time.perf_counter()
    spec = _spec(arm, settings, prepared.model, prepared.always_in, prepared.canary_groups)
    record = run_shadow_models(spec, pool=prepared.pool, population=prepared.population,
                               workdir=_shadow_dir(out, arm), resume=resume,
                               models_at_once=settings.models_at_once,
                               progress=settings.progress)
    audit = attack(record, augmentations=settings.attack_augmentations,
                   bootstrap_resamples=settings.bootstrap_resamples, seed=settings.seed)
    canary = audit.canary
    boot = dict(num_resamples=settings.bootstrap_resamples, confidence=CONFIDENCE,
                seed=settings.seed)
    test_correct = (np.argmax(record.population_logits[:, :, 0], -1)
                    == record.population_labels)
    accuracy = float(test_correct.mean())
    accuracy_ci = _pair(mean_interval(test_correct, **boot))
    groups = record.groups
    has_ledger = bool(np.all(np.isfinite(record.disclosure[record.in_mask])))
    units = []
    for f, family in enumerate(prepared.families):
        chosen = np.flatnonzero(prepared.group_family == f)
        scores, members = canary.scores[:, chosen], canary.is_member[:, chosen]
        evaluation, ci = canary_evaluation(scores, members, seed=settings.seed,
                                           bootstrap_resamples=settings.bootstrap_resamples)
        rows = np.isin(groups, chosen)
        in_rows = record.in_mask & rows[None]
        units.append({
            "arm": arm.name, "kind": arm.kind, "family": family,
            "groups": int(len(chosen)), "copies": int(canary.group_size[chosen[0]]),
            "test_accuracy": accuracy, "test_accuracy_ci": accuracy_ci,
            "canary_auc": evaluation.auc, "canary_auc_ci": _pair(ci.auc),
            "canary_tpr_at_0.1pct_fpr": evaluation.tpr_at(0.001),
            "canary_tpr_at_0.1pct_fpr_ci": _pair(ci.tpr_at(0.001)),
            "canary_tpr_at_1pct_fpr": evaluation.tpr_at(0.01),
            "canary_tpr_at_1pct_fpr_ci": _pair(ci.tpr_at(0.01)),
            "canary_pairs": int(members.size), "canary_pairs_in": int(members.sum()),
            # The ledger of the IN canary rows: never retired by the end, and
            # the steps that admitted them per epoch of training (1 = every
            # step the sampler put them in; sgd's value). An arm trained
            # without a ledger has none of these: None, not the zeros its
            # record holds.
            **_ledger_fields(record, in_rows, settings.epochs, has_ledger),
            "canary_disclosure_mean_nats": (float(record.disclosure[in_rows].mean())
                                            if has_ledger else None),
            "canary_disclosure_ci": (_disclosure_interval(record, rows, boot)
                                     if has_ledger else None),
        })
    base_rows = groups < 0
    population = _population_rows(settings).get(arm.name, {})
    summary = {
        "arm": arm.name, "kind": arm.kind, "arm_spec": arm.to_json(), "slug": arm.slug,
        "scores_file": f"scores/{arm.slug}.npz",
        "test_accuracy": accuracy, "test_accuracy_ci": accuracy_ci,
        "train_accuracy": float(np.mean(record.train_accuracy)),
        "epsilon": (float(np.mean(record.epsilon)) if np.all(np.isfinite(record.epsilon))
                    else None),
        "noise_multiplier": (float(np.mean(record.noise_multiplier))
                             if np.all(np.isfinite(record.noise_multiplier)) else None),
        "canary_auc": canary.evaluation.auc, "canary_auc_ci": _pair(canary.intervals.auc),
        "canary_tpr_at_0.1pct_fpr": canary.evaluation.tpr_at(0.001),
        "canary_tpr_at_0.1pct_fpr_ci": _pair(canary.intervals.tpr_at(0.001)),
        "canary_tpr_at_1pct_fpr": canary.evaluation.tpr_at(0.01),
        "canary_tpr_at_1pct_fpr_ci": _pair(canary.intervals.tpr_at(0.01)),
        "base_disclosure_mean_nats": (float(record.disclosure[:, base_rows].mean())
                                      if has_ledger else None),
        "base_admitted_fraction": (float(1 - record.retired[:, base_rows].mean())
                                   if has_ledger else None),
        **{f"population_{k}": population.get(k) for k in (
            "mia_auc", "mia_auc_ci", "mia_tpr_at_0.1pct_fpr", "mia_tpr_at_0.1pct_fpr_ci",
            "mia_tpr_at_1pct_fpr", "mia_tpr_at_1pct_fpr_ci")},
        "num_models": int(record.in_mask.shape[0]), "pool_rows": int(len(prepared.pool)),
        "always_in": prepared.always_in,
        "train_wall_seconds": float(np.sum(record.wall_seconds)),
        "wall_seconds": time.perf_counter() - start,
    }
    folder = os.path.join(out, "scores")
    os.makedirs(folder, exist_ok=True)
    files.save_npz(os.path.join(folder, f"{arm.slug}.npz"), scores=canary.scores,
                   is_member=canary.is_member, group_family=prepared.group_family,
                   group_size=canary.group_size, row_scores=audit.lira_scores,
                   in_mask=record.in_mask, groups=groups)
    return summary, units


def strongest(units: list[dict], arm: str) -> dict:
    """The family on which ``arm``'s canaries leak most (highest TPR at 1%
    FPR, then at 0.1%, then AUC)."""
    mine = [u for u in units if u["arm"] == arm]
    return max(mine, key=lambda u: (u["canary_tpr_at_1pct_fpr"],
                                    u["canary_tpr_at_0.1pct_fpr"], u["canary_auc"]))


VERDICT_WORDS = {
    "better": "dominates the matched DP-SGD on every canary family: ahead on accuracy or "
              "canary TPR@1%, behind on neither (intervals)",
    "worse": "dominated by the matched DP-SGD on some canary family: behind on accuracy or "
             "canary TPR@1%, ahead on neither (intervals)",
    "not distinguishable": "not distinguishable from the matched DP-SGD: on no family worse "
                           "or a trade-off, on some not better (intervals overlap)",
    "trade-off": "a trade-off: on some family ahead of the matched DP-SGD on one axis and "
                 "behind on the other, on none worse",
}


def verdict_words(match: dict) -> str:
    """The verdict in words, saying whether the accuracies matched."""
    words = VERDICT_WORDS[match["verdict"]]
    if not match["accuracy_matched"]:
        words += "; no DP-SGD arm within the accuracy interval"
    return words


def family_verdicts(a: dict, b: dict, units: list[dict]) -> dict[str, str]:
    """GNQ arm ``a`` against DP-SGD arm ``b`` on each canary family: the two
    arms' accuracies, then their TPR at 1% FPR on the same family."""
    theirs = {u["family"]: u for u in units if u["arm"] == b["arm"]}
    return {u["family"]: compare(a["test_accuracy_ci"], u["canary_tpr_at_1pct_fpr_ci"],
                                 b["test_accuracy_ci"],
                                 theirs[u["family"]]["canary_tpr_at_1pct_fpr_ci"])
            for u in units if u["arm"] == a["arm"]}


def overall_verdict(per_family: dict[str, str]) -> str:
    """The verdict over families. The attacker picks the family, so a defense
    is ``worse`` if it is worse on any family and ``better`` only if better on
    every one; otherwise a ``trade-off`` if some family is one, else ``not
    distinguishable``. (Comparing each arm's strongest family alone would call
    two arms that both saturate at TPR 1 on one family indistinguishable, even
    where the defense leaks more on every other family.)"""
    verdicts = set(per_family.values())
    if "worse" in verdicts:
        return "worse"
    if verdicts == {"better"}:
        return "better"
    return "trade-off" if "trade-off" in verdicts else "not distinguishable"


def matches(arms: list[dict], units: list[dict]) -> list[dict]:
    """Each GNQ arm's DP-SGD arm at matched accuracy and the verdict against
    it, per canary family and over the families (``overall_verdict``).

    The match is the most private DP-SGD arm (smallest accountant epsilon)
    whose accuracy interval overlaps the GNQ arm's: the baseline a defense
    must beat at its utility. With none overlapping, the nearest in test
    accuracy. ``also_matched`` lists every accuracy-matched DP-SGD arm with
    the verdict against it."""
    dpsgd = [a for a in arms if a["kind"] == "dpsgd"]
    out = []
    for a in arms:
        if a["kind"] not in GNQ_KINDS or not dpsgd:
            continue
        level = [b for b in dpsgd
                 if interval_order(a["test_accuracy_ci"], b["test_accuracy_ci"]) == 0]
        d = (min(level, key=lambda b: np.inf if b["epsilon"] is None else b["epsilon"])
             if level else
             min(dpsgd, key=lambda b: abs(b["test_accuracy"] - a["test_accuracy"])))
        also = [{"dpsgd": b["arm"], "epsilon": b["epsilon"],
                 "verdict": overall_verdict(family_verdicts(a, b, units))} for b in level]
        per_family = family_verdicts(a, d, units)
        out.append({
            "arm": a["arm"], "matched_dpsgd": d["arm"], "matched_epsilon": d["epsilon"],
            "accuracy_matched": interval_order(a["test_accuracy_ci"],
                                               d["test_accuracy_ci"]) == 0,
            "accuracy_gap": a["test_accuracy"] - d["test_accuracy"],
            "strongest_family": strongest(units, a["arm"])["family"],
            "strongest_family_dpsgd": strongest(units, d["arm"])["family"],
            "verdict": overall_verdict(per_family), "verdict_by_family": per_family,
            "also_matched": also,
        })
    return out


def _shown(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    return format_interval(row.get(key), row.get(f"{key}_ci"), fmt)


def markdown(arms: list[dict], units: list[dict], found: list[dict],
             settings: VulnerableSettings) -> str:
    head = settings.heading(f"vulnerable / {settings.dataset} / {settings.preset}")
    head += [f"Canary protocol: base set of {settings.base_size} always IN, each canary group "
             f"IN in exactly half of {settings.num_models} shadow models; leave-one-out "
             f"online LiRA ({'+'.join(settings.attack_augmentations)}; per-example Gaussians "
             "per augmentation, log-likelihood ratios summed), a group scored by the mean of "
             "its copies. Every figure with its 95% bootstrap interval [lo, hi]. 'strongest "
             "family': the family on which the arm's canaries leak most (TPR at 1% FPR).", ""]
    by_arm = {m["arm"]: m for m in found}
    rows = []
    for a in arms:
        worst = strongest(units, a["arm"])
        m = by_arm.get(a["arm"])
        eps = (None if m is None or m["matched_epsilon"] is None
               else f"{m['matched_epsilon']:g}")
        rows.append({
            "arm": a["arm"], "acc": _shown(a, "test_accuracy"),
            "tpr01": _shown(worst, "canary_tpr_at_0.1pct_fpr"),
            "tpr1": _shown(worst, "canary_tpr_at_1pct_fpr"),
            "family": worst["family"],
            "eps": f"{a['epsilon']:g}" if a.get("epsilon") is not None else "-",
            "match": "-" if m is None else (
                f"{m['matched_dpsgd']} (eps {eps}; accuracy "
                f"{'matched' if m['accuracy_matched'] else 'NOT matched'})"),
            "verdict": "-" if m is None else verdict_words(m)})
    verdict_columns = (("arm", "arm", "{}"), ("test acc", "acc", "{}"),
                       ("canary TPR@0.1%", "tpr01", "{}"), ("canary TPR@1%", "tpr1", "{}"),
                       ("strongest family", "family", "{}"), ("accountant eps", "eps", "{}"),
                       ("matched DP-SGD arm", "match", "{}"), ("verdict", "verdict", "{}"))
    shown_units = [{**u, "steps": (None if u["canary_steps_used_mean"] is None
                                   else u["canary_steps_used_mean"] / settings.epochs),
                    "acc": _shown(u, "test_accuracy"),
                    "tpr01": _shown(u, "canary_tpr_at_0.1pct_fpr"),
                    "tpr1": _shown(u, "canary_tpr_at_1pct_fpr"),
                    "auc": _shown(u, "canary_auc"),
                    "d": format_interval(u.get("canary_disclosure_mean_nats"),
                                         u.get("canary_disclosure_ci"), "{:.2f}")}
                   for u in units]
    unit_columns = (("arm", "arm", "{}"), ("family", "family", "{}"),
                    ("groups", "groups", "{}"), ("canary TPR@0.1%", "tpr01", "{}"),
                    ("canary TPR@1%", "tpr1", "{}"), ("canary AUC", "auc", "{}"),
                    ("steps admitted / epochs", "steps", "{:.2f}"),
                    ("never retired", "canary_admitted_fraction", "{:.3f}"),
                    ("canary D (nats)", "d", "{}"))
    arm_columns = (("arm", "arm", "{}"), ("wall s", "wall_seconds", "{:.0f}"),
                   ("base D mean", "base_disclosure_mean_nats", "{:.2f}"),
                   ("population LiRA TPR@1%", "population_mia_tpr_at_1pct_fpr", "{:.3f}"),
                   ("population LiRA AUC", "population_mia_auc", "{:.3f}"))
    also = ["The matched DP-SGD arm is the most private one whose accuracy interval "
            "overlaps the GNQ arm's. The verdict is over the families, each compared with "
            "the same family on the DP-SGD arm: worse if worse on any, better only if better "
            "on all. Per family, against the matched arm:", ""]
    also += [f"- {m['arm']}: " + "; ".join(f"{f} {v}" for f, v in m["verdict_by_family"].items())
             for m in found]
    also += ["", "Against every accuracy-matched DP-SGD arm:", ""]
    also += [f"- {m['arm']}: " + ("; ".join(f"{x['dpsgd']} (eps {x['epsilon']:g}): "
                                            f"{x['verdict']}" for x in m["also_matched"])
                                 or "none within the accuracy interval")
             for m in found]
    body = [format_table(rows, verdict_columns, markdown=True), "", *also, "",
            "## Per arm and canary family", "",
            "steps admitted / epochs: mean number of steps whose update held an IN "
            "canary row, per training epoch (about 1 without a censor: each row is sampled "
            "once an epoch); never retired: fraction of IN (model, canary row) pairs the "
            "censor had not retired by the end; canary D: mean disclosure (nats) of the IN "
            "canary rows, with its 95% interval over models and rows.", "",
            format_table(shown_units, unit_columns, markdown=True), "",
            "## Per arm", "", format_table(arms, arm_columns, markdown=True)]
    return "\n".join(head + body) + "\n"


MARKERS = {"sgd": "o", "dpsgd": "s", "censor": "^", "clip": "D"}


def plot(arms: list[dict], units: list[dict], families: list[str], path: str,
         title: str = "") -> None:
    """Canary TPR at 1% FPR against test accuracy, one panel per family, with
    both intervals; DP-SGD arms joined by a line (its privacy/utility curve)."""
    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, family in zip(axes, families):
        dp = []
        for i, a in enumerate(arms):
            u = next(u for u in units if u["arm"] == a["arm"] and u["family"] == family)
            x, y = a["test_accuracy"], u["canary_tpr_at_1pct_fpr"]
            xe = np.abs(np.array(a["test_accuracy_ci"]) - x)[:, None]
            ye = np.abs(np.array(u["canary_tpr_at_1pct_fpr_ci"]) - y)[:, None]
            ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt=MARKERS.get(a["kind"], "o"),
                        color=f"C{i % 10}", capsize=2, label=a["arm"])
            if a["kind"] == "dpsgd":
                dp.append((x, y))
        if len(dp) > 1:
            ax.plot(*zip(*sorted(dp)), ":", color="grey", lw=1)
        ax.set_title(family)
        ax.set_xlabel("test accuracy")
        ax.set_ylabel("canary TPR at 1% FPR")
        ax.grid(alpha=0.3)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(arms)),
               fontsize=8, frameon=False)
    fig.suptitle(title or "canary TPR at 1% FPR vs test accuracy (95% intervals)")
    fig.savefig(path, dpi=130)


def execute(run: cli.Run, prepared: Prepared) -> dict:
    settings, out = run.settings, run.out
    start = time.perf_counter()
    arms, units = [], []
    for arm in prepared.arms:
        done = os.path.join(out, "arms", f"{arm.slug}.json")
        if run.resume and os.path.exists(done):
            summary, arm_units = cli.finished_arm(done, f"delete {done} (that arm is then "
                                                        "attacked again from its shadow models)")
        else:
            summary, arm_units = audit_vulnerable_arm(arm, settings, prepared, out,
                                                      resume=run.resume)
            os.makedirs(os.path.dirname(done), exist_ok=True)
            files.write_json(done, jsonable([summary, arm_units]))
        arms.append(summary)
        units.extend(arm_units)
        print(f"[vulnerable] {arm.name}: test acc {_shown(summary, 'test_accuracy')}, "
              f"canary TPR@1% {_shown(summary, 'canary_tpr_at_1pct_fpr')}, "
              f"{summary['wall_seconds']:.0f} s", flush=True)
    found = matches(arms, units)
    config = {**settings.record(), "out": out, "pool_rows": len(prepared.pool),
              "always_in": prepared.always_in,
              "canary_groups": [list(b) for b in prepared.canary_groups],
              "families": prepared.families, "population_n": len(prepared.population)}
    results = {"arms": arms, "units": units, "matches": found, "config": config,
               **environment(), "total_wall_seconds": time.perf_counter() - start,
               "compute": {a["arm"]: a["wall_seconds"] for a in arms}}
    write_report(out, record=jsonable(results), rows=units,
                 table=markdown(arms, units, found, settings))
    plot(arms, units, prepared.families, os.path.join(out, "tpr_vs_accuracy.png"),
         title=f"{settings.dataset} / {settings.preset}: canary TPR at 1% FPR vs test "
               "accuracy (95% intervals)")
    return results


def main(argv=None):
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
