"""The memorisation experiments (experiments/unique_features.py, curvature.py,
reconstruction.py) and their shared helpers (experiments/memorisation.py, on
the experiment harness experiments/cli.py).

Helper tests are fast and check the maths against independent computations;
the end-to-end smoke runs check each experiment's JSON schema, value ranges
and figure.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli, curvature, harness, reconstruction, report, unique_features
from experiments import memorisation as common
from gujax.arms import Arm
from gujax.grads import per_example_grads
from gujax.models import MLP
from gujax.privacy import dp_epsilon
from gujax.transforms import gnq_monitor


def _tiny_grads(seed=0, batch=6):
    model = MLP(hidden=(5,), num_classes=3)
    x = jax.random.uniform(jax.random.key(seed), (batch, 2, 2, 1))
    y = jnp.arange(batch) % 3
    params = model.init(jax.random.key(1), x[:1])["params"]
    loss = common.xent_loss(model)
    grads = per_example_grads(lambda p, ex: loss(p, ex["x"], ex["y"]), params,
                              {"x": x, "y": y})
    return model, params, x, y, grads


# ----------------------------------------------------------------------------
# Helpers.

def test_settings_from_preset_with_overrides():
    settings, out, *_ = cli.parse_command_line(
        ["--preset", "smoke", "--epochs", "3", "--arms", "sgd", "dpsgd",
         "--hidden", "7", "9", "--progress", "false"], unique_features.EXPERIMENT)
    assert settings.epochs == 3 and settings.arms == ("sgd", "dpsgd")
    assert settings.hidden == (7, 9) and settings.progress is False
    assert settings.num_train == unique_features.PRESETS["smoke"].num_train
    assert out == os.path.join("results", "unique_features-smoke")


@pytest.mark.parametrize("argv", [["--arms", "plain", "sgd"], ["--model", "vit"],
                                  ["--preset", "huge"], ["--epochs", "two"],
                                  ["--method", "magic"]])
def test_settings_refuse_bad_values(argv):
    with pytest.raises(cli.UsageError):
        cli.parse_command_line(argv, curvature.EXPERIMENT)


def test_percentile_rank():
    values = [3.0, 1.0, 2.0, 2.0, 5.0]
    assert common.percentile_rank(values, 4) == 100.0
    assert common.percentile_rank(values, 1) == 0.0
    # 2.0 at index 2: one strictly below (1.0), one tie (index 3) counted half.
    assert common.percentile_rank(values, 2) == pytest.approx(100 * 1.5 / 4)


def test_spearman_is_none_for_constant_input():
    assert common.spearman([1, 1, 1], [1, 2, 3]) is None
    assert common.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_drops_non_finite_pairs_and_gives_p():
    a = [1.0, 2.0, np.nan, 3.0, 4.0, 5.0]
    b = [2.0, 4.0, 1.0, 6.0, np.inf, 10.0]
    rho, p = common.spearman(a, b, with_p=True)
    assert rho == pytest.approx(1.0) and p < 0.05
    assert common.spearman([1.0, np.nan], [2.0, 3.0], with_p=True) == (None, None)


def test_auc_p_value_small_only_for_separated_scores():
    member = np.array([True] * 10 + [False] * 10)
    assert common.auc_p_value(np.r_[np.arange(10, 20), np.arange(10)], member) < 1e-3
    assert common.auc_p_value(np.r_[np.arange(10), np.arange(10, 20)], member) > 0.99


def test_correlation_claim_verdicts():
    supported = common.correlation_claim("x", 0.5, 0.01, 30)
    weak = common.correlation_claim("x", 0.5, 0.2, 30)
    negative = common.correlation_claim("x", -0.5, 0.01, 30)
    constant = common.correlation_claim("x", None, None, 30)
    assert supported["verdict"] == "supported"
    assert weak["verdict"] == "NOT supported" and "not significant" in weak["evidence"]
    assert negative["verdict"] == "NOT supported" and "not positive" in negative["evidence"]
    assert constant["verdict"] == "undetermined"


def test_format_table_aligns_and_marks_missing():
    text = report.format_table([{"a": "x", "b": 1.25}, {"a": "long name", "b": None}],
                               [("A", "a", "{}"), ("B", "b", "{:.1f}")])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[2].endswith("1.2") and lines[3].endswith("-")


def test_make_arm_maps_experiment_arms_to_gujax_arms():
    settings = dataclasses.replace(unique_features.PRESETS["smoke"], reg=0.02,
                                   target_epsilon=3.0, delta=1e-6, clip_norm=0.7)
    th = cli.Thresholds(budget=1.5, max_step=0.01)
    assert cli.make_arm("sgd", settings) == Arm("sgd", reg=0.02)
    assert cli.make_arm("dpsgd", settings) == Arm("dpsgd", epsilon=3.0, delta=1e-6,
                                                      clip_norm=0.7)
    assert cli.make_arm("censor", settings, th) == Arm("censor", reg=0.02, budget=1.5)
    assert cli.make_arm("clip", settings, th) == Arm("clip", reg=0.02, max_step=0.01)
    with pytest.raises(ValueError, match="thresholds"):
        cli.make_arm("censor", settings)
    with pytest.raises(ValueError, match="unknown arm"):
        cli.make_arm("plain", settings)


def test_dp_noise_multiplier_meets_the_target_epsilon():
    settings = dataclasses.replace(unique_features.PRESETS["smoke"], target_epsilon=4.0,
                                   delta=1e-5, batch_size=32, num_train=256, epochs=3)
    sigma = common.dp_noise_multiplier(settings)
    steps = 3 * (256 // 32)
    eps = dp_epsilon(sigma, 32 / 256, steps, 1e-5, sampling="poisson")
    assert eps <= 4.0 + 1e-6
    # Calibrated, not just safe: 5% less noise overshoots the target.
    assert dp_epsilon(0.95 * sigma, 32 / 256, steps, 1e-5, sampling="poisson") > 4.0
    assert common.dp_noise_multiplier(settings, train_size=128) > sigma  # fewer examples


def test_gnq_thresholds_are_quantiles_of_the_plain_ledger():
    *_, grads = _tiny_grads()
    tx = gnq_monitor(num_examples=8, reg=0.1)
    state = tx.init(None)
    for ids in ([0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]):
        _, state = tx.update(grads, state, example_ids=jnp.array(ids))
    th = common.gnq_thresholds(state, dataclasses.replace(
        unique_features.PRESETS["smoke"], censor_quantile=0.75, clip_quantile=0.5))
    d = np.asarray(state.disclosure)
    used = np.asarray(state.steps_used)
    assert th.budget == pytest.approx(np.quantile(d, 0.75))
    assert th.max_step == pytest.approx(np.median(d / used))


def test_carrier_ledger_rank_percentile_and_refusal():
    state = gnq_monitor(num_examples=5, reg=0.1).init(None)
    state = state._replace(
        disclosure=jnp.array([0.5, 3.0, 0.0, 1.0, 2.0]),
        cumulative_gnq=jnp.array([1.0, 8.0, 0.0, 2.0, 4.0]),
        times_scored=jnp.array([2, 4, 0, 2, 2], jnp.int32),
        steps_used=jnp.array([2, 2, 0, 2, 2], jnp.int32),
        retired=jnp.array([False, True, False, False, False]))
    top = unique_features.carrier_ledger(state, 1)
    # Example 2 was never scored: ranked among the 4 others only.
    assert top["num_ranked"] == 4 and top["disclosure_rank"] == 1
    assert top["disclosure_percentile"] == 100.0 and top["mean_gnq"] == 4.0
    assert top["retired"] and top["refused"] and top["refused_steps"] == 2
    low = unique_features.carrier_ledger(state, 0)
    assert low["disclosure_rank"] == 4 and low["disclosure_percentile"] == 0.0
    assert not low["refused"]
    mid = unique_features.carrier_ledger(state, 4)
    assert mid["disclosure_rank"] == 2 and mid["disclosure_percentile"] == pytest.approx(
        100 * 2 / 3)


def _uf_arm(z, p, refused=False):
    return {"memorisation": {"z_score": z, "ratio": 1.0, "p_value": p},
            "target_carrier": {"disclosure_percentile": 95.0, "disclosure_nats": 1.0,
                               "disclosure_rank": 3, "num_ranked": 64, "retired": refused,
                               "refused": refused, "refused_steps": int(refused),
                               "times_scored": 5},
            "reference_carrier_disclosure_percentile": [10.0, 20.0]}


def test_unique_feature_verdicts_follow_the_scores():
    settings = dataclasses.replace(unique_features.PRESETS["smoke"], num_reference=2)
    floor = 1 / 3

    def verdicts(arms):
        return [c["verdict"] for c in unique_features.claims(arms, settings)]

    # Plain memorises; DP-SGD does not; the censor refused the carrier and z fell.
    assert verdicts({"sgd": _uf_arm(5.0, floor), "dpsgd": _uf_arm(0.3, 0.67),
                     "censor": _uf_arm(0.1, 0.67, refused=True)}) == \
        ["supported", "supported", "supported", "supported"]
    # A censor that never refused the carrier cannot be credited with the drop.
    assert verdicts({"sgd": _uf_arm(5.0, floor), "censor": _uf_arm(0.1, 0.67)})[-1] \
        == "NOT supported"
    # High z but another reference above the target: not memorised.
    assert verdicts({"sgd": _uf_arm(5.0, 0.67)})[0] == "NOT supported"
    # Nothing memorised under plain SGD: whether a defense prevents it is undetermined.
    assert verdicts({"sgd": _uf_arm(0.5, 0.67), "dpsgd": _uf_arm(0.1, 0.67)})[-1] == \
        "undetermined"


def test_feature_lands_on_the_patch_only():
    settings = dataclasses.replace(unique_features.PRESETS["smoke"], feature_row=2,
                                   feature_col=1)
    images = np.full((3, 8, 8, 1), 40, np.uint8)
    featured = unique_features.add_feature(images, settings)
    changed = np.any(featured != images, axis=(0, -1))
    size = settings.patch_size
    assert changed[2:2 + size, 1:1 + size].any() and not changed[:2].any()
    assert not changed[:, 1 + size:].any()
    np.testing.assert_array_equal(featured[:, 2:2 + size, 1:1 + size, 0],
                                  np.broadcast_to(unique_features.checkerboard(size, 1)[..., 0],
                                                  (3, size, size)))


def test_best_unit_psnr_exact_for_one_example_not_for_a_batch():
    _, _, x, _, grads = _tiny_grads(batch=6)
    originals = np.asarray(x)
    one = jax.tree_util.tree_map(lambda g: g[2], grads)["Dense_0"]
    assert reconstruction.best_unit_psnr(one, originals[2:3])[0] == \
        reconstruction.PSNR_CEILING
    mean = jax.tree_util.tree_map(lambda g: g.mean(0), grads)["Dense_0"]
    assert np.all(reconstruction.best_unit_psnr(mean, originals) <=
                  reconstruction.PSNR_CEILING)


@pytest.mark.parametrize("module,argv,match", [
    (unique_features, ["--num-reference", "1"], "num_reference"),
    (curvature, ["--checkpoint-epochs", "5", "3"], "checkpoint_epochs"),
    (curvature, ["--num-audit", "1"], "num_audit"),
    (curvature, ["--num-shadow", "2"], "num_shadow"),
    (reconstruction, ["--model", "smallcnn"], "dense first layer"),
    (reconstruction, ["--attack-batch-size", "1"], "attack_batch_size"),
    (unique_features, ["--batch-size", "500"], "exceeds num_train"),
    (curvature, ["--batch-size", "60"], "smallest shadow training set"),
    (unique_features, ["--censor-quantile", "2"], "censor_quantile"),
    (unique_features, ["--num-train", "5000"], "num_train must be 0 (all) or in"),
])
def test_bad_settings_fail_before_compute(module, argv, match, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        module.main(["--preset", "smoke", "--out", str(out)] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_a_folder_in_use_is_refused_and_ctrl_c_says_so(tmp_path, monkeypatch, capsys):
    """The memorisation experiments cannot resume: they offer --overwrite alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.txt").write_text("an earlier run")
    with pytest.raises(SystemExit) as info:
        unique_features.main(["--preset", "smoke", "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--overwrite" in err and "--resume" not in err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(harness, "train_arm", interrupted)
    with pytest.raises(SystemExit) as info:
        unique_features.main(["--preset", "smoke", "--out", str(out), "--overwrite"])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted (unique_features cannot resume): what it wrote in {out} is incomplete; "
        "run it again with --overwrite")
    assert not (out / "summary.txt").exists() and (out / "run.json").exists()


# ----------------------------------------------------------------------------
# End-to-end smoke runs (each once per module; about 20-40 s each on 2 cores).

VERDICTS = {"supported", "NOT supported", "undetermined"}


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _run(module, name, out, argv=()):
    module.main(["--preset", "smoke", "--out", str(out), *argv])
    with open(out / f"{name}.json") as f:
        record = json.load(f)
    assert os.path.getsize(out / f"{name}.png") > 1000
    with open(out / "summary.txt") as f:
        summary = f.read()
    for c in record["claims"]:
        assert c["verdict"] in VERDICTS and c["claim"] and c["evidence"]
        assert f"[{c['verdict']}] {c['claim']}" in summary
    assert record["settings"]["preset"] == "smoke"
    # An MLP run records the MLP's settings, not the other models'.
    assert "hidden" in record["settings"]
    assert not {"widths", "depth", "width"} & set(record["settings"])
    return record


@pytest.fixture(scope="module")
def unique_features_run(tmp_path_factory):
    return _run(unique_features, "unique_features", tmp_path_factory.mktemp("uf"))


def test_unique_features_smoke(unique_features_run, capsys):
    record = unique_features_run
    settings = unique_features.PRESETS["smoke"]
    assert set(record["arms"]) == set(settings.arms) == {"sgd", "dpsgd", "censor"}
    assert 0 <= record["carrier_index"] < settings.num_train
    assert record["num_ood_images"] > 0
    for arm, r in record["arms"].items():
        score = r["memorisation"]
        assert score["num_reference"] == settings.num_reference
        assert score["target_mean_kl"] >= 0 and score["reference_mean_kl"] >= 0
        assert 1 / (settings.num_reference + 1) <= score["p_value"] <= 1
        carrier = r["target_carrier"]
        assert 0 <= carrier["disclosure_percentile"] <= 100
        assert 1 <= carrier["disclosure_rank"] <= carrier["num_ranked"] <= settings.num_train
        assert carrier["disclosure_nats"] >= 0 and carrier["mean_gnq"] >= 0
        assert 0 <= carrier["steps_used"] <= carrier["times_scored"]
        assert carrier["refused"] == (carrier["retired"] or carrier["refused_steps"] > 0)
        if arm != "censor":
            assert not carrier["refused"]  # only the censor refuses examples
        assert len(r["reference_carrier_disclosure_percentile"]) == settings.num_reference
        assert 0 <= r["target_test_accuracy"] <= 1
        assert -1 <= r["target_label_shift"] <= 1
    # The budget is the plain run's censor_quantile quantile of D_j: about
    # 1 - q of the examples would overrun it, so the censor retires some.
    assert record["gnq_thresholds"]["budget"] > 0
    assert record["arms"]["censor"]["target_carrier"]["num_retired"] > 0
    assert record["dp_noise_multiplier"] > 0
    # DP-SGD's ledger: one step discloses at most 1/2 log(1 + 1/sigma^2) nats.
    sigma = record["dp_noise_multiplier"]
    carrier = record["arms"]["dpsgd"]["target_carrier"]
    assert carrier["disclosure_nats"] <= carrier["times_scored"] * 0.5 * math.log1p(
        sigma ** -2) + 1e-5
    assert [c["claim"].split(" ")[0] for c in record["claims"]][:2] == ["Plain", "GNQ"]


def test_unique_features_is_deterministic(unique_features_run, tmp_path):
    """The plain arm again, alone: the same numbers (its record does not depend
    on the other arms)."""
    again = _run(unique_features, "unique_features", tmp_path, ["--arms", "sgd"])
    assert again["arms"]["sgd"] == unique_features_run["arms"]["sgd"]
    assert again["carrier_index"] == unique_features_run["carrier_index"]


def test_curvature_smoke(tmp_path):
    record = _run(curvature, "curvature", tmp_path)
    settings = curvature.PRESETS["smoke"]
    assert set(record["arms"]) == set(settings.arms)
    for r in record["arms"].values():
        for group in ("members", "non_members"):
            assert _finite(r[group]["mean"]) and r[group]["mean_stderr"] >= 0
        for key in ("auc_low_curvature_is_member", "loss_attack_auc", "lira_auc",
                    "auc_p_value", "lira_tpr_at_1pct_fpr"):
            assert 0 <= r[key] <= 1, key
        for key in ("spearman_curvature_vs_disclosure", "spearman_curvature_vs_lira",
                    "spearman_disclosure_vs_lira", "spearman_curvature_vs_loss_attack"):
            assert r[key] is None or -1 <= r[key] <= 1
        per = r["per_example"]
        assert len(per["member_curvature"]) == len(per["member_disclosure"]) == \
            len(per["member_lira"]) == settings.num_audit
        # Members never IN a shadow model have no LiRA score (null in JSON).
        assert 0 < r["num_members_with_lira"] == sum(v is not None for v in per["member_lira"])
        # A ReLU MLP's input Hessian J^T (diag p - p p^T) J is PSD, and so is
        # every Rademacher quadratic form of it.
        assert min(per["member_curvature"] + per["non_member_curvature"]) >= -1e-6
        assert min(per["member_disclosure"]) >= 0
    # Curvature AUC claim per arm, three correlation claims per arm, one gap claim.
    assert len(record["claims"]) == 4 * len(settings.arms) + 1


def test_reconstruction_smoke(tmp_path):
    record = _run(reconstruction, "reconstruction", tmp_path)
    settings = reconstruction.PRESETS["smoke"]
    assert set(record["states"]) == set(settings.states)
    for state in record["states"].values():
        summary = state["summary"]
        # Exact recovery from a single example's own dense-layer gradient.
        assert summary["single_example_min_psnr"] == reconstruction.PSNR_CEILING
        assert set(summary["defenses"]) == set(reconstruction.DEFENSES)
        for d in summary["defenses"].values():
            assert 0 <= d["analytic_exact_fraction"] <= 1
            assert _finite(d["inversion_psnr_mean"]) and -1 <= d["inversion_ssim_mean"] <= 1
        for batch in state["batches"]:
            assert len(batch["gnq"]) == settings.attack_batch_size
            assert min(batch["gnq"]) >= 0
            for d in batch["defenses"].values():
                assert max(d["analytic_psnr"]) <= reconstruction.PSNR_CEILING
                assert d["inversion_objective_end"] <= d["inversion_objective_start"] + 1e-6
        # DP noise swamps a 4-example gradient: no unit recovers anyone exactly.
        assert summary["defenses"]["dpsgd"]["analytic_exact_fraction"] == 0
    assert len(record["claims"]) == 5 * len(settings.states)
