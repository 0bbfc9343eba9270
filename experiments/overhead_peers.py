"""gujax's privacy steps next to their PyTorch peers, in one process.

    pip install -e '.[peers]'                         # torch 2.13.0 (CPU) + opacus
    python -m experiments.overhead_peers              # MLP 784-512-512-10, B = 256
    python -m experiments.overhead_peers --preset smoke   # seconds; what the tests run
    python -m experiments.overhead_peers --batch-sizes 64 256 --blocks 7 --repeats 10

Optional: without torch or opacus it prints what to install and exits 0
(after checking the command line; nothing is written).

Methods (one training step each, MLP 784-512-512-10, ReLU, cross-entropy, SGD):

  torch_plain        forward, mean-loss backward, SGD step
  torch_gnq_ghost    the published PyTorch ghost-GNQ approach on nn.Linear layers
                     (written from its description): forward hooks keep each
                     layer's input X (B, d_in), full backward hooks its output
                     gradient D (B, d_out); per layer (X X^T + 1) * (D D^T)
                     (elementwise; the +1 is the bias), summed over layers, is
                     the B x B per-example gradient Gram K; GNQ from K by
                     Cholesky as ``gujax.uniqueness.gnq_from_gram`` (lam = reg
                     trace(K) / B, GNQ_j = 1 / (lam [(K + lam I)^-1]_jj) - 1),
                     then the mean-gradient SGD step from the same backward
  opacus_dpsgd       Opacus PrivacyEngine.make_private(grad_sample_mode="ghost")
                     (fast gradient clipping), C = 1, sigma = 1; falls back to
                     the standard per-sample "hooks" mode when ghost is missing
                     (the row's ``mode`` says which ran)
  jax_plain          experiments.overhead.make_steps: the faster of plain and
                     plain_batched
  jax_gnq_ghost      gujax ghost Gram + Cholesky GNQ, mean update
  jax_dpsgd          gujax ghost clipping DP-SGD, C = 1, sigma = 1

Ratios are to the plain step of the method's own framework. Timing is
``experiments.overhead.measure_blocks`` (interleaved, order rotated,
median of block medians, min-max of block medians), torch and JAX steps in
the same blocks; torch steps are synchronous on CPU, the JAX ones end in
``block_until_ready``. torch runs with ``torch.set_num_threads(os.cpu_count())``.

Also timed (JAX only): the DP-SGD noise alone, ``gujax.noise.Noise.draw``
on the MLP's 669,706 parameters for every ``gujax.noise.Noise`` choice.

Writes ``<out>/overhead_peers.json`` (``--out``, default
``results/overhead_peers-<preset>``) beside ``run.json``.

``BenchmarkSettings`` here is the typed settings base of the benchmarks
(this one, ``experiments.overhead_split``, ``experiments.stacked``): what
``experiments.cli.main`` needs of settings, without ``cli.Settings``' data,
model and training fields.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as experiments.overhead

import dataclasses
import importlib
import platform
import shlex
import warnings
from typing import Any, Callable, ClassVar

from experiments import cli
from experiments.cli import BenchmarkSettings, option
from experiments.report import write_json

MISSING_MESSAGE = ("experiments.overhead_peers needs PyTorch and Opacus, which are optional: "
                   "pip install -e '.[peers]' (torch==2.13.0, the CPU build, and opacus). "
                   "Skipping the peer comparison.")

REG = 1e-2          # relative GNQ regulariser, as experiments.overhead
CLIP, NOISE = 1.0, 1.0
LEARNING_RATE = 0.1
TORCH_METHODS = ("torch_plain", "torch_gnq_ghost", "opacus_dpsgd")
JAX_METHODS = ("jax_plain", "jax_gnq_ghost", "jax_dpsgd")


# ----------------------------------------------------------------------------
# The benchmark's settings.

@dataclasses.dataclass(frozen=True)
class PeerSettings(BenchmarkSettings):
    batch_sizes: tuple[int, ...] = option((256,), "batch sizes B, each timed in its own "
                                                  "blocks (>= 2)")
    blocks: int = option(5, "independent interleaved timing blocks (measure_blocks)")
    repeats: int = option(7, "rounds per block, every step once a round")
    noise: bool = option(True, "also time the DP-SGD noise alone per gujax.noise.Noise "
                               "choice, at the first batch size (--no-noise: skip it)")

    MINIMUMS: ClassVar[dict[str, int]] = {"batch_sizes": 2, "blocks": 1, "repeats": 1}


_DEFAULT = PeerSettings(note="The MLP 784-512-512-10 at B = 256, 5 blocks of 7 rounds, "
                             "with the noise timings.")
PRESETS = cli.presets(
    default=_DEFAULT,
    smoke=dataclasses.replace(_DEFAULT, batch_sizes=(8,), blocks=1, repeats=1, noise=False,
                              note="Smoke preset: B = 8, one block of one round, no noise "
                                   "timings; a plumbing check, not a measurement."))
EXPERIMENT = cli.Experiment("overhead_peers", __doc__, PRESETS)


def _import_peers():
    """(torch, opacus), or None if either is missing."""
    try:
        torch = importlib.import_module("torch")
        opacus = importlib.import_module("opacus")
    except ImportError:
        return None
    return torch, opacus


# ----------------------------------------------------------------------------
# PyTorch side.

def torch_mlp(torch, d_in=784, hidden=(512, 512), num_classes=10):
    layers, width = [], d_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, num_classes))
    return torch.nn.Sequential(*layers)


class GhostGram:
    """Hooks on every nn.Linear of ``model``: the per-example gradient Gram of
    the last backward, from layer inputs X and output gradients D only.

    ``scale`` multiplies D (the backward of a mean loss over B rows gives D/B,
    so scale = B gives the Gram of the per-example loss gradients)."""

    def __init__(self, torch, model):
        self.torch = torch
        self.inputs, self.grads, self.handles = {}, {}, []
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                self.handles.append(layer.register_forward_hook(self._keep_input))
                self.handles.append(layer.register_full_backward_hook(self._keep_grad))

    def _keep_input(self, layer, args, output):
        self.inputs[layer] = args[0].detach()

    def _keep_grad(self, layer, grad_input, grad_output):
        self.grads[layer] = grad_output[0].detach()

    def gram(self, scale: float = 1.0):
        total = None
        for layer, x in self.inputs.items():
            d = self.grads[layer] * scale
            k = x @ x.T
            if layer.bias is not None:
                k = k + 1.0
            k = k * (d @ d.T)
            total = k if total is None else total + k
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


def torch_gnq_from_gram(torch, k, reg=REG):
    """gujax.uniqueness.gnq_from_gram (relative reg, all rows finite) in torch."""
    n = k.shape[0]
    lam = reg * torch.trace(k) / n
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))
    chol = torch.linalg.cholesky(k + lam * torch.eye(n, dtype=k.dtype))
    chol_inv = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=k.dtype), upper=False)
    m_diag = (chol_inv * chol_inv).sum(dim=0)
    return torch.clamp(1.0 / (lam * m_diag) - 1.0, min=0)


def make_torch_steps(torch, opacus, x, y, seed: int = 0) -> tuple[dict, dict]:
    """method -> zero-argument step, and method -> notes (e.g. Opacus's mode)."""
    torch.manual_seed(seed)
    b = x.shape[0]
    base = torch_mlp(torch)
    criterion = torch.nn.CrossEntropyLoss()

    plain_model = torch_mlp(torch)
    plain_model.load_state_dict(base.state_dict())
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=LEARNING_RATE)

    def torch_plain():
        plain_opt.zero_grad(set_to_none=True)
        criterion(plain_model(x), y).backward()
        plain_opt.step()

    gnq_model = torch_mlp(torch)
    gnq_model.load_state_dict(base.state_dict())
    gnq_opt = torch.optim.SGD(gnq_model.parameters(), lr=LEARNING_RATE)
    hooks = GhostGram(torch, gnq_model)

    def torch_gnq_ghost():
        gnq_opt.zero_grad(set_to_none=True)
        criterion(gnq_model(x), y).backward()  # mean loss: D = per-example D / B
        scores = torch_gnq_from_gram(torch, hooks.gram(scale=float(b)))
        gnq_opt.step()
        return scores

    notes = {}
    dp_model = torch_mlp(torch)
    dp_model.load_state_dict(base.state_dict())
    dp_opt = torch.optim.SGD(dp_model.parameters(), lr=LEARNING_RATE)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
    engine = opacus.PrivacyEngine()
    try:
        dp_model, dp_opt, dp_criterion, _ = engine.make_private(
            module=dp_model, optimizer=dp_opt, data_loader=loader, criterion=criterion,
            noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode="ghost")
        notes["opacus_dpsgd"] = "grad_sample_mode='ghost' (fast gradient clipping)"
    except (ValueError, NotImplementedError, TypeError) as err:  # older Opacus
        dp_model, dp_opt, _ = engine.make_private(
            module=dp_model, optimizer=dp_opt, data_loader=loader,
            noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False)
        dp_criterion = criterion
        notes["opacus_dpsgd"] = f"grad_sample_mode='hooks' (ghost unavailable: {err})"

    def opacus_dpsgd():
        dp_opt.zero_grad(set_to_none=True)
        dp_criterion(dp_model(x), y).backward()
        dp_opt.step()

    steps = {"torch_plain": torch_plain, "torch_gnq_ghost": torch_gnq_ghost,
             "opacus_dpsgd": opacus_dpsgd}
    return steps, notes


