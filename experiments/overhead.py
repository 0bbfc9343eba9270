"""Per-step cost of privacy measurement: the training step as trained, against plain SGD.

    python -m experiments.overhead                    # 4 models, B in {64, 256}: the stage table
    python -m experiments.overhead --preset smoke     # well under a minute
    python -m experiments.overhead --preset memory    # compile only: peak memory, B = 64..1024
    python -m experiments.overhead --preset curves    # MLP ratio vs B and vs width, with FLOP floors
    python -m experiments.overhead --preset gpu       # WRN-16-4 and a larger transformer (GPU)
    python -m experiments.overhead --models mlp --batch-sizes 256 --repeats 20 --blocks 7

**Stage rows** (the headline). Each is one jitted training step as the
trainer runs it::

    stage = make_stage(make_engine("ghost", loss_fn), policy)
    update, state, metrics = stage(params, batch, state)
    params = params - lr * update

with ``batch = {"image", "label", "id", "mask"}`` (classifiers) or
``{"tokens", "id", "mask"}`` (the transformer) and ``state = stage.init(params)``
(a fresh ledger for every timed call, so every call refuses the same rows).
Methods (``STAGE_METHODS``):

  monitor   monitor_policy(num_examples=N, reg=1e-2)
  censor    censor_policy(budget=tau, ...): tau is the ``CENSOR_QUANTILE``
            quantile of the batch's own one-step disclosures d_j (from one
            monitor step on a fresh ledger), so a measurable share of the
            batch is refused; the row records ``budget`` and
            ``refused_fraction`` (refused / scored in the timed step)
  clip      clip_policy(cap = the median d_j, ...): about half the rows are
            scaled down; the row records ``cap`` and ``clipped_fraction``
  dpsgd     dpsgd_policy(l2_norm_clip=1, expected_batch_size=B,
            noise_multiplier=1, seed=0), no ledger
  dpsgd_paired
            the same with noise=Noise(schedule="paired"): the noise's bits
            from both words of each threefry block (gujax.noise)

against the plain step: ``plain`` (jax.grad of the mean of vmap(per-example
loss)) and ``plain_batched`` (jax.grad of the batch-mean loss on the batched
model call, the step as a JAX user writes it); every ratio is to the faster
of the two (median of block medians), named in each row's ``baseline``.

**Kernel rows** (``--kernels``, section "kernel"): the kernels alone, as this
benchmark timed them before the stage rows, in the same interleaved blocks:

  dpsgd          gujax.ghost.ghost_dpsgd (state from the DP-SGD stage's init)
  dpsgd_nonoise  the ghost-clipped sum alone (gujax.ghost.ghost_clipped_sum)
  dpsgd_optax    materialised vmap(grad) + optax.contrib.differentially_private_aggregate
  gnq_explicit   materialised vmap(grad) + Gram + Cholesky GNQ, mean update
  gnq_ghost      capture + gujax.ghost.kernels.tape_gram_and_weighted_grad + Cholesky GNQ

**Memory rows** (``--memory-batch-sizes``, section "memory"): compiled, never
run: plain, plain_batched, monitor_explicit (the monitor stage on the
explicit vmap(grad) engine), monitor (ghost GNQ) and dpsgd (ghost DP-SGD).

Timing: one process; compile, warm up, then ``--blocks`` independent blocks
of ``--repeats`` rounds in which the steps run in turn (interleaved, order
rotated each round, so load from other processes hits them alike), with
``block_until_ready``. Per step: the median of the block medians
(``step_seconds``) and the min-max of the block medians (``spread_seconds``);
ratios are median / median of the baseline, with the min-max of per-block
ratios (``ratio_spread``). ``measure_blocks`` does the timing for any
zero-argument callables (``experiments.overhead_peers`` reuses it).

Peak memory (``peak_memory_bytes``, ``peak_memory_mb``) is XLA's static
estimate for the compiled step on this backend: temp + argument + output -
alias bytes from ``compiled.memory_analysis()``, not a measured resident-set
size. FLOPs (``flops``) are XLA's count for the compiled step
(``gujax.models.cost.compiled_flops``; LAPACK calls such as the Cholesky are
not counted); ``flop_ratio`` = flops(step) / flops(baseline) is the floor a
time ratio would reach at plain's FLOP rate.

Writes ``<out>/overhead.json``: ``rows`` (stage rows: section, model, width,
seq_len, batch_size, method, step_seconds, spread_seconds, block_medians,
ratio_to_plain, ratio_spread, baseline, load, peak_memory_bytes,
peak_memory_mb, memory_ratio_to_plain, flops, flop_ratio, and the censor /
clip settings and fractions), ``kernel_rows`` (same fields), ``memory_rows``
(compile-only: no times), ``memory_factors`` (ghost GNQ / plain memory by B),
``targets``, ``settings``, ``load`` (os.getloadavg() before and after),
``cpu_count`` and the machine; plus ``overhead.png`` (step time vs B) and,
where there are several B or widths, ``ratio_vs_batch.png`` /
``ratio_vs_width.png`` (ratio with its FLOP floor).
"""
from __future__ import annotations

