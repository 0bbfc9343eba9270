"""Reconstruction of training images from a batch gradient, against each
example's GNQ in that batch, under plain, DP-SGD and GNQ-clipped aggregation.

    python -m experiments.reconstruction                  # digits, a few minutes
    python -m experiments.reconstruction --preset smoke   # seconds
    python -m experiments.reconstruction --inversion-steps 2000 --num-batches 4

For ``num_batches`` batches of ``batch_size`` real training images, at each
model state (``init``: the seed's initialisation; ``trained``: after
``train_epochs`` epochs of plain SGD on the training subset), the experiment
computes every example's per-example gradient and its leave-one-out GNQ
within the batch (``gujax.uniqueness.gnq``, relative reg ``reg``), then the
gradient an attacker observes under each defense (named as the arms,
``experiments.harness``):

  sgd       the batch-mean gradient
  dpsgd     (sum_j clip_C(g_j) + N(0, sigma^2 C^2 I)) / B_run, sigma calibrated for
            a DP-SGD run of ``epochs`` epochs over ``num_train`` examples at
            (target_epsilon, delta), Poisson sampling (the noise that run adds),
            C = ``clip_norm``, B_run = ``batch_size`` the run's expected batch
  clip      sum_j c_j g_j / B with c_j the weights of ``clip_policy`` at a cap of
            the batch's ``clip_quantile`` quantile of d_j = 1/2 log(1 + GNQ_j)

and attacks it two ways:

  (a) analytic: for a dense first layer, unit i of the observed gradient
      gives x = dL/dW[:, i] / dL/db[i] (exact for ONE example; for a batch, a
      mixture, exact for j only at a unit where j alone is active). Each
      example's score is the best PSNR over the units: what an attacker who
      can tell which unit isolates whom would get (an upper bound for this
      attack). The same attack on each example's own plain gradient checks
      exact single-example recovery (``single_example_min_psnr``).
  (b) optimisation: cosine gradient matching with a TV prior
      (``gujax.audit.reconstruction.invert_gradient``, Adam, labels known to
      the attacker), reconstructions paired with originals by
      ``match_reconstructions``.

PSNR (dB, images in [0, 1], reconstructions clipped to [0, 1]; values above
``PSNR_CEILING`` dB, i.e. exact to float32 rounding, are reported as the
ceiling) and SSIM per example; per defense and attack the Spearman
correlation of PSNR with GNQ over all examples of all batches at a state.

The DP noise is that of a DP-SGD run of ``epochs`` epochs at batch size
``batch_size`` over ``num_train`` examples; ``train_epochs`` is how long the
``trained`` state is trained (the ``sgd`` arm).

Prints a table and a verdict per claim (exact single-example recovery; PSNR
rising with GNQ; DP-SGD and GNQ clipping lowering PSNR). Writes
<out>/reconstruction.json, <out>/reconstruction.png (originals beside each
defense's reconstructions for the first batch of each state, and PSNR vs GNQ)
and <out>/summary.txt (the printed table and verdicts).
"""
from __future__ import annotations

import dataclasses
import os
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from gujax.progress import progress_bar  # noqa: E402

import gujax.data as gd  # noqa: E402
from experiments import cli, harness, memorisation, registry  # noqa: E402
from experiments.cli import option  # noqa: E402
from experiments.report import format_table  # noqa: E402
from gujax.audit.reconstruction import (invert_dense_gradient, invert_gradient,  # noqa: E402
                                        match_reconstructions, psnr, ssim)
from gujax.arms import Arm, RunSize, run_policy  # noqa: E402
from gujax.grads import per_example_grads  # noqa: E402
from gujax.transforms import policy_transformation  # noqa: E402
from gujax.uniqueness import disclosure, gnq  # noqa: E402

NAME = "reconstruction"
DEFENSES = ("sgd", "dpsgd", "clip")
STATES = ("init", "trained")
# Reconstructions exact to float32 rounding have PSNR ~ 130 dB or +inf; they
# are all reported as this value.
PSNR_CEILING = 100.0