# ----------------------------------------------------------------------------
# JAX side (gujax's steps from experiments.overhead, not rebuilt here).

def make_jax_steps(batch_size: int, seed: int = 0) -> tuple[dict, Any]:
    import jax

    from experiments.overhead import make_steps, make_workload

    w = make_workload("mlp", batch_size, 64, seed=seed)
    steps = make_steps(w)
    calls = {}
    for name in ("plain", "plain_batched", "gnq_ghost", "dpsgd"):
        fn, args = steps[name]
        compiled = jax.jit(fn).lower(*args).compile()
        calls[name] = (lambda c, a: lambda: jax.block_until_ready(c(*a)))(compiled, args)
    return calls, w


def make_noise_steps(params) -> dict[str, Callable[[], Any]]:
    """"impl schedule" -> the jitted DP-SGD noise draw alone (``Noise.draw``,
    std = 1), for every ``gujax.noise.Noise``."""
    import jax

    from gujax.noise import CHOICES

    calls = {}
    for noise in CHOICES:
        key = noise.key(0)
        fn = jax.jit(lambda k, noise=noise: noise.draw(k, params, 1.0))
        compiled = fn.lower(key).compile()
        calls[f"{noise.impl} {noise.schedule}"] = (
            lambda c, k: lambda: jax.block_until_ready(c(k)))(compiled, key)
    return calls


