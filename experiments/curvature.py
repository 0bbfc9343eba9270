"""Input-loss curvature of members and non-members under each training arm.

    python -m experiments.curvature                  # digits, a few minutes
    python -m experiments.curvature --preset smoke   # seconds
    python -m experiments.curvature --arms sgd dpsgd --num-probes 64 --num-shadow 16

For each arm (``sgd``, ``dpsgd`` at a calibrated epsilon, ``censor``, ``clip``;
see experiments/memorisation.py):

  * one target model is trained on the ``num_train`` members (the pool), with
    parameter snapshots at ``checkpoint_epochs`` along the one run. On ``num_audit``
    members and as many held-out non-members (the test split) the
    input-Hessian trace tr d^2 loss / dx^2 (Hutchinson, exact Hessian-vector
    products; ``gujax.audit.curvature.curvature_over_checkpoints``) is
    averaged over those checkpoints (Ravikumar et al. 2024; Garg et al. 2023).
    Inputs are pixels / 255, so curvature is in nats per (unit pixel)^2.
  * ``num_shadow`` shadow models of the same arm are trained on random halves
    of the pool (``gujax.audit.shadow.run_shadow_models``) and attacked in turn
    (``gujax.audit.shadow.attack``); each pool example's LiRA vulnerability
    is its mean online LiRA score over the shadow models that trained on it.

Reported per arm:
  * mean and median curvature of members and of non-members;
  * curvature as a membership signal: ROC AUC (``gujax.audit.metrics.auc``)
    with LOW curvature read as "member", fixed before looking (a fitted
    training example sits where the softmax is saturated and its input
    Hessian J^T (diag p - p p^T) J is small), and its one-sided Mann-Whitney
    p-value; an AUC below 0.5 says the opposite direction holds;
  * the loss-threshold attack's AUC on the target, and LiRA's (online, over
    the shadow models), as baselines;
  * Spearman correlations over the audited members of curvature with the
    target run's GNQ disclosure D_j, and with the LiRA vulnerability; and of
    D_j with the LiRA vulnerability (the GNQ claim, on the same examples).

Writes <out>/curvature.json, <out>/curvature.png (curvature histograms,
members vs non-members; curvature vs D_j; curvature vs LiRA vulnerability, per
arm) and <out>/summary.txt (the printed table and verdicts).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import gujax.data as gd  # noqa: E402
from experiments import cli, harness, memorisation, registry  # noqa: E402
from experiments.cli import option  # noqa: E402
from experiments.report import format_table  # noqa: E402
from gujax.audit.attacks import loss_scores  # noqa: E402
from gujax.audit.curvature import curvature_over_checkpoints  # noqa: E402
from gujax.audit.metrics import auc  # noqa: E402

NAME = "curvature"


@dataclasses.dataclass(frozen=True)
class CurvatureSettings(memorisation.ArmSettings):
    """The memorisation settings with arms, and the curvature estimate and
    the shadow models."""
    num_audit: int = option(256, "members and as many non-members whose curvature is measured")
    checkpoint_epochs: tuple[int, ...] = option(
        (20, 40, 60), "epochs whose parameters the curvature is averaged over (increasing, "
                      "the last = epochs)")
    num_probes: int = option(32, "Hutchinson probes per example and checkpoint")
    num_shadow: int = option(8, "shadow models per arm for LiRA (>= 3)")

    def check(self) -> None:
        super().check()
        epochs = self.checkpoint_epochs
        if list(epochs) != sorted(set(epochs)) or epochs[0] < 1 or epochs[-1] != self.epochs:
            raise ValueError(f"checkpoint_epochs must increase strictly from >= 1 to epochs = "
                             f"{self.epochs}, got {epochs}")
        if self.num_shadow < 3:
            raise ValueError(f"num_shadow must be >= 3 (LiRA fits IN/OUT variances from the "
                             f"other models), got {self.num_shadow}")
        if not 2 <= self.num_audit <= min(self.num_train, self.num_test):
            raise ValueError("num_audit must be in [2, min(num_train, num_test)], got "
                             f"{self.num_audit}")


_DEFAULT = CurvatureSettings(
    # 256 members and a wide MLP for 60 epochs: it overfits enough for
    # membership to be measurable (on 512 digits an MLP 64 generalises and both
    # curvature and the loss attack sit at chance, AUC 0.50).
    dataset="digits", seed=0, num_train=256, num_test=256, num_audit=256,
    model="mlp", hidden=(256,), epochs=60, checkpoint_epochs=(20, 40, 60), batch_size=64,
    learning_rate=0.1, momentum=0.9, method="ghost", arms=("sgd", "dpsgd", "censor", "clip"),
    num_probes=32, num_shadow=8,
    reg=1e-2, censor_quantile=0.9, clip_quantile=0.5,
    target_epsilon=8.0, delta=1e-5, clip_norm=1.0, progress=True,
    note="256 digit members and 256 non-members, MLP 256, 60 epochs, 8 shadow models per "
         "arm; a few minutes on 2 CPU cores.")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(_DEFAULT, num_train=128, num_test=64, num_audit=32, hidden=(16,),
                              epochs=2, checkpoint_epochs=(1, 2), batch_size=32, num_probes=4,
                              num_shadow=3, arms=("sgd", "dpsgd"), progress=False,
                              note="128 digits, 2 epochs, 3 shadow models; a plumbing check "
                                   "in seconds, not a measurement."),
)
EXPERIMENT = cli.Experiment(NAME, __doc__, PRESETS)


def lira_vulnerability(arm, settings: CurvatureSettings, model, data: dict):
    """Train ``num_shadow`` shadow models of ``arm`` on random halves of the
    pool and attack them: (ShadowAudit, ShadowRecord). The models live in a
    temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="curvature-shadow-") as workdir:
        record, audit = harness.shadow_audit(
            arm, settings, pool=data["train_set"], population=data["test_set"], model=model,
            num_models=settings.num_shadow, workdir=workdir, query_augmentations=("identity",),
            checkpoints=False)
    return audit, record


