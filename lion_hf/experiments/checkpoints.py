"""Which checkpoint a recipe run resumes from, verified before anything is recorded or deleted.

A run's arguments travel inside each of its checkpoints: :class:`RunArgumentsRecorder` is an
``ExportableState`` callback, so HF writes them into ``trainer_state.json``, the file it writes last. A
checkpoint therefore carries the arguments it was trained under from the moment it is complete, and an
attempt that fails before training writes nothing that a later attempt could mistake for them.

:func:`plan_output_dir` decides, before the data or model load, what a run does with its ``output_dir``:

* resume (``--resume_from_checkpoint true``: the newest checkpoint with a ``trainer_state.json``; or a given
  folder) only from a checkpoint whose files are intact (JSON parses, torch archives pass their CRCs,
  safetensors headers match their sizes), which holds every file an exact resume needs (weights,
  ``optimizer.pt``, ``scheduler.pt``, one ``rng_state*.pth`` per process, or DeepSpeed's ``global_step*``
  folder) and whose recorded arguments equal the run's. A damaged file is named with the newest intact
  checkpoint before it; a missing file or missing arguments are named and refused unless
  ``--allow_partial_resume`` accepts them (with a warning); other arguments are refused, naming them.
* train from scratch into a folder holding checkpoints or a finished ``run.json`` only with
  ``--overwrite_output_dir``, and delete them only later (:meth:`OutputPlan.clear_old_outputs`, called once
  the data and model have loaded).
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

__all__ = [
    "LAST_CHECKPOINT",
    "CheckpointError",
    "OutputPlan",
    "RunArgumentsRecorder",
    "checkpoint_folders",
    "damaged_files",
    "last_complete_checkpoint",
    "latest_run_with_checkpoints",
    "missing_for_exact_resume",
    "plan_output_dir",
    "recorded_arguments",
    "resume_request",
]

LAST_CHECKPOINT = "last"
TRAINER_STATE = "trainer_state.json"
RUN_RECORD = "run.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(ValueError):
    """A resume or an output folder the run refuses, naming what is wrong and the ways on."""


def resume_request(value: Any) -> str | None:
    """``--resume_from_checkpoint`` as None (train from scratch), :data:`LAST_CHECKPOINT` or a folder path."""
    if value is None or value is False or str(value).strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if value is True or str(value).strip().lower() in ("true", "yes", "1", "last"):
        return LAST_CHECKPOINT
    return str(value)


def _step(folder: Path) -> int | None:
    prefix, _, number = folder.name.rpartition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, newest (highest N) first, complete or not."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [d for d in out.iterdir() if d.is_dir() and _step(d) is not None]
    return sorted(found, key=_step, reverse=True)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` that was written to the end.

    The Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a folder without it;
    HF's ``get_last_checkpoint`` would pick that half-written folder.
    """
    done = [d for d in checkpoint_folders(output_dir) if (d / TRAINER_STATE).is_file()]
    return str(done[0]) if done else None


