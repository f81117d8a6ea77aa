"""Lion, the class and the functional step, through every impl: against the float64 reference,
the policies, state dicts and resume, low-precision weights, convergence.

Tolerances (relative to the reference value, per storage dtype):
  params  fp32 1e-6, fp16 2**-10, bf16 2**-7  (one ulp of round-to-nearest, plus fp32 arithmetic)
  state   fp32 1e-6, bf16 2**-7              (one ulp: stochastic rounding moves to a neighbour)
"""

from __future__ import annotations

import math

import pytest
import torch
from lion_reference import lion_reference_step
from optim_helpers import assert_close_rel, roundtrip, stepped_lion

from lion_hf import Lion

CPU_IMPLS = ["for_loop", "foreach", "cpp"]
# triton runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py).
ALL_IMPLS = [*CPU_IMPLS, "triton"]


PARAM_RTOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


STATE_RTOL = {"fp32": 1e-6, "bf16": 2**-7}


SHAPES = [(0,), (1,), (7,), (33, 5), (2, 3, 4), (300,)]


def _run_against_reference(impl, param_dtype, state_dtype, steps=4, device="cpu", **flags):
    """Two groups with different hyperparameters, one grad=None param, one frozen-then-unfrozen."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, param_dtype)) for s in SHAPES]
    late = params[3]  # frozen for the first two steps (grad None), then trained
    groups = [
        {"params": params[:3], "lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99)},
        {"params": params[3:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
    ]
    opt = Lion(groups, impl=impl, state_dtype=state_dtype, **flags)
    for step in range(steps):
        before = {p: (p.detach().clone(), opt.state[p]["exp_avg"].clone() if p in opt.state else None) for p in params}
        for i, p in enumerate(params):
            skip = (i == 2 and step == 1) or (p is late and step < 2)
            p.grad = None if skip else (torch.randn(p.shape, generator=gen) * 0.1).to(device, param_dtype)
        opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                p0, m0 = before[p]
                if p.grad is None:
                    assert torch.equal(p.detach(), p0), "a param without grad moved"
                    continue
                m0 = torch.zeros_like(p, dtype=torch.float64) if m0 is None else m0
                p0, m0 = p0.cpu(), m0.cpu()
                ref_p, ref_m = lion_reference_step(
                    p0, p.grad.cpu(), m0, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                    weight_decay=group["weight_decay"], maximize=flags.get("maximize", False),
                    cautious=flags.get("cautious", False),
                )
                assert_close_rel(
                    p.detach().cpu(), ref_p, PARAM_RTOL[param_dtype], f"param {tuple(p.shape)} step {step}"
                )
                assert_close_rel(
                    opt.state[p]["exp_avg"].cpu(), ref_m, STATE_RTOL[state_dtype], f"state {tuple(p.shape)}"
                )
                assert opt.state[p]["exp_avg"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
    assert late in opt.state, "the unfrozen param never got state"
    return opt


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "cpp"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_cpu_impls_match_reference(impl, param_dtype, state_dtype):
    _run_against_reference(impl, param_dtype, state_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["foreach", "triton"])
@pytest.mark.parametrize(
    "param_dtype,state_dtype", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp32")]
)
def test_cuda_impls_match_reference(impl, param_dtype, state_dtype):
    _run_against_reference(impl, param_dtype, state_dtype, device="cuda")
    _run_against_reference(impl, param_dtype, state_dtype, device="cuda", maximize=True, cautious=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_maximize_and_cautious_match_reference(impl):
    _run_against_reference(impl, torch.float32, "fp32", maximize=True, cautious=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_sign_of_zero_is_zero_and_decay_is_decoupled(impl):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    opt = Lion([p], lr=0.1, weight_decay=0.5, impl=impl)
    p.grad = torch.zeros(4)
    opt.step()  # c = 0 everywhere: only the decay acts
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 0.5, 3.0]) * (1 - 0.1 * 0.5))
    # The update is lr * sign: independent of the gradient's scale, and decay does not depend on g.
    q = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([q], lr=0.1, weight_decay=0.5, impl=impl)
    q.grad = torch.tensor([1e-3, -1e3])
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_maximize_equals_minimizing_negated_grad(impl):
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = Lion([a], lr=1e-2, impl=impl, maximize=True)
    opt_b = Lion([b], lr=1e-2, impl=impl)
    for _ in range(3):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_is_evaluated_with_grad_and_loss_returned():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = Lion([w], lr=0.5, impl="foreach")

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 4.0
    assert float(w) == pytest.approx(1.5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_scheduler_sets_the_step_size(impl):
    p = torch.nn.Parameter(torch.zeros(8))
    opt = Lion([p], lr=1.0, impl=impl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
    for step in range(4):
        before = p.detach().clone()
        p.grad = torch.ones(8)
        opt.step()
        sched.step()
        torch.testing.assert_close(before - p.detach(), torch.full((8,), 0.1 * (step + 1)))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nonfinite_skip_elements_leaves_them_untouched(impl):
    p = torch.nn.Parameter(torch.randn(6))
    opt = Lion([p], lr=0.1, weight_decay=0.1, impl=impl)
    p.grad = torch.ones(6)
    opt.step()
    p0, m0 = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    p.grad = torch.tensor([1.0, float("nan"), -1.0, float("inf"), float("-inf"), 2.0])
    opt.step()
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.equal(p.detach()[bad], p0[bad]) and torch.equal(opt.state[p]["exp_avg"][bad], m0[bad])
    assert not torch.equal(p.detach()[~bad], p0[~bad])
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_nonfinite_skip_step_and_raise(impl):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = Lion([{"params": [a]}, {"params": [b]}], lr=0.1, impl=impl, nonfinite_grad="skip_step")
    a.grad, b.grad = torch.ones(5), torch.tensor([1.0, float("nan"), 1.0])
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0), "skip_step must leave every group untouched"
    assert opt.skipped_steps == 1
    b.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(a, a0) and opt.skipped_steps == 1

    opt = Lion([a], lr=0.1, impl=impl, nonfinite_grad="raise")
    a.grad = torch.full((5,), float("inf"))
    a1 = a.detach().clone()
    with pytest.raises(RuntimeError, match="NaN or inf"):
        opt.step()
    assert torch.equal(a, a1)


def test_nonfinite_propagate_does_not_check():
    # What the default policy prevents: the NaN lands in the momentum, and that element then
    # stops learning for good (torch.sign(nan) is nan or 0 depending on the kernel).
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lion([p], lr=0.1, impl="foreach", nonfinite_grad="propagate")
    p.grad = torch.tensor([float("nan"), 1.0, 1.0])
    opt.step()
    assert torch.isnan(opt.state[p]["exp_avg"][0])


def test_bad_params_and_grads():
    with pytest.raises(ValueError, match="complex"):
        Lion([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Lion([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="lr"):
        Lion([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -3.0}])
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Lion([p], impl="foreach")
    p.grad = torch.ones(4, 3).to_sparse(2)  # a sparse gradient of another form than nn.Embedding(sparse=True)'s
    with pytest.raises(ValueError, match="2 sparse dims; Lion takes sparse gradients in COO layout, sparse along"):
        opt.step()
    assert torch.equal(p, torch.zeros(4, 3))


@pytest.mark.parametrize("src,dst", [("foreach", "cpp"), ("cpp", "for_loop"), ("for_loop", "foreach"),
                                     ("triton", "cpp")])
def test_state_dict_moves_between_impls(src, dst):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in [(4, 5), (5,), (1,)]]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(6)]

    def make(impl):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        return ps, Lion([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}], lr=1e-2, impl=impl)

    straight, opt = make(src)
    for g in grads:
        for p, gi in zip(straight, g):
            p.grad = gi.clone()
        opt.step()

    first, opt_a = make(src)
    for g in grads[:3]:
        for p, gi in zip(first, g):
            p.grad = gi.clone()
        opt_a.step()
    saved = roundtrip(opt_a.state_dict())
    resumed, opt_b = make(dst)
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    opt_b.load_state_dict(saved)
    assert opt_b.impl == dst
    for g in grads[3:]:
        for p, gi in zip(resumed, g):
            p.grad = gi.clone()
        opt_b.step()
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_load_keeps_fp32_state_of_bf16_params():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = Lion([p], lr=1e-2, impl="foreach")
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    exact = opt.state[p]["exp_avg"].clone()
    assert exact.dtype == torch.float32
    opt2 = Lion([p], lr=1e-2, impl="foreach")
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg"], exact), "torch's default cast would round this through bf16"


@pytest.mark.parametrize("impl", ["foreach", "cpp"])
def test_bf16_momentum_tracks_fp32_where_round_to_nearest_freezes(impl):
    # beta2 = 0.9999: each step moves m by 1e-4 * (g - m), far below half a bf16 ulp near 0.5.
    n, steps, beta2 = 4096, 300, 0.9999
    p = torch.nn.Parameter(torch.zeros(n))
    opt = Lion([p], lr=0.0, betas=(0.9, beta2), impl=impl, state_dtype="bf16")
    p.grad = torch.ones(n)
    opt.step()
    opt.state[p]["exp_avg"].fill_(0.5)
    exact = torch.full((n,), 0.5, dtype=torch.float64)
    nearest = torch.full((n,), 0.5, dtype=torch.bfloat16)
    for _ in range(steps):
        opt.step()
        exact = beta2 * exact + (1 - beta2) * 1.0
        nearest = (beta2 * nearest.float() + (1 - beta2)).bfloat16()
    target = float(exact[0])
    assert float(nearest.float().mean()) == 0.5, "round-to-nearest should freeze here (the reason for SR)"
    assert abs(float(opt.state[p]["exp_avg"].float().mean()) - target) < 0.1 * (target - 0.5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_converges_on_a_small_classification_problem(impl):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=gen)
    true_w = torch.randn(10, 3, generator=gen)
    y = (x @ true_w).argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = Lion(model.parameters(), lr=3e-3, weight_decay=0.01, impl=impl)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert float(loss) < 0.2
    assert float((model(x).argmax(1) == y).float().mean()) > 0.93


# --------------------------------------------------------------------------------------
# State handling
# --------------------------------------------------------------------------------------


def test_load_state_dict_with_parameter_name_keys():
    # FSDP2's distributed checkpoint loading hands the optimizer a state keyed by names.
    params, opt = stepped_lion()
    saved = opt.state_dict()
    names = {0: "encoder.weight", 1: "encoder.bias"}
    by_name = {
        "state": {names[k]: v for k, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in saved["param_groups"]],
    }
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Lion(fresh, lr=1e-2)
    opt2.load_state_dict(by_name)
    for p, q in zip(params, fresh):
        assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_state_dtype_asked_for_now_wins_over_the_checkpoint():
    params, opt = stepped_lion()  # fp32 momentum
    resumed = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="bf16")
    resumed.load_state_dict(roundtrip(opt.state_dict()))
    assert resumed.param_groups[0]["state_dtype"] == "bf16"
    for p, q in zip(params, resumed.param_groups[0]["params"]):
        m = resumed.state[q]["exp_avg"]
        assert m.dtype == torch.bfloat16
        torch.testing.assert_close(m.float(), opt.state[p]["exp_avg"], rtol=2**-8, atol=0)


def test_deepcopy_and_pickle_keep_the_instance_settings():
    import copy
    import pickle

    _, opt = stepped_lion(impl="foreach", nonfinite_grad="skip_step")
    opt.skipped_steps = 2
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.impl, clone.nonfinite_grad, clone.skipped_steps) == ("foreach", "skip_step", 2)
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()  # would raise AttributeError if the settings were lost


# --------------------------------------------------------------------------------------
# Low-precision weights: every step is kept (param_rounding)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_constant_gradient_moves_low_precision_weights_by_every_step(impl, dtype, rounding):
    # lr 1e-4 is 1/39 of a bf16 ulp below 1.0 (1/5 for fp16): round-to-nearest never moves.
    # 2048 elements (one Triton block): the mean's noise under stochastic rounding is ~3e-4.
    p = torch.nn.Parameter(torch.ones(2048, dtype=dtype))
    opt = Lion([p], lr=1e-4, impl=impl, param_rounding=rounding)
    for _ in range(400):
        p.grad = torch.ones_like(p)
        opt.step()
    assert p.dtype == dtype
    assert abs(float(p.detach().float().mean()) - 0.96) <= 0.003
    if rounding == "kahan":
        assert opt.state[p]["kahan_comp"].dtype == dtype
    else:
        assert "kahan_comp" not in opt.state[p]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["foreach", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_cuda_low_precision_weights_keep_every_step(impl, dtype, rounding):
    p = torch.nn.Parameter(torch.ones(1 << 20, dtype=dtype, device="cuda"))
    opt = Lion([p], lr=1e-4, impl=impl, param_rounding=rounding, state_dtype="bf16")
    for _ in range(400):
        p.grad = torch.ones_like(p)
        opt.step()
    assert abs(float(p.detach().float().mean()) - 0.96) <= 0.003


@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_round_to_nearest_loses_the_steps(impl, dtype):
    """The failure the default rounding exists for (and what param_rounding='nearest' keeps)."""
    p = torch.nn.Parameter(torch.ones(256, dtype=dtype))
    opt = Lion([p], lr=1e-4, impl=impl, param_rounding="nearest")
    for _ in range(400):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.ones_like(p))


TRAJECTORY_CASES = [("for_loop", 65536, 150), ("foreach", 65536, 150), ("cpp", 65536, 150),
                    ("triton", 8192, 100)]


def _bf16_trajectory(impl, n, steps, rounding):
    """bf16 weights in [1, 2) (ulp 2**-7 = 78 x lr) under random gradients with a drift, and
    the float64 reference from the same start: (final params, optimizer, reference, mean
    distance the reference travelled)."""
    gen = torch.Generator().manual_seed(5)
    start = (1.0 + torch.rand(n, generator=gen, dtype=torch.float64)).to(torch.bfloat16)
    grads = [(torch.randn(n, generator=gen) + 0.3).bfloat16() for _ in range(steps)]
    p = torch.nn.Parameter(start.clone())
    opt = Lion([p], lr=1e-4, weight_decay=0.1, impl=impl, param_rounding=rounding)
    ref_p, ref_m = start.double(), torch.zeros(n, dtype=torch.float64)
    for g in grads:
        p.grad = g
        opt.step()
        ref_p, ref_m = lion_reference_step(ref_p, g, ref_m, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1)
    travelled = float((ref_p - start.double()).abs().mean())
    assert travelled > 0.005, "the test needs the weights to travel about an ulp"
    return p.detach().double(), opt, ref_p, travelled


@pytest.mark.parametrize("impl,n,steps", TRAJECTORY_CASES)
def test_stochastic_rounding_follows_the_float64_trajectory_without_bias(impl, n, steps):
    """The mean error against the float64 reference stays at the statistical noise of unbiased
    rounding; round-to-nearest (checked too, so the test can fail) loses most of the distance."""
    p, _, ref_p, travelled = _bf16_trajectory(impl, n, steps, "stochastic")
    err = p - ref_p
    # Each element's error is a sum of independent zero-mean roundings (one per step that moved it
    # across a bf16 value, probability ~ lr / ulp), each under one ulp.
    noise_of_mean = 2**-7 * math.sqrt(steps * 0.02) / math.sqrt(n)
    assert abs(float(err.mean())) < 6 * noise_of_mean + 1e-6, f"biased: mean error {float(err.mean()):.2e}"
    assert float(err.abs().max()) <= 2**-7 * (2 + math.sqrt(steps)), "an element drifted far from the reference"
    nearest, _, _, _ = _bf16_trajectory(impl, n, steps, "nearest")
    assert abs(float((nearest - ref_p).mean())) > 0.5 * travelled, "round-to-nearest should lose most steps here"


@pytest.mark.parametrize("impl,n,steps", TRAJECTORY_CASES)
def test_kahan_weight_plus_residual_follows_the_float64_trajectory(impl, n, steps):
    """Under Kahan summation the optimised weight is param + residual. The residual is itself
    bf16 (|residual| <= 2**-8 here, so each step can round it by up to 2**-17), so the weight
    tracks the reference to within steps * 2**-17, far inside one ulp (2**-7), and the stored
    param is within half an ulp of it. Measured: mean |error| 3e-4, against 9e-3 for stochastic
    rounding, whose per-element noise is larger (unbiased only on average)."""
    p, opt, ref_p, _ = _bf16_trajectory(impl, n, steps, "kahan")
    comp = opt.state[opt.param_groups[0]["params"][0]]["kahan_comp"].double()
    err = p + comp - ref_p
    assert float(err.abs().max()) <= steps * 2**-17, "param + residual must track the reference"
    assert float(err.abs().mean()) < 0.1 * 2**-7 and abs(float(err.mean())) < 1e-4
    assert float((p - ref_p).abs().max()) <= 2**-8 + steps * 2**-17, "the stored param is within half an ulp"


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_nonfinite_gradients_leave_low_precision_weights_untouched(impl, rounding):
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(3000, generator=gen).bfloat16())
    opt = Lion([p], lr=1e-3, weight_decay=0.1, impl=impl, param_rounding=rounding, state_dtype="bf16")
    p.grad = torch.randn(3000, generator=gen).bfloat16()
    opt.step()  # non-zero momentum (and residual) first
    bad = torch.zeros(3000, dtype=torch.bool)
    bad[::7] = True
    grad = torch.randn(3000, generator=gen)
    grad[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(1000)[: int(bad.sum())]
    p.grad = grad.bfloat16()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p_before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach()[bad].view(torch.int16), p_before[bad].view(torch.int16))
    for key, value in before.items():
        assert torch.equal(opt.state[p][key][bad].view(torch.int16), value[bad].view(torch.int16)), key
    assert torch.isfinite(p.detach()).all()
    assert not torch.equal(p.detach()[~bad], p_before[~bad]), "the finite elements should have been updated"


@pytest.mark.parametrize("impl", ["foreach", "cpp"])  # cpp: its threads would race on the shared memory
def test_a_param_listed_twice_in_a_group_keeps_one_momentum_with_both_updates(impl):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="duplicate"):
        opt = Lion([p, p], lr=0.1, impl=impl, nonfinite_grad="propagate")
    p.grad = torch.ones(3)
    opt.step()
    # Both entries update the one momentum: 0.99 * (0.01 * 1) + 0.01 * 1.
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((3,), 0.0199))


@pytest.mark.parametrize("src,dst", [("foreach", "cpp"), ("cpp", "triton"), ("triton", "for_loop"),
                                     ("for_loop", "foreach")])
def test_kahan_residual_is_state_that_moves_between_impls_and_resumes(src, dst):
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen).bfloat16() for s in [(40, 50), (50,), (3000,)]]
    grads = [[torch.randn(t.shape, generator=gen).bfloat16() for t in init] for _ in range(8)]

    def make(impl):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        return ps, Lion([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}], lr=1e-3, impl=impl,
                        param_rounding="kahan", state_dtype="fp32")

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()

    straight, opt = make(src)
    steps(straight, opt, grads)
    first, opt_a = make(src)
    steps(first, opt_a, grads[:4])
    saved = roundtrip(opt_a.state_dict())
    assert all("kahan_comp" in s for s in saved["state"].values())
    assert any(s["kahan_comp"].abs().sum() > 0 for s in saved["state"].values())
    resumed, opt_b = make(dst)
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    opt_b.load_state_dict(saved)
    steps(resumed, opt_b, grads[4:])
    for a, b, _ in zip(straight, resumed, [opt.state[p] for p in straight]):
        # The same arithmetic in every impl; a different fused order can move a rounding by one ulp.
        ulp = 2.0**-7 * a.detach().float().abs().clamp(min=2**-10)
        mismatch = ((a.detach().float() - b.detach().float()).abs() > ulp).float().mean()
        assert float(mismatch) < 0.01, f"{src}->{dst}: {float(mismatch):.3%} of elements differ by > 1 ulp"
        if src == dst:
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_stochastic_rounding_resume_with_the_rng_state_equals_the_uninterrupted_run(impl):
    # Stochastic rounding draws from torch's default generator, which HF's Trainer checkpoints
    # (rng_state.pth) and restores: with it restored, a resumed run is the same run, bit for bit.
    gen = torch.Generator().manual_seed(8)
    init = torch.randn(4000, generator=gen).bfloat16()
    grads = [torch.randn(4000, generator=gen).bfloat16() for _ in range(6)]

    def make():
        p = torch.nn.Parameter(init.clone())
        return p, Lion([p], lr=1e-3, impl=impl, state_dtype="bf16")

    torch.manual_seed(1)
    p, opt = make()
    for g in grads:
        p.grad = g.clone()
        opt.step()

    torch.manual_seed(1)
    q, opt_a = make()
    for g in grads[:3]:
        q.grad = g.clone()
        opt_a.step()
    saved, rng, weights = roundtrip(opt_a.state_dict()), torch.get_rng_state(), q.detach().clone()
    torch.manual_seed(12345)  # a new process
    r, opt_b = make()
    with torch.no_grad():
        r.copy_(weights)
    opt_b.load_state_dict(saved)
    torch.set_rng_state(rng)
    for g in grads[3:]:
        r.grad = g.clone()
        opt_b.step()
    assert torch.equal(p.detach(), r.detach())
    assert torch.equal(opt.state[p]["exp_avg"], opt_b.state[r]["exp_avg"])


def test_param_rounding_asked_for_now_wins_over_the_checkpoint():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = Lion([p], lr=1e-2, impl="foreach", param_rounding="kahan")
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    assert "kahan_comp" in opt.state[p]
    opt2 = Lion([p], lr=1e-2, impl="foreach", param_rounding="stochastic")
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert opt2.param_groups[0]["param_rounding"] == "stochastic"
    opt2.step()
    assert "kahan_comp" not in opt2.state[p], "a residual nobody uses any more is freed"


def test_grad_norm_handed_over_decides_skip_step_once():
    p = torch.nn.Parameter(torch.ones(4))
    opt = Lion([p], lr=0.1, impl="foreach", nonfinite_grad="skip_step")
    p.grad = torch.ones(4)
    opt.set_grad_norm(torch.tensor(float("inf")))  # the caller's global norm: another rank had an inf
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.ones(4))
    opt.step()  # used once: this step reads the (finite) gradients itself
    assert opt.skipped_steps == 1 and not torch.equal(p.detach(), torch.ones(4))
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step()
    assert opt.skipped_steps == 2
    raising = Lion([p], lr=0.1, impl="foreach", nonfinite_grad="raise")
    raising.set_grad_norm(float("nan"))
    with pytest.raises(RuntimeError, match="gradient norm is NaN or inf"):
        raising.step()
