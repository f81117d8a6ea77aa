"""The fused Triton Lion kernel (lion_hf/optim/triton_kernel.py) against the float64 reference.

Without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1). That mode
is fixed when triton is first imported, so the variable is set here before the import (and
should also be set in tests/conftest.py, which runs earlier); if triton was nonetheless
imported in compiled mode and there is no GPU, the module is skipped. With a GPU the same
tests run the compiled kernels on CUDA, and the ``gpu`` tests run too.

Each step feeds the reference the kernel's current state upcast to float64, so errors never
accumulate and every step is checked on its own. Tolerances, per element:

  |kernel - reference| <= ROUND[dtype] * |reference| + ARITH * (sum of |terms|) + SUBNORMAL[dtype]

  ROUND    half an ulp of round-to-nearest: fp32 2**-24, bf16 2**-8, fp16 2**-11;
           a bf16 momentum (stochastic rounding) may land on either neighbour: one ulp, 2**-7
  ARITH    1e-6: fp32 arithmetic in registers (a few fp32 ulps of the largest term; also
           covers FMA contraction on GPU), relative to |p| * decay + lr * |u| for params and
           beta2 * |m| + (1 - beta2) * |g| for momenta
  SUBNORMAL fp16 only: 2**-25, half its smallest subnormal

Elements whose c = beta1 * m + (1 - beta1) * g is within fp32 rounding of zero (|c| <= 1e-6 of
its terms) may get the other sign in fp32 than in float64; their params are not compared.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from lion_reference import lion_reference_step  # noqa: E402
from optim_helpers import assert_triton_signs_are_foreachs, record_calls, two_simulated_ranks  # noqa: E402

import lion_hf.optim.triton_kernel as lion_triton  # noqa: E402
from lion_hf.optim.triton_kernel import BLOCK_SIZE, triton_lion_  # noqa: E402

if not lion_triton.INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "triton was imported in compiled mode (TRITON_INTERPRET=1 was not set before its first import) "
        "and there is no GPU; set TRITON_INTERPRET=1 in the environment or in tests/conftest.py",
        allow_module_level=True,
    )

DEVICE = torch.device("cpu" if lion_triton.INTERPRET else "cuda")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or lion_triton.INTERPRET, reason="needs a CUDA GPU (compiled)")

ROUND = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}
# bf16/fp16 params are rounded stochastically by default: to either neighbour, up to one ulp away.
PARAM_ROUND = {"stochastic": {torch.float32: 2**-24, torch.bfloat16: 2**-7, torch.float16: 2**-10}, "nearest": ROUND}
STOCHASTIC_ROUND = 2**-7
ARITH = 1e-6
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2**-25}
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _flags(**overrides):
    flags = dict(maximize=False, cautious=False, skip_nonfinite=True)
    flags.update(overrides)
    return flags


def _make(shapes, p_dtype, m_dtype, gen):
    ps = [torch.randn(s, generator=gen).to(p_dtype).to(DEVICE) for s in shapes]
    ms = [(0.1 * torch.randn(s, generator=gen)).to(m_dtype).to(DEVICE) for s in shapes]
    return ps, ms


def _grads(ps, gen, scale=0.1):
    return [(scale * torch.randn(p.shape, generator=gen)).to(p.dtype).to(DEVICE) for p in ps]


def _check_against_reference(p0, g, m0, p1, m1, *, lr, beta1, beta2, weight_decay, maximize, cautious,
                             skip_nonfinite, param_rounding="stochastic", what=""):
    """Compare one kernel step (p0, g, m0) -> (p1, m1) with the float64 reference."""
    ref_p, ref_m = lion_reference_step(
        p0, g, m0, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
        cautious=cautious, skip_nonfinite=skip_nonfinite,
    )
    p64, g64, m64 = p0.double(), g.double(), m0.double()
    if maximize:
        g64 = -g64
    with torch.no_grad():
        c = beta1 * m64 + (1 - beta1) * g64
        ambiguous = c.abs() <= ARITH * (beta1 * m64.abs() + (1 - beta1) * g64.abs())
        u = (ref_p - p64 * (1 - lr * weight_decay)).abs() / lr if lr else torch.zeros_like(p64)
        p_terms = p64.abs() * abs(1 - lr * weight_decay) + lr * torch.nan_to_num(u, posinf=0.0)
        m_terms = beta2 * m64.abs() + (1 - beta2) * g64.abs()
    stochastic = m1.dtype == torch.bfloat16
    _assert_within(p1, ref_p, PARAM_ROUND[param_rounding][p1.dtype], p_terms, SUBNORMAL[p1.dtype], ~ambiguous,
                   f"{what} param")
    _assert_within(m1, ref_m, STOCHASTIC_ROUND if stochastic else ROUND[m1.dtype], m_terms, 0.0, None,
                   f"{what} exp_avg")


def _assert_within(actual, expected, rel, terms, atol, mask, what):
    actual = actual.detach().cpu().double()
    expected = expected.cpu()
    terms = torch.nan_to_num(terms.cpu(), nan=0.0, posinf=0.0)
    same_nonfinite = (actual.isnan() == expected.isnan()).all() and torch.equal(
        actual.isinf() & (actual > 0), expected.isinf() & (expected > 0)
    ) and torch.equal(actual.isinf() & (actual < 0), expected.isinf() & (expected < 0))
    assert same_nonfinite, f"{what}: NaN/inf pattern differs from the reference"
    finite = expected.isfinite()
    if mask is not None:
        finite &= mask.cpu()
    err = (actual - expected).abs()[finite]
    tol = (rel * expected.abs() + ARITH * terms + atol)[finite]
    if err.numel():
        worst = int(torch.argmax(err - tol))
        assert bool((err <= tol).all()), (
            f"{what}: error {float(err[worst]):.3e} > tolerance {float(tol[worst]):.3e} "
            f"({int((err > tol).sum())} of {err.numel()} elements)"
        )


def _step_and_check(ps, gs, ms, flags, hyper=HYPER, what="", **kw):
    before = [(p.clone(), g.clone(), m.clone()) for p, g, m in zip(ps, gs, ms)]
    triton_lion_(ps, gs, ms, **hyper, **flags, **kw)
    for i, ((p0, g, m0), p1, m1) in enumerate(zip(before, ps, ms)):
        _check_against_reference(p0, g, m0, p1, m1, **hyper, **flags, what=f"{what} tensor {i} {tuple(p1.shape)}")


class _CountingKernel:
    """Stands in for a jit kernel and counts launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# --------------------------------------------------------------------------------------
