"""One run's record: the schema of ``run.json``, written by the recipe and read by the report.

:class:`RunRecord` is the only place that names a run's fields. ``recipes/finetune_sentiment.py``
fills it in, :meth:`RunRecord.write` stores it as ``run.json``, and
:mod:`lion_hf.experiments.report` reads it back with :meth:`RunRecord.read` /
:meth:`RunRecord.from_dict`. The report's per-run numbers come from :data:`REPORT_METRICS`, so a
new metric is a field here plus, if it belongs in the report table, one line in that list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["REPORT_METRICS", "ReportMetric", "RunRecord"]


@dataclass
class RunRecord:
    """Everything one fine-tuning run reports. ``history`` holds ``{"train": [...], "eval": [...]}``:
    per logged step, ``step``, ``seconds`` since training began (summed over resumed segments)
    and the train ``loss`` or the ``eval_*`` metrics."""

    optimizer: str  # "lion", "adamw", or another HF optim name
    seed: int
    learning_rate: float
    weight_decay: float
    model: str
    data: str  # where the data came from, in words
    train_rows: int
    eval_rows: int
    steps: int
    history: dict[str, list[dict[str, float]]]
    final_eval: dict[str, float]
    final_train_loss: float
    best_eval_accuracy: float
    train_seconds: float
    train_samples_per_second: float
    peak_memory_bytes: int
    optimizer_state_bytes: int
    optimizer_class: str | None = None  # the class that stepped (e.g. "DistributedLion"), None in older records
    setup: str | None = None  # what the report compares: a named setup (e.g. "lion_bf16"), else the optimizer
    peft: bool = False
    model_dtype: str = "float32"
    forward_dtype: str = "float32"
    lion_param_rounding: str | None = None
    lion_state_dtype: str | None = None
    global_batch_size: int | None = None  # per-device batch x processes x gradient accumulation
    target_accuracy: float | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    peak_memory_kind: str = "cpu_rss"  # or "cuda_max_allocated"
    weights_changed_fraction: float | None = None
    training_bytes: dict[str, int] | None = None  # weights, grads, optimizer state at the first step
    bytes_per_param: dict[str, float] | None = None
    device: str = "cpu"
    world_size: int = 1
    # the arguments that define the run (compare_optimizers skips a rerun on them)
    run_args: dict[str, Any] | None = None
    resumed_from: list[str] = field(default_factory=list)  # checkpoints this run was resumed from, in order
    # Where a resume changed the process count (--allow_partial_resume): per change, the ``step`` and the
    # ``world_size`` / ``global_batch_size`` before and from it. ``world_size`` and ``global_batch_size`` above
    # are then the run's values at its start.
    batch_changes: list[dict[str, int | None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.setup or self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | RunRecord, where: str = "run record") -> RunRecord:
        """A record from its dict (as in ``run.json``); names any missing or unknown field."""
        if isinstance(data, RunRecord):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        required = {n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        return cls(**data)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_dict(data, where=str(path))

    def write(self, path: str | os.PathLike) -> Path:
        """Write ``run.json`` atomically: a reader (or a rerun after a kill) never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".run-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)
        return path


@dataclass(frozen=True)
class ReportMetric:
    """One row of the report table: a per-run number, its label and format."""

    key: str
    label: str
    fmt: str
    value: Callable[[RunRecord], float | None]


def _total_bytes_per_param(r: RunRecord) -> float | None:
    return (r.bytes_per_param or {}).get("total")


REPORT_METRICS: list[ReportMetric] = [
    ReportMetric("best_eval_accuracy", "best eval acc", "{:.4f}", lambda r: r.best_eval_accuracy),
    ReportMetric("final_eval_accuracy", "final eval acc", "{:.4f}", lambda r: r.final_eval["eval_accuracy"]),
    ReportMetric("final_eval_macro_f1", "final eval macro-F1", "{:.4f}", lambda r: r.final_eval.get("eval_macro_f1")),
    ReportMetric("final_train_loss", "final train loss", "{:.4f}", lambda r: r.final_train_loss),
    ReportMetric("final_eval_loss", "final eval loss", "{:.4f}", lambda r: r.final_eval["eval_loss"]),
    ReportMetric("steps_to_target", "steps to target", "{:.0f}", lambda r: r.steps_to_target),
    ReportMetric("seconds_to_target", "s to target", "{:.1f}", lambda r: r.seconds_to_target),
    ReportMetric("train_seconds", "train s", "{:.1f}", lambda r: r.train_seconds),
    ReportMetric("train_samples_per_second", "samples/s", "{:.1f}", lambda r: r.train_samples_per_second),
    ReportMetric("peak_memory_mb", "peak mem MB", "{:.0f}", lambda r: r.peak_memory_bytes / 2**20),
    ReportMetric("optimizer_state_mb", "opt state MB", "{:.1f}", lambda r: r.optimizer_state_bytes / 2**20),
    ReportMetric("bytes_per_param", "weights+grads+state B/param", "{:.2f}", _total_bytes_per_param),
    ReportMetric("weights_changed_fraction", "weights changed", "{:.3f}", lambda r: r.weights_changed_fraction),
]
