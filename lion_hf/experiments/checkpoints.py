"""Which checkpoint a recipe run resumes from, verified before anything is recorded or deleted.

A run's arguments travel inside each of its checkpoints: :class:`RunArgumentsRecorder` is an
``ExportableState`` callback, so HF writes them into ``trainer_state.json``, the file it writes last. A
checkpoint therefore carries the arguments it was trained under from the moment it is complete, and an
attempt that fails before training writes nothing that a later attempt could mistake for them. Once HF has
saved a checkpoint, :class:`CheckpointDigests` writes the sha256 of each of its files (``lion_hf_digests.json``).

One run writes an output folder at a time: :func:`lock_output_dir` takes an exclusive ``flock`` on
``output_dir/.lion_hf_run.lock`` before the folder is looked at and holds it for the run; a second run into
the folder fails at once, naming the process that holds it. The OS drops the lock when its process dies.

:func:`plan_output_dir` decides, before the data or model load, what a run does with its ``output_dir``:

* resume (``--resume_from_checkpoint true``: the newest checkpoint with a ``trainer_state.json``; or a given
  folder) only from a checkpoint whose files are intact (JSON parses, torch archives pass their CRCs,
  safetensors headers match their sizes, and every file matches the digest written when it was saved; a
  checkpoint without digests, from before there were any, is checked structurally with a warning), which
  holds every file an exact resume needs (weights, ``optimizer.pt``, ``scheduler.pt``, one ``rng_state*.pth``
  per process, or DeepSpeed's ``global_step*`` folder), was trained by as many processes, and whose recorded
  arguments equal the run's up to bookkeeping (:data:`BOOKKEEPING_ARGUMENTS`: how often it logs, evaluates
  and saves, where it reports; a change there is accepted with a note). A damaged file is named with the
  newest intact checkpoint before it; a missing file, missing arguments or another process count are named
  and refused unless ``--allow_partial_resume`` accepts them (with a warning; a process-count change is then
  recorded in ``batch_changes``); other arguments are refused, naming them.
* train from scratch into a folder holding checkpoints or a finished ``run.json`` only with
  ``--overwrite_output_dir``, and delete them only later (:meth:`OutputPlan.clear_old_outputs`, called once
  the data and model have loaded).
* a ``checkpoint-*`` that is a symbolic link is refused in every case: the run would save or delete through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

__all__ = [
    "BOOKKEEPING_ARGUMENTS",
    "DIGESTS",
    "LAST_CHECKPOINT",
    "LOCK_FILE",
    "CheckpointDigests",
    "CheckpointError",
    "OutputLock",
    "OutputPlan",
    "RunArgumentsRecorder",
    "checkpoint_folders",
    "damaged_files",
    "digest_mismatches",
    "last_complete_checkpoint",
    "latest_run_with_checkpoints",
    "lock_output_dir",
    "missing_for_exact_resume",
    "plan_output_dir",
    "recorded_arguments",
    "recorded_batch_changes",
    "recorded_world_size",
    "resume_request",
    "trajectory_differences",
    "write_digests",
]

LAST_CHECKPOINT = "last"
TRAINER_STATE = "trainer_state.json"
RUN_RECORD = "run.json"
# What the package writes into an output folder besides HF's files: the lock of the run writing it, and in each
# checkpoint the sha256 of every file in it.
LOCK_FILE = ".lion_hf_run.lock"
DIGESTS = "lion_hf_digests.json"
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
    """Every ``checkpoint-N`` folder in ``output_dir``, newest (highest N) first, complete or not (a symbolic
    link named so is not one: :func:`plan_output_dir` refuses a folder holding one)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [d for d in out.iterdir() if not d.is_symlink() and d.is_dir() and _step(d) is not None]
    return sorted(found, key=_step, reverse=True)


def _linked_checkpoints(output_dir: Path) -> list[str]:
    """``name -> target`` for each ``checkpoint-N`` in ``output_dir`` that is a symbolic link."""
    if not output_dir.is_dir():
        return []
    return sorted(f"{d.name} -> {os.readlink(d)}" for d in output_dir.iterdir()
                  if d.is_symlink() and _step(d) is not None)


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
# One writer per output folder
# ------------------------------------------------------------------------------------------------------


