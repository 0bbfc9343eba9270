"""The one experiment harness: typed presets and their command line, the
data/model registry, the arms, and every call into the trainer and the
shadow-model audit.

Every experiment (``experiments.digits``/``cifar`` through
``experiments.comparison``; ``unique_features``, ``curvature`` and
``reconstruction`` through ``experiments.memorisation``) works the same way:

    @dataclasses.dataclass(frozen=True)
    class MySettings(Settings):          # the shared fields, plus its own
        num_models: int = option(8, "shadow models per arm")

    PRESETS = presets(default=MySettings(epochs=60), smoke=MySettings(epochs=2))
    EXPERIMENT = Experiment("digits", __doc__, PRESETS)

    run = parse_command_line(argv, EXPERIMENT)   # Run(settings, out, resume)
    run.settings.epochs                          # attribute access, typed

Each field is one command-line option (``num_models`` as ``--num-models 16``;
tuples take several values, ``--hidden 128 64``; booleans ``--augment``,
``--no-augment`` or ``--augment false``), its help the field's description and
its value in each preset. Besides the fields: ``--preset``, ``--out`` (default
``results/<name>-<preset>``), ``--resume`` (experiments that can resume) and
``--data-dir`` (the ``data_dir`` field).

Arms are written in one syntax everywhere, ``kind[:key=value,...]``
(``gujax.arms.parse_arm``): ``sgd``, ``dpsgd:eps=3``, ``censor:tau=8``,
``clip:max_step=0.1``. What an arm text leaves unset comes from the settings
(``Settings.arm_defaults``: ``reg`` for the GNQ arms, ``delta`` and
``clip_norm`` for DP-SGD) and, for a ``censor``/``clip`` arm without a budget,
from ``Thresholds`` (the memorisation experiments take them from quantiles of
the plain sgd run's ledger).

The library calls live here alone: ``train_arm`` (``gujax.arms.build_pipeline``,
``gujax.train.train`` and ``train_stacked``) and ``shadow_audit``
(``gujax.audit.shadow.audit_arm``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from gujax.arms import KINDS, METHODS, Arm, build_pipeline, ledger, parse_arm
from gujax.audit.shadow import audit_arm
from gujax.data import Dataset, default_cache_dir, load, random_crop_flip, random_subset
from gujax.models import MLP, SmallCNN, WideResNet
from gujax.train import TrainConfig, softmax_cross_entropy, train_stacked


# ----------------------------------------------------------------------------
# Settings.

def option(default, help: str, *, choices: Sequence | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True):
    """A settings field: its default, what it is (shown by --help), and
    optionally the values it may take (``choices``, per element for a tuple)
    or a parser of one command-line value (``parse``, raising
    ``argparse.ArgumentTypeError``). ``cli=False``: not an option of its own."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "parse": parse, "cli": cli})


def arm_text(text: str) -> str:
    """One arm as written on the command line, its syntax checked
    (``kind[:key=value,...]``, a known kind and keys). Values an arm may
    leave to the settings or the thresholds are not needed here."""
    try:
        parse_arm(text, epsilon=1.0, budget=1.0, max_step=1.0)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


