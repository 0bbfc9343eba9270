"""What the three memorisation experiments (``unique_features``, ``curvature``,
``reconstruction``) share on top of ``experiments.harness``: their settings,
the plain run whose ledger sets the GNQ budgets, model helpers, statistics,
the checked claims and the printed summary.

Arms are written as everywhere (``experiments.harness``, ``kind[:key=value]``);
each keeps a per-example disclosure ledger D_j on the same footing:

  sgd     mean gradient, ledger by ``monitor_policy`` (D_j recorded, not acted on)
  dpsgd   DP-SGD at a noise multiplier calibrated for (epsilon, delta) under
          Poisson sampling, epsilon = ``target_epsilon`` unless the arm sets
          eps=; its ledger is on the clipped gradients with the floor
          lam = sigma^2 C^2
  censor  the GNQ censor, retire policy
  clip    GNQ clipping

A censor or clip arm without a budget (``censor``, ``clip``) takes it from
quantiles of the plain ``sgd`` run's ledger (``gnq_thresholds``), because D_j
has no fixed scale (it depends on the data, the model and the number of
steps): the censor budget is the ``censor_quantile`` quantile of the plain
run's D_j (so about 1 - q of the examples would overrun it under plain
training), the clip cap the ``clip_quantile`` quantile of its mean per-step
disclosure D_j / steps_used_j. ``censor:tau=4`` or ``clip:max_step=0.01``
set them outright.

Sampling is the arm's (``Arm.sampling``): Poisson for DP-SGD (what its
accounting assumes), epoch-wise shuffling for the others.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
from scipy import stats
from gujax.progress import progress_bar

import gujax.data as gd
from experiments import cli, harness, registry
from experiments.cli import Settings, Thresholds, arm_text, option
from experiments.report import environment, write_report
from gujax.arms import dp_calibration
from gujax.transforms import propose_thresholds
from gujax.train import softmax_cross_entropy


# ----------------------------------------------------------------------------
# Settings.

@dataclasses.dataclass(frozen=True)
class MemorisationSettings(Settings):
    """The shared settings (``cli.Settings``) and what every memorisation
    experiment adds: its training and held-out subsets and DP-SGD's target."""
    num_train: int = option(512, "training examples: a random subset of the train split")
    num_test: int = option(256, "held-out examples: a random subset of the test split")
    target_epsilon: float = option(8.0, "DP-SGD's target epsilon, for the dpsgd arms that "
                                        "set no eps=")

    ARM_SETTING_FLAGS: ClassVar[dict[str, str]] = {**Settings.ARM_SETTING_FLAGS,
                                                   "epsilon": "--target-epsilon"}

    def arm_settings(self) -> dict:
        return {**super().arm_settings(), "epsilon": self.target_epsilon}

    def check(self) -> None:
        super().check()
        for name in ("num_train", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds num_train {self.num_train}")


@dataclasses.dataclass(frozen=True)
class ArmSettings(MemorisationSettings):
    """A memorisation experiment that trains arms (unique_features, curvature)."""
    arms: tuple[str, ...] = option(
        ("sgd", "dpsgd", "censor", "clip"),
        "training arms, kind[:key=value,...] (gujax.arms.parse_arm); a censor/clip arm "
        "without tau=/max_step= takes it from the plain sgd run's ledger; see arms below",
        parse=arm_text)
    censor_quantile: float = option(0.9, "a censor arm's budget: this quantile of the plain "
                                         "sgd run's D_j")
    clip_quantile: float = option(0.5, "a clip arm's per-step cap: this quantile of the plain "
                                       "sgd run's D_j / steps_used_j")

    NOTES = ("Here an arm may leave its budget out: a dpsgd arm without eps= takes "
             "--target-epsilon, a censor arm without tau= the --censor-quantile quantile of "
             "the plain sgd run's D_j, a clip arm without max_step= the --clip-quantile "
             "quantile of its per-step D_j / steps_used_j.",)

    def check(self) -> None:
        super().check()
        for name in ("censor_quantile", "clip_quantile"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        cli.check_arms(self.arms, self, by_name=False)


def load_subsets(settings: MemorisationSettings) -> tuple[gd.Dataset, gd.Dataset]:
    """(train, test): random subsets of ``num_train`` and ``num_test`` examples."""
    return registry.load_data(settings, settings.num_train, settings.num_test,
                             names=("num_train", "num_test"))


# ----------------------------------------------------------------------------
# The plain run's thresholds and the arms.

def gnq_thresholds(book, settings: ArmSettings) -> Thresholds:
    """Quantiles of the plain run's D_j and of D_j / steps_used_j (over the
    examples the run used at least once; ``gujax.transforms.propose_thresholds``);
    ``book`` is its ledger."""
    return propose_thresholds(book, censor_quantile=settings.censor_quantile,
                              clip_quantile=settings.clip_quantile)


def run_arms(settings: ArmSettings, audit: Callable, model, images: np.ndarray,
             labels: np.ndarray) -> tuple[dict, Thresholds]:
    """Run ``audit(text, arm) -> (record, ledger)`` for every arm text of
    ``settings.arms``, the plain ``sgd`` arm first: the censor/clip arms
    without a budget take it from the quantiles of its ledger (a plain run on
    (images, labels) alone when no arm is that plain arm). Returns ({text:
    record}, thresholds)."""
    plain = cli.make_arm("sgd", settings)
    reference = next((t for t in settings.arms if cli.arm_kind_of(t) == "sgd"
                      and cli.make_arm(t, settings) == plain), None)
    results = {}
    if reference is not None:
        results[reference], book = audit(reference, plain)
    else:
        book = harness.train_arm(plain, settings, model, [(images, labels)],
                                 [settings.seed])[0].ledger
    thresholds = gnq_thresholds(book, settings)
    for text in progress_bar([t for t in settings.arms if t != reference], desc="arms",
                             disable=not settings.progress):
        results[text], _ = audit(text, cli.make_arm(text, settings, thresholds))
    return results, thresholds


def dp_noise_multiplier(settings: MemorisationSettings, train_size: int | None = None) -> float:
    """DP-SGD's sigma for (target_epsilon, delta) after ``settings.epochs``
    epochs of Poisson-sampled batches over ``train_size`` (default
    num_train) examples (``gujax.arms.dp_calibration``, RDP accounting)."""
    n = settings.num_train if train_size is None else train_size
    return dp_calibration(settings.target_epsilon, settings.delta, settings.batch_size / n,
                          settings.epochs * (n // settings.batch_size))[0]


# ----------------------------------------------------------------------------
# Models.

def apply_fn(model):
    """``(params, images (N, H, W, C) float in [0, 1]) -> logits (N, K)``."""
    return lambda params, images: model.apply({"params": params}, images)


def xent_loss(model):
    """``loss(params, x (H, W, C), y ()) -> scalar``, one example (the
    convention of gujax.audit.curvature; the trainer's softmax cross-entropy)."""
    loss = softmax_cross_entropy(model)
    return lambda params, x, y: loss(params, {"image": x, "label": y})


def accuracy(model, params, images: np.ndarray, labels: np.ndarray) -> float:
    logits = model.apply({"params": params}, gd.to_float(images))
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


# ----------------------------------------------------------------------------
# Statistics.

def percentile_rank(values, index: int) -> float:
    """Percentage of the other entries strictly below values[index] (100 = the
    largest of all), ties counted half."""
    values = np.asarray(values, np.float64)
    others = np.delete(values, index)
    v = values[index]
    return float(100.0 * (np.sum(others < v) + 0.5 * np.sum(others == v)) / len(others))


def spearman(a, b, *, with_p: bool = False):
    """Spearman rank correlation over the pairs where both are finite; None
    when fewer than 3 pairs remain or either side is constant. With
    ``with_p``, (rho, two-sided p-value) (``(None, None)`` in those cases)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return (None, None) if with_p else None
    result = stats.spearmanr(a, b)
    return (float(result.statistic), float(result.pvalue)) if with_p else float(result.statistic)


def auc_p_value(scores, is_member) -> float:
    """One-sided Mann-Whitney p-value of "members score higher than
    non-members" (AUC = U / (n_in n_out) > 0.5 by more than chance)."""
    scores, is_member = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    return float(stats.mannwhitneyu(scores[is_member], scores[~is_member],
                                    alternative="greater").pvalue)


# ----------------------------------------------------------------------------
# Records, checked claims and the printed summary.

def base_record(settings: Settings) -> dict[str, Any]:
    """What every results JSON starts with: the settings (those that apply,
    ``Settings.record``) and the machine."""
    return {"settings": settings.record(), **environment()}


def claim(text: str, supported: bool | None, evidence: str) -> dict:
    """One checked claim: ``supported`` True / False, or None when the run
    cannot decide (a missing arm, a constant input)."""
    verdict = {True: "supported", False: "NOT supported", None: "undetermined"}[supported]
    return {"claim": text, "verdict": verdict, "evidence": evidence}


def correlation_claim(text: str, rho: float | None, p: float | None, n: int, *,
                      alpha: float = 0.05) -> dict:
    """A claim of a POSITIVE rank correlation: supported only when rho > 0 and
    its two-sided p-value < ``alpha``; a positive but not significant rho is
    reported as not supported, and the evidence says so."""
    if rho is None:
        return claim(text, None, f"constant input over {n} examples: no ranking to compare")
    evidence = f"Spearman {rho:+.3f} (p = {p:.2g}) over {n} examples"
    if rho > 0 and p >= alpha:
        evidence += f"; positive but not significant at {alpha:g}"
    elif rho <= 0:
        evidence += "; not positive"
    return claim(text, bool(rho > 0 and p < alpha), evidence)


def format_claims(claims: list[dict]) -> str:
    return "\n".join(f"[{c['verdict']}] {c['claim']}\n    {c['evidence']}" for c in claims)


def write_results(out: str, name: str, record: dict, *, title: str, table: str) -> str:
    """<out>/<name>.json and the printed summary (also <out>/summary.txt):
    the table and a verdict per claim of ``record["claims"]``."""
    settings = record["settings"]
    text = (f"{title} (preset {settings['preset']}, seed {settings['seed']})\n\n{table}\n\n"
            f"Claims checked by this run:\n{format_claims(record['claims'])}\n")
    write_report(out, record=record, json_name=f"{name}.json", summary=text)
    return text