class OutputLock:
    """The one run writing an output folder: an exclusive ``flock`` on ``output_dir/.lion_hf_run.lock``, held
    until :meth:`release`.

    The OS drops the lock when its process ends, however it ends (an exception, SIGKILL, a power cut on a
    local disk), so a crashed run never leaves its folder locked. The file stays behind on purpose: deleting
    it while a second run waits to open it would let a third run lock a new file beside the second's.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`CheckpointError` naming the folder and the run that holds it."""
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_NOFOLLOW: a link planted at the lock's name must not make the run open (and write) a file elsewhere.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise CheckpointError(f"output_dir {self.output_dir}: cannot open its lock file {self.path}: "
                                  f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"output_dir {self.output_dir} is being written by another run ({holder}; lock file {self.path}): "
                "two runs in one folder would replace each other's checkpoints and run.json. Wait for that run "
                "to end, or pass another --output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            held = json.loads(os.pread(fd, 4096, 0).decode())
            return f"pid {held['pid']} on host {held['host']}, started {held['started']}"
        except (ValueError, KeyError, TypeError, OSError):  # the holder has locked but not yet written its name
            return "a process that is just starting"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: str | Path) -> OutputLock | None:
    """Take ``output_dir``'s lock on the main process (returned; None elsewhere). Under several processes the
    main one's outcome is broadcast, so every process raises the same :class:`CheckpointError` at once rather
    than the others waiting in their first collective for a main process that has left."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    lock, error = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            lock = OutputLock(output_dir).acquire()
        except CheckpointError as exc:
            error = str(exc)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # bounded by the process group's timeout
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return lock


# ------------------------------------------------------------------------------------------------------
# The arguments a checkpoint was trained under
# ------------------------------------------------------------------------------------------------------

class RunArgumentsRecorder(TrainerCallback, ExportableState):
    """Puts the run's arguments into every checkpoint's ``trainer_state.json`` (HF saves the ``state()`` of
    each ``ExportableState`` callback there), with the number of processes that trained it and every change of
    that number an allowed partial resume made (``batch_changes``, as in :class:`OutputPlan`)."""

    def __init__(self, arguments: dict[str, Any], world_size: int = 1,
                 batch_changes: list[dict[str, int]] | None = None) -> None:
        self.arguments = arguments
        self.world_size = world_size
        self.batch_changes = list(batch_changes or [])

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"arguments": self.arguments, "world_size": self.world_size,
                                           "batch_changes": self.batch_changes}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer takes its logging/eval/save intervals from the checkpoint's trainer_state.json;
        # plan_output_dir lets a resume change them (they are bookkeeping), so the run's own values apply.
        state.compute_steps(args, state.max_steps)


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def _recorded(checkpoint: Path) -> dict[str, Any]:
    saved = (_trainer_state(Path(checkpoint)).get("stateful_callbacks") or {}).get(RunArgumentsRecorder.__name__)
    if isinstance(saved, dict) and isinstance(saved.get("attributes"), dict):
        return saved["attributes"]
    return {}


def recorded_arguments(checkpoint: str | Path) -> dict[str, Any] | None:
    """The arguments a checkpoint was trained under, or None if it carries none (another script, an old recipe)."""
    arguments = _recorded(Path(checkpoint)).get("arguments")
    return arguments if isinstance(arguments, dict) else None


def recorded_world_size(checkpoint: str | Path) -> int | None:
    """How many processes trained ``checkpoint``: as recorded, else (an older recipe) as its RNG files say."""
    checkpoint = Path(checkpoint)
    recorded = _recorded(checkpoint).get("world_size")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
        return recorded
    per_process = list(checkpoint.glob("rng_state_*.pth"))
    if per_process:
        return len(per_process)
    return 1 if (checkpoint / "rng_state.pth").is_file() else None


def recorded_batch_changes(checkpoint: str | Path) -> list[dict[str, int]]:
    changes = _recorded(Path(checkpoint)).get("batch_changes")
    return changes if isinstance(changes, list) else []


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``group.name`` of every argument whose value differs between two argument records."""
    groups = set(saved) | set(current)
    return sorted(f"{group}.{k}" for group in groups
                  for k in set(saved.get(group, {})) | set(current.get(group, {}))
                  if saved.get(group, {}).get(k) != current.get(group, {}).get(k))


