"""Which impl runs, and the one path of every step (lion_hf/optim/dispatch.py)."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import bits_equal

from lion_hf import Lion
from lion_hf.optim import cpu_kernel, dispatch
from lion_hf.optim.dispatch import impl_unavailable, resolve_impl, run_step
from lion_hf.optim.numerics import StepGroup
from lion_hf.optim.options import IMPLS


def _run(params, grads, moms, impl, comps=None, param_rounding="stochastic"):
    group = StepGroup(params, grads, moms, comps or [None] * len(params), lr=0.01, beta1=0.9, beta2=0.99,
                      weight_decay=0.1, maximize=False, cautious=False, param_rounding=param_rounding)
    run_step([group], impl=impl, nonfinite_grad="skip_elements")


def test_there_are_four_impls_and_compiled_is_gone():
    assert IMPLS == ("auto", "for_loop", "foreach", "cpp", "triton")
    for call in (lambda: Lion([torch.nn.Parameter(torch.zeros(2))], impl="compiled"),
                 lambda: resolve_impl("compiled", "cpu")):
        with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'for_loop', 'foreach', 'cpp', 'triton'\)"):
            call()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    monkeypatch.setattr(dispatch, "_triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        Lion([torch.nn.Parameter(torch.zeros(2))], impl="triton")
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        Lion([torch.nn.Parameter(torch.zeros(2))], impl="triton")


def test_auto_is_cpp_on_the_cpu_triton_on_cuda_and_foreach_where_they_cannot_run(monkeypatch):
    assert resolve_impl("auto", "cpu") == "cpp"
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        resolve_impl("cpp", "meta")
    assert resolve_impl("auto", "meta") == "foreach"
    monkeypatch.setattr(cpu_kernel, "build_failure", RuntimeError("no g++"))
    assert "failed to build earlier in this process (RuntimeError: no g++)" in impl_unavailable("cpp", "cpu")
    assert resolve_impl("auto", "cpu") == "foreach"
    assert resolve_impl("cpp", "cpu") == "cpp"  # asked for: its steps run in foreach, after one warning
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_impl("auto", "cuda") == "triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_impl("auto", "cuda") == "foreach"
    assert "CUDA is not usable" in impl_unavailable("triton", "cuda")


def test_without_a_compiler_cpp_is_unavailable_and_auto_is_foreach(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "needs a C++ compiler" in impl_unavailable("cpp", "cpu")
    assert resolve_impl("auto", "cpu") == "foreach"


def _tensors(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in [(40, 3), (7,), (3, 5), (300,)]]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    moms = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    # A non-contiguous param (with a grad and momentum of its layout): the kernel leaves it.
    base = torch.randn(5, 3, generator=gen).to(dtype)
    params[2] = base.t()
    grads[2] = torch.randn(5, 3, generator=gen).to(dtype).t()
    moms[2] = torch.randn(5, 3, generator=gen).t() * 0.1
    return params, grads, moms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_what_the_kernel_leaves_runs_in_foreach_and_the_step_rounds_as_one_impl(dtype, monkeypatch):
    """The one rule: the kernel takes the contiguous tensors, foreach the rest, with the seeds
    drawn for the whole step: the split step is bit for bit for_loop's."""
    ran = []
    original = dispatch.foreach_lion
    monkeypatch.setattr(dispatch, "foreach_lion",
                        lambda groups, **k: ran.append(sum(len(g.params) for g in groups)) or original(groups, **k))
    results = {}
    for impl in ("for_loop", "cpp"):
        params, grads, moms = (list(map(torch.clone, ts)) for ts in _tensors(3, dtype))
        torch.manual_seed(4)
        _run(params, grads, moms, impl)
        results[impl] = (params, moms)
    assert ran == [1], "only the non-contiguous tensor should run in foreach"
    for kind, want, have in zip(("param", "momentum"), results["for_loop"], results["cpp"]):
        for i, (a, b) in enumerate(zip(want, have)):
            assert bits_equal(a, b), f"{kind} {i} differs from for_loop's"


def test_a_step_over_two_devices_runs_each_devices_impl(monkeypatch):
    ran = []
    for name in ("cpp", "foreach"):
        monkeypatch.setitem(dispatch._IMPL_FUNCTIONS, name,
                            lambda groups, name=name, **k: ran.append((name, groups[0].params[0].device.type))
                            or [[] for _ in groups])
    cpu = [torch.zeros(3)]
    meta = [torch.zeros(3, device="meta")]
    # meta stands in for a second device; run_step refuses meta params, so route around the check.
    def devices_unchecked(params, *args, memory=None, **kwargs):
        if memory is not None:
            memory.append(None)  # as the check says of tensors whose memory it did not read
        return [p.device for p in params]

    monkeypatch.setattr(dispatch, "check_step_tensors", devices_unchecked)
    monkeypatch.setattr(dispatch, "overlapping", lambda tensors: False)  # meta tensors all sit at address 0
    _run(cpu + meta, [torch.ones(3), torch.ones(3, device="meta")], [torch.zeros(3), torch.zeros(3, device="meta")],
         "auto")
    assert ran == [("cpp", "cpu"), ("foreach", "meta")]


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "cpp", "triton"])
def test_meta_params_are_a_value_error_in_every_impl(impl):
    p = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        _run([p], [torch.ones(4, device="meta")], [torch.zeros(4, device="meta")], impl)


