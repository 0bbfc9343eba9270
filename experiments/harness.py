"""The one experiment harness: typed presets and their command line, the
data/model registry, the arms, and every call into the trainer and the
shadow-model audit.

Every experiment (``experiments.digits``/``cifar`` through
``experiments.comparison``; ``unique_features``, ``curvature`` and
``reconstruction`` through ``experiments.memorisation``) works the same way:

    @dataclasses.dataclass(frozen=True)
    class MySettings(Settings):          # the shared fields, plus its own
        num_models: int = option(8, "shadow models per arm")

    PRESETS = presets(default=MySettings(epochs=60, note="..."), smoke=...)
    EXPERIMENT = Experiment("digits", __doc__, PRESETS)

    def prepare(run): ...          # data, model, arms: everything that can fail on input
    def execute(run, prepared): ...  # training and the report, into run.out

    def main(argv=None):
        return harness.main(argv, EXPERIMENT, prepare=prepare, execute=execute)

Each field is one command-line option (``num_models`` as ``--num-models 16``;
tuples take several values, ``--hidden 128 64``; booleans ``--augment``,
``--no-augment`` or ``--augment false``), its help the field's description and
its value in each preset. Besides the fields: ``--preset``, ``--out`` (default
``results/<name>-<preset>``), ``--overwrite``, ``--resume`` (experiments that
can resume) and ``--data-dir`` (the ``data_dir`` field).

``main`` is the command line of every experiment, in this order: parse and
check the settings and arms; refuse an ``--out`` that already holds files
unless ``--resume`` or ``--overwrite`` is given; ``prepare`` (load the data,
build the model, check a resumed run against what ``--out`` holds); only then
create ``--out`` (deleting the old run with ``--overwrite``) and ``execute``.
Bad input is one line ``error: ...`` on stderr and exit status 2, never a
traceback; Ctrl-C prints the command that resumes the run (or that the run
was interrupted) and exits with 130.

Arms are written in one syntax everywhere, ``kind[:key=value,...]``
(``gujax.arms.parse_arm``): ``sgd``, ``dpsgd:eps=3``, ``censor:tau=8``,
``clip:max_step=0.1``. What an arm text leaves unset comes from the settings
(``Settings.arm_defaults``: ``reg`` for the GNQ arms, ``delta`` and
``clip_norm`` for DP-SGD) and, for a ``censor``/``clip`` arm without a budget,
from ``Thresholds`` (the memorisation experiments take them from quantiles of
the plain sgd run's ledger).

The library calls live here alone: ``train_arm`` (``gujax.arms.build_pipeline``,
``gujax.train.train`` and ``train_stacked``) and ``shadow_audit``
(``gujax.audit.shadow.audit_arm``, checked beforehand by
``check_shadow_audit``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import textwrap
import types
import typing
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from gujax import checks
from gujax.arms import _ALIASES as ARM_ALIASES  # the short keys: eps, tau, lr
from gujax.arms import KINDS, METHODS, Arm, build_pipeline, ledger, parse_arm
from gujax.audit.shadow import ResumeMismatch, audit_arm, check_shadow_run
from gujax.data import Dataset, default_cache_dir, load, random_crop_flip, random_subset
from gujax.data.sources import DataNotFound, accepted_layouts
from gujax.features import moment_norms, private_standardizer, scattering_features
from gujax.models import MLP, ScatterCNN, ScatterLinear, SmallCNN, WideResNet
from gujax.train import TrainConfig, softmax_cross_entropy, train_stacked


class UsageError(ValueError):
    """Bad input on the command line: ``main`` prints it as one line
    ``error: ...`` and exits with status 2."""


# ----------------------------------------------------------------------------
# Settings.

def option(default, help: str, *, choices: Sequence | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True,
           shown: str | None = None):
    """A settings field: its default, what it is (shown by --help), and
    optionally the values it may take (``choices``, per element for a tuple)
    or a parser of one command-line value (``parse``, raising
    ``argparse.ArgumentTypeError``). ``cli=False``: not an option of its own.
    ``shown``: what --help says instead of the presets' values (None: the
    values, a None value as "none")."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "parse": parse, "cli": cli, "shown": shown})


