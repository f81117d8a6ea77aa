"""The Triton kernel's 8-bit momentum path (state_dtype="int8"), held to for_loop bit for bit.

Under Triton's CPU interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before triton is
imported) the kernel's int8 path computes numerics.lion_tensor's bits exactly: the widened
momentum, the step, each block's new absmax, the division m / absmax (``div_rn``, IEEE) and the
stochastic code from numerics.random_bits16 are the same fp32 and integer operations, and the
bf16/fp16 params are rounded with the same hash of the same seeds. ``cautious`` too: the agreeing
fraction is the fp32 quotient torch's CPU mean computes. On a GPU (compiled, for_loop on CUDA)
torch's CUDA mean may round that fraction differently, so there the cautious test allows the
self-check's slack, two fp32 roundings of the weight's terms. Tensors are kept small (the
interpreter is slow) with a tail that is not a whole block of 256.
"""

from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from optim_helpers import assert_triton_signs_are_foreachs, bits_equal, record_calls, two_simulated_ranks  # noqa: E402

import lion_hf.optim.triton_kernel as lion_triton  # noqa: E402
from lion_hf.optim.dispatch import run_step  # noqa: E402
from lion_hf.optim.numerics import (  # noqa: E402
    EIGHT_BIT_BLOCK,
    EIGHT_BIT_MAX_CODE,
    StepGroup,
    dequantize_momentum,
    lion_tensor,
    quantize_momentum,
)

if not lion_triton.INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported in compiled mode and there is no GPU", allow_module_level=True)

DEVICE = torch.device("cpu" if lion_triton.INTERPRET else "cuda")
# One element; a partial block; a whole program (2048 elements, 8 blocks) plus 3 whole blocks and a partial one.
SIZES = (1, 300, lion_triton.BLOCK_SIZE + 3 * EIGHT_BIT_BLOCK + 37)


def _tensors(p_dtype, param_rounding, seed, sizes=SIZES, nonfinite=True):
    """Params, grads, 8-bit momenta (codes and scales) and Kahan residuals on DEVICE: momenta whose
    every third element is 1000x smaller (subnormal codes), a first block of zeros with zero grads
    (scale 0), and NaN/inf grads in the last tensor's last block."""
    gen = torch.Generator().manual_seed(seed)
    ps, gs, ms, cs, ss = [], [], [], [], []
    for n in sizes:
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3
        m = torch.randn(n, generator=gen) * 0.1
        m[::3] *= 1e-3
        if n > 2 * EIGHT_BIT_BLOCK:
            m[:EIGHT_BIT_BLOCK] = 0.0
            g[:EIGHT_BIT_BLOCK] = 0.0
            if nonfinite:
                g[-5:-1] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
        codes, scale = quantize_momentum(m, seed + n)
        kahan = param_rounding == "kahan" and p_dtype != torch.float32
        c = (p * 2**-10 * torch.rand(n, generator=gen)).to(p_dtype) if kahan else None
        ps.append(p.to(p_dtype).to(DEVICE))
        gs.append(g.to(p_dtype).to(DEVICE))
        ms.append(codes.to(DEVICE))
        ss.append(scale.to(DEVICE))
        cs.append(None if c is None else c.to(DEVICE))
    return ps, gs, ms, cs, ss


def _step(impl, tensors, *, param_rounding, cautious=False, maximize=False, policy="skip_elements", steps=2,
          weight_decay=0.1, lr=1e-2):
    ps, gs, ms, cs, ss = tensors
    for step in range(steps):
        group = StepGroup(ps, gs, ms, cs, lr, 0.9, 0.99, weight_decay, maximize, cautious, param_rounding,
                          exp_avg_scales=ss)
        torch.manual_seed(step)  # the step's seeds (numerics.with_seeds): the same draws for both impls
        run_step([group], impl=impl, nonfinite_grad=policy)
    return ps, ms, cs, ss


