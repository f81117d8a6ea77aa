"""state_dtype="int8": blockwise 8-bit momentum (numerics.quantize_momentum) in every impl, its
checkpoints, its validation and DistributedLion's vote over it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from optim_helpers import bits_equal, roundtrip

from lion_hf import DistributedLion, Lion, lion
from lion_hf.optim import dispatch, numerics
from lion_hf.optim.dispatch import run_step
from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    EIGHT_BIT_MAX_CODE,
    EIGHT_BIT_MIN_NUMEL,
    dequantize_momentum,
    quantize_momentum,
)

IMPLS = ["for_loop", "foreach", "cpp"]


def _params(dtype=torch.float32, seed=0):
    """A matrix and a long vector the 8-bit state covers (the vector's last block is partial), and a
    bias and a matrix below EIGHT_BIT_MIN_NUMEL, which stay fp32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(96, 130), (20001,), (50,), (63, 65)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(params, step, nonfinite=False):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        # Scales that differ from block to block and tensor to tensor, as real gradients do.
        g = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen) ** 3
        if nonfinite:
            g.view(-1)[::97] = float("nan")
            g.view(-1)[5] = float("inf")
        p.grad = g.to(p.dtype)


def _run(impl, steps=3, dtype=torch.float32, nonfinite=False, **kwargs):
    params = _params(dtype)
    opt = Lion(params, lr=1e-2, weight_decay=0.1, state_dtype="int8", impl=impl, **kwargs)
    for step in range(steps):
        _grads(params, step, nonfinite)
        torch.manual_seed(step)
        opt.step()
    return params, opt


def _tensors(params, opt):
    return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]


# --------------------------------------------------------------------------------------
# The codes
# --------------------------------------------------------------------------------------


def test_codes_scales_and_the_exact_absmax():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3 * EIGHT_BIT_BLOCK + 17, generator=gen) * torch.rand(3 * EIGHT_BIT_BLOCK + 17, generator=gen) ** 4
    codes, scale = quantize_momentum(m, 7)
    assert codes.dtype == torch.int8 and codes.shape == m.shape
    assert scale.dtype == torch.float32 and scale.shape == (4,)
    blocks = torch.nn.functional.pad(m, (0, (-m.numel()) % EIGHT_BIT_BLOCK)).view(-1, EIGHT_BIT_BLOCK)
    assert torch.equal(scale, blocks.abs().amax(dim=1))
    assert int(codes.abs().max()) == EIGHT_BIT_MAX_CODE
    back = dequantize_momentum(codes, scale)
    top = blocks.abs().argmax(dim=1) + torch.arange(4) * EIGHT_BIT_BLOCK
    assert torch.equal(back[top], m[top]), "a block's absmax element is exact"
    # Every value lies between its two neighbouring codes: relative error under one mantissa step
    # where the codes are floats, absolute under one linear step of the scale below.
    error = (back - m).abs()
    bound = torch.maximum(m.abs() * 2.0**-numerics._MANTISSA_BITS,
                          torch.repeat_interleave(scale, EIGHT_BIT_BLOCK)[:m.numel()] * numerics._SUBNORMAL_STEP)
    assert bool((error <= bound).all())
    assert torch.equal(torch.sign(back)[back != 0], torch.sign(m)[back != 0]), "rounding never flips a sign"
    zeros_codes, zeros_scale = quantize_momentum(torch.zeros(300), 3)
    assert not zeros_codes.any() and not zeros_scale.any()


