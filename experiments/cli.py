"""The experiments' command line: typed presets (``Settings``), the options
generated from them, the arm texts, the output folder and ``main``.

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
        return cli.main(argv, EXPERIMENT, prepare=prepare, execute=execute)

Each field is one command-line option (``num_models`` as ``--num-models 16``;
tuples take several values, ``--hidden 128 64``; booleans ``--augment``,
``--no-augment`` or ``--augment false``), its help the field's description and
its value in each preset. Besides the fields: ``--preset``, ``--out`` (default
``results/<name>-<preset>``), ``--overwrite``, ``--resume`` (experiments that
can resume) and ``--data-dir`` (the ``data_dir`` field).

``main`` is the command line of every experiment, in this order: parse and
check the settings and arms; refuse an ``--out`` that cannot be a folder, that
another run holds (one writer per folder: ``lock_out``, an ``fcntl.flock`` on
``<out>/.lock`` held to the end of the process) or that already holds files
unless ``--resume`` or ``--overwrite`` is given, and with ``--resume`` one
whose ``run.json`` records other settings (``check_resume``: every setting
but ``RESUME_IGNORES``); ``prepare`` (load the data, build the model, check a
resumed run against what ``--out`` holds); only then create ``--out``
(deleting the old run with ``--overwrite``) and ``execute``. Bad input, a
damaged file (``gujax.files.CorruptFile``, naming it) and an unusable
``--out`` are one line ``error: ...`` on stderr and exit status 2, never a
traceback; output into a closed pipe (``| head``) is dropped quietly; Ctrl-C
prints the command that resumes the run (or that the run was interrupted)
and exits with 130.

Arms are written in one syntax everywhere, ``kind[:key=value,...]``
(``gujax.arms.parse_arm``): ``sgd``, ``dpsgd:eps=3``, ``censor:tau=8``,
``clip:max_step=0.1``. What an arm text leaves unset comes from the settings
(``Settings.arm_defaults``: ``reg`` for the GNQ arms, ``delta`` and
``clip_norm`` for DP-SGD) and, for a ``censor``/``clip`` arm without a budget,
from ``Thresholds`` (the memorisation experiments take them from quantiles of
the plain sgd run's ledger).

The data and models are in ``experiments.registry``; the calls into the
library (``gujax.arms.train_runs``, the shadow-model audit) in
``experiments.harness``.
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
from absl import logging as absl_logging

try:
    import fcntl
except ImportError:                  # not on Windows: no lock
    fcntl = None

from experiments.registry import MODEL_FIELDS, MODELS, SCATTER_MODELS
from gujax import checks, files, progress
from gujax.arms import ARM_KINDS, Arm, arm_kind, parse_arm
from gujax.audit.shadow import ResumeMismatch
from gujax.audit.shadow.storage import _differences as setting_differences
from gujax.data import default_cache_dir, random_crop_flip
from gujax.data.sources import DataNotFound, accepted_layouts
from gujax.engine import ENGINES
from gujax.files import CorruptFile
from gujax.train import TrainConfig


class UsageError(ValueError):
    """Bad input on the command line: ``main`` prints it as one line
    ``error: ...`` and exits with status 2."""


# ----------------------------------------------------------------------------
# Settings.

def option(default, help: str, *, choices: Sequence | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True,
           shown: str | None = None, needs: tuple[str, Any] | None = None,
           choice_help: Mapping[str, str] | None = None):
    """A settings field: its default, what it is (shown by --help), and
    optionally the values it may take (``choices``, per element for a tuple)
    or a parser of one command-line value (``parse``, raising
    ``argparse.ArgumentTypeError``). ``cli=False``: not an option of its own.
    ``shown``: what --help says instead of the presets' values (None: the
    values, a None value as "none").

    Options that apply to some experiments only (``offered_fields``):
    ``needs=(field, value)``: offered only where that field can take that
    value (``--depth`` needs ``("model", "wrn")``); ``choice_help``: each
    choice's description, --help listing those the experiment offers
    (``Experiment.choices``)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "parse": parse, "cli": cli, "shown": shown,
        "needs": needs, "choice_help": choice_help})