import os

# The B x B Cholesky solve runs in LAPACK (OpenBLAS); its worker threads
# spin-wait and, on a shared 2-core machine, turn a 1 ms solve into 100 ms.
# One thread is plenty for a B <= 1024 matrix (XLA's own thread pool is
# unaffected). Must be set before numpy / jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import inspect
import json
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from gujax.progress import progress_bar

from experiments import cli
from experiments.cli import BenchmarkSettings, Experiment, option, presets
from gujax import checks
from gujax.engine import make_engine, make_stage
from gujax.ghost.capture import capture
from gujax.ghost.clipping import ghost_clipped_sum, ghost_dpsgd
from gujax.ghost.kernels import tape_gram_and_weighted_grad
from gujax.grads import gram, per_example_grads
from gujax.models import MLP, ScatterLinear, SmallCNN, TransformerLM, WideResNet
from gujax.models.cost import compiled_flops
from gujax.noise import Noise
from gujax.policies import (censor_policy, clip_policy, dpsgd_policy, gnq_ledger,
                            monitor_policy)
from gujax.uniqueness import gnq_from_gram

LEARNING_RATE = 0.1
REG = 1e-2  # relative GNQ regulariser
CLIP, NOISE = 1.0, 1.0
# The ledger's size: a CIFAR-10-sized training set (the batch's ids are 0..B-1).
NUM_EXAMPLES = 50_000
# censor's budget: this quantile of the batch's one-step disclosures; the
# censor's fixed point refuses more than 1 - q of the batch (the admitted
# rows' GNQ rises as others leave), 0.75 gives ~30% on the MLP.
CENSOR_QUANTILE = 0.75
CLIP_QUANTILE = 0.5  # clip's cap: the median one-step disclosure

MODELS = ("mlp", "cnn", "transformer", "scatter_linear", "wrn", "transformer_big")
PLAIN_METHODS = ("plain", "plain_batched")  # the baseline is the faster of these
STAGE_METHODS = ("monitor", "censor", "clip", "dpsgd", "dpsgd_paired")
KERNEL_METHODS = ("dpsgd", "dpsgd_nonoise", "dpsgd_optax", "gnq_explicit", "gnq_ghost")
MEMORY_METHODS = ("plain", "plain_batched", "monitor_explicit", "monitor", "dpsgd")

@dataclasses.dataclass(frozen=True)
class OverheadSettings(BenchmarkSettings):
    """What the benchmark measures (every field an option of its own)."""
    models: tuple[str, ...] = option(("mlp", "cnn", "transformer", "scatter_linear"),
                                     "models to measure", choices=MODELS)
    batch_sizes: tuple[int, ...] = option((64, 256), "timed batch sizes (stage and kernel rows)")
    methods: tuple[str, ...] = option(STAGE_METHODS, "stage methods", choices=STAGE_METHODS)
    kernels: tuple[str, ...] = option((), "kernel rows timed beside the stage rows",
                                      choices=KERNEL_METHODS)
    memory_batch_sizes: tuple[int, ...] = option((), "compile-only batch sizes (memory rows)")
    widths: tuple[int, ...] = option((), "MLP hidden widths timed at --width-batch-size")
    width: int = option(512, "MLP hidden width elsewhere")
    width_batch_size: int = option(256, "batch size of the width curve")
    repeats: int = option(4, "rounds per timing block")
    fast_repeats: int = option(0, "rounds per block for the models with short steps (mlp, "
                                  "scatter_linear); 0: --repeats")
    seq_len: int = option(64, "transformer sequence length")
    blocks: int = option(5, "independent interleaved timing blocks")
    num_examples: int = option(NUM_EXAMPLES, "the GNQ ledger's size")

    def check(self) -> None:
        for name in ("width", "width_batch_size", "repeats", "seq_len", "blocks",
                     "num_examples"):
            checks.positive_int(getattr(self, name), f"--{name.replace('_', '-')}")
        checks.positive_int(self.fast_repeats, "--fast-repeats", minimum=0)
        for name in ("batch_sizes", "memory_batch_sizes", "widths"):
            for value in getattr(self, name):
                checks.positive_int(value, f"--{name.replace('_', '-')}")
        largest = max((*self.batch_sizes, *self.memory_batch_sizes, 1))
        if self.num_examples < largest:
            raise ValueError(f"--num-examples ({self.num_examples}) must be at least the "
                             f"largest batch size ({largest})")

    def repeats_for(self, model: str) -> int:
        return self.fast_repeats if self.fast_repeats and model in FAST_MODELS else self.repeats