def latest_run_with_checkpoints(root: str | Path) -> str | None:
    """The newest run folder (by name: they are dated) under ``root`` that holds a checkpoint."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = sorted((d for d in root.iterdir() if d.is_dir() and checkpoint_folders(d)), key=lambda d: d.name)
    return str(runs[-1]) if runs else None


# ------------------------------------------------------------------------------------------------------
# The arguments a checkpoint was trained under
# ------------------------------------------------------------------------------------------------------

class RunArgumentsRecorder(TrainerCallback, ExportableState):
    """Puts the run's arguments into every checkpoint's ``trainer_state.json`` (HF saves the ``state()`` of
    each ``ExportableState`` callback there)."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"arguments": self.arguments}}


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def recorded_arguments(checkpoint: str | Path) -> dict[str, Any] | None:
    """The arguments a checkpoint was trained under, or None if it carries none (another script, an old recipe)."""
    saved = (_trainer_state(Path(checkpoint)).get("stateful_callbacks") or {}).get(RunArgumentsRecorder.__name__)
    if isinstance(saved, dict) and isinstance(saved.get("attributes"), dict):
        arguments = saved["attributes"].get("arguments")
        return arguments if isinstance(arguments, dict) else None
    return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``group.name`` of every argument whose value differs between two argument records."""
    groups = set(saved) | set(current)
    return sorted(f"{group}.{k}" for group in groups
                  for k in set(saved.get(group, {})) | set(current.get(group, {}))
                  if saved.get(group, {}).get(k) != current.get(group, {}).get(k))


# ------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------


def missing_for_exact_resume(checkpoint: str | Path, world_size: int = 1) -> list[str]:
    """The files of ``checkpoint`` that an exact resume by ``world_size`` processes needs and that are absent."""
    checkpoint = Path(checkpoint)
    missing = []
    if not (checkpoint / TRAINER_STATE).is_file():
        missing.append(TRAINER_STATE)
    latest = checkpoint / "latest"
    if latest.is_file():  # DeepSpeed keeps weights, optimizer and scheduler state in the folder `latest` names
        tag = latest.read_text().strip()
        if not tag or not (checkpoint / tag).is_dir():
            missing.append(f"DeepSpeed's state folder {tag or '(unnamed in latest)'}")
    else:
        if not any((checkpoint / name).is_file() for name in MODEL_FILES):
            missing.append("the model weights (" + " or ".join(MODEL_FILES[::2]) + ")")
        missing += [name for name in ("optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    missing += [name for name in rng if not (checkpoint / name).is_file()]
    return missing


def _damage(path: Path) -> str | None:
    """Why ``path`` cannot be read back, or None: a cheap structural check of JSON, torch and safetensors files."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(path):
                return "not a torch archive (truncated or overwritten?)"
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"its entry {bad} fails its checksum"
        elif path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size - 8:
                    return "its header runs past the end of the file"
                header = json.loads(fh.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end != size:
                return f"{size} bytes where its header describes {8 + header_len + end}"
    except (ValueError, OSError, struct.error, zipfile.BadZipFile, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def damaged_files(checkpoint: str | Path) -> list[str]:
    """``"path: why"`` for every file of ``checkpoint`` (and of a DeepSpeed state folder in it) that is damaged."""
    checkpoint = Path(checkpoint)
    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    found = []
    for path in files:
        why = _damage(path)
        if why is not None:
            found.append(f"{path}: {why}")
    return found


# ------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------


@dataclass
class OutputPlan:
    """What a run does with its output_dir: the checkpoint it resumes from (or None), what it deletes once its
    inputs have loaded, and what to tell the user."""

    output_dir: Path
    checkpoint: str | None = None
    to_delete: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def clear_old_outputs(self) -> None:
        """Delete what ``--overwrite_output_dir`` replaces (call on the main process, after the inputs loaded)."""
        for path in self.to_delete:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.to_delete = []


def _intact_before(checkpoint: Path, world_size: int) -> Path | None:
    """The newest checkpoint older than ``checkpoint`` in its folder that is complete and undamaged."""
    step = _step(checkpoint)
    for older in checkpoint_folders(checkpoint.parent):
        if step is not None and _step(older) >= step:
            continue
        if not missing_for_exact_resume(older, world_size) and not damaged_files(older):
            return older
    return None


def plan_output_dir(
    output_dir: str | Path,
    resume_from_checkpoint: Any,
    arguments: dict[str, Any],
    *,
    overwrite: bool = False,
    allow_partial_resume: bool = False,
    world_size: int = 1,
) -> OutputPlan:
    """Decide (deleting nothing) whether a run resumes and from which checkpoint; see the module docstring."""
    out = Path(output_dir)
    plan = OutputPlan(output_dir=out)
    asked = resume_request(resume_from_checkpoint)
    existing = checkpoint_folders(out)
    record = out / RUN_RECORD
    if asked is None:
        if (existing or record.is_file()) and not overwrite:
            held = ([f"checkpoints (newest: {existing[0].name})"] if existing else []) + (
                [f"a finished run ({RUN_RECORD})"] if record.is_file() else [])
            raise CheckpointError(
                f"output_dir {out} already holds {' and '.join(held)}. Pass --resume_from_checkpoint true to "
                "resume from its last checkpoint, --overwrite_output_dir true to delete them and train from "
                "scratch, or another --output_dir."
            )
        if overwrite:
            plan.to_delete = [*existing, *([record] if record.is_file() else [])]
        return plan

    if asked == LAST_CHECKPOINT:
        complete = [d for d in existing if (d / TRAINER_STATE).is_file()]
        unfinished = [d.name for d in existing if complete and _step(d) > _step(complete[0])]
        if not complete:
            found = f" ({', '.join(d.name for d in existing)}: no {TRAINER_STATE}, cut off while saving)" if existing \
                else ""
            raise CheckpointError(f"--resume_from_checkpoint true: no complete checkpoint-* folder in output_dir "
                                  f"{out}{found}")
        checkpoint = complete[0]
        if unfinished:
            plan.notes.append(f"skipping {', '.join(unfinished)}: no {TRAINER_STATE} (the run stopped while saving)")
    else:
        checkpoint = Path(asked)
        if not checkpoint.is_dir():
            raise CheckpointError(f"--resume_from_checkpoint {asked}: no such folder")
        if not (checkpoint / TRAINER_STATE).is_file():
            newest = last_complete_checkpoint(checkpoint)
            hint = f"; did you mean {newest}?" if newest else ""
            raise CheckpointError(f"--resume_from_checkpoint {asked}: not a checkpoint (no {TRAINER_STATE}){hint}")

    damaged = damaged_files(checkpoint)
    if damaged:
        earlier = _intact_before(checkpoint, world_size)
        way_on = (f"The newest intact checkpoint before it is {earlier}: resume from it with "
                  f"--resume_from_checkpoint {earlier}, or delete {checkpoint.name} and rerun."
                  if earlier else "No intact checkpoint precedes it: train from scratch with --overwrite_output_dir "
                                  "true.")
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {'; '.join(damaged)}. {way_on}")

    saved = recorded_arguments(checkpoint)
    missing = missing_for_exact_resume(checkpoint, world_size)
    if saved is None:
        missing.append(f"the run arguments it was trained under (the recipe records them in {TRAINER_STATE})")
    else:
        diff = differences(saved, arguments)
        if diff:
            shown = ", ".join(f"{d} ({_lookup(saved, d)!r} there, {_lookup(arguments, d)!r} now)" for d in diff[:6])
            raise CheckpointError(
                f"{checkpoint} was trained under other arguments: {shown}{' ...' if len(diff) > 6 else ''}. Resume "
                "with the same arguments, or train from scratch with --overwrite_output_dir true."
            )
    if missing:
        lacks = f"{checkpoint} lacks {'; '.join(missing)}"
        if not allow_partial_resume:
            raise CheckpointError(
                f"{lacks}: resuming would not continue the run exactly (fresh momentum, the lr schedule from its "
                "start, other data order). Pass --allow_partial_resume true to resume anyway, or train from "
                "scratch with --overwrite_output_dir true."
            )
        plan.warnings.append(f"partial resume (--allow_partial_resume): {lacks}; what is missing starts afresh")
    plan.checkpoint = str(checkpoint)
    plan.notes.append(f"resuming from {checkpoint} (step {_trainer_state(checkpoint).get('global_step')})")
    return plan


def _lookup(arguments: dict[str, Any], dotted: str) -> Any:
    group, _, name = dotted.partition(".")
    return arguments.get(group, {}).get(name)