def arm_text(text: str) -> str:
    """One arm as written on the command line, its syntax checked
    (``kind[:key=value,...]``, a known kind and keys). Values an arm may
    leave to the settings or the thresholds are not needed here."""
    try:
        spec = arm_kind(arm_kind_of(text))
        placeholders = {o.name: 1.0 for o in spec.all_options() if o.required}
        parse_arm(text, **placeholders)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


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
    model: str = option("mlp", "the classifier", choices=tuple(MODELS), choice_help={
        "mlp": "an MLP; uses --hidden", "smallcnn": "a small CNN; --widths",
        "wrn": "WideResNet; --depth, --width",
        "scatter_linear": "Tramer & Boneh's linear model on --features scattering",
        "scatter_cnn": "their CNN on --features scattering"})
    hidden: tuple[int, ...] = option((64,), "the MLP's hidden layer widths (--model mlp)",
                                     needs=("model", "mlp"))
    widths: tuple[int, ...] = option((16, 32), "SmallCNN's channel widths, one per stage "
                                               "(--model smallcnn)", needs=("model", "smallcnn"))
    depth: int = option(16, "WideResNet depth, 6 n + 4 (--model wrn)", needs=("model", "wrn"))
    width: int = option(4, "WideResNet widening factor (--model wrn)", needs=("model", "wrn"))
    epochs: int = option(30, "training epochs (DP-SGD's noise is calibrated for all of them)")
    batch_size: int = option(64, "training batch size (DP-SGD: the expected Poisson batch)")
    learning_rate: float = option(0.1, "learning rate (an arm's lr= overrides it)")
    optimizer: str = option("sgd", "the optimizer: sgd (with --momentum) or adam",
                            choices=("sgd", "adam"))
    momentum: float = option(0.0, "SGD momentum, in [0, 1)")
    augment: bool = option(False, "random crop and flip of the training images, inside the "
                                  "training step")
    features: str = option("pixels", "model inputs", choices=("pixels", "scattering"),
                           choice_help={"pixels": "the images", "scattering": (
                               "ScatterNet, J = 2, L = 8, of the ImageNet-normalised images; "
                               "computed once per split and cached; for the scatter_* "
                               "models")})
    normalisation: str = option(
        "group", "scattering features' normalisation", choices=("group", "private"),
        choice_help={"group": "GroupNorm in the model, free", "private": (
            "per-channel mean and variance of the training set with DP, composed into "
            "every dpsgd arm's epsilon; Tramer & Boneh's best setting")},
        needs=("features", "scattering"))
    normalisation_noise: float = option(
        8.0, "noise multiplier of the two Gaussian mechanisms of --normalisation private",
        needs=("normalisation", "private"))
    seed: int = option(0, "seeds the data subsets, initialisations, batches and noise (>= 0)")
    method: str = option("ghost", "gradient engine: ghost (gujax.ghost, no per-example "
                                  "gradients materialised) or explicit (vmap(grad)); the same "
                                  "runs to rounding", choices=tuple(ENGINES))
    reg: float = option(0.1, "GNQ regulariser rho (lam = rho trace(K) / B) of the sgd, censor "
                             "and clip arms that set no reg=")
    delta: float = option(1e-5, "DP-SGD's delta, for the dpsgd arms that set no delta=")
    clip_norm: float = option(1.0, "DP-SGD's clipping norm C, for the dpsgd arms that set no "
                                   "clip_norm=")
    checkpoint_every: int = option(500, "trainer checkpoint every this many steps when "
                                        "training into a folder (resumable runs)")
    progress: bool = option(True, "progress reports (the arms, the models, data decoding, "
                                  "features): a bar on a terminal, else a plain line at most "
                                  "every 10 s and when each ends (gujax.progress); off: none")
    step_progress: bool | None = option(
        None, "a bar over each training run's steps (throughput, ETA), for models trained "
              "together one bar for the group", shown="on when stderr is a terminal and "
              "--progress is on, else off")
    note: str = option("", "what the preset is for, printed with the results",
                       shown="the preset's description, listed under presets below")

    # Paragraphs of --help's epilog (subclasses add theirs).
    NOTES: ClassVar[tuple[str, ...]] = ()
    # The option behind each ``arm_settings()`` value an arm text can override.
    ARM_SETTING_FLAGS: ClassVar[dict[str, str]] = {
        "reg": "--reg", "delta": "--delta", "clip_norm": "--clip-norm"}

    def arm_settings(self) -> dict:
        """The values arm options take from these settings unless an arm text
        sets them, by ``gujax.arms.Option.setting`` key."""
        releases = ((self.normalisation_noise,) * 2
                    if self.normalisation == "private" else ())
        return {"reg": self.reg, "delta": self.delta, "clip_norm": self.clip_norm,
                "releases": releases}

    def check(self) -> None:
        """Checks across fields (``ValueError``), once the command line is
        applied and before any compute. Subclasses extend it."""
        try:                            # epochs, batch size, learning rate, momentum, ...
            train_config(self)
        except ValueError as err:
            raise ValueError(str(err).removeprefix("TrainConfig.")) from None
        checks.seed(self.seed)
        for kind in ARM_KINDS.values():     # the settings' arm values are valid
            arm_defaults(kind.name, self)
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


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """The settings base of a benchmark run through ``experiments.cli.main``:
    ``preset`` and ``note`` and the interface cli uses (``NOTES``,
    ``ARM_SETTING_FLAGS``, ``check``, ``record``). Subclasses add their fields
    (``cli.option``) and name the integer ones in ``MINIMUMS``."""
    preset: str = option("", "the preset these settings came from (--preset)", cli=False)
    note: str = option("", "what the preset is for, printed with the results",
                       shown="the preset's description, listed under presets below")

    NOTES: ClassVar[tuple[str, ...]] = ()
    ARM_SETTING_FLAGS: ClassVar[dict[str, str]] = {}
    # Integer fields (or tuples of them, one or more values) -> their minimum.
    MINIMUMS: ClassVar[dict[str, int]] = {}

    def check(self) -> None:
        """``ValueError`` for an integer field below its minimum (``MINIMUMS``)."""
        for name, minimum in self.MINIMUMS.items():
            flag, values = "--" + name.replace("_", "-"), getattr(self, name)
            if isinstance(values, tuple) and not values:
                raise ValueError(f"{flag} needs one or more values")
            for value in values if isinstance(values, tuple) else (values,):
                checks.positive_int(value, flag, minimum=minimum)

    def record(self) -> dict:
        """The settings as ``run.json`` and the results file record them."""
        return dataclasses.asdict(self)



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
    arms_apart: every arm is trained, stored and attacked on its own (its
      shadow models under shadow/<arm>/, checked against their own settings,
      and arms/<arm>.json), so a resumed run may change ``--arms``: a kept
      arm is reused, a new one trained, a dropped one left out of the report
      (its files stay). Every other setting must still match.
    choices: field -> the values of its ``choices`` this experiment offers
      (digits: no WideResNet, no scattering); an option left with one value,
      or that ``needs`` a value no longer offered, is not an option here
      (``offered_fields``).
    """
    name: str
    description: str
    presets: Mapping[str, Settings]
    default_preset: str = "default"
    results_name: str | None = None
    resumable: bool = False
    arms_apart: bool = False
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.default_preset not in self.presets:
            raise ValueError(f"default preset {self.default_preset!r} is not among "
                             f"{sorted(self.presets)}")
        if len({type(p) for p in self.presets.values()}) != 1:
            raise ValueError("every preset of an experiment must be of one Settings class")
        for name, offered in self.choices.items():
            for preset, settings in self.presets.items():
                values = getattr(settings, name)
                if any(v not in offered for v in (values if isinstance(values, tuple)
                                                  else (values,))):
                    raise ValueError(f"preset {preset}'s {name} {values!r} is not among the "
                                     f"offered choices {offered}")

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
    """A boolean option, a switch: ``--name`` (on) or ``--no-name`` (off),
    shown so by --help. ``--name true|false`` (and ``--name=false``) is read
    too (``_switch_values``), so older command lines still work."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self):
        return " | ".join(self.option_strings)


