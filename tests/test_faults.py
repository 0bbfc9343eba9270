"""The fault trial: runs killed at random points (and during their final
writes) and resumed, two writers on one --out, every kind of file the
framework writes damaged, unusable --out paths, output into a closed pipe.

A resumed run must end with the results of an uninterrupted one; a damaged
file must be named in one line (``error: <file> is damaged or incomplete
...``, exit 2) or, for a cache, recomputed; never a traceback.

What "the same results" means (``_assert_same_run``): every array of every
``.npz`` equal, results.json and the per-model summaries equal but for the
timings (``wall_seconds``, ``wall_seconds_per_model``,
``total_wall_seconds``), the command line (``command``, which carries
``--resume``) and the folder (``out``), results.csv equal but for the same
columns, table.md equal but for its "wall s" column. The
figures (``*.png``) are not compared. The ``@pytest.mark.slow`` cases run
real runs in subprocesses (about a minute each on 2 cores); the others take
under a minute together.
"""
import csv
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from experiments import audit_epsilon, cifar, cli, digits
from gujax import files
from gujax import workdir as workdir_files
from gujax.audit.shadow import ResumeMismatch
from gujax.data import cache, sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ("--preset", "smoke", "--pool-size", "80", "--population-size", "40",
        "--num-models", "3", "--epochs", "2", "--batch-size", "16", "--no-progress",
        "--arms", "sgd", "censor:tau=8")
NOT_COMPARED = {"command", "out"}


def _compared(key: str) -> bool:
    """Timings (``*wall_seconds*``), the command line and the folder are not."""
    return key not in NOT_COMPARED and "wall_seconds" not in key


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _tiny(out, *extra):
    return digits.main([*TINY, "--out", str(out), *extra])


def _refused(capsys, main, *args) -> str:
    """The one-line error of ``main(args)``, which must exit with status 2."""
    with pytest.raises(SystemExit) as info:
        main(*args)
    assert info.value.code == 2
    return _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------
# Comparing two run folders.

def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if _compared(k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _csv_rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if _compared(k)}
                for row in csv.DictReader(f)]


def _table(path):
    """table.md's lines, each table without its "wall s" column."""
    lines, header = [], None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            lines.append(line)
            header = None
            continue
        cells = line.split("|")
        header = header or [c.strip() for c in cells]
        if "wall s" in header:
            del cells[header.index("wall s")]
        lines.append("|".join(cells))
    return lines


def _assert_same_run(got: pathlib.Path, want: pathlib.Path, rtol: float = 0.0) -> None:
    """``got`` holds the results of ``want`` (see the module docstring);
    ``rtol`` > 0: the arrays to that relative tolerance (and the other
    files not compared)."""
    names = {p.relative_to(want) for p in want.rglob("*") if p.is_file()}
    kept = {p.relative_to(got) for p in got.rglob("*") if p.is_file()}
    assert not {n for n in kept if n.name.endswith(".tmp")}, "a temporary file was left"
    assert names <= kept, names - kept
    for name in sorted(names):
        a, b = got / name, want / name
        if name.suffix == ".npz":
            x, y = np.load(a), np.load(b)
            assert sorted(x.files) == sorted(y.files), name
            for k in x.files:
                if rtol and x[k].dtype.kind == "f":
                    np.testing.assert_allclose(x[k], y[k], rtol=rtol, err_msg=f"{name}:{k}")
                else:
                    np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
        elif name.suffix == ".json" and name.name != "run.json" and not rtol:
            assert _without_timings(json.loads(a.read_text())) == _without_timings(
                json.loads(b.read_text())), name
        elif name.suffix == ".csv" and not rtol:
            assert _csv_rows(a) == _csv_rows(b), name
        elif name.name == "table.md" and not rtol:
            assert _table(a) == _table(b), name
    assert (json.loads((got / "run.json").read_text())["settings"]
            == json.loads((want / "run.json").read_text())["settings"])


# ----------------------------------------------------------------------------
# 1. Resume checks every setting, in every resumable experiment.

def _settings(experiment, **changes):
    import dataclasses
    return dataclasses.replace(experiment.presets["smoke"], **changes)


@pytest.mark.parametrize("experiment", [audit_epsilon.EXPERIMENT, digits.EXPERIMENT,
                                        cifar.EXPERIMENT], ids=lambda e: e.name)