def curvature_audit(arm, settings: CurvatureSettings, model, data: dict) -> tuple[dict, object]:
    """Curvature and membership figures of one arm; (record, the target's ledger)."""
    target = harness.train_arm(arm, settings, model,
                               [(data["train_images"], data["train_labels"])], [settings.seed],
                               snapshot_epochs=settings.checkpoint_epochs)[0]
    # Host copies, all alike to jit: the curvature estimator compiles once.
    checkpoints = [jax.tree_util.tree_map(np.asarray, target.snapshots[e])
                   for e in settings.checkpoint_epochs]
    loss_fn = data["loss_fn"]
    key = jax.random.key(settings.seed)
    # Distinct probe streams for members and non-members (fold_in 0 / 1).
    members = curvature_over_checkpoints(
        loss_fn, checkpoints, data["members_x"], data["members_y"],
        key=jax.random.fold_in(key, 0), num_probes=settings.num_probes)
    non_members = curvature_over_checkpoints(
        loss_fn, checkpoints, data["non_members_x"], data["non_members_y"],
        key=jax.random.fold_in(key, 1), num_probes=settings.num_probes)
    curv_in, curv_out = np.asarray(members.trace), np.asarray(non_members.trace)
    curvature = np.concatenate([curv_in, curv_out])
    is_member = np.concatenate([np.ones(len(curv_in), bool), np.zeros(len(curv_out), bool)])
    logits = memorisation.apply_fn(model)(checkpoints[-1], np.concatenate(
        [data["members_x"], data["non_members_x"]]))
    loss_attack = np.asarray(loss_scores(logits, np.concatenate(
        [data["members_y"], data["non_members_y"]])))
    book = target.ledger
    disclosure = np.asarray(book.disclosure)[data["member_index"]]
    shadow, shadow_record = lira_vulnerability(arm, settings, model, data)
    vulnerability = shadow.vulnerability[data["member_index"]]
    rho_d, p_d = memorisation.spearman(curv_in, disclosure, with_p=True)
    rho_v, p_v = memorisation.spearman(curv_in, vulnerability, with_p=True)
    rho_dv, p_dv = memorisation.spearman(disclosure, vulnerability, with_p=True)
    record = {
        "members": {"mean": float(curv_in.mean()), "median": float(np.median(curv_in)),
                    "mean_stderr": float(np.mean(np.asarray(members.stderr)))},
        "non_members": {"mean": float(curv_out.mean()), "median": float(np.median(curv_out)),
                        "mean_stderr": float(np.mean(np.asarray(non_members.stderr)))},
        "auc_low_curvature_is_member": auc(-curvature, is_member),
        "auc_p_value": memorisation.auc_p_value(-curvature, is_member),
        "loss_attack_auc": auc(loss_attack, is_member),
        "lira_auc": float(shadow.evaluations["lira_online"].auc),
        "lira_tpr_at_1pct_fpr": shadow.evaluations["lira_online"].tpr_at(0.01),
        "spearman_curvature_vs_disclosure": rho_d,
        "spearman_curvature_vs_disclosure_p": p_d,
        "spearman_curvature_vs_lira": rho_v,
        "spearman_curvature_vs_lira_p": p_v,
        "spearman_disclosure_vs_lira": rho_dv,
        "spearman_disclosure_vs_lira_p": p_dv,
        "spearman_curvature_vs_loss_attack": memorisation.spearman(curvature, loss_attack),
        "num_members_with_lira": int(np.sum(np.isfinite(vulnerability))),
        "shadow_test_accuracy": float(np.mean(shadow_record.test_accuracy)),
        "test_accuracy": memorisation.accuracy(model, checkpoints[-1], data["test_images"],
                                         data["test_labels"]),
        "num_retired": int(np.sum(np.asarray(book.retired))),
        "per_example": {"member_curvature": curv_in, "non_member_curvature": curv_out,
                        "member_disclosure": disclosure, "member_lira": vulnerability},
    }
    return record, book