def _switch_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with each switch's value folded into the switch: ``--augment
    false`` and ``--augment=false`` -> ``--no-augment``, ``--augment true``
    -> ``--augment``. A switch takes nothing else (there are no positional
    arguments): ``--augment maybe`` is an error."""
    switches = {s for a in parser._actions if isinstance(a, _Flag) for s in a.option_strings}
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name not in switches or arg == "--":
            out.append(arg)
            if arg == "--":
                out += rest
                break
            continue
        if not eq and rest and not rest[0].startswith("-"):
            value, eq = rest.pop(0), "="
        if not eq:
            out.append(name)
            continue
        if name.startswith("--no-"):
            parser.error(f"argument {name}: takes no value (got {value!r})")
        try:
            on = _parse_bool(value)
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {name}: {err}")
        out.append(name if on else "--no-" + name[2:])
    return out


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _option_fields(cls: type[Settings]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every field that is a command-line option."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _choices(field: dataclasses.Field, experiment: Experiment) -> tuple | None:
    """The values of ``field`` this experiment offers (None: any)."""
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    return tuple(experiment.choices.get(field.name, choices))


def offered_fields(experiment: Experiment) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of the options this experiment offers: every
    command-line field but one restricted to a single value
    (``Experiment.choices``) or one that ``needs`` a value its field cannot
    take here (digits: no ``--depth``, which needs ``--model wrn``)."""
    fields = _option_fields(experiment.settings_class)
    by_name = {f.name: f for f, _ in fields}
    memo: dict[str, bool] = {}

    def possible(name: str) -> set:
        field = by_name.get(name)
        if field is not None and offers(name):
            choices = _choices(field, experiment)
            if choices is not None:
                return set(choices)
        values = set()
        for preset in experiment.presets.values():     # fixed here: the presets' values
            value = getattr(preset, name)
            values |= set(value) if isinstance(value, tuple) else {value}
        return values

    def offers(name: str) -> bool:
        if name not in memo:
            field = by_name[name]
            needs, choices = field.metadata.get("needs"), _choices(field, experiment)
            memo[name] = ((needs is None or needs[1] in possible(needs[0]))
                          and (choices is None or len(choices) > 1))
        return memo[name]

    return [(f, hint) for f, hint in fields if offers(f.name)]


