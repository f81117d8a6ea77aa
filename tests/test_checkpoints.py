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
