"""Input-loss curvature of members and non-members under each training arm.

    python -m experiments.curvature                  # digits, a few minutes
    python -m experiments.curvature --preset smoke   # seconds
    python -m experiments.curvature --arms plain dpsgd --num-probes 64 --num-shadow 16

For each arm (plain SGD, DP-SGD at a calibrated epsilon, GNQ censor, GNQ clip;
see experiments/_memorisation_common.py):

  * one target model is trained on the ``num_train`` members (the pool), with
    checkpoints at ``checkpoint_epochs`` along the run. On ``num_audit``
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

import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import gujax.data as gd  # noqa: E402
from experiments import _memorisation_common as common  # noqa: E402
from gujax.arms import ledger  # noqa: E402
from gujax.audit.attacks import loss_scores  # noqa: E402
from gujax.audit.curvature import curvature_over_checkpoints  # noqa: E402
from gujax.audit.metrics import auc  # noqa: E402
from gujax.audit.shadow import attack, run_shadow_models  # noqa: E402

NAME = "curvature"

_DEFAULT = dict(
    # 256 members and a wide MLP for 60 epochs: it overfits enough for
    # membership to be measurable (on 512 digits an MLP 64 generalises and both
    # curvature and the loss attack sit at chance, AUC 0.50).
    dataset="digits", data_dir=None, seed=0, num_train=256, num_test=256, num_audit=256,
    model="mlp", hidden=(256,), epochs=60, checkpoint_epochs=(20, 40, 60), batch_size=64,
    learning_rate=0.1, momentum=0.9, method="explicit", arms=common.ARMS, num_probes=32,
    num_shadow=8,
    gnq_reg=1e-2, censor_quantile=0.9, clip_quantile=0.5,
    target_epsilon=8.0, delta=1e-5, l2_norm_clip=1.0, progress=True)
PRESETS = {
    "default": _DEFAULT,
    "smoke": dict(_DEFAULT, num_train=128, num_test=64, num_audit=32, hidden=(16,), epochs=2,
                  checkpoint_epochs=(1, 2), batch_size=32, num_probes=4, num_shadow=3,
                  arms=("plain", "dpsgd"), progress=False),
}


def check_settings(settings: dict) -> None:
    epochs = settings["checkpoint_epochs"]
    if list(epochs) != sorted(set(epochs)) or epochs[0] < 1 or epochs[-1] != settings["epochs"]:
        raise ValueError(f"checkpoint_epochs must increase strictly from >= 1 to epochs = "
                         f"{settings['epochs']}, got {epochs}")
    if settings["num_shadow"] < 3:
        raise ValueError(f"num_shadow must be >= 3 (LiRA fits IN/OUT variances from the "
                         f"other models), got "
                         f"{settings['num_shadow']}")
    if not 2 <= settings["num_audit"] <= min(settings["num_train"], settings["num_test"]):
        raise ValueError("num_audit must be in [2, min(num_train, num_test)], got "
                         f"{settings['num_audit']}")


def train_with_checkpoints(arm: str, settings: dict, model, images, labels, thresholds):
    """Params at each of ``checkpoint_epochs`` along ONE run, and the final
    aggregator state (the run is resumed from the trainer's checkpoint)."""
    checkpoints, result = [], None
    with tempfile.TemporaryDirectory(prefix=f"curvature-{arm}-") as workdir:
        for epochs in settings["checkpoint_epochs"]:
            result = common.train_arm(arm, settings, model, images, labels,
                                      seed=settings["seed"], thresholds=thresholds,
                                      epochs=epochs, workdir=workdir)
            # Host copies: params restored from a checkpoint and fresh ones must
            # look alike to jit, or the curvature estimator recompiles per checkpoint.
            checkpoints.append(jax.tree_util.tree_map(np.asarray, result.params))
    return checkpoints, result.aggregator_state


def lira_vulnerability(arm: str, settings: dict, model, data: dict, thresholds):
    """Train ``num_shadow`` shadow models of ``arm`` on random halves of the
    pool and attack them: (ShadowAudit, ShadowRecord). The models live in a
    temporary folder, removed afterwards."""
    spec = common.make_arm(arm, settings, thresholds)
    config = common.train_config(settings, spec, seed=settings["seed"])
    with tempfile.TemporaryDirectory(prefix=f"curvature-shadow-{arm}-") as workdir:
        record = run_shadow_models(
            spec, pool=data["train_set"], population=data["test_set"], model=model,
            config=config, num_models=settings["num_shadow"], workdir=workdir,
            seed=settings["seed"], augmentations=("identity",), resume=False,
            checkpoints=False, method=settings["method"], progress=settings["progress"])
    # ks: top-k precision of D_j vs LiRA is not used here; k = 1 always fits (a larger
    # k can exceed the examples with finite scores when the shadows are few).
    return attack(record, ks=(1,)), record


def audit_arm(arm: str, settings: dict, model, data: dict, thresholds) -> tuple[dict, object]:
    """Curvature and membership figures of one arm; (record, final aggregator state)."""
    checkpoints, state = train_with_checkpoints(arm, settings, model, data["train_images"],
                                                data["train_labels"], thresholds)
    loss_fn = data["loss_fn"]
    key = jax.random.key(settings["seed"])
    # Distinct probe streams for members and non-members (fold_in 0 / 1).
    members = curvature_over_checkpoints(
        loss_fn, checkpoints, data["members_x"], data["members_y"],
        key=jax.random.fold_in(key, 0), num_probes=settings["num_probes"])
    non_members = curvature_over_checkpoints(
        loss_fn, checkpoints, data["non_members_x"], data["non_members_y"],
        key=jax.random.fold_in(key, 1), num_probes=settings["num_probes"])
    curv_in, curv_out = np.asarray(members.trace), np.asarray(non_members.trace)
    curvature = np.concatenate([curv_in, curv_out])
    is_member = np.concatenate([np.ones(len(curv_in), bool), np.zeros(len(curv_out), bool)])
    logits = common.apply_fn(model)(checkpoints[-1], np.concatenate(
        [data["members_x"], data["non_members_x"]]))
    loss_attack = np.asarray(loss_scores(logits, np.concatenate(
        [data["members_y"], data["non_members_y"]])))
    book = ledger(state)
    disclosure = np.asarray(book.disclosure)[data["member_index"]]
    shadow, shadow_record = lira_vulnerability(arm, settings, model, data, thresholds)
    vulnerability = shadow.vulnerability[data["member_index"]]
    rho_d, p_d = common.spearman(curv_in, disclosure, with_p=True)
    rho_v, p_v = common.spearman(curv_in, vulnerability, with_p=True)
    rho_dv, p_dv = common.spearman(disclosure, vulnerability, with_p=True)
    record = {
        "members": {"mean": float(curv_in.mean()), "median": float(np.median(curv_in)),
                    "mean_stderr": float(np.mean(np.asarray(members.stderr)))},
        "non_members": {"mean": float(curv_out.mean()), "median": float(np.median(curv_out)),
                        "mean_stderr": float(np.mean(np.asarray(non_members.stderr)))},
        "auc_low_curvature_is_member": auc(-curvature, is_member),
        "auc_p_value": common.auc_p_value(-curvature, is_member),
        "loss_attack_auc": auc(loss_attack, is_member),
        "lira_auc": float(shadow.evaluations["lira_online"].auc),
        "lira_tpr_at_1pct_fpr": float(shadow.evaluations["lira_online"].tpr_at_fpr[1]),
        "spearman_curvature_vs_disclosure": rho_d,
        "spearman_curvature_vs_disclosure_p": p_d,
        "spearman_curvature_vs_lira": rho_v,
        "spearman_curvature_vs_lira_p": p_v,
        "spearman_disclosure_vs_lira": rho_dv,
        "spearman_disclosure_vs_lira_p": p_dv,
        "spearman_curvature_vs_loss_attack": common.spearman(curvature, loss_attack),
        "num_members_with_lira": int(np.sum(np.isfinite(vulnerability))),
        "shadow_test_accuracy": float(np.mean(shadow_record.test_accuracy)),
        "test_accuracy": common.accuracy(model, checkpoints[-1], data["test_images"],
                                         data["test_labels"]),
        "num_retired": int(np.sum(np.asarray(book.retired))),
        "per_example": {"member_curvature": curv_in, "non_member_curvature": curv_out,
                        "member_disclosure": disclosure, "member_lira": vulnerability},
    }
    return record, state


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
    return (common.format_table(rows, TABLE) +
            "\ncurv in/out = median input-loss curvature (trace, averaged over checkpoints) of "
            "members / non-members;\ncurv AUC = membership AUC with low curvature read as "
            "member, p its one-sided Mann-Whitney p-value; rho over the audited members\n"
            "(D = the target run's disclosure D_j, LiRA = mean online LiRA score over the "
            "shadow models that trained on the example).")


SIGNIFICANCE = 0.05


def claims(arms: dict) -> list[dict]:
    """The papers' claims, checked against this run (see docs/memorisation.md)."""
    out = []
    for arm in arms:
        r = arms[arm]
        out.append(common.claim(
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
            out.append(common.correlation_claim(
                f"{arm}: {text}", r[f"spearman_{key}"], r[f"spearman_{key}_p"], n,
                alpha=SIGNIFICANCE))
    if "plain" in arms:
        for arm in ("dpsgd", "gnq_censor", "gnq_clip"):
            if arm not in arms:
                continue
            plain, other = arms["plain"], arms[arm]

            def signal(r):
                return (r["auc_low_curvature_is_member"] > 0.5
                        and r["auc_p_value"] < SIGNIFICANCE)

            out.append(common.claim(
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


def prepare_data(settings: dict) -> dict:
    train_set, test_set = common.load_data(settings)
    rng = np.random.default_rng(settings["seed"])
    member_index = np.sort(rng.choice(len(train_set), settings["num_audit"], replace=False))
    out_index = np.sort(rng.choice(len(test_set), settings["num_audit"], replace=False))
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


def main(argv=None) -> dict:
    settings, out = common.parse_settings(argv, name=NAME, description=__doc__,
                                          presets=PRESETS)
    check_settings(settings)
    common.start_run(out)
    start = time.time()
    data = prepare_data(settings)
    model = common.make_model(settings, data["num_classes"])
    data["loss_fn"] = common.xent_loss(model)  # one object: curvature compiles once
    results, thresholds = common.run_arms(
        settings, lambda arm, th: audit_arm(arm, settings, model, data, th), model,
        data["train_images"], data["train_labels"])
    record = common.base_record(settings)
    record.update({
        "gnq_thresholds": thresholds._asdict(),
        "dp_noise_multiplier": common.dp_noise_multiplier(settings)
        if "dpsgd" in settings["arms"] else None,
        "arms": results,
        "claims": claims(results),
        "seconds": time.time() - start,
    })
    plot(os.path.join(out, f"{NAME}.png"), results)
    common.write_json(os.path.join(out, f"{NAME}.json"), record)
    common.report("Input-loss curvature", table(results), record["claims"], out, settings)
    return record


if __name__ == "__main__":
    main()