def _log10(values) -> np.ndarray:
    # tr H >= 0 for a ReLU MLP (J^T (diag p - pp^T) J is PSD) but a Hutchinson
    # estimate for other models can dip below zero; floor it for the log axis.
    return np.log10(np.maximum(np.asarray(values, np.float64), 1e-12))


def plot(path: str, arms: dict) -> None:
    """Row 1: histograms of log10 curvature, members vs non-members, per arm.
    Row 2: curvature vs disclosure D_j of the audited members, per arm.
    Row 3: curvature vs LiRA vulnerability of the audited members, per arm."""
    names = list(arms)
    fig, axes = plt.subplots(3, len(names), figsize=(3.6 * len(names), 9.6), squeeze=False)
    for i, arm in enumerate(names):
        r = arms[arm]
        per = r["per_example"]
        both = np.concatenate([_log10(per["member_curvature"]),
                               _log10(per["non_member_curvature"])])
        bins = np.linspace(both.min(), both.max() + 1e-9, 30)
        ax = axes[0, i]
        ax.hist(_log10(per["member_curvature"]), bins, alpha=0.6, label="members")
        ax.hist(_log10(per["non_member_curvature"]), bins, alpha=0.6, label="non-members")
        ax.set_title(f"{arm}: AUC {r['auc_low_curvature_is_member']:.3f}", fontsize=9)
        ax.set_xlabel("log10 input-loss curvature")
        if i == 0:
            ax.legend(fontsize=7)
        for row, key, label, log_x in (
                (1, "member_disclosure", "disclosure D_j (nats)", True),
                (2, "member_lira", "LiRA vulnerability (mean score as member)", False)):
            ax = axes[row, i]
            x = np.asarray(per[key], np.float64)
            # Log axes; the (rare) non-positive values are drawn at the floor.
            ax.scatter(np.maximum(x, 1e-6) if log_x else x,
                       10 ** _log10(per["member_curvature"]), s=6)
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_yscale("log")
            rho = r["spearman_curvature_vs_" + ("disclosure" if row == 1 else "lira")]
            ax.set_title(f"{arm}: Spearman {rho:.3f}" if rho is not None
                         else f"{arm}: Spearman n/a", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("curvature (members)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLE = [("arm", "arm", "{}"), ("test acc", "test_accuracy", "{:.3f}"),
         ("curv in", "curv_in", "{:.4g}"), ("curv out", "curv_out", "{:.4g}"),
         ("curv AUC", "auc_low_curvature_is_member", "{:.3f}"), ("p", "auc_p_value", "{:.2g}"),
         ("loss AUC", "loss_attack_auc", "{:.3f}"), ("LiRA AUC", "lira_auc", "{:.3f}"),
         ("rho(curv,D)", "spearman_curvature_vs_disclosure", "{:+.3f}"),
         ("rho(curv,LiRA)", "spearman_curvature_vs_lira", "{:+.3f}"),
         ("rho(D,LiRA)", "spearman_disclosure_vs_lira", "{:+.3f}"),
         ("retired", "num_retired", "{}")]


def table(arms: dict) -> str:
    rows = [dict(r, arm=arm, curv_in=r["members"]["median"], curv_out=r["non_members"]["median"])
            for arm, r in arms.items()]
    return (format_table(rows, TABLE) +
            "\ncurv in/out = median input-loss curvature (trace, averaged over checkpoints) of "
            "members / non-members;\ncurv AUC = membership AUC with low curvature read as "
            "member, p its one-sided Mann-Whitney p-value; rho over the audited members\n"
            "(D = the target run's disclosure D_j, LiRA = mean online LiRA score over the "
            "shadow models that trained on the example).")


SIGNIFICANCE = 0.05


def claims(arms: dict) -> list[dict]:
    """The papers' claims, checked against this run (see docs/memorisation.md).
    ``arms``: arm text -> record; "sgd" is plain SGD."""
    out = []
    for arm in arms:
        r = arms[arm]
        out.append(memorisation.claim(
            f"{arm}: members have lower input-loss curvature than non-members, so curvature "
            "is a membership signal (Ravikumar et al.)",
            r["auc_low_curvature_is_member"] > 0.5 and r["auc_p_value"] < SIGNIFICANCE,
            f"AUC {r['auc_low_curvature_is_member']:.3f} (one-sided p = "
            f"{r['auc_p_value']:.2g}); median curvature members "
            f"{r['members']['median']:.4g} vs non-members {r['non_members']['median']:.4g}; "
            f"loss-attack AUC {r['loss_attack_auc']:.3f}, LiRA AUC {r['lira_auc']:.3f}"))
    for arm in arms:
        r = arms[arm]
        for key, text in (
                ("curvature_vs_lira", "higher curvature goes with higher LiRA vulnerability "
                                      "among members: curvature tracks memorisation (Garg et "
                                      "al.; Ravikumar et al.)"),
                ("curvature_vs_disclosure", "higher curvature goes with higher GNQ disclosure "
                                            "D_j among members"),
                ("disclosure_vs_lira", "higher GNQ disclosure D_j goes with higher LiRA "
                                       "vulnerability among members (the GNQ claim)")):
            n = (r["num_members_with_lira"] if key.endswith("lira")
                 else len(r["per_example"]["member_curvature"]))
            out.append(memorisation.correlation_claim(
                f"{arm}: {text}", r[f"spearman_{key}"], r[f"spearman_{key}_p"], n,
                alpha=SIGNIFICANCE))
    if "sgd" in arms:
        for arm in arms:
            if cli.arm_kind_of(arm) == "sgd":
                continue
            plain, other = arms["sgd"], arms[arm]

            def signal(r):
                return (r["auc_low_curvature_is_member"] > 0.5
                        and r["auc_p_value"] < SIGNIFICANCE)

            out.append(memorisation.claim(
                f"{arm} removes the member/non-member curvature gap that plain SGD shows (DP "
                "bounds curvature, Ravikumar et al.; asked of the GNQ defenses too)",
                not signal(other) if signal(plain) else None,
                f"curvature AUC plain {plain['auc_low_curvature_is_member']:.3f} (p = "
                f"{plain['auc_p_value']:.2g}), {arm} {other['auc_low_curvature_is_member']:.3f} "
                f"(p = {other['auc_p_value']:.2g}); mean member curvature plain "
                f"{plain['members']['mean']:.4g}, {arm} {other['members']['mean']:.4g}" +
                ("" if signal(plain) else "; undetermined: curvature separates no members from "
                                          "non-members under plain SGD in this run")))
    return out


def prepare_data(settings: CurvatureSettings) -> dict:
    train_set, test_set = memorisation.load_subsets(settings)
    rng = np.random.default_rng(settings.seed)
    member_index = np.sort(rng.choice(len(train_set), settings.num_audit, replace=False))
    out_index = np.sort(rng.choice(len(test_set), settings.num_audit, replace=False))
    return dict(
        train_set=train_set, test_set=test_set,
        train_images=train_set.images, train_labels=train_set.labels,
        member_index=member_index,
        members_x=np.asarray(gd.to_float(train_set.images[member_index])),
        members_y=train_set.labels[member_index],
        non_members_x=np.asarray(gd.to_float(test_set.images[out_index])),
        non_members_y=test_set.labels[out_index],
        test_images=test_set.images, test_labels=test_set.labels,
        num_classes=len(train_set.class_names))


def prepare(run: cli.Run) -> tuple[dict, object]:
    """The data (``prepare_data``) and the model, checked to take its images,
    and the shadow models' batches checked against their training sets."""
    settings = run.settings
    data = prepare_data(settings)
    model = registry.build_model(settings, data["num_classes"], data["train_images"].shape[1:])
    harness.check_shadow_audit(
        cli.make_arm("sgd", settings), settings, pool=data["train_set"],
        population=data["test_set"], model=model, num_models=settings.num_shadow,
        query_augmentations=("identity",))
    return data, model


def execute(run: cli.Run, prepared: tuple[dict, object]) -> dict:
    settings, out = run.settings, run.out
    data, model = prepared
    start = time.time()
    data["loss_fn"] = memorisation.xent_loss(model)  # one object: curvature compiles once
    results, thresholds = memorisation.run_arms(
        settings, lambda text, arm: curvature_audit(arm, settings, model, data), model,
        data["train_images"], data["train_labels"])
    record = memorisation.base_record(settings)
    record.update({
        "gnq_thresholds": thresholds._asdict(),
        "dp_noise_multiplier": memorisation.dp_noise_multiplier(settings)
        if "dpsgd" in settings.arms else None,
        "arms": results,
        "claims": claims(results),
        "seconds": time.time() - start,
    })
    plot(os.path.join(out, f"{NAME}.png"), results)
    memorisation.write_results(out, NAME, record, title="Input-loss curvature",
                               table=table(results))
    return record


def main(argv=None) -> dict:
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
