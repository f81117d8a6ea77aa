"""DirectCompiled: the compiled Lion step called without dynamo once its graph exists."""

from __future__ import annotations

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim import lion as lion_module
from lion_hf.optim.compiled_call import DirectCompiled


def _scale_add(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: torch.Tensor) -> None:
    for x, y in zip(xs, ys):
        x.mul_(alpha[0]).add_(y)


def test_later_calls_skip_dynamo_and_compute_the_same():
    fn = DirectCompiled(_scale_add, options={})
    xs = [torch.ones(5), torch.ones(9)]
    fn("fp32", xs, [torch.full((5,), 2.0), torch.full((9,), 3.0)], torch.tensor([0.5]))
    assert fn.direct_signatures == 1
    # New lengths and new tensors: the direct call reads them from the arguments.
    xs = [torch.ones(4), torch.ones(11)]
    fn("fp32", xs, [torch.full((4,), 1.0), torch.full((11,), -1.0)], torch.tensor([3.0]))
    torch.testing.assert_close(xs[0], torch.full((4,), 4.0), rtol=0, atol=0)
    torch.testing.assert_close(xs[1], torch.full((11,), 2.0), rtol=0, atol=0)


def test_no_signature_means_always_dynamo():
    fn = DirectCompiled(_scale_add, options={})
    for _ in range(2):
        xs = [torch.ones(3)]
        fn(None, xs, [torch.ones(3)], torch.tensor([2.0]))
        torch.testing.assert_close(xs[0], torch.full((3,), 3.0))
    assert fn.direct_signatures == 0


def _train(steps_grads, shapes, nonfinite_grad, force_dynamo):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Lion(params, lr=1e-2, weight_decay=0.1, impl="compiled", nonfinite_grad=nonfinite_grad)
    chunk_step = lion_module._get_compiled_chunk()
    saved = dict(chunk_step._direct)
    for grads in steps_grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if force_dynamo:
            # An empty table and no kept plans: every chunk goes through dynamo (its compiled
            # graph is cached there), with tensors viewed in this step.
            chunk_step._direct.clear()
            lion_module._plans.clear()
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
    assert lion_module._get_compiled_chunk().direct_signatures >= 1
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
    params, _, exp_avgs, comps = opt._collect(opt.param_groups[0])
    return lion_module._plans.get(lion_module._plan_key(params, exp_avgs, comps))


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


def test_a_kept_plan_dies_with_its_optimizer_and_its_params():
    import gc

    p = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([p], lr=0.1, impl="compiled")
    p.grad = torch.ones(6)
    opt.step()
    n_plans = len(lion_module._plans)
    assert _kept_plan(opt) is not None
    del opt  # the model lives on: the plan's view of the momentum must not keep it alive
    gc.collect()
    assert len(lion_module._plans) == n_plans - 1
    opt = Lion([p], lr=0.1, impl="compiled")
    p.grad = torch.ones(6)
    opt.step()
    assert len(lion_module._plans) == n_plans
    del opt, p  # and a plan dies with its params
    gc.collect()
    assert len(lion_module._plans) == n_plans - 1