@dataclasses.dataclass(frozen=True)
class ReconstructionSettings(memorisation.MemorisationSettings):
    """The memorisation settings, and the model states, the attacked batches
    and the inversion."""
    states: tuple[str, ...] = option(STATES, "model states attacked: init (the seed's "
                                             "initialisation), trained (train_epochs of sgd)",
                                     choices=STATES)
    train_epochs: int = option(10, "epochs of plain SGD for the trained state")
    num_batches: int = option(6, "attacked batches per state")
    attack_batch_size: int = option(8, "examples per attacked batch (>= 2)")
    inversion_steps: int = option(1500, "Adam steps of the gradient-matching inversion")
    inversion_learning_rate: float = option(0.05, "the inversion's learning rate")
    tv_weight: float = option(1e-3, "weight of the inversion's total-variation prior")
    clip_quantile: float = option(0.5, "the clip defense's cap: this quantile of the batch's "
                                       "d_j")

    def check(self) -> None:
        super().check()
        if self.model != "mlp":
            raise ValueError("the analytic attack needs a dense first layer: use --model mlp")
        if self.attack_batch_size < 2:
            raise ValueError("attack_batch_size must be >= 2 (GNQ needs peers)")
        if self.num_batches * self.attack_batch_size > self.num_train:
            raise ValueError("num_batches * attack_batch_size exceeds num_train")


_DEFAULT = ReconstructionSettings(
    dataset="digits", seed=0, num_train=512, num_test=64,
    model="mlp", hidden=(64,), epochs=30, batch_size=64, learning_rate=0.1, momentum=0.9,
    method="ghost",
    states=STATES, train_epochs=10, num_batches=6, attack_batch_size=8,
    inversion_steps=1500, inversion_learning_rate=0.05, tv_weight=1e-3,
    reg=1e-2, clip_quantile=0.5, target_epsilon=8.0, delta=1e-5, clip_norm=1.0,
    progress=True,
    note="6 batches of 8 digits at the initialisation and after 10 epochs of SGD, MLP 64, "
         "1,500 inversion steps; a few minutes on 2 CPU cores.")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(_DEFAULT, num_train=128, hidden=(16,), batch_size=32,
                              train_epochs=1, num_batches=1, attack_batch_size=4,
                              inversion_steps=40, progress=False,
                              note="one batch of 4 digits, 40 inversion steps; a plumbing "
                                   "check in seconds, not a measurement."),
)
EXPERIMENT = cli.Experiment(NAME, __doc__, PRESETS)


def capped_psnr(reconstruction, original) -> float:
    return min(psnr(np.clip(reconstruction, 0, 1), original), PSNR_CEILING)


def best_unit_psnr(dense_grads, originals) -> np.ndarray:
    """(B,) for each original, the best PSNR over the first layer's units of
    x_i = dL/dW[:, i] / dL/db[i] (units with a zero bias gradient carry nothing)."""
    kernel, bias = np.asarray(dense_grads["kernel"]), np.asarray(dense_grads["bias"])
    live = np.abs(bias) > 0
    if not np.any(live):
        return np.zeros(len(originals))
    candidates = (kernel[:, live] / bias[live]).T  # (units, d_in)
    flat = originals.reshape(len(originals), -1)
    return np.array([max(capped_psnr(c, x) for c in candidates) for x in flat])


def defense_arms(settings: ReconstructionSettings, cap: float) -> dict[str, Arm]:
    """Each defense as the arm it is (``cli.make_arm`` of its text): DP-SGD
    at (target_epsilon, delta, clip_norm) from the settings, the clip arm at
    the batch's cap ``cap`` (nats)."""
    return {text: cli.make_arm(text, settings, cli.Thresholds(budget=float("inf"),
                                                             max_step=cap))
            for text in DEFENSES}


def observed_gradients(grads, settings: ReconstructionSettings, gnq_scores, key_seed: int
                       ) -> dict:
    """The aggregate gradient an attacker sees under each defense (a pytree
    each): one step of each arm's policy (``gujax.arms`` registry), built for
    a run of ``epochs`` epochs over ``num_train`` examples (DP-SGD's sigma,
    its expected batch ``batch_size`` and noise seeded by ``key_seed``), on
    this batch's per-example gradients."""
    b = len(gnq_scores)
    cap = float(np.quantile(np.asarray(disclosure(gnq_scores)), settings.clip_quantile))
    size = RunSize(train_size=settings.num_train, num_examples=b,
                   batch_size=settings.batch_size, epochs=settings.epochs, seed=key_seed)
    observed, states = {}, {}
    for text, arm in defense_arms(settings, cap).items():
        tx = policy_transformation(run_policy(arm, size))
        observed[text], states[text] = tx.update(grads, tx.init(None),
                                                 example_ids=jnp.arange(b))
    return {**observed, "clip_cap_nats": cap, "num_clipped": int(states["clip"].num_clipped)}