FAST_MODELS = ("mlp", "scatter_linear")
_SMOKE = OverheadSettings(batch_sizes=(4,), repeats=2, blocks=2, seq_len=8, width=64,
                          width_batch_size=4,
                          note="every stage on every model at B = 4: the structure, in "
                               "well under a minute (compilation is most of it)")
PRESETS = presets(
    default=OverheadSettings(kernels=("gnq_ghost", "dpsgd", "dpsgd_nonoise"), fast_repeats=20,
                             note="the stage table: 4 models, B in {64, 256}"),
    smoke=_SMOKE,
    memory=OverheadSettings(batch_sizes=(), repeats=1, blocks=1,
                            memory_batch_sizes=(64, 128, 256, 512, 1024),
                            note="compile only (no timing): peak memory and FLOPs as B grows"),
    curves=OverheadSettings(models=("mlp",), batch_sizes=(64, 128, 256, 512, 1024), repeats=6,
                            blocks=4, widths=(512, 1024, 2048, 4096),
                            note="the MLP's cost curves: ratio vs B at width 512, ratio vs "
                                 "width at B = 256"),
    # One GPU, under 10 minutes: WRN-16-4 on 32x32x3 and a 6-layer d_model =
    # 512 transformer on 256 tokens. Not run on the development CPU.
    gpu=OverheadSettings(models=("wrn", "transformer_big"), repeats=5, seq_len=256,
                         note="one GPU, under 10 minutes: WRN-16-4 and a 6-layer d_model 512 "
                              "transformer on 256 tokens"),
)
EXPERIMENT = Experiment("overhead", __doc__, PRESETS)


# Targets (issue 27; CNN from issue 8): stage step / plain step, keyed (model,
# method, B); B None: at every batch size.
STAGE_TARGETS = {("mlp", "monitor", 256): 1.3, ("mlp", "censor", 256): 1.4,
                 ("mlp", "dpsgd", 256): 1.5, ("mlp", "dpsgd_paired", 256): 1.5,
                 ("mlp", "dpsgd", 64): 2.0, ("mlp", "dpsgd_paired", 64): 2.0,
                 ("transformer", "monitor", None): 1.5,
                 ("scatter_linear", "monitor", None): 1.3, ("cnn", "monitor", None): 2.0}
MEMORY_TARGET = 1.5


class Workload(NamedTuple):
    """A model with a batch: loss_fn(params, example) -> scalar over the
    kernel batch ``batch`` ({"x", "y"} or {"tokens"}); batch_loss(params,
    batch) -> the batch-mean loss from one batched model call (how a JAX user
    writes the plain step). ``stage_inputs`` gives the trainer's form."""
    loss_fn: Callable
    params: dict
    batch: dict
    batch_loss: Callable


def _classification(model, x_shape, batch_size, key) -> Workload:
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch_size,) + x_shape)
    y = jax.random.randint(ky, (batch_size,), 0, 10)
    params = jax.jit(model.init)(kp, x[0])["params"]  # jitted: faster than eager here

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

    def batch_loss(p, b):
        logp = jax.nn.log_softmax(model.apply({"params": p}, b["x"]))
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=-1))

    return Workload(loss_fn, params, {"x": x, "y": y}, batch_loss)


def _language_model(model, batch_size, seq_len, key) -> Workload:
    kt, kp = jax.random.split(key)
    tokens = jax.random.randint(kt, (batch_size, seq_len + 1), 0, model.vocab_size)
    params = jax.jit(model.init)(kp, tokens[0, :-1])["params"]

    def loss_fn(p, ex):
        logits = model.apply({"params": p}, ex["tokens"][:-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ex["tokens"][1:, None], axis=-1))

    def batch_loss(p, b):
        logits = model.apply({"params": p}, b["tokens"][:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["tokens"][:, 1:, None], axis=-1))

    return Workload(loss_fn, params, {"tokens": tokens}, batch_loss)


