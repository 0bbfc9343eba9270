"""The comparison runner: smoke presets of experiments.digits and
experiments.cifar (on a generated image folder), the results schema, resume,
the notebooks executed on the smoke results; the stacked-training benchmark."""
import json
import os
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from experiments import cifar, comparison, digits, harness, stacked

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
    table = (out / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
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
    assert results["config"]["preset"] == "smoke" and results["config"]["pool_n"] == 1433


def test_resume_does_not_retrain(digits_smoke, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in digits_smoke.glob("shadow/*/model_*.npz")}
    assert len(stamps) == 16                       # 4 arms x 4 models
    before = json.loads((digits_smoke / "results.json").read_text())
    digits.main(["--preset", "smoke", "--out", str(digits_smoke), "--resume"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    after = json.loads((digits_smoke / "results.json").read_text())
    for a, b in zip(before["arms"], after["arms"]):
        assert a["mia_auc"] == b["mia_auc"] and a["test_accuracy"] == b["test_accuracy"]


def test_overrides_and_bad_arguments(tmp_path):
    settings = harness.parse_command_line(
        ["--preset", "smoke", "--num-models", "3", "--no-augment",
         "--arms", "sgd", "censor:tau=1"], digits.EXPERIMENT).settings
    assert settings.num_models == 3 and settings.augment is False
    assert settings.arms == ("sgd", "censor:tau=1") and settings.epochs == 3
    with pytest.raises(SystemExit):
        harness.parse_command_line(["--preset", "huge"], digits.EXPERIMENT)
    with pytest.raises(ValueError, match="same name"):
        digits.main(["--preset", "smoke", "--out", str(tmp_path), "--arms", "sgd", "sgd"])


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


def test_cifar_smoke_on_an_image_folder(tmp_path):
    _image_folder(tmp_path / "data", {"train": 24, "test": 12})
    out = tmp_path / "cifar-smoke"
    cifar.main(["--preset", "smoke", "--data-dir", str(tmp_path / "data"),
                "--out", str(out), "--arms", "sgd", "dpsgd:eps=3", "censor:tau=2"])
    results = _check_results(out, ["sgd", "dpsgd eps=3", "gnq-censor tau=2"])
    assert results["config"]["pool_n"] == 200 and results["config"]["model"] == "smallcnn"
    assert "plumbing check" in (out / "table.md").read_text()


def test_cifar_without_data_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="digits"):
        cifar.main(["--preset", "smoke", "--out", str(tmp_path / "out")])


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
    result = stacked.main(["--preset", "smoke", "--workloads", "digits-mlp",
                           "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["models_at_once"] for r in rows] == [1, 2]
    assert rows[0]["speedup"] == 1.0 and all(r["wall_seconds"] > 0 for r in rows)
    assert all(r["max_logit_diff"] < 1e-4 for r in rows)
    assert json.loads((tmp_path / "stacked.json").read_text())["rows"] == rows
    assert (tmp_path / "stacked.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        stacked.main(["--preset", "smoke", "--workloads", "mnist"])