def _field_help(field: dataclasses.Field, experiment: Experiment) -> str:
    """The field's description, its valid values (those the experiment
    offers, each described where ``choice_help`` says) and its default (and
    how the other presets differ)."""
    text = field.metadata["help"]
    choices = _choices(field, experiment)
    described = field.metadata.get("choice_help") or {}
    if choices:
        text += ", one of " if described else "; one of "
        text += ", ".join(f"{c} ({described[c]})" if c in described else str(c)
                          for c in choices)
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
    fields = {f.name for f, _ in offered_fields(experiment)}
    if "arms" in fields:
        lines += ["", "arms (--arms, one or more): kind[:key=value,...], for example"]
        for kind in ARM_KINDS.values():
            lines.append(_paragraph(f"{kind.example:18s} {kind.summary}"))
        for kind in ARM_KINDS.values():
            keys = [f"{o.name} (alias {o.alias})" if o.alias else o.name
                    for o in kind.all_options() if o.text]
            flags = experiment.settings_class.ARM_SETTING_FLAGS
            filled = [f"{o.name} from {flags[o.setting]}"
                      for o in kind.options if o.text and o.setting in flags]
            lines.append(_paragraph(f"{kind.name} keys: {', '.join(keys)}"
                                    + (f"; unset: {', '.join(filled)}" if filled else "")))
        lines.append(_paragraph("relative=true (the default) reads reg as rho in lam = rho "
                                "trace(K) / B, relative=false as lam itself. Several keys: "
                                "dpsgd:eps=1,delta=1e-6 or censor:tau=4,reg=0.3,lr=0.05."))
    for note in experiment.settings_class.NOTES:
        lines += ["", textwrap.fill(note, 79)]
    switches = [f.name.replace("_", "-") for f, hint in offered_fields(experiment)
                if _bool_hint(hint)]
    if switches:
        lines += ["", textwrap.fill(
            f"Switches: --{switches[0]} turns it on, --no-{switches[0]} off (--{switches[0]} "
            "true|false is read too).", 79)]
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
                     allow_abbrev=False,
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
    for field, hint in offered_fields(experiment):
        kwargs = dict(dest=field.name, default=None,
                      help=_field_help(field, experiment).replace("%", "%%"))
        flag = "--" + field.name.replace("_", "-")
        if _bool_hint(hint):
            parser.add_argument(flag, "--no-" + flag[2:], action=_Flag, **kwargs)
            continue
        hint = _optional_inner(hint)
        if typing.get_origin(hint) is tuple:
            hint, kwargs["nargs"] = typing.get_args(hint)[0], "+"
        parser.add_argument(flag, type=field.metadata["parse"] or hint,
                            choices=_choices(field, experiment), **kwargs)
    return parser