def make_workload(name: str, batch_size: int, seq_len: int, seed: int = 0,
                  width: int = 512) -> Workload:
    """``width``: the MLP's hidden width (784-width-width-10); other models ignore it."""
    key = jax.random.key(seed)
    if name == "mlp":  # 784-512-512-10 on flattened 28x28x1 images
        return _classification(MLP(hidden=(width, width), num_classes=10), (28, 28, 1),
                               batch_size, key)
    if name == "cnn":
        return _classification(SmallCNN(num_classes=10), (32, 32, 3), batch_size, key)
    if name == "scatter_linear":  # Tramer & Boneh's linear model on CIFAR-10 ScatterNet features
        return _classification(ScatterLinear(num_classes=10, groups=27), (8, 8, 243),
                               batch_size, key)
    if name == "wrn":  # WRN-16-4 (GroupNorm) on 32x32x3
        return _classification(WideResNet(depth=16, width=4, num_classes=10), (32, 32, 3),
                               batch_size, key)
    if name == "transformer":
        model = TransformerLM(vocab_size=256, d_model=128, num_heads=4, num_layers=2,
                              max_len=max(128, seq_len))
        return _language_model(model, batch_size, seq_len, key)
    if name == "transformer_big":
        model = TransformerLM(vocab_size=256, d_model=512, num_heads=8, num_layers=6,
                              max_len=max(128, seq_len))
        return _language_model(model, batch_size, seq_len, key)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def stage_inputs(w: Workload) -> tuple[Callable, dict]:
    """(loss_fn, batch) in the trainer's form (``gujax.engine``): the batch
    {"image", "label"} or {"tokens"}, plus "id" (B,) int32 and "mask" (B,)
    bool; the loss reads one example of it."""
    n = jax.tree_util.tree_leaves(w.batch)[0].shape[0]
    reserved = {"id": jnp.arange(n, dtype=jnp.int32), "mask": jnp.ones((n,), bool)}
    if "tokens" in w.batch:
        return w.loss_fn, {"tokens": w.batch["tokens"], **reserved}

    def loss_fn(p, ex):
        return w.loss_fn(p, {"x": ex["image"], "y": ex["label"]})
    return loss_fn, {"image": w.batch["x"], "label": w.batch["y"], **reserved}


def _sgd(params, update):
    return jax.tree_util.tree_map(lambda p, u: p - LEARNING_RATE * u, params, update)


def _plain_steps(w: Workload) -> dict[str, tuple[Callable, tuple]]:
    loss_fn = w.loss_fn

    def mean_loss(params, batch):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    def plain(params, batch):
        return _sgd(params, jax.grad(mean_loss)(params, batch))

    def plain_batched(params, batch):
        return _sgd(params, jax.grad(w.batch_loss)(params, batch))

    return {"plain": (plain, (w.params, w.batch)),
            "plain_batched": (plain_batched, (w.params, w.batch))}


def make_steps(w: Workload) -> dict[str, tuple[Callable, tuple]]:
    """Kernel steps: method -> (step function, its arguments); every step
    returns the new params and whatever the method measures, so nothing is
    dead code. Includes both plain steps."""
    loss_fn, n = w.loss_fn, jax.tree_util.tree_leaves(w.batch)[0].shape[0]
    dp_state = make_stage(make_engine("ghost", loss_fn), _dpsgd(n)).init(w.params)
    optax_state = optax.contrib.DifferentiallyPrivateAggregateState(jax.random.key(1))
    dp_tx = optax.contrib.differentially_private_aggregate(CLIP, NOISE, key=jax.random.key(1))

    def dpsgd(params, batch, state):
        update, state, info = ghost_dpsgd(loss_fn, params, batch, state)
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
        **_plain_steps(w),
        "dpsgd": (dpsgd, (w.params, w.batch, dp_state)),
        "dpsgd_nonoise": (dpsgd_nonoise, (w.params, w.batch)),
        "dpsgd_optax": (dpsgd_optax, (w.params, w.batch, optax_state)),
        "gnq_explicit": (gnq_explicit, (w.params, w.batch)),
        "gnq_ghost": (gnq_ghost, (w.params, w.batch)),
    }