# ----------------------------------------------------------------------------

def measure(torch, opacus, batch_size: int, *, blocks: int, repeats: int,
            noise: bool = True) -> tuple[list[dict], list[dict], dict]:
    import jax
    import numpy as np

    from experiments.overhead import measure_blocks

    jax_calls, w = make_jax_steps(batch_size)
    x = torch.from_numpy(np.asarray(w.batch["x"]).reshape(batch_size, -1).copy())
    y = torch.from_numpy(np.asarray(w.batch["y"]).astype(np.int64))
    torch_calls, notes = make_torch_steps(torch, opacus, x, y)
    calls = dict(torch_calls)
    calls.update({f"jax:{k}": v for k, v in jax_calls.items()})
    timed = measure_blocks(calls, blocks=blocks, repeats=repeats, warmup=2,
                           desc=f"peers B={batch_size}")
    jax_base = min(("jax:plain", "jax:plain_batched"), key=lambda m: timed[m]["median"])
    names = {"jax_plain": jax_base, "jax_gnq_ghost": "jax:gnq_ghost", "jax_dpsgd": "jax:dpsgd"}
    names.update({m: m for m in TORCH_METHODS})
    rows = []
    for method in TORCH_METHODS + JAX_METHODS:
        key = names[method]
        framework, base = ("torch", "torch_plain") if method in TORCH_METHODS else ("jax", jax_base)
        per_block = [t / s for t, s in zip(timed[key]["block_medians"], timed[base]["block_medians"])]
        rows.append(dict(batch_size=batch_size, method=method, framework=framework,
                         step_seconds=timed[key]["median"],
                         spread_seconds=list(timed[key]["spread"]),
                         block_medians=timed[key]["block_medians"],
                         ratio_to_own_plain=timed[key]["median"] / timed[base]["median"],
                         ratio_spread=[min(per_block), max(per_block)],
                         baseline=base.removeprefix("jax:"), mode=notes.get(method, "")))
    noise_rows = []
    if noise:
        t = measure_blocks(make_noise_steps(w.params), blocks=blocks, repeats=repeats,
                           desc="noise")
        num = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(w.params))
        for noise, r in t.items():
            noise_rows.append(dict(noise=noise, num_params=num, seconds=r["median"],
                                   spread_seconds=list(r["spread"]),
                                   block_medians=r["block_medians"]))
    return rows, noise_rows, notes