_BOOLEAN_TEXT = ("1", "true", "yes", "0", "false", "no")


def arm_text(text: str) -> str:
    """One arm as written on the command line, its syntax checked
    (``kind[:key=value,...]``, a known kind and keys). Values an arm may
    leave to the settings or the thresholds are not needed here."""
    try:
        parse_arm(text, epsilon=1.0, budget=1.0, max_step=1.0)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    for item in text.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key.strip() == "relative" and value.strip().lower() not in _BOOLEAN_TEXT:
            raise argparse.ArgumentTypeError(
                f"bad value in arm option {item.strip()!r}: expected true or false")
    return text


MODELS: dict[str, Callable[[Any, int], Any]] = {
    # MLP: flatten, Dense-ReLU per ``hidden`` width, Dense head.
    "mlp": lambda s, k: MLP(hidden=tuple(s.hidden), num_classes=k),
    # SmallCNN: Conv-GroupNorm-ReLU-pool per ``widths`` entry.
    "smallcnn": lambda s, k: SmallCNN(num_classes=k, widths=tuple(s.widths),
                                      groups=min(8, *s.widths)),
    # WRN-depth-width with GroupNorm.
    "wrn": lambda s, k: WideResNet(depth=s.depth, width=s.width, num_classes=k),
    # Tramer & Boneh's models on ScatterNet features (--features scattering):
    # GroupNorm(27) in the model, or none after --normalisation private.
    "scatter_linear": lambda s, k: ScatterLinear(num_classes=k, groups=_groups(s)),
    "scatter_cnn": lambda s, k: ScatterCNN(num_classes=k, groups=_groups(s)),
}
# The settings each model reads (the others are not recorded for its runs).
MODEL_FIELDS = {"mlp": ("hidden",), "smallcnn": ("widths",), "wrn": ("depth", "width"),
                "scatter_linear": (), "scatter_cnn": ()}
SCATTER_MODELS = ("scatter_linear", "scatter_cnn")