@pytest.mark.parametrize("impl", ["foreach", "cpp", "triton"])
@pytest.mark.parametrize("sharing", ["param_listed_twice", "overlapping_views", "residual_is_a_param"])
def test_tensors_that_share_memory_update_one_after_the_other_in_every_impl(impl, sharing, monkeypatch):
    """The fused impls would race on (or read stale) shared elements: such a step is for_loop's."""
    ran = []
    original = dispatch.for_loop_lion
    monkeypatch.setattr(dispatch, "for_loop_lion", lambda groups, **k: ran.append(1) or original(groups, **k))
    base = torch.zeros(40000, dtype=torch.bfloat16)
    if sharing == "param_listed_twice":
        params, comps = [base, base], None
    elif sharing == "overlapping_views":
        params, comps = [base[:30000], base[10000:]], None
    else:  # one param's Kahan residual lies inside another param
        params, comps = [base[:10000], base[20000:30000]], [base[25000:35000], torch.zeros(10000, dtype=torch.bfloat16)]
    grads = [torch.ones(p.shape, dtype=torch.bfloat16) for p in params]
    moms = [torch.zeros(p.shape) for p in params]
    _run(params, grads, moms, impl, comps=comps, param_rounding="kahan" if comps else "nearest")
    assert ran == [1], "the step should have run tensor by tensor"


@pytest.mark.parametrize("impl", ["foreach", "cpp", "triton"])
def test_views_that_share_memory_only_past_their_numel_are_found_by_their_strided_extent(impl, monkeypatch):
    """A column slice spans more memory than numel * itemsize: a row of the same matrix lies
    inside it. The old check compared numel * itemsize ranges and let the fused impls race."""
    ran = []
    original = dispatch.for_loop_lion
    monkeypatch.setattr(dispatch, "for_loop_lion", lambda groups, **k: ran.append(1) or original(groups, **k))
    base = torch.zeros(10, 10)
    params = [base[:, :2], base[5, :2]]  # base[5, 0] and base[5, 1] are in both
    assert params[0].data_ptr() + params[0].numel() * 4 < params[1].data_ptr()
    _run(params, [torch.ones(p.shape) for p in params], [torch.zeros(p.shape) for p in params], impl)
    assert ran == [1], "the step should have run tensor by tensor"
    torch.testing.assert_close(base[5, :2], torch.full((2,), -0.02))  # stepped twice, as for_loop defines it


def test_an_explicit_impl_is_checked_again_per_device_at_the_step(monkeypatch):
    """Lion(model.parameters(), impl="cpp") and then model.cuda(): the C++ kernel would read device
    memory. Here the impl becomes unusable after construction, as it would on the new device."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Lion([p], lr=0.1, impl="cpp")
    p.grad = torch.ones(4)
    monkeypatch.setattr(dispatch, "impl_unavailable", lambda impl, device, **k: f"{impl} cannot run on {device}")
    dispatch._explicit_impl_checked.cache_clear()
    with pytest.raises(RuntimeError, match="cpp cannot run on cpu"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))
    monkeypatch.undo()
    dispatch._explicit_impl_checked.cache_clear()
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), -0.1))


def test_the_explicit_impl_check_is_cached(monkeypatch):
    calls = []
    original = dispatch.impl_unavailable
    monkeypatch.setattr(dispatch, "impl_unavailable", lambda *a, **k: calls.append(a) or original(*a, **k))
    dispatch._explicit_impl_checked.cache_clear()
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Lion([p], lr=0.1, impl="foreach")
    calls.clear()  # the constructor's own check
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert calls == [("foreach", torch.device("cpu"))]


@pytest.mark.parametrize("policy", ["skip_step", "raise", "skip_elements"])
def test_meta_params_are_the_meta_error_under_every_nonfinite_policy(policy):
    """The skip_step / raise gate used to read the meta grads first: a confusing Tensor.item error."""
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    opt = Lion([p], lr=0.1, nonfinite_grad=policy)
    p.grad = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        opt.step()


@pytest.mark.parametrize("caller", ["Lion.step", "lion()"])
def test_the_impl_is_checked_once_per_step(monkeypatch, caller):
    """The impl's name is checked once, by the optimizer; the dispatcher then only looks up (cached)
    whether it can run on each device."""
    from lion_hf import lion
    from lion_hf.optim import lion as lion_module

    p = torch.nn.Parameter(torch.randn(10))
    q, m = torch.randn(10), torch.zeros(10)
    opt = Lion([p], impl="foreach")

    def step():
        p.grad = torch.randn(10)
        if caller == "Lion.step":
            opt.step()
        else:
            lion([q], [torch.randn(10)], [m], lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="foreach")

    step()  # warm: the dispatcher's per-device cache is filled
    calls = []
    for module, name in ((lion_module, "validate_options"), (lion_module, "resolve_impl"),
                         (dispatch, "resolve_impl"), (dispatch, "_resolve"), (dispatch, "impl_unavailable")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    step()
    assert calls == ["validate_options"]