def attack_batch(model, params, images, labels, settings: ReconstructionSettings, key) -> dict:
    """Per-example GNQ, and per defense the PSNR/SSIM of both attacks."""
    loss = memorisation.xent_loss(model)
    grads = per_example_grads(lambda p, ex: loss(p, ex["x"], ex["y"]), params,
                              {"x": images, "y": jnp.asarray(labels)})
    scores = np.asarray(gnq(grads, reg=settings.reg))
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    observed = observed_gradients(grads, settings, scores, seed)
    single = [capped_psnr(invert_dense_gradient(jax.tree_util.tree_map(
        lambda g: g[j], grads)["Dense_0"]), images[j].reshape(-1))
        for j in range(len(images))]
    record = {"gnq": scores, "single_example_min_psnr": float(min(single)),
              "clip_cap_nats": observed["clip_cap_nats"],
              "num_clipped": observed["num_clipped"], "defenses": {}}
    originals = np.asarray(images)
    for d, defense in enumerate(DEFENSES):
        target = observed[defense]
        inversion = invert_gradient(memorisation.apply_fn(model), params, target,
                                    input_shape=images.shape[1:], num_examples=len(images),
                                    key=jax.random.fold_in(key, d), labels=jnp.asarray(labels),
                                    num_steps=settings.inversion_steps,
                                    learning_rate=settings.inversion_learning_rate,
                                    tv_weight=settings.tv_weight,
                                    steps_per_call=min(200, settings.inversion_steps))
        recon = np.clip(np.asarray(inversion.images), 0, 1)
        match = match_reconstructions(recon, originals)
        paired = recon[match.order]
        record["defenses"][defense] = {
            "analytic_psnr": best_unit_psnr(target["Dense_0"], originals),
            "inversion_psnr": np.minimum(match.psnr, PSNR_CEILING),
            "inversion_ssim": np.array([ssim(r, o) for r, o in zip(paired, originals)]),
            "inversion_objective_start": float(inversion.objective[0]),
            "inversion_objective_end": float(inversion.objective[-1]),
            "reconstructions": paired,
        }
    return record


def summarise(batches: list[dict]) -> dict:
    """Per defense: mean PSNR/SSIM and Spearman(PSNR, GNQ) pooled over batches,
    and the mean inversion PSNR of the examples whose d_j exceeded the
    gnq_clip cap in their batch (the ones GNQ clipping scales down)."""
    scores = np.concatenate([b["gnq"] for b in batches])
    over_cap = np.concatenate([np.asarray(disclosure(np.asarray(b["gnq"]))) > b["clip_cap_nats"]
                               for b in batches])
    out = {"gnq_median": float(np.median(scores)), "gnq_max": float(np.max(scores)),
           "single_example_min_psnr": min(b["single_example_min_psnr"] for b in batches),
           "num_examples": int(len(scores)), "num_over_clip_cap": int(over_cap.sum()),
           "defenses": {}}
    for defense in DEFENSES:
        per = {k: np.concatenate([b["defenses"][defense][k] for b in batches])
               for k in ("analytic_psnr", "inversion_psnr", "inversion_ssim")}
        rho_a, p_a = memorisation.spearman(per["analytic_psnr"], scores, with_p=True)
        rho_i, p_i = memorisation.spearman(per["inversion_psnr"], scores, with_p=True)
        out["defenses"][defense] = {
            "analytic_psnr_mean": float(per["analytic_psnr"].mean()),
            "analytic_psnr_median": float(np.median(per["analytic_psnr"])),
            "analytic_exact_fraction": float(np.mean(per["analytic_psnr"] >= PSNR_CEILING)),
            "inversion_psnr_mean": float(per["inversion_psnr"].mean()),
            "inversion_psnr_mean_over_clip_cap": float(per["inversion_psnr"][over_cap].mean())
            if over_cap.any() else None,
            "inversion_ssim_mean": float(per["inversion_ssim"].mean()),
            "spearman_analytic_psnr_vs_gnq": rho_a,
            "spearman_analytic_psnr_vs_gnq_p": p_a,
            "spearman_inversion_psnr_vs_gnq": rho_i,
            "spearman_inversion_psnr_vs_gnq_p": p_i,
        }
    return out