# ----------------------------------------------------------------------------
# Stage steps: the training step as the trainer runs it.

def _dpsgd(batch_size: int, noise: Noise = Noise()):
    return dpsgd_policy(l2_norm_clip=CLIP, expected_batch_size=batch_size,
                        noise_multiplier=NOISE, seed=0, noise=noise)


def _clip(cap: float, num_examples: int):
    # The cap's keyword is being renamed (max_step_disclosure -> max_step).
    names = inspect.signature(clip_policy).parameters
    key = "max_step_disclosure" if "max_step_disclosure" in names else "max_step"
    return clip_policy(**{key: cap}, num_examples=num_examples, reg=REG)


def training_step(stage) -> Callable:
    """(params, batch, state) -> (new params, new state, metrics): the stage,
    then the SGD update."""
    def step(params, batch, state):
        update, state, metrics = stage(params, batch, state)
        return _sgd(params, update), state, metrics
    return step


def step_disclosures(step: Callable, args: tuple) -> np.ndarray:
    """(B,) the one-step disclosures d_j (nats) of a GNQ training step run
    once at ``args`` = (params, batch, fresh state)."""
    _, state, _ = jax.jit(step)(*args)
    return np.asarray(gnq_ledger(state).disclosure)[np.asarray(args[1]["id"])]


def make_stage_steps(w: Workload, methods, *, num_examples: int = NUM_EXAMPLES
                     ) -> tuple[dict[str, tuple[Callable, tuple]], dict[str, dict]]:
    """Stage steps: method -> (training step, (params, batch, fresh state)),
    and method -> the settings it was built with (censor's budget, clip's cap).

    methods: any of ``STAGE_METHODS`` and "monitor_explicit" (the monitor
    stage on the explicit vmap(grad) engine)."""
    loss_fn, batch = stage_inputs(w)
    b = batch["id"].shape[0]
    monitor = monitor_policy(num_examples=num_examples, reg=REG)
    ghost = make_engine("ghost", loss_fn)
    policies = {"monitor": monitor, "dpsgd": _dpsgd(b),
                "dpsgd_paired": _dpsgd(b, Noise(schedule="paired"))}
    settings = {}
    steps = {}
    if {"censor", "clip"} & set(methods):
        # The monitor's own training step (one compilation, reused when it is timed).
        stage = make_stage(ghost, monitor)
        steps["monitor"] = (training_step(stage), (w.params, batch, stage.init(w.params)))
        d = step_disclosures(*steps["monitor"])
        budget = float(np.quantile(d, CENSOR_QUANTILE))
        cap = float(np.quantile(d, CLIP_QUANTILE))
        policies["censor"] = censor_policy(budget=budget, num_examples=num_examples, reg=REG)
        policies["clip"] = _clip(cap, num_examples)
        settings["censor"] = dict(budget=budget, budget_quantile=CENSOR_QUANTILE)
        settings["clip"] = dict(cap=cap, cap_quantile=CLIP_QUANTILE)
    for method in methods:
        if method in steps:
            continue
        if method == "monitor_explicit":
            stage = make_stage(make_engine("explicit", loss_fn), monitor)
        else:
            stage = make_stage(ghost, policies[method])
        steps[method] = (training_step(stage), (w.params, batch, stage.init(w.params)))
    return {m: steps[m] for m in methods}, settings


# ----------------------------------------------------------------------------
# Measurement.

def peak_memory_bytes(compiled) -> int:
    """XLA's static buffer estimate: temp + arguments + outputs - aliased (bytes)."""
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
               + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def peak_memory_mb(compiled) -> float:
    """``peak_memory_bytes`` in MB (2^20 bytes)."""
    return peak_memory_bytes(compiled) / 2 ** 20


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
    rounds = progress_bar(range(blocks * repeats), desc=desc, leave=False, disable=desc is None)
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


def _compile(steps: dict[str, tuple[Callable, tuple]]) -> dict[str, dict]:
    """method -> {compiled, args, peak_memory_bytes, flops}."""
    out = {}
    for method, (fn, args) in steps.items():
        jitted = jax.jit(fn)
        compiled = jitted.lower(*args).compile()
        out[method] = dict(compiled=compiled, args=args, peak_memory_bytes=peak_memory_bytes(compiled),
                           flops=compiled_flops(jitted, *args))  # same compilation, cached
    return out


