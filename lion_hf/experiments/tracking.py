"""What a fine-tuning run measures, as Trainer callbacks and helpers: history, memory, bytes.

Used by ``recipes/finetune_sentiment.py`` to fill a :class:`~lion_hf.experiments.records.RunRecord`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lion_hf.trainer import unwrap_optimizer

__all__ = [
    "HistoryCallback",
    "PeakMemory",
    "ProgressCallback",
    "StudyClock",
    "TrainingBytesCallback",
    "bytes_per_param",
    "changed_fraction",
    "optimizer_state_bytes",
]


class HistoryCallback(TrainerCallback, ExportableState):
    """Records train loss and eval metrics per step with wall-clock seconds since training began.

    Resumable: HF saves its :meth:`state` in every checkpoint's ``trainer_state.json``; when a
    run resumes, the Trainer has loaded that state before ``on_train_begin``, where the history
    so far and its elapsed seconds are taken back, so the record covers the whole run.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.offset = 0.0  # seconds spent in earlier segments of a resumed run
        self.train: list[dict[str, float]] = []
        self.eval: list[dict[str, float]] = []

    @property
    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.start

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"train": self.train, "eval": self.eval, "elapsed": self.elapsed}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, dict) and "attributes" in saved:
            # Keep only what happened up to the checkpoint: a killed run may have logged past it.
            step = state.global_step
            self.train = [e for e in saved["attributes"]["train"] if e["step"] <= step]
            self.eval = [e for e in saved["attributes"]["eval"] if e["step"] <= step]
            self.offset = float(saved["attributes"]["elapsed"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        entry = {"step": state.global_step, "seconds": self.elapsed}
        if "loss" in logs:
            self.train.append({**entry, "loss": float(logs["loss"])})
        if "eval_accuracy" in logs:
            self.eval.append({**entry, **{k: float(v) for k, v in logs.items() if k.startswith("eval_")}})


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class StudyClock:
    """How far a study is: runs done and their durations, for the time-left estimate of the runs still to come."""

    def __init__(self, total_runs: int) -> None:
        self.total_runs = total_runs
        self.durations: list[float] = []  # runs trained in this invocation
        self.remaining_after_current = 0  # runs still to train after the current one

    def left_after(self, current_run_seconds: float) -> float:
        """Seconds for the runs after the current one: each as long as the mean trained so far (else this one)."""
        typical = sum(self.durations) / len(self.durations) if self.durations else current_run_seconds
        return typical * self.remaining_after_current


class ProgressCallback(TrainerCallback):
    """A line now and then (every ``every_seconds``, and at the end) with the step, the time spent and the time
    left, for a run and, inside a study, for the study: ``[compare] run 2/4 lion lr=5e-05 seed=0: step 40/75
    (53%), 1.1 min in, ~1.0 min left; study ~4.3 min left``. HF's tqdm bar says as much for one run, but a
    study runs with ``disable_tqdm`` (its bars would interleave with the study's lines)."""

    def __init__(self, label: str, every_seconds: float = 30.0, clock: StudyClock | None = None,
                 prefix: str = "compare") -> None:
        self.label, self.every, self.clock, self.prefix = label, every_seconds, clock, prefix
        self.started = self.last = time.perf_counter()
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last = time.perf_counter()
        self.first_step = state.global_step  # a resumed run counts its pace from where it resumed

    def _line(self, state, final: bool) -> str:
        spent = time.perf_counter() - self.started
        done = state.global_step - self.first_step
        left = spent / done * (state.max_steps - state.global_step) if done > 0 else float("nan")
        share = state.global_step / state.max_steps if state.max_steps else 1.0
        text = f"{self.label}: step {state.global_step}/{state.max_steps} ({share:.0%}), {_minutes(spent)} in"
        if final:
            text += ", done"
        elif left == left:
            text += f", ~{_minutes(left)} left"
        if self.clock is not None and left == left:
            study_left = (0.0 if final else left) + self.clock.left_after(spent + (0.0 if final else left))
            text += f"; study ~{_minutes(study_left)} left"
        return f"[{self.prefix}] {text}"

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        last_step = state.global_step >= state.max_steps
        if state.is_world_process_zero and (now - self.last >= self.every or last_step):
            self.last = now
            print(self._line(state, final=last_step), flush=True)


class PeakMemory:
    """Peak CPU RSS sampled at 20 Hz (ru_maxrss never resets between runs); CUDA max allocated."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.05)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    inner = unwrap_optimizer(optimizer)
    return sum(
        t.numel() * t.element_size()
        for state in inner.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    )


class TrainingBytesCallback(TrainerCallback):
    """Counts, from the tensors themselves, the bytes of weights, gradients and optimizer state
    at the first optimizer step (when every gradient exists and the state has been created)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.counts is not None or model is None or optimizer is None:
            return
        params = list(model.parameters())
        self.counts = {
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        }


def changed_fraction(model: torch.nn.Module, initial: torch.nn.Module) -> float:
    """Share of trainable weight elements whose stored value differs from ``initial``'s.

    Shows steps lost to rounding: a bf16 weight updated by round-to-nearest stays put whenever
    the step is under half an ulp.
    """
    start = dict(initial.named_parameters())
    changed = total = 0
    for name, p in model.named_parameters():
        if p.requires_grad and name in start:
            q = start[name]
            # DeepSpeed ZeRO-3 leaves each rank a partition (shape [0]): gather both (collective).
            gathered = [t for t in (p, q) if hasattr(t, "ds_id")]
            if gathered:
                import deepspeed

                context = deepspeed.zero.GatheredParameters(gathered, modifier_rank=None)
            else:
                context = contextlib.nullcontext()
            with context:
                changed += int((p.detach() != q.detach().to(p.dtype)).sum())
                total += p.numel()
    return changed / total if total else 0.0


def bytes_per_param(counts: dict[str, int] | None) -> dict[str, float] | None:
    """Weights + gradients + optimizer state, each per model parameter."""
    if not counts or not counts["params"]:
        return None
    n = counts["params"]
    per = {
        key.replace("_bytes", ""): counts[key] / n for key in ("weight_bytes", "grad_bytes", "optimizer_state_bytes")
    }
    per["total"] = sum(per.values())
    return per
