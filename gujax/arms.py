"""Training arms: what each compared algorithm is, the registry of arm kinds,
and ``train_runs``, the one way an arm's runs are trained.

An ``Arm`` is a small, hashable description of a training algorithm. Its
kind is an entry of the registry (``ARM_KINDS``, ``register``):

    sgd       plain SGD (mean gradient), audited by ``monitor_policy``
    dpsgd     DP-SGD at a target (epsilon, delta), sigma calibrated for the
              Poisson sampler the arm trains with; audited by ``dpsgd_policy``'s
              ledger (on the clipped gradients, lam = sigma^2 C^2)
    censor    the GNQ defense (``censor_policy``, retire policy) at budget tau nats
    clip      GNQ clipping (``clip_policy``) at a per-step cap of max_step nats

An ``ArmKind`` holds everything about a kind: its options (types, aliases,
defaults, which experiment setting or threshold fills them), its label, its
sampler, how it becomes a policy for a run, and its DP accounting. Arm
parsing, labels, the experiments' defaults and --help are all derived from
it, so a new kind is one ``register(ArmKind(...))``.

Arms are written as ``kind[:key=value,...]``, e.g. ``sgd``, ``dpsgd:epsilon=3``,
``censor:budget=4,reg=0.5``, ``clip:max_step=0.05`` (see ``parse_arm``).

``train_runs(arm, runs, config)`` builds the arm's stage once, every run's
stage state (DP-SGD: each run's own sigma, calibrated for its own size, its
own key, clip norm and expected batch size, all in the state: see
``gujax.policies``), applies the arm's batch size, learning rate and sampler
to the ``TrainConfig``, trains the runs together (``gujax.train.train_stacked``)
and returns per run the parameters, the ledger, and the sigma and epsilon
actually used.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from gujax import checks
from gujax.engine import make_engine, make_stage
from gujax.noise import KEY_IMPLS, SCHEDULES, Noise
from gujax.policies import (Ledger, Policy, censor_policy, clip_policy, dpsgd_policy,
                            gnq_ledger, monitor_policy)
from gujax.privacy import calibrate_noise_multiplier, dp_epsilon

PyTree = Any


# ----------------------------------------------------------------------------
# Options and kinds.

def boolean(text: str) -> bool:
    """true/false text (1, yes, 0, no too) -> bool."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


@dataclasses.dataclass(frozen=True)
class Option:
    """One key of an arm text.

    parse: text -> value (raising ValueError). check(value, name) -> value:
      validation of a value however given (text or keyword). default: the
      value when unset (None: unset). required: the arm needs it (a
      ``threshold`` may fill it). alias: a short key. text: whether an arm
      text may set it (False: only the experiment, e.g. DP-SGD's releases).
    setting: the key of the experiment's ``arm_settings()`` that fills it
      when the text leaves it unset. threshold: the field of the
      experiment's thresholds that fills it (censor/clip budgets).
    """
    name: str
    parse: Callable[[str], Any]
    help: str
    default: Any = None
    check: Callable[[Any, str], Any] | None = None
    required: bool = False
    alias: str | None = None
    text: bool = True
    setting: str | None = None
    threshold: str | None = None


class RunSize(NamedTuple):
    """What one run of an arm trains on: ``train_size`` examples with ids in
    [0, ``num_examples``), ``epochs`` passes of ``train_size // batch_size``
    steps, noise and batches seeded by ``seed``."""
    train_size: int
    num_examples: int
    batch_size: int
    epochs: int
    seed: int