# Correctness against the reference
# --------------------------------------------------------------------------------------

SHAPES = [(0,), (1,), (127,), (1025,), (BLOCK_SIZE + 1,), (33, 65), (0, 4)]


@pytest.mark.parametrize("p_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("m_dtype", STATE_DTYPES, ids=str)
def test_matches_reference_for_every_dtype_and_size(p_dtype, m_dtype):
    gen = torch.Generator().manual_seed(0)
    ps, ms = _make(SHAPES, p_dtype, m_dtype, gen)
    # lr changes every step (a schedule): runtime scalars, same kernel.
    for step, lr in enumerate([1e-2, 3e-3, 2e-2]):
        _step_and_check(ps, _grads(ps, gen), ms, _flags(), hyper=dict(HYPER, lr=lr), what=f"step {step}")


def test_large_fp32_tensor_matches_reference():
    gen = torch.Generator().manual_seed(1)
    ps, ms = _make([(2**20 + 3,)], torch.float32, torch.float32, gen)
    for step in range(2):
        _step_and_check(ps, _grads(ps, gen), ms, _flags(), what=f"step {step}")


def test_many_small_tensors_take_one_launch_per_dtype_group(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 300, (200,), generator=gen).tolist()
    ps32, ms32 = _make([(n,) for n in sizes[:120]], torch.float32, torch.float32, gen)
    ps16, ms16 = _make([(n,) for n in sizes[120:]], torch.bfloat16, torch.bfloat16, gen)
    # Interleave the two groups in the argument lists.
    ps = [t for pair in zip(ps32, ps16) for t in pair] + ps32[80:]
    ms = [t for pair in zip(ms32, ms16) for t in pair] + ms32[80:]
    counter = _CountingKernel(lion_triton._lion_kernel)
    monkeypatch.setattr(lion_triton, "_lion_kernel", counter)
    _step_and_check(ps, _grads(ps, gen), ms, _flags())
    assert len(counter.grids) == 2, "expected one launch per (device, param dtype, state dtype) group"
    assert sorted(g[0] for g in counter.grids) == [80, 120], "one block per small tensor"


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_maximize_and_weight_decay(maximize, weight_decay):
    gen = torch.Generator().manual_seed(3)
    ps, ms = _make([(1,), (300,), (BLOCK_SIZE + 5,)], torch.float32, torch.float32, gen)
    for _ in range(2):
        _step_and_check(ps, _grads(ps, gen), ms, _flags(maximize=maximize),
                        hyper=dict(HYPER, weight_decay=weight_decay))


def test_maximize_equals_minimizing_the_negated_gradient():
    gen = torch.Generator().manual_seed(4)
    ps, ms = _make([(777,)], torch.float32, torch.float32, gen)
    g = _grads(ps, gen)[0]
    p2, m2 = ps[0].clone(), ms[0].clone()
    triton_lion_(ps, [g], ms, **HYPER, **_flags(maximize=True))
    triton_lion_([p2], [-g], [m2], **HYPER, **_flags())
    assert torch.equal(ps[0], p2) and torch.equal(ms[0], m2)


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("maximize", [False, True])
def test_cautious_matches_reference(p_dtype, maximize):
    gen = torch.Generator().manual_seed(5)
    # Several blocks per tensor: the per-tensor agreement count adds up over programs.
    ps, ms = _make([(1,), (127,), (3 * BLOCK_SIZE + 17,), (40, 40)], p_dtype, torch.float32, gen)
    for _ in range(2):
        _step_and_check(ps, _grads(ps, gen), ms, _flags(cautious=True, maximize=maximize))


@pytest.mark.parametrize("p_dtype,m_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_cautious_steps_are_for_loops_bits(p_dtype, m_dtype, monkeypatch):
    """The agreeing fraction is the fp32 quotient torch's CPU mean computes, divided with IEEE
    rounding: under the interpreter a cautious step is for_loop's bits, weights that land near zero
    included (lr 0.1 on unit weights: there one rounding of the update is many steps of the result,
    which a float64 reciprocal missed by up to hundreds of steps)."""
    from optim_helpers import bits_equal

    from lion_hf.optim.dispatch import run_step
    from lion_hf.optim.numerics import StepGroup

    if not lion_triton.INTERPRET:
        pytest.skip("for_loop on CUDA takes torch's CUDA mean, which may round the fraction differently")
    results = []
    for impl in ("for_loop", "triton"):
        gen = torch.Generator().manual_seed(21)
        ps, ms = _make([(172,), (BLOCK_SIZE + 300,)], p_dtype, m_dtype, gen)
        group = StepGroup(ps, _grads(ps, gen), ms, [None, None], 0.1, 0.9, 0.99, 0.0, False, True, "nearest")
        torch.manual_seed(0)
        if impl == "triton":  # the kernel itself: a kind whose self-check failed would run in foreach
            launches, original = [], lion_triton._run_group
            monkeypatch.setattr(lion_triton, "_run_group",
                                lambda *a, _l=launches, _o=original, **k: _l.append(1) or _o(*a, **k))
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no fallback warning
                run_step([group], impl=impl, nonfinite_grad="skip_elements")
            assert launches, "the kernel never launched"
        else:
            run_step([group], impl=impl, nonfinite_grad="skip_elements")
        results.append(ps + (ms if m_dtype == torch.float32 else []))
    assert sum(int((p.abs() < 0.02).sum()) for p in results[0][:2]) > 10, "weights near zero"
    for a, b in zip(*results):
        assert bits_equal(a, b)


def test_cautious_fraction_is_clamped_when_nothing_agrees():
    # m > 0 dominates c, g < 0: every update disagrees with its gradient, so u = 0 everywhere
    # except one element, and the mean 1/n (< 1e-3) is clamped: that element moves by lr * 1000.
    n = 5000
    p = torch.zeros(n, device=DEVICE)
    m = torch.ones(n, device=DEVICE)
    g = torch.full((n,), -0.5, device=DEVICE)
    g[7] = 2.0
    m[7] = 0.0
    p0, m0 = p.clone(), m.clone()
    triton_lion_([p], [g], [m], lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, **_flags(cautious=True))
    _check_against_reference(p0, g, m0, p, m, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0,
                             **_flags(cautious=True))
    assert float(p[7]) == pytest.approx(-1e-4 * 1000, rel=1e-6)
    assert int((p != 0).sum()) == 1


@pytest.mark.parametrize("p_dtype,m_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("cautious", [False, True])
def test_nonfinite_grads_leave_their_elements_untouched(p_dtype, m_dtype, cautious):
    gen = torch.Generator().manual_seed(6)
    ps, ms = _make([(BLOCK_SIZE + 100,), (50,)], p_dtype, m_dtype, gen)
    gs = _grads(ps, gen)
    bad = {0: [0, 5, BLOCK_SIZE - 1, BLOCK_SIZE + 3], 1: [49]}
    values = [float("nan"), float("inf"), float("-inf"), float("nan")]
    for t, idx in bad.items():
        for i, v in zip(idx, values):
            gs[t][i] = v
    before = [(p.clone(), m.clone()) for p, m in zip(ps, ms)]
    _step_and_check(ps, gs, ms, _flags(cautious=cautious))
    for t, idx in bad.items():
        p0, m0 = before[t]
        assert torch.equal(ps[t][idx], p0[idx]) and torch.equal(ms[t][idx], m0[idx])
    assert not torch.equal(ps[0], before[0][0]), "finite elements must still be updated"


def test_nonfinite_grads_propagate_when_not_skipped():
    gen = torch.Generator().manual_seed(7)
    ps, ms = _make([(600,)], torch.float32, torch.float32, gen)
    gs = _grads(ps, gen)
    gs[0][[1, 2, 3]] = torch.tensor([float("nan"), float("inf"), float("-inf")], device=DEVICE)
    # _assert_within checks that the NaN/inf pattern equals the reference's.
    _step_and_check(ps, gs, ms, _flags(skip_nonfinite=False))
    # sign(NaN) = 0 as torch.sign: the param only decays, the momentum becomes NaN
    assert ps[0][1].isfinite() and ms[0][1].isnan()
    assert ms[0][2] == float("inf") and ms[0][3] == float("-inf")


def test_sign_of_zero_is_zero():
    p = torch.ones(10, device=DEVICE)
    g = torch.zeros(10, device=DEVICE)
    m = torch.zeros(10, device=DEVICE)
    triton_lion_([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.5, **_flags())
    assert torch.allclose(p, torch.full_like(p, 1 - 0.1 * 0.5)) and torch.equal(m, torch.zeros_like(m))


@pytest.mark.parametrize("dtype,half_ulp", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)], ids=str)
def test_param_store_rounds_half_to_even(dtype, half_ulp):
    # p' = p + lr exactly (u = -1, no decay) lands midway between two neighbours.
    p = torch.tensor([1.0, 1.0 + 2 * half_ulp, -1.0, -(1.0 + 2 * half_ulp)], dtype=dtype, device=DEVICE)
    g = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=dtype, device=DEVICE)
    m = torch.zeros(4, device=DEVICE)
    triton_lion_(
        [p], [g], [m], lr=half_ulp, beta1=0.9, beta2=0.99, weight_decay=0.0, param_rounding="nearest", **_flags()
    )
    # ties go to the neighbour with an even last mantissa bit
    expected = torch.tensor([1.0, 1.0 + 4 * half_ulp, -1.0, -(1.0 + 4 * half_ulp)], dtype=dtype)
    assert torch.equal(p.cpu(), expected)


def test_channels_last_params_are_updated_in_memory_order():
    gen = torch.Generator().manual_seed(8)
    shape = (3, 4, 5, 6)
    p = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    m = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    assert not p.is_contiguous()
    _step_and_check([p], [g], [m], _flags(cautious=True))


def test_dtensor_like_arguments_update_their_local_shard():
    class Sharded:  # the part of the DTensor API the kernel uses
        def __init__(self, local):
            self.local = local

        def to_local(self):
            return self.local

    gen = torch.Generator().manual_seed(9)
    ps, ms = _make([(100,)], torch.float32, torch.float32, gen)
    gs = _grads(ps, gen)
    expected_p, expected_m = ps[0].clone(), ms[0].clone()
    triton_lion_([expected_p], gs, [expected_m], **HYPER, **_flags())
    triton_lion_([Sharded(ps[0])], [Sharded(gs[0])], [Sharded(ms[0])], **HYPER, **_flags())
    assert torch.equal(ps[0], expected_p) and torch.equal(ms[0], expected_m)


# --------------------------------------------------------------------------------------
# bf16 momentum: stochastic rounding
# --------------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_at_a_midpoint():
    # beta2 = 0.5, m = 1, g = 1 + 2**-7: m' = 1 + 2**-8 exactly, midway between the bf16
    # neighbours 1 and 1 + 2**-7 (bf16 keeps 7 mantissa bits).
    n = 2**16
    p = torch.zeros(n, device=DEVICE)
    m = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    g = torch.full((n,), 1 + 2**-7, device=DEVICE)
    triton_lion_([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.5, weight_decay=0.0, seed=123, **_flags())
    exact = 1 + 2**-8
    values = m.double().cpu()
    assert set(values.unique().tolist()) == {1.0, 1 + 2**-7}, "only the two bf16 neighbours"
    # mean of n Bernoulli(1/2) steps of size 2**-7: sd = 2**-8 / sqrt(n); allow 5 sd.
    assert abs(float(values.mean()) - exact) < 5 * 2**-8 / n**0.5
    # Every element gets its own bits: each of the 8 positions of a Philox row rounds up half
    # the time, any two positions agree half the time (1.0 if they shared bits), and so do
    # consecutive blocks (1.0 if every program drew the same numbers).
    up = (values > 1).double()
    rows = up.view(-1, 8)
    sd = 0.5 / rows.shape[0] ** 0.5
    assert bool(((rows.mean(0) - 0.5).abs() < 5 * sd).all()), rows.mean(0)
    agree = (rows.T @ rows + (1 - rows).T @ (1 - rows)) / rows.shape[0]
    off_diagonal = agree[~torch.eye(8, dtype=torch.bool)]
    assert bool(((off_diagonal - 0.5).abs() < 5 * sd).all()), agree
    blocks = up.view(-1, BLOCK_SIZE)
    same = (blocks[1:] == blocks[:-1]).double().mean()
    assert abs(float(same) - 0.5) < 5 * 0.5 / (n - BLOCK_SIZE) ** 0.5
    # round-to-nearest-even would store 1.0 everywhere: biased by -2**-8
    assert float(torch.tensor(exact, dtype=torch.float32).to(torch.bfloat16)) == 1.0


def test_bf16_momentum_tracks_tiny_increments_where_round_to_nearest_freezes():
    # beta2 = 0.999: m' = 0.999 * 1 + 0.001 * 1.5 = 1.0005, under half a bf16 ulp (2**-8) above 1.
    n, steps = 2**14, 40
    beta2, g_value = 0.999, 1.5
    p = torch.zeros(n, device=DEVICE)
    g = torch.full((n,), g_value, device=DEVICE)
    m = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    m_rtne = torch.ones(n, dtype=torch.bfloat16)
    for step in range(steps):
        triton_lion_([p], [g], [m], lr=0.0, beta1=0.9, beta2=beta2, weight_decay=0.0, seed=step, **_flags())
        m_rtne = (beta2 * m_rtne.float() + (1 - beta2) * g_value).to(torch.bfloat16)
    exact = g_value - (g_value - 1.0) * beta2**steps  # 1.0196
    # Each step adds independent zero-mean rounding noise within one ulp (2**-7 near 1), so of
    # sd <= 2**-8; after `steps` steps the mean over n elements has sd <= 2**-8 * sqrt(steps / n).
    bound = 6 * 2**-8 * (steps / n) ** 0.5
    assert abs(float(m.double().mean()) - exact) < bound
    assert bool((m_rtne == 1.0).all()), "round-to-nearest stays frozen at 1.0"
    assert exact - 1.0 > 10 * bound


def test_stochastic_rounding_seed_reproducibility():
    gen = torch.Generator().manual_seed(10)
    ps, ms = _make([(3000,)], torch.float32, torch.bfloat16, gen)
    gs = _grads(ps, gen)

    def run(seed):
        p, m = ps[0].clone(), ms[0].clone()
        triton_lion_([p], gs, [m], **HYPER, **_flags(), seed=seed)
        return m

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    torch.manual_seed(11)
    a = run(None)
    torch.manual_seed(11)
    assert torch.equal(a, run(None)), "seed=None draws from torch's default generator"
    # fp32 state needs no randomness and leaves the default generator alone
    torch.manual_seed(12)
    expected = torch.randint(0, 2**31 - 1, (1,))
    torch.manual_seed(12)
    triton_lion_([ps[0].clone()], gs, [ms[0].float()], **HYPER, **_flags())
    assert torch.equal(torch.randint(0, 2**31 - 1, (1,)), expected)


# --------------------------------------------------------------------------------------
# Compilation, caching, dispatch
# --------------------------------------------------------------------------------------


def test_scalars_are_runtime_arguments():
    """lr, betas, weight decay and seed must not be constexpr, or every new lr would recompile."""
    fn = getattr(lion_triton._lion_kernel, "fn", None)
    assert fn is not None
    sig = inspect.signature(fn)
    runtime = {"lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "seed", "n_tensors"}
    for name in runtime:
        annotation = sig.parameters[name].annotation
        assert "constexpr" not in str(annotation), f"{name} is constexpr"
    assert all("constexpr" in str(sig.parameters[name].annotation)
               for name in ("MAXIMIZE", "CAUTIOUS", "SKIP_NONFINITE", "STOCHASTIC", "ROWS"))


def test_tables_are_cached_on_addresses():
    gen = torch.Generator().manual_seed(13)
    ps, ms = _make([(10,), (3000,)], torch.float32, torch.float32, gen)
    gs = _grads(ps, gen)
    lion_triton._tables.clear()
    triton_lion_(ps, gs, ms, **HYPER, **_flags())
    (entry,) = lion_triton._tables.values()
    triton_lion_(ps, gs, ms, **HYPER, **_flags())
    assert len(lion_triton._tables) == 1 and next(iter(lion_triton._tables.values())) is entry
    layouts = len(lion_triton._layouts)
    new_gs = _grads(ps, gen)  # new gradient tensors: new pointer table, same layout table
    _step_and_check(ps, new_gs, ms, _flags())
    assert len(lion_triton._tables) == 2 and len(lion_triton._layouts) == layouts


def test_empty_inputs_launch_nothing(monkeypatch):
    counter = _CountingKernel(lion_triton._lion_kernel)
    monkeypatch.setattr(lion_triton, "_lion_kernel", counter)
    triton_lion_([], [], [], **HYPER, **_flags())
    e = torch.empty(0, device=DEVICE)
    triton_lion_([e], [e.clone()], [e.clone()], **HYPER, **_flags(cautious=True))
    assert counter.grids == []


def test_invalid_tensors_raise_before_anything_is_updated():
    good = [torch.randn(8, device=DEVICE) for _ in range(3)]
    p0 = good[0].clone()
    base = torch.randn(8, 8, device=DEVICE)
    cases = [
        # transposed: dense, so accepted when all three share it, refused when they differ
        ((base.t(), base.t().clone(), torch.zeros(8, 8, device=DEVICE)), "different memory layouts"),
        ((base[:, ::2], base[:, ::2].clone(), torch.zeros(8, 4, device=DEVICE)), "not dense"),
        ((torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE).half(), torch.zeros(4, device=DEVICE)),
         "dtype"),
        ((torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE), torch.zeros(4, device=DEVICE).half()),
         "exp_avg 1 has dtype"),
        ((torch.randn(4, device=DEVICE), torch.randn(5, device=DEVICE), torch.zeros(4, device=DEVICE)), "shape"),
        ((torch.randn(4, device=DEVICE).double(), torch.randn(4, device=DEVICE).double(),
          torch.zeros(4, device=DEVICE)), "param 1 has dtype"),
    ]
    for (p, g, m), match in cases:
        with pytest.raises(ValueError, match=match):
            triton_lion_([good[0], p], [good[1], g], [good[2], m], **HYPER, **_flags())
        assert torch.equal(good[0], p0)
    with pytest.raises(ValueError, match="3 params, 2 grads"):
        triton_lion_(good, good[:2], good, **HYPER, **_flags())


def test_refuses_devices_it_cannot_run_on(monkeypatch):
    from lion_hf.optim.dispatch import impl_unavailable

    assert impl_unavailable("triton", DEVICE) is None
    assert impl_unavailable("triton", "meta") is not None
    monkeypatch.setattr(lion_triton, "INTERPRET", False)
    assert impl_unavailable("triton", "cpu") is not None
    t = torch.zeros(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_lion_([t], [t.clone()], [t.clone()], **HYPER, **_flags())


def test_version_counters_are_bumped():
    p, g, m = torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE)
    versions = p._version, m._version
    triton_lion_([p], [g], [m], **HYPER, **_flags())
    assert p._version > versions[0] and m._version > versions[1]


_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import lion_hf.optim.triton_kernel as lt
assert not lt.INTERPRET
scalars = {"ptr_table": "*i64", "layout": "*i64", "counts": "*i64", "n_tensors": "i32"}
step_sig = dict(scalars, lr="fp32", decay="fp32", beta1="fp32", one_minus_beta1="fp32", beta2="fp32",
                one_minus_beta2="fp32", seed="i64")
count_sig = dict(scalars, beta1="fp32", one_minus_beta1="fp32")
tile = dict(ROWS=lt._ROWS, COLS=lt._COLS)
variants = [
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.float32, M_DTYPE=tl.float32, MAXIMIZE=False, CAUTIOUS=False,
                                     SKIP_NONFINITE=True, STOCHASTIC=False, ALIGNED=True, **tile)),
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.bfloat16, M_DTYPE=tl.bfloat16, MAXIMIZE=True, CAUTIOUS=True,
                                     SKIP_NONFINITE=False, STOCHASTIC=True, ALIGNED=False, **tile)),
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.float16, M_DTYPE=tl.float32, MAXIMIZE=False, CAUTIOUS=False,
                                     SKIP_NONFINITE=True, STOCHASTIC=False, ALIGNED=True, **tile)),
    (lt._agree_count_kernel, count_sig, dict(P_DTYPE=tl.float32, M_DTYPE=tl.bfloat16, MAXIMIZE=False,
                                             ALIGNED=True, **tile)),
    # low-precision weights: stochastic rounding (the default) and Kahan, for bf16 and fp16
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.bfloat16, M_DTYPE=tl.bfloat16, MAXIMIZE=False, CAUTIOUS=False,
                                     SKIP_NONFINITE=True, STOCHASTIC=True, ALIGNED=True, P_STOCHASTIC=True,
                                     KAHAN=False, **tile)),
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.float16, M_DTYPE=tl.float32, MAXIMIZE=False, CAUTIOUS=False,
                                     SKIP_NONFINITE=True, STOCHASTIC=False, ALIGNED=True, P_STOCHASTIC=True,
                                     KAHAN=False, **tile)),
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.bfloat16, M_DTYPE=tl.float32, MAXIMIZE=False, CAUTIOUS=True,
                                     SKIP_NONFINITE=True, STOCHASTIC=False, ALIGNED=True, P_STOCHASTIC=False,
                                     KAHAN=True, **tile)),
    (lt._lion_kernel, step_sig, dict(P_DTYPE=tl.float16, M_DTYPE=tl.bfloat16, MAXIMIZE=False, CAUTIOUS=False,
                                     SKIP_NONFINITE=True, STOCHASTIC=True, ALIGNED=False, P_STOCHASTIC=False,
                                     KAHAN=True, **tile)),
]
# 8-bit momenta: [8, 256] tiles (a row a block), the seed table beside the pointer table
step8_sig = dict(step_sig, seed_table="*i32")
del step8_sig["seed"]
count8_sig = dict(count_sig, seed_table="*i32")
tile8 = dict(ROWS=lt._Q_ROWS, COLS=lt._Q_COLS)
variants += [
    (lt._lion8_kernel, step8_sig, dict(P_DTYPE=tl.float32, MAXIMIZE=False, CAUTIOUS=False, SKIP_NONFINITE=True,
                                       ALIGNED=True, P_STOCHASTIC=False, KAHAN=False, **tile8)),
    (lt._lion8_kernel, step8_sig, dict(P_DTYPE=tl.bfloat16, MAXIMIZE=True, CAUTIOUS=True, SKIP_NONFINITE=False,
                                       ALIGNED=False, P_STOCHASTIC=True, KAHAN=False, **tile8)),
    (lt._agree_count8_kernel, count8_sig, dict(P_DTYPE=tl.float16, MAXIMIZE=False, ALIGNED=True, KAHAN=True,
                                               **tile8)),
]
targets = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
compiled_count = 0
for target in targets:
    for kernel, sig, consts in variants:
        if kernel is lt._lion_kernel:
            consts = {"P_STOCHASTIC": False, "KAHAN": False, **consts}
        sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                                      options={"num_warps": lt._NUM_WARPS, "enable_fp_fusion": False})
        except Exception as e:
            if "ptxas" in str(e).lower():
                print("NO_PTXAS", e)
                sys.exit(0)
            raise
        compiled_count += 1
        ptx = compiled.asm["ptx"]
        # Launched without fp fusion, so that each product and sum rounds as torch's ops do.
        assert "fma.rn.f32" not in ptx, "a multiply-add was contracted into an FMA"
        if kernel is lt._lion8_kernel:
            # m / absmax must be the IEEE quotient for_loop codes: div.rn, never div.full or div.approx.
            assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, "approximate division"
        if consts["ALIGNED"] and kernel is lt._lion_kernel:
            assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, (
                "aligned full blocks must use 16-byte accesses"
            )