MODELS: dict[str, Callable[[Any, int], Any]] = {
    # MLP: flatten, Dense-ReLU per ``hidden`` width, Dense head.
    "mlp": lambda s, k: MLP(hidden=tuple(s.hidden), num_classes=k),
    # SmallCNN: Conv-GroupNorm-ReLU-pool per ``widths`` entry.
    "smallcnn": lambda s, k: SmallCNN(num_classes=k, widths=tuple(s.widths),
                                      groups=min(8, *s.widths)),
    # WRN-depth-width with GroupNorm.
    "wrn": lambda s, k: WideResNet(depth=s.depth, width=s.width, num_classes=k),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every experiment has: the data, the model, the optimiser, the
    gradient engine and what its arms take from the settings."""
    preset: str = option("", "the preset these settings came from (--preset)", cli=False)
    dataset: str = option("digits", "gujax.data.load name: digits (embedded), cifar10, "
                                    "mnist, ..., or the name of an image folder")
    data_dir: str | None = option(None, "local data: an image folder "
                                        "DIR/{train,test}/<class>/<image>, the CIFAR python "
                                        "batches or a TFDS data dir (none: TFDS's default)")
    model: str = option("mlp", "the classifier: mlp (uses hidden), smallcnn (widths) or wrn "
                               "(depth, width)", choices=tuple(MODELS))
    hidden: tuple[int, ...] = option((64,), "the MLP's hidden layer widths")
    widths: tuple[int, ...] = option((16, 32), "SmallCNN's channel widths, one per stage")
    depth: int = option(16, "WideResNet depth (6 n + 4)")
    width: int = option(4, "WideResNet widening factor")
    epochs: int = option(30, "training epochs (DP-SGD's noise is calibrated for all of them)")
    batch_size: int = option(64, "training batch size (DP-SGD: the expected Poisson batch)")
    learning_rate: float = option(0.1, "learning rate (an arm's lr= overrides it)")
    optimizer: str = option("sgd", "optimizer", choices=("sgd", "adam"))
    momentum: float = option(0.0, "SGD momentum")
    augment: bool = option(False, "random crop and flip of the training images, inside the "
                                  "training step")
    seed: int = option(0, "seeds the data subsets, initialisations, batches and noise")
    method: str = option("ghost", "gradient engine: ghost (gujax.ghost, no per-example "
                                  "gradients materialised) or explicit (vmap(grad)); the same "
                                  "runs to rounding", choices=METHODS)
    reg: float = option(0.1, "GNQ regulariser rho (lam = rho trace(K) / B) of the sgd, censor "
                             "and clip arms that set no reg=")
    delta: float = option(1e-5, "DP-SGD's delta, for the dpsgd arms that set no delta=")
    clip_norm: float = option(1.0, "DP-SGD's clipping norm C, for the dpsgd arms that set no "
                                   "clip_norm=")
    checkpoint_every: int = option(500, "trainer checkpoint every this many steps when "
                                        "training into a folder (resumable runs)")
    progress: bool = option(True, "progress bars")
    step_progress: bool = option(False, "with progress: also a bar over each training run's "
                                        "steps (shadow models always train quietly)")

    def arm_defaults(self, kind: str) -> dict:
        """What an arm of ``kind`` takes from these settings unless its text
        sets it (``parse_arm`` defaults)."""
        if kind == "dpsgd":
            return {"delta": self.delta, "clip_norm": self.clip_norm}
        return {"reg": self.reg}

    def check(self) -> None:
        """Checks across fields (``ValueError``), once the command line is
        applied and before any compute. Subclasses extend it."""


def presets(**named: Settings) -> dict[str, Settings]:
    """{name: settings} with each one's ``preset`` field set to its name."""
    return {name: dataclasses.replace(s, preset=name) for name, s in named.items()}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One runnable experiment: ``python -m experiments.<name>``.

    presets: name -> settings, all of one ``Settings`` class.
    results_name: outputs default to results/<results_name>-<preset>
      (default ``name``).
    resumable: offer --resume (keep finished work in --out).
    """
    name: str
    description: str
    presets: Mapping[str, Settings]
    default_preset: str = "default"
    results_name: str | None = None
    resumable: bool = False

    def __post_init__(self):
        if self.default_preset not in self.presets:
            raise ValueError(f"default preset {self.default_preset!r} is not among "
                             f"{sorted(self.presets)}")
        if len({type(p) for p in self.presets.values()}) != 1:
            raise ValueError("every preset of an experiment must be of one Settings class")

    @property
    def settings_class(self) -> type[Settings]:
        return type(self.presets[self.default_preset])


class Run(NamedTuple):
    """A parsed command line: the settings, the output folder, --resume."""
    settings: Settings
    out: str
    resume: bool


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Flag(argparse.Action):
    """A boolean option: ``--name``, ``--no-name`` or ``--name true|false``."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            value = False
        else:
            try:
                value = True if values is None else _parse_bool(values)
            except argparse.ArgumentTypeError as err:
                parser.error(f"argument {option_string}: {err}")
        setattr(namespace, self.dest, value)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _option_fields(cls: type[Settings]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every field that is a command-line option."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    """--preset, --out, --resume (if resumable) and one option per field."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{experiment.name}",
                                     description=experiment.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(experiment.presets),
                        default=experiment.default_preset,
                        help=f"preset (default: {experiment.default_preset})")
    parser.add_argument("--out", default=None, help="output folder (default results/"
                        f"{experiment.results_name or experiment.name}-<preset>)")
    if experiment.resumable:
        parser.add_argument("--resume", action="store_true",
                            help="keep finished work in --out (default: start over)")
    default = experiment.presets[experiment.default_preset]
    for field, hint in _option_fields(experiment.settings_class):
        values = {name: getattr(p, field.name) for name, p in experiment.presets.items()}
        shown = f"default: {_shown(values[experiment.default_preset])}" + "".join(
            f"; {name}: {_shown(v)}" for name, v in values.items()
            if v != getattr(default, field.name))
        kwargs = dict(dest=field.name, default=None,
                      help=f"{field.metadata['help']} ({shown})".replace("%", "%%"))
        flag = "--" + field.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, "--no-" + flag[2:], action=_Flag, **kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            hint, kwargs["nargs"] = typing.get_args(hint)[0], "+"
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        parser.add_argument(flag, type=field.metadata["parse"] or hint,
                            choices=field.metadata["choices"], **kwargs)
    return parser


def parse_command_line(argv, experiment: Experiment) -> Run:
    """The chosen preset with every option given applied, checked
    (``Settings.check``: ``ValueError`` before any compute; a bad option
    value exits through argparse)."""
    args = build_parser(experiment).parse_args(argv)
    # dp_accounting's RDP search logs a warning per skipped order; say nothing.
    absl_logging.set_verbosity(absl_logging.ERROR)
    changes = {}
    for field, hint in _option_fields(experiment.settings_class):
        value = getattr(args, field.name)
        if value is not None:
            changes[field.name] = tuple(value) if typing.get_origin(hint) is tuple else value
    settings = dataclasses.replace(experiment.presets[args.preset], **changes)
    settings.check()
    out = args.out or os.path.join(
        "results", f"{experiment.results_name or experiment.name}-{args.preset}")
    return Run(settings, out, bool(getattr(args, "resume", False)))


def start(out: str, *folders: str) -> None:
    """Create ``out`` (and ``out/<folder>`` for each folder) and persist
    compiled steps under the gujax cache: every model of an arm has the same
    step (same shapes), so only the first pays for compilation."""
    for folder in (out,) + tuple(os.path.join(out, f) for f in folders):
        os.makedirs(folder, exist_ok=True)
    enable_compilation_cache(os.path.join(default_cache_dir(), "jax"))


def enable_compilation_cache(path: str) -> None:
    """Persist compiled steps in ``path`` (XLA's persistent compilation cache)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------
# Data and models.

def _take(data: Dataset, size: int, seed: int, name: str) -> Dataset:
    if size == 0:
        return data
    if not 1 <= size <= len(data):
        raise ValueError(f"{name} must be 0 (all) or in [1, {len(data)}], got {size}")
    return random_subset(data, size, seed)


def load_data(settings: Settings, pool_size: int, population_size: int, *,
              names: tuple[str, str] = ("pool_size", "population_size")
              ) -> tuple[Dataset, Dataset]:
    """(pool, population): random subsets (original order and ids kept) of
    ``settings.dataset``'s train split (``pool_size`` examples, seeded by
    ``settings.seed``) and test split (``population_size``, seed + 1); a size
    of 0 takes the whole split. ``names`` name the sizes in errors."""
    train_set = load(settings.dataset, "train", data_dir=settings.data_dir)
    test_set = load(settings.dataset, "test", data_dir=settings.data_dir)
    return (_take(train_set, pool_size, settings.seed, names[0]),
            _take(test_set, population_size, settings.seed + 1, names[1]))


def build_model(settings: Settings, num_classes: int):
    """The Flax Linen classifier ``settings.model`` names (``MODELS``)."""
    if settings.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {settings.model!r}")
    return MODELS[settings.model](settings, num_classes)


def init_params(model, image_shape, seed: int):
    """``model``'s initial parameters for images of ``image_shape`` (H, W, C)."""
    return model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))["params"]