TABLE = [("state", "state", "{}"), ("defense", "defense", "{}"),
         ("analytic PSNR", "analytic_psnr_mean", "{:.1f}"),
         ("exact", "analytic_exact_fraction", "{:.2f}"),
         ("inv PSNR", "inversion_psnr_mean", "{:.1f}"),
         ("inv PSNR d>cap", "inversion_psnr_mean_over_clip_cap", "{:.1f}"),
         ("inv SSIM", "inversion_ssim_mean", "{:.3f}"),
         ("rho(analytic,GNQ)", "spearman_analytic_psnr_vs_gnq", "{:+.3f}"),
         ("rho(inv,GNQ)", "spearman_inversion_psnr_vs_gnq", "{:+.3f}")]


def table(summaries: dict) -> str:
    rows = [dict(d, state=state, defense=defense)
            for state, s in summaries.items() for defense, d in s["defenses"].items()]
    return (format_table(rows, TABLE) +
            f"\nPSNR in dB (capped at {PSNR_CEILING:g}), means over all attacked examples; "
            "analytic = best unit of the dense first layer, exact = fraction at the cap;\n"
            "inv = gradient-matching inversion; d>cap = the examples gnq_clip scales down; "
            "rho = Spearman over all examples of a state.")


SIGNIFICANCE = 0.05


def claims(summaries: dict) -> list[dict]:
    """The claims, checked against this run (see docs/memorisation.md)."""
    out = []
    for state, s in summaries.items():
        out.append(memorisation.claim(
            f"{state}: one example's gradient reveals it exactly (dense first layer, weight "
            "row / bias ratio)", s["single_example_min_psnr"] >= PSNR_CEILING,
            f"lowest PSNR over {s['num_examples']} examples: "
            f"{s['single_example_min_psnr']:.1f} dB (cap {PSNR_CEILING:g})"))
        plain = s["defenses"]["sgd"]
        for attack, key in (("inversion", "spearman_inversion_psnr_vs_gnq"),
                            ("analytic", "spearman_analytic_psnr_vs_gnq")):
            out.append(memorisation.correlation_claim(
                f"{state}: examples with a higher GNQ in their batch are reconstructed better "
                f"from the plain batch gradient ({attack} attack; PSNR vs GNQ)",
                plain[key], plain[key + "_p"], s["num_examples"], alpha=SIGNIFICANCE))
        dp = s["defenses"]["dpsgd"]
        out.append(memorisation.claim(
            f"{state}: DP-SGD's noise lowers reconstruction quality",
            dp["inversion_psnr_mean"] < plain["inversion_psnr_mean"]
            and dp["analytic_psnr_mean"] < plain["analytic_psnr_mean"],
            f"mean PSNR inversion plain {plain['inversion_psnr_mean']:.1f} vs DP-SGD "
            f"{dp['inversion_psnr_mean']:.1f} dB; analytic {plain['analytic_psnr_mean']:.1f} vs "
            f"{dp['analytic_psnr_mean']:.1f} dB"))
        clip = s["defenses"]["clip"]
        high_plain = plain["inversion_psnr_mean_over_clip_cap"]
        high_clip = clip["inversion_psnr_mean_over_clip_cap"]
        out.append(memorisation.claim(
            f"{state}: GNQ clipping lowers the reconstruction quality of the high-GNQ examples "
            "it scales down",
            None if high_plain is None else bool(high_clip < high_plain),
            "no example over the cap" if high_plain is None else
            f"mean inversion PSNR of the {s['num_over_clip_cap']} examples over the cap: plain "
            f"{high_plain:.1f} vs gnq_clip {high_clip:.1f} dB; analytic (all examples) "
            f"{plain['analytic_psnr_mean']:.1f} vs {clip['analytic_psnr_mean']:.1f} dB"))
    return out