print("COMPILED", compiled_count)
"""


def test_kernels_compile_for_cuda_without_a_gpu():
    """The compiled (non-interpreted) path, built for sm_80 and sm_90 with triton's bundled ptxas:
    every variant (low-precision weight rounding and 8-bit momenta included) must compile, aligned
    full blocks must get 16-byte vector loads and stores, and the 8-bit kernel's division must be
    the IEEE one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], check=False, capture_output=True, text=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if "NO_PTXAS" in result.stdout:
        pytest.skip(f"triton cannot run ptxas here: {result.stdout.strip()[:200]}")
    assert "COMPILED 22" in result.stdout  # 11 variants x (sm_80, sm_90)


def test_import_lion_hf_does_not_import_triton():
    code = "import sys, lion_hf; import lion_hf.optim.lion; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_functional_lion_with_impl_triton_matches_for_loop():
    from lion_hf.optim.lion import lion

    gen = torch.Generator().manual_seed(14)
    ps, ms = _make([(5,), (129, 3), (2500,)], torch.float32, torch.float32, gen)
    gs = _grads(ps, gen)
    ps2, ms2 = [p.clone() for p in ps], [m.clone() for m in ms]
    kw = dict(HYPER, maximize=False, cautious=True)
    lion(ps, gs, ms, impl="triton", **kw)
    lion(ps2, gs, ms2, impl="for_loop", **kw)
    for a, b in zip(ps + ms, ps2 + ms2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# GPU only (compiled kernels)
# --------------------------------------------------------------------------------------


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version does not expose JITFunction.device_caches")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
@gpu
def test_gpu_lr_changes_do_not_recompile():
    gen = torch.Generator().manual_seed(15)
    ps, ms = _make([(1000,), (5000,)], torch.float32, torch.bfloat16, gen)
    gs = _grads(ps, gen)
    triton_lion_(ps, gs, ms, **HYPER, **_flags())
    variants = _compiled_variants(lion_triton._lion_kernel)
    for step in range(5):
        triton_lion_(ps, gs, ms, lr=1e-3 * (step + 2), beta1=0.9 - 0.01 * step, beta2=0.99, weight_decay=0.01 * step,
                     **_flags(), seed=step * 7919 + 1)
    assert _compiled_variants(lion_triton._lion_kernel) == variants


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("p_dtype,m_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)], ids=str)
def test_gpu_hundred_million_elements(p_dtype, m_dtype):
    n = 10**8
    gen = torch.Generator(device="cuda").manual_seed(16)
    p = torch.randn(n, device="cuda", generator=gen).to(p_dtype)
    g = (0.1 * torch.randn(n, device="cuda", generator=gen)).to(p_dtype)
    m = (0.1 * torch.randn(n, device="cuda", generator=gen)).to(m_dtype)
    idx = torch.randint(0, n, (100_000,), device="cuda", generator=gen)
    idx = torch.cat([idx, torch.arange(n - 3000, n, device="cuda")])
    p0, g0, m0 = p[idx].clone(), g[idx].clone(), m[idx].clone()
    triton_lion_([p], [g], [m], **HYPER, **_flags())
    _check_against_reference(p0, g0, m0, p[idx], m[idx], **HYPER, **_flags(), what="1e8")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        triton_lion_([p], [g], [m], **HYPER, **_flags())
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    bytes_moved = n * (3 * p.element_size() + 2 * m.element_size())
    print(f"\n1e8 {p_dtype}/{m_dtype}: {seconds * 1e3:.2f} ms/step, {bytes_moved / seconds / 1e9:.0f} GB/s")


@pytest.mark.gpu
@gpu
def test_gpu_many_small_tensors_are_not_launch_bound():
    gen = torch.Generator().manual_seed(17)
    sizes = torch.randint(64, 4096, (500,), generator=gen).tolist()
    ps, ms = _make([(n,) for n in sizes], torch.float32, torch.float32, gen)
    gs = _grads(ps, gen)
    _step_and_check(ps, gs, ms, _flags())
    for _ in range(3):
        triton_lion_(ps, gs, ms, **HYPER, **_flags())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        triton_lion_(ps, gs, ms, **HYPER, **_flags())
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 20
    print(f"\n500 small tensors: {seconds * 1e6:.0f} us/step")
    # 500 separate launches alone would take >= ~2 ms; one launch plus the table lookup is far less.
    assert seconds < 2e-3


# --------------------------------------------------------------------------------------
# The self-check (the kernel's first run per kind on a probe) and misaligned views
# --------------------------------------------------------------------------------------


def _dispatch_step(params, grads, moms, **flags):
    from lion_hf.optim.dispatch import run_step
    from lion_hf.optim.numerics import StepGroup

    group = StepGroup(params, grads, moms, [None] * len(params), lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1,
                      maximize=False, cautious=False, param_rounding=flags.get("param_rounding", "nearest"))
    run_step([group], impl=flags.get("impl", "triton"), nonfinite_grad="skip_elements")


def _fresh_fp32_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=gen).to(DEVICE) for n in (7, 3000)]
    gs = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in ps]
    ms = [torch.randn(p.shape, generator=gen).to(DEVICE) * 0.1 for p in ps]
    return ps, gs, ms