def _groups(settings) -> int | None:
    return 27 if settings.normalisation == "group" else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every experiment has: the data, the model, the optimiser, the
    gradient engine and what its arms take from the settings."""
    preset: str = option("", "the preset these settings came from (--preset)", cli=False)
    dataset: str = option("digits", "gujax.data.load name: digits (embedded), cifar10, "
                                    "mnist, ..., or the name of an image folder")
    data_dir: str | None = option(None, "local data: an image folder "
                                        "DIR/{train,test}/<class>/<image>, the CIFAR python "
                                        "batches or a TFDS data dir (none: TFDS's default, "
                                        "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    model: str = option("mlp", "the classifier: mlp (an MLP; uses --hidden), smallcnn (a "
                               "small CNN; --widths), wrn (WideResNet; --depth, --width), "
                               "scatter_linear or scatter_cnn (Tramer & Boneh's models on "
                               "--features scattering)",
                        choices=tuple(MODELS))
    hidden: tuple[int, ...] = option((64,), "the MLP's hidden layer widths (--model mlp)")
    widths: tuple[int, ...] = option((16, 32), "SmallCNN's channel widths, one per stage "
                                               "(--model smallcnn)")
    depth: int = option(16, "WideResNet depth, 6 n + 4 (--model wrn)")
    width: int = option(4, "WideResNet widening factor (--model wrn)")
    epochs: int = option(30, "training epochs (DP-SGD's noise is calibrated for all of them)")
    batch_size: int = option(64, "training batch size (DP-SGD: the expected Poisson batch)")
    learning_rate: float = option(0.1, "learning rate (an arm's lr= overrides it)")
    optimizer: str = option("sgd", "the optimizer: sgd (with --momentum) or adam",
                            choices=("sgd", "adam"))
    momentum: float = option(0.0, "SGD momentum, in [0, 1)")
    augment: bool = option(False, "random crop and flip of the training images, inside the "
                                  "training step")
    features: str = option("pixels", "model inputs: pixels, or scattering (ScatterNet, J = 2, "
                                     "L = 8, of the ImageNet-normalised images; computed once "
                                     "per split and cached; for the scatter_* models)",
                           choices=("pixels", "scattering"))
    normalisation: str = option(
        "group", "scattering features' normalisation: group (GroupNorm in the model, free) "
                 "or private (per-channel mean and variance of the training set with DP, "
                 "composed into every dpsgd arm's epsilon; Tramer & Boneh's best setting)",
        choices=("group", "private"))
    normalisation_noise: float = option(
        8.0, "noise multiplier of the two Gaussian mechanisms of --normalisation private")
    seed: int = option(0, "seeds the data subsets, initialisations, batches and noise (>= 0)")
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
    progress: bool = option(True, "progress bars over the arms and the models")
    step_progress: bool | None = option(
        None, "a bar over each training run's steps (throughput, ETA), for models trained "
              "together one bar for the group", shown="on when stderr is a terminal and "
              "--progress is on, else off")
    note: str = option("", "what the preset is for, printed with the results",
                       shown="the preset's description, listed under presets below")

    # Paragraphs of --help's epilog (subclasses add theirs).
    NOTES: ClassVar[tuple[str, ...]] = ()

    def arm_defaults(self, kind: str) -> dict:
        """What an arm of ``kind`` takes from these settings unless its text
        sets it (``parse_arm`` defaults)."""
        if kind == "dpsgd":
            releases = ((self.normalisation_noise,) * 2
                        if self.normalisation == "private" else ())
            return {"delta": self.delta, "clip_norm": self.clip_norm, "releases": releases}
        return {"reg": self.reg}

    def check(self) -> None:
        """Checks across fields (``ValueError``), once the command line is
        applied and before any compute. Subclasses extend it."""
        try:                            # epochs, batch size, learning rate, momentum, ...
            train_config(self)
        except ValueError as err:
            raise ValueError(str(err).removeprefix("TrainConfig.")) from None
        checks.seed(self.seed)
        Arm("sgd", reg=self.reg)
        Arm("dpsgd", epsilon=1.0, delta=self.delta, clip_norm=self.clip_norm)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.model == "smallcnn" and not self.widths:
            raise ValueError("widths needs one or more values for --model smallcnn")
        for name in MODEL_FIELDS[self.model]:
            values = getattr(self, name)
            for value in values if isinstance(values, tuple) else (values,):
                checks.positive_int(value, f"{name} (--model {self.model})")
        if self.model == "wrn" and ((self.depth - 4) % 6 or self.depth < 10):
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...), "
                             f"got {self.depth}")
        scatter = self.model in SCATTER_MODELS
        if scatter != (self.features == "scattering"):
            raise ValueError(f"--model {self.model} takes "
                             f"{'--features scattering' if scatter else 'pixels'}; the "
                             f"scatter_* models are the ones for scattering features")
        if self.normalisation == "private":
            if not scatter:
                raise ValueError("--normalisation private applies to scattering features")
            checks.positive_finite(self.normalisation_noise, "normalisation_noise")
        if self.dataset == "digits" and self.data_dir is not None:
            raise ValueError("--data-dir does not apply to --dataset digits (embedded in "
                             "scikit-learn)")

    def heading(self, title: str) -> list[str]:
        """A results table's first lines: ``# title`` and the preset's note."""
        return [f"# {title}", ""] + ([self.note, ""] if self.note else [])

    def record(self) -> dict:
        """The settings as a results file records them: all fields but the
        model settings the chosen model does not read (``MODEL_FIELDS``)."""
        unused = {f for fields in MODEL_FIELDS.values() for f in fields} - set(
            MODEL_FIELDS[self.model])
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}


def presets(**named: Settings) -> dict[str, Settings]:
    """{name: settings} with each one's ``preset`` field set to its name."""
    return {name: dataclasses.replace(s, preset=name) for name, s in named.items()}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One runnable experiment: ``python -m experiments.<name>``.

    presets: name -> settings, all of one ``Settings`` class (each one's
      ``note`` describes it in --help).
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

    @property
    def command(self) -> str:
        return f"python -m experiments.{self.name}"


