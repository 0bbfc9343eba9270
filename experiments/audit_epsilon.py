"""Empirical epsilon for every arm: canary audits that put the GNQ defenses
and DP-SGD in the same units.

    python -m experiments.audit_epsilon                  # digits, ~10 min on 2 CPU cores
    python -m experiments.audit_epsilon --preset smoke   # seconds; what the tests run
    python -m experiments.audit_epsilon --preset cifar --data-dir DIR   # CIFAR-10, ScatterNet
    python -m experiments.audit_epsilon --arms sgd censor:tau=8 --copies 1 8

For each arm and each canary set (mislabelled images, noise images, dirac
pixels; the mislabelled ones also duplicated k times), ``--num-runs`` runs
train on the same base set plus the canaries each drew (a fair coin per
canary and run); ``--num-references`` more runs train on the base set alone
and give the LiRA-style scores their reference. The canary slots of all runs
are pooled (``gujax.audit.epsilon``, parallel composition) into one-run
bounds of Steinke, Nasr and Jagielski (2023) on epsilon at ``--confidence``,
for the loss score, the reference (LiRA-style) score and, for dirac
canaries, the white-box score; the best of them with Bonferroni over scores
and guess fractions. Every epsilon reported is a lower bound at the stated
confidence, at DP-SGD's delta. Canaries, membership bits and run seeds are
the same for every arm, so arms are compared on the same draws.

Outputs (``--out``, default results/audit_epsilon-<preset>):

    run.json       the experiment, the command and the settings (written first)
    results.json   {"arms": [per arm], "units": [per arm and canary set], "config": ...}
    results.csv    the units, flat;   table.md   both tables
    epsilon_vs_accuracy.png   empirical epsilon against test accuracy per method
                   family (DP-SGD's accountant epsilon beside its empirical one),
                   and epsilon against the number of copies
    scores/<arm>/<canaries>.npz   in_mask (R, n) and every score (R, n)
    arms/<arm>.json   each finished arm (summary and units): --resume keeps them
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from gujax.progress import progress_bar

from experiments import cli, registry
from experiments.cli import Settings, arm_text, option
from experiments.report import environment, finite_or_none, format_table, jsonable, write_report
from gujax import files
from gujax.arms import Arm
from gujax.audit.canaries import (KINDS, CanarySet, canary_membership, insert_canaries,
                                  make_canaries, train_canary_runs)
from gujax.audit.epsilon import (GUESS_FRACTIONS, attack_auc, best_one_run_epsilon,
                                 canary_logits, dirac_scores, canary_loss_scores, multi_run_epsilon,
                                 reference_scores)
from gujax.audit.intervals import mean_interval
from gujax.data import Dataset
from gujax.data.splits import subset


@dataclasses.dataclass(frozen=True)
class AuditSettings(Settings):
    """The shared settings plus the canaries, the runs and the audit."""
    base_size: int = option(250, "training examples every run holds (a random subset of the "
                                 "train split); the rest of the split is the canaries' source")
    population_size: int = option(0, "test examples for test accuracy (0: the whole split)")
    num_canaries: int = option(32, "canaries per canary set (each run draws each with "
                                   "probability 1/2)")
    num_runs: int = option(8, "audited runs per arm and canary set; their canary slots are "
                              "pooled into one one-run audit")
    num_references: int = option(4, "runs per arm on the base set alone: the reference of "
                                    "the LiRA-style score (>= 2)")
    canary_kinds: tuple[str, ...] = option(("mislabel", "ood", "dirac"),
                                           "canary sets, one copy each", choices=KINDS)
    duplicate_kind: str = option("mislabel", "the canary kind also duplicated --copies times",
                                 choices=KINDS)
    copies: tuple[int, ...] = option((1, 2, 4, 8), "copies k per included canary for the "
                                                   "duplicated canaries")
    confidence: float = option(0.95, "confidence of every epsilon lower bound, in (0.75, 1)")
    guess_fractions: tuple[float, ...] = option(
        GUESS_FRACTIONS, "the auditor guesses 'in' for this fraction of the highest-scoring "
                         "canary slots; Bonferroni over them")
    bootstrap_samples: int = option(200, "bootstrap resamples of the canary attack's AUC "
                                    "and of the test accuracy")
    arms: tuple[str, ...] = option(
        ("sgd", "dpsgd:eps=1", "dpsgd:eps=3", "dpsgd:eps=8", "censor:tau=8",
         "censor:tau=16", "censor:tau=32", "clip:max_step=0.1"),
        "training arms, kind[:key=value,...] (gujax.arms.parse_arm)", parse=arm_text)

    NOTES = ("Every epsilon is a lower bound at --confidence (one-run audit, Steinke et al. "
             "2023), at the delta of the dpsgd arms (--delta).",)

    def check(self) -> None:
        super().check()
        for name, minimum in (("base_size", 1), ("num_canaries", 1), ("num_runs", 1),
                              ("num_references", 2), ("bootstrap_samples", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.population_size < 0:
            raise ValueError(f"population_size must be 0 (all) or positive, got "
                             f"{self.population_size}")
        if self.num_runs * self.num_canaries < 2:
            raise ValueError("num_runs * num_canaries must be >= 2 (canary slots)")
        if self.batch_size > self.base_size:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds base_size "
                             f"({self.base_size})")
        if not self.canary_kinds or len(set(self.canary_kinds)) != len(self.canary_kinds):
            raise ValueError(f"canary_kinds must be distinct and non-empty, got "
                             f"{list(self.canary_kinds)}")
        if not self.copies or min(self.copies) < 1 or len(set(self.copies)) != len(self.copies):
            raise ValueError(f"copies must be distinct integers >= 1, got {list(self.copies)}")
        if not 0.75 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.75, 1), got {self.confidence}")
        if not self.guess_fractions or not all(0 < f <= 1 for f in self.guess_fractions):
            raise ValueError(f"guess_fractions must each be in (0, 1], got "
                             f"{list(self.guess_fractions)}")
        if self.features == "scattering" and set(self.units_kinds) != {"mislabel"}:
            raise ValueError("with --features scattering the canaries are featurised held-out "
                             "images: --canary-kinds mislabel --duplicate-kind mislabel")
        if "dirac" in self.units_kinds and self.model != "mlp":
            raise ValueError("dirac canaries are scored white-box on an MLP's first layer: "
                             "use --model mlp or leave dirac out of --canary-kinds")
        cli.check_arms(self.arms, self, by_name=True)

    @property
    def units_kinds(self) -> tuple[str, ...]:
        return tuple(self.canary_kinds) + (self.duplicate_kind,)

    def canary_sets(self) -> list[tuple[str, int]]:
        """(kind, copies) of every canary set, single copies first."""
        units = [(kind, 1) for kind in self.canary_kinds]
        units += [(self.duplicate_kind, k) for k in sorted(self.copies)
                  if (self.duplicate_kind, k) not in units]
        return units


_DEFAULT = AuditSettings(
    dataset="digits", model="mlp", hidden=(512,), epochs=60, batch_size=64,
    learning_rate=0.2, optimizer="sgd", momentum=0.0, augment=False, method="ghost",
    reg=0.1, delta=1e-5, clip_norm=1.0, seed=0, checkpoint_every=10_000,
    note="Digits preset: the comparison's MLP 64-512-10 and optimiser (60 epochs, B = 64, "
         "lr 0.2) on a 250-example base set (the size of a comparison shadow model's "
         "training set), 32 canaries per set, 8 audited runs per arm and set (256 canary "
         "slots), 4 reference runs.")

PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(
        _DEFAULT, hidden=(32,), epochs=2, batch_size=32, base_size=64, num_canaries=8,
        num_runs=2, num_references=2, canary_kinds=("mislabel", "dirac"), copies=(1, 2),
        bootstrap_samples=20, arms=("dpsgd:eps=1", "censor:tau=8"),
        note="Smoke preset: 2 runs of 3 epochs; a plumbing check, not a measurement."),
    # The CIFAR-10 protocol of experiments.cifar (cpu preset: ScatterNet +
    # linear, private standardisation, its optimiser and clip norm) on a
    # 1,000-image base set; DP-SGD at that protocol's sampling rate (0.164).
    cifar=dataclasses.replace(
        _DEFAULT, dataset="cifar10", features="scattering", model="scatter_linear",
        normalisation="private", normalisation_noise=8.0, epochs=30, batch_size=256,
        learning_rate=0.01, momentum=0.9, clip_norm=0.1, base_size=1000,
        canary_kinds=("mislabel",), copies=(1, 2, 4, 8),
        arms=("sgd", *(f"dpsgd:eps={e},batch=164,lr=1,ledger=false" for e in (1, 3, 8)),
              "censor:tau=2", "censor:tau=8", "censor:tau=32", "clip:max_step=0.1"),
        note="CIFAR-10 preset: experiments.cifar's cpu protocol (ScatterNet J=2 L=8 + "
             "linear, private standardisation with noise 8 composed into DP-SGD's epsilon, "
             "30 epochs, B 256, lr 0.01, momentum 0.9; DP-SGD clip 0.1 at sampling rate "
             "0.164, lr 1) on a 1,000-image base set; 32 mislabelled held-out canaries "
             "(1, 2, 4, 8 copies), 8 audited runs per arm and set, 4 reference runs. "
             "Needs --data-dir DIR holding CIFAR-10 in any layout gujax.data.load reads: "
             "an image folder DIR/train/<class>/<image>.png and DIR/test/... (the "
             "README's unpacked cifar10-images.tar.gz), the CIFAR-10 python batches, or "
             "a TFDS data dir."),
)
EXPERIMENT = cli.Experiment("audit_epsilon", __doc__, PRESETS, resumable=True)


# ----------------------------------------------------------------------------

class Prepared(NamedTuple):
    arms: list[Arm]
    base: Dataset
    population: Dataset
    canaries: dict[tuple[str, int], CanarySet]
    in_masks: dict[str, np.ndarray]        # per kind: (num_runs, num_canaries) bool
    model: Any


def _kind_index(kind: str) -> int:
    return KINDS.index(kind)


def prepare(run: cli.Run) -> Prepared:
    """The arms, the base set, the population, the canary sets and their
    membership bits, the model: every ``ValueError`` before any training."""
    s = run.settings
    arms = [cli.make_arm(text, s) for text in s.arms]
    train, population = registry.load_data(s, 0, s.population_size)
    if s.base_size >= len(train):
        raise ValueError(f"base_size ({s.base_size}) must leave canary sources in the "
                         f"{len(train)}-example train split")
    order = np.random.default_rng(s.seed).permutation(len(train))
    base = subset(train, np.sort(order[:s.base_size]))
    source = subset(train, np.sort(order[s.base_size:]))
    model = registry.build_model(s, len(train.class_names), train.images.shape[1:])
    canaries, in_masks = {}, {}
    for kind, copies in s.canary_sets():
        # One draw per kind, whatever the copies: the duplicated sets hold the
        # same canaries with the same bits, so k is the only difference.
        seed = s.seed * 1000 + _kind_index(kind)
        canaries[kind, copies] = make_canaries(kind, source=source, num=s.num_canaries,
                                               seed=seed, copies=copies, reference=base)
        in_masks[kind] = canary_membership(s.num_canaries, s.num_runs, seed + 500)
    for arm in arms:
        if (arm.batch_size or s.batch_size) > s.base_size:
            raise ValueError(f"arm {arm.name!r} trains with batch {arm.batch_size}, more than "
                             f"base_size ({s.base_size})")
    return Prepared(arms, base, population, canaries, in_masks, model)


def _seeds(settings: AuditSettings, unit: int, count: int) -> list[int]:
    """Distinct run seeds per (run seed, unit, run); the same for every arm."""
    return [settings.seed * 100_003 + unit * 1009 + r for r in range(count)]


def _accuracy(model, params_list, population: Dataset, settings: AuditSettings) -> dict:
    """Mean test accuracy of the runs and its crossed-bootstrap interval
    (over runs and test examples, ``gujax.audit.intervals.mean_interval``)."""
    logits = canary_logits(model, params_list, population.images)
    correct = np.argmax(logits, -1) == population.labels        # (runs, test examples)
    low, high = mean_interval(correct, num_resamples=settings.bootstrap_samples,
                              confidence=settings.confidence, seed=settings.seed)
    return {"test_accuracy": float(correct.mean()), "test_accuracy_low": float(low),
            "test_accuracy_high": float(high)}


def audit_unit(arm: Arm, settings: AuditSettings, prepared: Prepared, key: tuple[str, int],
               unit: int, reference_logits: dict) -> tuple[dict, dict]:
    """Train the audited runs of ``arm`` on one canary set and audit them:
    (the unit's results row, its scores)."""
    canaries = prepared.canaries[key]
    in_mask = prepared.in_masks[key[0]]
    base = prepared.base
    sets, rows = [], []
    for bits in in_mask:
        images, labels, canary_of_row = insert_canaries(base.images, base.labels, canaries,
                                                        bits)
        sets.append((images, labels))
        rows.append(canary_of_row)
    start = time.perf_counter()
    runs = train_canary_runs(arm, model=prepared.model, config=cli.train_config(settings),
                             sets=sets, seeds=_seeds(settings, unit, len(sets)),
                             method=settings.method)
    wall = time.perf_counter() - start
    params = [r.params for r in runs]
    logits = canary_logits(prepared.model, params, canaries.images)
    scores = {"loss": canary_loss_scores(logits, canaries.labels),
              "lira": reference_scores(logits, reference_logits[canaries.kind],
                                       canaries.labels)}
    if canaries.kind == "dirac":
        scores["whitebox"] = dirac_scores(prepared.model, [r.init_params for r in runs],
                                          params, canaries)
    # The score fixed in advance for the multi-run bound and the AUC: the
    # white-box one where there is one, else the reference-calibrated one.
    primary = "whitebox" if "whitebox" in scores else "lira"
    audit = dict(delta=settings.delta, confidence=settings.confidence,
                 guess_fractions=settings.guess_fractions)
    per_score = {name: best_one_run_epsilon({name: (v, in_mask)}, **audit)
                 for name, v in scores.items()}
    tests = {name: (v, in_mask) for name, v in scores.items()}
    best = best_one_run_epsilon(tests, **audit)
    best_fdp = best_one_run_epsilon(tests, method="fdp", **audit)
    # What a perfect attack (scores = the bits) would reach with these slots
    # and this Bonferroni correction: the most the audit can show.
    ceiling = best_one_run_epsilon({name: (in_mask, in_mask) for name in scores}, **audit)
    auc, auc_lo, auc_hi = attack_auc(scores[primary], in_mask,
                                     bootstrap_samples=settings.bootstrap_samples,
                                     seed=settings.seed, confidence=settings.confidence)
    canary_rows = [r >= 0 for r in rows]
    row = {
        "arm": arm.name, "kind": arm.kind, "canaries": canaries.name,
        "canary_kind": canaries.kind, "copies": canaries.copies,
        "canary_slots": int(in_mask.size), "canaries_in": int(in_mask.sum()),
        **_accuracy(prepared.model, params, prepared.population, settings),
        "epsilon_theory": finite_or_none(max(r.epsilon for r in runs))
        if arm.kind == "dpsgd" else None,
        **{f"eps_{name}": b.epsilon for name, b in per_score.items()},
        "eps_best": best.epsilon, "eps_best_score": best.test,
        "eps_best_guesses": best.num_guesses, "eps_best_correct": best.num_correct,
        "eps_best_fdp": best_fdp.epsilon, "eps_ceiling": ceiling.epsilon,
        "eps_multi_run": multi_run_epsilon(scores[primary], in_mask, delta=settings.delta,
                                           confidence=settings.confidence),
        "primary_score": primary, "auc": auc, "auc_low": auc_lo, "auc_high": auc_hi,
        "canary_retired_fraction": _mean_over(runs, canary_rows, "retired"),
        "canary_disclosure_mean_nats": _mean_over(runs, canary_rows, "disclosure"),
        "base_disclosure_mean_nats": _mean_over(runs, [~c for c in canary_rows],
                                                "disclosure"),
        "wall_seconds": wall,
    }
    if row["epsilon_theory"] is not None and canaries.copies == 1:
        row["exceeds_theory"] = bool(best.epsilon > row["epsilon_theory"])
    return row, {"in_mask": in_mask, **scores}


def _mean_over(runs, masks, field: str) -> float | None:
    values = [getattr(r, field) for r in runs]
    if any(v is None for v in values):
        return None
    picked = np.concatenate([np.asarray(v, np.float64)[m] for v, m in zip(values, masks)])
    return finite_or_none(picked.mean()) if picked.size else None


def audit_canary_arm(arm: Arm, settings: AuditSettings, prepared: Prepared, out: str
              ) -> tuple[dict, list[dict]]:
    """Every canary set's unit for ``arm``, and the arm's summary row."""
    start = time.perf_counter()
    references = train_canary_runs(
        arm, model=prepared.model, config=cli.train_config(settings),
        sets=[(prepared.base.images, prepared.base.labels)] * settings.num_references,
        seeds=_seeds(settings, 0, settings.num_references), method=settings.method)
    ref_params = [r.params for r in references]
    kinds = {kind for kind, _ in prepared.canaries}
    # The copies of a kind share its canaries: any of its sets serves.
    images = {kind: c.images for (kind, _), c in prepared.canaries.items()}
    reference_logits = {kind: canary_logits(prepared.model, ref_params, images[kind])
                        for kind in kinds}
    units, all_tests = [], {}
    folder = os.path.join(out, "scores", arm.slug)
    os.makedirs(folder, exist_ok=True)
    for i, key in enumerate(settings.canary_sets(), start=1):
        row, scores = audit_unit(arm, settings, prepared, key, i, reference_logits)
        units.append(row)
        name = prepared.canaries[key].name
        files.save_npz(os.path.join(folder, f"{name.replace(' ', '_')}.npz"), **scores)
        if key[1] == 1:
            all_tests.update({f"{name}/{s}": (v, scores["in_mask"])
                              for s, v in scores.items() if s != "in_mask"})
    # Over every single-copy set and score at once (Bonferroni over all).
    any_kind = best_one_run_epsilon(all_tests, delta=settings.delta,
                                    confidence=settings.confidence,
                                    guess_fractions=settings.guess_fractions)
    summary = {
        "arm": arm.name, "kind": arm.kind,
        **_accuracy(prepared.model, ref_params, prepared.population, settings),
        "epsilon_theory": finite_or_none(references[0].epsilon)
        if arm.kind == "dpsgd" else None,
        "eps_any": any_kind.epsilon, "eps_any_test": any_kind.test,
        "eps_any_ceiling": best_one_run_epsilon(
            {name: (bits, bits) for name, (_, bits) in all_tests.items()},
            delta=settings.delta, confidence=settings.confidence,
            guess_fractions=settings.guess_fractions).epsilon,
        **{f"eps_{u['canaries'].replace(' ', '_')}": u["eps_best"] for u in units},
        "canary_retired_fraction": units[0]["canary_retired_fraction"],
        "arm_spec": arm.to_json(), "wall_seconds": time.perf_counter() - start,
    }
    return summary, units


def _eps_columns(settings: AuditSettings):
    names = [f"{kind}" if c == 1 else f"{kind} x{c}" for kind, c in settings.canary_sets()]
    return tuple((f"eps {n}", f"eps_{n.replace(' ', '_')}", "{:.2f}") for n in names)


UNIT_COLUMNS = (
    ("arm", "arm", "{}"), ("canaries", "canaries", "{}"), ("test acc", "test_accuracy", "{:.3f}"),
    ("acc low", "test_accuracy_low", "{:.3f}"), ("acc high", "test_accuracy_high", "{:.3f}"),
    ("eps loss", "eps_loss", "{:.2f}"), ("eps lira", "eps_lira", "{:.2f}"),
    ("eps white-box", "eps_whitebox", "{:.2f}"), ("eps best", "eps_best", "{:.2f}"),
    ("guesses", "eps_best_guesses", "{}"), ("correct", "eps_best_correct", "{}"),
    ("eps ceiling", "eps_ceiling", "{:.2f}"), ("eps f-DP", "eps_best_fdp", "{:.2f}"),
    ("eps multi-run", "eps_multi_run", "{:.2f}"),
    ("AUC", "auc", "{:.3f}"), ("AUC low", "auc_low", "{:.3f}"), ("AUC high", "auc_high", "{:.3f}"),
    ("canary rows retired", "canary_retired_fraction", "{:.2f}"),
    ("canary D mean", "canary_disclosure_mean_nats", "{:.1f}"),
    ("accountant eps", "epsilon_theory", "{:.2f}"), ("wall s", "wall_seconds", "{:.0f}"))


def markdown(arms: list[dict], units: list[dict], settings: AuditSettings) -> str:
    pct = f"{100 * settings.confidence:g} %"
    head = settings.heading(f"audit_epsilon / {settings.dataset} / {settings.preset}")
    head += [f"Every eps is a one-run lower bound (Steinke et al. 2023) at {pct} confidence "
             f"and delta = {settings.delta:g}, over {settings.num_runs} runs x "
             f"{settings.num_canaries} canaries = {settings.num_runs * settings.num_canaries} "
             "canary slots; per canary set the best of its scores (Bonferroni over scores "
             "and guess fractions); 'eps any' the best over every single-copy set and score "
             "(Bonferroni over all); 'ceiling' what a perfect attack would show with the "
             "same slots and corrections. Test accuracy of the reference runs (no canaries), "
             f"with its {pct} bootstrap interval over runs and test examples; "
             "'canary rows retired' the fraction of included canary rows a censor retired.",
             ""]
    arm_columns = (("arm", "arm", "{}"), ("test acc", "test_accuracy", "{:.3f}"),
                   ("acc low", "test_accuracy_low", "{:.3f}"),
                   ("acc high", "test_accuracy_high", "{:.3f}"),
                   ("accountant eps", "epsilon_theory", "{:.2f}"),
                   *_eps_columns(settings), ("eps any", "eps_any", "{:.2f}"),
                   ("eps any ceiling", "eps_any_ceiling", "{:.2f}"),
                   ("canary rows retired", "canary_retired_fraction", "{:.2f}"))
    body = [format_table(arms, arm_columns, markdown=True), "",
            "## Per arm and canary set", "",
            "eps multi-run: Clopper-Pearson per canary over the runs, median at half the "
            "significance; AUC of the primary score (white-box for dirac, else LiRA-style) "
            f"with its {pct} bootstrap interval.", "",
            format_table(units, UNIT_COLUMNS, markdown=True)]
    return "\n".join(head + body) + "\n"


MARKERS = {"sgd": "o", "dpsgd": "s", "censor": "^", "clip": "D"}


def plot(arms: list[dict], units: list[dict], settings: AuditSettings, path: str) -> None:
    """Left: empirical epsilon (any single-copy canary) against test
    accuracy, DP-SGD's accountant epsilon beside its empirical one. Right:
    the duplicated canaries' epsilon against the number of copies."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, row in enumerate(arms):
        color = f"C{i % 10}"
        left.plot([row["eps_any"]], [row["test_accuracy"]], MARKERS.get(row["kind"], "o"),
                  color=color, ms=8, label=row["arm"])
        if row["epsilon_theory"] is not None:
            left.plot([row["epsilon_theory"]], [row["test_accuracy"]], "s", mfc="none",
                      color=color, ms=8)
            left.plot([row["eps_any"], row["epsilon_theory"]], [row["test_accuracy"]] * 2,
                      ":", color=color, lw=1)
        dup = sorted((u["copies"], u["eps_best"]) for u in units
                     if u["arm"] == row["arm"] and u["canary_kind"] == settings.duplicate_kind)
        if dup:
            right.plot(*zip(*dup), MARKERS.get(row["kind"], "o") + "-", color=color,
                       label=row["arm"])
    left.set_xlabel(f"epsilon (filled: empirical lower bound at {settings.confidence:g}; "
                    "hollow: DP-SGD accountant)")
    left.set_ylabel("test accuracy")
    left.grid(alpha=0.3)
    right.set_xscale("log", base=2)
    right.set_xlabel(f"copies per included {settings.duplicate_kind} canary")
    right.set_ylabel("empirical epsilon lower bound")
    right.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(arms)),
               fontsize=8, frameon=False)
    fig.suptitle(f"{settings.dataset} / {settings.preset}: empirical epsilon per arm")
    fig.savefig(path, dpi=150)


def execute(run: cli.Run, prepared: Prepared) -> dict:
    settings, out = run.settings, run.out
    start = time.perf_counter()
    arms, units = [], []
    for arm in progress_bar(prepared.arms, desc="arms", disable=not settings.progress):
        # Each finished arm is kept (arms/<arm>.json): --resume skips it.
        done = os.path.join(out, "arms", f"{arm.slug}.json")
        if run.resume and os.path.exists(done):
            summary, arm_units = cli.finished_arm(
                done, f"delete {done} (that arm is then trained again)")
        else:
            summary, arm_units = audit_canary_arm(arm, settings, prepared, out)
            os.makedirs(os.path.dirname(done), exist_ok=True)
            files.write_json(done, jsonable([summary, arm_units]))
        arms.append(summary)
        units.extend(arm_units)
    config = {**settings.record(), "out": out, "base_n": len(prepared.base),
              "population_n": len(prepared.population)}
    results = {"arms": arms, "units": units, "config": config, **environment(),
               "total_wall_seconds": time.perf_counter() - start}
    write_report(out, record=results, rows=units, table=markdown(arms, units, settings))
    plot(arms, units, settings, os.path.join(out, "epsilon_vs_accuracy.png"))
    return results


def main(argv=None):
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