@pytest.mark.parametrize("value", [0.3, 0.0007, 3e-6])
def test_stochastic_codes_are_unbiased(value):
    """A value between two codes (a float-coded one, and two in the linear range below 2**-6) is
    stored up or down so that the mean over seeds is the value: nothing is lost on average."""
    x = torch.full((EIGHT_BIT_BLOCK,), value)
    x[0] = 1.0
    total = torch.zeros(EIGHT_BIT_BLOCK, dtype=torch.float64)
    seeds = 4000
    for seed in range(seeds):
        codes, scale = quantize_momentum(x, seed)
        total += dequantize_momentum(codes, scale).double()
    mean = total[1:] / seeds
    # The two neighbouring codes: all-zero and all-one random bits.
    low, high = (dequantize_momentum(*quantize_momentum(x, 0, noise=torch.full((EIGHT_BIT_BLOCK,), bits)))[1]
                 for bits in (0, 0xFFFF))
    assert low < value < high, "the value must lie between two codes for the test to mean anything"
    # Four standard deviations of a mean of 4000 draws between the two codes.
    assert abs(float(mean.mean()) - value) < 4 * 0.5 * float(high - low) / seeds**0.5


def test_a_momentum_change_below_one_code_step_is_not_lost():
    """Lion's momentum moves by (1 - beta2) * (g - m) per step, far below a code step here: with
    round-to-nearest it would never move; stochastic codes follow the fp32 momentum on average."""
    n = EIGHT_BIT_MIN_NUMEL
    p = torch.nn.Parameter(torch.zeros(n))
    opt = Lion([p], lr=0.0, betas=(0.9, 0.99), state_dtype="int8", impl="foreach")
    start = torch.full((n,), 0.3)
    start[::EIGHT_BIT_BLOCK] = 1.0
    codes, scale = quantize_momentum(start, 0)
    opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scale"] = codes, scale
    target = torch.full((n,), 0.35)
    target[::EIGHT_BIT_BLOCK] = 1.0  # the block maxima stay put
    exact = dequantize_momentum(codes, scale).double()
    for step in range(60):
        p.grad = target.clone()
        torch.manual_seed(step)
        opt.step()
        exact = exact * 0.99 + target.double() * 0.01
    got = dequantize_momentum(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scale"]).double()
    rest = torch.ones(n, dtype=torch.bool)
    rest[::EIGHT_BIT_BLOCK] = False
    moved = float(exact[rest].mean()) - 0.3
    assert moved > 0.015  # several code-step fractions: far from a rounding artefact
    assert abs(float(got[rest].mean()) - float(exact[rest].mean())) < 0.05 * moved


# --------------------------------------------------------------------------------------
# State, the rule for small tensors, and the impls
# --------------------------------------------------------------------------------------


def test_state_layout_and_bytes_per_param():
    params, opt = _run("foreach", steps=1)
    big, vector, bias, small = (opt.state[p] for p in params)
    for state, p in ((big, params[0]), (vector, params[1])):
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg"].shape == p.shape
        assert state["exp_avg_scale"].shape == (-(-p.numel() // EIGHT_BIT_BLOCK),)
        assert state["exp_avg"].is_contiguous()
    for state in (bias, small):  # under EIGHT_BIT_MIN_NUMEL elements: fp32, no scales
        assert state["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in state
    covered = params[:2]
    nbytes = sum(t.numel() * t.element_size() for p in covered for t in opt.state[p].values())
    assert nbytes / sum(p.numel() for p in covered) <= 1 + 4 / EIGHT_BIT_BLOCK + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_rounding", ["stochastic", "kahan", "nearest"])
def test_foreach_and_cpp_compute_for_loops_bits(dtype, param_rounding):
    """Lion's own steps (state created by Lion, NaN/inf grads skipped, a cautious group), every
    weight dtype and rounding; the property test in test_agreement.py covers the rest."""
    want = _tensors(*_run("for_loop", dtype=dtype, nonfinite=True, param_rounding=param_rounding))
    for impl in ("foreach", "cpp"):
        got = _tensors(*_run(impl, dtype=dtype, nonfinite=True, param_rounding=param_rounding))
        assert all(bits_equal(a, b) for a, b in zip(want, got)), impl
    cautious = [_tensors(*_run(impl, steps=2, dtype=dtype, cautious=True, param_rounding=param_rounding))
                for impl in IMPLS]
    assert all(bits_equal(a, b) for other in cautious[1:] for a, b in zip(cautious[0], other))


def _special_blocks(p_dtype, g_dtype, param_rounding):
    """One param whose 8-bit momentum has a block of every kind the coding treats apart, and a
    partial last block of 37 elements (two runs of 16 and 5 left over: the C++ kernel codes 16
    lanes at once where the CPU has AVX-512, and element by element for the rest). Blocks 7 to 12 are
    about the C++ kernel's vector coding, which divides by a block's scale through its reciprocal only
    for a scale in [2**-50, 2**100] and widens old codes with one product unless the scale times 2**8
    overflows: scales on both sides of each bound, one of 2**120 (times 2**8 is inf), and tiny quotients
    beside a large one."""
    gen = torch.Generator().manual_seed(7)
    blocks = 13
    n = blocks * EIGHT_BIT_BLOCK + 37
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3
    m = torch.randn(n, generator=gen) * 0.1
    m_blocks = m[:blocks * EIGHT_BIT_BLOCK].view(blocks, -1)
    g_blocks = g[:blocks * EIGHT_BIT_BLOCK].view(blocks, -1)
    m_blocks[0], g_blocks[0] = 0.0, 0.0  # all zero before and after: scale 0, every x is 0 / 0
    g_blocks[0, ::3] = -0.0
    m_blocks[1, 100] = float("nan")  # a NaN block: its scale is NaN, its codes 0
    m_blocks[2] *= 1e-4  # beside one large element, every other x is under 2**-6 (linear codes)
    m_blocks[2, 200] = -3.0
    m_blocks[3] *= 1e-38  # fp32 subnormals and their neighbours, the scale among them
    g_blocks[3] *= 1e-38
    g_blocks[4, 17:40:5] = float("nan")  # skipped (skip_elements) or propagated into the block
    g_blocks[4, 3] = float("inf")
    for block, log2_scale in zip(range(7, 12), (-50.5, -49.5, 101.0, 99.0, 120.0)):
        m_blocks[block] *= 2**log2_scale / m_blocks[block].abs().max()
        g_blocks[block] *= 2 ** min(log2_scale, 0.0)  # finite in fp16 too
    m_blocks[12] = 0.0
    m_blocks[12, 5] = 2**-45  # the scale; the other quotients, 0.01 * g / scale, from 2**-12 down to 2**-82
    g_blocks[12] = torch.randn(EIGHT_BIT_BLOCK, generator=gen).sign() * 2.0 ** -torch.randint(
        50, 120, (EIGHT_BIT_BLOCK,), generator=gen).float()
    g[-3:] = torch.tensor([float("-inf"), 1e-30, -0.0])  # in the scalar tail
    codes, scale = quantize_momentum(m, 3)
    comp = p * 2**-10 * torch.rand(n, generator=gen) if param_rounding == "kahan" and p_dtype != torch.float32 else None
    return p.to(p_dtype), g.to(g_dtype), codes, scale, None if comp is None else comp.to(p_dtype)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("nonfinite_grad", ["skip_elements", "propagate"])
@pytest.mark.parametrize(("p_dtype", "g_dtype", "param_rounding"), [
    (torch.float32, torch.float32, "nearest"),
    *[(p, g, r) for p in (torch.bfloat16, torch.float16) for g in (p, torch.float32)
      for r in ("stochastic", "kahan", "nearest")]])
def test_cpp_codes_special_blocks_and_tails_as_for_loop(p_dtype, g_dtype, param_rounding, nonfinite_grad, maximize,
                                                       monkeypatch):
    """The C++ kernel's coding (its vector path and its scalar tail) against for_loop's, bit for bit,
    over two steps, on blocks that are all zero, NaN, mostly linear codes, fp32 subnormals, or hold
    non-finite grads, for every param and grad dtype and rounding, maximizing or not. The kernel must take the tensor:
    a failed build would hand it to foreach, which computes for_loop's bits and proves nothing."""
    def elsewhere(*args, **kwargs):
        raise AssertionError("the C++ kernel should have taken the tensor")

    monkeypatch.setattr(dispatch, "foreach_lion", elsewhere)
    results = []
    for impl in ("for_loop", "cpp"):
        p, g, codes, scale, comp = _special_blocks(p_dtype, g_dtype, param_rounding)
        for step in range(2):
            group = numerics.StepGroup([p], [g], [codes], [comp], 1e-2, 0.9, 0.99, 0.1, maximize, False,
                                       param_rounding, exp_avg_scales=[scale])
            torch.manual_seed(step)
            run_step([group], impl=impl, nonfinite_grad=nonfinite_grad)
        results.append([t for t in (p, codes, scale, comp) if t is not None])
    want, got = results
    # The zero block stayed; so did the NaN block, joined under propagate by those of the non-finite grads.
    assert (scale == 0).sum() == 1 and scale.isnan().sum() == (1 if nonfinite_grad == "skip_elements" else 3)
    assert all(bits_equal(a, b) for a, b in zip(want, got))


def _quotient_the_reciprocal_misrounds():
    """(v, scale) in float32 with v * (1 / scale) one unit in the last place off v / scale, on the
    side where that changes the carry out of the 16 random bits a code adds to the quotient's
    pattern for one value of those bits (the quotient's low 3 bits 111 and the product one above,
    or 000 and one below)."""
    gen = torch.Generator().manual_seed(5)
    scale = 1 + torch.rand(4096, generator=gen)
    v = scale * (0.25 + 0.75 * torch.rand(4096, generator=gen))
    quotient = (v / scale).view(torch.int32)
    product = (v * (1 / scale)).view(torch.int32)
    hard = ((product - quotient == 1) & (quotient & 7 == 7)) | ((product - quotient == -1) & (quotient & 7 == 0))
    i = int(hard.nonzero()[0])
    return float(v[i]), float(scale[i])


def test_cpp_codes_quotients_the_reciprocal_alone_would_misround_as_for_loop(monkeypatch):
    """The C++ kernel's vector coding divides a block by its scale through the scale's reciprocal
    and two corrections (fused multiply-adds), which is the division's quotient. The product with
    the reciprocal alone is one unit in the last place off for about a fifth of quotients; that
    changes a code for one value of its 16 random bits in 2**16 at most. Here every value of them
    meets such a quotient: 2 * 2**16 elements (the random bits follow the index modulo 2**16), all
    of one hard quotient but each block's scale element, whose place differs between the halves.
    beta2 = 0.5 and zero old momentum make the new momentum exactly half the gradient."""
    def elsewhere(*args, **kwargs):
        raise AssertionError("the C++ kernel should have taken the tensor")

    monkeypatch.setattr(dispatch, "foreach_lion", elsewhere)
    v, scale = _quotient_the_reciprocal_misrounds()
    n = 2 * 2**16
    m = torch.full((n,), v)
    blocks = m.view(-1, EIGHT_BIT_BLOCK)
    blocks[: n // EIGHT_BIT_BLOCK // 2, 0] = scale
    blocks[n // EIGHT_BIT_BLOCK // 2:, 1] = -scale
    results = []
    for impl in ("for_loop", "cpp"):
        p = torch.zeros(n)
        codes, scales = torch.zeros(n, dtype=torch.int8), torch.ones(n // EIGHT_BIT_BLOCK)
        group = numerics.StepGroup([p], [2 * m], [codes], [None], 1e-2, 0.9, 0.5, 0.0, False, False,
                                   "nearest", exp_avg_scales=[scales])
        torch.manual_seed(0)
        run_step([group], impl=impl, nonfinite_grad="skip_elements")
        results.append((codes, scales))
    (want_codes, want_scales), (got_codes, got_scales) = results
    assert bits_equal(want_scales, torch.full_like(want_scales, scale)) and bits_equal(want_scales, got_scales)
    assert (want_codes.view(-1, EIGHT_BIT_BLOCK)[:, 2:] != 0).all()
    assert bits_equal(want_codes, got_codes)


def test_the_step_follows_fp32_state_closely():
    """Over a few steps the weights move as with fp32 momentum, save where sign(c) is near zero."""
    eight, _ = _run("cpp", steps=5)
    full = _params()
    opt = Lion(full, lr=1e-2, weight_decay=0.1, impl="cpp")
    for step in range(5):
        _grads(full, step)
        opt.step()
    same = sum(int((a == b).sum()) for a, b in zip(eight[:2], full[:2])) / sum(p.numel() for p in full[:2])
    assert same > 0.97
    for a, b in zip(eight[2:], full[2:]):  # the fp32-state tensors are untouched by the rule
        assert torch.equal(a, b)


def test_the_functional_step_takes_codes_only_with_their_scales():
    p, g = torch.zeros(300), torch.ones(300)
    codes, _ = quantize_momentum(torch.rand(300), 0)
    with pytest.raises(ValueError, match="block scales"):
        lion([p], [g], [codes.clone()], impl="foreach")


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["foreach", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_resumes_bit_for_bit(impl, dtype):
    whole, whole_opt = _run(impl, steps=4, dtype=dtype)
    first, first_opt = _run(impl, steps=2, dtype=dtype)
    saved = roundtrip(first_opt.state_dict())
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = Lion(params, lr=1e-2, weight_decay=0.1, state_dtype="int8", impl=impl)
    opt.load_state_dict(saved)
    for step in (2, 3):
        _grads(params, step)
        torch.manual_seed(step)
        opt.step()
    assert all(bits_equal(a, b) for a, b in zip(_tensors(whole, whole_opt), _tensors(params, opt)))


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_an_8bit_checkpoint_loads_dequantized_into_fp32_or_bf16_state(state_dtype):
    params, opt8 = _run("foreach", steps=2)
    saved = roundtrip(opt8.state_dict())
    opt = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype=state_dtype)
    opt.load_state_dict(saved)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
    for p, q in zip(params, opt.param_groups[0]["params"]):
        want = opt8.state[p]
        value = want["exp_avg"] if "exp_avg_scale" not in want else dequantize_momentum(want["exp_avg"],
                                                                                       want["exp_avg_scale"])
        assert set(opt.state[q]) == {"exp_avg"}
        assert torch.equal(opt.state[q]["exp_avg"], value.to(dtype))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()


def test_an_fp32_checkpoint_loads_quantized_into_8bit_state():
    params = _params()
    opt = Lion(params, lr=1e-2, impl="foreach")
    for step in range(2):
        _grads(params, step)
        opt.step()
    saved = roundtrip(opt.state_dict())
    opt8 = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="int8")
    opt8.load_state_dict(saved)
    opt8_again = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="int8")
    opt8_again.load_state_dict(saved)
    for p, q, r in zip(params, opt8.param_groups[0]["params"], opt8_again.param_groups[0]["params"]):
        m = opt.state[p]["exp_avg"]
        state = opt8.state[q]
        if p.numel() < EIGHT_BIT_MIN_NUMEL:
            assert torch.equal(state["exp_avg"], m) and "exp_avg_scale" not in state
            continue
        assert state["exp_avg"].dtype == torch.int8
        back = dequantize_momentum(state["exp_avg"], state["exp_avg_scale"])
        bound = m.abs() * 2.0**-numerics._MANTISSA_BITS + state["exp_avg_scale"].max() * numerics._SUBNORMAL_STEP
        assert bool(((back - m).abs() <= bound).all())
        assert all(torch.equal(a, b) for a, b in zip(state.values(), opt8_again.state[r].values())), \
            "a load is reproducible"
    assert all(opt8.state[p]["exp_avg"].data_ptr() != opt.state[q]["exp_avg"].data_ptr()
               for p, q in zip(opt8.param_groups[0]["params"], params))


def _bad(entry_edit):
    params, opt = _run("foreach", steps=1)
    saved = copy.deepcopy(opt.state_dict())
    entry_edit(saved["state"][0], saved["state"][2])
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    target = Lion(fresh, lr=1e-2, state_dtype="int8", impl="foreach")
    _grads(fresh, 0)
    target.step()
    before = copy.deepcopy(target.state_dict())
    return target, saved, before


@pytest.mark.parametrize("edit, message", [
    (lambda big, small: big.update(exp_avg_scale=big["exp_avg_scale"][:-1]), "shape"),
    (lambda big, small: big["exp_avg_scale"].__setitem__(0, float("nan")), "NaN, inf or negative"),
    (lambda big, small: big["exp_avg_scale"].__setitem__(1, float("inf")), "NaN, inf or negative"),
    (lambda big, small: big["exp_avg_scale"].__setitem__(2, -1.0), "NaN, inf or negative"),
    (lambda big, small: big.update(exp_avg_scale=big["exp_avg_scale"].double()), "float32"),
    (lambda big, small: big.update(exp_avg=big["exp_avg"].to(torch.int16)), "int8"),
    (lambda big, small: big.update(exp_avg=big["exp_avg"].reshape(-1)), "shape"),
    (lambda big, small: big["exp_avg"].view(-1).__setitem__(0, 127), "codes beyond"),
    (lambda big, small: big.pop("exp_avg_scale"), "exp_avg_scale"),
    (lambda big, small: small.update(exp_avg_scale=torch.ones(1)), "int8"),
])
def test_load_validates_the_8bit_tensors_and_changes_nothing(edit, message):
    target, saved, before = _bad(edit)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        assert entry.keys() == after["state"][key].keys()
        assert all(torch.equal(entry[name], after["state"][key][name]) for name in entry)


# --------------------------------------------------------------------------------------
# DistributedLion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_distributed_lion_votes_over_the_8bit_momentum(monkeypatch, chunked):
    """Two ranks with the same data (the other rank's signs are this rank's own): the vote is each
    element's own sign(c), so DistributedLion with 8-bit state moves fp32 weights exactly as Lion
    with 8-bit state does from the same checkpoint, and its momentum differs by rounding only."""
    from lion_hf.optim import distributed
    from lion_hf.optim.distributed import HEADER_BYTES, pack_signs

    params, opt = _run("foreach", steps=2)
    saved = roundtrip(opt.state_dict())
    _grads(params, 5)
    grads = [p.grad.clone() for p in params]
    lion_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = Lion(lion_params, lr=1e-2, weight_decay=0.1, state_dtype="int8", impl="foreach")
    reference.load_state_dict(saved)
    signs = []
    for p, g in zip(lion_params, grads):
        state = reference.state[p]
        m = state["exp_avg"] if "exp_avg_scale" not in state else dequantize_momentum(state["exp_avg"],
                                                                                     state["exp_avg_scale"])
        signs.append(torch.sign(m * 0.9 + g * (1 - 0.9)))
    other = pack_signs(signs)

    def gather(output, buffer, group):
        rows = output.view(2, -1)
        rows[0] = buffer
        rows[1] = buffer
        rows[1, HEADER_BYTES:HEADER_BYTES + other.numel()] = other

    monkeypatch.setattr(DistributedLion, "world_size", lambda self: 2)
    monkeypatch.setattr(distributed, "_all_gather", gather)
    if chunked:  # for_loop's and foreach's two passes then cut each 8-bit momentum into many chunks
        _small_chunks(monkeypatch)
    results = []
    for impl in IMPLS:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dl = DistributedLion(ps, lr=1e-2, weight_decay=0.1, state_dtype="int8", impl=impl)
        dl.load_state_dict(saved)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        torch.manual_seed(9)
        dl.step()
        results.append(_tensors(ps, dl))
        assert dl.state[ps[0]]["exp_avg"].dtype == torch.int8
    assert all(bits_equal(a, b) for other_impl in results[1:] for a, b in zip(results[0], other_impl))
    for p, g in zip(lion_params, grads):
        p.grad = g.clone()
    reference.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(results[0][:4], lion_params))
    moved = sum(int((a != p).sum()) for a, p in zip(results[0][:4], params))
    assert moved > sum(p.numel() for p in params) // 2


def test_training_arguments_take_int8_and_build_an_8bit_lion(tmp_path):
    from lion_hf import LionTrainingArguments
    from lion_hf.trainer import lion_optimizers

    args = LionTrainingArguments(output_dir=str(tmp_path), lion_state_dtype="int8", learning_rate=5e-5,
                                 report_to="none", use_cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 2))
    optimizer, _ = lion_optimizers(model, args, num_training_steps=10)
    model(torch.randn(4, 128)).sum().backward()
    optimizer.step()
    dtypes = {tuple(p.shape): optimizer.state[p]["exp_avg"].dtype for p in model.parameters()}
    assert dtypes == {(64, 128): torch.int8, (64,): torch.float32, (2, 64): torch.float32, (2,): torch.float32}
    with pytest.raises(ValueError, match="lion_state_dtype"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_state_dtype="int4", report_to="none")


# --------------------------------------------------------------------------------------
# Chunks: no full-size temporaries
# --------------------------------------------------------------------------------------


def _small_chunks(monkeypatch):
    """Chunks of two blocks: every 8-bit tensor of these tests is then cut into many, the last
    one partial where the tensor ends inside a block."""
    from lion_hf.optim import foreach

    for module in (numerics, foreach):
        monkeypatch.setattr(module, "EIGHT_BIT_CHUNK", 2 * EIGHT_BIT_BLOCK)


def test_chunks_cover_the_tensor_on_block_boundaries(monkeypatch):
    _small_chunks(monkeypatch)
    chunks = numerics.eight_bit_chunks(5 * EIGHT_BIT_BLOCK + 3)
    assert chunks == [(0, 512), (512, 1024), (1024, 1283)]
    assert numerics.eight_bit_chunks(0) == []
    # A slice's random bits under the offset seed are the whole tensor's from that element on.
    for seed, start in ((0, 512), (65535, 1024), (40000, 3 * 2**16 + 512)):
        whole = numerics.random_bits16(start + 700, seed, torch.device("cpu"))
        assert torch.equal(numerics.random_bits16(700, numerics.offset_seed(seed, start), torch.device("cpu")),
                           whole[start:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_rounding", ["stochastic", "kahan", "nearest"])
def test_chunked_steps_compute_the_whole_tensors_bits(monkeypatch, dtype, param_rounding):
    """for_loop and foreach in chunks compute the bits the C++ kernel computes over whole tensors
    (and for_loop over whole tensors), NaN/inf grads skipped, fresh state and three steps."""
    want = _tensors(*_run("cpp", dtype=dtype, nonfinite=True, param_rounding=param_rounding))
    whole = _tensors(*_run("for_loop", dtype=dtype, nonfinite=True, param_rounding=param_rounding))
    assert all(bits_equal(a, b) for a, b in zip(want, whole))
    _small_chunks(monkeypatch)
    for impl in ("for_loop", "foreach"):
        got = _tensors(*_run(impl, dtype=dtype, nonfinite=True, param_rounding=param_rounding))
        assert all(bits_equal(a, b) for a, b in zip(want, got)), impl


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_checkpoint_conversions_in_chunks_are_the_whole_tensors(monkeypatch, state_dtype):
    """A float momentum quantized on load, and codes dequantized on load, chunk by chunk: the
    bits of converting each tensor whole (numerics' functions)."""
    params = _params()
    opt = Lion(params, lr=1e-2, impl="foreach", state_dtype=state_dtype)
    for step in range(2):
        _grads(params, step)
        opt.step()
    saved = roundtrip(opt.state_dict())
    _small_chunks(monkeypatch)
    opt8 = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="int8")
    opt8.load_state_dict(saved)
    back = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype=state_dtype)
    back.load_state_dict(roundtrip(opt8.state_dict()))
    for p, q, r in zip(params, opt8.param_groups[0]["params"], back.param_groups[0]["params"]):
        if p.numel() < EIGHT_BIT_MIN_NUMEL:
            continue
        codes, scale = quantize_momentum(opt.state[p]["exp_avg"].float(), 0)
        assert torch.equal(opt8.state[q]["exp_avg"], codes) and bits_equal(opt8.state[q]["exp_avg_scale"], scale)
        value = dequantize_momentum(codes, scale)
        assert bits_equal(back.state[r]["exp_avg"], value.to(back.state[r]["exp_avg"].dtype))


# The child of test_an_8bit_step_needs_no_temporaries_of_the_tensors_size: steps one bf16 param with
# 8-bit state and prints, per measured stage, its peak resident memory above the stage's start.
_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from lion_hf import Lion

    def kib(field):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    def peak(action):
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark down to the current size
        start = kib("VmRSS")
        action()
        return (kib("VmHWM") - start) * 1024

    impl, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    warm = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    warm.grad = torch.randn_like(warm)
    for _ in range(2):  # the kernel loaded, the ops' first calls made: not what is measured
        Lion([warm], state_dtype="int8", impl=impl).step()
    p = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = Lion([p], state_dtype="int8", impl=impl)
    out = {"first": peak(opt.step), "second": peak(opt.step)}
    m = torch.randn(rows, cols)  # an fp32 checkpoint's momentum, quantized on load
    saved = {"state": {0: {"exp_avg": m}}, "param_groups": opt.state_dict()["param_groups"]}
    out["load"] = peak(lambda: Lion([p], state_dtype="int8", impl=impl).load_state_dict(saved))
    print("PEAKS " + json.dumps(out))
""")


# for_loop's op-by-op step of the whole tensor takes over 10 s on 2 shared cores.
@pytest.mark.parametrize("impl", ["cpp", "foreach", pytest.param("for_loop", marks=pytest.mark.slow)])
def test_an_8bit_step_needs_no_temporaries_of_the_tensors_size(impl):
    """Peak resident memory above the start of the first step (the state created) and of a later
    step on one 1024 x 2048 bf16 param: at most the 8-bit state, half a byte per element, and the
    temporaries of one chunk (a generous 256 bytes per element of a chunk). Loading an fp32 momentum
    may add one fp32 copy of the tensor and the finiteness check's temporaries (8 bytes per
    element). Creating the state from an fp32 tensor of zeros, or stepping or quantizing the whole
    tensor at once, takes many fp32 copies of it (40 bytes per element and more)."""
    rows, cols = 1024, 2048
    numel = rows * cols
    state = numel + 4 * numerics.eight_bit_scale_numel(numel)
    chunk = 256 * numerics.EIGHT_BIT_CHUNK
    bounds = {"first": state + numel // 2 + chunk, "second": state + numel // 2 + chunk,
              "load": state + 8 * numel + chunk}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, impl, str(rows), str(cols)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = json.loads(next(line[6:] for line in result.stdout.splitlines() if line.startswith("PEAKS ")))
    for stage, nbytes in peaks.items():
        bound = bounds[stage]
        assert nbytes <= bound, f"{impl}: {stage} peaks {nbytes / 2**20:.1f} MiB above its start " \
                                f"(<= {bound / 2**20:.1f})"
