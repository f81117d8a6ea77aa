"""Lion vs AdamW under identical conditions: every optimizer x lr x seed, then one report.

    # The offline default (model and data from pip; about 4 minutes on 2 CPU cores):
    python recipes/compare_optimizers.py
    # SST-2 sentences from ../shared/data, 3 seeds, a small lr grid per optimizer:
    python recipes/compare_optimizers.py recipes/configs/sst2_local.yaml --output_dir runs/sst2
    # Under accelerate (each run uses every process):
    accelerate launch recipes/compare_optimizers.py recipes/configs/sst2_local.yaml

The config (YAML) has ``common`` arguments of ``recipes/finetune_sentiment.py`` shared by every
run, ``seeds``, ``target_accuracy``, and per optimizer a ``learning_rate`` list (the grid) and a
``weight_decay``. Lion may instead say ``scale_from_adamw: k`` to take AdamW's grid divided by k
and AdamW's weight decay times k (Chen et al.: 3-10x smaller lr, larger wd). Runs of one seed
share the data order and classifier-head init whatever the optimizer. Writes, in --output_dir,
one folder per run (``run.json``) and ``report.md``, ``report.json``, ``train_loss.png``,
``eval_accuracy.png``.

Rerunning the same command finishes a study: a run whose folder holds a ``run.json`` written
with the same arguments is reused, not rerun; one that stopped midway resumes from its last
checkpoint (configs save one with ``save_strategy: steps``), if that checkpoint was written with
the same arguments; any other run starts from scratch. ``--rerun`` runs everything again.
Checkpoints are deleted once a run finishes (``--keep_checkpoints`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_sentiment import (
    RUN_ARGS_FILE,
    dict_to_argv,
    has_option,
    is_main_process,
    last_complete_checkpoint,
    parse_args,
    run,
    run_arguments,
)

from lion_hf.experiments.records import RunRecord
from lion_hf.experiments.report import write_report, write_sweep_report

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "offline_default.yaml"


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("optimizers"), dict) or not config["optimizers"]:
        raise ValueError(f"{path}: needs an 'optimizers' mapping (e.g. adamw: {{learning_rate: [5e-5]}})")
    sweep = config.get("sweep")
    if sweep is not None:
        if (not isinstance(sweep, dict) or not isinstance(sweep.get("argument"), str)
                or not isinstance(sweep.get("values"), list) or not sweep["values"]):
            raise ValueError(f"{path}: sweep needs an 'argument' name and a non-empty 'values' list "
                             "(e.g. sweep: {argument: per_device_train_batch_size, values: [32, 256]})")
        if len(set(map(str, sweep["values"]))) != len(sweep["values"]):
            raise ValueError(f"{path}: sweep.values has repeated values {sweep['values']}")
        if sweep["argument"] in config.get("common", {}):
            raise ValueError(f"{path}: {sweep['argument']!r} is swept; remove it from common")
    return config


# Batch-size arguments: a sweep over them is reported against the run's global batch size.
BATCH_ARGUMENTS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def _check_optim(name: str, optim: str) -> None:
    from transformers.training_args import OptimizerNames

    known = {"lion", "adamw", *(o.value for o in OptimizerNames)}
    if optim not in known:
        raise ValueError(f"optimizers.{name}: unknown optimizer {optim!r}; optim must be 'lion', 'adamw' or one "
                         "of HF's optimizer names (e.g. 'lion_32bit', HF's bitsandbytes Lion)")


def _lr_list(name: str, value: Any, sweep_value: Any) -> list[float]:
    """A learning-rate grid: a list (or one value), or, under a sweep, a mapping from each swept value to its list."""
    if isinstance(value, dict):
        if sweep_value is None:
            raise ValueError(f"optimizers.{name}.learning_rate: a mapping of grids needs a sweep section")
        by_value = {str(k): v for k, v in value.items()}
        if str(sweep_value) not in by_value:
            raise ValueError(f"optimizers.{name}.learning_rate: no grid for swept value {sweep_value} "
                             f"(grids given for {sorted(by_value)})")
        value = by_value[str(sweep_value)]
    lrs = [float(lr) for lr in _as_list(value)]
    if not lrs:
        raise ValueError(f"optimizers.{name}: the learning_rate grid is empty")
    return lrs


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
    for name, spec in specs.items():
        if not isinstance(spec, dict) or not ("learning_rate" in spec or "scale_from_adamw" in spec):
            raise ValueError(f"optimizers.{name}: needs a learning_rate list (or, for lion, scale_from_adamw)")
        optim = spec.get("optim", name)
        _check_optim(name, optim)
        extra = spec.get("args", {})
        if not isinstance(extra, dict):
            raise ValueError(f"optimizers.{name}.args: expected a mapping of run arguments, got {type(extra).__name__}")
        if "scale_from_adamw" in spec and "adamw" not in specs:
            raise ValueError(f"optimizers.{name}.scale_from_adamw needs an adamw entry to scale from")
        for value in sweep_values:
            if "scale_from_adamw" in spec:
                k = float(spec["scale_from_adamw"])
                lrs = [lr / k for lr in _lr_list("adamw", specs["adamw"]["learning_rate"], value)]
                wd = float(specs["adamw"].get("weight_decay", 0.0)) * k
            else:
                lrs = _lr_list(name, spec["learning_rate"], value)
                wd = float(spec.get("weight_decay", 0.0))
            run_args = extra if sweep is None else {**extra, sweep["argument"]: value}
            grid += [(name, optim, lr, wd, run_args) for lr in lrs]
    return grid


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def run_folder(name: str, lr: float, seed: int, sweep: dict[str, Any] | None, run_args: dict[str, Any]) -> str:
    swept = "" if sweep is None else f"_{sweep.get('label', sweep['argument'])}{run_args[sweep['argument']]}"
    return f"{name}{swept}_lr{lr:g}_seed{seed}"


def run_status(run_dir: Path, parsed: tuple) -> tuple[str, RunRecord | None]:
    """("finished", record) when ``run_dir/run.json`` exists and was written with the same run
    arguments; ("resume", None) when a checkpoint of the same arguments exists; else ("new", None)."""
    arguments = run_arguments(*parsed[:3])
    record_file = run_dir / "run.json"
    if record_file.is_file():
        try:
            record = RunRecord.read(record_file)
        except ValueError:  # a record from an older schema, or damaged: run again
            record = None
        if record is not None and record.run_args == arguments:
            return "finished", record
    args_file = run_dir / RUN_ARGS_FILE
    if (last_complete_checkpoint(run_dir) is not None and args_file.is_file()
            and json.loads(args_file.read_text()) == arguments):
        return "resume", None
    return "new", None


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: offline)")
    parser.add_argument("--output_dir", default=None, help="default: runs/<config name>")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--rerun", action="store_true",
                        help="run every grid point again, even those with a finished run.json")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: write the report from the runs that have finished so far")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="keep each run's checkpoint-* folders after it finishes (default: deleted)")
    parser.epilog = "Arguments after a lone `--` go to every run of recipes/finetune_sentiment.py."
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: an argparse REMAINDER positional would also swallow our own options that
    # follow the config path (e.g. `config.yaml --output_dir x`).
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    if has_option(extra, "--output_dir"):
        raise ValueError("--output_dir goes before `--` (each run gets its own folder under it), not after")

    config = load_config(args.config)
    out = Path(args.output_dir or f"runs/{Path(args.config).stem}")
    seeds = args.seeds or config.get("seeds", [0])
    target = float(config.get("target_accuracy", 0.85))
    common = dict(config.get("common", {}))
    common["target_accuracy"] = target

    runs: list[RunRecord] = []
    reused = 0  # finished runs found from an earlier invocation
    started = time.perf_counter()
    sweep = config.get("sweep")
    # Seed by seed: a study stopped midway (or reported with --report_only) has every grid point
    # at the first seeds rather than some grid points at every seed.
    for seed in seeds:
        for name, optim, lr, wd, setup_args in optimizer_grid(config):
            run_dir = out / run_folder(name, lr, seed, sweep, setup_args)
            argv_run = dict_to_argv({**common, **setup_args}) + [
                "--optim", optim, "--learning_rate", str(lr), "--weight_decay", str(wd), "--seed", str(seed),
                "--run_name", name, "--output_dir", str(run_dir), *extra,
            ]
            parsed = parse_args(argv_run)
            status, record = ("new", None) if args.rerun else run_status(run_dir, parsed)
            reused += record is not None
            swept = "" if sweep is None else f" {sweep['argument']}={setup_args[sweep['argument']]}"
            print(f"[compare] {name}{swept} lr={lr:g} wd={wd:g} seed={seed}: {status}", flush=True)
            if status != "finished" and args.report_only:
                continue
            if record is None:
                # "resume": continue from the last checkpoint of the same arguments; "new": from
                # scratch, deleting checkpoints of other arguments or of a forced rerun.
                parsed[2].resume_from_checkpoint = "true" if status == "resume" else None
                parsed[3].overwrite_output_dir = status == "new"
                record = run(*parsed)
                if not args.keep_checkpoints and is_main_process():
                    for checkpoint in run_dir.glob("checkpoint-*"):
                        shutil.rmtree(checkpoint)
            print(f"[compare]   best eval accuracy {record.best_eval_accuracy:.4f} "
                  f"in {record.train_seconds:.0f} s", flush=True)
            runs.append(record)
    total = time.perf_counter() - started
    if not runs:
        raise ValueError(f"no finished runs in {out} for this config (--report_only runs nothing)")

    if not is_main_process():
        return {}
    command = "python recipes/compare_optimizers.py " + " ".join(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    first = runs[0]
    notes = [
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')}, {device}, {platform.machine()}, "
        f"torch {torch.__version__}); {len(runs) - reused} runs took {total / 60:.1f} min"
        + (f" ({reused} finished runs reused from an earlier invocation)." if reused else "."),
        f"Model: {first.model}{' + LoRA' if first.peft else ' (full fine-tune)'}; data: {first.data}; "
        f"{first.train_rows} train / {first.eval_rows} eval rows; {first.steps} optimizer steps per run.",
        "Each optimizer's lr is the best of its grid by mean best-eval-accuracy, chosen on the eval set it is "
        "scored on (the same optimistic choice for both optimizers).",
        "Peak memory is " + ("CUDA max allocated" if torch.cuda.is_available() else
                             "the process's CPU RSS (model, data and tokenizer included), sampled at 20 Hz") + ".",
    ]
    if sweep is not None:
        key = "global_batch_size" if sweep["argument"] in BATCH_ARGUMENTS else sweep["argument"]
        expected = len(optimizer_grid(config)) * len(seeds)
        if len(runs) < expected:
            notes.append(f"Partial: {len(runs)} of the study's {expected} runs have finished.")
        notes[1] = (f"Model: {first.model}{' + LoRA' if first.peft else ' (full fine-tune)'}; data: {first.data}; "
                    f"{first.train_rows} train / {first.eval_rows} eval rows.")
        paths = write_sweep_report(runs, out, key, title=config.get("title", "Lion vs AdamW"),
                                   target_accuracy=target, notes=notes)
    else:
        paths = write_report(runs, out, title=config.get("title", "Lion vs AdamW"), target_accuracy=target,
                             notes=notes)
    print((out / "report.md").read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


if __name__ == "__main__":
    main()
