"""Per-step cost of privacy measurement: plain SGD vs DP-SGD vs GNQ, side by side.

    python -m experiments.overhead                    # B in {64, 256}, all three models
    python -m experiments.overhead --preset smoke     # under a minute
    python -m experiments.overhead --models mlp --batch-sizes 256 --repeats 20 --blocks 7

Every method is one jitted training step (gradient stage + SGD update) on the
same model, batch and parameters, measured in one process: compile, warm up,
then ``--blocks`` independent blocks of ``--repeats`` rounds in which the
methods run in turn (interleaved, order rotated each round, so load from
other processes hits them alike), with ``block_until_ready``. Reported per
method: the median of the block medians (``step_seconds``; the verdicts use
it) and the min-max of the block medians (``spread_seconds``); ratios are
median / median of the baseline, with the min-max of per-block ratios
(``ratio_spread``). ``measure_blocks`` does the timing for any zero-argument
callables (``experiments.overhead_peers`` reuses it).

Methods:
  plain          jax.grad of the mean of vmap(per-example loss)
  plain_batched  jax.grad of the batch-mean loss on the batched model call
                 (the step as a JAX user writes it); the baseline for every
                 ratio is the faster of plain and plain_batched
  dpsgd          ghost clipping (gujax.ghost.ghost_dpsgd), C = 1, sigma = 1
  dpsgd_nonoise  the ghost-clipped sum alone (no Gaussian noise): separates the
                 cost of clipping from that of drawing P normal variates
  dpsgd_optax    materialised vmap(grad) + optax.contrib.differentially_private_aggregate
  gnq_explicit   materialised vmap(grad) + Gram + Cholesky GNQ, mean update
  gnq_ghost      ghost Gram + mean update in one go
                 (gujax.ghost.kernels.tape_gram_and_weighted_grad) + Cholesky GNQ

Peak memory (``peak_memory_mb``) is XLA's static estimate for the compiled
step on this backend: temp + argument + output buffer sizes from
``compiled.memory_analysis()``, not a measured resident-set size.

Writes ``<out>/overhead.json`` (``rows``: model, batch_size, method,
step_seconds, spread_seconds, block_medians, ratio_to_plain, ratio_spread,
baseline, peak_memory_mb, memory_ratio_to_plain; plus ``load``
(os.getloadavg() before and after), ``cpu_count``, the machine and settings) and ``<out>/overhead.png`` (step time vs batch size).
"""
from __future__ import annotations

import os

# The B x B Cholesky solve runs in LAPACK (OpenBLAS); its worker threads
# spin-wait and, on a shared 2-core machine, turn a 1 ms solve into 100 ms.
# One thread is plenty for a B <= 1024 matrix (XLA's own thread pool is
# unaffected). Must be set before numpy / jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from gujax.ghost.capture import capture
from gujax.ghost.clipping import ghost_clipped_sum, ghost_dpsgd
from gujax.ghost.kernels import tape_gram_and_weighted_grad
from gujax.uniqueness import gnq_from_gram
from gujax.grads import gram, per_example_grads
from gujax.models import MLP, SmallCNN, TransformerLM

LEARNING_RATE = 0.1
REG = 1e-2  # relative GNQ regulariser
CLIP, NOISE = 1.0, 1.0

PRESETS = {
    "smoke": dict(models=("mlp", "cnn", "transformer"), batch_sizes=(16,), repeats=3,
                  seq_len=64, blocks=2),
    "default": dict(models=("mlp", "cnn", "transformer"), batch_sizes=(64, 256), repeats=7,
                    seq_len=64, blocks=5),
}
METHODS = ("plain", "plain_batched", "dpsgd", "dpsgd_nonoise", "dpsgd_optax", "gnq_explicit", "gnq_ghost")

# The baseline is the faster of these two (median of block medians).
PLAIN_METHODS = ("plain", "plain_batched")
# Targets from issue 8 (GNQ ghost / plain; DP-SGD ghost / plain).
GNQ_TARGETS = {"mlp": 1.3, "cnn": 2.0, "transformer": 1.5}
DPSGD_TARGET = 2.0
MEMORY_TARGET = 1.5