def _optional_inner(hint):
    """X for ``X | None``, else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _bool_hint(hint) -> bool:
    return _optional_inner(hint) is bool


def parse_command_line(argv, experiment: Experiment) -> Run:
    """The chosen preset with every option given applied, checked
    (``Settings.check``): a bad value raises ``UsageError``, before any
    compute."""
    argv = tuple(sys.argv[1:] if argv is None else argv)
    parser = build_parser(experiment)
    args = parser.parse_args(_switch_values(argv, parser))
    # dp_accounting's RDP search logs a warning per skipped order; say nothing.
    absl_logging.set_verbosity(absl_logging.ERROR)
    changes = {}
    for field, hint in offered_fields(experiment):
        value = getattr(args, field.name)
        if value is not None:
            changes[field.name] = tuple(value) if typing.get_origin(hint) is tuple else value
    settings = dataclasses.replace(experiment.presets[args.preset], **changes)
    try:
        settings.check()
    except ValueError as err:
        raise UsageError(str(err)) from None
    # --progress false silences every bar, the library's (data decoding,
    # scattering) included; plain lines or a bar is gujax.progress's choice.
    progress.set_enabled(getattr(settings, "progress", True))
    out = args.out or os.path.join(
        "results", f"{experiment.results_name or experiment.name}-{args.preset}")
    return Run(settings, out, bool(getattr(args, "resume", False)), args.overwrite, argv)


# ----------------------------------------------------------------------------
# The output folder and the command line's life cycle.

# What marks a folder as a run's (so --overwrite may delete it): the file
# open_out writes, or what the experiments wrote before there was one.
RUN_FILE = "run.json"
_RUN_MARKS = (RUN_FILE, "results.json", "summary.txt", "shadow")
# The lock of a run's folder (one writer per --out): held, with fcntl.flock,
# from check_out (or open_out, for a folder it creates) to the end of main,
# and released by the system if the process dies, so a killed run never
# leaves a stale lock. The file itself stays; it does not make a folder used.
LOCK_FILE = ".lock"
# Settings that change how a run is shown or scheduled, never its results: a
# resumed run may change them; any other setting in run.json must match.
RESUME_IGNORES = frozenset({"progress", "step_progress", "note", "checkpoint_every",
                            "models_at_once"})

_locks: dict[str, int] = {}          # realpath of an --out -> the fd holding its lock


def _entries(out: str) -> list[str]:
    return [name for name in os.listdir(out) if name != LOCK_FILE]


def _check_creatable(out: str) -> None:
    """``UsageError`` if ``out`` cannot be a folder: it or one of its
    parents is a file, or the nearest existing parent is not writable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out} cannot be created: {parent} is a file, not a folder")
    if not os.path.isdir(out) and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be created: no permission to write in {parent}")