def test_a_kernel_that_fails_its_self_check_hands_its_tensors_to_foreach(monkeypatch):
    monkeypatch.setattr(lion_triton, "_verdicts", {})
    original = lion_triton._launch_group

    def broken(ps, *args, **kwargs):  # a miscompiled kernel: every weight off by a little
        original(ps, *args, **kwargs)
        for p in ps:
            p.add_(1e-3)

    monkeypatch.setattr(lion_triton, "_launch_group", broken)
    ps, gs, ms = _fresh_fp32_tensors(1)
    want = [[t.clone() for t in ts] for ts in (ps, gs, ms)]
    with pytest.warns(UserWarning, match=r"Triton kernel's step differs from the reference.*param of .* element"):
        _dispatch_step(ps, gs, ms)
    _dispatch_step(*want, impl="foreach")
    for a, b in zip(ps + ms, want[0] + want[2]):
        assert torch.equal(a, b), "the tensors should have been updated by foreach alone"
    assert next(iter(lion_triton._verdicts.values())) is not None
    with warnings.catch_warnings():  # decided once per process: no second probe, no second warning
        warnings.simplefilter("error")
        _dispatch_step(ps, gs, ms)


def test_the_self_check_runs_once_per_kind_and_agrees_bit_for_bit(monkeypatch):
    monkeypatch.setattr(lion_triton, "_verdicts", {})
    probes = []
    original = lion_triton._probe
    monkeypatch.setattr(lion_triton, "_probe", lambda *args: probes.append(args) or original(*args))
    for _ in range(3):
        _dispatch_step(*_fresh_fp32_tensors(2))
    assert len(probes) == 1 and list(lion_triton._verdicts.values()) == [None]
    _dispatch_step(*[[t.bfloat16() if i < 2 else t for t in ts] for i, ts in enumerate(_fresh_fp32_tensors(3))])
    assert len(probes) == 2, "a new kind (bf16 params) is probed on its first step"