# Arguments a resume may change: where and how often the run logs, evaluates, saves and reports, and what it
# counts as its target. None of them changes a weight, the data order, the lr schedule or an RNG draw (the
# eval loop draws no random numbers), so the resumed run still ends where the uninterrupted one would.
BOOKKEEPING_ARGUMENTS = frozenset({
    *(f"training.{name}" for name in (
        "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
        "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level",
        "log_level_replica", "log_on_each_node", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
        "eval_accumulation_steps", "per_device_eval_batch_size", "report_to", "project", "disable_tqdm",
        "skip_memory_metrics", "include_num_input_tokens_seen", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "trackio_space_id",
        "trackio_bucket_id", "trackio_static_space_id")),
    "data.target_accuracy",
})


def trajectory_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """:func:`differences` that change what the run trains (all but :data:`BOOKKEEPING_ARGUMENTS`)."""
    return [d for d in differences(saved, current) if d not in BOOKKEEPING_ARGUMENTS]


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    return [p for p in sorted(checkpoint.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != DIGESTS]


def write_digests(checkpoint: str | Path) -> Path:
    """Write ``checkpoint/lion_hf_digests.json``: the sha256 of every file in it (subfolders included),
    atomically, so a reader sees the whole manifest or none."""
    import tempfile

    checkpoint = Path(checkpoint)
    files = {p.relative_to(checkpoint).as_posix(): _sha256(p) for p in _checkpoint_files(checkpoint)}
    fd, tmp = tempfile.mkstemp(dir=checkpoint, prefix=".lion_hf_digests-", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({"algorithm": "sha256", "files": files}, fh, indent=1)
    os.replace(tmp, checkpoint / DIGESTS)
    return checkpoint / DIGESTS


def digest_mismatches(checkpoint: str | Path) -> list[str] | None:
    """``"path: why"`` for every file of ``checkpoint`` that differs from the digest written when it was saved (a
    file that is gone is :func:`missing_for_exact_resume`'s to judge); None when it has no digest manifest."""
    checkpoint = Path(checkpoint)
    manifest = checkpoint / DIGESTS
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return [f"{manifest}: unreadable ({type(exc).__name__}: {exc})"]
    found = []
    for name, expected in sorted(files.items()):
        path = checkpoint / name
        if ".." in Path(name).parts or Path(name).is_absolute():  # a manifest names files inside its folder only
            found.append(f"{manifest}: names {name!r}, outside the checkpoint")
        elif path.is_symlink():
            found.append(f"{path}: a symbolic link where {DIGESTS} lists a file")
        elif path.is_file() and _sha256(path) != expected:  # a missing one is for missing_for_exact_resume
            found.append(f"{path}: its sha256 differs from the one recorded in {DIGESTS} when it was saved")
    return found


class CheckpointDigests(TrainerCallback):
    """Writes :func:`write_digests` into each checkpoint once the Trainer has saved it (every process's files
    included: the processes meet first)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its rng_state_<rank>.pth (and DeepSpeed its shards)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            write_digests(folder)


def damaged_files(checkpoint: str | Path) -> list[str]:
    """``"path: why"`` for every file of ``checkpoint`` (and of a DeepSpeed state folder in it) that is damaged:
    unreadable in its structure, or, where the checkpoint has its digests, not the file that was saved."""
    checkpoint = Path(checkpoint)
    found = []
    for path in _checkpoint_files(checkpoint):
        why = _damage(path)
        if why is not None:
            found.append(f"{path}: {why}")
    named = {line.split(": ", 1)[0] for line in found}
    found += [line for line in digest_mismatches(checkpoint) or [] if line.split(": ", 1)[0] not in named]
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
    # Each change of the process count (and so of the global batch) over the run's resumed segments: ``step``,
    # ``world_size`` and ``global_batch_size`` from that step on and ``*_before`` it; empty for a run trained by
    # one process count throughout.
    batch_changes: list[dict[str, int]] = field(default_factory=list)

    def clear_old_outputs(self) -> None:
        """Delete what ``--overwrite_output_dir`` replaces (call on the main process, after the inputs loaded)."""
        for path in self.to_delete:
            if path.is_symlink():  # never followed: what it points at is not this run's (the plan refused it)
                raise CheckpointError(f"{path} became a symbolic link after the run planned to delete it")
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
    linked = _linked_checkpoints(out)
    if linked:
        # The Trainer would save into (and rotate away) whatever such a link points at; the recipe deletes only
        # what it wrote, inside the folder.
        raise CheckpointError(
            f"output_dir {out} holds checkpoint-* names that are symbolic links ({', '.join(linked)}): the run "
            "would write or delete through them, outside the folder. Remove the links (or copy the checkpoints "
            "in), or pass another --output_dir."
        )
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

    if digest_mismatches(checkpoint) is None:
        plan.warnings.append(f"{checkpoint} has no {DIGESTS} (saved by an older lion_hf, or the run stopped "
                             "between saving it and writing its digests): its files are checked for structure "
                             "only, not against what was saved")
    saved = recorded_arguments(checkpoint)
    missing = missing_for_exact_resume(checkpoint, world_size)
    if saved is None:
        missing.append(f"the run arguments it was trained under (the recipe records them in {TRAINER_STATE})")
    else:
        diff = trajectory_differences(saved, arguments)
        if diff:
            shown = ", ".join(f"{d} ({_lookup(saved, d)!r} there, {_lookup(arguments, d)!r} now)" for d in diff[:6])
            raise CheckpointError(
                f"{checkpoint} was trained under other arguments: {shown}{' ...' if len(diff) > 6 else ''}. Resume "
                "with the same arguments, or train from scratch with --overwrite_output_dir true."
            )
        bookkeeping = differences(saved, arguments)
        if bookkeeping:
            plan.notes.append("resuming with other bookkeeping (the training itself is unchanged): " + ", ".join(
                f"{d} {_lookup(saved, d)!r} -> {_lookup(arguments, d)!r}" for d in bookkeeping))
    plan.batch_changes = recorded_batch_changes(checkpoint)
    trained_by = recorded_world_size(checkpoint)
    if trained_by is not None and trained_by != world_size:
        step = _trainer_state(checkpoint).get("global_step")
        per_process = _per_process_batch(saved or arguments)
        batches = ("" if per_process is None else
                   f" (global batch {per_process * trained_by} there, {per_process * world_size} now)")
        change = f"{checkpoint} was trained by {trained_by} processes and this run has {world_size}{batches}"
        if not allow_partial_resume:
            raise CheckpointError(
                f"{change}: the global batch, the data each process sees and the optimizer state of the missing "
                f"or added processes would change mid-run. Resume with {trained_by} processes, pass "
                "--allow_partial_resume true to continue anyway (run.json records the change), or train from "
                "scratch with --overwrite_output_dir true."
            )
        plan.warnings.append(f"partial resume (--allow_partial_resume): {change}; run.json records the change "
                             f"at step {step}")
        plan.batch_changes.append({
            "step": step, "world_size_before": trained_by, "world_size": world_size,
            "global_batch_size_before": None if per_process is None else per_process * trained_by,
            "global_batch_size": None if per_process is None else per_process * world_size})
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


def _per_process_batch(arguments: dict[str, Any]) -> int | None:
    """Rows one process contributes to an optimizer step: per-device batch x gradient accumulation."""
    training = arguments.get("training") or {}
    batch, accumulation = training.get("per_device_train_batch_size"), training.get("gradient_accumulation_steps")
    return batch * accumulation if isinstance(batch, int) and isinstance(accumulation, int) else None


def _lookup(arguments: dict[str, Any], dotted: str) -> Any:
    group, _, name = dotted.partition(".")
    return arguments.get(group, {}).get(name)
