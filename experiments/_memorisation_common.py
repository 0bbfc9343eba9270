"""What the three memorisation experiments share: presets on the command line,
data, the model, the training arms, printed tables, verdicts and JSON output.

Arms (one trainer, ``gujax.train.train``; the aggregator comes from
``gujax.arms.build_pipeline``, so every arm keeps a per-example disclosure
ledger D_j on the same footing):

  plain       ``Arm("sgd")``: mean gradient, ledger by ``gnq_monitor`` (D_j is
              recorded, not acted on)
  dpsgd       ``Arm("dpsgd")``: DP-SGD at a noise multiplier calibrated for
              (target_epsilon, delta) under Poisson sampling; its ledger is on the
              clipped gradients with the floor lam = sigma^2 C^2 (``dpsgd_monitor``)
  gnq_censor  ``Arm("censor")``: ``gnq_censor`` with the retire policy
  gnq_clip    ``Arm("clip")``: ``gnq_clip``

The GNQ budgets are not absolute numbers: D_j depends on the data, the model
and the number of steps. They are quantiles of the plain arm's ledger
(``gnq_thresholds``): the censor budget is the ``censor_quantile`` quantile of
the plain run's D_j (so about 1 - q of the examples would overrun it under
plain training), the clip cap the ``clip_quantile`` quantile of its mean
per-step disclosure D_j / steps_used_j.

Sampling is the arm's (``Arm.sampling``): Poisson for DP-SGD (what its
accounting assumes), epoch-wise shuffling for the others.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from scipy import stats
from tqdm.auto import tqdm

import gujax.data as gd
from experiments.comparison import enable_compilation_cache
from gujax.arms import METHODS, Arm, build_pipeline, dp_calibration, ledger
from gujax.models import MLP, SmallCNN
from gujax.train import TrainConfig, TrainResult, softmax_cross_entropy, train
from gujax.transforms import GnqState

ARMS = ("plain", "dpsgd", "gnq_censor", "gnq_clip")
MODELS = ("mlp", "cnn")


# ----------------------------------------------------------------------------
# Command line.

def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_settings(argv, *, name: str, description: str, presets: dict[str, dict]
                   ) -> tuple[dict, str]:
    """Parse ``--preset``, ``--out`` and one ``--key`` per preset entry.

    Every entry of the chosen preset can be overridden on the command line
    (``num_train`` as ``--num-train``; tuples take several values). Returns
    (settings, out_dir); out_dir defaults to results/<name>-<preset>.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                     description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="default")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default results/{name}-<preset>)")
    for key, value in presets["default"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=_parse_bool, default=None)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=None)
        elif value is None:
            parser.add_argument(flag, type=str, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=None)
    args = parser.parse_args(argv)
    # dp_accounting's RDP search logs a warning per skipped order; say nothing.
    absl_logging.set_verbosity(absl_logging.ERROR)
    settings = dict(presets[args.preset])
    for key, default in presets["default"].items():
        given = getattr(args, key)
        if given is not None:
            settings[key] = tuple(given) if isinstance(default, tuple) else given
    settings["preset"] = args.preset
    unknown = set(settings.get("arms", ())) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if settings.get("model", "mlp") not in MODELS:
        parser.error(f"--model must be one of {', '.join(MODELS)}")
    if settings.get("method", "explicit") not in METHODS:
        parser.error(f"--method must be one of {', '.join(METHODS)}")
    out = args.out or os.path.join("results", f"{name}-{args.preset}")
    return settings, out


def start_run(out: str) -> None:
    """Create ``out`` and persist compiled steps under the gujax cache: the
    target, reference and shadow models of an arm have the same step, so only
    the first pays for compilation (``experiments.comparison``'s cache)."""
    os.makedirs(out, exist_ok=True)
    enable_compilation_cache(os.path.join(gd.default_cache_dir(), "jax"))