# ----------------------------------------------------------------------------
# Arms.

class Thresholds(NamedTuple):
    """Budgets for the censor/clip arms that set none (nats)."""
    budget: float               # censor: per-example total D_j
    max_step_disclosure: float  # clip: per-step d_j


_FILLED = {"censor": ("budget", "budget"), "clip": ("max_step", "max_step_disclosure")}


def arm_kind(text: str) -> str:
    """The kind of an arm text: ``"censor"`` for ``"censor:tau=8"``."""
    return text.partition(":")[0].strip()


def make_arm(text: str, settings: Settings, thresholds: Thresholds | None = None) -> Arm:
    """The ``gujax.arms.Arm`` of an arm text. What the text leaves unset comes
    from ``settings.arm_defaults`` and, for a censor/clip arm without a
    budget, from ``thresholds``."""
    kind = arm_kind(text)
    if kind not in KINDS:
        raise ValueError(f"unknown arm kind {kind!r} in {text!r}; choose from "
                         f"{', '.join(KINDS)}")
    defaults = settings.arm_defaults(kind)
    field, source = _FILLED.get(kind, (None, None))
    if field and thresholds is not None:
        defaults[field] = getattr(thresholds, source)
    try:
        return parse_arm(text, **defaults)
    except ValueError:
        if field and thresholds is None:
            parse_arm(text, **defaults, **{field: 1.0})  # raises if something else is wrong
            raise ValueError(f"arm {text!r} sets no {field}: give {field}=... or the "
                             "thresholds from a plain sgd run's ledger") from None
        raise


