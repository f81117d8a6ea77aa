"""impl="cpp": the C++ kernel against impl="for_loop" bit for bit; how a step splits between the
kernel and the other impls; its build, cache and fallback."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim import cpu_kernel
from lion_hf.optim import lion as lion_module
from lion_hf.optim.lion import impl_unavailable, lion, resolve_impl

pytestmark = pytest.mark.skipif(lion_module.cxx_compiler() is None, reason="needs a C++ compiler")

# Lengths around the kernel's 16384-element block and its 8-wide vectors, an empty tensor, a
# one-element one, and one past 2**16 elements (stochastic rounding hashes the index mod 2**16).
SHAPES = [(0,), (1,), (7,), (33, 5), (2000,), (40000,), (3, 16385), (300,), (70000,)]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, NaN to NaN: a NaN's payload and sign depend on how a conversion or a
    negation was spelt."""
    nan = a.isnan()
    as_int = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(as_int)[~nan], b.view(as_int)[~nan])


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
    if nonfinite:  # in one block of the large tensors; the others stay on the fast path
        grads[3][4, 1] = float("nan")
        grads[5][20000] = float("inf")
        grads[6][2, 7] = -float("inf")
    return params, grads, moms


def _step(impl: str, tensors, **kwargs):
    params, grads, moms = ([t.clone() for t in ts] for ts in tensors)
    lion(params, grads, moms, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, impl=impl, **kwargs)
    return params, moms


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("policy", ["skip_elements", "propagate"])
def test_bf16_storage_is_bit_for_bit_the_for_loop_step_given_the_same_generator(
        param_dtype, state_dtype, rounding, cautious, policy, monkeypatch):
    """Stochastic rounding included: the kernel draws its seeds in for_loop's order and hashes
    each element's index as lion.py does."""

    def elsewhere(*args, **kwargs):
        raise AssertionError("the kernel should have taken every tensor")

    monkeypatch.setattr(cpu_kernel, "_run_elsewhere", elsewhere)
    params, grads, moms = _tensors(seed=7, nonfinite=True)
    tensors = ([p.to(param_dtype) for p in params], [g.to(param_dtype) for g in grads],
               [m.to(state_dtype) for m in moms])
    flags = dict(cautious=cautious, nonfinite_grad=policy, param_rounding=rounding)
    results = []
    for impl in ("for_loop", "cpp"):
        torch.manual_seed(11)
        results.append(_step(impl, tensors, **flags))
    for kind, want, have in zip(("param", "momentum"), *results):
        for shape, a, b in zip(SHAPES, want, have):
            assert a.dtype == b.dtype and _bits_equal(a, b), f"{kind} {shape} differs from for_loop's"
    assert any(not torch.equal(a, b) for a, b in zip(results[1][0], tensors[0])), "nothing moved"