def write_json(path: str, record: dict) -> None:
    """Strict JSON (no NaN/Infinity tokens: non-finite floats become null)."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__jax_array__"):
            return clean(np.asarray(v).tolist())
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    with open(path, "w") as f:
        json.dump(clean(record), f, indent=1, allow_nan=False)


# ----------------------------------------------------------------------------
# Data and model.

def load_data(settings: dict) -> tuple[gd.Dataset, gd.Dataset]:
    """(train, test) subsets of ``settings['dataset']`` of sizes num_train and
    num_test (random, seeded by ``settings['seed']``; original ids kept)."""
    train_set = gd.load(settings["dataset"], "train", data_dir=settings.get("data_dir"))
    test_set = gd.load(settings["dataset"], "test", data_dir=settings.get("data_dir"))
    for split, data, size in (("train", train_set, settings["num_train"]),
                              ("test", test_set, settings["num_test"])):
        if not 1 <= size <= len(data):
            raise ValueError(f"num_{split} must be in [1, {len(data)}], got {size}")
    return (gd.random_subset(train_set, settings["num_train"], settings["seed"]),
            gd.random_subset(test_set, settings["num_test"], settings["seed"] + 1))


def make_model(settings: dict, num_classes: int):
    """MLP(hidden) or SmallCNN(widths = hidden), a Flax Linen module."""
    hidden = tuple(settings["hidden"])
    if settings["model"] == "cnn":
        return SmallCNN(num_classes=num_classes, widths=hidden, groups=min(8, min(hidden)))
    return MLP(hidden=hidden, num_classes=num_classes)


def init_params(model, image_shape, seed: int):
    return model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))["params"]


def apply_fn(model):
    """``(params, images (N, H, W, C) float in [0, 1]) -> logits (N, K)``."""
    return lambda params, images: model.apply({"params": params}, images)


def xent_loss(model):
    """``loss(params, x (H, W, C), y ()) -> scalar``, one example (the
    convention of gujax.audit.curvature; the trainer's softmax cross-entropy)."""
    loss = softmax_cross_entropy(model)
    return lambda params, x, y: loss(params, {"image": x, "label": y})


# ----------------------------------------------------------------------------
# Arms: experiment names -> ``gujax.arms.Arm`` -> ``build_pipeline``.

class Thresholds(NamedTuple):
    """The GNQ defenses' settings, from the plain arm's ledger (nats)."""
    budget: float               # gnq_censor: per-example total D_j
    max_step_disclosure: float  # gnq_clip: per-step d_j


def gnq_thresholds(plain_ledger: GnqState, settings: dict) -> Thresholds:
    """Quantiles of the plain run's D_j and of D_j / steps_used_j (over the
    examples the run used at least once)."""
    used = np.asarray(plain_ledger.steps_used)
    total = np.asarray(plain_ledger.disclosure)[used > 0]
    per_step = total / used[used > 0]
    return Thresholds(float(np.quantile(total, settings["censor_quantile"])),
                      float(np.quantile(per_step, settings["clip_quantile"])))


def make_arm(name: str, settings: dict, thresholds: Thresholds | None = None) -> Arm:
    """The ``gujax.arms.Arm`` of experiment arm ``name`` (see the module docstring)."""
    if name == "plain":
        return Arm("sgd", reg=settings["gnq_reg"])
    if name == "dpsgd":
        return Arm("dpsgd", epsilon=settings["target_epsilon"], delta=settings["delta"],
                   clip_norm=settings["l2_norm_clip"])
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
    if thresholds is None:
        raise ValueError(f"arm {name!r} needs the thresholds from a plain run")
    if name == "gnq_censor":
        return Arm("censor", reg=settings["gnq_reg"], budget=thresholds.budget)
    return Arm("clip", reg=settings["gnq_reg"], max_step=thresholds.max_step_disclosure)


def dp_noise_multiplier(settings: dict, train_size: int | None = None) -> float:
    """DP-SGD's sigma for (target_epsilon, delta) after ``settings['epochs']``
    epochs of Poisson-sampled batches over ``train_size`` (default
    num_train) examples (``gujax.arms.dp_calibration``, RDP accounting)."""
    n = settings["num_train"] if train_size is None else train_size
    return dp_calibration(settings["target_epsilon"], settings["delta"],
                          settings["batch_size"] / n,
                          settings["epochs"] * (n // settings["batch_size"]))[0]


def train_config(settings: dict, arm: Arm, *, seed: int, epochs: int | None = None
                 ) -> TrainConfig:
    """The run's ``TrainConfig`` for ``arm`` (its sampler: Poisson for DP-SGD,
    shuffling otherwise, as in ``gujax.arms``)."""
    return TrainConfig(epochs=epochs or settings["epochs"], batch_size=settings["batch_size"],
                       learning_rate=settings["learning_rate"], optimizer="sgd",
                       momentum=settings["momentum"], seed=seed, sampling=arm.sampling,
                       eval_every=settings["epochs"], progress=settings.get("progress", True))


def train_arm(name: str, settings: dict, model, images: np.ndarray, labels: np.ndarray, *,
              seed: int, thresholds: Thresholds | None = None, epochs: int | None = None,
              workdir: str | None = None) -> TrainResult:
    """Train ``model`` from its ``seed`` init on (images uint8, labels) with arm ``name``.

    Example ids are positions 0..N-1. The arm's pipeline is built for
    ``settings['epochs']`` (DP-SGD's sigma is calibrated for the whole run);
    ``epochs`` (default the same) with a ``workdir`` stops early and a later
    call with more epochs continues from the checkpoint: that is how the
    curvature experiment takes checkpoints along one run.
    """
    arm = make_arm(name, settings, thresholds)
    loss_fn = softmax_cross_entropy(model)
    pipeline = build_pipeline(arm, loss_fn=loss_fn, train_size=len(labels),
                              batch_size=settings["batch_size"], epochs=settings["epochs"],
                              seed=seed, method=settings["method"])
    return train(params=init_params(model, images.shape[1:], seed),
                 aggregator=pipeline.aggregator, data=(images, labels, np.arange(len(labels))),
                 config=train_config(settings, arm, seed=seed, epochs=epochs), model=model,
                 loss_fn=loss_fn, gradient_stage=pipeline.gradient_stage, workdir=workdir,
                 resume=workdir is not None)


def run_arms(settings: dict, audit: Callable, model, images: np.ndarray, labels: np.ndarray
             ) -> tuple[dict, Thresholds]:
    """Run ``audit(arm, thresholds) -> (record, aggregator_state)`` for every
    arm in settings['arms'], plain first: the GNQ arms' thresholds are
    quantiles of the plain run's ledger (trained on (images, labels) alone
    when the plain arm itself is not asked for). Returns ({arm: record},
    thresholds)."""
    results = {}
    if "plain" in settings["arms"]:
        results["plain"], state = audit("plain", None)
    else:
        state = train_arm("plain", settings, model, images, labels,
                          seed=settings["seed"]).aggregator_state
    thresholds = gnq_thresholds(ledger(state), settings)
    for arm in tqdm([a for a in settings["arms"] if a != "plain"], desc="arms",
                    disable=not settings.get("progress", True)):
        results[arm], _ = audit(arm, thresholds)
    return results, thresholds


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


def base_record(settings: dict) -> dict[str, Any]:
    """What every results JSON starts with: the settings and the machine."""
    return {"settings": dict(settings), "jax_version": jax.__version__,
            "backend": jax.default_backend()}


# ----------------------------------------------------------------------------
# What gets printed: a table of the measurements and a verdict per claim.

def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table of ``rows``; ``columns`` = (header, key, format), a
    missing or None value prints as "-"."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return fmt.format(value)

    body = [[header for header, _, _ in columns]] + [
        [cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def report(title: str, table: str, claims: list[dict], out: str, settings: dict) -> str:
    """The printed summary (also written to <out>/summary.txt)."""
    text = (f"{title} (preset {settings['preset']}, seed {settings['seed']})\n\n{table}\n\n"
            f"Claims checked by this run:\n{format_claims(claims)}\n")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    print(text)
    print(f"results in {out}")
    return text