def test_resume_refuses_any_changed_setting(experiment, tmp_path):
    out = str(tmp_path / "run")
    cli.open_out(cli.Run(_settings(experiment), out), experiment)
    cli.unlock_out(out)
    try:
        with pytest.raises(ResumeMismatch) as info:
            cli.check_out(cli.Run(_settings(experiment, seed=5, epochs=7), out, resume=True),
                          experiment)
        assert {"config.seed (saved 0, now 5)", f"config.epochs (saved "
                f"{experiment.presets['smoke'].epochs}, now 7)"} == set(info.value.changes)
        # What only changes how the run is shown or scheduled may change.
        cli.check_out(cli.Run(_settings(experiment, progress=False, step_progress=True,
                                        checkpoint_every=3), out, resume=True), experiment)
    finally:
        cli.unlock_out(out)


def test_audit_resume_with_other_seed_and_epochs_is_refused(tmp_path, capsys):
    """The issue's case: --resume --seed 5 --epochs 4 into a seed-0, 2-epoch
    audit exited 0 and labelled the old arrays with the new settings."""
    out = tmp_path / "audit"
    cli.open_out(cli.Run(_settings(audit_epsilon.EXPERIMENT), str(out)), audit_epsilon.EXPERIMENT)
    cli.unlock_out(str(out))
    (out / "arms").mkdir()
    err = _refused(capsys, audit_epsilon.main, ["--preset", "smoke", "--out", str(out),
                                                "--resume", "--seed", "5", "--epochs", "4"])
    assert "config.epochs (saved 2, now 4)" in err and "config.seed (saved 0, now 5)" in err
    assert "--overwrite" in err and not (out / "results.json").exists()
    # Another experiment's folder is not resumed either.
    err = _refused(capsys, digits.main, ["--preset", "smoke", "--out", str(out), "--resume"])
    assert "experiment (saved 'audit_epsilon', now 'digits')" in err


# ----------------------------------------------------------------------------
# 2. One writer per --out.

def _hold_lock(out) -> subprocess.Popen:
    """A process that takes ``out``'s lock (cli.lock_out) and sleeps."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments import cli; "
         "cli.lock_out(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        for extra in ((), ("--resume",), ("--overwrite",)):
            err = _refused(capsys, _tiny, out, *extra)
            assert (f"--out {out} is in use: another run (process {holder.pid}) is writing "
                    "to it" in err), err
        assert os.listdir(out) == [cli.LOCK_FILE]        # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The system released the dead holder's lock: the folder can be used.
    cli.check_out(cli.Run(_settings(digits.EXPERIMENT), str(out), resume=True), digits.EXPERIMENT)
    cli.unlock_out(str(out))


# ----------------------------------------------------------------------------
# 3. Damaged files are named, caches recomputed.

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "tiny"
    _tiny(out)
    return out


def _garble(path: pathlib.Path) -> None:
    path.write_bytes(b"\xff\xfe\x00 not what was written")


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name,damage", [
    ("run.json", _garble),
    ("shadow/sgd/shadow.json", _garble),
    ("shadow/sgd/model_001.npz", _truncate),
    ("shadow/gnq-censor_tau_8/model_002.json", _garble),
])
def test_a_damaged_file_that_is_read_back_is_named(tiny_run, tmp_path, capsys, name, damage):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    damage(out / name)
    err = _refused(capsys, _tiny, out, "--resume")
    assert f"error: {out / name} is damaged or incomplete (" in err, err
    assert "--overwrite" in err


def test_following_the_advice_recomputes_a_damaged_model(tiny_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    _truncate(out / "shadow/sgd/model_001.npz")
    err = _refused(capsys, _tiny, out, "--resume")
    assert f"delete {out / 'shadow/sgd/model_001.npz'} (that model is then trained again)" in err
    (out / "shadow/sgd/model_001.npz").unlink()
    _tiny(out, "--resume")
    # Trained alone, not in a vmapped stack of 3: the same model to rounding.
    _assert_same_run(out, tiny_run, rtol=1e-5)


def test_damaged_outputs_that_are_not_read_back_are_rewritten(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    for name in ("results.json", "results.csv", "table.md", "per_example/sgd.npz",
                 "roc.png"):
        _truncate(out / name)
    _tiny(out, "--resume")
    _assert_same_run(out, tiny_run)


def _workdir_with_checkpoint(path):
    """A trainer's workdir (gujax.workdir) holding a checkpoint at step 3."""
    from gujax.train import TrainState
    import jax.numpy as jnp
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.arange(4.0)}, (), ())
    config = {"epochs": 1, "lr": 0.1}
    state, manager, _ = workdir_files.open_workdir(str(path), config, state, resume=False)
    later = state._replace(step=jnp.asarray(3, jnp.int32), params={"w": jnp.ones(4)})
    workdir_files.append_jsonl(str(path / "metrics.jsonl"), {"step": 1, "loss": 1.0})
    workdir_files.append_jsonl(str(path / "metrics.jsonl"), {"step": 3, "loss": 0.5})
    workdir_files.save_checkpoint(manager, 3, later)
    workdir_files.close(manager)
    return state, config