def _point_steps(model, batch_size, seq_len, width, methods, kernels, num_examples):
    w = make_workload(model, batch_size, seq_len, width=width)
    stage_steps, settings = make_stage_steps(w, [m for m in methods if m not in PLAIN_METHODS],
                                             num_examples=num_examples)
    kernel_steps = {m: s for m, s in make_steps(w).items() if m in kernels} if kernels else {}
    return _plain_steps(w), stage_steps, kernel_steps, settings


def _row(section, model, batch_size, method, compiled, base, *, seq_len, width, timed=None,
         base_timed=None, extra=None) -> dict:
    c, cb = compiled[method], compiled[base]
    row = dict(section=section, model=model, batch_size=batch_size, method=method,
               width=width if model == "mlp" else None,
               seq_len=seq_len if model.startswith("transformer") else None,
               baseline=base, peak_memory_bytes=c["peak_memory_bytes"],
               peak_memory_mb=c["peak_memory_bytes"] / 2 ** 20,
               memory_ratio_to_plain=c["peak_memory_bytes"] / cb["peak_memory_bytes"],
               flops=c["flops"], flop_ratio=c["flops"] / cb["flops"])
    if timed is not None:
        t, tb = timed[method], timed[base]
        per_block = [a / b for a, b in zip(t["block_medians"], tb["block_medians"])]
        row.update(step_seconds=t["median"], spread_seconds=list(t["spread"]),
                   block_medians=t["block_medians"], ratio_to_plain=t["median"] / tb["median"],
                   ratio_spread=[min(per_block), max(per_block)], all_seconds=t["all_seconds"])
    row.update(extra or {})
    return row


def _refusals(metrics) -> dict:
    scored = max(int(metrics["num_scored"]), 1)
    return dict(refused_fraction=int(metrics["num_refused"]) / scored,
                clipped_fraction=int(metrics["num_clipped"]) / scored)


def measure(model: str, batch_size: int, *, seq_len: int = 64, width: int = 512,
            repeats: int = 5, blocks: int = 5, methods=STAGE_METHODS, kernels=(),
            num_examples: int = NUM_EXAMPLES) -> tuple[list[dict], list[dict]]:
    """(stage rows, kernel rows) for one (model, batch size): every step
    compiled, warmed up and timed in the same interleaved blocks, against the
    faster plain step."""
    load_before = os.getloadavg()
    plain, stage_steps, kernel_steps, settings = _point_steps(
        model, batch_size, seq_len, width, methods, kernels, num_examples)
    compiled = _compile({**plain, **stage_steps,
                         **{f"kernel:{m}": s for m, s in kernel_steps.items()}})
    extra = {}
    for method in ("censor", "clip"):
        if method in stage_steps:  # one untimed call: what the timed step refuses / clips
            c = compiled[method]
            _, _, metrics = jax.block_until_ready(c["compiled"](*c["args"]))
            extra[method] = {**settings[method], **_refusals(metrics), "num_examples": num_examples}
    for method in ("monitor", "dpsgd"):
        if method in stage_steps:
            extra[method] = {"num_examples": num_examples if method == "monitor" else None}
    calls = {m: (lambda c: lambda: jax.block_until_ready(c["compiled"](*c["args"])))(c)
             for m, c in compiled.items()}
    timed = measure_blocks(calls, blocks=blocks, repeats=repeats, desc=f"{model} B={batch_size}")
    base = min(PLAIN_METHODS, key=lambda m: timed[m]["median"])
    load = dict(before=list(load_before), after=list(os.getloadavg()))
    common = dict(seq_len=seq_len, width=width, timed=timed)
    stage_rows = [_row("stage", model, batch_size, m, compiled, base, **common,
                       extra=dict(blocks=blocks, repeats=repeats, load=load, **extra.get(m, {})))
                  for m in list(PLAIN_METHODS) + list(stage_steps)]
    kernel_rows = []
    for m in kernel_steps:
        row = _row("kernel", model, batch_size, f"kernel:{m}", compiled, base, **common,
                   extra=dict(blocks=blocks, repeats=repeats, load=load))
        row["method"] = m
        kernel_rows.append(row)
    return stage_rows, kernel_rows