class Workload(NamedTuple):
    """A model with a batch: loss_fn(params, example) -> scalar;
    batch_loss(params, batch) -> the batch-mean loss from one batched model
    call (how a JAX user writes the plain step)."""
    loss_fn: Callable
    params: dict
    batch: dict
    batch_loss: Callable


def _classification(model, x_shape, batch_size, key) -> Workload:
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch_size,) + x_shape)
    y = jax.random.randint(ky, (batch_size,), 0, 10)
    params = model.init(kp, x[0])["params"]

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

    def batch_loss(p, b):
        logp = jax.nn.log_softmax(model.apply({"params": p}, b["x"]))
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=-1))

    return Workload(loss_fn, params, {"x": x, "y": y}, batch_loss)


def _language_model(batch_size, seq_len, key) -> Workload:
    model = TransformerLM(vocab_size=256, d_model=128, num_heads=4, num_layers=2, max_len=128)
    kt, kp = jax.random.split(key)
    tokens = jax.random.randint(kt, (batch_size, seq_len + 1), 0, 256)
    params = model.init(kp, tokens[0, :-1])["params"]

    def loss_fn(p, ex):
        logits = model.apply({"params": p}, ex["tokens"][:-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ex["tokens"][1:, None], axis=-1))

    def batch_loss(p, b):
        logits = model.apply({"params": p}, b["tokens"][:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["tokens"][:, 1:, None], axis=-1))

    return Workload(loss_fn, params, {"tokens": tokens}, batch_loss)


def make_workload(name: str, batch_size: int, seq_len: int, seed: int = 0) -> Workload:
    key = jax.random.key(seed)
    if name == "mlp":  # 784-512-512-10 on flattened 28x28x1 images
        return _classification(MLP(hidden=(512, 512), num_classes=10), (28, 28, 1),
                               batch_size, key)
    if name == "cnn":
        return _classification(SmallCNN(num_classes=10), (32, 32, 3), batch_size, key)
    if name == "transformer":
        return _language_model(batch_size, seq_len, key)
    raise ValueError(f"unknown model {name!r}; choose from mlp, cnn, transformer")


def _sgd(params, update):
    return jax.tree_util.tree_map(lambda p, u: p - LEARNING_RATE * u, params, update)


def make_steps(w: Workload) -> dict[str, tuple[Callable, tuple]]:
    """method -> (step function, its arguments); every step returns the new
    params and whatever the method measures, so nothing is dead code."""
    loss_fn, n = w.loss_fn, jax.tree_util.tree_leaves(w.batch)[0].shape[0]
    dp_state = optax.contrib.DifferentiallyPrivateAggregateState(jax.random.key(1))
    dp_tx = optax.contrib.differentially_private_aggregate(CLIP, NOISE, key=jax.random.key(1))

    def mean_loss(params, batch):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    def plain(params, batch):
        return _sgd(params, jax.grad(mean_loss)(params, batch))

    def plain_batched(params, batch):
        return _sgd(params, jax.grad(w.batch_loss)(params, batch))

    def dpsgd(params, batch, state):
        update, state, info = ghost_dpsgd(loss_fn, params, batch, state,
                                          l2_norm_clip=CLIP, noise_multiplier=NOISE)
        return _sgd(params, update), state, info.norms

    def dpsgd_nonoise(params, batch):
        total, info = ghost_clipped_sum(loss_fn, params, batch, l2_norm_clip=CLIP)
        return _sgd(params, jax.tree_util.tree_map(lambda g: g / n, total)), info.norms

    def dpsgd_optax(params, batch, state):
        grads = per_example_grads(loss_fn, params, batch)
        update, state = dp_tx.update(grads, state, params)
        return _sgd(params, update), state

    def gnq_explicit(params, batch):
        grads = per_example_grads(loss_fn, params, batch)
        scores = gnq_from_gram(gram(grads), reg=REG)
        update = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        return _sgd(params, update), scores

    def gnq_ghost(params, batch):
        tape = capture(loss_fn, params, batch)
        k, update = tape_gram_and_weighted_grad(tape, params, jnp.full((n,), 1.0 / n))
        return _sgd(params, update), gnq_from_gram(k, reg=REG)

    return {
        "plain": (plain, (w.params, w.batch)),
        "plain_batched": (plain_batched, (w.params, w.batch)),
        "dpsgd": (dpsgd, (w.params, w.batch, dp_state)),
        "dpsgd_nonoise": (dpsgd_nonoise, (w.params, w.batch)),
        "dpsgd_optax": (dpsgd_optax, (w.params, w.batch, dp_state)),
        "gnq_explicit": (gnq_explicit, (w.params, w.batch)),
        "gnq_ghost": (gnq_ghost, (w.params, w.batch)),
    }