@dataclasses.dataclass(frozen=True)
class ArmKind:
    """A registered kind of arm.

    name: the kind in arm texts. summary: one line for --help. example: an
    arm text of the kind. options: its own keys (``COMMON_OPTIONS`` are
    added). label(arm) -> the short name for tables. policy(arm, size) ->
    the ``Policy`` of one run. sampling: the ``TrainConfig.sampling`` the
    kind trains with. accounting(arm, size) -> (sigma, epsilon) for a DP
    kind, else None. defense: a GNQ defense, compared against DP-SGD.
    """
    name: str
    summary: str
    example: str
    options: tuple[Option, ...]
    label: Callable[["Arm"], str]
    policy: Callable[["Arm", RunSize], Policy]
    sampling: str = "shuffle"
    accounting: Callable[["Arm", RunSize], tuple[float, float]] | None = None
    defense: bool = False

    def all_options(self) -> tuple[Option, ...]:
        return COMMON_OPTIONS + self.options

    def option(self, key: str) -> Option | None:
        """The option a key (or alias) names, or None."""
        return next((o for o in self.all_options() if key in (o.name, o.alias)), None)


def _positive(value, name):
    return checks.positive_finite(value, f"arm {name}")


def _batch(value, name):
    return checks.positive_int(value, f"arm {name}")


COMMON_OPTIONS = (
    Option("learning_rate", float, "overrides the run's learning rate", alias="lr",
           check=_positive),
    Option("batch_size", int, "overrides the run's batch size (DP-SGD: the expected Poisson "
                              "batch)", alias="batch", check=_batch),
)

ARM_KINDS: dict[str, ArmKind] = {}


def register(kind: ArmKind) -> ArmKind:
    """Add ``kind`` to the registry (a kind of the same name is replaced)."""
    names = [o.name for o in kind.all_options()]
    keys = names + [o.alias for o in kind.all_options() if o.alias]
    if len(set(keys)) != len(keys):
        raise ValueError(f"arm kind {kind.name!r}: two options share a key: {keys}")
    checks.one_of(kind.sampling, ("shuffle", "poisson", "fixed"), "sampling")
    ARM_KINDS[kind.name] = kind
    _known_option_names.cache_clear()
    return kind


def unregister(name: str) -> None:
    """Remove a kind from the registry (tests that register a toy kind)."""
    ARM_KINDS.pop(name, None)
    _known_option_names.cache_clear()


def arm_kind(name: str) -> ArmKind:
    if name not in ARM_KINDS:
        raise ValueError(f"unknown arm kind {name!r}; arm kind must be one of "
                         f"{', '.join(ARM_KINDS)}")
    return ARM_KINDS[name]


@functools.lru_cache(maxsize=1)
def _known_option_names() -> frozenset[str]:
    return frozenset(o.name for k in ARM_KINDS.values() for o in k.all_options())


# ----------------------------------------------------------------------------
# Arms.

class Arm:
    """One training algorithm of a comparison: a registered kind and the
    values of its options (``Arm("censor", budget=4.0, reg=0.3)``). Options
    read as attributes (``arm.budget``); an option of another kind reads as
    None. Immutable and hashable."""
    __slots__ = ("kind", "options")

    def __init__(self, kind: str, **values):
        spec = arm_kind(kind)
        options = spec.all_options()
        unknown = sorted(set(values) - {o.name for o in options})
        if unknown:
            raise ValueError(f"bad arm option(s) {unknown} for a {kind} arm; keys: "
                             f"{sorted(o.name for o in options)}")
        chosen = {}
        for o in options:
            value = values.get(o.name)
            if value is None:
                value = o.default
            if value is None:
                if o.required:
                    raise ValueError(f"a {kind} arm needs {o.name}=...")
                continue
            chosen[o.name] = o.check(value, o.name) if o.check else value
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", tuple(sorted(chosen.items())))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in object.__getattribute__(self, "options"):
            if key == name:
                return value
        if name in _known_option_names():
            return None
        raise AttributeError(f"an Arm has no attribute {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("an Arm is immutable: use arm.replace(...)")

    def __eq__(self, other):
        return isinstance(other, Arm) and (self.kind, self.options) == (other.kind, other.options)

    def __hash__(self):
        return hash((self.kind, self.options))

    def __repr__(self):
        return f"Arm({self.kind!r}, {', '.join(f'{k}={v!r}' for k, v in self.options)})"

    def __reduce__(self):
        return (_make_arm, (self.kind, dict(self.options)))

    def replace(self, **changes) -> "Arm":
        return Arm(self.kind, **{**dict(self.options), **changes})

    @property
    def spec(self) -> ArmKind:
        return arm_kind(self.kind)

    @property
    def name(self) -> str:
        """Short label for tables and plots, e.g. ``dpsgd eps=3``."""
        label = self.spec.label(self)
        if self.learning_rate is not None:
            label += f" lr={self.learning_rate:g}"
        if self.batch_size is not None:
            label += f" B={self.batch_size}"
        return label

    @property
    def slug(self) -> str:
        """File-name-safe form of ``name``."""
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in self.name)

    @property
    def sampling(self) -> str:
        """The batch sampler the arm trains with (its kind's)."""
        return self.spec.sampling

    @property
    def noise(self) -> Noise | None:
        """A DP kind's noise generator (None for the others)."""
        return Noise(self.prng, self.schedule) if self.prng is not None else None

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}


