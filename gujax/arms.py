"""Training arms: what each compared algorithm is, and the one place it becomes
the trainer's stage (``gujax.engine.make_stage``).

An ``Arm`` is a small, hashable description of a training algorithm:

    sgd       plain SGD (mean gradient), audited by ``monitor_policy``
    dpsgd     DP-SGD at a target (epsilon, delta), sigma calibrated for the
              Poisson sampler the arm trains with; audited by ``dpsgd_policy``'s ledger
              (ledger on the clipped gradients, lam = sigma^2 C^2)
    censor    the GNQ defense (``gnq_censor``, retire policy) at budget tau nats
    clip      GNQ clipping (``gnq_clip``) at a per-step cap s nats

Every arm keeps a per-example disclosure ledger (``gujax.policies.Ledger``),
so all arms report D_j on the same footing. The sgd, censor and clip arms
share one GNQ regulariser ``reg`` (relative by default); DP-SGD's floor is
its own noise.

Arms are written on the command line as ``kind[:key=value,...]``, e.g.
``sgd``, ``dpsgd:epsilon=3``, ``censor:budget=4,reg=0.5``, ``clip:max_step=0.05``
(see ``parse_arm``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import optax

from gujax.engine import ENGINES, Stage, make_engine, make_stage
from gujax.policies import (NOISE_PRNGS, Ledger, censor_policy, clip_policy, dpsgd_policy, gnq_ledger,
                            monitor_policy)
from gujax.privacy import calibrate_noise_multiplier, dp_epsilon

KINDS = ("sgd", "dpsgd", "censor", "clip")
METHODS = tuple(ENGINES)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training algorithm of a comparison.

    kind: one of ``KINDS``.
    reg: GNQ regulariser of the ledger (sgd, censor, clip); with ``relative``
      it is rho in lam = rho * trace(K) / B, else lam in squared gradient units.
    epsilon, delta: DP-SGD's target; clip_norm: its C (gradient L2 units).
    budget: censor's tau, nats per example over training.
    max_step: clip's cap on one step's disclosure, nats.
    prng: DP-SGD's noise key implementation (``gujax.policies.NOISE_PRNGS``).
    learning_rate: overrides the run's learning rate for this arm (None: keep).
    batch_size: overrides the run's batch size for this arm (DP-SGD: the
      expected Poisson batch; None: keep). DP-SGD's published settings use
      far larger batches than the GNQ defenses can afford: the GNQ step costs
      B^2 per input feature, DP-SGD's clipping only B.
    ledger: keep the per-example GNQ ledger (default). Only a dpsgd arm may
      set False: it then reads only the Gram diagonal (no B x B cross terms,
      which a large batch cannot afford) and reports no disclosure; the
      trained model is the same.
    releases: noise multipliers of Gaussian mechanisms already run on the
      training set (private feature statistics, ``gujax.features``); a dpsgd
      arm's sigma is calibrated so that they and its steps together spend
      (epsilon, delta). Set by the experiment, not the arm text.
    """
    kind: str
    reg: float = 0.1
    relative: bool = True
    epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    budget: float | None = None
    max_step: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    ledger: bool = True
    releases: tuple[float, ...] = ()
    prng: str = "threefry2x32"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"arm kind must be one of {KINDS}, got {self.kind!r}")
        needed = {"dpsgd": "epsilon", "censor": "budget", "clip": "max_step"}.get(self.kind)
        if needed and getattr(self, needed) is None:
            raise ValueError(f"a {self.kind} arm needs {needed}=...")
        for name in ("reg", "clip_norm", "epsilon", "budget", "max_step", "learning_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"arm {name} must be a finite number > 0, got {value!r}")
        if self.batch_size is not None and not (
                isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"arm batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.ledger and self.kind != "dpsgd":
            raise ValueError(f"only a dpsgd arm can train without its ledger: a {self.kind} "
                             "arm's ledger is what it is")
        if self.releases and self.kind != "dpsgd":
            raise ValueError(f"releases are composed into DP-SGD's epsilon; a {self.kind} arm "
                             "has none")
        if not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0
                   for r in self.releases):
            raise ValueError(f"arm releases must be noise multipliers > 0, got "
                             f"{self.releases!r}")
        if self.prng not in NOISE_PRNGS:
            raise ValueError(f"arm prng must be one of {NOISE_PRNGS}, got {self.prng!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"arm delta must be in (0, 1), got {self.delta!r}")

    @property
    def name(self) -> str:
        """Short label for tables and plots, e.g. ``dpsgd eps=3``."""
        label = {"sgd": lambda: "sgd", "dpsgd": lambda: f"dpsgd eps={self.epsilon:g}",
                 "censor": lambda: f"gnq-censor tau={self.budget:g}",
                 "clip": lambda: f"gnq-clip s={self.max_step:g}"}[self.kind]()
        if self.kind != "dpsgd" and self.reg != 0.1:
            label += f" reg={self.reg:g}"
        if self.learning_rate is not None:
            label += f" lr={self.learning_rate:g}"
        if self.batch_size is not None:
            label += f" B={self.batch_size}"
        if self.prng != "threefry2x32":
            label += f" prng={self.prng}"
        return label

    @property
    def slug(self) -> str:
        """File-name-safe form of ``name``."""
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in self.name)

    @property
    def sampling(self) -> str:
        """The batch sampler: Poisson for DP-SGD (what its accounting assumes),
        epoch-wise shuffling otherwise."""
        return "poisson" if self.kind == "dpsgd" else "shuffle"

    def to_json(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


def _boolean(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


_FIELD_TYPES = {"reg": float, "relative": _boolean, "ledger": _boolean,
                "batch": int, "batch_size": int,
                "epsilon": float, "eps": float, "delta": float, "clip_norm": float,
                "budget": float, "tau": float, "max_step": float, "lr": float,
                "learning_rate": float, "prng": str}
_ALIASES = {"eps": "epsilon", "tau": "budget", "lr": "learning_rate", "batch": "batch_size"}


def parse_arm(text: str, **defaults) -> Arm:
    """``"kind[:key=value,...]"`` -> Arm; ``defaults`` (e.g. reg=0.3) apply
    unless the text sets the key. Keys: the ``Arm`` fields, with the aliases
    eps, tau, lr, batch."""
    kind, _, rest = text.strip().partition(":")
    fields = dict(defaults)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _FIELD_TYPES:
            raise ValueError(f"bad arm option {item!r} in {text!r}; keys: "
                             f"{sorted(_FIELD_TYPES)}")
        try:
            fields[_ALIASES.get(key, key)] = _FIELD_TYPES[key](value.strip())
        except ValueError as err:
            raise ValueError(f"bad value in arm option {item!r}: {err}") from None
    return Arm(kind=kind, **fields)


class Pipeline(NamedTuple):
    """What the trainer needs for one arm on one training set.

    stage: the ``gujax.engine.Stage`` (engine + policy) the arm trains with;
      its state holds the arm's ledger.
    sampling: the ``TrainConfig.sampling`` the arm must train with.
    noise_multiplier: sigma (DP-SGD), else None.
    epsilon: the accounted epsilon at ``delta`` for the run (DP-SGD), else None.
    """
    stage: Stage
    sampling: str
    noise_multiplier: float | None
    epsilon: float | None


@functools.lru_cache(maxsize=256)
def dp_calibration(epsilon: float, delta: float, sample_rate: float, steps: int,
                   releases: tuple[float, ...] = ()) -> tuple[float, float]:
    """(sigma, accounted epsilon) for ``steps`` Poisson-sampled DP-SGD steps at
    ``sample_rate`` after the Gaussian ``releases``: the smallest sigma whose
    RDP epsilon (releases included) is <= the target."""
    sigma = calibrate_noise_multiplier(epsilon, sample_rate, steps, delta, sampling="poisson",
                                       releases=releases)
    return sigma, dp_epsilon(sigma, sample_rate, steps, delta, sampling="poisson",
                             releases=releases)


def build_pipeline(arm: Arm, *, loss_fn: Callable, train_size: int, batch_size: int,
                   epochs: int, seed: int, num_examples: int | None = None,
                   method: str = "ghost", dtype: Any = None) -> Pipeline:
    """The stage (engine and policy) that trains ``arm`` on a set of
    ``train_size`` examples for ``epochs`` passes of ``train_size //
    batch_size`` steps (as ``gujax.train`` does).

    num_examples: size of the ledger, i.e. the example ids lie in
      [0, num_examples) (default ``train_size``). Shadow models pass the pool
      size with ids = pool positions, so that every model of an arm has the
      same state shapes and the compiled step is reused.

    method: the gradient engine. "ghost" (default): the Gram matrix and the
      update come from ``gujax.ghost`` (one batch backward pass, no
      per-example gradients materialised; exact, and much faster on dense
      models); "explicit": vmap(grad) per-example gradients. Both give the
      same training run to rounding (tests/test_arms.py).

    This is the one place where an arm's gradient engine is chosen. An arm
    that sets its own ``batch_size`` must be given it here (a ValueError
    otherwise), so that its accounting and its trainer agree.
    """
    if arm.batch_size is not None and arm.batch_size != batch_size:
        raise ValueError(f"arm {arm.name!r} trains with batch_size={arm.batch_size}; build "
                         f"its pipeline (and its TrainConfig) with it, not {batch_size}")
    engine = make_engine(method, loss_fn)
    num_examples = train_size if num_examples is None else num_examples
    if not 0 < batch_size <= train_size <= num_examples:
        raise ValueError(f"need 0 < batch_size ({batch_size}) <= train_size ({train_size}) "
                         f"<= num_examples ({num_examples})")
    sigma = eps = None
    if arm.kind == "dpsgd":
        rate = batch_size / train_size
        steps = epochs * (train_size // batch_size)
        sigma, eps = dp_calibration(arm.epsilon, arm.delta, rate, steps, arm.releases)
        policy = dpsgd_policy(l2_norm_clip=arm.clip_norm, noise_multiplier=sigma,
                              expected_batch_size=batch_size, seed=seed,
                              num_examples=num_examples if arm.ledger else None,
                              prng=arm.prng)
    else:
        common = dict(num_examples=num_examples, reg=arm.reg, relative=arm.relative)
        policy = {
            "sgd": lambda: monitor_policy(**common),
            "censor": lambda: censor_policy(budget=arm.budget, policy="retire", **common),
            "clip": lambda: clip_policy(max_step_disclosure=arm.max_step, **common),
        }[arm.kind]()
    return Pipeline(make_stage(engine, policy, dtype=dtype), arm.sampling, sigma, eps)


def ledger(state) -> Ledger | None:
    """The per-example disclosure ledger inside an arm's stage state, or None
    for a dpsgd arm trained with ``ledger=False``."""
    if isinstance(state, optax.DifferentiallyPrivateAggregateState):
        return None
    return gnq_ledger(state)