def peak_memory_mb(compiled) -> float:
    """XLA's static buffer estimate: temp + arguments + outputs (MB)."""
    stats = compiled.memory_analysis()
    total = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    return total / 2 ** 20


def measure_blocks(steps: dict[str, Callable[[], Any]], *, blocks: int = 5, repeats: int = 7,
                   warmup: int = 1, timer: Callable[[], float] = time.perf_counter,
                   desc: str | None = None) -> dict[str, dict]:
    """Time zero-argument callables interleaved, in ``blocks`` independent blocks.

    Each callable must block until its work is done (``jax.block_until_ready``
    inside a JAX step). After ``warmup`` untimed calls each, every block runs
    ``repeats`` rounds; in a round every step runs once, in an order rotated
    by one each round, so slow spells from other processes hit all steps
    alike. Per step: the median of each block's times (``block_medians``),
    their median (``median``, the headline figure) and min-max (``spread``),
    and every time (``all_seconds``, one list per block).
    """
    if blocks < 1 or repeats < 1:
        raise ValueError("blocks and repeats must be >= 1")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [[] for _ in range(blocks)] for name in names}
    rounds = tqdm(range(blocks * repeats), desc=desc, leave=False, disable=desc is None)
    for i in rounds:
        block, r = divmod(i, repeats)
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            start = timer()
            steps[name]()
            times[name][block].append(timer() - start)
    out = {}
    for name in names:
        medians = [statistics.median(b) for b in times[name]]
        out[name] = dict(median=statistics.median(medians),
                         spread=(min(medians), max(medians)),
                         block_medians=medians, all_seconds=times[name])
    return out


