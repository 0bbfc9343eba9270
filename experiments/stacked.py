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
wall_seconds, speedup, max_logit_diff, plus the machine) and
``<out>/stacked.png`` (speed-up against G).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see experiments/__init__.py

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from gujax.arms import parse_arm
from gujax.audit.shadow import run_shadow_models
from gujax.data import default_cache_dir, load, random_subset
from gujax.data.dataset import Dataset
from gujax.models import MLP, SmallCNN
from gujax.train import TrainConfig

from experiments.comparison import enable_compilation_cache

PRESETS = {
    "default": dict(arms=("sgd", "censor:tau=16", "dpsgd:eps=3"), num_models=12,
                    group_sizes=(1, 3, 6, 12), repeats=2,
                    mlp=dict(hidden=512, pool=500, epochs=20, batch_size=64),
                    cnn=dict(widths=(8, 16), pool=256, epochs=2, batch_size=32)),
    "smoke": dict(arms=("sgd",), num_models=2, group_sizes=(1, 2), repeats=1, mlp=dict(hidden=32, pool=80, epochs=2, batch_size=16),
                  cnn=dict(widths=(8, 8), pool=48, epochs=1, batch_size=16)),
}


def _random_images(n: int, seed: int, split: str) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                   labels=rng.integers(0, 10, n).astype(np.int32),
                   ids=np.arange(n, dtype=np.int64), class_names=tuple(map(str, range(10))),
                   name="random32", split=split)


def workloads(preset: dict) -> dict[str, dict]:
    """name -> run_shadow_models keyword arguments (pool, population, model, config)."""
    mlp, cnn = preset["mlp"], preset["cnn"]
    digits_train, digits_test = load("digits", "train"), load("digits", "test")
    return {
        "digits-mlp": dict(
            pool=random_subset(digits_train, mlp["pool"], 0), population=digits_test,
            model=MLP(hidden=(mlp["hidden"],)),
            config=TrainConfig(epochs=mlp["epochs"], batch_size=mlp["batch_size"],
                               learning_rate=0.2, progress=False)),
        "random32-cnn": dict(
            pool=_random_images(cnn["pool"], 0, "train"),
            population=_random_images(cnn["pool"] // 2, 1, "test"),
            model=SmallCNN(widths=tuple(cnn["widths"])),
            config=TrainConfig(epochs=cnn["epochs"], batch_size=cnn["batch_size"],
                               learning_rate=0.1, progress=False)),
    }


def measure(name: str, setup: dict, arm_text: str, num_models: int, group_sizes,
            repeats: int, scratch: str) -> list[dict]:
    arm = parse_arm(arm_text)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--workloads", nargs="+", default=None,
                        help="subset of digits-mlp, random32-cnn")
    parser.add_argument("--out", default=None, help="default results/stacked-<preset>")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.out or os.path.join("results", f"stacked-{args.preset}")
    os.makedirs(out, exist_ok=True)
    setups = workloads(preset)
    chosen = args.workloads or list(setups)
    unknown = sorted(set(chosen) - set(setups))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(setups)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gujax-stacked-") as scratch:
        enable_compilation_cache(os.path.join(default_cache_dir(), "jax"))
        for name in chosen:
            for arm_text in preset["arms"]:
                new = measure(name, setups[name], arm_text, preset["num_models"],
                              tuple(preset["group_sizes"]), preset["repeats"], scratch)
                for r in new:
                    print(f"{r['workload']:13s} {r['arm']:18s} G={r['models_at_once']:<3d} "
                          f"{r['wall_seconds']:7.1f} s  x{r['speedup']:.2f}  "
                          f"max |logit diff| {r['max_logit_diff']:.1e}", flush=True)
                rows += new
    result = {"rows": rows, "preset": args.preset, "settings": preset,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "jax": jax.__version__, "backend": jax.default_backend()}}
    with open(os.path.join(out, "stacked.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(out, "stacked.png"))
    print(f"wrote {out}/stacked.json and stacked.png")
    return result


if __name__ == "__main__":
    main()
