"""Where the GNQ ghost step's time goes: its parts timed side by side.

    python -m experiments.overhead_split                       # MLP, B = 256
    python -m experiments.overhead_split --preset smoke        # seconds; what the tests run
    python -m experiments.overhead_split --model transformer --batch-size 64 --repeats 3

Each part is jitted on its own and timed interleaved with the plain step
(``experiments.overhead.measure_blocks``); each row has XLA's FLOP count
(``compiled.cost_analysis()``; LAPACK calls such as the Cholesky are not
counted) and its time and FLOPs as ratios to the plain step:

- ``capture``: forward + per-example output gradients (no weight gradients);
- ``capture+update``: + the mean update (plain's weight-gradient half);
- ``capture+gram``: + the B x B Gram matrix;
- ``capture+gram+update``: both, the update reusing what the Gram materialised;
- ``gnq_from_gram``: the B x B solve alone, on that step's Gram;
- ``gnq_ghost``: the whole step, as ``experiments.overhead`` times it.

Writes ``split.json`` under ``--out`` (default ``results/overhead_split-<preset>``),
beside ``run.json``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

# First: it sets OPENBLAS_NUM_THREADS before numpy and jax load OpenBLAS.
from experiments.overhead import REG, make_steps, make_workload, measure_blocks

import jax
import jax.numpy as jnp

from gujax.ghost.capture import capture
from gujax.ghost.kernels import tape_gram, tape_gram_and_weighted_grad, tape_weighted_grad
from gujax.models.cost import compiled_flops
from gujax.uniqueness import gnq_from_gram

from experiments import cli
from experiments.cli import option
from experiments.cli import BenchmarkSettings
from experiments.report import write_json


@dataclasses.dataclass(frozen=True)
class SplitSettings(BenchmarkSettings):
    model: str = option("mlp", "the workload (experiments.overhead.make_workload)",
                        choices=("mlp", "cnn", "transformer"))
    batch_size: int = option(256, "the batch size B")
    seq_len: int = option(64, "the transformer's sequence length (--model transformer)")
    blocks: int = option(5, "independent interleaved timing blocks (measure_blocks)")
    repeats: int = option(10, "rounds per block, every part once a round")

    MINIMUMS: ClassVar[dict[str, int]] = {"batch_size": 1, "seq_len": 1, "blocks": 1,
                                          "repeats": 1}


_DEFAULT = SplitSettings(note="The MLP 784-512-512-10 at B = 256, 5 blocks of 10 rounds.")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(_DEFAULT, batch_size=8, seq_len=8, blocks=1, repeats=1,
                              note="Smoke preset: B = 8, one block of one round; a "
                                   "plumbing check, not a measurement."))
EXPERIMENT = cli.Experiment("overhead_split", __doc__, PRESETS)


def parts(model: str, batch_size: int, seq_len: int = 64) -> dict[str, tuple]:
    """part name -> (jitted function, its arguments)."""
    w = make_workload(model, batch_size, seq_len)
    loss_fn, mean = w.loss_fn, jnp.full((batch_size,), 1.0 / batch_size)

    def captured(p, b):
        t = capture(loss_fn, p, b)
        return t.losses, t.inputs, t.out_grads, t.local_grads, t.fallback_grads

    fns = {
        "capture": captured,
        "capture+update": lambda p, b: tape_weighted_grad(capture(loss_fn, p, b), p, mean),
        "capture+gram": lambda p, b: tape_gram(capture(loss_fn, p, b)),
        "capture+gram+update": lambda p, b: tape_gram_and_weighted_grad(
            capture(loss_fn, p, b), p, mean),
    }
    steps = make_steps(w)
    out = {"plain_batched": (jax.jit(steps["plain_batched"][0]), steps["plain_batched"][1])}
    out.update({name: (jax.jit(fn), (w.params, w.batch)) for name, fn in fns.items()})
    k = jax.block_until_ready(out["capture+gram"][0](w.params, w.batch))
    out["gnq_from_gram"] = (jax.jit(lambda k: gnq_from_gram(k, reg=REG)), (k,))
    out["gnq_ghost"] = (jax.jit(steps["gnq_ghost"][0]), steps["gnq_ghost"][1])
    return out


def measure_split(model: str, batch_size: int, *, seq_len: int = 64, blocks: int = 5,
                  repeats: int = 10) -> list[dict]:
    """One row per part: median of block medians, spread, FLOPs, ratios to plain."""
    fns = parts(model, batch_size, seq_len)
    calls = {name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
             for name, (fn, args) in fns.items()}
    times = measure_blocks(calls, blocks=blocks, repeats=repeats, warmup=2,
                           desc=f"{model} B={batch_size}")
    flops = {name: compiled_flops(fn, *args) for name, (fn, args) in fns.items()}
    base_t, base_f = times["plain_batched"]["median"], flops["plain_batched"]
    return [dict(model=model, batch_size=batch_size, part=name,
                 step_seconds=t["median"], spread_seconds=list(t["spread"]),
                 flops=flops[name], time_ratio=t["median"] / base_t,
                 flop_ratio=flops[name] / base_f) for name, t in times.items()]


def execute(run: cli.Run, prepared=None) -> list[dict]:
    s = run.settings
    if s.note:
        print(s.note, flush=True)
    load_before = os.getloadavg()
    rows = measure_split(s.model, s.batch_size, seq_len=s.seq_len, blocks=s.blocks,
                         repeats=s.repeats)
    for r in rows:
        lo, hi = r["spread_seconds"]
        print(f"{r['part']:20s} {r['step_seconds'] * 1e3:9.3f} ms [{lo * 1e3:.3f}, {hi * 1e3:.3f}]"
              f"  x{r['time_ratio']:.2f} time  {r['flops'] / 1e6:9.1f} MFLOP"
              f"  x{r['flop_ratio']:.2f} flops")
    path = os.path.join(run.out, "split.json")
    write_json(path, dict(
        rows=rows, settings=s.record(),
        load=dict(before=list(load_before), after=list(os.getloadavg())),
        cpu_count=os.cpu_count(), backend=jax.default_backend()))
    print(f"wrote {path}")
    return rows


def main(argv=None) -> list[dict]:
    return cli.main(argv, EXPERIMENT, prepare=lambda run: None, execute=execute)


if __name__ == "__main__":
    main()