def measure(model: str, batch_size: int, seq_len: int, repeats: int, methods,
            blocks: int = 5) -> list[dict]:
    """Rows for one (model, batch size): step time (median of block medians,
    with the min-max spread of block medians) and memory per method.

    The baseline is the faster (by median of medians) of ``plain`` and
    ``plain_batched``; every ``ratio_to_plain`` is against it, and the row
    field ``baseline`` names it."""
    steps = make_steps(make_workload(model, batch_size, seq_len))
    methods = list(dict.fromkeys(list(PLAIN_METHODS) + list(methods)))
    calls, memory = {}, {}
    for method in methods:
        fn, args = steps[method]
        compiled = jax.jit(fn).lower(*args).compile()
        memory[method] = peak_memory_mb(compiled)
        calls[method] = (lambda c, a: lambda: jax.block_until_ready(c(*a)))(compiled, args)
    timed = measure_blocks(calls, blocks=blocks, repeats=repeats,
                           desc=f"{model} B={batch_size}")
    base = min(PLAIN_METHODS, key=lambda m: timed[m]["median"])
    base_time = timed[base]["median"]
    # Per-block ratios: both steps ran interleaved in the same block.
    ratios = {m: [t / b for t, b in zip(timed[m]["block_medians"], timed[base]["block_medians"])]
              for m in methods}
    rows = []
    for method in methods:
        t = timed[method]
        rows.append(dict(model=model, batch_size=batch_size, method=method,
                         step_seconds=t["median"], spread_seconds=list(t["spread"]),
                         block_medians=t["block_medians"],
                         ratio_to_plain=t["median"] / base_time,
                         ratio_spread=[min(ratios[method]), max(ratios[method])],
                         baseline=base, peak_memory_mb=memory[method],
                         memory_ratio_to_plain=memory[method] / memory[base],
                         blocks=blocks, repeats=repeats, all_seconds=t["all_seconds"]))
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against the measured rows (never asserted)."""
    lines = []
    by = {(r["model"], r["batch_size"], r["method"]): r for r in rows}
    for (model, b, method), r in sorted(by.items()):
        if method == "gnq_ghost" and model in GNQ_TARGETS:
            target = GNQ_TARGETS[model]
            lines.append(_verdict(f"{model} B={b}: GNQ ghost / plain", r["ratio_to_plain"], target))
            dp = by.get((model, b, "dpsgd"))
            if dp is not None:
                lines.append(_verdict(f"{model} B={b}: GNQ ghost / DP-SGD ghost",
                                      r["step_seconds"] / dp["step_seconds"], 1.0))
            lines.append(_verdict(f"{model} B={b}: GNQ ghost memory / plain",
                                  r["memory_ratio_to_plain"], MEMORY_TARGET))
        if method == "dpsgd":
            if model == "mlp":
                lines.append(_verdict(f"{model} B={b}: DP-SGD ghost / plain",
                                      r["ratio_to_plain"], DPSGD_TARGET))
            lines.append(_verdict(f"{model} B={b}: DP-SGD ghost memory / plain",
                                  r["memory_ratio_to_plain"], MEMORY_TARGET))
    return lines


def _verdict(label: str, value: float, target: float) -> str:
    status = "met" if value <= target else f"MISSED by {value / target:.2f}x"
    return f"{label} = {value:.2f} (target <= {target:g}): {status}"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in METHODS:
            pts = sorted((r["batch_size"], r["step_seconds"]) for r in rows
                         if r["model"] == model and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=model, xlabel="batch size", ylabel="step time (s)", xscale="log",
               yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn", "transformer"))
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--blocks", type=int,
                        help="independent interleaved blocks (default preset: 5)")
    parser.add_argument("--out", default="results/overhead")
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for name in ("models", "batch_sizes", "repeats", "seq_len", "blocks"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if (any(b < 1 for b in settings["batch_sizes"]) or settings["repeats"] < 1
            or settings["blocks"] < 1):
        raise ValueError("batch sizes, --repeats and --blocks must be >= 1")
    methods = list(dict.fromkeys(list(PLAIN_METHODS) + list(args.methods)))
    load_before = os.getloadavg()

    rows = []
    for model in settings["models"]:
        for b in settings["batch_sizes"]:
            rows += measure(model, b, settings["seq_len"], settings["repeats"], methods,
                            blocks=settings["blocks"])
            for r in rows[-len(methods):]:
                lo, hi = r["spread_seconds"]
                print(f"{model:12s} B={b:4d} {r['method']:13s} {r['step_seconds'] * 1e3:9.2f} ms"
                      f" [{lo * 1e3:.2f}, {hi * 1e3:.2f}]  x{r['ratio_to_plain']:6.2f}"
                      f" [{r['ratio_spread'][0]:.2f}, {r['ratio_spread'][1]:.2f}]"
                      f"  mem {r['peak_memory_mb']:8.1f} MB (x{r['memory_ratio_to_plain']:.2f})"
                      f"  vs {r['baseline']}", flush=True)
    checks = verdicts(rows)
    print("\n".join(checks))

    os.makedirs(args.out, exist_ok=True)
    result = dict(rows=rows, targets=checks, settings=settings,
                  load=dict(before=list(load_before), after=list(os.getloadavg()),
                            note="os.getloadavg(): 1, 5, 15 minute averages"),
                  cpu_count=os.cpu_count(),
                  machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                               jax=jax.__version__, backend=jax.default_backend(),
                               memory_note="XLA compiled memory_analysis(): temp + "
                                           "argument + output - alias bytes"))
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(args.out, "overhead.png"))
    print(f"wrote {args.out}/overhead.json and overhead.png")
    return result


if __name__ == "__main__":
    main()