def _ms(s, spread):
    return f"{s * 1e3:8.2f} ms [{spread[0] * 1e3:.2f}, {spread[1] * 1e3:.2f}]"


def format_table(rows: list[dict]) -> str:
    lines = [f"{'B':>4s}  {'method':16s} {'median [min, max] of block medians':>36s}  "
             f"ratio to own plain"]
    for r in rows:
        lines.append(f"{r['batch_size']:4d}  {r['method']:16s} "
                     f"{_ms(r['step_seconds'], r['spread_seconds']):>36s}  "
                     f"x{r['ratio_to_own_plain']:.2f} [{r['ratio_spread'][0]:.2f}, "
                     f"{r['ratio_spread'][1]:.2f}] vs {r['baseline']}")
    # Side by side: gujax's ratio next to the peer's.
    pairs = (("GNQ ghost", "torch_gnq_ghost", "jax_gnq_ghost"),
             ("DP-SGD", "opacus_dpsgd", "jax_dpsgd"))
    by = {(r["batch_size"], r["method"]): r for r in rows}
    for b in sorted({r["batch_size"] for r in rows}):
        for label, peer, ours in pairs:
            if (b, peer) in by and (b, ours) in by:
                lines.append(f"B={b} {label}: peer x{by[b, peer]['ratio_to_own_plain']:.2f}, "
                             f"gujax x{by[b, ours]['ratio_to_own_plain']:.2f} (ratios to own "
                             f"plain); gujax / peer time "
                             f"{by[b, ours]['step_seconds'] / by[b, peer]['step_seconds']:.2f}")
    return "\n".join(lines)


class _PeersMissing(Exception):
    """torch or opacus is not installed (``main`` prints what to install)."""


def prepare(run: cli.Run):
    """(torch, opacus), or ``_PeersMissing`` before ``--out`` is created."""
    peers = _import_peers()
    if peers is None:
        raise _PeersMissing
    return peers


def execute(run: cli.Run, peers) -> dict:
    torch, opacus = peers
    s = run.settings
    if s.note:
        print(s.note, flush=True)
    # The first layer's input needs no gradient, so full backward hooks fire on
    # module outputs only (what both ghost methods want); Opacus's non-secure
    # RNG is the benchmark's choice.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__} (torch.set_num_threads({threads}) = os.cpu_count()), "
          f"opacus {opacus.__version__}", flush=True)
    import jax

    load_before = os.getloadavg()
    rows, noise_rows, notes = [], [], {}
    for i, b in enumerate(s.batch_sizes):
        r, n, notes = measure(torch, opacus, b, blocks=s.blocks, repeats=s.repeats,
                              noise=s.noise and i == 0)
        rows += r
        noise_rows += n
    load_after = os.getloadavg()
    print(format_table(rows))
    for k, v in notes.items():
        print(f"{k}: {v}")
    if noise_rows:
        print(f"DP-SGD noise alone (Noise.draw, {noise_rows[0]['num_params']:,} params):")
        for r in noise_rows:
            print(f"  {r['noise']:24s} {_ms(r['seconds'], r['spread_seconds'])}")
    print(f"load (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
          f"after {tuple(round(v, 2) for v in load_after)}")
    result = dict(rows=rows, noise=noise_rows, notes=notes,
                  settings=dict(s.record(), reg=REG, l2_norm_clip=CLIP,
                                noise_multiplier=NOISE, command=shlex.join(
                                    [*EXPERIMENT.command.split(), *run.argv])),
                  versions=dict(torch=torch.__version__, opacus=opacus.__version__,
                                jax=jax.__version__),
                  torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  load=dict(before=list(load_before), after=list(load_after),
                            note="os.getloadavg(): 1, 5, 15 minute averages"),
                  machine=dict(platform=platform.platform(), backend=jax.default_backend()))
    path = os.path.join(run.out, 'overhead_peers.json')
    write_json(path, result)
    print(f"wrote {path}")
    return result


def main(argv=None) -> dict | None:
    """``python -m experiments.overhead_peers``; None (and nothing written)
    without torch or opacus."""
    try:
        return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)
    except _PeersMissing:
        print(MISSING_MESSAGE)
        return None


if __name__ == "__main__":
    main()