def check_arms(texts: Sequence[str], settings: Settings, *, by_name: bool) -> None:
    """Arms must differ: by ``Arm.name`` (``by_name``; every arm then needs
    its budgets) or by text."""
    keys = [make_arm(t, settings).name for t in texts] if by_name else list(texts)
    if len(set(keys)) != len(keys):
        raise ValueError(f"two arms have the same name: {keys}")


# ----------------------------------------------------------------------------
# Training: the only calls into the trainer and the shadow-model audit.

class Trained(NamedTuple):
    """One trained model: its parameters, its run's per-example disclosure
    ledger (``gujax.arms.ledger``: disclosure, steps_used, retired, ... per
    example) and the parameters at the end of each of ``snapshot_epochs``."""
    params: Any
    ledger: Any
    snapshots: dict[int, Any]


def train_config(settings: Settings, *, seed: int | None = None, sampling: str = "shuffle",
                 epochs: int | None = None, learning_rate: float | None = None
                 ) -> TrainConfig:
    """The ``TrainConfig`` of a run of ``settings`` (evaluated only at its end)."""
    epochs = epochs or settings.epochs
    return TrainConfig(
        epochs=epochs, batch_size=settings.batch_size,
        learning_rate=learning_rate or settings.learning_rate, optimizer=settings.optimizer,
        momentum=settings.momentum, seed=settings.seed if seed is None else seed,
        sampling=sampling, eval_every=epochs, checkpoint_every=settings.checkpoint_every,
        augment=random_crop_flip if settings.augment else None,
        progress=settings.progress and settings.step_progress)


def train_arm(arm: Arm, settings: Settings, model, data: Sequence[tuple[np.ndarray, np.ndarray]],
              seeds: Sequence[int], *, snapshot_epochs: Sequence[int] = ()) -> list[Trained]:
    """Train one model of ``arm`` per (images uint8, labels) of ``data``,
    model m from the init of ``seeds[m]`` with its batches and noise seeded
    by it; example ids are positions 0..N-1. Several models train together,
    one step vmapped over them (``train_stacked``: the models each would be
    alone, to rounding). The arm's pipeline is
    built for ``settings.epochs``.

    snapshot_epochs: keep the parameters at the end of these epochs
      (``Trained.snapshots``), from the same run.
    """
    if len(data) != len(seeds) or not data:
        raise ValueError(f"need one seed per training set, got {len(seeds)} for {len(data)}")
    pipelines = [build_pipeline(arm, loss_fn=softmax_cross_entropy(model),
                                train_size=len(labels), batch_size=settings.batch_size,
                                epochs=settings.epochs, seed=seed, method=settings.method)
                 for (_, labels), seed in zip(data, seeds)]
    params = [init_params(model, images.shape[1:], seed)
              for (images, _), seed in zip(data, seeds)]
    configs = [train_config(settings, seed=seed, sampling=arm.sampling,
                            learning_rate=arm.learning_rate) for seed in seeds]
    runs = [(images, labels, np.arange(len(labels))) for images, labels in data]
    # What differs between the models (init, DP-SGD's sigma and noise key)
    # lives in their stage states: the first pipeline's stage serves them all.
    stage = pipelines[0].stage
    results = train_stacked(params=params, stage=stage,
                            stage_states=[p.stage.init(q) for p, q in zip(pipelines, params)],
                            data=runs, configs=configs, model=model,
                            snapshot_epochs=snapshot_epochs)
    return [Trained(r.params, ledger(r.aggregator_state), dict(r.snapshots or {}))
            for r in results]


def shadow_audit(arm: Arm, settings: Settings, *, pool: Dataset, population: Dataset, model,
                 num_models: int, workdir: str, query_augmentations: Sequence[str],
                 attack_augmentations: Sequence[str] | None = None, resume: bool = False,
                 checkpoints: bool = True, models_at_once: int = 1):
    """``num_models`` shadow models of ``arm`` on random halves of ``pool``
    (``models_at_once`` at a time), each attacked with the others as its
    shadows: (ShadowRecord, ShadowAudit) of ``gujax.audit.shadow.audit_arm``."""
    return audit_arm(arm, pool=pool, population=population, model=model,
                     config=train_config(settings), num_models=num_models, workdir=workdir,
                     seed=settings.seed, augmentations=tuple(query_augmentations),
                     attack_augmentations=attack_augmentations, resume=resume,
                     checkpoints=checkpoints, method=settings.method,
                     models_at_once=models_at_once, progress=settings.progress)