def _kernel_step(monkeypatch, tensors, **kwargs):
    """A Triton step that must launch the 8-bit kernel and leave nothing to foreach: a kind whose
    self-check failed would run in foreach, compute for_loop's bits, and prove nothing."""
    launches = _assert_kernel_ran(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        got = _step("triton", tensors, **kwargs)
    assert launches, "the 8-bit kernel never launched"
    return got


def _assert_kernel_ran(monkeypatch):
    """Counts the 8-bit kernel's launches: a step that left every tensor to foreach proves nothing."""
    launches = []
    original = lion_triton._launch_group8
    monkeypatch.setattr(lion_triton, "_launch_group8", lambda *a, **k: launches.append(a[3]) or original(*a, **k))
    return launches


@pytest.mark.parametrize("param_rounding", ["stochastic", "nearest", "kahan"])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_step_is_for_loops_bits(p_dtype, param_rounding, monkeypatch):
    launches = _assert_kernel_ran(monkeypatch)
    monkeypatch.setattr(lion_triton, "_verdicts", {})  # probe this kind again
    want = _step("for_loop", _tensors(p_dtype, param_rounding, 1), param_rounding=param_rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the self-check must pass: no fallback warning
        got = _step("triton", _tensors(p_dtype, param_rounding, 1), param_rounding=param_rounding)
    assert len(launches) == 2 + 1, "two steps and the self-check's probe: the kernel, not foreach"
    for name, wants, gots in zip(("param", "codes", "residual", "scale"), want, got):
        for i, (a, b) in enumerate(zip(wants, gots)):
            if a is not None:
                assert bits_equal(a.cpu(), b.cpu()), f"{name} {i} differs from for_loop's"
    codes = got[1][-1].cpu()
    assert int(codes.abs().max()) == EIGHT_BIT_MAX_CODE and 0 < int((codes.abs() < 16).sum()) < codes.numel()
    scales = got[3][-1].cpu()
    assert scales[0] == 0 and bool((scales[1:] > 0).all()), "a block of zeros keeps scale 0, the others move"


@pytest.mark.parametrize("maximize", [False, True])
def test_int8_propagate_and_maximize_are_for_loops_bits(maximize, monkeypatch):
    """Under 'propagate' a NaN/inf gradient makes its block's scale NaN (the whole block NaN), as in
    for_loop; maximize negates the gradient. Both impls, bit for bit, including which blocks are NaN."""
    want = _step("for_loop", _tensors(torch.float32, "nearest", 2), param_rounding="nearest", maximize=maximize,
                 policy="propagate", steps=1, weight_decay=0.0)
    got = _kernel_step(monkeypatch, _tensors(torch.float32, "nearest", 2), param_rounding="nearest",
                       maximize=maximize, policy="propagate", steps=1, weight_decay=0.0)
    for wants, gots in zip(want, got):
        for a, b in zip(wants, gots):
            if a is not None:
                assert bits_equal(a.cpu(), b.cpu())
    scales = got[3][-1].cpu()
    assert bool(scales[-1].isnan()) and int(scales.isnan().sum()) == 1, "only the block of the NaN/inf grads"


@pytest.mark.parametrize("p_dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "stochastic"),
                                              (torch.bfloat16, "kahan"), (torch.float16, "kahan")], ids=str)
@pytest.mark.parametrize("maximize", [False, True])
def test_int8_cautious_is_for_loops_bits(p_dtype, rounding, maximize, monkeypatch):
    """One step from the same state, lr 0.1 so that many weights land near zero (where one rounding
    of the update is many steps of the result): for_loop's bits under the interpreter. On a GPU,
    where for_loop's fraction is torch's CUDA mean, within the self-check's slack."""
    before = _tensors(p_dtype, rounding, 3)
    kwargs = dict(param_rounding=rounding, cautious=True, maximize=maximize, steps=1, lr=0.1)
    want = _step("for_loop", _tensors(p_dtype, rounding, 3), **kwargs)
    got = _kernel_step(monkeypatch, _tensors(p_dtype, rounding, 3), **kwargs)
    for a, b in zip(want[1] + want[3], got[1] + got[3]):
        assert bits_equal(a.cpu(), b.cpu())
    near_zero = sum(int((a.cpu().abs() < 0.02).sum()) for a in want[0])
    assert near_zero > 10, "the case must hold weights near zero"
    for i, (p0, g, m, c0, s) in enumerate(zip(*before)):
        if lion_triton.INTERPRET:
            assert bits_equal(want[0][i].cpu(), got[0][i].cpu()), f"param {i}"
            assert want[2][i] is None or bits_equal(want[2][i].cpu(), got[2][i].cpu()), f"residual {i}"
            continue
        slack = lion_triton._cautious_slack(p0, g, m, c0, s, 0.1, 1 - 0.1 * 0.1, 0.9, maximize)
        assert lion_triton._first_difference(got[0][i], want[0][i], "param", 0 if p_dtype == torch.float32 else 1,
                                             slack) is None
    assert sum(int((a.cpu() != p0.cpu()).sum()) for a, p0 in zip(got[0], before[0])) > 0


def test_int8_random_bits_wrap_past_65536_elements_as_the_hash_does(monkeypatch):
    """The hash takes the low 16 bits of the element's row-major index: a tensor past 2**16
    elements (its last blocks reuse the first blocks' counters) still gets for_loop's codes."""
    sizes = (2**16 + EIGHT_BIT_BLOCK + 5,)
    want = _step("for_loop", _tensors(torch.float32, "nearest", 4, sizes=sizes, nonfinite=False),
                 param_rounding="nearest", steps=1)
    got = _kernel_step(monkeypatch, _tensors(torch.float32, "nearest", 4, sizes=sizes, nonfinite=False),
                       param_rounding="nearest", steps=1)
    for a, b in zip(want[1] + want[3], got[1] + got[3]):
        assert bits_equal(a.cpu(), b.cpu())


def test_int8_tensors_the_kernel_cannot_take_run_in_foreach_with_for_loops_bits(monkeypatch):
    """A transposed param with an 8-bit momentum (its blocks run in row-major order, not in memory
    order) goes to foreach; the contiguous one beside it still launches the kernel."""
    launches = _assert_kernel_ran(monkeypatch)
    monkeypatch.setattr(lion_triton, "_verdicts", {})

    def tensors():
        ps, gs, ms, cs, ss = _tensors(torch.float32, "nearest", 5, sizes=(300, 30 * 40))
        # (30, 40) params and grads with strides (1, 30); the momentum's codes stay row-major (30, 40).
        ps[1], gs[1] = (t.view(40, 30).t() for t in (ps[1], gs[1]))
        ms[1] = ms[1].view(30, 40)
        return ps, gs, ms, cs, ss

    ps, gs, ms, _, _ = tensors()
    assert "not contiguous" in lion_triton._layout_problem(ps[1], gs[1], ms[1], None)
    want = _step("for_loop", tensors(), param_rounding="nearest", steps=1)
    launches.clear()
    got = _step("triton", tensors(), param_rounding="nearest", steps=1)
    assert launches == [2, 1], "the probe (two tensors), then the contiguous tensor alone"
    for wants, gots in zip(want, got):
        for a, b in zip(wants, gots):
            if a is not None:
                assert bits_equal(a.cpu(), b.cpu())


# --------------------------------------------------------------------------------------
# The self-check (what the dispatcher runs before the kernel's first launch of a kind)
# --------------------------------------------------------------------------------------


def test_the_self_check_probes_the_int8_kind_and_agrees_bit_for_bit(monkeypatch):
    monkeypatch.setattr(lion_triton, "_verdicts", {})
    probes = []
    original = lion_triton._probe
    monkeypatch.setattr(lion_triton, "_probe", lambda *args: probes.append(args) or original(*args))
    for p_dtype in (torch.float32, torch.bfloat16):
        _step("triton", _tensors(p_dtype, "stochastic", 6, sizes=(300,)), param_rounding="stochastic", steps=1)
    assert [args[2] for args in probes] == [torch.int8, torch.int8]
    assert list(lion_triton._verdicts.values()) == [None, None]
    # The probe covers what it says: a zero block (scale 0), subnormal codes, NaN/inf grads, a partial block.
    _, gs, ms, _, ss = original(DEVICE, torch.float32, torch.int8, False, True)
    assert ss is not None and ss[1][0] == 0 and int((ms[1].abs() < 16).sum()) > 100
    assert ms[1].numel() % EIGHT_BIT_BLOCK and bool(gs[1].isnan().any())


def test_an_int8_kernel_that_fails_its_self_check_hands_its_tensors_to_foreach(monkeypatch):
    """A miscompiled 8-bit kernel (here: one block scale off by one ulp) is caught by the probe, warned
    about once, and the step runs in foreach, with for_loop's bits."""
    monkeypatch.setattr(lion_triton, "_verdicts", {})
    original = lion_triton._launch_group

    def broken(ps, gs, ms, cs, ss=None, **kwargs):
        original(ps, gs, ms, cs, ss, **kwargs)
        if ss is not None:
            ss[-1].view(torch.int32)[-1] += 1

    monkeypatch.setattr(lion_triton, "_launch_group", broken)
    want = _step("for_loop", _tensors(torch.float32, "nearest", 7), param_rounding="nearest", steps=1)
    with pytest.warns(UserWarning, match=r"differs from the reference.*torch.int8 momentum.*block scale"):
        got = _step("triton", _tensors(torch.float32, "nearest", 7), param_rounding="nearest", steps=1)
    for wants, gots in zip(want, got):
        for a, b in zip(wants, gots):
            if a is not None:
                assert bits_equal(a.cpu(), b.cpu())
    assert next(iter(lion_triton._verdicts.values())) is not None


# --------------------------------------------------------------------------------------
# The standalone triton_lion_ with 8-bit momenta
# --------------------------------------------------------------------------------------


def test_standalone_kernel_takes_int8_momenta_with_their_scales():
    """triton_lion_ draws each tensor's (param, momentum) seeds from a generator seeded with ``seed``;
    with those seeds numerics.lion_tensor computes the same bits."""
    ps, gs, ms, _, ss = _tensors(torch.bfloat16, "stochastic", 8, sizes=(300, 2500))
    refs = [[t.clone() for t in ts] for ts in (ps, ms, ss)]
    lion_triton.triton_lion_(ps, gs, ms, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
                             cautious=False, skip_nonfinite=True, seed=99, exp_avg_scales=ss)
    seeds = torch.randint(0, 1 << 16, (2, 2), generator=torch.Generator().manual_seed(99)).tolist()
    for i, (p_seed, m_seed) in enumerate(seeds):
        lion_tensor(refs[0][i], gs[i], refs[1][i], None, 1e-2, 1 - 1e-2 * 0.1, 0.9, 0.99, p_seed, m_seed, False,
                    False, True, refs[2][i])
    for a, b in zip(ps + ms + ss, refs[0] + refs[1] + refs[2]):
        assert bits_equal(a.cpu(), b.cpu())
    widened = dequantize_momentum(ms[1].cpu(), ss[1].cpu())
    assert bool(widened.isfinite().all()) and float(widened.abs().max()) == float(ss[1].max())


def test_standalone_kernel_refuses_int8_momenta_without_fitting_scales():
    ps, gs, ms, _, ss = _tensors(torch.float32, "nearest", 9, sizes=(600,))
    before = [t.clone() for t in ps + ms]
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, cautious=False,
                  skip_nonfinite=True)
    with pytest.raises(ValueError, match=r"exp_avg 0 is torch.int8 without exp_avg_scales\[0\]"):
        lion_triton.triton_lion_(ps, gs, ms, **kwargs)
    with pytest.raises(ValueError, match=r"exp_avg_scales\[0\] must be a contiguous 1-D float32 tensor of 3 "):
        lion_triton.triton_lion_(ps, gs, ms, exp_avg_scales=[ss[0][:2]], **kwargs)
    with pytest.raises(ValueError, match=r"exp_avg 0 is torch.float32 with exp_avg_scales\[0\]"):
        lion_triton.triton_lion_(ps, gs, [torch.zeros(600, device=DEVICE)], exp_avg_scales=ss, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ps + ms, before)), "nothing was updated"