class Run(NamedTuple):
    """A parsed command line: the settings, the output folder, --resume,
    --overwrite, and the arguments as given (for the resume hint)."""
    settings: Settings
    out: str
    resume: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()


class _Parser(argparse.ArgumentParser):
    """Bad arguments raise ``UsageError`` (one line), not argparse's usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


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
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _option_fields(cls: type[Settings]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every field that is a command-line option."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _field_help(field: dataclasses.Field, experiment: Experiment) -> str:
    """The field's description, its valid values and its default (and how
    the other presets differ)."""
    text = field.metadata["help"]
    if field.metadata["choices"]:
        text += f"; one of {', '.join(map(str, field.metadata['choices']))}"
    if field.metadata["shown"]:
        return f"{text} (default: {field.metadata['shown']})"
    default = getattr(experiment.presets[experiment.default_preset], field.name)
    others = "".join(f"; {name}: {_shown(getattr(p, field.name))}"
                     for name, p in experiment.presets.items()
                     if getattr(p, field.name) != default)
    return f"{text} (default: {_shown(default)}{others})"


def _paragraph(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, 79, initial_indent=indent, subsequent_indent=indent + "  ")


def _epilog(experiment: Experiment) -> str:
    """--help's epilog: the presets, the arm syntax and the settings' notes."""
    lines = [f"presets (--preset; default: {experiment.default_preset}):"]
    for name, preset in experiment.presets.items():
        default = " (the default)" if name == experiment.default_preset else ""
        lines.append(_paragraph(f"{name}{default}: {preset.note or 'no description'}"))
    fields = {f.name for f, _ in _option_fields(experiment.settings_class)}
    if "arms" in fields:
        keys = [f.name for f in dataclasses.fields(Arm) if f.name != "kind"]
        aliases = {v: k for k, v in ARM_ALIASES.items()}
        keys = [f"{k} (alias {aliases[k]})" if k in aliases else k for k in keys]
        lines += [
            "", "arms (--arms, one or more): kind[:key=value,...], for example",
            "  sgd                plain SGD (the mean gradient); GNQ only keeps its ledger",
            "  dpsgd:eps=3        DP-SGD at epsilon 3 (Poisson sampling, clipping to C, "
            "noise)",
            "  censor:tau=8       GNQ censor: an example is refused once its disclosure",
            "                     would pass tau nats",
            "  clip:max_step=0.1  GNQ clipping: each example's disclosure capped at",
            "                     max_step nats per step",
            _paragraph(f"kinds: {', '.join(KINDS)}; keys: {', '.join(keys)}. relative=true "
                       "(the default) reads reg as rho in lam = rho trace(K) / B, "
                       "relative=false as lam itself. Keys an arm leaves unset come from --reg (sgd, "
                       "censor, clip), --delta and --clip-norm (dpsgd). Several keys: "
                       "dpsgd:eps=1,delta=1e-6 or censor:tau=4,reg=0.3,lr=0.05."),
        ]
    for note in experiment.settings_class.NOTES:
        lines += ["", textwrap.fill(note, 79)]
    out = experiment.results_name or experiment.name
    lines += ["", textwrap.fill(
        f"Output: --out (default results/{out}-<preset>). A folder that already holds "
        "files is refused unless "
        + ("--resume (continue it: finished work is kept) or " if experiment.resumable else "")
        + "--overwrite (delete it first) is given.", 79)]
    return "\n".join(lines)


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    """--preset, --out, --overwrite, --resume (if resumable) and one option
    per field; the epilog explains the presets and the arms."""
    parser = _Parser(prog=experiment.command, description=experiment.description,
                     epilog=_epilog(experiment),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(experiment.presets),
                        default=experiment.default_preset,
                        help=f"the preset, one of {', '.join(experiment.presets)}, each "
                             f"described below (default: {experiment.default_preset})")
    parser.add_argument("--out", default=None, help="output folder (default: results/"
                        f"{experiment.results_name or experiment.name}-<preset>)")
    replace = parser.add_mutually_exclusive_group()
    replace.add_argument("--overwrite", action="store_true",
                         help="delete what an earlier run left in --out first (default: "
                              "off: a folder that holds files is refused)")
    if experiment.resumable:
        replace.add_argument("--resume", action="store_true",
                             help="continue the run in --out, keeping its finished work "
                                  "(default: off)")
    for field, hint in _option_fields(experiment.settings_class):
        kwargs = dict(dest=field.name, default=None,
                      help=_field_help(field, experiment).replace("%", "%%"))
        flag = "--" + field.name.replace("_", "-")
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        if hint is bool:
            parser.add_argument(flag, "--no-" + flag[2:], action=_Flag, **kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            hint, kwargs["nargs"] = typing.get_args(hint)[0], "+"
        parser.add_argument(flag, type=field.metadata["parse"] or hint,
                            choices=field.metadata["choices"], **kwargs)
    return parser


def parse_command_line(argv, experiment: Experiment) -> Run:
    """The chosen preset with every option given applied, checked
    (``Settings.check``): a bad value raises ``UsageError``, before any
    compute."""
    argv = tuple(sys.argv[1:] if argv is None else argv)
    args = build_parser(experiment).parse_args(argv)
    # dp_accounting's RDP search logs a warning per skipped order; say nothing.
    absl_logging.set_verbosity(absl_logging.ERROR)
    changes = {}
    for field, hint in _option_fields(experiment.settings_class):
        value = getattr(args, field.name)
        if value is not None:
            changes[field.name] = tuple(value) if typing.get_origin(hint) is tuple else value
    settings = dataclasses.replace(experiment.presets[args.preset], **changes)
    try:
        settings.check()
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = args.out or os.path.join(
        "results", f"{experiment.results_name or experiment.name}-{args.preset}")
    return Run(settings, out, bool(getattr(args, "resume", False)), args.overwrite, argv)


# ----------------------------------------------------------------------------
# The output folder and the command line's life cycle.

# What marks a folder as a run's (so --overwrite may delete it): the file
# open_out writes, or what the experiments wrote before there was one.
RUN_FILE = "run.json"
_RUN_MARKS = (RUN_FILE, "results.json", "summary.txt", "shadow")


def check_out(run: Run, experiment: Experiment) -> None:
    """Refuse an ``--out`` that holds files unless --resume or --overwrite
    says what to do with them (``UsageError``); --overwrite deletes only a
    run's folder."""
    out = run.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    if not os.path.isdir(out) or not os.listdir(out) or run.resume:
        return
    if run.overwrite:
        if not any(os.path.exists(os.path.join(out, m)) for m in _RUN_MARKS):
            raise UsageError(f"--out {out} holds files that are not an experiment's run (no "
                             f"{RUN_FILE}); refusing to delete them: choose another --out")
        return
    choices = ("--resume to continue the run in it or --overwrite to replace it"
               if experiment.resumable else "--overwrite to replace what it holds (this "
                                            "experiment cannot resume)")
    raise UsageError(f"--out {out} is not empty; pass {choices}, or choose another --out")