def test_a_misaligned_view_gets_its_own_launch_and_the_for_loop_bits(monkeypatch):
    from optim_helpers import bits_equal

    launches = []
    original = lion_triton._launch_group
    monkeypatch.setattr(lion_triton, "_launch_group",
                        lambda ps, *a, **k: launches.append(ps[0].data_ptr() % 16) or original(ps, *a, **k))
    monkeypatch.setattr(lion_triton, "_verdicts", {})
    holder = torch.randn(3001, device=DEVICE)
    ps, gs, ms = _fresh_fp32_tensors(4)
    ps[1] = holder[1:]  # a storage offset of 4 bytes: no 16-byte vector loads for this one
    want = [[t.clone() for t in ts] for ts in (ps, gs, ms)]
    launches.clear()
    _dispatch_step(ps, gs, ms)
    _dispatch_step(*want, impl="for_loop")
    assert sorted(launches)[-1] != 0 and len([a for a in launches if a == 0]) >= 1, launches
    for a, b in zip(ps + ms, want[0] + want[2]):
        assert bits_equal(a, b)


# --------------------------------------------------------------------------------------
# DistributedLion's sign pass and vote, bit for bit against the torch path
# --------------------------------------------------------------------------------------


def _vote_groups(seed):
    from lion_hf.optim.numerics import StepGroup

    gen = torch.Generator().manual_seed(seed)
    groups = []
    for maximize, (g_dtype, m_dtype), sizes in ((False, (torch.float32, torch.float32), (1, 0, 1500)),
                                                (True, (torch.bfloat16, torch.bfloat16), (2100, 3)),
                                                (False, (torch.float16, torch.float32), (777,))):
        grads = [torch.randn(n, generator=gen).to(g_dtype) for n in sizes]
        moms = [(torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) > 0.2)).to(m_dtype) for n in sizes]
        for g in grads:
            if g.numel() > 10:
                g[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        params = [torch.randn(n, generator=gen).to(g_dtype) for n in sizes]
        groups.append(StepGroup([p.to(DEVICE) for p in params], [g.to(DEVICE) for g in grads],
                                [m.to(DEVICE) for m in moms], [None] * len(sizes), 0.01, 0.9, 0.99, 0.1, maximize,
                                False, "nearest"))
    return groups


@pytest.mark.parametrize("zero_nonfinite", [False, True])
def test_sign_pass_writes_the_trits_of_the_torch_path(zero_nonfinite):
    assert_triton_signs_are_foreachs(_vote_groups(5), DEVICE, zero_nonfinite=zero_nonfinite)


@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("world", [2, 3])
def test_vote_kernel_is_combine_signs_bit_for_bit(vote, world):
    from lion_hf.optim.signs import combine_signs, pack_signs

    gen = torch.Generator().manual_seed(world)
    for numel in (7, 2 * 5 * 4096 + 13):  # one short chunk; two full chunks and a short one
        gathered = torch.stack([pack_signs([torch.randint(-1, 2, (numel,), generator=gen).float()])
                                for _ in range(world)]).to(DEVICE)
        want = combine_signs(gathered, numel, vote)
        got = lion_triton.triton_vote(gathered, numel, vote)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (numel, vote)


def test_distributed_lion_on_triton_is_foreach_bit_for_bit(monkeypatch):
    """Two simulated ranks (the gather returns this rank's buffer and another rank's signs):
    DistributedLion(impl="triton") runs its sign pass and vote in the Triton kernels and moves the
    weights and momenta exactly as impl="foreach" does."""
    from lion_hf import DistributedLion

    gen = torch.Generator().manual_seed(11)
    shapes = [(300,), (7, 5), (0,), (2 * 5 * 4096 + 3,)]
    two_simulated_ranks(monkeypatch, shapes, gen, DEVICE)
    calls = record_calls(monkeypatch, lion_triton, ("triton_signs", "triton_vote"))
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for impl in ("triton", "foreach"):
        ps = [torch.nn.Parameter(p.clone().to(DEVICE)) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone().to(DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = DistributedLion([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "maximize": True}],
                                  lr=0.01, vote="average", nonfinite_grad="skip_elements", impl=impl)
        for _ in range(2):
            opt.step()
        results.append([t.detach().cpu() for p in ps for t in (p, opt.state[p]["exp_avg"])])
    assert calls == [("triton_signs", True), ("triton_vote", True)] * 2, "signs and vote ran in the Triton kernels"
    for a, b in zip(*results):
        assert torch.equal(a.view(-1).view(torch.int32), b.view(-1).view(torch.int32))
    assert not torch.equal(results[0][0], params[0])