def test_damaged_training_files_are_named(tmp_path):
    work = tmp_path / "training"
    state, config = _workdir_with_checkpoint(work)
    # A record cut short by a kill is dropped, the rest kept.
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    restored, manager, _ = workdir_files.open_workdir(str(work), config, state, resume=True)
    workdir_files.close(manager)
    assert int(restored.step) == 3 and float(restored.params["w"][0]) == 1.0
    assert [r["step"] for r in files.read_jsonl(work / "metrics.jsonl")] == [1, 3]
    # Garbage inside the file is not a cut-short record: named.
    with open(work / "metrics.jsonl", "a") as f:
        f.write("\x00garbage\n")
    with pytest.raises(files.CorruptFile, match=r"metrics\.jsonl is damaged.*delete .*training"):
        workdir_files.open_workdir(str(work), config, state, resume=True)
    (work / "metrics.jsonl").unlink()
    _garble(work / "config.json")
    with pytest.raises(files.CorruptFile, match=r"config\.json is damaged"):
        workdir_files.open_workdir(str(work), config, state, resume=True)
    files.write_json(work / "config.json", config)
    for part in (work / "checkpoints" / "3").rglob("*"):      # a broken orbax checkpoint
        if part.is_file():
            _garble(part)
    with pytest.raises(files.CorruptFile) as info:
        workdir_files.open_workdir(str(work), config, state, resume=True)
    assert str(work / "checkpoints") in info.value.path and "training" in str(info.value)


def test_snapshot_files_are_named(tmp_path):
    snaps = workdir_files.Snapshots(str(tmp_path), 1)
    snaps.take(0, 1, {"w": np.ones(3, np.float32)})
    _truncate(pathlib.Path(snaps._path(0, 1)))
    with pytest.raises(files.CorruptFile, match=r"run000_epoch0001\.msgpack is damaged"):
        workdir_files.Snapshots(str(tmp_path), 1).restore((1,), [1], {"w": np.ones(3)})


def test_a_finished_arm_record_that_is_damaged_is_named(tmp_path):
    """The record a resumed audit_epsilon / vulnerable run keeps per arm."""
    path = tmp_path / "arm.json"
    path.write_text('{"not": "an arm"}')
    with pytest.raises(files.CorruptFile, match=r"arm\.json is damaged .*that arm is then "
                                                r"trained again"):
        cli.finished_arm(str(path), f"delete {path} (that arm is then trained again)")
    path.write_text('[{"arm": "sgd"}, []]')
    assert cli.finished_arm(str(path), "-") == ({"arm": "sgd"}, [])


def _cache_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, cache.CacheWarning)]


def test_a_damaged_cache_entry_is_recomputed_never_used(tmp_path):
    arrays = {"images": np.arange(600, dtype=np.uint8).reshape(6, 10, 10),
              "labels": np.arange(6)}
    for damage in (_truncate, _garble, "flip", "rewritten"):
        path = cache.write(tmp_path, "key", arrays)
        if damage == "flip":                       # one bit of the images' bytes
            data = bytearray(path.read_bytes())
            data[data.index(arrays["images"].tobytes()[:64]) + 10] ^= 1
            path.write_bytes(bytes(data))
        elif damage == "rewritten":                # a valid zip with other arrays
            np.savez(path, images=arrays["images"] + 1, labels=arrays["labels"],
                     __checksum__=np.asarray(files.checksum(arrays)))
        else:
            damage(path)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert cache.read(tmp_path, "key") is None, damage
        assert _cache_warnings(record) == [_cache_warnings(record)[0]]
        assert str(path) in _cache_warnings(record)[0] and "recomputing" in \
            _cache_warnings(record)[0]
    cache.write(tmp_path, "key", arrays)
    got = cache.read(tmp_path, "key")
    assert set(got) == set(arrays) and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    assert not list(tmp_path.glob("*.tmp"))


def _image_folder(root: pathlib.Path) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
                    root / split / label / f"{i}.png")