def open_out(run: Run, experiment: Experiment) -> None:
    """Create ``run.out`` (deleting the old run first with --overwrite),
    mark it as a run's folder (``run.json``: the experiment, the command,
    the settings) and persist compiled steps under the gujax cache: every
    model of an arm has the same step (same shapes), so only the first pays
    for compilation."""
    if run.overwrite and os.path.isdir(run.out):
        shutil.rmtree(run.out)
    os.makedirs(run.out, exist_ok=True)
    with open(os.path.join(run.out, RUN_FILE), "w") as f:
        json.dump({"experiment": experiment.name, "command": _command(experiment, run.argv),
                   "settings": run.settings.record()}, f, indent=1)
    enable_compilation_cache(os.path.join(default_cache_dir(), "jax"))


def enable_compilation_cache(path: str) -> None:
    """Persist compiled steps in ``path`` (XLA's persistent compilation cache)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _command(experiment: Experiment, argv: Sequence[str], *extra: str) -> str:
    """The command line of this run (without --overwrite), plus ``extra``."""
    kept = [a for a in argv if a not in ("--overwrite",) + extra]
    return shlex.join([*experiment.command.split(), *kept, *extra])


def user_message(err: Exception) -> str:
    """An error in the command line's terms: a missing data folder names
    --data-dir, a resume mismatch the settings that changed and --overwrite."""
    if isinstance(err, DataNotFound):
        return (f"{err.problem} " + accepted_layouts(err.name, data_dir="--data-dir",
                                                     digits="--dataset digits"))
    if isinstance(err, ResumeMismatch):
        return (f"{err.workdir} holds a run with other settings: {', '.join(err.changes)}; "
                "give the same settings to resume it, or --overwrite to start over")
    return str(err)


def _fail(message: str, status: int) -> typing.NoReturn:
    print(" ".join(message.splitlines()), file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv, experiment: Experiment, *, prepare: Callable[[Run], Any],
         execute: Callable[[Run, Any], dict]) -> dict:
    """``python -m experiments.<experiment.name>``: parse and check the
    command line, refuse an ``--out`` in use (``check_out``), ``prepare(run)``
    (data, model, arms; a ``ValueError`` there is bad input), create the
    output folder (``open_out``) and return ``execute(run, prepared)``.

    Bad input (bad option values, arms, data not found, a resume mismatch):
    one line ``error: ...`` on stderr and ``SystemExit(2)``. Ctrl-C: one line
    saying how to resume and ``SystemExit(130)``. Anything else is a bug and
    shows its traceback.
    """
    argv = tuple(sys.argv[1:] if argv is None else argv)
    opened = False
    try:
        run = parse_command_line(argv, experiment)
        check_out(run, experiment)
        try:
            prepared = prepare(run)
        except ValueError as err:
            raise UsageError(user_message(err)) from None
        open_out(run, experiment)
        opened = True
        return execute(run, prepared)
    except (UsageError, ResumeMismatch, DataNotFound) as err:
        _fail(f"error: {user_message(err)}", 2)
    except KeyboardInterrupt:
        if experiment.resumable:
            _fail(f"interrupted; to continue, run: {_command(experiment, argv, '--resume')}",
                  130)
        where = f"what it wrote in {run.out} is incomplete; run it again with --overwrite" \
            if opened else "nothing was written"
        _fail(f"interrupted ({experiment.name} cannot resume): {where}", 130)


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
    of 0 takes the whole split. ``names`` name the sizes in errors. With
    ``--features scattering`` the images are ScatterNet features, and with
    ``--normalisation private`` standardised with the pool's private
    statistics."""
    train_set = load(settings.dataset, "train", data_dir=settings.data_dir)
    test_set = load(settings.dataset, "test", data_dir=settings.data_dir)
    if settings.features == "scattering":       # whole splits: one cache entry each
        train_set, test_set = (scattering_features(d, progress=settings.progress)
                               for d in (train_set, test_set))
    pool = _take(train_set, pool_size, settings.seed, names[0])
    population = _take(test_set, population_size, settings.seed + 1, names[1])
    if settings.normalisation == "private" and settings.features == "scattering":
        # Statistics of the pool, the data under protection, with DP (their
        # cost is in every dpsgd arm's epsilon: Settings.arm_defaults); the
        # clip norms from the held-out population, whose privacy is not at
        # stake. The population is standardised with the same statistics.
        clip_mean, clip_square = moment_norms(population)
        standardize = private_standardizer(
            pool, noise_multiplier=settings.normalisation_noise, clip_mean=clip_mean,
            clip_square=clip_square, seed=settings.seed)
        pool, population = standardize(pool), standardize(population)
    return pool, population