def plot(path: str, results: dict) -> None:
    """Left: the first batch of each state, originals above each defense's
    inversion (GNQ of each example on top). Right: inversion PSNR vs GNQ per
    defense, all batches, one panel per state."""
    states = list(results)
    b = len(results[states[0]]["batches"][0]["gnq"])
    rows_per_state = 1 + len(DEFENSES)
    fig = plt.figure(figsize=(0.95 * b + 5.0, 0.95 * rows_per_state * len(states) + 0.6))
    left, right = fig.subfigures(1, 2, width_ratios=[0.95 * b + 0.6, 4.4])
    axes = left.subplots(rows_per_state * len(states), b, squeeze=False)
    for s, state in enumerate(states):
        batch = results[state]["batches"][0]
        rows = [("original", results[state]["originals"])] + [
            (d, batch["defenses"][d]["reconstructions"]) for d in DEFENSES]
        for r, (label, images) in enumerate(rows):
            for j in range(b):
                ax = axes[s * rows_per_state + r, j]
                ax.imshow(np.squeeze(images[j], -1) if images.shape[-1] == 1 else images[j],
                          cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{state}\n{label}" if r == 0 else label, fontsize=7)
                if r == 0:
                    ax.set_title(f"GNQ {batch['gnq'][j]:.3g}", fontsize=7)
                else:
                    psnr_j = batch["defenses"][label]["inversion_psnr"][j]
                    ax.set_xlabel(f"{psnr_j:.1f} dB", fontsize=6, labelpad=1)
    left.suptitle("originals and inversions (first batch)", fontsize=9)
    left.subplots_adjust(hspace=0.55, top=0.9, bottom=0.04)
    panels = right.subplots(len(states), 1, squeeze=False)[:, 0]
    for ax, state in zip(panels, states):
        scores = np.concatenate([x["gnq"] for x in results[state]["batches"]])
        for defense in DEFENSES:
            values = np.concatenate([x["defenses"][defense]["inversion_psnr"]
                                     for x in results[state]["batches"]])
            ax.scatter(scores, values, s=12, label=defense)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("GNQ of the example in its batch", fontsize=8)
        ax.set_ylabel("inversion PSNR (dB)", fontsize=8)
        ax.set_title(state, fontsize=9)
        ax.legend(fontsize=7)
    right.subplots_adjust(hspace=0.45, left=0.18, right=0.95, bottom=0.09)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare(run: cli.Run) -> tuple[gd.Dataset, object, float]:
    """The training subset, the model (checked to take its images) and
    DP-SGD's noise multiplier."""
    settings = run.settings
    train_set, _ = memorisation.load_subsets(settings)
    model = registry.build_model(settings, len(train_set.class_names),
                                train_set.images.shape[1:])
    return train_set, model, memorisation.dp_noise_multiplier(settings)


def execute(run: cli.Run, prepared: tuple[gd.Dataset, object, float]) -> dict:
    settings, out = run.settings, run.out
    train_set, model, noise_multiplier = prepared
    start = time.time()
    rng = np.random.default_rng(settings.seed)
    picks = rng.choice(len(train_set), settings.num_batches * settings.attack_batch_size,
                       replace=False).reshape(settings.num_batches, -1)
    results = {}
    for state in settings.states:
        # Each state its own DP noise and inversion starts.
        key = jax.random.fold_in(jax.random.key(settings.seed), STATES.index(state))
        if state == "init":
            params = registry.init_params(model, train_set.images.shape[1:], settings.seed)
        else:
            params = harness.train_arm(
                cli.make_arm("sgd", settings),
                dataclasses.replace(settings, epochs=settings.train_epochs), model,
                [(train_set.images, train_set.labels)], [settings.seed])[0].params
        batches = [attack_batch(model, params, np.asarray(gd.to_float(train_set.images[rows])),
                                train_set.labels[rows], settings, jax.random.fold_in(key, i))
                   for i, rows in enumerate(progress_bar(picks, desc=f"{state} batches",
                                                         disable=not settings.progress))]
        results[state] = {"batches": batches,
                          "originals": np.asarray(gd.to_float(train_set.images[picks[0]])),
                          "summary": summarise(batches)}
    plot(os.path.join(out, f"{NAME}.png"), results)
    record = memorisation.base_record(settings)
    record.update({
        "psnr_ceiling_db": PSNR_CEILING,
        "dp_noise_multiplier": noise_multiplier,
        "batch_ids": train_set.ids[picks],
        "states": {state: {"summary": r["summary"], "batches": [
            {**{k: v for k, v in b.items() if k != "defenses"},
             "defenses": {d: {k: v for k, v in rec.items() if k != "reconstructions"}
                          for d, rec in b["defenses"].items()}}
            for b in r["batches"]]} for state, r in results.items()},
    })
    summaries = {state: r["summary"] for state, r in results.items()}
    record["claims"] = claims(summaries)
    record["seconds"] = time.time() - start
    memorisation.write_results(out, NAME, record, title="Reconstruction from gradients",
                               table=table(summaries))
    return record


def main(argv=None) -> dict:
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