def lock_out(out: str) -> None:
    """Take ``out``'s lock (``LOCK_FILE``, held until ``unlock_out`` or the
    process ends) or raise ``UsageError`` naming the run that holds it."""
    key = os.path.realpath(out)
    if key in _locks or fcntl is None:
        return
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UsageError(f"--out {out} cannot be used: {err.strerror} ({path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"another run (process {holder})" if holder.isdigit() else "another run"
        raise UsageError(f"--out {out} is in use: {who} is writing to it; wait for it to "
                         "end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[key] = fd


def unlock_out(out: str) -> None:
    """Release ``out``'s lock if this process holds it."""
    fd = _locks.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)


def _resume_record(record: dict, ignored: set[str] = frozenset()) -> dict:
    return {k: v for k, v in json.loads(json.dumps(record)).items()
            if k not in RESUME_IGNORES and k not in ignored}


def finished_arm(path: str, remedy: str) -> tuple[dict, list[dict]]:
    """(summary, units) of an arm a resumed run keeps, as ``arms/<arm>.json``
    holds them; ``files.CorruptFile`` naming ``remedy`` (what deleting the
    file redoes) if it is damaged."""
    saved = files.read_json(path, remedy)
    if not (isinstance(saved, list) and len(saved) == 2 and isinstance(saved[0], dict)
            and isinstance(saved[1], list)):
        raise files.CorruptFile(path, "not an arm's [summary, units]", remedy)
    return saved[0], saved[1]


def check_resume(run: Run, experiment: Experiment) -> None:
    """``ResumeMismatch`` naming every setting that differs ("config.epochs
    (saved 3, now 4)") between the run in ``run.out`` (its ``run.json``) and
    this one, but those in ``RESUME_IGNORES`` (and ``arms`` where the
    experiment keeps its arms apart, ``Experiment.arms_apart``);
    ``CorruptFile`` if run.json cannot be read. Nothing to check in a folder without run.json."""
    path = os.path.join(run.out, RUN_FILE)
    if not os.path.exists(path):
        return
    remedy = "it records the run's settings: pass --overwrite to start the run over"
    saved = files.read_json(path, remedy)
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise CorruptFile(path, "it holds no settings record", remedy)
    ignored = {"arms"} if experiment.arms_apart else set()
    changes = setting_differences(
        {"experiment": saved.get("experiment"),
         "config": _resume_record(saved["settings"], ignored)},
        {"experiment": experiment.name, "config": _resume_record(run.settings.record(), ignored)})
    if changes:
        raise ResumeMismatch(run.out, changes)


def check_out(run: Run, experiment: Experiment) -> None:
    """Refuse an ``--out`` that cannot be a folder, that another run holds
    (``lock_out``) or that holds files unless --resume or --overwrite says
    what to do with them (``UsageError``); --overwrite deletes only a run's
    folder, --resume only continues a run of the same settings
    (``check_resume``). An existing folder is locked from here on."""
    out = run.out
    _check_creatable(out)
    if not os.path.isdir(out):
        return
    if not _entries(out):
        lock_out(out)
        return
    if run.resume:
        lock_out(out)
        check_resume(run, experiment)
        return
    if run.overwrite:
        if not any(os.path.exists(os.path.join(out, m)) for m in _RUN_MARKS):
            raise UsageError(f"--out {out} holds files that are not an experiment's run (no "
                             f"{RUN_FILE}); refusing to delete them: choose another --out")
        lock_out(out)
        return
    choices = ("--resume to continue the run in it or --overwrite to replace it"
               if experiment.resumable else "--overwrite to replace what it holds (this "
                                            "experiment cannot resume)")
    raise UsageError(f"--out {out} is not empty; pass {choices}, or choose another --out")


def open_out(run: Run, experiment: Experiment) -> None:
    """Create ``run.out`` and take its lock (deleting the old run first with
    --overwrite), mark it as a run's folder (``run.json``: the experiment,
    the command, the settings) and persist compiled steps under the gujax
    cache: every model of an arm has the same step (same shapes), so only
    the first pays for compilation."""
    try:
        os.makedirs(run.out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {run.out} cannot be created: {err.strerror}"
                         + (f" ({err.filename})" if err.filename else "")) from None
    lock_out(run.out)
    if not (run.resume or run.overwrite) and _entries(run.out):
        # Filled since check_out, by a run that has ended since.
        check_out(run, experiment)
    if run.overwrite:
        for name in _entries(run.out):
            path = os.path.join(run.out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) \
                else os.remove(path)
    files.write_json(os.path.join(run.out, RUN_FILE),
                     {"experiment": experiment.name, "command": _command(experiment, run.argv),
                      "settings": run.settings.record()}, indent=1)
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
    if isinstance(err, CorruptFile):
        text = str(err)
        return text if "--overwrite" in text else (
            f"{text}; then run again with --resume, or start over with --overwrite")
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

    Bad input (bad option values, arms, data not found, a resume mismatch,
    a damaged file, an unusable or locked ``--out``): one line ``error: ...``
    on stderr and ``SystemExit(2)``. The folder's lock is released on the
    way out, however ``main`` ends. Ctrl-C: one line
    saying how to resume and ``SystemExit(130)``. Anything else is a bug and
    shows its traceback.
    """
    argv = tuple(sys.argv[1:] if argv is None else argv)
    opened, run = False, None
    streams = sys.stdout, sys.stderr
    # --progress false holds for this run only: a caller in the same process
    # (a notebook, a test) gets its own setting back.
    bars = progress.enabled()
    sys.stdout, sys.stderr = _PipeGuard(sys.stdout), _PipeGuard(sys.stderr)
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
    except (UsageError, ResumeMismatch, DataNotFound, CorruptFile) as err:
        _fail(f"error: {user_message(err)}", 2)
    except KeyboardInterrupt:
        if experiment.resumable:
            _fail(f"interrupted; to continue, run: {_command(experiment, argv, '--resume')}",
                  130)
        where = f"what it wrote in {run.out} is incomplete; run it again with --overwrite" \
            if opened else "nothing was written"
        _fail(f"interrupted ({experiment.name} cannot resume): {where}", 130)
    finally:
        progress.set_enabled(bars)
        if run is not None:
            unlock_out(run.out)
        for guard in (sys.stdout, sys.stderr):
            if isinstance(guard, _PipeGuard):
                guard.flush()
        sys.stdout, sys.stderr = streams


class _PipeGuard:
    """A text stream (stdout, stderr) that goes quiet once its reader has
    gone (``... | head``): the run goes on and ends normally, its output
    dropped (the descriptor then points to os.devnull), no BrokenPipeError."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text):
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self):
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self):
        self._gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