def test_a_damaged_dataset_cache_is_decoded_again(tmp_path, monkeypatch):
    _image_folder(tmp_path / "data")
    first = sources.load("pets", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("*.npz")
    np.savez(entry, images=first.images * 0, labels=first.labels,   # other arrays, valid zip
             class_names=np.asarray(first.class_names),
             __checksum__=np.load(entry)["__checksum__"])
    calls = []
    real = sources.decode_images
    monkeypatch.setattr(sources, "decode_images", lambda paths: calls.append(1) or real(paths))
    with pytest.warns(cache.CacheWarning, match="is damaged"):
        again = sources.load("pets", "train", data_dir=tmp_path / "data",
                             cache_dir=tmp_path / "c")
    assert calls == [1] and np.array_equal(again.images, first.images)


def test_a_damaged_scattering_cache_is_recomputed(tmp_path, monkeypatch):
    from gujax import features
    from gujax.data import Dataset
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), np.uint8)
    data = Dataset(images=images, labels=np.arange(3, dtype=np.int32),
                   ids=np.arange(3), class_names=("a", "b", "c"), name="t", split="train")
    first = features.scattering_features(data, cache_dir=tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.npz")
    _truncate(entry)
    calls = []
    real = features.scattering
    monkeypatch.setattr(features, "scattering", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(cache.CacheWarning, match="is damaged"):
        again = features.scattering_features(data, cache_dir=tmp_path, progress=False)
    assert calls == [1] and np.array_equal(again.images, first.images)


def test_undecodable_data_files_are_named(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    import pickle
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta"):
        (root / name).write_bytes(pickle.dumps({b"other": 1}))
    with pytest.raises(ValueError, match=r"cannot read CIFAR batch file .*data_batch_1: it "
                                         r"holds no 'data' entry"):
        sources.read_cifar_python(root, "cifar10", "train")
    _image_folder(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "a" / "1.png"
    _truncate(bad)
    with pytest.raises(ValueError, match=f"cannot decode image file {bad}"):
        sources.load("imgs", "train", data_dir=tmp_path / "images", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------
# 4. Unusable --out paths and a closed pipe.

@pytest.mark.parametrize("where,expected", [
    ("FILE/sub", "cannot be created: {file} is a file, not a folder"),
    ("FILE", "is a file, not a folder"),
    ("/proc/1/no-such/out", "cannot be created"),
    ("/sys/no-such/out", "cannot be created"),
])
def test_an_unusable_out_is_one_line(where, expected, tmp_path, capsys):
    if where.startswith("/") and not os.path.isdir("/" + where.split("/")[1]):
        pytest.skip(f"no {where.split('/')[1]} here")
    file = tmp_path / "a_file"
    file.write_text("x")
    out = where.replace("FILE", str(file))
    err = _refused(capsys, _tiny, out)
    assert f"--out {out}" in err and expected.format(file=file) in err, err


def test_results_piped_into_a_reader_that_has_gone_end_quietly(tiny_run, tmp_path):
    """``... | head``: the results table goes to a closed pipe."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.digits", *TINY, "--out",
                             str(out), "--resume"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                      # the reader has gone before the table comes
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Error" not in err, err
    _assert_same_run(out, tiny_run)


# ----------------------------------------------------------------------------
# The slow part: real runs killed, resumed and run side by side.

def _start(out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.digits", *TINY,
                             "--checkpoint-every", "2", "--out", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(out) -> None:
    """Resume ``out`` until its run ends (each resume must succeed)."""
    proc = _start(out, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = _start(out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_killed_at_random_points_resume_to_the_same_results(reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "killed"
    proc = _start(out)
    for round in range(2):                     # killed, resumed, killed again, resumed
        time.sleep(rng.uniform(1.0, 9.0))
        proc.send_signal(rng.choice([signal.SIGKILL, signal.SIGINT]))
        proc.communicate(timeout=300)
        if proc.returncode == 0 or not out.exists():
            break
        proc = _start(out, "--resume")
    proc.kill()
    proc.wait()
    if out.exists():
        _finish(out)
    else:                                      # killed before it wrote anything
        _, stderr = _start(out).communicate(timeout=300)
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_a_run_killed_during_its_final_writes_resumes_to_the_same_results(reference,
                                                                         tmp_path):
    out = tmp_path / "killed"
    proc = _start(out)
    deadline = time.monotonic() + 300
    while not (out / "per_example").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)           # while it writes its results
    proc.wait()
    _finish(out)
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_two_writers_at_once(reference, tmp_path):
    out = tmp_path / "shared"
    first, second = _start(out), _start(out)
    results = [p.communicate(timeout=300) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], results
    (err,) = [e for (_, e), p in zip(results, (first, second)) if p.returncode == 2]
    line = _one_line_error(err)
    assert f"--out {out} is in use" in line or f"--out {out} is not empty" in line, line
    _assert_same_run(out, reference)
    # A resume started while another run works in the folder is refused.
    busy = _start(out, "--overwrite", "--epochs", "300")
    deadline = time.monotonic() + 120
    while json.loads((out / "run.json").read_text())["settings"]["epochs"] != 300:
        assert time.monotonic() < deadline and busy.poll() is None
        time.sleep(0.05)
    late = _start(out, "--resume", "--epochs", "300")
    _, err = late.communicate(timeout=300)
    busy.kill()
    busy.wait()
    assert late.returncode == 2 and f"--out {out} is in use" in _one_line_error(err), err