def measure_memory(model: str, batch_size: int, *, seq_len: int = 64, width: int = 512,
                   num_examples: int = NUM_EXAMPLES) -> list[dict]:
    """Compile-only rows (``MEMORY_METHODS``): peak memory and FLOPs, no timing;
    ratios are to plain_batched."""
    w = make_workload(model, batch_size, seq_len, width=width)
    stage_steps, _ = make_stage_steps(w, ["monitor_explicit", "monitor", "dpsgd"],
                                      num_examples=num_examples)
    compiled = _compile({**_plain_steps(w), **stage_steps})
    return [_row("memory", model, batch_size, m, compiled, "plain_batched", seq_len=seq_len,
                 width=width) for m in MEMORY_METHODS]


def memory_factors(rows: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """model -> method -> {B: peak memory / plain_batched's}, from memory rows."""
    out: dict = {}
    for r in rows:
        if r["method"] != "plain_batched":
            out.setdefault(r["model"], {}).setdefault(r["method"], {})[r["batch_size"]] = \
                r["memory_ratio_to_plain"]
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against the measured stage rows (never asserted)."""
    lines = []
    for r in rows:
        target = STAGE_TARGETS.get((r["model"], r["method"], r["batch_size"]),
                                   STAGE_TARGETS.get((r["model"], r["method"], None)))
        if target is None or r.get("ratio_to_plain") is None:
            continue
        where = f"{r['model']} B={r['batch_size']}"
        lo, hi = r["ratio_spread"]
        lines.append(_verdict(f"{where}: {r['method']} stage / plain", r["ratio_to_plain"], target)
                     + f" [blocks {lo:.2f}-{hi:.2f}; FLOP floor {r['flop_ratio']:.2f}]")
        if r["method"] in ("monitor", "dpsgd"):
            lines.append(_verdict(f"{where}: {r['method']} stage memory / plain",
                                  r["memory_ratio_to_plain"], MEMORY_TARGET))
    return lines


def _verdict(label: str, value: float, target: float) -> str:
    status = "met" if value <= target else f"MISSED by {value / target:.2f}x"
    return f"{label} = {value:.2f} (target <= {target:g}): {status}"


def _print_row(r: dict) -> None:
    lo, hi = r["spread_seconds"]
    note = ""
    if r["method"] == "censor" and r["section"] == "stage":
        note = f"  refused {r['refused_fraction']:.0%}"
    if r["method"] == "clip" and r["section"] == "stage":
        note = f"  clipped {r['clipped_fraction']:.0%}"
    print(f"{r['section']:6s} {r['model']:14s} B={r['batch_size']:4d} {r['method']:13s}"
          f" {r['step_seconds'] * 1e3:9.2f} ms [{lo * 1e3:.2f}, {hi * 1e3:.2f}]"
          f"  x{r['ratio_to_plain']:6.2f} [{r['ratio_spread'][0]:.2f}, {r['ratio_spread'][1]:.2f}]"
          f"  flops x{r['flop_ratio']:.2f}  mem {r['peak_memory_mb']:8.1f} MB"
          f" (x{r['memory_ratio_to_plain']:.2f})  vs {r['baseline']}{note}", flush=True)


# ----------------------------------------------------------------------------
# Plots.

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: list[dict], path: str) -> None:
    """Step time vs batch size, one panel per model (stage rows)."""
    plt = _pyplot()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in PLAIN_METHODS + STAGE_METHODS:
            pts = sorted((r["batch_size"], r["step_seconds"]) for r in rows
                         if r["model"] == model and r["method"] == method
                         and r["width"] in (None, 512))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=model, xlabel="batch size", ylabel="step time (s)", xscale="log",
               yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ratio_curve(rows: list[dict], x: str, path: str, title: str) -> bool:
    """Stage / plain time ratio (solid, with the block spread) and FLOP ratio
    (dashed: the floor at plain's FLOP rate) against ``x`` ("batch_size" or
    "width"). False (nothing written) with fewer than two points."""
    methods = [m for m in STAGE_METHODS if len({r[x] for r in rows if r["method"] == m}) > 1]
    if not methods:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, method in enumerate(methods):
        pts = sorted((r[x], r["ratio_to_plain"], *r["ratio_spread"], r["flop_ratio"])
                     for r in rows if r["method"] == method)
        xs, ratio, lo, hi, floor = map(np.asarray, zip(*pts))
        color = f"C{i}"
        ax.errorbar(xs, ratio, yerr=[ratio - lo, hi - ratio], color=color, marker="o",
                    capsize=3, label=f"{method} (measured)")
        ax.plot(xs, floor, color=color, linestyle="--", marker="x", label=f"{method} (FLOP floor)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(title=title, xlabel=x.replace("_", " "), ylabel="step time / plain step",
           xscale="log")
    ax.set_xticks(sorted({r[x] for r in rows}))
    ax.get_xaxis().set_major_formatter(_plain_formatter())
    # Log-scale minor labels (6 x 10^2, ...) would print over the measured points' labels.
    ax.get_xaxis().set_minor_formatter(_null_formatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _null_formatter():
    from matplotlib.ticker import NullFormatter
    return NullFormatter()


def _plain_formatter():
    from matplotlib.ticker import ScalarFormatter
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    return fmt


# ----------------------------------------------------------------------------

def parse_settings(argv=None) -> tuple[dict, str]:
    """(settings as a dict, out folder) of a command line (``cli``'s
    parser; a bad value raises ``cli.UsageError``)."""
    run = cli.parse_command_line(argv or [], EXPERIMENT)
    return dataclasses.asdict(run.settings), run.out


def main(argv=None) -> dict:
    """``python -m experiments.overhead``: the command line of ``cli.main``."""
    return cli.main(argv, EXPERIMENT, prepare=lambda run: None, execute=execute)


def execute(run: cli.Run, prepared=None) -> dict:
    typed, out = run.settings, run.out
    settings = dataclasses.asdict(typed)
    load_before = os.getloadavg()
    rows, kernel_rows, memory_rows = [], [], []

    def timed_point(model, b, width):
        repeats = typed.repeats_for(model)
        s, k = measure(model, b, seq_len=settings["seq_len"], width=width, repeats=repeats,
                       blocks=settings["blocks"], methods=settings["methods"],
                       kernels=settings["kernels"], num_examples=settings["num_examples"])
        for r in s + k:
            _print_row(r)
        rows.extend(s)
        kernel_rows.extend(k)

    for model in settings["models"]:
        for b in settings["batch_sizes"]:
            timed_point(model, b, settings["width"])
    if "mlp" in settings["models"]:
        done = {(r["batch_size"], r["width"]) for r in rows if r["model"] == "mlp"}
        for width in settings["widths"]:
            if (settings["width_batch_size"], width) not in done:
                timed_point("mlp", settings["width_batch_size"], width)
    for model in settings["models"]:
        for b in settings["memory_batch_sizes"]:
            memory_rows += measure_memory(model, b, seq_len=settings["seq_len"],
                                          width=settings["width"],
                                          num_examples=settings["num_examples"])
            for r in memory_rows[-len(MEMORY_METHODS):]:
                print(f"memory {model:14s} B={b:5d} {r['method']:17s}"
                      f" {r['peak_memory_mb']:9.1f} MB (x{r['memory_ratio_to_plain']:.2f})"
                      f"  {r['flops'] / 1e9:9.3f} GFLOP (x{r['flop_ratio']:.2f})", flush=True)
    targets = verdicts(rows)
    print("\n".join(targets))

    result = dict(rows=rows, kernel_rows=kernel_rows, memory_rows=memory_rows,
                  memory_factors=memory_factors(memory_rows), targets=targets,
                  settings=settings,
                  load=dict(before=list(load_before), after=list(os.getloadavg()),
                            note="os.getloadavg(): 1, 5, 15 minute averages"),
                  cpu_count=os.cpu_count(),
                  machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                               jax=jax.__version__, backend=jax.default_backend(),
                               device=jax.devices()[0].device_kind,
                               memory_note="XLA compiled memory_analysis(): temp + "
                                           "argument + output - alias bytes"))
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    written = ["overhead.json"]
    if rows:
        plot(rows, os.path.join(out, "overhead.png"))
        written.append("overhead.png")
        mlp = [r for r in rows if r["model"] == "mlp"]
        by_batch = [r for r in mlp if r["width"] == settings["width"]]
        by_width = [r for r in mlp if r["batch_size"] == settings["width_batch_size"]]
        if plot_ratio_curve(by_batch, "batch_size", os.path.join(out, "ratio_vs_batch.png"),
                            f"MLP 784-{settings['width']}-{settings['width']}-10"):
            written.append("ratio_vs_batch.png")
        if plot_ratio_curve(by_width, "width", os.path.join(out, "ratio_vs_width.png"),
                            f"MLP 784-w-w-10, B = {settings['width_batch_size']}"):
            written.append("ratio_vs_width.png")
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return result


if __name__ == "__main__":
    main()