def build_model(settings: Settings, num_classes: int, image_shape: Sequence[int] | None = None):
    """The Flax Linen classifier ``settings.model`` names (``MODELS``); with
    ``image_shape`` (H, W, C), checked to take such images (traced, not run:
    a ``ValueError`` says why not)."""
    if settings.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {settings.model!r}")
    model = MODELS[settings.model](settings, num_classes)
    if image_shape is not None:
        try:
            jax.eval_shape(lambda: init_params(model, tuple(image_shape), 0))
        except (ValueError, TypeError) as err:
            raise ValueError(f"--model {settings.model} cannot take {tuple(image_shape)} "
                             f"images: {err}") from None
    return model


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


def step_progress(settings: Settings) -> bool:
    """Whether training shows a bar over its steps: ``step_progress`` when
    set, else with ``progress`` on and stderr a terminal."""
    if settings.step_progress is not None:
        return settings.step_progress
    return settings.progress and sys.stderr.isatty()


def train_config(settings: Settings, *, seed: int | None = None, sampling: str = "shuffle",
                 epochs: int | None = None, learning_rate: float | None = None,
                 batch_size: int | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a run of ``settings`` (evaluated only at its end)."""
    epochs = epochs or settings.epochs
    return TrainConfig(
        epochs=epochs, batch_size=batch_size or settings.batch_size,
        learning_rate=learning_rate or settings.learning_rate, optimizer=settings.optimizer,
        momentum=settings.momentum, seed=settings.seed if seed is None else seed,
        sampling=sampling, eval_every=epochs, checkpoint_every=settings.checkpoint_every,
        augment=random_crop_flip if settings.augment else None,
        progress=step_progress(settings))


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
    batch_size = arm.batch_size or settings.batch_size
    pipelines = [build_pipeline(arm, loss_fn=softmax_cross_entropy(model),
                                train_size=len(labels), batch_size=batch_size,
                                epochs=settings.epochs, seed=seed, method=settings.method)
                 for (_, labels), seed in zip(data, seeds)]
    params = [init_params(model, images.shape[1:], seed)
              for (images, _), seed in zip(data, seeds)]
    configs = [train_config(settings, seed=seed, sampling=arm.sampling,
                            learning_rate=arm.learning_rate, batch_size=batch_size)
               for seed in seeds]
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


def _shadow_arguments(settings: Settings, *, model, num_models: int,
                      query_augmentations: Sequence[str]) -> dict:
    """The spec of ``arm``'s shadow models (``gujax.audit.shadow.ShadowSpec``
    fields) under ``settings``."""
    return dict(model=model, config=train_config(settings), num_models=num_models,
                seed=settings.seed, augmentations=tuple(query_augmentations),
                method=settings.method)


def check_shadow_audit(arm: Arm, settings: Settings, *, pool: Dataset, population: Dataset,
                       model, num_models: int, query_augmentations: Sequence[str],
                       workdir: str | None = None, resume: bool = False) -> None:
    """What ``shadow_audit`` with these arguments would refuse, before any
    training: ``gujax.audit.shadow.check_shadow_run`` (a ``ValueError``, or
    with ``resume`` a ``ResumeMismatch`` naming the settings that changed)."""
    check_shadow_run(arm, pool=pool, population=population, workdir=workdir, resume=resume,
                     **_shadow_arguments(settings, model=model, num_models=num_models,
                                         query_augmentations=query_augmentations))


def shadow_audit(arm: Arm, settings: Settings, *, pool: Dataset, population: Dataset, model,
                 num_models: int, workdir: str, query_augmentations: Sequence[str],
                 attack_augmentations: Sequence[str] | None = None, resume: bool = False,
                 checkpoints: bool = True, models_at_once: int = 1):
    """``num_models`` shadow models of ``arm`` on random halves of ``pool``
    (``models_at_once`` at a time), each attacked with the others as its
    shadows: (ShadowRecord, ShadowAudit) of ``gujax.audit.shadow.audit_arm``."""
    return audit_arm(arm, pool=pool, population=population, workdir=workdir,
                     attack_augmentations=attack_augmentations, resume=resume,
                     checkpoints=checkpoints, models_at_once=models_at_once,
                     progress=settings.progress,
                     **_shadow_arguments(settings, model=model, num_models=num_models,
                                         query_augmentations=query_augmentations))