def _make_arm(kind, values):
    return Arm(kind, **values)


def parse_arm(text: str, **defaults) -> Arm:
    """``"kind[:key=value,...]"`` -> Arm; ``defaults`` (e.g. reg=0.3) apply
    unless the text sets the key (defaults for options the kind lacks are
    ignored). Keys: the kind's options and their aliases."""
    kind, _, rest = text.strip().partition(":")
    spec = arm_kind(kind.strip())
    fields = {k: v for k, v in defaults.items() if spec.option(k) is not None}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        option = spec.option(key.strip())
        if not eq or option is None or not option.text:
            keys = sorted(k for o in spec.all_options() if o.text
                          for k in (o.name, o.alias) if k)
            raise ValueError(f"bad arm option {item!r} in {text!r}; keys: {keys}")
        try:
            fields[option.name] = option.parse(value.strip())
        except ValueError as err:
            raise ValueError(f"bad value in arm option {item!r}: {err}") from None
    return Arm(spec.name, **fields)


def ledger(state) -> Ledger | None:
    """The per-example disclosure ledger in a stage state, or None for one
    that keeps none (a dpsgd arm trained with ``ledger=false``)."""
    return gnq_ledger(state)


# ----------------------------------------------------------------------------
# The registered kinds.

def _gnq_options() -> tuple[Option, ...]:
    return (
        Option("reg", float, "GNQ regulariser of the ledger: rho in lam = rho trace(K) / B "
                             "(relative=true), else lam", default=0.1, check=_positive,
               setting="reg"),
        Option("relative", boolean, "reg is relative (true) or absolute (false)",
               default=True),
    )


def _gnq_label(text: str) -> Callable[[Arm], str]:
    def label(arm: Arm) -> str:
        out = text.format(arm=arm)
        return out + (f" reg={arm.reg:g}" if arm.reg != 0.1 else "")
    return label


def _gnq_common(arm: Arm, size: RunSize) -> dict:
    return dict(num_examples=size.num_examples, reg=arm.reg, relative=arm.relative)


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


