"""The comparison runner: smoke presets of experiments.digits and
experiments.cifar (on a generated image folder), the results schema, resume,
the command line (refusing a folder in use, --overwrite, one-line errors,
--help, Ctrl-C), the notebooks executed on the smoke results; the
stacked-training benchmark."""
import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from experiments import cifar, cli, comparison, digits, harness, report, stacked
from gujax import progress
from gujax.arms import ARM_KINDS

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PNGS = ("privacy_utility.png", "roc.png", "gnq_vs_attack.png")


def _check_results(out: pathlib.Path, arms: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert [row["arm"] for row in results["arms"]] == arms
    assert results["gujax_version"] and results["config"]["arms"]
    for row in results["arms"]:
        missing = [k for k in comparison.REQUIRED_KEYS if k not in row]
        assert not missing, missing
        for key in ("test_accuracy", "train_accuracy", "mia_auc", "mia_tpr_at_0.1pct_fpr",
                    "mia_tpr_at_1pct_fpr", "refused_fraction", "loss_auc", "rmia_auc"):
            assert 0 <= row[key] <= 1, (key, row[key])
        for key in comparison.INTERVAL_KEYS:
            lo, hi = row[f"{key}_ci"]
            assert 0 <= lo <= row[key] <= hi <= 1, (key, lo, row[key], hi)
        assert row["test_accuracy_ci"][1] - row["test_accuracy_ci"][0] > 0.01
        assert 0 <= row["disclosure_mean_nats"] <= row["disclosure_max_nats"]
        assert row["wall_seconds"] > 0
        if row["kind"] == "dpsgd":
            assert 0 < row["epsilon"] <= row["arm_spec"]["epsilon"] + 1e-6
            assert row["noise_multiplier"] > 0
        else:
            assert row["epsilon"] is None
        if row["kind"] == "censor":
            assert row["disclosure_max_nats"] <= row["arm_spec"]["budget"] + 1e-3
        if row["kind"] == "clip":  # at most max_step per step, one step per epoch
            cap = row["arm_spec"]["max_step"] * results["config"]["epochs"]
            assert row["disclosure_max_nats"] <= cap + 1e-3
        per = np.load(out / row["per_example_file"])
        assert per["disclosure"].shape == per["ids"].shape == per["lira_vulnerability"].shape
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + len(arms) and lines[0].startswith("arm,")
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [json.loads(r["mia_auc_ci"]) for r in csv_rows] == [
        r["mia_auc_ci"] for r in results["arms"]]
    table = (out / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
    first = results["arms"][0]
    assert report.format_interval(first["test_accuracy"], first["test_accuracy_ci"]) in table
    gnq = [r["arm"] for r in results["arms"] if ARM_KINDS[r["kind"]].defense]
    assert sorted(results["verdicts"]["arms"]) == sorted(gnq)
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
    return results


@pytest.fixture(scope="module")
def digits_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits-smoke"
    digits.main(["--preset", "smoke", "--out", str(out)])
    return out


def test_digits_smoke_schema(digits_smoke):
    results = _check_results(digits_smoke, ["sgd", "dpsgd eps=1", "gnq-censor tau=8",
                                            "gnq-clip s=0.1"])
    config = results["config"]
    assert config["preset"] == "smoke" and config["pool_n"] == 1433
    # Only the settings of the chosen model (an MLP) are recorded.
    assert config["hidden"] == [64] and not {"widths", "depth", "width"} & set(config)
    run = json.loads((digits_smoke / "run.json").read_text())
    assert run["experiment"] == "digits" and "--preset smoke" in run["command"]


def test_resume_does_not_retrain(digits_smoke, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in digits_smoke.glob("shadow/*/model_*.npz")}
    assert len(stamps) == 16                       # 4 arms x 4 models
    before = json.loads((digits_smoke / "results.json").read_text())
    digits.main(["--preset", "smoke", "--out", str(digits_smoke), "--resume"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    after = json.loads((digits_smoke / "results.json").read_text())
    for a, b in zip(before["arms"], after["arms"]):
        assert a["mia_auc"] == b["mia_auc"] and a["test_accuracy"] == b["test_accuracy"]


def test_resume_with_other_settings_names_them(digits_smoke, capsys):
    with pytest.raises(SystemExit) as info:
        digits.main(["--preset", "smoke", "--out", str(digits_smoke), "--resume",
                     "--epochs", "4"])
    assert info.value.code == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "config.epochs (saved 3, now 4)" in err and "--overwrite" in err


def _row(arm, kind, accuracy, tpr, auc, **spec):
    """A results row with the keys the verdicts and the figure read; each
    interval is the value +- its half-width."""
    (acc, da), (t, dt), (a, dauc) = accuracy, tpr, auc
    return {"arm": arm, "kind": kind, "arm_spec": spec,
            "test_accuracy": acc, "test_accuracy_ci": [acc - da, acc + da],
            "mia_tpr_at_1pct_fpr": t, "mia_tpr_at_1pct_fpr_ci": [max(0.0, t - dt), t + dt],
            "mia_auc": a, "mia_auc_ci": [a - dauc, a + dauc]}


SYNTHETIC_ROWS = [
    _row("sgd", "sgd", (0.94, 0.01), (0.10, 0.02), (0.70, 0.02)),
    _row("dpsgd eps=8", "dpsgd", (0.83, 0.02), (0.019, 0.006), (0.55, 0.01), epsilon=8.0),
    _row("dpsgd eps=1", "dpsgd", (0.30, 0.03), (0.013, 0.005), (0.49, 0.01), epsilon=1.0),
    # Below DP-SGD's curve: as attackable as eps=8, less accurate.
    _row("gnq-censor tau=8", "censor", (0.78, 0.02), (0.019, 0.006), (0.58, 0.01), budget=8.0),
    # More accurate than eps=8 at an indistinguishable TPR, but a higher AUC.
    _row("gnq-censor tau=16", "censor", (0.90, 0.015), (0.025, 0.007), (0.64, 0.01),
         budget=16.0),
]


def test_verdicts_from_intervals():
    found = comparison.verdicts(SYNTHETIC_ROWS)
    tpr, auc = "mia_tpr_at_1pct_fpr", "mia_auc"
    assert found["arms"] == {"gnq-censor tau=8": {tpr: "worse", auc: "worse"},
                             "gnq-censor tau=16": {tpr: "better", auc: "trade-off"}}
    pair = next(p for p in found["pairs"] if p["arm"] == "gnq-censor tau=8"
                and p["against"] == "dpsgd eps=8" and p["attack"] == tpr)
    assert (pair["verdict"], pair["accuracy"], pair["attack_order"]) == ("worse", -1, 0)
    assert found["versus_sgd"]["gnq-censor tau=16"] == {tpr: -1, auc: -1}
    text = comparison.verdict_text(SYNTHETIC_ROWS)
    assert "**The claim, by LiRA TPR at 1% FPR**: supported (better than a DP-SGD arm, " \
           "beaten by none, less attackable than SGD): gnq-censor tau=16; worse (beaten by " \
           "a DP-SGD arm): gnq-censor tau=8." in text
    assert "| gnq-censor tau=16 | **better** / **trade-off** | better / trade-off | " \
           "trade-off / trade-off | below / below |" in text
    assert "- gnq-censor tau=16: vs dpsgd eps=8: acc +, TPR@1% =, AUC +; vs dpsgd eps=1: " \
           "acc +, TPR@1% +, AUC +" in text
    # An attack interval overlapping SGD's: better than DP-SGD, but no privacy shown.
    noisy = [dict(r) for r in SYNTHETIC_ROWS]
    noisy[0]["mia_tpr_at_1pct_fpr_ci"] = [0.03, 0.2]
    assert "not distinguishable from SGD either: gnq-censor tau=16" in \
        comparison.verdict_text(noisy)
    assert "No verdict" in comparison.verdict_text(SYNTHETIC_ROWS[:3])


def test_families_are_ordered_and_plotted(tmp_path):
    rows = SYNTHETIC_ROWS[2:] + SYNTHETIC_ROWS[:2]    # out of order on purpose
    found = comparison.families(rows, "mia_tpr_at_1pct_fpr")
    assert list(found) == ["DP-SGD", "GNQ censor", "SGD"]
    assert [p.label for p in found["DP-SGD"]] == ["eps=1", "eps=8"]
    assert [p.label for p in found["GNQ censor"]] == ["tau=8", "tau=16"]
    assert found["DP-SGD"][1].x_interval == (0.013, 0.025)
    path = tmp_path / "privacy_utility.png"
    comparison.plot_privacy_utility(rows, str(path))
    assert path.stat().st_size > 10_000


def test_format_interval():
    assert report.format_interval(0.717, [0.6954, 0.7391]) == "0.717 [0.695, 0.739]"
    assert report.format_interval(2.0, [1.0, 3.0], "{:.1f}") == "2.0 [1.0, 3.0]"
    assert report.format_interval(0.5, None) == "0.500"
    assert report.format_interval(0.5, [None, 0.6]) == "0.500"
    assert report.format_interval(None, [0.1, 0.2]) == "-"


def _one_line_error(stderr: str) -> str:
    """The one line a bad command line prints."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_overrides_and_bad_arguments(tmp_path, capsys):
    settings = cli.parse_command_line(
        ["--preset", "smoke", "--num-models", "3", "--no-augment",
         "--arms", "sgd", "censor:tau=1"], digits.EXPERIMENT).settings
    assert settings.num_models == 3 and settings.augment is False
    assert settings.arms == ("sgd", "censor:tau=1") and settings.epochs == 3
    for argv, match in ((["--preset", "huge"], "invalid choice"),
                        (["--step-progress", "maybe"], "true/false"),
                        (["--arms", "censor:tau=1,relative=maybe"], "true or false"),
                        (["--num-models", "2"], "num_models must be >= 3"),
                        (["--attack-augmentations", "flip", "--query-augmentations",
                          "identity"], "not among the recorded")):
        with pytest.raises(cli.UsageError, match=match):
            cli.parse_command_line(argv, digits.EXPERIMENT)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        digits.main(["--preset", "smoke", "--out", str(out), "--arms", "sgd", "sgd"])
    assert info.value.code == 2 and "same name" in _one_line_error(capsys.readouterr().err)
    assert not out.exists()


ROOT = NOTEBOOKS.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [
    # A bad arm is reported before the (also missing) data.
    (["experiments.cifar", "--arms", "sgd", "bogus", "--data-dir", "/no/such/dir"],
     "arm kind must be one of"),
    (["experiments.digits", "--pool-size", "5000"], "pool_size must be 0 (all) or in [1, 1433]"),
    (["experiments.cifar", "--data-dir", "/no/such/dir"], "--data-dir may hold an image folder"),
    (["experiments.cifar", "--data-dir", "EMPTY"], "is empty"),
    (["experiments.curvature", "--epochs", "0"], "epochs must be a positive integer"),
    # No argparse prefix matching: --epoch is not read as --epochs.
    (["experiments.digits", "--epoch", "3"], "unrecognized arguments: --epoch 3"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, expected, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    result = _cli(*args, "--preset", "smoke", "--out", str(out))
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert expected in line
    assert "load(" not in line and "NotImplementedError" not in line
    assert not out.exists()                       # validated before any folder is made


def test_help_explains_every_option_with_its_default():
    result = _cli("experiments.cifar", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m experiments.cifar")
    text = " ".join(result.stdout.split())          # as wrapped to the terminal
    for needle in ("(default: cpu)", "cpu (the default):", "dpsgd:eps=3", "censor:tau=8",
                   "clip:max_step=0.1", "alias tau", "--pool-size 0", "one of mlp (an MLP; uses "
                   "--hidden), smallcnn (a small CNN; --widths), wrn (WideResNet; --depth, "
                   "--width)", "one of sgd, adam", "one of explicit, ghost", "--resume",
                   "--overwrite"):
        assert needle in text, needle
    from experiments import curvature, reconstruction, unique_features
    for experiment in (digits.EXPERIMENT, cifar.EXPERIMENT, unique_features.EXPERIMENT,
                       curvature.EXPERIMENT, reconstruction.EXPERIMENT):
        parser = cli.build_parser(experiment)
        for action in parser._actions:
            if action.dest != "help":
                assert "default" in action.help, (experiment.name, action.dest)
        assert ("--resume" in parser.format_help()) == experiment.resumable


def _tiny_digits(out, *extra):
    return digits.main(["--preset", "smoke", "--out", str(out), "--pool-size", "80",
                        "--population-size", "40", "--num-models", "3", "--epochs", "1",
                        "--batch-size", "16", "--arms", "sgd", *extra])


def test_a_folder_in_use_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        _tiny_digits(out)
    err = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2 and "--resume" in err and "--overwrite" in err
    with pytest.raises(SystemExit):               # not a run: --overwrite deletes nothing
        _tiny_digits(out, "--overwrite")
    assert "refusing to delete" in _one_line_error(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    _tiny_digits(out)                             # an empty folder is fine
    (out / "stale.txt").write_text("from the old run")
    with pytest.raises(SystemExit):               # finished results are not overwritten
        _tiny_digits(out)
    capsys.readouterr()
    results = _tiny_digits(out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / "results.json").exists()
    assert results["config"]["pool_n"] == 80


def test_ctrl_c_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(harness, "shadow_audit", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        digits.main(["--preset", "smoke", "--out", str(out), "--overwrite"])
    assert info.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]    # below the arms bar
    assert last == ("interrupted; to continue, run: python -m experiments.digits --preset "
                    f"smoke --out {out} --resume")


def test_step_progress_follows_the_terminal(monkeypatch):
    smoke = digits.PRESETS["smoke"]
    assert smoke.step_progress is None
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert cli.step_progress(smoke) is tty
        assert cli.train_config(smoke).progress is tty
        assert cli.step_progress(dataclasses.replace(smoke, step_progress=not tty)) \
            is (not tty)
    assert cli.step_progress(dataclasses.replace(smoke, progress=False)) is False


def _image_folder(root: pathlib.Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2 + c          # a weak class signal
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.mark.slow  # minutes on 2 cores: out of CI (conftest), run locally
def test_cifar_smoke_on_an_image_folder(tmp_path):
    _image_folder(tmp_path / "data", {"train": 24, "test": 12})
    out = tmp_path / "cifar-smoke"
    cifar.main(["--preset", "smoke", "--data-dir", str(tmp_path / "data"),
                "--out", str(out), "--arms", "sgd", "dpsgd:eps=3,batch=20", "censor:tau=2"])
    results = _check_results(out, ["sgd", "dpsgd eps=3 B=20", "gnq-censor tau=2"])
    config = results["config"]
    assert config["pool_n"] == 200 and config["model"] == "scatter_linear"
    assert config["features"] == "scattering" and config["normalisation"] == "private"
    assert not {"hidden", "widths", "depth", "width"} & set(config)
    # The private statistics' two releases are in DP-SGD's epsilon.
    (dp,) = [row for row in results["arms"] if row["kind"] == "dpsgd"]
    assert dp["arm_spec"]["releases"] == [8.0, 8.0] and dp["epsilon"] <= 3.0 + 1e-6
    table = (out / "table.md").read_text()
    assert "plumbing check" in table and "Published-accuracy check" in table
    (check,) = results["full_train"]
    assert check["train_n"] == 240 and check["test_n"] == 120 and check["batch_size"] == 40
    lo, hi = check["test_accuracy_ci"]
    assert 0 <= lo <= check["test_accuracy"] <= hi <= 1
    assert check["verdict"] and check["epsilon"] <= 3.0 + 1e-6
    assert (out / "full_train.csv").read_text().startswith("arm,")


def test_cifar_without_data_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit) as info:
        cifar.main(["--preset", "smoke", "--out", str(tmp_path / "out")])
    err = _one_line_error(capsys.readouterr().err)
    assert info.value.code == 2 and "does not exist" in err
    assert "--data-dir" in err and "--dataset digits" in err and "load(" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["explore_results.ipynb", "tutorial_gnq_censor.ipynb"])
def test_notebook_executes(name, digits_smoke, monkeypatch):
    monkeypatch.setenv("GUJAX_RESULTS", str(digits_smoke))
    # The kernel is a fresh process: let it import this checkout even when the
    # package is not installed.
    path = [str(NOTEBOOKS.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for cell in book.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_stacked_benchmark_smoke(tmp_path):
    """Models trained together equal models trained alone (the benchmark's own
    check), and the speed-up is reported against G = 1."""
    out = tmp_path / "stacked"
    result = stacked.main(["--preset", "smoke", "--workloads", "digits-mlp",
                           "--out", str(out)])
    rows = result["rows"]
    assert [r["models_at_once"] for r in rows] == [1, 2]
    assert rows[0]["speedup"] == 1.0 and all(r["wall_seconds"] > 0 for r in rows)
    assert all(r["max_logit_diff"] < 1e-4 for r in rows)
    saved = json.loads((out / "stacked.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["workloads"] == ["digits-mlp"]
    assert (out / "stacked.png").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["settings"]["num_models"] == 2
    # Bad input: one line and exit status 2, before anything runs; a used
    # --out is refused without --overwrite.
    for argv in (["--workloads", "mnist"], ["--group-sizes", "2", "4"],
                 ["--arms", "censor"], ["--mlp-pool", "100000"], ["--out", str(out)]):
        with pytest.raises(SystemExit) as err:
            stacked.main(["--preset", "smoke", "--workloads", "digits-mlp",
                          "--out", str(tmp_path / "bad"), *argv])
        assert err.value.code == 2, argv
    assert not (tmp_path / "bad").exists()


def test_cifar_check_interval_and_verdict():
    from scipy import stats
    correct = np.array([True] * 64 + [False] * 36)
    lo, hi = cifar.accuracy_interval(correct)
    # Clopper-Pearson from its definition: beta quantiles.
    assert lo == pytest.approx(stats.beta.ppf(0.025, 64, 37))
    assert hi == pytest.approx(stats.beta.ppf(0.975, 65, 36))
    row = {"published_accuracy": 0.67, "test_accuracy": 0.647, "test_accuracy_ci": [0.638, 0.657]}
    assert cifar.check_verdict(row).endswith("interval reaches beyond 3")
    row.update(test_accuracy=0.66, test_accuracy_ci=[0.65, 0.67])
    assert cifar.check_verdict(row).endswith("the whole interval too")
    row.update(test_accuracy=0.63, test_accuracy_ci=[0.62, 0.64])
    assert cifar.check_verdict(row).endswith("more than 3 points off")
    assert cifar.check_verdict({"published_accuracy": None}) is None


def _help(experiment) -> str:
    return " ".join(cli.build_parser(experiment).format_help().split())


def test_help_offers_only_the_options_that_apply():
    text = _help(digits.EXPERIMENT)
    # 8x8 digits: no WideResNet, no scattering, so none of their options.
    for absent in ("--depth", "--width ", "wrn", "scatter", "--features", "--normalisation",
                   "private"):
        assert absent not in text, absent
    for present in ("--hidden", "--widths", "one of mlp (an MLP; uses --hidden), smallcnn"):
        assert present in text, present
    wide = _help(cifar.EXPERIMENT)
    for present in ("--depth", "--width ", "--features {pixels,scattering}",
                    "scattering (ScatterNet", "--normalisation {group,private}",
                    "--normalisation-noise", "wrn (WideResNet; --depth, --width)"):
        assert present in wide, present
    # What is not offered is not accepted either.
    for argv, match in ((["--depth", "10"], "unrecognized arguments: --depth"),
                        (["--model", "wrn"], "invalid choice: 'wrn'"),
                        (["--features", "scattering"], "unrecognized arguments")):
        with pytest.raises(cli.UsageError, match=match):
            cli.parse_command_line(["--preset", "smoke", *argv], digits.EXPERIMENT)
    settings = cli.parse_command_line(["--preset", "paper", "--depth", "10"],
                                      cifar.EXPERIMENT).settings
    assert settings.depth == 10


def test_switches_read_clearly_and_take_the_old_values():
    text = _help(cifar.EXPERIMENT)
    assert "--augment, --no-augment random crop" in text
    assert "[--augment | --no-augment]" in text and "true|false]" not in text
    parse = lambda *argv: cli.parse_command_line(["--preset", "smoke", *argv],  # noqa: E731
                                                 digits.EXPERIMENT).settings
    try:
        assert parse("--augment").augment is True and parse("--no-augment").augment is False
        # The command lines of docs/results/*/run.json and the docs.
        assert parse("--progress", "false", "--epochs", "2").progress is False
        assert parse("--augment", "false").augment is False
        assert parse("--augment=true", "--no-progress").augment is True
        assert parse("--step-progress", "true").step_progress is True
        assert parse().step_progress is None
        for argv, match in ((["--augment", "maybe"], "expected true/false, got 'maybe'"),
                            (["--no-augment", "true"], "--no-augment: takes no value")):
            with pytest.raises(cli.UsageError, match=match):
                parse(*argv)
    finally:
        progress.set_enabled(True)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    argv = ["experiments.digits", "--preset", "smoke", "--pool-size", "80",
            "--population-size", "40", "--num-models", "3", "--epochs", "1",
            "--batch-size", "16", "--arms", "sgd", "censor:tau=8"]
    shown = _cli(*argv, "--out", str(tmp_path / "a"), "--step-progress", "true")
    assert shown.returncode == 0, shown.stderr
    assert "\r" not in shown.stderr and "\x1b[" not in shown.stderr
    lines = shown.stderr.splitlines()
    assert any(line.startswith("arms: 2/2 (done in ") for line in lines), shown.stderr
    assert any(line.startswith("shadow models [sgd]: 3/3 models (done in ") for line in lines)
    assert any(line.startswith("train x3: ") for line in lines)
    quiet = _cli(*argv, "--out", str(tmp_path / "b"), "--progress", "false")
    assert quiet.returncode == 0, quiet.stderr
    for word in ("arms", "shadow models", "train", "done in", "\r"):
        assert word not in quiet.stderr, (word, quiet.stderr)


def test_progress_false_silences_the_library_bars_too(tmp_path, capsys, monkeypatch):
    from gujax.data import sources
    _image_folder(tmp_path, {"train": 1})
    paths = sorted(str(p) for p in tmp_path.glob("train/*/*.png"))
    monkeypatch.setattr(sources, "_PROGRESS_MIN", 1)
    try:
        cli.parse_command_line(["--preset", "smoke", "--progress", "false"], digits.EXPERIMENT)
        assert sources.decode_images(paths).shape == (10, 32, 32, 3)
        assert capsys.readouterr().err == ""
        cli.parse_command_line(["--preset", "smoke"], digits.EXPERIMENT)
        sources.decode_images(paths)
        err = capsys.readouterr().err
        assert err.startswith("decoding images: 10/10 (done in ") and "\r" not in err
    finally:
        progress.set_enabled(True)


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys):
    import tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress.progress_bar(range(3), desc="x") as bar:
        assert isinstance(bar, tqdm.tqdm)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    capsys.readouterr()
    bar = progress.progress_bar(total=4, desc="steps", interval=0.0)
    assert isinstance(bar, progress.PlainBar)
    bar.set_postfix_str("training models 0-1")
    bar.update(2)
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # A new stage gets a line of its own, then progress lines carry it.
    assert lines[0] == "steps: 0/4 (0 s) [training models 0-1]"
    assert lines[1].startswith("steps: 2/4 (") and "left) [training models 0-1]" in lines[1]
    assert lines[-1].startswith("steps: 4/4 (done in ")
    assert list(progress.progress_bar(range(3), disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_verdicts_are_one_compact_table_without_repeated_intervals():
    text = comparison.verdict_text(SYNTHETIC_ROWS)
    # Each GNQ arm: one table row and one line of details; no other arm's
    # intervals repeated (they are in the headline table).
    for arm in ("gnq-censor tau=8", "gnq-censor tau=16"):
        assert text.count(f"| {arm} |") == 1 and text.count(f"- {arm}:") == 1
    assert "[0.810, 0.850]" not in text and "0.830" not in text   # dpsgd eps=8's accuracy
    assert max(len(line) for line in text.splitlines() if "gnq-censor tau" in line) < 200
    assert text.count("### The pairs in detail") == 1
    short = comparison.verdict_text(SYNTHETIC_ROWS, details=False)
    assert "The pairs in detail" not in short and "| gnq-censor tau=8 | **worse**" in short


def test_the_verdicts_print_once_and_replot_rebuilds_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    digits.main(["--preset", "smoke", "--out", str(out), "--pool-size", "80",
                 "--population-size", "40", "--num-models", "3", "--epochs", "1",
                 "--batch-size", "16", "--arms", "sgd", "dpsgd:eps=3", "censor:tau=8"])
    printed = capsys.readouterr().out
    assert printed.count("| gnq-censor tau=8 |") == 2          # the headline, the verdicts
    assert printed.count("## The GNQ arms against DP-SGD") == 1
    assert "The pairs in detail" not in printed
    table = (out / "table.md").read_text()
    assert table.count("### The pairs in detail") == 1 and table.count("**The claim") == 2
    for name in ("table.md", *PNGS):
        (out / name).unlink()
    digits.main(["--replot", str(out)])
    assert (out / "table.md").read_text() == table
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
    assert "rebuilt in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        digits.main(["--replot", str(out), "--epochs", "2"])
    assert info.value.code == 2
    assert "--replot takes one folder" in _one_line_error(capsys.readouterr().err)


def test_privacy_utility_labels_cover_no_point_bar_or_label():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox
    from gujax.audit.plots import plot_tradeoff
    # The committed CIFAR-10 run, where eps=8 / tau=2 and tau=8 / s=0.1 collided.
    rows = json.loads((ROOT / "docs/results/cifar10-cpu/results.json").read_text())["arms"]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, _, chance, log_x) in zip(axes, comparison.PRIVACY_AXES):
        plot_tradeoff(comparison.families(rows, key), ax, chance=chance, log_x=log_x)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax, (key, _, _, _) in zip(axes, comparison.PRIVACY_AXES):
        to_display = ax.transData.transform
        texts = [t for t in ax.texts if t.get_text() != "chance"]
        assert len(texts) == len(rows)
        boxes = {t.get_text(): t.get_window_extent(renderer) for t in texts}
        for p in (p for points in comparison.families(rows, key).values() for p in points):
            x, y = to_display((p.x, p.y))
            lo, hi = to_display((p.x_interval[0], p.y_interval[0])), \
                to_display((p.x_interval[1], p.y_interval[1]))
            drawn = [Bbox.from_extents(x - 3, y - 3, x + 3, y + 3),       # marker
                     Bbox.from_extents(lo[0], y - 1, hi[0], y + 1),       # error bars
                     Bbox.from_extents(x - 1, lo[1], x + 1, hi[1])]
            for label, box in boxes.items():
                if label != p.label:
                    assert not any(box.overlaps(d) for d in drawn), (key, label, p.label)
        names = list(boxes)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not boxes[a].overlaps(boxes[b]), (key, a, b)


def test_roc_marks_the_low_fpr_levels_and_shows_low_curves():
    from gujax.audit.plots import plot_roc
    # TPR far below the smallest FPR: the old y range (from the FPR) cut it off.
    low = (np.array([0.0, 0.01, 0.1, 1.0]), np.array([0.0, 0.0005, 0.2, 1.0]))
    high = (np.array([0.0, 0.001, 0.01, 1.0]), np.array([0.0, 0.05, 0.2, 1.0]))
    ax = plot_roc({"low": low, "high": high},
                  intervals={"high": {0.001: (0.03, 0.07), 0.01: (0.15, 0.25)}})
    assert ax.get_ylim()[0] <= 0.0005
    assert ax.get_xlim()[0] == pytest.approx(0.001)
    assert [line.get_label()[:4] for line in ax.lines] == ["low ", "high", "chan"]
    levels = [c for c in ax.collections if c.get_label().startswith("_FPR")]
    assert sorted(c.get_label() for c in levels) == ["_FPR 0.001", "_FPR 0.01"]
    dots = {c.get_label(): c.get_offsets()[0] for c in ax.collections
            if " at " in c.get_label() and "interval" not in c.get_label()}
    assert sorted(dots) == ["_high at 0.001", "_high at 0.01", "_low at 0.01"]  # low: 0 at 0.1%
    assert dots["_high at 0.001"][1] == pytest.approx(0.05)
    bars = [c for c in ax.collections if "interval" in c.get_label()]
    assert len(bars) == 2                         # the two intervals of "high"
    (segment,) = bars[0].get_segments()
    assert segment[:, 1] == pytest.approx([0.03, 0.07])


def test_disclosure_panels_share_one_x_axis():
    from gujax.audit.plots import plot_disclosure_grid
    rng = np.random.default_rng(0)
    v = rng.normal(size=50)
    fig = plot_disclosure_grid({"sgd": (rng.uniform(0, 70, 50), v),
                                "censor tau=1": (rng.uniform(0, 1, 50), v),
                                "dpsgd": (np.full(50, np.nan), v)})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 3
    assert len({ax.get_xlim() for ax in shown}) == 1
    assert shown[0].get_xlim()[1] > 60
    assert "too few" in shown[2].get_title() or "at least 3" in shown[2].get_title()
