"""Where the GNQ ghost step's time goes: its parts timed side by side.

    python -m experiments.overhead_split                       # MLP, B = 256
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

Writes ``split.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os

# First: it sets OPENBLAS_NUM_THREADS before numpy and jax load OpenBLAS.
from experiments.overhead import REG, make_steps, make_workload, measure_blocks

import jax
import jax.numpy as jnp

from gujax.ghost.capture import capture
from gujax.ghost.kernels import tape_gram, tape_gram_and_weighted_grad, tape_weighted_grad
from gujax.models.cost import compiled_flops
from gujax.uniqueness import gnq_from_gram


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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn", "transformer"), default="mlp")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="results/overhead_split")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.blocks < 1 or args.repeats < 1:
        raise ValueError("--batch-size, --blocks and --repeats must be >= 1")
    load_before = os.getloadavg()
    rows = measure_split(args.model, args.batch_size, seq_len=args.seq_len,
                         blocks=args.blocks, repeats=args.repeats)
    for r in rows:
        lo, hi = r["spread_seconds"]
        print(f"{r['part']:20s} {r['step_seconds'] * 1e3:9.3f} ms [{lo * 1e3:.3f}, {hi * 1e3:.3f}]"
              f"  x{r['time_ratio']:.2f} time  {r['flops'] / 1e6:9.1f} MFLOP"
              f"  x{r['flop_ratio']:.2f} flops")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump(dict(rows=rows, settings=vars(args),
                       load=dict(before=list(load_before), after=list(os.getloadavg())),
                       cpu_count=os.cpu_count(), backend=jax.default_backend()), f, indent=1)
    print(f"wrote {os.path.join(args.out, 'split.json')}")
    return rows


if __name__ == "__main__":
    main()
