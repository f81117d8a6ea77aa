"""A study: every setup x learning rate x seed of a config, run under identical conditions, then one report.

``recipes/compare_optimizers.py`` is :func:`main`. A config (YAML) has ``common`` arguments of the fine-tuning
recipe shared by every run, ``seeds``, ``target_accuracy``, a ``title``, optionally a ``sweep`` of one argument,
and ``optimizers``: one entry per setup, with its ``learning_rate`` grid (or, for Lion, ``scale_from_adamw``),
``weight_decay``, ``optim`` and ``args``. Every key is checked: an unknown one is an error naming it.

Every run is parsed before the first one starts, so a bad argument anywhere stops the study before any
training. The study owns what separates its runs (their folders, names, seeds, optimizers, lrs, weight decays,
and whether each resumes): extra arguments after ``--`` or in the config that would set those are refused, and
so are extras that would override a setup's own ``args`` or the swept argument (the folders and the report
would keep the old labels), repeated seeds or lrs, lrs that print alike, and names that are not one folder name.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from lion_hf.experiments.arguments import (
    RecipeArgumentError,
    RecipeParser,
    config_defaults,
    explicit_options,
    field_option_names,
    parse_recipe_args,
    recipe_parser,
)
from lion_hf.experiments.checkpoints import (
    CheckpointError,
    checkpoint_folders,
    last_complete_checkpoint,
    recorded_arguments,
    trajectory_differences,
)
from lion_hf.experiments.finetune import is_main_process, run, run_arguments, say
from lion_hf.experiments.records import RunRecord
from lion_hf.experiments.report import plural, write_report, write_sweep_report
from lion_hf.experiments.tracking import ProgressCallback, StudyClock

__all__ = ["StudyArguments", "StudyConfigError", "load_config", "main", "optimizer_grid", "run_folder", "run_status"]

CONFIG_KEYS = ("title", "target_accuracy", "seeds", "common", "sweep", "optimizers")
SETUP_KEYS = ("optim", "learning_rate", "weight_decay", "scale_from_adamw", "args")
SWEEP_KEYS = ("argument", "values", "label")
# Batch-size arguments: a sweep over them is reported against the run's global batch size.
BATCH_ARGUMENTS = ("per_device_train_batch_size", "gradient_accumulation_steps")
# Run arguments the study sets itself, run by run: set anywhere else they would send every run to one folder,
# give them one seed, one optimizer or one lr, or override the study's reuse/resume decision.
STUDY_OWNED = {
    "output_dir": "each run gets its own folder under the study's --output_dir (given before `--`)",
    "logging_dir": "each run logs into its own folder",
    "run_name": "each run is named by its setup (the keys of the config's optimizers)",
    "seed": "the study's seeds come from --seeds or the config's seeds",
    "optim": "each setup's optimizer is its optimizers entry (optim: ...)",
    "learning_rate": "each setup's lr grid is its optimizers entry (learning_rate: [...])",
    "weight_decay": "each setup's weight decay is its optimizers entry (weight_decay: ...)",
    "resume_from_checkpoint": "the study resumes each unfinished run by itself (--rerun starts every run again)",
    "overwrite_output_dir": "the study decides per run (--rerun starts every run again)",
    "target_accuracy": "the study's target is the config's top-level target_accuracy, which its report uses",
}


class StudyConfigError(RecipeArgumentError):
    """A study config or command line the study cannot run."""


@dataclass
class StudyArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where the runs and the report go "
                                                                    "(default: runs/<config name>)."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Override the config's seeds."})
    rerun: bool = field(default=False, metadata={"help": "Run every grid point again, even those with a finished "
                                                         "run.json."})
    report_only: bool = field(default=False, metadata={"help": "Run nothing: write the report from the runs that "
                                                               "have finished so far."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep each run's checkpoint-* folders after it "
                                                                    "finishes (default: deleted)."})
    progress_seconds: float = field(default=30.0, metadata={"help": "Seconds between progress lines (step, time "
                                                                    "left for the run and the study)."})


# ----------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------


def _unknown_keys(where: str, found: Any, allowed: Sequence[str]) -> None:
    import difflib

    unknown = [str(k) for k in found if k not in allowed]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise StudyConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                               f"allowed: {', '.join(allowed)}")


def _owned(where: str, keys: Any) -> None:
    owned = [k for k in keys if str(k).replace("-", "_") in STUDY_OWNED]
    if owned:
        raise StudyConfigError(f"{where}: {', '.join(owned)} cannot be set there: "
                               + "; ".join(STUDY_OWNED[str(k).replace('-', '_')] for k in owned))


def load_config(path: str | Path) -> dict[str, Any]:
    """The config at ``path``, its structure and every key checked (run arguments by the recipe's parser)."""
    from lion_hf.experiments.arguments import load_config_file, refuse_single_run_config

    config = load_config_file(path)
    refuse_single_run_config(config, path)
    _unknown_keys(str(path), config, CONFIG_KEYS)
    if not isinstance(config.get("optimizers"), dict) or not config["optimizers"]:
        raise StudyConfigError(f"{path}: needs an 'optimizers' mapping (e.g. adamw: {{learning_rate: [5e-5]}})")
    common = config.get("common") or {}
    parser = recipe_parser()
    _owned(f"{path}: common", common)
    config_defaults(parser, common, f"{path}: common")
    for name, spec in config["optimizers"].items():
        if isinstance(spec, dict):
            _unknown_keys(f"{path}: optimizers.{name}", spec, SETUP_KEYS)
            if isinstance(spec.get("args"), dict):
                _owned(f"{path}: optimizers.{name}.args", spec["args"])
                config_defaults(parser, spec["args"], f"{path}: optimizers.{name}.args")
    sweep = config.get("sweep")
    if sweep is not None:
        if (not isinstance(sweep, dict) or not isinstance(sweep.get("argument"), str)
                or not isinstance(sweep.get("values"), list) or not sweep["values"]):
            raise StudyConfigError(f"{path}: sweep needs an 'argument' name and a non-empty 'values' list "
                                   "(e.g. sweep: {argument: per_device_train_batch_size, values: [32, 256]})")
        _unknown_keys(f"{path}: sweep", sweep, SWEEP_KEYS)
        _owned(f"{path}: sweep.argument", [sweep["argument"]])
        config_defaults(parser, {sweep["argument"]: sweep["values"][0]}, f"{path}: sweep.argument")
        if len(set(map(str, sweep["values"]))) != len(sweep["values"]):
            raise StudyConfigError(f"{path}: sweep.values has repeated values {sweep['values']}")
        if sweep["argument"] in common:
            raise StudyConfigError(f"{path}: {sweep['argument']!r} is swept; remove it from common")
    return config


def _check_optim(name: str, optim: str) -> None:
    from transformers.training_args import OptimizerNames

    known = {"lion", "adamw", *(o.value for o in OptimizerNames)}
    if optim not in known:
        raise StudyConfigError(f"optimizers.{name}: unknown optimizer {optim!r}; optim must be 'lion', 'adamw' or "
                               "one of HF's optimizer names (e.g. 'lion_32bit', HF's bitsandbytes Lion)")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _lr_list(name: str, value: Any, sweep_value: Any) -> list[float]:
    """A learning-rate grid: a list (or one value), or, under a sweep, a mapping from each swept value to its list."""
    if isinstance(value, dict):
        if sweep_value is None:
            raise StudyConfigError(f"optimizers.{name}.learning_rate: a mapping of grids needs a sweep section")
        by_value = {str(k): v for k, v in value.items()}
        if str(sweep_value) not in by_value:
            raise StudyConfigError(f"optimizers.{name}.learning_rate: no grid for swept value {sweep_value} "
                                   f"(grids given for {sorted(by_value)})")
        value = by_value[str(sweep_value)]
    try:
        lrs = [float(lr) for lr in _as_list(value)]
    except (TypeError, ValueError):
        raise StudyConfigError(f"optimizers.{name}.learning_rate: {value!r} is not a list of numbers") from None
    if not lrs:
        raise StudyConfigError(f"optimizers.{name}: the learning_rate grid is empty")
    return lrs


def _distinct(where: str, what: str, values: Sequence[Any], label=str) -> None:
    """``values`` are distinct, and stay distinct as their ``label`` prints them (in folder names, progress
    lines and the report): a repeat would train into one folder and count as an independent run."""
    seen: dict[str, Any] = {}
    for value in values:
        shown = label(value)
        if shown in seen:
            same = seen[shown] == value
            raise StudyConfigError(
                f"{where}: {what} {seen[shown]!r} and {value!r} "
                + ("are the same value given twice" if same else f"both print as {shown}")
                + ": they would train into one run folder and be counted as two runs. Remove the repeat"
                + ("." if same else " (or give values that differ in their first 6 significant digits).")
            )
        seen[shown] = value


def _lr_label(lr: float) -> str:
    return f"{lr:g}"


def _path_name(where: str, name: str) -> str:
    """``name`` as one folder name inside the study's folder (never a path that leaves it)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise StudyConfigError(f"{where}: {name!r} becomes a run folder's name, so it may not be empty, start with "
                               "'.', or contain '/' or '\\'")
    return name


def optimizer_grid(config: dict[str, Any]) -> list[tuple[str, str, float, float, dict[str, Any]]]:
    """(setup, optimizer, lr, weight_decay, run arguments) for every grid point.

    Each entry of ``optimizers`` is a setup: its key names it in the report; ``optim`` (default:
    the key) is ``lion``, ``adamw`` or any of HF's optimizer names (e.g. ``lion_32bit``); ``args``
    are extra arguments for its runs (e.g. ``model_dtype: bfloat16``). Lion's grid may be scaled
    from AdamW's (``scale_from_adamw: k``). With a ``sweep`` section (``argument``, ``values``)
    every setup runs at every value, with its own lr grid per value: ``learning_rate`` then maps
    each value to its grid (a plain list means the same grid everywhere), and the swept argument
    joins the run arguments.
    """
    specs = config["optimizers"]
    sweep = config.get("sweep")
    sweep_values = sweep["values"] if sweep else [None]
    grid = []
    if sweep:
        _distinct("sweep.values", "values", sweep["values"])
        if "label" in sweep:
            _path_name("sweep.label", str(sweep["label"]))
    for name, spec in specs.items():
        _path_name(f"optimizers.{name}", str(name))
        if not isinstance(spec, dict) or not ("learning_rate" in spec or "scale_from_adamw" in spec):
            raise StudyConfigError(f"optimizers.{name}: needs a learning_rate list (or, for lion, scale_from_adamw)")
        optim = spec.get("optim", name)
        _check_optim(name, optim)
        extra = spec.get("args", {})
        if not isinstance(extra, dict):
            raise StudyConfigError(f"optimizers.{name}.args: expected a mapping of run arguments, "
                                   f"got {type(extra).__name__}")
        if sweep and {sweep["argument"], sweep["argument"].replace("_", "-")} & set(extra):
            raise StudyConfigError(f"optimizers.{name}.args sets {sweep['argument']}, the swept argument: the sweep "
                                   f"would override it at every value {sweep['values']}; remove it from args")
        if "scale_from_adamw" in spec and "adamw" not in specs:
            raise StudyConfigError(f"optimizers.{name}.scale_from_adamw needs an adamw entry to scale from")
        for value in sweep_values:
            if "scale_from_adamw" in spec:
                k = float(spec["scale_from_adamw"])
                lrs = [lr / k for lr in _lr_list("adamw", specs["adamw"]["learning_rate"], value)]
                wd = float(specs["adamw"].get("weight_decay", 0.0)) * k
            else:
                lrs = _lr_list(name, spec["learning_rate"], value)
                wd = float(spec.get("weight_decay", 0.0))
            _distinct(f"optimizers.{name}.learning_rate" + ("" if sweep is None else f" at {sweep['argument']}"
                                                              f"={value}"), "learning rates", lrs, _lr_label)
            run_args = extra if sweep is None else {**extra, sweep["argument"]: value}
            grid += [(name, optim, lr, wd, run_args) for lr in lrs]
    return grid


def run_folder(name: str, lr: float, seed: int, sweep: dict[str, Any] | None, run_args: dict[str, Any]) -> str:
    swept = "" if sweep is None else f"_{sweep.get('label', sweep['argument'])}{run_args[sweep['argument']]}"
    return _path_name(f"run folder of setup {name}", f"{name}{swept}_lr{_lr_label(lr)}_seed{seed}")


def run_status(run_dir: Path, parsed: tuple) -> tuple[str, RunRecord | None]:
    """("finished", record) when ``run_dir/run.json`` exists and was written with the same run
    arguments; ("resume", None) when its last complete checkpoint was trained under the same arguments up to
    bookkeeping (or is unreadable: the run then says what is wrong with it); else ("new", None)."""
    arguments = run_arguments(*parsed[:3])
    record_file = run_dir / "run.json"
    if record_file.is_file():
        try:
            record = RunRecord.read(record_file)
        except ValueError:  # a record from an older schema, or damaged: run again
            record = None
        if record is not None and record.run_args == arguments:
            return "finished", record
    last = last_complete_checkpoint(run_dir)
    if last is not None:
        try:
            saved = recorded_arguments(last)
            # Other bookkeeping (how often it logs or saves) still resumes: plan_output_dir notes the change.
            if saved is not None and not trajectory_differences(saved, arguments):
                return "resume", None
        except ValueError:
            return "resume", None
    return "new", None


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def study_parser(default_config: str | Path, prog: str | None = None,
                 description: str | None = None) -> HfArgumentParser:
    parser = RecipeParser(StudyArguments, prog=prog, description=description, allow_abbrev=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(default_config),
                        help=f"YAML config (default: {default_config})")
    parser.epilog = ("Arguments after a lone `--` go to every run of recipes/finetune_sentiment.py "
                     "(e.g. -- --max_steps 50); the study's own options go before it.")
    return parser


def _parse_study_args(parser: HfArgumentParser, argv: list[str]) -> tuple[StudyArguments, str, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    namespace, unknown = parser.parse_known_args(argv[:cut])
    if unknown:
        run_options = set(field_option_names())
        for_runs = [u for u in unknown if u.startswith("--") and u[2:].split("=", 1)[0] in run_options]
        if for_runs:
            raise StudyConfigError(f"{' '.join(for_runs)}: argument{'s' if len(for_runs) > 1 else ''} of each run, "
                                   f"not of the study: put {'them' if len(for_runs) > 1 else 'it'} after `--` "
                                   f"(compare_optimizers.py CONFIG -- {' '.join(for_runs)} VALUE)")
        raise StudyConfigError(f"unknown argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)} "
                               "(names are matched exactly; --help lists them)")
    values = vars(namespace)
    config = values.pop("config")
    extra = argv[cut + 1:]
    owned = [k for k in explicit_options(extra) if k in STUDY_OWNED]
    if owned:
        raise StudyConfigError("after `--`: " + "; ".join(f"--{k} would be the same for every run, but "
                                                          f"{STUDY_OWNED[k]}" for k in owned))
    return StudyArguments(**values), config, extra


@dataclass
class PlannedRun:
    setup: str
    optim: str
    learning_rate: float
    weight_decay: float
    seed: int
    setup_args: dict[str, Any]
    run_dir: Path
    parsed: tuple
    status: str = "new"
    record: RunRecord | None = None

    def describe(self, sweep: dict[str, Any] | None) -> str:
        swept = "" if sweep is None else f" {sweep['argument']}={self.setup_args[sweep['argument']]}"
        return f"{self.setup}{swept} lr={self.learning_rate:g} wd={self.weight_decay:g} seed={self.seed}"


def plan_study(config: dict[str, Any], out: Path, seeds: list[int], extra: list[str],
               rerun: bool = False) -> list[PlannedRun]:
    """Every run of the study, parsed (so a bad argument stops the study before anything runs), seed by seed: a
    study stopped midway (or reported with --report_only) has every grid point at the first seeds rather than
    some grid points at every seed."""
    common = {**(config.get("common") or {}), "target_accuracy": float(config.get("target_accuracy", 0.85))}
    sweep = config.get("sweep")
    _distinct("seeds", "seeds", seeds)
    grid = optimizer_grid(config)
    _check_extras(grid, sweep, extra)
    planned = []
    folders: dict[Path, str] = {}
    for seed in seeds:
        for name, optim, lr, wd, setup_args in grid:
            run_dir = out / run_folder(name, lr, seed, sweep, setup_args)
            point = f"{name} lr={lr!r} seed={seed}" + ("" if sweep is None else
                                                       f" {sweep['argument']}={setup_args[sweep['argument']]!r}")
            if run_dir in folders:  # what every check above is for: one folder per grid point
                raise StudyConfigError(f"grid points {folders[run_dir]} and {point} would both train into {run_dir}")
            folders[run_dir] = point
            values = {**common, **setup_args, "optim": optim, "learning_rate": lr, "weight_decay": wd,
                      "seed": seed, "run_name": name, "output_dir": str(run_dir)}
            parsed = parse_recipe_args(extra, config=values)
            item = PlannedRun(name, optim, lr, wd, seed, setup_args, run_dir, parsed)
            if not rerun:
                item.status, item.record = run_status(run_dir, parsed)
            planned.append(item)
    return planned


def _check_extras(grid: list, sweep: dict[str, Any] | None, extra: list[str]) -> None:
    """Arguments after ``--`` apply to every run, so they may not set what tells the runs apart: an argument of a
    setup's own ``args`` (its folder and report label would still name that setup) or the swept one."""
    given = explicit_options(extra)
    if not given:
        return
    parser = recipe_parser()
    if sweep is not None and sweep["argument"].replace("-", "_") in given:
        raise StudyConfigError(f"after `--`: --{sweep['argument']} {given[sweep['argument'].replace('-', '_')]} "
                               f"would override the swept argument (sweep.values {sweep['values']}): every run would "
                               "train at that value under folders and report rows naming the others")
    clashes = []
    for name, _, _, _, setup_args in grid:
        own = {k: v for k, v in setup_args.items() if sweep is None or k != sweep["argument"]}
        for dest, value in config_defaults(parser, own, f"optimizers.{name}.args").items():
            if dest in given and f"{name}.{dest}" not in {c[0] for c in clashes}:
                clashes.append((f"{name}.{dest}", f"--{dest} {given[dest]} would override optimizers.{name}.args."
                                                  f"{dest} ({value!r}) while its folders and report rows still say "
                                                  f"{name}"))
    if clashes:
        raise StudyConfigError("after `--`: " + "; ".join(c[1] for c in clashes) + ". Change the setup's args in the "
                               "config (or add a setup) instead.")


def main(argv: Sequence[str] | None = None, *, default_config: str | Path, description: str | None = None,
         prog: str | None = None) -> dict[str, Path]:
    """Run (or reuse, or resume) every run of a study and write its report; returns the report's paths.
    Called as a script (``argv`` None), a bad argument or config ends the process with its message and exit
    code 2, as argparse does, instead of a traceback."""
    as_script = argv is None
    parser = study_parser(default_config, prog=prog, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _study(parser, argv)
    except (RecipeArgumentError, CheckpointError) as exc:
        if not as_script:
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _study(parser: HfArgumentParser, argv: list[str]) -> dict[str, Path]:
    args, config_path, extra = _parse_study_args(parser, argv)
    config = load_config(config_path)
    out = Path(args.output_dir or f"runs/{Path(config_path).stem}")
    seeds = args.seeds or config.get("seeds", [0])
    target = float(config.get("target_accuracy", 0.85))
    sweep = config.get("sweep")
    planned = plan_study(config, out, seeds, extra, rerun=args.rerun)
    counts = {s: sum(p.status == s for p in planned) for s in ("finished", "resume", "new")}
    to_train = 0 if args.report_only else counts["resume"] + counts["new"]
    say(f"{plural(len(planned), 'run')} in {out}: {counts['finished']} finished earlier (reused), "
        f"{counts['resume']} to resume, {counts['new']} to start" + (" (--report_only: none runs)"
                                                                    if args.report_only else ""), prefix="compare")

    runs: list[RunRecord] = []
    trained = 0
    clock = StudyClock(len(planned))
    started = time.perf_counter()
    for index, item in enumerate(planned, start=1):
        label = f"run {index}/{len(planned)} {item.describe(sweep)}"
        say(f"{label}: {item.status}", prefix="compare")
        if item.record is None and args.report_only:
            continue
        record = item.record
        if record is None:
            model_args, data_args, training_args, run_args = item.parsed
            # "resume": continue from the last checkpoint of the same arguments; "new": from scratch, deleting
            # (once its inputs have loaded) what an earlier run of other arguments or a forced rerun left.
            training_args.resume_from_checkpoint = "true" if item.status == "resume" else None
            run_args.overwrite_output_dir = item.status == "new"
            trained += 1
            clock.remaining_after_current = to_train - trained
            began = time.perf_counter()
            record = run(model_args, data_args, training_args, run_args,
                         extra_callbacks=[ProgressCallback(label, args.progress_seconds, clock)])
            clock.durations.append(time.perf_counter() - began)
            if not args.keep_checkpoints and is_main_process():
                for checkpoint in checkpoint_folders(item.run_dir):  # the run's own folders, never a link
                    shutil.rmtree(checkpoint)
        say(f"  best eval accuracy {record.best_eval_accuracy:.4f} in {record.train_seconds:.0f} s", prefix="compare")
        runs.append(record)
    total = time.perf_counter() - started
    if not runs:
        raise StudyConfigError(f"no finished runs in {out} for this config (--report_only runs nothing)")
    if not is_main_process():
        return {}

    reused = counts["finished"]
    command = "python recipes/compare_optimizers.py " + " ".join(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    first = runs[0]
    ran = (f"Nothing ran: reused {plural(reused, 'finished run')} from an earlier invocation." if trained == 0 else
           f"{plural(trained, 'run')} took {total / 60:.1f} min"
           + (f"; reused {plural(reused, 'finished run')} from an earlier invocation." if reused else "."))
    model = f"Model: {first.model}{' + LoRA' if first.peft else ' (full fine-tune)'}; data: {first.data}; "
    worlds = sorted({r.world_size for r in runs})
    launched = "" if worlds == [1] else (  # the launcher is not in argv: say how many processes ran each run
        f", each run on {' or '.join(map(str, worlds))} processes (e.g. accelerate launch --multi_gpu "
        f"--num_processes {worlds[-1]})")
    notes = [
        f"Command: `{command.strip()}`{launched} ({time.strftime('%Y-%m-%d')}, {device}, {platform.machine()}, "
        f"torch {torch.__version__}). {ran}",
        model + f"{first.train_rows} train / {first.eval_rows} eval rows"
        + ("." if sweep is not None else f"; {plural(first.steps, 'optimizer step')} per run."),
        "Each setup's lr is the best of its grid by mean best-eval-accuracy, chosen on the eval set it is "
        "scored on (the same optimistic choice for every setup).",
        "Peak memory is " + ("CUDA max allocated" if torch.cuda.is_available() else
                             "the process's CPU RSS (model, data and tokenizer included), sampled at 20 Hz") + ".",
    ]
    if len(runs) < len(planned):
        notes.append(f"Partial: {len(runs)} of the study's {len(planned)} runs have finished.")
    title = config.get("title", "Lion vs AdamW")
    if sweep is not None:
        key = "global_batch_size" if sweep["argument"] in BATCH_ARGUMENTS else sweep["argument"]
        paths = write_sweep_report(runs, out, key, title=title, target_accuracy=target, notes=notes)
    else:
        paths = write_report(runs, out, title=title, target_accuracy=target, notes=notes)
    print((out / "report.md").read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths

