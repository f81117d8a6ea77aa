"""Lion against the float64 reference, every impl; policies, validation, state, convergence.

Tolerances (relative to the reference value, per storage dtype):
  params  fp32 1e-6, fp16 2**-10, bf16 2**-7  (one ulp of round-to-nearest, plus fp32 arithmetic)
  state   fp32 1e-6, bf16 2**-7              (one ulp: stochastic rounding moves to a neighbour)
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim import compiled, cpu_kernel
from lion_hf.optim import lion as lion_module
from lion_hf.optim.lion import _stochastic_round_to_bf16, resolve_impl
from lion_hf.optim.reference import lion_reference_step

CPU_IMPLS = ["for_loop", "foreach", "compiled", "cpp"]
PARAM_RTOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
STATE_RTOL = {"fp32": 1e-6, "bf16": 2**-7}
SHAPES = [(0,), (1,), (7,), (33, 5), (2, 3, 4), (300,)]


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    actual = actual.double()
    # atol covers values that pass near zero, where a relative bound is meaningless.
    atol = rtol * max(1e-3, float(expected.abs().max()) if expected.numel() else 0.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


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
                _assert_close_rel(
                    p.detach().cpu(), ref_p, PARAM_RTOL[param_dtype], f"param {tuple(p.shape)} step {step}"
                )
                _assert_close_rel(
                    opt.state[p]["exp_avg"].cpu(), ref_m, STATE_RTOL[state_dtype], f"state {tuple(p.shape)}"
                )
                assert opt.state[p]["exp_avg"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
    assert late in opt.state, "the unfrozen param never got state"
    return opt


# cpp: its kernel takes fp32 and bf16 params; fp16 ones go to foreach (tests/test_cpu_kernel.py).
@pytest.mark.parametrize("impl", ["for_loop", "foreach", "cpp"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_eager_impls_match_reference(impl, param_dtype, state_dtype):
    _run_against_reference(impl, param_dtype, state_dtype)


# Each combination is a separate torch.compile (~10 s on 2 cores): the default run keeps three.
@pytest.mark.parametrize(
    "param_dtype,state_dtype",
    [(torch.float32, "fp32"), (torch.bfloat16, "bf16"),
     pytest.param(torch.float16, "fp32", marks=pytest.mark.slow),
     pytest.param(torch.bfloat16, "fp32", marks=pytest.mark.slow),
     pytest.param(torch.float32, "bf16", marks=pytest.mark.slow)],
)
def test_compiled_matches_reference(param_dtype, state_dtype):
    _run_against_reference("compiled", param_dtype, state_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["foreach", "compiled", "triton"])
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


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_does_not_recompile_for_lr_or_shapes():
    # Warm the graph for fp32/fp32, then change lr every step and use new models of new shapes.
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = Lion([p], lr=1e-3, impl="compiled")
    p.grad = torch.randn(10, 3)
    opt.step()
    graphs = _unique_graphs()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(5):
        p.grad = torch.randn(10, 3)
        opt.step()
        sched.step()
    for n_tensors in (3, 17, 40):
        ps = [torch.nn.Parameter(torch.randn(2 + 13 * i % 97, 1 + i % 3)) for i in range(n_tensors)]
        opt = Lion([{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2]}], lr=1e-3, impl="compiled")
        for q in ps:
            q.grad = torch.randn_like(q)
        opt.step()
    assert _unique_graphs() == graphs, "the compiled step recompiled for an lr or shape change"


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


def _foreach_problem(nan_at: int | None):
    """fp32 params of mixed sizes, one non-contiguous, grads and momenta from a fixed seed."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen) for s in [(5,), (40, 13), (1,), (300,), (3, 2)]]
    base.append(torch.randn(9, 11, generator=gen).t())  # a non-contiguous param
    grads = [torch.randn(b.shape, generator=gen) for b in base]
    grads[-1] = torch.randn(9, 11, generator=gen).t()
    if nan_at is not None:
        grads[1].view(-1)[nan_at] = float("nan")
        grads[3][7] = float("inf")
    return base, grads


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("nan_at", [None, 250])
def test_foreach_cache_rounds_change_no_bit(monkeypatch, maximize, nan_at):
    """Rounds that cut tensors mid-way (37 elements) give bit for bit what one whole-list pass
    gives, including the skip_elements masks, which are decided round by round."""
    results = []
    for round_size in (1 << 30, 37):
        monkeypatch.setattr(lion_module, "FOREACH_CACHE_ROUND", round_size)
        base, grads = _foreach_problem(nan_at)
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = Lion(params, lr=1e-2, weight_decay=0.1, impl="foreach", maximize=maximize)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in params])
    for (p_whole, m_whole), (p_rounds, m_rounds), b in zip(*results, _foreach_problem(nan_at)[0]):
        assert torch.equal(p_whole, p_rounds) and torch.equal(m_whole, m_rounds)
        assert not torch.equal(p_rounds, b), "a param did not move"
    if nan_at is not None:
        base, _ = _foreach_problem(nan_at)
        assert results[1][1][0].view(-1)[nan_at] == base[1].view(-1)[nan_at], "a NaN-grad element moved"
        assert results[1][3][0][7] == base[3][7], "an inf-grad element moved"
        assert torch.isfinite(results[1][1][1]).all() and torch.isfinite(results[1][3][1]).all()


def test_foreach_cache_rounds_cover_each_element_once(monkeypatch):
    monkeypatch.setattr(lion_module, "FOREACH_CACHE_ROUND", 37)
    base, grads = _foreach_problem(None)
    moms = [torch.zeros_like(b) for b in base]
    rounds = lion_module._cache_rounds(base, grads, moms)
    sizes = [sum(t.numel() for t in r[0]) for r in rounds]
    assert sum(sizes) == sum(b.numel() for b in base)
    assert all(s >= 37 for s in sizes[:-1]) and max(sizes) < 2 * 37 + 99  # 99: the non-contiguous piece
    seen = {}
    for ps, gs, ms, cs in rounds:
        assert cs == [None] * len(ps)
        for p, g, m in zip(ps, gs, ms):
            assert p.shape == g.shape == m.shape
            seen.setdefault(p.untyped_storage().data_ptr(), []).append((p.storage_offset(), p.numel()))
    for b in base:  # each param's pieces tile it without overlap
        spans = sorted(seen[b.untyped_storage().data_ptr()])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == b.numel()
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in itertools.pairwise(spans))


@pytest.mark.parametrize("impl", ["foreach", "compiled"])
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.99)), "beta1"),
        (dict(betas=(0.9, -0.1)), "beta2"),
        (dict(betas=0.9), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(impl="cuda_magic"), "impl"),
        (dict(state_dtype="fp8"), "state_dtype"),
        (dict(nonfinite_grad="ignore"), "nonfinite_grad"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_params_and_grads():
    with pytest.raises(ValueError, match="complex"):
        Lion([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Lion([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="lr"):
        Lion([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -3.0}])
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Lion(emb.parameters(), impl="foreach")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(lion_module, "_triton_importable", lambda: True)
    monkeypatch.setattr(lion_module, "_triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        Lion([torch.nn.Parameter(torch.zeros(2))], impl="triton")
    monkeypatch.setattr(lion_module, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        Lion([torch.nn.Parameter(torch.zeros(2))], impl="triton")


def test_auto_picks_by_device_and_size(monkeypatch):
    # cpp whenever it can run on the CPU; compiled or foreach (by size) when it cannot.
    assert resolve_impl("auto", torch.device("cpu"), numel=1000) == "cpp"
    assert resolve_impl("auto", torch.device("cpu"), numel=50_000_000) == "cpp"
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        resolve_impl("cpp", torch.device("meta"))
    monkeypatch.setattr(cpu_kernel, "build_failure", RuntimeError("no g++"))
    with pytest.raises(RuntimeError, match=r"failed to build earlier in this process.*no g\+\+"):
        resolve_impl("cpp", torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu"), numel=1000) == "foreach"
    assert resolve_impl("auto", torch.device("cpu"), numel=50_000_000) == "compiled"
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert resolve_impl("auto", torch.device("cpu"), numel=50_000_000) == "foreach"
    with pytest.raises(RuntimeError, match="TORCHDYNAMO_DISABLE"):
        resolve_impl("compiled", torch.device("cpu"))
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    monkeypatch.setattr(compiled, "compile_failure", RuntimeError("no compiler"))
    assert resolve_impl("auto", torch.device("cpu"), numel=50_000_000) == "foreach"
    with pytest.raises(RuntimeError, match=r"failed earlier in this process.*no compiler"):
        resolve_impl("compiled", torch.device("cpu"))
    monkeypatch.setattr(lion_module, "_triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_impl("auto", torch.device("cuda"), numel=10) == "triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_impl("auto", torch.device("cuda"), numel=10) == "foreach"


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # how HF Trainer loads optimizer.pt


@pytest.mark.parametrize("src,dst", [("foreach", "compiled"), ("compiled", "for_loop"), ("for_loop", "foreach"),
                                     ("cpp", "foreach"), ("for_loop", "cpp")])
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
    saved = _roundtrip(opt_a.state_dict())
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
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg"], exact), "torch's default cast would round this through bf16"


def test_stochastic_rounding_is_unbiased():
    # 1 + 2**-9 lies a quarter of the way from bf16 1.0 to its neighbour 1 + 2**-7.
    x = torch.full((400_000,), 1.0 + 2**-9)
    rounded = _stochastic_round_to_bf16(x, 12345).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    std_of_mean = 2**-7 * math.sqrt(0.25 * 0.75 / x.numel())
    assert abs(float(rounded.mean()) - (1.0 + 2**-9)) < 5 * std_of_mean
    negative = _stochastic_round_to_bf16(-x, 999).float()
    assert abs(float(negative.mean()) + (1.0 + 2**-9)) < 5 * std_of_mean


@pytest.mark.parametrize("impl", ["foreach", "compiled"])
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
# State handling and robustness edges
# --------------------------------------------------------------------------------------


def _stepped_lion(**kwargs):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (4,)]]
    opt = Lion(params, lr=1e-2, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return params, opt


def test_load_state_dict_with_parameter_name_keys():
    # FSDP2's distributed checkpoint loading hands the optimizer a state keyed by names.
    params, opt = _stepped_lion()
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
    params, opt = _stepped_lion()  # fp32 momentum
    resumed = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_dtype="bf16")
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    assert resumed.param_groups[0]["state_dtype"] == "bf16"
    for p, q in zip(params, resumed.param_groups[0]["params"]):
        m = resumed.state[q]["exp_avg"]
        assert m.dtype == torch.bfloat16
        torch.testing.assert_close(m.float(), opt.state[p]["exp_avg"], rtol=2**-8, atol=0)


def test_deepcopy_and_pickle_keep_the_instance_settings():
    import copy
    import pickle

    _, opt = _stepped_lion(impl="foreach", nonfinite_grad="skip_step")
    opt.skipped_steps = 2
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.impl, clone.nonfinite_grad, clone.skipped_steps) == ("foreach", "skip_step", 2)
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()  # would raise AttributeError if the settings were lost


def test_add_param_group_validates_before_adding():
    _, opt = _stepped_lion()
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1, "a rejected group must not stay in the optimizer"
    opt.add_param_group({"params": extra, "lr": torch.tensor(0.5)})  # a 1-element tensor lr, like the top level
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["params"] == [extra]


def test_functional_lion_refuses_lists_of_different_lengths():
    p, g, m = torch.zeros(2), torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match="same length, got 2, 1 and 2"):
        lion_module.lion([p, p.clone()], [g], [m, m.clone()], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


def test_stochastic_rounding_keeps_every_nan_a_nan():
    payloads = torch.tensor([0x7F800001, 0x7FC00000, -1, 0x7F80FFFF], dtype=torch.int32)  # -1: all bits set
    x = payloads.view(torch.float32)
    assert torch.isnan(x).all()
    for seed in range(0, 1 << 16, 4099):
        assert torch.isnan(_stochastic_round_to_bf16(x, seed).float()).all()


def test_compile_failure_under_auto_updates_every_tensor_exactly_once(monkeypatch):
    # 20 tensors = two compiled chunks + one 1-element leftover; the second chunk fails to
    # compile. Before the fix the first chunk and the leftover were updated twice.
    calls = []

    def flaky_chunk(signature, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated inductor failure")
        compiled._lion_chunk(*args)

    monkeypatch.setattr(compiled, "_get_compiled_chunk", lambda: flaky_chunk)
    monkeypatch.setattr(lion_module, "AUTO_COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(compiled, "compile_failure", None)  # restored after the test
    monkeypatch.setattr(cpu_kernel, "build_failure", RuntimeError("no g++"))  # so that "auto" is compiled
    gen = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(n + 2, generator=gen)) for n in range(19)]
    params.append(torch.nn.Parameter(torch.randn(1, generator=gen)))
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in params]
    opt = Lion(params, lr=0.1, weight_decay=0.1, impl="auto")
    with pytest.warns(UserWarning, match="torch.compile failed"):
        opt.step()
    # The failure is handled inside the compiled impl and recorded: no later step compiles again,
    # and "auto" now resolves to foreach.
    assert isinstance(compiled.compile_failure, RuntimeError) and len(calls) == 2
    assert resolve_impl("auto", torch.device("cpu"), numel=10**9) == "foreach"
    for p, p0 in zip(params, before):
        ref_p, ref_m = lion_reference_step(p0, p.grad, torch.zeros_like(p0, dtype=torch.float64), lr=0.1,
                                           beta1=0.9, beta2=0.99, weight_decay=0.1)
        _assert_close_rel(p.detach(), ref_p, 1e-6, "param")
        _assert_close_rel(opt.state[p]["exp_avg"], ref_m, 1e-6, "exp_avg")


# --------------------------------------------------------------------------------------
# Low-precision weights: every step is kept (param_rounding)
# --------------------------------------------------------------------------------------

# triton runs under TRITON_INTERPRET=1 on CPU; cpp's kernel takes bf16 (stochastic or nearest), not fp16 or
# Kahan residuals, which it hands to foreach.
ALL_IMPLS = ["for_loop", "foreach", "compiled", "cpp", "triton"]


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
@pytest.mark.parametrize("impl", ["foreach", "compiled", "triton"])
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


TRAJECTORY_CASES = [("for_loop", 65536, 150), ("foreach", 65536, 150), ("compiled", 65536, 150), ("cpp", 65536, 150),
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


@pytest.mark.parametrize("attribute,value", [("nonfinite_grad", "skip_element"), ("impl", "fused")])
def test_an_option_changed_to_a_bad_value_after_init_is_a_value_error_at_the_step(attribute, value):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([p], lr=0.1, impl="foreach")
    setattr(opt, attribute, value)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=attribute):
        opt.step()
    opt.param_groups[0]["param_rounding"] = "Kahan"
    setattr(opt, attribute, {"nonfinite_grad": "skip_elements", "impl": "foreach"}[attribute])
    with pytest.raises(ValueError, match="param_rounding"):
        opt.step()
    torch.testing.assert_close(p.detach(), torch.zeros(3))


def test_a_kahan_residual_that_does_not_match_its_param_is_a_value_error():
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    opt = Lion([p], lr=0.1, impl="foreach", param_rounding="kahan")
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["kahan_comp"] = torch.zeros(12, dtype=torch.bfloat16)  # e.g. a checkpoint of another model
    with pytest.raises(ValueError, match="Kahan residual"):
        opt.step()
    torch.testing.assert_close(p.detach().float(), torch.full((4, 3), -0.1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("src,dst", [("foreach", "compiled"), ("compiled", "triton"), ("triton", "for_loop"),
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
    saved = _roundtrip(opt_a.state_dict())
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


@pytest.mark.parametrize("impl", ["foreach", "compiled", "cpp"])
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
    saved, rng, weights = _roundtrip(opt_a.state_dict()), torch.get_rng_state(), q.detach().clone()
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
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.param_groups[0]["param_rounding"] == "stochastic"
    opt2.step()
    assert "kahan_comp" not in opt2.state[p], "a residual nobody uses any more is freed"


def test_fp16_stochastic_rounding_is_unbiased_and_keeps_specials():
    from lion_hf.optim.lion import _stochastic_round_to_fp16

    # 1 + 2**-12 lies a quarter of the way from fp16 1.0 to its neighbour 1 + 2**-10.
    x = torch.full((400_000,), 1.0 + 2**-12)
    rounded = _stochastic_round_to_fp16(x, 321).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-10}
    std_of_mean = 2**-10 * math.sqrt(0.25 * 0.75 / x.numel())
    assert abs(float(rounded.mean()) - (1.0 + 2**-12)) < 5 * std_of_mean
    tiny = torch.full((100_000,), -(2.0**-26))  # a quarter of the smallest fp16 subnormal, negative
    assert abs(float(_stochastic_round_to_fp16(tiny, 7).float().mean()) + 2.0**-26) < 2.0**-28
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 65504.0])
    out = _stochastic_round_to_fp16(specials, 11).float()
    assert torch.isnan(out[0]) and torch.equal(out[1:], specials[1:])


def test_bad_param_rounding_is_a_value_error():
    with pytest.raises(ValueError, match="param_rounding"):
        Lion([torch.nn.Parameter(torch.zeros(2))], param_rounding="truncate")
    from lion_hf.optim.lion import lion

    p = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compensation tensor"):
        lion([p], [torch.ones(3, dtype=torch.bfloat16)], [torch.zeros(3)], lr=0.1, beta1=0.9, beta2=0.99,
             weight_decay=0.0, param_rounding="kahan", impl="foreach")


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
