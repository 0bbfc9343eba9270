"""White-box, all-iterates audits with gradient canaries (Nasr et al. 2023):
every arm, every canary family, in DP-SGD's units.

    python -m experiments.audit_whitebox                  # digits, ~25 min on 2 CPU cores
    python -m experiments.audit_whitebox --preset smoke   # seconds; what the tests run
    python -m experiments.audit_whitebox --preset cifar --data-dir DIR   # ScatterNet + linear

Each unit is one training run of one arm on the whole train split plus
``--num-slots`` gradient-canary slots (``gujax.audit.whitebox``): slot k is
IN with probability 1/2 and then adds ``copies`` rows whose gradient is
``norm e_k`` in a parameter leaf the model never reads. The auditor sees
every iterate, undoes the optimiser and scores each slot (the sum of its
coordinate's updates; for DP-SGD also the likelihood ratio of Poisson
sampling). From those scores: the one-run bound (Steinke et al. 2023), its
f-DP version, the GDP bound (Clopper-Pearson, read as mu-GDP) and the GDP
point estimate of Nasr et al. with a bootstrap interval, each beside the
one-run ceiling of m slots and the arm's accountant epsilon.

Canary families (``--families``):
  dirac      one row per IN slot, norm = the clip norm for DP-SGD, else the
             median per-example gradient norm of the real data at the start
  small      the same, norm x ``--small-scale``: what a uniqueness score
             weighs by its size (GNQ ~ norm^2 / lambda)
  large      norm / ``--small-scale`` for the GNQ arms (DP-SGD clips it to
             dirac): a relative regulariser lambda = reg trace(K) / B grows
             with it, and every other example looks less unique
  xK         K rows per IN slot with one gradient (duplicates, distinct ids)

``--full-batch-epsilons`` adds, per epsilon, a DP-SGD arm whose batch is
the whole training set (sample rate 1; ``--full-batch-steps`` steps): the
mechanism is then exactly Gaussian, mu = sqrt(T) / sigma, and the GDP
estimate should meet the accountant's (PLD) epsilon.

Outputs (``--out``, default results/audit_whitebox-<preset>):

    run.json      the experiment, the command and the settings (written first)
    results.json  {"units": [per arm and family], "config": ...}
    results.csv, table.md, epsilon.png (every estimate per unit against the
                  accountant's epsilon, with the ceiling)
    scores/<arm>/<family>.npz   is_in (m,), every score (m,), admitted (m,)
    units/<arm>__<family>.json  each finished unit: --resume keeps them
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from experiments import cli, registry
from experiments.cli import Settings, arm_text, option
from experiments.report import environment, format_table, jsonable, write_report
from gujax import files, per_example_grads
from gujax.arms import Arm
from gujax.audit import whitebox as wb
from gujax.audit.intervals import mean_interval
from gujax.data import Dataset
from gujax.data.dataset import model_inputs
from gujax.progress import progress_bar
from gujax.train import softmax_cross_entropy

FAMILY = re.compile(r"^(dirac|small|large|x([1-9][0-9]*))$")


@dataclasses.dataclass(frozen=True)
class WhiteboxSettings(Settings):
    """The shared settings plus the canary slots and families."""
    num_slots: int = option(2000, "gradient-canary slots per unit (each IN with probability "
                                  "1/2); the one-run ceiling grows with them")
    families: tuple[str, ...] = option(("dirac", "small", "large", "x2", "x4", "x8"),
                                       "canary families: dirac, small, large, xK (K copies)")
    small_scale: float = option(1e-3, "the small family's norm, as a fraction of dirac's (the "
                                      "large family's: its inverse)")
    full_batch_epsilons: tuple[float, ...] = option(
        (1.0, 3.0, 8.0), "epsilons of the full-batch DP-SGD arms added to --arms")
    full_batch_steps: int = option(30, "steps of the full-batch DP-SGD arms")
    confidence: float = option(0.95, "confidence of every lower bound and interval")
    bootstrap_samples: int = option(1000, "bootstrap resamples of the GDP estimate and the "
                                          "test accuracy")
    arms: tuple[str, ...] = option(
        ("sgd", "dpsgd:eps=1,ledger=false", "dpsgd:eps=3,ledger=false",
         "dpsgd:eps=8,ledger=false", "censor:tau=2", "censor:tau=8", "clip:max_step=0.1"),
        "training arms, kind[:key=value,...] (gujax.arms.parse_arm)", parse=arm_text)

    NOTES = ("Every epsilon but the GDP estimate is a lower bound at --confidence, at the "
             "delta of the dpsgd arms (--delta).",)

    def check(self) -> None:
        super().check()
        if self.num_slots < 4:
            raise ValueError(f"num_slots must be >= 4, got {self.num_slots}")
        bad = [f for f in self.families if not FAMILY.match(f)]
        if bad or not self.families or len(set(self.families)) != len(self.families):
            raise ValueError(f"families must be distinct, each dirac, small, large or xK (K >= 1), "
                             f"got {list(self.families)}")
        if not 0 < self.small_scale < 1:
            raise ValueError(f"small_scale must be in (0, 1), got {self.small_scale}")
        if any(e <= 0 for e in self.full_batch_epsilons):
            raise ValueError("full_batch_epsilons must be > 0")
        if self.full_batch_steps < 1 or self.bootstrap_samples < 1:
            raise ValueError("full_batch_steps and bootstrap_samples must be >= 1")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.optimizer != "sgd":
            raise ValueError("the white-box audit reads optax.sgd's iterates: --optimizer sgd")
        cli.check_arms(self.arms, self, by_name=True)


_DEFAULT = WhiteboxSettings(
    dataset="digits", model="mlp", hidden=(512,), epochs=20, batch_size=64,
    learning_rate=0.2, optimizer="sgd", momentum=0.0, augment=False, method="explicit",
    reg=0.1, delta=1e-5, clip_norm=1.0, seed=0, checkpoint_every=10_000,
    note="Digits preset: the comparison's MLP 64-512-10 (20 epochs, B = 64, lr 0.2) on the "
         "whole train split, 2,000 gradient-canary slots per unit; DP-SGD at B = 64 "
         "(Poisson) and full batch (30 steps).")

PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(
        _DEFAULT, hidden=(16,), epochs=2, batch_size=64, num_slots=200, families=("dirac", "x2"),
        full_batch_epsilons=(3.0,), full_batch_steps=5, bootstrap_samples=50,
        arms=("dpsgd:eps=3,ledger=false", "censor:tau=2"),
        note="Smoke preset: 2 epochs, 200 slots; a plumbing check, not a measurement."),
    cifar=dataclasses.replace(
        _DEFAULT, dataset="cifar10", features="scattering", model="scatter_linear",
        normalisation="private", normalisation_noise=8.0, epochs=10, batch_size=256,
        learning_rate=0.01, momentum=0.9, clip_norm=0.1, full_batch_epsilons=(),
        arms=("sgd", *(f"dpsgd:eps={e},batch=820,lr=1,ledger=false" for e in (1, 3, 8)),
              "censor:tau=2", "censor:tau=8", "clip:max_step=0.1"),
        note="CIFAR-10 preset: ScatterNet J=2 L=8 + linear on all 50,000 train images "
             "(private standardisation, noise 8), 10 epochs, B 256, lr 0.01, momentum 0.9; "
             "DP-SGD clip 0.1 at batch 820, lr 1. Needs --data-dir (the CIFAR-10 image "
             "folder or python batches)."),
)
EXPERIMENT = cli.Experiment("audit_whitebox", __doc__, PRESETS, resumable=True)


class Prepared(NamedTuple):
    arms: list[Arm]
    train: Dataset
    test: Dataset
    model: Any
    params: Any
    reference_norm: float     # median per-example gradient norm at the start


def _median_gradient_norm(model, params, data: Dataset, seed: int) -> float:
    rows = np.random.default_rng(seed).permutation(len(data))[:256]
    grads = per_example_grads(softmax_cross_entropy(model), params,
                              {"image": model_inputs(data.images[rows]),
                               "label": np.asarray(data.labels[rows], np.int32)})
    sq = sum(np.sum(np.asarray(g, np.float64).reshape(len(rows), -1) ** 2, axis=1)
             for g in jax.tree_util.tree_leaves(grads))
    return float(np.median(np.sqrt(sq)))


def prepare(run: cli.Run) -> Prepared:
    s = run.settings
    arms = [cli.make_arm(text, s) for text in s.arms]
    train, test = registry.load_data(s, 0, 0)
    model = registry.build_model(s, len(train.class_names), train.images.shape[1:])
    params = registry.init_params(model, train.images.shape[1:], s.seed)
    return Prepared(arms, train, test, model, params,
                    _median_gradient_norm(model, params, train, s.seed))


def _copies(family: str) -> int:
    match = FAMILY.match(family)
    return int(match.group(2)) if match.group(2) else 1


def _units(settings: WhiteboxSettings, prepared: Prepared):
    """(arm, family, canaries) of every unit, in order; one membership draw
    for all (the same slots IN in every unit)."""
    units = []
    for family in settings.families:
        copies = _copies(family)
        base = wb.canary_slots(settings.num_slots, norm=1.0, seed=settings.seed, copies=copies)
        total = len(prepared.train) + int(base.is_in.sum()) * copies
        full = [cli.make_arm(f"dpsgd:eps={e:g},batch={total},ledger=false", settings)
                for e in settings.full_batch_epsilons]
        for arm in [*prepared.arms, *full]:
            dp = arm.kind == "dpsgd"
            norm = arm.clip_norm if dp else prepared.reference_norm
            if family == "small":
                norm *= settings.small_scale
            elif family == "large" and not dp:
                norm /= settings.small_scale
            units.append((arm, family, base._replace(norms=np.full(settings.num_slots, norm))))
    return units


def _unit_name(arm: Arm, family: str, total: int) -> str:
    full = arm.kind == "dpsgd" and arm.batch_size == total
    return f"{arm.slug}{'-fullbatch' if full else ''}__{family}"


def audit_unit(arm: Arm, family: str, canaries: wb.GradientCanaries, settings: WhiteboxSettings,
               prepared: Prepared, out: str) -> dict:
    """Train and audit one unit; its results row (and its scores on disk)."""
    start = time.perf_counter()
    train = prepared.train
    total = len(train) + int(canaries.is_in.sum()) * canaries.copies
    full = arm.kind == "dpsgd" and arm.batch_size == total
    config = cli.train_config(settings, epochs=settings.full_batch_steps if full else None)
    result = wb.whitebox_audit(arm, train.images, train.labels, prepared.params, canaries,
                               config, loss_fn=softmax_cross_entropy(prepared.model),
                               seed=settings.seed + 17, delta=settings.delta,
                               confidence=settings.confidence,
                               bootstrap_samples=settings.bootstrap_samples)
    correct = np.argmax(np.asarray(prepared.model.apply(
        {"params": result.params}, np.asarray(prepared.test.images, np.float32))), -1) \
        == prepared.test.labels
    low, high = mean_interval(correct[None], num_resamples=settings.bootstrap_samples,
                              confidence=settings.confidence, seed=settings.seed)
    audit = result.audit
    is_in = canaries.is_in
    steps = result.updates.shape[0]
    batch = arm.batch_size or settings.batch_size
    slot = (wb.slot_epsilon(result.noise_multiplier, batch / total, steps, settings.delta,
                            canaries.copies) if result.noise_multiplier is not None else None)
    name = _unit_name(arm, family, total)
    path = os.path.join(out, "scores", arm.slug + ("-fullbatch" if full else ""),
                        f"{family}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.save_npz(path, is_in=is_in, admitted=result.admitted,
                   **{f"score_{k}": v for k, v in result.scores.items()})
    noiseless = result.noise_multiplier is None
    return {
        "unit": name, "arm": arm.name + (" full batch" if full else ""), "kind": arm.kind,
        "family": family, "copies": canaries.copies, "norm": float(canaries.norms[0]),
        "steps": steps, "sample_rate": batch / total, "train_size": total,
        "test_accuracy": float(correct.mean()), "test_accuracy_low": float(low),
        "test_accuracy_high": float(high),
        "accountant_epsilon": result.accountant_epsilon, "slot_epsilon": slot,
        "noise_multiplier": result.noise_multiplier,
        "eps_one_run": audit.one_run["epsilon"], "eps_one_run_fdp": audit.one_run_fdp["epsilon"],
        "eps_gdp_bound": audit.gdp_bound, "gdp_score": audit.gdp_score, "gdp_mu": audit.gdp_mu,
        "eps_gdp_estimate": audit.gdp_estimate, "eps_gdp_low": audit.gdp_interval[0],
        "eps_gdp_high": audit.gdp_interval[1], "eps_ceiling": audit.ceiling,
        "eps_ceiling_fdp": audit.ceiling_fdp,
        "num_slots": audit.num_slots, "num_in": audit.num_in,
        "admitted_fraction": float((result.admitted[is_in] > 0).mean()) if noiseless else None,
        "admitted_steps_mean": float(result.admitted[is_in].mean()) if noiseless else None,
        "disclosure_mean": (float(np.nanmean(result.disclosure[is_in]))
                            if np.isfinite(result.disclosure[is_in]).any() else None),
        "wall_seconds": time.perf_counter() - start, "scores": os.path.relpath(path, out),
    }


def _detection(row: dict, out: str, confidence: float) -> dict:
    """For a noiseless arm, whose OUT slots' coordinates never move (real
    rows have zero gradient there and nothing adds noise: FPR = 0 by
    construction), every (eps, delta) claim needs delta >= TPR of the rule
    "moved = IN"; the Clopper-Pearson lower bound of that TPR is a lower
    bound on delta at every eps. The GDP figures assume Gaussian noise and
    are dropped for such arms."""
    if row["noise_multiplier"] is not None:
        return dict(row, delta_lower_bound=None)
    saved = files.load_npz(os.path.join(out, row["scores"]),
                           f"delete {row['scores']} and units/{row['unit']}.json")
    is_in, moved = saved["is_in"], saved["admitted"] > 0
    if moved[~is_in].any():
        raise AssertionError(f"{row['unit']}: an OUT slot's coordinate moved in a noiseless "
                             "arm; the canary leaf is not isolated")
    hits, n = int(moved[is_in].sum()), int(is_in.sum())
    low = float(stats.beta.ppf(1 - confidence, hits, n - hits + 1)) if hits else 0.0
    return dict(row, delta_lower_bound=low, **{k: None for k in (
        "eps_gdp_bound", "eps_gdp_estimate", "eps_gdp_low", "eps_gdp_high", "gdp_mu")})


COLUMNS = (("arm", "arm", "{}"), ("family", "family", "{}"), ("test acc", "acc_text", "{}"),
           ("accountant eps", "accountant_epsilon", "{:.2f}"),
           ("slot eps (PLD)", "slot_epsilon", "{:.2f}"),
           ("one-run", "eps_one_run", "{:.2f}"), ("f-DP one-run", "eps_one_run_fdp", "{:.2f}"),
           ("GDP bound", "eps_gdp_bound", "{:.2f}"), ("GDP estimate", "gdp_text", "{}"),
           ("ceiling", "eps_ceiling", "{:.2f}"), ("f-DP ceiling", "eps_ceiling_fdp", "{:.2f}"),
           ("admitted", "admitted_fraction", "{:.3f}"),
           ("delta >= (any eps)", "delta_lower_bound", "{:.3f}"),
           ("D mean", "disclosure_mean", "{:.3g}"), ("wall s", "wall_seconds", "{:.0f}"))


def _with_text(row: dict) -> dict:
    acc = (f"{row['test_accuracy']:.3f} [{row['test_accuracy_low']:.3f}, "
           f"{row['test_accuracy_high']:.3f}]")
    if row["eps_gdp_estimate"] is None:
        return dict(row, acc_text=acc, gdp_text="-")
    return dict(row, acc_text=acc, gdp_text=f"{row['eps_gdp_estimate']:.2f} "
                                            f"[{row['eps_gdp_low']:.2f}, {row['eps_gdp_high']:.2f}]")


def markdown(units: list[dict], settings: WhiteboxSettings) -> str:
    lines = [f"# audit_whitebox: {settings.dataset} / {settings.preset}", "",
             settings.note, "",
             f"{settings.num_slots} gradient-canary slots per unit (each IN with probability "
             f"1/2). Every epsilon is in nats at delta {settings.delta:g}. one-run, f-DP "
             f"one-run and GDP bound: lower bounds at {settings.confidence:.0%} (the GDP "
             "bound assumes a Gaussian trade-off curve); GDP estimate: Nasr et al.'s fit "
             "with its bootstrap interval, not a bound; ceiling, f-DP ceiling: "
             "the one-run and f-DP one-run bounds of a perfect attack on these slots (the "
             "most any attack can show with them). accountant eps: the DP-SGD arm's, per "
             "example (RDP, as it was calibrated); slot eps: the PLD epsilon of one canary "
             "slot, its copies included (group privacy of K copies, "
             "`gujax.audit.whitebox.slot_epsilon`), what the bounds are held to. admitted: "
             "the fraction of IN slots whose gradient entered some step (noiseless arms); D mean: the ledger's disclosure "
             "of an IN canary row; delta >= (any eps): for a noiseless arm, whose OUT canaries' "
             "coordinates never move, the 95% Clopper-Pearson lower bound on the fraction of "
             "IN canaries whose coordinate moved, a lower bound on delta whatever epsilon "
             "(no (eps, delta)-DP claim with a smaller delta holds; the GDP figures, which "
             "assume Gaussian noise, are left out for these arms).", "",
             format_table([_with_text(u) for u in units], COLUMNS, markdown=True)]
    return "\n".join(lines) + "\n"


def plot(units: list[dict], settings: WhiteboxSettings, path: str) -> None:
    families = list(dict.fromkeys(u["family"] for u in units))
    cols = min(3, len(families))
    grid_rows = -(-len(families) // cols)
    fig = Figure(figsize=(4.6 * cols, 4.4 * grid_rows + 0.6), layout="constrained")
    axes = fig.subplots(grid_rows, cols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(families):]:
        ax.set_visible(False)
    for ax, family in zip(axes, families):
        rows = [u for u in units if u["family"] == family]
        x = np.arange(len(rows))
        for key, marker, label in (("eps_one_run", "o", "one-run"),
                                   ("eps_one_run_fdp", "s", "f-DP one-run"),
                                   ("eps_gdp_bound", "^", "GDP bound")):
            ax.scatter(x, [np.nan if r[key] is None else r[key] for r in rows], marker=marker,
                       label=label, s=18)
        est = np.array([np.nan if r["eps_gdp_estimate"] is None else r["eps_gdp_estimate"]
                        for r in rows])
        err = np.array([[0, 0] if r["eps_gdp_estimate"] is None else
                        [max(e - r["eps_gdp_low"], 0), max(r["eps_gdp_high"] - e, 0)]
                        for e, r in zip(est, rows)]).T
        ax.errorbar(x, est, yerr=err, fmt="D", ms=4, color="k", label="GDP estimate")
        ax.scatter(x, [r["slot_epsilon"] if r["slot_epsilon"] else np.nan
                       for r in rows], marker="_", s=300, color="red",
                   label="accountant (slot, PLD)")
        ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[[r["eps_ceiling"] for r in rows],
                                                   rows[-1]["eps_ceiling"]],
                where="post", color="grey", ls=":", label="one-run ceiling")
        ax.set_xticks(x, [r["arm"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(family)
        ax.set_yscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel("epsilon (nats)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"white-box gradient-canary audits: {settings.dataset} / {settings.preset}")
    fig.savefig(path, dpi=150)


def execute(run: cli.Run, prepared: Prepared) -> dict:
    settings, out = run.settings, run.out
    start = time.perf_counter()
    rows = []
    for arm, family, canaries in progress_bar(_units(settings, prepared), desc="units",
                                              disable=not settings.progress):
        total = len(prepared.train) + int(canaries.is_in.sum()) * canaries.copies
        done = os.path.join(out, "units", _unit_name(arm, family, total) + ".json")
        if run.resume and os.path.exists(done):
            row = files.read_json(done, f"delete {done} (that unit is then trained again)")
        else:
            row = jsonable(audit_unit(arm, family, canaries, settings, prepared, out))
            os.makedirs(os.path.dirname(done), exist_ok=True)
            files.write_json(done, row)
        rows.append(_detection(row, out, settings.confidence))
    config = {**settings.record(), "out": out, "train_n": len(prepared.train),
              "test_n": len(prepared.test), "reference_norm": prepared.reference_norm}
    results = {"units": rows, "config": config, **environment(),
               "total_wall_seconds": time.perf_counter() - start,
               "unit_wall_seconds": sum(r["wall_seconds"] for r in rows)}
    write_report(out, record=results, rows=rows, table=markdown(rows, settings))
    plot(rows, settings, os.path.join(out, "epsilon.png"))
    return results


def main(argv=None):
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