# ----------------------------------------------------------------------------
# Arms.

# Budgets for the censor/clip arms that set none (nats), by
# ``gujax.arms.Option.threshold`` name: budget (censor, per-example total D_j)
# and max_step (clip, per-step d_j); ``gujax.transforms.propose_thresholds``
# proposes them from a monitor run's ledger.
from gujax.transforms import Thresholds  # noqa: E402  (re-exported)


def arm_kind_of(text: str) -> str:
    """The kind of an arm text: ``"censor"`` for ``"censor:tau=8"``."""
    return text.partition(":")[0].strip()


def arm_defaults(kind: str, settings: Settings, thresholds: Thresholds | None = None) -> dict:
    """What an arm of ``kind`` takes from ``settings`` (and ``thresholds``)
    unless its text sets it: derived from the kind's options."""
    values = settings.arm_settings()
    defaults = {}
    for o in arm_kind(kind).options:
        if o.setting in values:
            defaults[o.name] = values[o.setting]
        if o.threshold is not None and thresholds is not None:
            defaults[o.name] = getattr(thresholds, o.threshold)
    return defaults


def make_arm(text: str, settings: Settings, thresholds: Thresholds | None = None) -> Arm:
    """The ``gujax.arms.Arm`` of an arm text. What the text leaves unset comes
    from the settings and, for a censor/clip arm without a budget, from
    ``thresholds``."""
    spec = arm_kind(arm_kind_of(text))
    defaults = arm_defaults(spec.name, settings, thresholds)
    try:
        return parse_arm(text, **defaults)
    except ValueError:
        missing = [o.name for o in spec.options if o.threshold and o.name not in defaults]
        if missing and thresholds is None:
            parse_arm(text, **defaults, **{m: 1.0 for m in missing})  # something else wrong?
            raise ValueError(f"arm {text!r} sets no {missing[0]}: give {missing[0]}=... or "
                             "the thresholds from a plain sgd run's ledger") from None
        raise


def check_arms(texts: Sequence[str], settings: Settings, *, by_name: bool) -> None:
    """Arms must differ: by ``Arm.name`` (``by_name``; every arm then needs
    its budgets) or by text."""
    keys = [make_arm(t, settings).name for t in texts] if by_name else list(texts)
    if len(set(keys)) != len(keys):
        raise ValueError(f"two arms have the same name: {keys}")


# ----------------------------------------------------------------------------
# The trainer's configuration.

def step_progress(settings: Settings) -> bool:
    """Whether training shows a bar over its steps: ``step_progress`` when
    set, else with ``progress`` on and stderr a terminal."""
    if settings.step_progress is not None:
        return settings.step_progress
    return settings.progress and sys.stderr.isatty()


def train_config(settings: Settings, *, epochs: int | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a run of ``settings`` (evaluated only at its
    end); ``gujax.arms.train_runs`` sets each run's seed and the arm's batch
    size, learning rate and sampler."""
    epochs = epochs or settings.epochs
    return TrainConfig(
        epochs=epochs, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, optimizer=settings.optimizer,
        momentum=settings.momentum, seed=settings.seed, eval_every=epochs,
        checkpoint_every=settings.checkpoint_every,
        augment=random_crop_flip if settings.augment else None,
        progress=step_progress(settings))