@pytest.mark.parametrize("maximize,cautious", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("policy", ["skip_elements", "propagate"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_is_bit_for_bit_the_for_loop_step(maximize, cautious, policy, threads, monkeypatch):
    def elsewhere(*args, **kwargs):
        raise AssertionError("the kernel should have taken every tensor")

    monkeypatch.setattr(cpu_kernel, "_run_elsewhere", elsewhere)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = _tensors(seed=threads, nonfinite=True)
        flags = dict(maximize=maximize, cautious=cautious, nonfinite_grad=policy)
        expected, got = _step("for_loop", tensors, **flags), _step("cpp", tensors, **flags)
    finally:
        torch.set_num_threads(previous)
    for kind, want, have in zip(("param", "momentum"), expected, got):
        for shape, a, b in zip(SHAPES, want, have):
            assert _bits_equal(a, b), f"{kind} {shape} differs from for_loop's"
    params, _, moms = tensors
    if cautious and not maximize:  # the clamped fraction scaled the one agreeing update by 1000
        assert abs(float(got[0][4][0] - params[4][0] * (1 - 0.01 * 0.1))) > 5
    if policy == "skip_elements":  # the non-finite elements kept their values
        assert got[0][3][4, 1] == params[3][4, 1] and got[1][5][20000] == moms[5][20000]
    else:
        assert torch.isinf(got[1][5][20000])


def test_a_step_splits_between_the_kernel_and_the_other_impls():
    """fp32 and bf16 params go to the kernel (bit for bit for_loop); an fp16 param, an fp32 param
    with a bf16 grad and a strided grad go where "auto" would send them without cpp (foreach
    here, under 1M elements)."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(300, generator=gen), torch.randn(64, generator=gen).half(), torch.randn(40, generator=gen),
              torch.randn(8, 6, generator=gen), torch.randn(50, generator=gen).bfloat16()]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    grads[2] = grads[2].bfloat16()
    grads[3] = torch.randn(6, 8, generator=gen).t()  # not contiguous
    moms = [torch.randn(p.shape, generator=gen) for p in params]
    kernel_part, other_part = [0, 4], [1, 2, 3]
    tensors = (params, grads, moms)
    flags = dict(param_rounding="nearest", nonfinite_grad="propagate")
    got = _step("cpp", tensors, **flags)
    want_kernel = _step("for_loop", [[ts[i] for i in kernel_part] for ts in tensors], **flags)
    want_other = _step("foreach", [[ts[i] for i in other_part] for ts in tensors], **flags)
    for k, (p_want, m_want) in zip(kernel_part, zip(*want_kernel)):
        assert _bits_equal(got[0][k], p_want) and _bits_equal(got[1][k], m_want), f"tensor {k}"
    for k, (p_want, m_want) in zip(other_part, zip(*want_other)):
        assert torch.equal(got[0][k], p_want) and torch.equal(got[1][k], m_want), f"tensor {k}"
    assert got[0][1].dtype == torch.float16 and got[0][4].dtype == torch.bfloat16


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


@pytest.mark.parametrize("threshold,expected", [(0, "compiled"), (10**9, "foreach")])
def test_what_the_kernel_does_not_take_runs_as_auto_would(threshold, expected, monkeypatch):
    ran = []
    for name in ("compiled", "foreach"):
        monkeypatch.setitem(lion_module._IMPL_FUNCTIONS, name,
                            lambda params, *args, name=name, **kwargs: ran.append((name, len(params))))
    monkeypatch.setattr(lion_module, "AUTO_COMPILE_MIN_NUMEL", threshold)
    params = [torch.zeros(10), torch.zeros(10, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)]
    grads = [torch.ones_like(p) for p in params]
    moms = [torch.zeros(p.shape) for p in params]
    lion(params, grads, moms, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    assert ran == [(expected, 2)] and torch.equal(params[0], torch.full((10,), -0.5))


def test_overlapping_tensors_run_elsewhere(monkeypatch):
    """Two views sharing elements: the kernel's threads could race on them, so the call runs as
    auto would without cpp (foreach here), which updates them one after the other."""

    def kernel(*args):
        raise AssertionError("the kernel must not see overlapping tensors")

    monkeypatch.setattr(cpu_kernel, "_kernel", kernel)
    base = torch.zeros(40000)
    views = [base[:30000], base[10000:]]
    grads = [torch.ones(30000), torch.ones(30000)]
    moms = [torch.zeros(30000), torch.zeros(30000)]
    lion(views, grads, moms, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    assert float(base[15000]) == -1.0 and float(base[0]) == -0.5 and float(base[-1]) == -0.5
    p = torch.zeros(8)
    lion([p, p], [torch.ones(8)] * 2, [torch.zeros(8)] * 2, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0,
         impl="cpp")  # a param listed twice, sharing its momentum as Lion's state does
    assert torch.equal(p, torch.full((8,), -1.0))


def test_a_kind_the_kernel_does_not_know_is_an_error_before_any_update(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_kind", lambda *args: cpu_kernel._BF16_MOMENTUM | cpu_kernel._PARAM_STOCHASTIC)
    params, grads, moms = [torch.zeros(5)], [torch.ones(5)], [torch.zeros(5)]
    with pytest.raises(RuntimeError, match="does not know 1 tensor kind"):
        lion(params, grads, moms, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    assert torch.equal(params[0], torch.zeros(5)) and torch.equal(moms[0], torch.zeros(5))


@pytest.mark.parametrize("grad_shape", [(3,), (2, 2)])
def test_a_grad_of_another_shape_is_a_value_error(grad_shape):
    params, grads = [torch.zeros(5), torch.zeros(4)], [torch.ones(5), torch.ones(grad_shape)]
    moms = [torch.zeros(5), torch.zeros(4)]
    with pytest.raises(ValueError, match=r"shape \(4,\) has a grad of shape \(" + str(grad_shape[0])):
        lion(params, grads, moms, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    assert torch.equal(params[0], torch.zeros(5)), "nothing may be written before the check"


def test_lion_under_auto_runs_the_kernel(monkeypatch):
    calls = []
    kernel = cpu_kernel._load()
    monkeypatch.setattr(cpu_kernel, "_kernel", lambda *args: calls.append(args[0]) or kernel(*args))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = Lion(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert opt._impl_for(torch.device("cpu")) == "cpp" and calls == [4], "one call for all 4 tensors"


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """No kernel loaded yet in this process, and an empty cache."""
    monkeypatch.setattr(cpu_kernel, "_kernel", None)
    monkeypatch.setattr(cpu_kernel, "build_failure", None)
    monkeypatch.setenv("LION_HF_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_a_failed_build_warns_once_and_the_step_runs_elsewhere(fresh_kernel, monkeypatch):
    broken = fresh_kernel / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'simulated compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    tensors = _tensors(seed=5, nonfinite=False)
    with pytest.warns(UserWarning, match="impl='cpp' is unavailable.*simulated compiler error"):
        got = _step("cpp", tensors)
    want = _step("foreach", tensors)
    assert all(_bits_equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
    assert "simulated compiler error" in impl_unavailable("cpp", "cpu")
    assert resolve_impl("auto", torch.device("cpu"), numel=10) == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step("cpp", tensors)  # no second build, no second warning


def test_the_library_is_built_once_and_then_read_from_the_cache(fresh_kernel, monkeypatch):
    path = cpu_kernel.build()
    assert path.exists() and path.parent == fresh_kernel / "cache"

    run = subprocess.run

    def no_build(command, *args, **kwargs):
        if "-shared" in command:
            raise AssertionError("the cached library should have been used")
        return run(command, *args, **kwargs)  # the compiler's --version, for the cache key

    monkeypatch.setattr(subprocess, "run", no_build)
    assert cpu_kernel.build() == path
    assert cpu_kernel._load() is not None


def test_processes_building_at_once_all_load_a_whole_library(tmp_path):
    """Ranks of one job build into the same cache at the same time."""
    script = ("import torch\nfrom lion_hf.optim.lion import lion\n"
              "p, g, m = [torch.ones(10)], [torch.ones(10)], [torch.zeros(10)]\n"
              "lion(p, g, m, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl='cpp')\n"
              "assert torch.equal(p[0], torch.full((10,), 0.5)), p\n")
    env = {**os.environ, "LION_HF_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-W", "error::UserWarning", "-c", script], env=env,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    assert len(list(tmp_path.glob("*.so"))) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]