# --------------------------------------------------------------------------------------
# DistributedLion with impl="triton" and 8-bit state
# --------------------------------------------------------------------------------------


def test_distributed_lion_on_triton_with_int8_state_is_foreach_bit_for_bit(monkeypatch):
    """Two simulated ranks (the gather returns this rank's buffer and another rank's signs):
    DistributedLion(impl="triton", state_dtype="int8") moves the weights, codes and scales exactly
    as impl="foreach" does. Its sign pass (8-bit momenta widened in the kernel) and its vote run in
    the Triton kernels, its apply pass in foreach (as for every momentum dtype)."""
    from lion_hf import DistributedLion

    gen = torch.Generator().manual_seed(11)
    shapes = [(70, 64), (50,)]  # one 8-bit momentum (4480 elements), one fp32 (below EIGHT_BIT_MIN_NUMEL)
    two_simulated_ranks(monkeypatch, shapes, gen, DEVICE)
    calls = record_calls(monkeypatch, lion_triton, ("triton_signs", "triton_vote"))
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    results = []
    for impl in ("triton", "foreach"):
        ps = [torch.nn.Parameter(p.clone().to(DEVICE)) for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = DistributedLion(ps, lr=0.01, weight_decay=0.1, state_dtype="int8", impl=impl)
        for step in range(2):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone().to(DEVICE)
            torch.manual_seed(step)
            opt.step()
        assert opt.state[ps[0]]["exp_avg"].dtype == torch.int8
        results.append([t.detach().cpu() for p in ps for t in (p, *opt.state[p].values())])
    assert calls == [("triton_signs", True), ("triton_vote", True)] * 2, "signs and vote ran in the Triton kernels"
    assert len(results[0]) == len(results[1]) == 5
    for a, b in zip(*results):
        assert bits_equal(a, b)
    assert not torch.equal(results[0][0], params[0])


@pytest.mark.parametrize("zero_nonfinite", [False, True])
def test_sign_pass_over_8bit_momenta_writes_the_trits_of_the_torch_path(zero_nonfinite):
    """DistributedLion's first pass in the Triton kernel: each 8-bit momentum widened with its block's
    scale, beside fp32 and bf16 momenta, NaN/inf grads and maximize; the same trits as foreach's."""
    ps, gs, ms, _, ss = _tensors(torch.bfloat16, "nearest", 12, sizes=(300, 2600))
    gen = torch.Generator().manual_seed(12)
    groups = [StepGroup(ps, gs, ms, [None, None], 0.01, 0.9, 0.99, 0.1, False, False, "nearest", exp_avg_scales=ss),
              StepGroup([torch.zeros(77, device=DEVICE)], [torch.randn(77, generator=gen).to(DEVICE)],
                        [torch.randn(77, generator=gen).bfloat16().to(DEVICE)], [None], 0.01, 0.9, 0.99, 0.1, True,
                        False, "nearest")]
    assert_triton_signs_are_foreachs(groups, DEVICE, zero_nonfinite=zero_nonfinite)
