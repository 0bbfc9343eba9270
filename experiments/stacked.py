"""What training shadow models together gains: one step vmapped over G models
(``run_shadow_models(..., models_at_once=G)``) against one model at a time.

    python -m experiments.stacked                   # a few minutes on 2 CPU cores
    python -m experiments.stacked --preset smoke    # seconds; what the tests run

For each workload (the digits comparison's MLP on its 500-example pool; a
small CNN on random 32x32x3 images) and arm, the same M shadow models are
trained with G = 1 and each larger G, in one process, the G values taking
turns over ``--repeats`` rounds (so load from other processes hits them
alike) after an untimed warm-up round; the median wall time of the whole call
(training and the logit queries; compiled steps come from a persistent cache,
as in the comparison runner) is reported with its ratio to G = 1. Each G's models are
checked against G = 1's: the largest logit difference is printed beside the
time, so a speed-up that changed the models would show.

Writes ``<out>/stacked.json`` (rows: workload, arm, models_at_once,
wall_seconds, speedup, max_logit_diff, plus the settings and the machine) and
``<out>/stacked.png`` (speed-up against G), beside ``run.json``; ``--out``
defaults to ``results/stacked-<preset>``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see experiments/__init__.py

import dataclasses
import platform
import shutil
import statistics
import tempfile
import time
from typing import ClassVar

import jax
import numpy as np
from matplotlib.figure import Figure

from gujax import checks
from gujax.arms import parse_arm
from gujax.audit.shadow import run_shadow_models
from gujax.data import load, random_subset
from gujax.data.dataset import Dataset
from gujax.models import MLP, SmallCNN
from gujax.train import TrainConfig

from experiments import cli
from experiments.cli import option
from experiments.cli import BenchmarkSettings
from experiments.report import write_json

WORKLOADS = ("digits-mlp", "random32-cnn")


@dataclasses.dataclass(frozen=True)
class StackedSettings(BenchmarkSettings):
    workloads: tuple[str, ...] = option(WORKLOADS, "the workloads timed", choices=WORKLOADS)
    arms: tuple[str, ...] = option(("sgd", "censor:tau=16", "dpsgd:eps=3"),
                                   "the arms, each with its budget (no thresholds here)",
                                   parse=cli.arm_text)
    num_models: int = option(12, "shadow models M trained per arm and G")
    group_sizes: tuple[int, ...] = option((1, 3, 6, 12), "models trained at once G, the "
                                                         "first 1 (the baseline)")
    repeats: int = option(2, "timed rounds (after an untimed warm-up round)")
    mlp_hidden: int = option(512, "digits-mlp: the MLP's hidden width")
    mlp_pool: int = option(500, "digits-mlp: the pool, a random subset of digits' train split")
    mlp_epochs: int = option(20, "digits-mlp: training epochs")
    mlp_batch_size: int = option(64, "digits-mlp: training batch size")
    cnn_widths: tuple[int, ...] = option((8, 16), "random32-cnn: SmallCNN's channel widths")
    cnn_pool: int = option(256, "random32-cnn: the pool of random 32x32x3 images")
    cnn_epochs: int = option(2, "random32-cnn: training epochs")
    cnn_batch_size: int = option(32, "random32-cnn: training batch size")

    MINIMUMS: ClassVar[dict[str, int]] = {
        "num_models": 1, "group_sizes": 1, "repeats": 1, "mlp_hidden": 1, "mlp_pool": 2,
        "mlp_epochs": 1, "mlp_batch_size": 1, "cnn_widths": 1, "cnn_pool": 2,
        "cnn_epochs": 1, "cnn_batch_size": 1}

    def arm_settings(self) -> dict:
        """Arms take nothing from these settings (``cli.make_arm``)."""
        return {}

    def check(self) -> None:
        super().check()
        checks.subset(self.workloads, WORKLOADS, "--workloads")
        if self.group_sizes[0] != 1:
            raise ValueError(f"--group-sizes must start with 1 (the baseline), got "
                             f"{' '.join(map(str, self.group_sizes))}")
        if not self.arms:
            raise ValueError("--arms needs one or more values")
        for text in self.arms:
            try:
                parse_arm(text)
            except ValueError as err:
                raise ValueError(f"arm {text!r}: {err}") from None
        cli.check_arms(self.arms, self, by_name=True)


_DEFAULT = StackedSettings(note="12 shadow models per arm, G in 1, 3, 6, 12, two timed "
                                "rounds: the digits MLP (20 epochs) and a small CNN on "
                                "random images (2 epochs).")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(
        _DEFAULT, arms=("sgd",), num_models=2, group_sizes=(1, 2), repeats=1, mlp_hidden=32,
        mlp_pool=80, mlp_epochs=2, mlp_batch_size=16, cnn_widths=(8, 8), cnn_pool=48,
        cnn_epochs=1, cnn_batch_size=16,
        note="Smoke preset: 2 models, G in 1, 2, one round, tiny models; a plumbing "
             "check, not a measurement."))
EXPERIMENT = cli.Experiment("stacked", __doc__, PRESETS)


def _random_images(n: int, seed: int, split: str) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                   labels=rng.integers(0, 10, n).astype(np.int32),
                   ids=np.arange(n, dtype=np.int64), class_names=tuple(map(str, range(10))),
                   name="random32", split=split)


def workload(name: str, s: StackedSettings) -> dict:
    """run_shadow_models keyword arguments (pool, population, model, config)."""
    if name == "digits-mlp":
        train = load("digits", "train")
        if s.mlp_pool > len(train):
            raise ValueError(f"--mlp-pool is at most {len(train)} (digits' train split), "
                             f"got {s.mlp_pool}")
        return dict(
            pool=random_subset(train, s.mlp_pool, 0),
            population=load("digits", "test"), model=MLP(hidden=(s.mlp_hidden,)),
            config=TrainConfig(epochs=s.mlp_epochs, batch_size=s.mlp_batch_size,
                               learning_rate=0.2, progress=False))
    return dict(
        pool=_random_images(s.cnn_pool, 0, "train"),
        population=_random_images(s.cnn_pool // 2, 1, "test"),
        model=SmallCNN(widths=s.cnn_widths),
        config=TrainConfig(epochs=s.cnn_epochs, batch_size=s.cnn_batch_size,
                           learning_rate=0.1, progress=False))


def measure(name: str, setup: dict, arm, num_models: int, group_sizes,
            repeats: int, scratch: str) -> list[dict]:
    times = {g: [] for g in group_sizes}
    logits = {}
    # Round 0 is a warm-up, not timed: it fills the persistent compilation
    # cache (as the comparison runner's) and DP-SGD's calibration cache, which
    # would otherwise be charged to whichever G ran first.
    for round_ in range(repeats + 1):
        for g in group_sizes:
            workdir = os.path.join(scratch, f"{name}-{arm.slug}-{g}")
            start = time.perf_counter()
            record = run_shadow_models(arm, num_models=num_models, workdir=workdir,
                                       models_at_once=g, resume=False, checkpoints=False,
                                       augmentations=("identity",), progress=False, **setup)
            if round_:
                times[g].append(time.perf_counter() - start)
            logits[g] = record.logits
            shutil.rmtree(workdir)
    base = statistics.median(times[group_sizes[0]])
    return [{"workload": name, "arm": arm.name, "num_models": num_models,
             "models_at_once": g, "wall_seconds": statistics.median(times[g]),
             "wall_seconds_all": times[g],
             "speedup": base / statistics.median(times[g]),
             "max_logit_diff": float(np.max(np.abs(logits[g] - logits[group_sizes[0]])))}
            for g in group_sizes]


def plot(rows: list[dict], path: str) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key in dict.fromkeys((r["workload"], r["arm"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["arm"]) == key]
        ax.plot([r["models_at_once"] for r in mine], [r["speedup"] for r in mine],
                marker="o", label=" / ".join(key))
    ax.axhline(1.0, c="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["models_at_once"] for r in rows})
    ax.set_xticks(sizes, [str(g) for g in sizes])
    ax.set_xlabel("models trained at once (G)")
    ax.set_ylabel("speed-up over one at a time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def prepare(run: cli.Run) -> dict[str, dict]:
    """name -> run_shadow_models keyword arguments, for each chosen workload
    (a pool larger than the digits split is a ``ValueError``: bad input)."""
    return {name: workload(name, run.settings) for name in run.settings.workloads}


def execute(run: cli.Run, setups: dict[str, dict]) -> dict:
    s = run.settings
    if s.note:
        print(s.note, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gujax-stacked-") as scratch:
        for name, setup in setups.items():
            for arm_text in s.arms:
                new = measure(name, setup, cli.make_arm(arm_text, s), s.num_models,
                              s.group_sizes, s.repeats, scratch)
                for r in new:
                    print(f"{r['workload']:13s} {r['arm']:18s} G={r['models_at_once']:<3d} "
                          f"{r['wall_seconds']:7.1f} s  x{r['speedup']:.2f}  "
                          f"max |logit diff| {r['max_logit_diff']:.1e}", flush=True)
                rows += new
    result = {"rows": rows, "preset": s.preset, "settings": s.record(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "jax": jax.__version__, "backend": jax.default_backend()}}
    write_json(os.path.join(run.out, "stacked.json"), result)
    plot(rows, os.path.join(run.out, "stacked.png"))
    print(f"wrote {run.out}/stacked.json and stacked.png")
    return result


def main(argv=None) -> dict:
    return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)


if __name__ == "__main__":
    main()
