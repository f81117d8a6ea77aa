"""impl="cpp" (lion_hf/optim/cpu_kernel.py and cpu_kernel.cpp): the C++ kernel against impl="for_loop"
bit for bit for every kind of tensor it takes; what it leaves; version counters; its errors."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch
from optim_helpers import bits_equal

from lion_hf import Lion
from lion_hf.optim import cpu_kernel, dispatch
from lion_hf.optim.cpu_kernel_build import cxx_compiler
from lion_hf.optim.lion import lion

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="needs a C++ compiler")

# Lengths around the kernel's 16384-element block and its vectors, an empty tensor, a one-element
# one, and one past 2**16 elements (stochastic rounding hashes the index mod 2**16).
SHAPES = [(0,), (1,), (7,), (33, 5), (2000,), (40000,), (3, 16385), (300,), (70000,)]


@pytest.fixture
def kernel_takes_everything(monkeypatch):
    """Fail the test if any tensor of the step runs anywhere but in the kernel."""

    def elsewhere(*args, **kwargs):
        raise AssertionError("the kernel should have taken every tensor")

    monkeypatch.setattr(dispatch, "foreach_lion", elsewhere)


def _tensors(seed: int, nonfinite: bool):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    moms = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    grads[2][0] = 0.0
    moms[2][0] = 0.0  # c = 0: sign(0) = 0
    grads[2][1], moms[2][2] = -0.0, float("nan")
    # Cautious: 1 element of 2000 agrees with its gradient (the fraction is clamped to 1e-3), and
    # none of another tensor's (when minimising; maximize flips which ones agree).
    moms[4][:2000] = -10 * grads[4][:2000].sign()
    moms[4][0] = 0.0
    moms[7] = -10 * grads[7].sign()
    # fp16 edges: a subnormal, values that round to fp16's largest finite and to inf, a tie.
    params[5][:4] = torch.tensor([3e-6, 65519.0, 65520.0, 1.0 + 2**-11])
    params[8][:3] = torch.tensor([-2.0**-25, 6e-8, -65504.0])
    if nonfinite:  # in one block of the large tensors; the others stay on the fast path
        grads[3][4, 1] = float("nan")
        grads[5][20000] = float("inf")
        grads[6][2, 7] = -float("inf")
    return params, grads, moms


def _step(impl: str, params, grads, moms, comps=None, **kwargs):
    params, grads, moms = ([t.clone() for t in ts] for ts in (params, grads, moms))
    comps = None if comps is None else [None if c is None else c.clone() for c in comps]
    lion(params, grads, moms, comps, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, impl=impl, **kwargs)
    return params, moms, comps


def _assert_bits_equal(want, have, what: str) -> None:
    for shape, a, b in zip(SHAPES, want, have):
        assert a.dtype == b.dtype and bits_equal(a, b), f"{what} {shape} differs from for_loop's"


KINDS = [  # (param dtype, grad dtype, momentum dtype): every kind the kernel has
    (torch.float32, torch.float32, torch.float32), (torch.float32, torch.float32, torch.bfloat16),
    *[(p, g, m) for p in (torch.bfloat16, torch.float16) for g in (p, torch.float32)
      for m in (torch.float32, torch.bfloat16)],
]


@pytest.mark.parametrize("param_dtype,grad_dtype,state_dtype", KINDS, ids=str)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "kahan"])
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("policy", ["skip_elements", "propagate"])
def test_every_kind_is_bit_for_bit_the_for_loop_step_given_the_same_generator(
        param_dtype, grad_dtype, state_dtype, rounding, cautious, policy, kernel_takes_everything):
    """Stochastic rounding included: both impls round with the step's seeds and hash each
    element's index alike; fp16's two-neighbour rounding and Kahan residuals too."""
    if param_dtype == torch.float32 and rounding != "stochastic":
        pytest.skip("fp32 params store exactly: one rounding covers them")
    params, grads, moms = _tensors(seed=7, nonfinite=True)
    tensors = ([p.to(param_dtype) for p in params], [g.to(grad_dtype) for g in grads],
               [m.to(state_dtype) for m in moms])
    comps = None
    if rounding == "kahan":  # a residual of under half an ulp, as a real run leaves it
        gen = torch.Generator().manual_seed(8)
        comps = [(p.float() * torch.rand(p.shape, generator=gen) * 2**-12).to(param_dtype) for p in tensors[0]]
    flags = dict(cautious=cautious, nonfinite_grad=policy, param_rounding=rounding)
    torch.manual_seed(11)
    want = _step("for_loop", *tensors, comps, **flags)
    torch.manual_seed(11)
    have = _step("cpp", *tensors, comps, **flags)
    _assert_bits_equal(want[0], have[0], "param")
    _assert_bits_equal(want[1], have[1], "momentum")
    if comps is not None:
        _assert_bits_equal(want[2], have[2], "Kahan residual")
    assert any(not torch.equal(a, b) for a, b in zip(have[0], tensors[0])), "nothing moved"


@pytest.mark.parametrize("maximize,cautious", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("policy", ["skip_elements", "propagate"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_is_bit_for_bit_the_for_loop_step(maximize, cautious, policy, threads, kernel_takes_everything):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = _tensors(seed=threads, nonfinite=True)
        flags = dict(maximize=maximize, cautious=cautious, nonfinite_grad=policy)
        want, have = _step("for_loop", *tensors, **flags), _step("cpp", *tensors, **flags)
    finally:
        torch.set_num_threads(previous)
    _assert_bits_equal(want[0], have[0], "param")
    _assert_bits_equal(want[1], have[1], "momentum")
    params, _, moms = tensors
    if cautious and not maximize:  # the clamped fraction scaled the one agreeing update by 1000
        assert abs(float(have[0][4][0] - params[4][0] * (1 - 0.01 * 0.1))) > 5
    if policy == "skip_elements":  # the non-finite elements kept their values
        assert have[0][3][4, 1] == params[3][4, 1] and have[1][5][20000] == moms[5][20000]
    else:
        assert torch.isinf(have[1][5][20000])


def test_fp16_conversions_match_torch_on_every_bit_pattern(kernel_takes_everything):
    """With lr 0 a step leaves w = p (+ its Kahan residual) and stores it back, so the kernel's fp16
    load and round-to-nearest meet every finite fp16 value, and every value a quarter, half and
    three quarters of an ulp above it (ties, subnormals, the round to inf above 65504 included)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every[torch.isfinite(every)]
    hyper = dict(lr=0.0, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    p = finite.clone()
    lion([p], [torch.zeros_like(p)], [torch.zeros(p.shape)], param_rounding="nearest", **hyper)
    assert bits_equal(p, finite), "an fp16 value did not survive the kernel's load and store"
    magnitude = finite.abs()
    above = (magnitude.view(torch.int16) + 1).view(torch.float16).float()  # the next fp16 magnitude
    ulp = torch.where(torch.isinf(above), torch.tensor(32.0), above - magnitude.float())
    for fraction in (0.25, 0.5, 0.75):
        q, comp = finite.clone(), (ulp * fraction * torch.where(finite < 0, -1.0, 1.0)).half()
        w = finite.float() + comp.float()
        lion([q], [torch.zeros_like(q)], [torch.zeros(q.shape)], [comp], param_rounding="kahan", **hyper)
        assert bits_equal(q, w.half()), f"round-to-nearest differs from torch's at {fraction} ulp"
        assert bits_equal(comp, (w - w.half().float()).half()), f"the residual differs at {fraction} ulp"


def _every_bf16_pattern(seed: int) -> torch.Tensor:
    """Every bf16 bit pattern (NaNs, infs, subnormals, both zeros, the largest finite value) in a
    seeded order, and 13 more, so that the tensor ends in a partial vector of the kernel's loop."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(seed))]
    return torch.cat([every, every[:13]])


# lr 1e-40 leaves subnormal results (rounded as integers, where the CPU's bf16 conversion would
# flush them to zero), 0.01 ordinary ones, 1e36 ones past bf16's largest finite value (rounded to inf).
BF16_EDGE_LRS = [(1e-40, 0.1), (0.01, 0.1), (1e36, 0.0)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "kahan"])
@pytest.mark.parametrize("policy", ["skip_elements", "propagate"])
def test_bf16_stores_match_for_loop_on_every_bit_pattern(state_dtype, grad_dtype, rounding, policy,
                                                         kernel_takes_everything):
    """The kernel's vector loop for bf16 weights and momenta (and its scalar tail) meets every bf16
    value as a weight, a momentum, a grad and a Kahan residual, each in another order."""
    params = [_every_bf16_pattern(1)]
    grads = [_every_bf16_pattern(2).to(grad_dtype)]
    moms = [_every_bf16_pattern(3).to(state_dtype)]
    comps = [_every_bf16_pattern(4)] if rounding == "kahan" else None
    if comps is not None:
        comps[0][::2] = 0  # half the weights without a residual: w = p, subnormal ones included
    for lr, weight_decay in BF16_EDGE_LRS:
        flags = dict(lr=lr, beta1=0.9, beta2=0.99, weight_decay=weight_decay, nonfinite_grad=policy,
                     param_rounding=rounding)
        results = []
        for impl in ("for_loop", "cpp"):
            tensors = [t.clone() for t in params], [t.clone() for t in grads], [t.clone() for t in moms]
            kahan = None if comps is None else [t.clone() for t in comps]
            torch.manual_seed(5)
            lion(*tensors, kahan, impl=impl, **flags)
            results.append((tensors[0][0], tensors[2][0], None if kahan is None else kahan[0]))
        (want_p, want_m, want_c), (have_p, have_m, have_c) = results
        assert bits_equal(want_p, have_p), f"param at lr {lr}"
        assert bits_equal(want_m, have_m), f"momentum at lr {lr}"
        if comps is not None:
            assert bits_equal(want_c, have_c), f"Kahan residual at lr {lr}"
        assert not bits_equal(want_p, params[0]), "nothing moved"
        # Each lr reached what it is there for.
        finite = want_p[torch.isfinite(params[0])].float()
        if lr < 1e-30:
            assert int(((finite != 0) & (finite.abs() < 2.0**-126)).sum()) > 100, "subnormal weights"
        elif lr > 1e30:
            assert torch.isinf(finite).any(), "weights rounded past the largest finite value"


@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "kahan"])
def test_bf16_weights_with_8bit_state_match_for_loop_on_every_bit_pattern(rounding, kernel_takes_everything):
    """The 8-bit momentum's path runs the same vector loop on each block of 256 (fp32 momentum)."""
    results = []
    for impl in ("for_loop", "cpp"):
        p = torch.nn.Parameter(_every_bf16_pattern(1))
        opt = Lion([p], lr=0.01, weight_decay=0.1, state_dtype="int8", param_rounding=rounding, impl=impl,
                   nonfinite_grad="skip_elements")
        for step in range(2):
            p.grad = _every_bf16_pattern(2 + step)
            torch.manual_seed(step)
            opt.step()
        results.append([p.detach(), *opt.state[p].values()])
    assert results[1][1].dtype == torch.int8
    assert all(bits_equal(a, b) for a, b in zip(*results))


def test_version_counters_are_bumped():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = Lion([p], lr=0.1, impl="cpp")
    saved = p * 1.0
    loss = (saved * p).sum()  # saves p for the backward pass
    before = p._version
    opt.step()
    assert p._version > before and opt.state[p]["exp_avg"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_grad_of_a_third_dtype_is_taken_as_its_fp32_value(kernel_takes_everything):
    """An fp16 grad on a bf16 param (or a float64 grad) is upcast as lion_tensor upcasts it."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(500, generator=gen).bfloat16(), torch.randn(300, generator=gen)]
    grads = [torch.randn(500, generator=gen).half(), torch.randn(300, generator=gen).double()]
    moms = [torch.zeros(500), torch.zeros(300)]
    torch.manual_seed(0)
    want = _step("for_loop", params, grads, moms)
    torch.manual_seed(0)
    have = _step("cpp", params, grads, moms)
    for a, b in zip(want[0] + want[1], have[0] + have[1]):
        assert bits_equal(a, b)


def test_a_kind_the_kernel_does_not_know_is_an_error_before_any_update(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_kind_table", lambda flags: defaultdict(lambda: 3))  # param bits 3: no dtype
    params, grads, moms = [torch.zeros(5)], [torch.ones(5)], [torch.zeros(5)]
    with pytest.raises(RuntimeError, match="does not know 1 tensor kind"):
        lion(params, grads, moms, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    assert torch.equal(params[0], torch.zeros(5)) and torch.equal(moms[0], torch.zeros(5))


def test_lion_under_auto_runs_the_kernel_once_per_step(monkeypatch):
    calls = []
    kernel = cpu_kernel.kernel()
    monkeypatch.setattr(cpu_kernel, "_kernel", lambda *args: calls.append(args[0]) or kernel(*args))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = Lion(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert calls == [4], "one call for all 4 tensors"


@pytest.mark.parametrize("third_dtype_grad", [False, True])
def test_the_pointers_the_check_read_step_several_groups_as_for_loop_does(third_dtype_grad, monkeypatch,
                                                                          kernel_takes_everything):
    """The dispatcher hands the kernel the data_ptrs and dtypes its tensor check read (every tensor
    contiguous): several groups, 8-bit momenta with their block scales among fp32 ones and Kahan
    residuals in one group, and (third_dtype_grad) one group whose grad the kernel upcasts, so that its
    pointers are read again while the others' are not. Bit for bit for_loop's step."""
    handed = []
    cpp_lion = cpu_kernel.cpp_lion

    def spy(groups, **kwargs):
        handed.append(kwargs.get("checked") is not None)
        return cpp_lion(groups, **kwargs)

    monkeypatch.setattr(cpu_kernel, "cpp_lion", spy)
    shapes = [(64, 80), (33,), (4096,), (17, 3)]

    def build(impl):
        gen = torch.Generator().manual_seed(5)
        groups = [
            {"params": [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes],
             "state_dtype": "int8", "param_rounding": "kahan"},
            {"params": [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes[:2]],
             "state_dtype": "bf16"},
            {"params": [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes[1:]], "state_dtype": "int8",
             "weight_decay": 0.5},
        ]
        return Lion(groups, lr=0.01, weight_decay=0.1, impl=impl)

    want, have = build("for_loop"), build("cpp")
    for step in range(3):
        for opt in (want, have):
            gen = torch.Generator().manual_seed(100 + step)
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if third_dtype_grad:
                p = opt.param_groups[1]["params"][0]
                p.grad_dtype = None  # torch then takes a grad of another dtype
                p.grad = p.grad.half()
            torch.manual_seed(step)
            opt.step()
    assert handed == [True] * 3
    for group_want, group_have in zip(want.param_groups, have.param_groups):
        for a, b in zip(group_want["params"], group_have["params"]):
            assert bits_equal(a.detach(), b.detach())
            state_want, state_have = want.state[a], have.state[b]
            assert sorted(state_want) == sorted(state_have)
            for key in state_want:
                assert bits_equal(state_want[key], state_have[key]), key
    assert any(s.get("exp_avg_scale") is not None for s in have.state.values())
    assert any(s.get("kahan_comp") is not None for s in have.state.values())
