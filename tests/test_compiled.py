"""The compiled impl: direct calls, chunk plans kept from step to step, their checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim import compiled


def _train(steps_grads, shapes, nonfinite_grad, force_dynamo):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Lion(params, lr=1e-2, weight_decay=0.1, impl="compiled", nonfinite_grad=nonfinite_grad)
    chunk_step = compiled._get_compiled_chunk()
    saved = dict(chunk_step._direct)
    for grads in steps_grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if force_dynamo:
            # An empty table and no kept plans: every chunk goes through dynamo (its compiled
            # graph is cached there), with tensors viewed in this step.
            chunk_step._direct.clear()
            compiled._plans.clear()
        opt.step()
    chunk_step._direct.update(saved)  # later tests in this process keep the direct calls
    return [p.detach().clone() for p in params] + [opt.state[p]["exp_avg"].clone() for p in params]


@pytest.mark.parametrize("nonfinite_grad", ["skip_elements", "propagate"])
def test_compiled_lion_direct_calls_match_dynamo_bit_for_bit(nonfinite_grad):
    # 24 tensors (two chunks, one padded), a 1-element leftover, a strided grad; a NaN in step 2.
    shapes = [(50, 3), (7,), (1,), (300,), (2,), (64, 64)] * 4
    gen = torch.Generator().manual_seed(2)
    steps_grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    steps_grads[1][0][3, 1] = float("nan")
    steps_grads[2][5] = torch.randn(64, 64, generator=gen).t()
    direct = _train(steps_grads, shapes, nonfinite_grad, force_dynamo=False)
    assert compiled._get_compiled_chunk().direct_signatures >= 1
    via_dynamo = _train(steps_grads, shapes, nonfinite_grad, force_dynamo=True)
    for a, b in zip(direct, via_dynamo):
        assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.isnan(), b.isnan()))
    if nonfinite_grad == "skip_elements":  # the flags are part of the signature: the NaN was masked
        assert all(torch.isfinite(t).all() for t in direct)


def test_compiled_lion_rejects_a_grad_of_another_length():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.1, impl="compiled")
    p.grad = torch.ones(6)
    opt.step()
    # The graph is called without guards, so a mismatch must be caught before it runs.
    opt.state[p]["exp_avg"] = torch.zeros(5)
    p.grad = torch.ones(6)
    with pytest.raises(ValueError, match=r"momentum of shape \(5,\)"):
        opt.step()


def test_the_policy_is_part_of_the_signature():
    # Capture the propagate graph first; a skip_elements step must not run it.
    for policy in ("propagate", "skip_elements"):
        p = torch.nn.Parameter(torch.ones(8))
        opt = Lion([p], lr=0.1, impl="compiled", nonfinite_grad=policy)
        for _ in range(2):  # the second step is a direct call
            p.grad = torch.tensor([1.0, float("nan")] * 4)
            opt.step()
    assert torch.equal(p.detach()[1::2], torch.ones(4)) and torch.isfinite(opt.state[p]["exp_avg"]).all()


def _kept_plan(opt):
    params, _, exp_avgs, comps = opt._collect(opt.param_groups[0], opt._states_by_id())
    return compiled._plans.get(compiled._plan_key(params, exp_avgs, comps))


def test_a_kept_plan_is_reused_and_renewed_when_a_param_moves():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.1, impl="compiled", nonfinite_grad="propagate")
    p.grad = torch.ones(6)
    opt.step()
    plan = _kept_plan(opt)
    assert plan is not None
    p.grad = torch.ones(6)
    opt.step()
    assert _kept_plan(opt) is plan
    p.data = torch.full((6,), 5.0)  # new storage: the views kept from step 2 must not be used
    p.grad = torch.ones(6)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((6,), 4.9))
    assert _kept_plan(opt) is not plan
    plan = _kept_plan(opt)
    p.data = p.data[:4]  # same start, fewer elements: a kept view would write past the end
    p.grad = torch.ones(4)
    opt.state[p]["exp_avg"] = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 4.8))
    assert _kept_plan(opt) is not plan
    p.data = p.data[:2]  # cut again, and the grad left from the last step is still 4 long
    with pytest.raises(ValueError, match="grad of shape"):
        opt.step()


def test_a_kept_plan_rewrites_its_hyperparameter_tensor_every_step():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.5, weight_decay=0.2, impl="compiled", nonfinite_grad="propagate")
    p.grad = torch.ones(6)
    opt.step()  # p = -0.5
    hyper = _kept_plan(opt).cpu_hyper[0]
    opt.param_groups[0]["lr"] = 0.25  # what a scheduler does between steps
    p.grad = torch.ones(6)
    opt.step()  # p = -0.5 * (1 - 0.25 * 0.2) - 0.25
    assert _kept_plan(opt).cpu_hyper[0] is hyper
    torch.testing.assert_close(hyper, torch.tensor([0.25, 0.95, 0.9, 0.99]))
    torch.testing.assert_close(p.detach(), torch.full((6,), -0.5 * 0.95 - 0.25))


def test_cpu_params_step_under_another_default_device():
    # torch.set_default_device("cuda") with a CPU model: the step's own small tensors (the
    # hyperparameters, the rounding seeds) must still be made on the CPU. "meta" stands in.
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.1, impl="compiled", nonfinite_grad="propagate", state_dtype="bf16")
    p.grad = torch.ones(6)
    with torch.device("meta"):
        opt.step()
        opt.step()
    torch.testing.assert_close(p.detach(), torch.full((6,), -0.2))


def test_a_kept_plan_dies_with_its_optimizer_and_its_params():
    import gc

    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.1, impl="compiled")
    p.grad = torch.ones(6)
    opt.step()
    n_plans = len(compiled._plans)
    assert _kept_plan(opt) is not None
    del opt  # the model lives on: the plan's view of the momentum must not keep it alive
    gc.collect()
    assert len(compiled._plans) == n_plans - 1
    opt = Lion([p], lr=0.1, impl="compiled")
    p.grad = torch.ones(6)
    opt.step()
    assert len(compiled._plans) == n_plans
    del opt, p  # and a plan dies with its params
    gc.collect()
    assert len(compiled._plans) == n_plans - 1


def test_a_model_alive_at_interpreter_exit_leaves_no_error_behind():
    # At exit this module's globals may be cleared before a global model dies. A plan that
    # something else still holds (here a global of the script, as in a profiling session) keeps
    # its weak references, whose callbacks must still work then (they printed one
    # "Exception ignored" per tensor).
    script = (
        "import torch\n"
        "from lion_hf import Lion\n"
        "params = [torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(3, 4))]\n"
        "opt = Lion(params, lr=0.1, impl='compiled')\n"
        "for p in params:\n"
        "    p.grad = torch.ones_like(p)\n"
        "opt.step()\n"
        "from lion_hf.optim import compiled\n"
        "assert len(compiled._plans) == 1\n"
        "plan = next(iter(compiled._plans.values()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


def test_kept_plans_are_bounded_and_an_evicted_one_is_rebuilt(monkeypatch):
    monkeypatch.setattr(compiled, "_MAX_PLANS", 2)
    monkeypatch.setattr(compiled, "_plans", {})
    params = [torch.nn.Parameter(torch.zeros(6)) for _ in range(3)]
    opts = [Lion([p], lr=0.1, impl="compiled", nonfinite_grad="propagate") for p in params]
    for _ in range(2):  # the second round steps with plans evicted by the first
        for p, opt in zip(params, opts):
            p.grad = torch.ones(6)
            opt.step()
            assert len(compiled._plans) <= 2 and _kept_plan(opt) is not None
    for p in params:
        torch.testing.assert_close(p.detach(), torch.full((6,), -0.2))


def test_each_param_rounding_runs_its_own_graph():
    # bf16 weights and momentum: both roundings take seeds, so only the rounding flag tells their
    # graphs apart. Weights in [1, 2) have an ulp of 2**-7, over 7x lr: round-to-nearest keeps
    # every weight, stochastic rounding moves ~13% of them per step.
    gen = torch.Generator().manual_seed(3)
    init = (1 + torch.rand(64, generator=gen)).to(torch.bfloat16)
    grad = torch.randn(64, generator=gen).to(torch.bfloat16)
    moved = {}
    for rounding in ("stochastic", "nearest"):  # the stochastic graph exists first
        p = torch.nn.Parameter(init.clone())
        opt = Lion([p], lr=1e-3, impl="compiled", state_dtype="bf16", param_rounding=rounding)
        for _ in range(3):  # compiled, then direct calls
            p.grad = grad.clone()
            opt.step()
        moved[rounding] = int((p.detach() != init).sum())
    assert moved["nearest"] == 0 and moved["stochastic"] > 0
