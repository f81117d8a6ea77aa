"""lion_hf.experiments.checkpoints on hand-made folders: what an exact resume needs per layout and process count,
which damage is found, and what --resume_from_checkpoint means. Real checkpoints: tests/test_recipes.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lion_hf.experiments.checkpoints import (
    LAST_CHECKPOINT,
    CheckpointError,
    damaged_files,
    last_complete_checkpoint,
    missing_for_exact_resume,
    plan_output_dir,
    resume_request,
)


def make_checkpoint(folder, *, deepspeed=False, processes=1, arguments=None):
    folder.mkdir(parents=True)
    state = {"global_step": int(folder.name.split("-")[1]), "stateful_callbacks": {}}
    if arguments is not None:
        state["stateful_callbacks"]["RunArgumentsRecorder"] = {"args": {}, "attributes": {"arguments": arguments}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if deepspeed:
        (folder / "latest").write_text("global_step4")
        (folder / "global_step4").mkdir()
        torch.save({"x": torch.ones(2)}, folder / "global_step4" / "optim_states.pt")
    else:
        save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({"x": torch.ones(2)}, folder / name)
    names = ["rng_state.pth"] if processes == 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    for name in names:
        torch.save({"seed": 1}, folder / name)
    return folder


def test_what_an_exact_resume_needs_depends_on_the_layout_and_the_process_count(tmp_path):
    hf = make_checkpoint(tmp_path / "a" / "checkpoint-4")
    assert missing_for_exact_resume(hf) == []
    assert missing_for_exact_resume(hf, world_size=2) == ["rng_state_0.pth", "rng_state_1.pth"]
    ds = make_checkpoint(tmp_path / "b" / "checkpoint-4", deepspeed=True, processes=2)
    assert missing_for_exact_resume(ds, world_size=2) == []  # weights and optimizer live in global_step4/
    (ds / "latest").write_text("global_step8")
    assert missing_for_exact_resume(ds, world_size=2) == ["DeepSpeed's state folder global_step8"]
    (hf / "scheduler.pt").unlink()
    (hf / "model.safetensors").unlink()
    assert missing_for_exact_resume(hf) == ["the model weights (model.safetensors or pytorch_model.bin or "
                                            "adapter_model.safetensors)", "scheduler.pt"]


def test_damage_is_found_in_json_torch_and_safetensors_files(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4")
    assert damaged_files(checkpoint) == []
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    optimizer = checkpoint / "optimizer.pt"
    raw = bytearray(optimizer.read_bytes())
    raw[raw.index(b"\x00\x00\x80\x3f") + 3] ^= 0xFF  # one flipped bit in the stored tensor (1.0 in float32)
    optimizer.write_bytes(bytes(raw))
    found = damaged_files(checkpoint)
    assert len(found) == 2 and found[0].startswith(f"{weights}: ") and "describes" in found[0]
    assert found[1].startswith(f"{optimizer}: ")


def test_resume_request_spellings():
    for value in (None, False, "", "false", "no", "0", "None"):
        assert resume_request(value) is None
    for value in (True, "true", "True", "yes", "1", "last"):
        assert resume_request(value) == LAST_CHECKPOINT
    assert resume_request("runs/x/checkpoint-4") == "runs/x/checkpoint-4"


def test_a_checkpoint_cut_off_while_saving_is_skipped_and_said_so(tmp_path):
    arguments = {"training": {"learning_rate": 1e-4}}
    make_checkpoint(tmp_path / "checkpoint-4", arguments=arguments)
    (tmp_path / "checkpoint-8").mkdir()  # killed before trainer_state.json
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    plan = plan_output_dir(tmp_path, "true", arguments)
    assert plan.checkpoint == str(tmp_path / "checkpoint-4")
    assert any("skipping checkpoint-8: no trainer_state.json" in note for note in plan.notes)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest: checkpoint-8\)"):
        plan_output_dir(tmp_path, None, arguments)
    plan = plan_output_dir(tmp_path, None, arguments, overwrite=True)
    assert sorted(p.name for p in plan.to_delete) == ["checkpoint-4", "checkpoint-8"] and plan.checkpoint is None
    assert (tmp_path / "checkpoint-4").is_dir(), "the plan deletes nothing itself"


def _arguments(**training):
    return {"model": {}, "data": {"target_accuracy": 0.85},
            "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
                         "save_steps": 4, "logging_steps": 1, **training}}


def test_a_checkpoint_of_three_processes_is_not_resumed_by_two_unless_allowed(tmp_path):
    arguments = _arguments()
    make_checkpoint(tmp_path / "checkpoint-4", processes=3, arguments=arguments)
    with pytest.raises(CheckpointError, match=r"trained by 3 processes and this run has 2 \(global batch 24 there, 16 "
                                              r"now\).*Resume with 3 processes, pass --allow_partial_resume true"):
        plan_output_dir(tmp_path, "true", arguments, world_size=2)
    plan = plan_output_dir(tmp_path, "true", arguments, world_size=2, allow_partial_resume=True)
    assert plan.checkpoint == str(tmp_path / "checkpoint-4")
    assert plan.batch_changes == [{"step": 4, "world_size_before": 3, "world_size": 2,
                                   "global_batch_size_before": 24, "global_batch_size": 16}]
    assert any("trained by 3 processes" in w for w in plan.warnings)
    assert plan_output_dir(tmp_path, "true", arguments, world_size=3).batch_changes == []


def test_bookkeeping_changes_resume_with_a_note_and_training_changes_are_refused(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-4", arguments=_arguments())
    plan = plan_output_dir(tmp_path, "true", {**_arguments(save_steps=2, logging_steps=5, report_to=["tensorboard"]),
                                              "data": {"target_accuracy": 0.9}})
    assert plan.checkpoint == str(tmp_path / "checkpoint-4")
    [note] = [n for n in plan.notes if n.startswith("resuming with other bookkeeping")]
    for changed in ("training.save_steps 4 -> 2", "training.logging_steps 1 -> 5", "data.target_accuracy 0.85 -> 0.9"):
        assert changed in note
    with pytest.raises(CheckpointError, match=r"other arguments: training\.learning_rate \(0\.0001 there, 0\.001 now"):
        plan_output_dir(tmp_path, "true", _arguments(learning_rate=1e-3, save_steps=2))


def test_a_flipped_byte_is_found_against_the_digests_written_at_save_time(tmp_path):
    from lion_hf.experiments.checkpoints import digest_mismatches, write_digests

    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", arguments=_arguments())
    assert digest_mismatches(checkpoint) is None  # an older checkpoint: no digests, a warning on resume
    assert any("no lion_hf_digests.json" in w for w in plan_output_dir(tmp_path, "true", _arguments()).warnings)
    write_digests(checkpoint)
    assert digest_mismatches(checkpoint) == [] and damaged_files(checkpoint) == []
    weights = checkpoint / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last weight: the safetensors header still describes the file exactly
    weights.write_bytes(bytes(raw))
    assert damaged_files(checkpoint) == [f"{weights}: its sha256 differs from the one recorded in "
                                         "lion_hf_digests.json when it was saved"]
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is damaged: .*model\.safetensors: its sha256 differs"):
        plan_output_dir(tmp_path, "true", _arguments())


def test_a_symlinked_checkpoint_is_refused_and_nothing_outside_the_folder_is_touched(tmp_path):
    outside = make_checkpoint(tmp_path / "elsewhere" / "checkpoint-9", arguments=_arguments())
    out = tmp_path / "out"
    make_checkpoint(out / "checkpoint-4", arguments=_arguments())
    (out / "checkpoint-9").symlink_to(outside, target_is_directory=True)
    for resume, overwrite in ((None, True), ("true", False), (None, False)):
        with pytest.raises(CheckpointError, match=rf"holds checkpoint-\* names that are symbolic links "
                                                  rf"\(checkpoint-9 -> {outside}\)"):
            plan_output_dir(out, resume, _arguments(), overwrite=overwrite)
    assert (outside / "model.safetensors").is_file() and (out / "checkpoint-9").is_symlink()


def test_the_output_lock_is_held_against_a_real_second_process_and_dropped_when_it_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lion_hf.experiments.checkpoints import OutputLock, lock_output_dir

    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lion_hf.experiments.checkpoints import lock_output_dir; "
                               "lock_output_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out)],
        cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"output_dir {out} is being written by another run "
                                                  rf"\(pid {holder.pid} on host .*--output_dir"):
            lock_output_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the OS releases a dead process's flock: a killed run never leaves the folder stuck
        try:
            lock = lock_output_dir(out)
            break
        except CheckpointError:
            assert time.monotonic() < deadline, "the killed holder's lock was not released"
            time.sleep(0.05)
    with pytest.raises(CheckpointError, match="being written by another run"):  # one open file per writer
        OutputLock(out).acquire()
    lock.release()
    OutputLock(out).acquire().release()
