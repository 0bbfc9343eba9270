"""Measures what each default gujax model costs per example on this machine.

    python -m gujax.models.cost [--out costs.json] [--repeats 3]

For each default configuration: parameter count, forward FLOPs per example
(XLA's cost analysis of the compiled single-example forward pass), and the
wall time per example of a jitted batched forward pass (B = 64) and of
per-example gradients (``gujax.grads.per_example_grads``, B = 16), median
over repeats after one warm-up call. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from gujax.progress import progress_bar

from gujax.grads import per_example_grads
from gujax.models.cnn import SmallCNN
from gujax.models.common import param_count
from gujax.models.mlp import MLP
from gujax.models.transformer import TransformerLM
from gujax.models.wrn import WideResNet


def default_configs() -> dict[str, tuple]:
    """name -> (model, one example input, integer targets shape for one example)."""
    image = jnp.zeros((32, 32, 3), jnp.float32)
    return {
        "MLP() on 32x32x3": (MLP(), image, ()),
        "SmallCNN() on 32x32x3": (SmallCNN(), image, ()),
        "WideResNet() (WRN-16-4) on 32x32x3": (WideResNet(), image, ()),
        "TransformerLM() on 128 tokens": (TransformerLM(), jnp.zeros((128,), jnp.int32), (128,)),
    }


def compiled_flops(fn: Callable, *args) -> float:
    """XLA's FLOP count for jitted ``fn`` compiled at ``args`` (NaN if the
    backend does not say; library calls such as LAPACK are not counted)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _median_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, example, target_shape, *, repeats: int = 3, forward_batch: int = 64,
            grad_batch: int = 16) -> dict:
    """Parameter count, forward GFLOPs per example, ms per example (forward, per-example grads)."""
    params = jax.jit(model.init)(jax.random.key(0), example)["params"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def loss(p, ex):
        logits = model.apply({"params": p}, ex["x"])
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), ex["y"][..., None], axis=-1)
        return -jnp.mean(picked)

    grads = jax.jit(lambda p, b: per_example_grads(loss, p, b))
    batch_x = jnp.broadcast_to(example, (forward_batch, *example.shape))
    grad_batch_tree = {"x": batch_x[:grad_batch],
                       "y": jnp.zeros((grad_batch, *target_shape), jnp.int32)}
    forward_s = _median_seconds(lambda: apply(params, batch_x), repeats)
    grad_s = _median_seconds(lambda: grads(params, grad_batch_tree), repeats)
    return {
        "params": param_count(params),
        "forward_gflops_per_example": compiled_flops(apply, params, example) / 1e9,
        "forward_ms_per_example": 1e3 * forward_s / forward_batch,
        "per_example_grad_ms_per_example": 1e3 * grad_s / grad_batch,
        "forward_batch": forward_batch,
        "grad_batch": grad_batch,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    for name, (model, example, target_shape) in progress_bar(default_configs().items(),
                                                             desc="models"):
        results[name] = measure(model, example, target_shape, repeats=args.repeats)
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| model | parameters | forward GFLOPs / example | forward ms / example (B=64) "
          "| per-example grad ms / example (B=16) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params']:,} | {r['forward_gflops_per_example']:.4f} | "
              f"{r['forward_ms_per_example']:.3f} | {r['per_example_grad_ms_per_example']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
