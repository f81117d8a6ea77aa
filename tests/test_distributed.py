"""DDP under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) trains what one process trains.

Tolerance: the all-reduced gradient is the mean of two half-batch means, equal to the one-process
mean up to float rounding; rounding can flip sign(c) where c ~ 0. Lion amplifies such flips (a
weight that moved the other way changes every later gradient a little): measured here, 1 element
of 17,900 differed after 1 step, 5 after 2, 212 after 4, 1,182 after 8. So the test compares after
2 steps and allows 0.5%; a DDP bug (ranks stepping on their own half-batch gradient) makes a
large share of elements differ from the first step.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "distributed_train.py"
FSDP2_SCRIPT = Path(__file__).resolve().parent / "fsdp2_lion.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _launch(extra, tmp_path, out):
    # --multi_gpu (or --use_fsdp) picks accelerate's torchrun launcher; the script's use_cpu=True
    # makes it gloo on CPU (accelerate's --cpu launcher would need mpirun for two processes).
    return _run(
        [sys.executable, "-m", "accelerate.commands.launch", *extra, "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
         "--per_device_batch", "4", "--max_steps", "2", "--out", str(out), "--workdir", str(tmp_path / out.stem)],
        tmp_path,
    )


def _assert_same_training(one, two):
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    off = total = 0
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert float(diff.max()) <= 2 * 1e-3 * 2 + 1e-6, name
        off += int((diff > 1e-5).sum())
        total += diff.numel()
    assert off <= 0.005 * total, f"{off} of {total} elements differ"


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("single")
    out = tmp_path / "one.pt"
    stdout = _run([sys.executable, str(SCRIPT), "--per_device_batch", "8", "--max_steps", "2", "--out", str(out),
                   "--workdir", str(tmp_path / "w")], tmp_path)
    assert "world_size=1 steps=2" in stdout, stdout
    return out


def test_ddp_two_cpu_processes_match_one(single_process_run, tmp_path):
    out = tmp_path / "ddp.pt"
    stdout = _launch(["--multi_gpu"], tmp_path, out)
    assert "world_size=2 steps=2" in stdout, stdout
    _assert_same_training(single_process_run, out)


def test_lion_on_fsdp2_dtensor_shards(tmp_path):
    # accelerate applies FSDP only on GPU distributed types, so on CPU the test shards with
    # torch's fully_shard directly (gloo) and checks each impl against an unsharded replica.
    stdout = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(FSDP2_SCRIPT)],
        tmp_path,
    )
    for impl in ("for_loop", "foreach", "compiled"):
        assert f"{impl}: sharded=True max_diff=" in stdout, stdout
    assert "skip_step: verdicts=[(1, True), (1, True)]" in stdout, stdout
    assert "dcp resume: key types=['str'] same=True" in stdout, stdout
    assert "FAILED" not in stdout, stdout