def _dpsgd_accounting(arm: Arm, size: RunSize) -> tuple[float, float]:
    rate = size.batch_size / size.train_size
    steps = size.epochs * (size.train_size // size.batch_size)
    return dp_calibration(arm.epsilon, arm.delta, rate, steps, tuple(arm.releases))


def _dpsgd_policy(arm: Arm, size: RunSize) -> Policy:
    sigma, _ = _dpsgd_accounting(arm, size)
    return dpsgd_policy(l2_norm_clip=arm.clip_norm, noise_multiplier=sigma,
                        expected_batch_size=size.batch_size, seed=size.seed,
                        num_examples=size.num_examples if arm.ledger else None,
                        noise=arm.noise)


def _delta(value, name):
    return checks.probability(value, f"arm {name}")


def _releases(value, name):
    values = tuple(value)
    for r in values:
        checks.positive_finite(r, f"arm {name} (noise multipliers)")
    return tuple(float(r) for r in values)


register(ArmKind(
    "sgd", "plain SGD (the mean gradient); GNQ only keeps its ledger", "sgd",
    _gnq_options(), _gnq_label("sgd"),
    lambda arm, size: monitor_policy(**_gnq_common(arm, size))))

register(ArmKind(
    "dpsgd", "DP-SGD at epsilon 3 (Poisson sampling, clipping to C, noise)", "dpsgd:eps=3",
    (Option("epsilon", float, "the target epsilon", alias="eps", required=True,
            check=_positive, setting="epsilon"),
     Option("delta", float, "the target delta", default=1e-5, check=_delta, setting="delta"),
     Option("clip_norm", float, "the clip norm C (gradient L2 units)", default=1.0,
            check=_positive, setting="clip_norm"),
     Option("ledger", boolean, "keep the GNQ ledger on the clipped gradients (false: read "
                               "only the squared norms, no B x B cross terms; the same "
                               "model, no disclosure reported)", default=True),
     Option("prng", _choice(KEY_IMPLS), "the noise's key implementation",
            default="threefry2x32"),
     Option("schedule", _choice(SCHEDULES), "the noise draw: per_leaf (optax's), flat "
                                            "(one draw per step) or paired (flat, both "
                                            "threefry words used)", default="per_leaf"),
     Option("releases", tuple, "noise multipliers of Gaussian mechanisms already run on the "
                               "training set, composed into epsilon", default=(),
            check=_releases, text=False, setting="releases")),
    lambda arm: f"dpsgd eps={arm.epsilon:g}" + (f" prng={arm.noise.label.replace(' ', '_')}"
                                                 if arm.noise.label else ""),
    _dpsgd_policy, sampling="poisson", accounting=_dpsgd_accounting))

register(ArmKind(
    "censor", "GNQ censor: an example is refused once its disclosure would pass tau nats",
    "censor:tau=8",
    (Option("budget", float, "tau, nats per example over training", alias="tau",
            required=True, check=lambda v, n: checks.budget(v, f"arm {n}"),
            threshold="budget"),) + _gnq_options(),
    _gnq_label("gnq-censor tau={arm.budget:g}"),
    lambda arm, size: censor_policy(budget=arm.budget, policy="retire",
                                    **_gnq_common(arm, size)),
    defense=True))

register(ArmKind(
    "clip", "GNQ clipping: each example's disclosure capped at max_step nats per step",
    "clip:max_step=0.1",
    (Option("max_step", float, "the cap on one step's disclosure, nats", required=True,
            check=_positive, threshold="max_step"),) + _gnq_options(),
    _gnq_label("gnq-clip s={arm.max_step:g}"),
    lambda arm, size: clip_policy(max_step=arm.max_step, **_gnq_common(arm, size)),
    defense=True))


# ----------------------------------------------------------------------------
# Training an arm's runs.

def run_policy(arm: Arm, size: RunSize) -> Policy:
    """The ``Policy`` of one run of ``arm`` (its kind's, for that run's size:
    DP-SGD's sigma calibrated for ``size``): what ``train_runs`` trains each
    run with, and what a one-step use of an arm (a defense applied to one
    batch, ``experiments.reconstruction``) takes."""
    return arm.spec.policy(arm, size)


class TrainingRun(NamedTuple):
    """One run of an arm: its training set (as ``gujax.train.train`` takes
    it: (images, labels, ids) or a dict with "id"), its seed (batches,
    augmentation and noise) and its initial parameters."""
    data: Any
    seed: int
    params: PyTree


class ArmRun(NamedTuple):
    """What ``train_runs`` returns per run.

    params: the trained parameters. ledger: the run's ``Ledger`` (None for
    a kind that keeps none). noise_multiplier, epsilon: the sigma the run's
    noise was drawn with and its accounted epsilon (DP kinds; else None).
    history, snapshots, iterates: as ``gujax.train.TrainResult``.
    stage_state: the run's final stage state. config: the run's
    ``TrainConfig``.
    """
    params: PyTree
    ledger: Ledger | None
    noise_multiplier: float | None
    epsilon: float | None
    history: list[dict]
    snapshots: dict
    stage_state: Any
    config: Any
    iterates: Any = None


def _train_size(data) -> int:
    ids = data["id"] if isinstance(data, Mapping) else data[2]
    return len(ids)


def _max_id(data) -> int:
    ids = np.asarray(data["id"] if isinstance(data, Mapping) else data[2])
    return int(ids.max()) if len(ids) else -1


def train_runs(arm: Arm, runs: Sequence[TrainingRun], config, *, model=None,
               loss_fn: Callable | None = None, num_examples: int | None = None,
               method: str = "ghost", dtype: Any = None, eval_data=None,
               workdir: str | None = None, resume: bool = True,
               snapshot_epochs: Sequence[int] = (), mesh=None,
               observe: Callable | None = None) -> list[ArmRun]:
    """Train the runs of ``arm`` together; one ``ArmRun`` per run, in order.

    The one way an arm is trained: the stage (engine ``method``, "ghost" or
    "explicit", and the arm's policy) is built once; each run's stage state
    is built from its own ``RunSize``, so DP-SGD's sigma is calibrated for
    that run's training-set size and lives, with its key, clip norm and
    expected batch size, in that run's state; the arm's batch size, learning
    rate and sampler override ``config`` (a ``gujax.train.TrainConfig``) in
    every run, whose seed is the run's.

    Args:
      runs: the ``TrainingRun``s (M >= 1); their sizes may differ.
      model: the Flax classifier (default loss, evaluation); loss_fn: the
        per-example loss (default: softmax cross-entropy of ``model``).
      num_examples: the ledger's size (ids lie in [0, num_examples));
        default the largest id + 1 over the runs. Shadow models pass the
        pool size, ids being pool positions.
      dtype: the Gram matrix's and GNQ solve's dtype.
      eval_data, workdir, resume, snapshot_epochs, mesh, observe: as
        ``gujax.train.train_stacked``.
    """
    from gujax.train import softmax_cross_entropy, train_stacked  # train imports engine

    if not runs:
        raise ValueError("train_runs needs one or more runs")
    spec = arm.spec
    batch_size = arm.batch_size or config.batch_size
    configs = [dataclasses.replace(config, seed=r.seed, sampling=spec.sampling,
                                   batch_size=batch_size,
                                   learning_rate=arm.learning_rate or config.learning_rate)
               for r in runs]
    largest = max(_max_id(r.data) for r in runs) + 1
    num_examples = largest if num_examples is None else checks.positive_int(
        num_examples, "num_examples")
    if largest > num_examples:
        raise ValueError(f"ids reach {largest - 1}, beyond num_examples={num_examples}")
    sizes = [RunSize(_train_size(r.data), num_examples, batch_size, config.epochs, r.seed)
             for r in runs]
    for size in sizes:
        if not 0 < batch_size <= size.train_size:
            raise ValueError(f"arm {arm.name!r}: need 0 < batch_size ({batch_size}) <= the "
                             f"run's {size.train_size} training examples")
    if loss_fn is None:
        if model is None:
            raise ValueError("train_runs needs a model (for the default loss) or a loss_fn")
        loss_fn = softmax_cross_entropy(model)
    engine = make_engine(method, loss_fn)
    policies = [run_policy(arm, size) for size in sizes]
    # Every per-run constant is in the state, so the first run's stage
    # serves them all (gujax.policies); each run's state is its own.
    stage = make_stage(engine, policies[0], dtype=dtype)
    states = [p.init() for p in policies]
    accounted = [spec.accounting(arm, size) if spec.accounting else (None, None)
                 for size in sizes]
    results = train_stacked(params=[r.params for r in runs], stage=stage,
                            stage_states=states, data=[r.data for r in runs],
                            configs=configs, model=model, eval_data=eval_data,
                            workdir=workdir, resume=resume, snapshot_epochs=snapshot_epochs,
                            mesh=mesh, observe=observe)
    return [ArmRun(res.params, ledger(res.stage_state), sigma, eps, res.history,
                   dict(res.snapshots or {}), res.stage_state, cfg, res.iterates)
            for res, (sigma, eps), cfg in zip(results, accounted, configs)]
