"""Gradient release (lion_hf/optim/release.py): each param stepped in backward, its gradient freed.

The release must compute the ordinary step bit for bit (every impl that runs on the CPU, fp32 and
bf16 weights, every momentum dtype, gradient accumulation, an lr schedule), free each gradient as
soon as its param is stepped, and refuse what it cannot honour. Under LionTrainer the same holds
for HF's loop; two DDP processes (slow) train what one process trains; a run killed with SIGKILL
resumes to the uninterrupted result (slow).
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import TokenDataset, tiny_bert  # tests/ is on sys.path under pytest
from transformers import TrainerCallback

from lion_hf import DistributedLion, GradientRelease, Lion, LionTrainer, LionTrainingArguments
from lion_hf.optim import impl_unavailable
from lion_hf.optim.options import STATE_DTYPES
from lion_hf.trainer import check_gradient_release

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LAUNCHER = TESTS / "launchers" / "release_train.py"
DATA = TokenDataset()


IMPLS = ("for_loop", "foreach", "cpp")


def _exact_cases() -> list:
    """Every impl x momentum dtype x weight dtype x accumulation; the default run keeps each impl with
    fp32 (no accumulation) and pure bf16 (accumulation 2), and every other momentum dtype with bf16
    weights in for_loop and cpp; the rest is slow."""
    cases = []
    for impl in IMPLS:
        unavailable = impl_unavailable(impl, "cpu")
        for state_dtype in STATE_DTYPES:
            for weights in ("fp32", "bf16"):
                for accumulation in (1, 2):
                    core = ((state_dtype, weights, accumulation) in {("fp32", "fp32", 1), ("bf16", "bf16", 2)}
                            or (state_dtype not in ("fp32", "bf16") and weights == "bf16" and accumulation == 2
                                and impl != "foreach"))
                    marks = [pytest.mark.skipif(unavailable is not None, reason=f"{impl} cannot run here")]
                    cases.append(pytest.param(impl, state_dtype, weights, accumulation,
                                              marks=marks if core else [*marks, pytest.mark.slow]))
    return cases


def _batch(i: int, size: int = 8) -> dict[str, torch.Tensor]:
    rows = [DATA[j % len(DATA)] for j in range(size * i, size * i + size)]
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def _train(release: bool, *, impl: str = "foreach", dtype=torch.float32, state_dtype: str = "fp32", steps: int = 3,
           accumulation: int = 1, **lion_kwargs):
    """``steps`` optimizer steps of a plain loop (loss / accumulation, a decaying lr), with or without release."""
    model = tiny_bert().to(dtype)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl, state_dtype=state_dtype, **lion_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    micro = 0
    release_handle = GradientRelease(opt, last_micro_batch=lambda: (micro + 1) % accumulation == 0) if release else None
    torch.manual_seed(1)
    for micro in range(steps * accumulation):
        (model(**_batch(micro)).loss / accumulation).backward()
        if (micro + 1) % accumulation == 0:
            opt.step()
            scheduler.step()
            opt.zero_grad()
    return model, opt, release_handle


@pytest.mark.parametrize(("impl", "state_dtype", "weights", "accumulation"), _exact_cases())
def test_released_steps_equal_ordinary_steps_bit_for_bit(impl, state_dtype, weights, accumulation):
    # bf16 weights and momenta round stochastically: equal bits need the same seeds, which the
    # release draws for the whole step at its first param, in the ordinary step's order.
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    ordinary, _, _ = _train(False, impl=impl, dtype=dtype, state_dtype=state_dtype, accumulation=accumulation)
    released, _, release = _train(True, impl=impl, dtype=dtype, state_dtype=state_dtype, accumulation=accumulation)
    start = tiny_bert().to(dtype)
    assert release.steps == 3
    assert any(not torch.equal(p, q) for p, q in zip(released.parameters(), start.parameters()))
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in released.parameters())


@pytest.mark.parametrize("bucket_numel", [0, 20_000])
def test_each_gradient_is_freed_once_its_bucket_is_stepped(bucket_numel):
    model = tiny_bert()
    params = list(model.parameters())
    opt = Lion(params, lr=1e-3)
    live_at_hook: list[int] = []  # gradient elements alive when each param's gradient is ready
    release = GradientRelease(opt, bucket_numel=bucket_numel)
    for p in params:  # registered after the release's hooks, so they run after them
        p.register_post_accumulate_grad_hook(
            lambda _: live_at_hook.append(sum(q.numel() for q in params if q.grad is not None)))
    model(**_batch(0)).loss.backward()
    assert len(live_at_hook) == len(params) and release.steps == 1
    largest = max(p.numel() for p in params)
    assert max(live_at_hook) < bucket_numel + largest, "a gradient outlived its bucket's step"
    if bucket_numel == 0:
        assert max(live_at_hook) == 0
    else:
        assert max(live_at_hook) > 0  # params wait for their bucket
    assert all(p.grad is None for p in params)
    # The same count without release: every gradient stays until the step.
    plain = tiny_bert()
    plain_params = list(plain.parameters())
    live: list[int] = []
    for p in plain_params:
        p.register_post_accumulate_grad_hook(
            lambda _: live.append(sum(q.numel() for q in plain_params if q.grad is not None)))
    plain(**_batch(0)).loss.backward()
    assert max(live) == sum(p.numel() for p in plain_params)


def test_the_lr_of_each_step_is_the_schedulers_at_that_step():
    # fp32 weights, no decay: each element moves by exactly the lr of its step (or not at all).
    p = torch.nn.Parameter(torch.ones(64))
    g = torch.linspace(-1, 1, 64)
    opt = Lion([p], lr=0.1, impl="for_loop")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: [0.25, 1.0, 0.5, 0.125][min(k, 3)])
    GradientRelease(opt)
    for k in range(4):
        lr = scheduler.get_last_lr()[0]
        before = p.detach().clone()
        (p * g).sum().backward()
        opt.step()
        scheduler.step()
        moved = (p.detach() - before).abs()
        assert p.grad is None
        assert torch.allclose(moved[g != 0], torch.full_like(moved[g != 0], lr), rtol=0, atol=1e-6), (k, lr)


def test_step_raises_when_a_gradient_was_left_unstepped():
    model = tiny_bert()
    opt = Lion(model.parameters(), lr=1e-3)
    release = GradientRelease(opt, last_micro_batch=lambda: False)
    before = [p.detach().clone() for p in model.parameters()]
    model(**_batch(0)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # kept for the next micro-batch
    with pytest.raises(RuntimeError, match="still holding a gradient"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    release.remove()
    opt.step()  # released: the ordinary step takes the accumulated gradients
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_paused_keeps_the_gradients_and_remove_restores_the_ordinary_step():
    model = tiny_bert()
    opt = Lion(model.parameters(), lr=1e-3)
    with GradientRelease(opt) as release:
        assert opt.gradient_release is release and release.active
        with release.paused():
            model(**_batch(0)).loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        model(**_batch(1)).loss.backward()  # the step's last micro-batch: both gradients, stepped and freed
        assert all(p.grad is None for p in model.parameters()) and release.steps == 1
    assert opt.gradient_release is None and not release.active
    model(**_batch(2)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook left


def test_nonfinite_gradient_elements_are_skipped_one_by_one():
    p = torch.nn.Parameter(torch.ones(8))
    opt = Lion([p], lr=0.1, impl="foreach")
    GradientRelease(opt)
    g = torch.ones(8)
    g[3] = float("nan")
    (p * g).sum().backward()
    assert p[3].item() == 1.0 and opt.state[p]["exp_avg"][3].item() == 0.0
    assert torch.all(p.detach()[torch.arange(8) != 3] < 1.0)


def test_what_release_cannot_honour_is_refused():
    params = [torch.nn.Parameter(torch.ones(4))]
    for policy in ("skip_step", "raise"):
        with pytest.raises(ValueError, match=f"nonfinite_grad='{policy}'"):
            GradientRelease(Lion(params, nonfinite_grad=policy))
    with pytest.raises(ValueError, match="DistributedLion"):
        GradientRelease(DistributedLion(params))
    with pytest.raises(TypeError, match="AdamW"):
        GradientRelease(torch.optim.AdamW(params))
    opt = Lion(params)
    GradientRelease(opt)
    with pytest.raises(ValueError, match="already has a GradientRelease"):
        GradientRelease(opt)
    with pytest.raises(ValueError, match="bucket_numel must be an int >= 0"):
        GradientRelease(Lion([torch.nn.Parameter(torch.ones(2))]), bucket_numel=-1)
    # A policy changed after attaching is refused at the next step, before any param moves.
    opt.nonfinite_grad = "skip_step"
    with pytest.raises(ValueError, match="skip_step"):
        (params[0] * 2).sum().backward()
    assert torch.equal(params[0].detach(), torch.ones(4))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_backward_steps_each_param_once_as_the_ordinary_step(reentrant):
    # A reentrant checkpoint runs a backward inside a node of the outer one. Here the checkpointed
    # block is the model's last op, so the first hooks fire in that inner backward and the first
    # layer's in the outer one after it: the step must begin once and end with the outer backward
    # (bf16: every param rounds with the ordinary step's seeds).
    from torch.utils.checkpoint import checkpoint

    def run(release: bool):
        torch.manual_seed(0)
        first, second = torch.nn.Linear(8, 8).bfloat16(), torch.nn.Linear(8, 1).bfloat16()
        params = [*first.parameters(), *second.parameters()]
        opt = Lion(params, lr=1e-2, state_dtype="bf16", impl="for_loop")
        handle = GradientRelease(opt) if release else None
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
            out = checkpoint(lambda t: second(t.relu()), first(x), use_reentrant=reentrant)
            (out.float() ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        return params, handle

    ordinary, _ = run(False)
    released, handle = run(True)
    assert handle.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(ordinary, released))


def test_a_gradient_that_arrives_in_two_parts_is_refused():
    # A param used inside a reentrant checkpoint and outside it gets its gradient in two backward
    # passes, each firing the hook: a second step on a partial gradient would be a silently
    # different update, so the release raises before it.
    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(4, 1)
    opt = Lion(layer.parameters(), lr=0.1)
    GradientRelease(opt)
    x = torch.randn(2, 4, requires_grad=True)
    loss = checkpoint(layer, x, use_reentrant=True).sum() + layer.bias.sum() * 3
    with pytest.raises(RuntimeError, match="received its gradient twice in one step"):
        loss.backward()


def test_a_copy_of_the_optimizer_steps_ordinarily():
    model = tiny_bert()
    opt = Lion(model.parameters(), lr=1e-3)
    GradientRelease(opt)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.gradient_release is None


# --------------------------------------------------------------------------------------
# LionTrainer
# --------------------------------------------------------------------------------------


def _args(tmp_path, **overrides) -> LionTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
        weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        lion_impl="foreach", disable_tqdm=True, max_grad_norm=0.0, lr_scheduler_type="linear", warmup_steps=2,
    )
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LionTrainingArguments(**base)


class GradsAtStep(TrainerCallback):
    """Counts the params that hold a gradient when HF is about to step the optimizer."""

    def __init__(self, model):
        self.model, self.held = model, []

    def on_pre_optimizer_step(self, *_, **__):
        self.held.append(sum(p.grad is not None for p in self.model.parameters()))


@pytest.mark.parametrize("setup", [
    dict(gradient_accumulation_steps=1),
    dict(gradient_accumulation_steps=2),
    dict(lion_impl="cpp", bf16_model=True, lion_state_dtype="bf16"),
], ids=["accumulation1", "accumulation2", "cpp_pure_bf16"])
def test_lion_trainer_release_trains_the_ordinary_run_bit_for_bit(tmp_path, setup):
    setup = dict(setup)
    bf16 = setup.pop("bf16_model", False)
    if setup.get("lion_impl") == "cpp" and impl_unavailable("cpp", "cpu") is not None:
        pytest.skip("cpp cannot run here")
    runs = {}
    for release in (False, True):
        model = tiny_bert().to(torch.bfloat16) if bf16 else tiny_bert()
        watch = GradsAtStep(model)
        trainer = LionTrainer(model=model, args=_args(tmp_path / str(release), lion_gradient_release=release, **setup),
                              train_dataset=TokenDataset(), callbacks=[watch])
        trainer.train()
        runs[release] = trainer, watch
    (ordinary, ordinary_watch), (released, released_watch) = runs[False], runs[True]
    assert released.gradient_release is not None and released.gradient_release.steps == released.state.global_step
    assert ordinary.gradient_release is None
    assert set(released_watch.held) == {0} and set(ordinary_watch.held) == {sum(1 for _ in ordinary.model.parameters())}
    assert [h["loss"] for h in released.state.log_history if "loss" in h] == \
           [h["loss"] for h in ordinary.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in released.state.log_history if "loss" in h] == \
           [h["learning_rate"] for h in ordinary.state.log_history if "loss" in h]
    assert not any("grad_norm" in h for h in released.state.log_history)
    for (name, p), q in zip(ordinary.model.named_parameters(), released.model.parameters()):
        assert torch.equal(p, q), name


def test_lion_trainer_release_resumes_from_a_checkpoint_exactly(tmp_path):
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=8, lion_gradient_release=True)
    straight = LionTrainer(model=tiny_bert(), args=_args(tmp_path / "a", **kw), train_dataset=TokenDataset())
    straight.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-8"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert state and all(set(s) == {"exp_avg"} for s in state.values())  # the same Lion state dict
    resumed = LionTrainer(model=tiny_bert(seed=1), args=_args(tmp_path / "b", **kw), train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == straight.state.global_step == 16
    assert resumed.gradient_release.steps == 8
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_training_arguments_settle_clipping_and_refuse_what_release_cannot_run(tmp_path):
    with pytest.warns(UserWarning, match=r"clipping is off \(max_grad_norm=1 set to 0\)"):
        args = LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release=True)
    assert args.max_grad_norm == 0.0 and args.lion_nonfinite_grad == "skip_elements"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release=True, max_grad_norm=0.0,
                                     lion_nonfinite_grad="propagate")
    assert args.lion_nonfinite_grad == "propagate"
    with pytest.raises(ValueError, match="lion_nonfinite_grad='skip_step' cannot hold"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release=True, lion_nonfinite_grad="skip_step")
    with pytest.raises(ValueError, match="needs optim='lion'"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release=True, optim="adamw")
    with pytest.raises(ValueError, match="lion_distributed='majority'"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release=True, lion_distributed="majority")
    with pytest.raises(ValueError, match="lion_gradient_release must be one of"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_gradient_release="yes")
    assert check_gradient_release(args, deepspeed=False, fsdp=False) is True
    with pytest.raises(ValueError, match="cannot run under DeepSpeed"):
        check_gradient_release(args, deepspeed=True, fsdp=False)
    with pytest.raises(ValueError, match="cannot run under FSDP"):
        check_gradient_release(args, deepspeed=False, fsdp=True)


def test_lion_optimizers_refuses_release_it_could_not_attach(tmp_path):
    from lion_hf import lion_optimizers

    with pytest.raises(ValueError, match="needs LionTrainer"):
        lion_optimizers(tiny_bert(), _args(tmp_path, lion_gradient_release=True), num_training_steps=10)


def test_lion_trainer_refuses_release_of_an_optimizer_of_the_users_own(tmp_path):
    model = tiny_bert()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = LionTrainer(model=model, args=_args(tmp_path, lion_gradient_release=True), train_dataset=TokenDataset(),
                          optimizers=(adamw, None))
    with pytest.raises(ValueError, match="steps AdamW"):
        trainer.train()


def test_the_recipes_accept_the_option(tmp_path):
    from lion_hf.experiments.arguments import parse_recipe_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, training, _ = parse_recipe_args(["--output_dir", str(tmp_path), "--lion_gradient_release", "true"])
    assert training.lion_gradient_release is True and training.max_grad_norm == 0.0


# --------------------------------------------------------------------------------------
# Launched runs: DDP on two CPU processes, and a run killed with SIGKILL (slow)
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    path = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "ACCELERATE_USE_CPU": "1"}


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _launch_two(cwd: Path, script_args: list[str]) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                 "--dynamo_backend", "no", str(LAUNCHER), *script_args], cwd)


@pytest.mark.slow
def test_ddp_release_steps_each_bucket_after_its_all_reduce(tmp_path):
    """Two processes at batch 4 with release log the losses of one process at batch 8 (to float
    rounding of the mean of means) and end where two processes without release end, bit for bit:
    the comm hook steps on the all-reduced gradient, as the ordinary step after DDP's reduction.
    With accumulation 2 the synced micro-batch steps (DDP's no_sync backwards run no hook)."""
    steps = ["--max_steps", "6"]
    one = _run([sys.executable, str(LAUNCHER), "--per_device_batch", "8", "--out", "one.pt", "--workdir", "w1",
                *steps], tmp_path)
    assert "world_size=1 steps=6 released=6" in one
    two = _launch_two(tmp_path, ["--per_device_batch", "4", "--out", "two.pt", "--workdir", "w2", *steps])
    assert "world_size=2 steps=6 released=6" in two
    plain = _launch_two(tmp_path, ["--per_device_batch", "2", "--grad_accum", "2", "--out", "plain.pt", "--workdir",
                                   "w3", "--release", "0"])
    accum = _launch_two(tmp_path, ["--per_device_batch", "2", "--grad_accum", "2", "--out", "accum.pt", "--workdir",
                                   "w4"])
    assert "released=0" in plain and "world_size=2 steps=6 released=6" in accum
    one, two, plain, accum = (torch.load(tmp_path / f, weights_only=True)
                              for f in ("one.pt", "two.pt", "plain.pt", "accum.pt"))
    for a, b in zip(one["log"], two["log"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    off = sum(int(((one["params"][k] - two["params"][k]).abs() > 1e-5).sum()) for k in one["params"])
    total = sum(v.numel() for v in one["params"].values())
    assert off <= 0.005 * total, f"{off} of {total} elements differ"  # sign flips where c ~ 0 (test_distributed.py)
    for name in plain["params"]:
        assert torch.equal(plain["params"][name], accum["params"][name]), name


@pytest.mark.slow
def test_release_run_killed_with_sigkill_resumes_to_the_straight_run(tmp_path):
    """bf16 momentum (stochastic rounding: the seeds come from the generator state HF checkpoints)."""
    common = ["--per_device_batch", "8", "--max_steps", "16", "--save_steps", "4", "--lion_state_dtype", "bf16"]
    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), *common, "--out", "killed.pt", "--workdir", str(workdir),
                             "--step_sleep", "0.5"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoint-8" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for checkpoint-8"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (workdir / "checkpoint-16").exists()
    resumed = _run([sys.executable, str(LAUNCHER), *common, "--out", "resumed.pt", "--workdir", str(workdir),
                    "--resume"], tmp_path)
    assert "steps=16" in resumed
    straight = _run([sys.executable, str(LAUNCHER), *common, "--out", "straight.pt", "--workdir",
                     str(tmp_path / "straight")], tmp_path)
    assert "steps=16 released=16" in straight
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("resumed.pt", "straight.pt"))
    assert 0 < a["released"] < 16  # the resumed segment ran its steps in backward
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
