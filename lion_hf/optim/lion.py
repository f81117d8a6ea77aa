"""Lion optimizer (Chen et al. 2023) with several interchangeable implementations.

The class :class:`Lion` owns validation and state; the functional :func:`lion` applies one
step to flat lists of tensors and dispatches on ``impl`` to one of

* ``_for_loop_lion``  - one tensor at a time, the readable reference;
* ``_foreach_lion``   - ``torch._foreach_*`` ops over lists of same-dtype tensors (on CPU in
  cache-sized rounds);
* ``_compiled_lion``  - a ``torch.compile``-d elementwise step over chunks of 16 flattened
  tensors (``lion_hf/optim/compiled.py``, imported only when used);
* ``_cpp_lion``       - one call of a C++ kernel (OpenMP, built with the system's g++ at first
  use) over all fp32 and bf16 CPU tensors of a step (``lion_hf/optim/cpu_kernel.py``; the rest
  of a step runs as ``auto`` would run it without this impl);
* ``_triton_lion``    - the fused multi-tensor Triton kernel (``lion_hf/optim/triton.py``,
  imported only when used).

All five run the same per-tensor arithmetic (``_lion_tensor``; foreach spells it in
``_foreach_*`` ops, the C++ and Triton kernels in registers) in fp32 whatever the storage dtype, and
store a bf16/fp16 result the same way (``param_rounding``: stochastic rounding by default,
Kahan-compensated, or round-to-nearest; a bf16 momentum is always rounded stochastically).
They share the state layout (``state[p]["exp_avg"]`` and, under Kahan, ``"kahan_comp"``), so a
checkpoint moves freely between them.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["IMPLS", "NONFINITE_POLICIES", "PARAM_ROUNDINGS", "STATE_DTYPES", "Lion", "lion", "resolve_impl"]

IMPLS = ("auto", "for_loop", "foreach", "compiled", "cpp", "triton")
NONFINITE_POLICIES = ("skip_elements", "skip_step", "raise", "propagate")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a bf16/fp16 param stores its new fp32 value (fp32 params are exact whatever is chosen).
# Lion moves every element by exactly lr, which is under half an ulp of a bf16 weight above
# about 2**8 * lr: round-to-nearest ("nearest") then drops the step. "stochastic" rounds up or
# down with probability given by the distance (unbiased, no memory); "kahan" keeps the rounding
# residual in a compensation tensor of the param's dtype (state "kahan_comp", +2 bytes/param).
PARAM_ROUNDINGS = ("stochastic", "kahan", "nearest")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Below this many parameter elements "auto" on CPU prefers foreach: the compiled path pays a
# one-off compile (17 s cold on 2 cores here, see README) that a tiny model never earns back.
AUTO_COMPILE_MIN_NUMEL = 1_000_000


# --------------------------------------------------------------------------------------
# Helpers shared by the implementations
# --------------------------------------------------------------------------------------


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor unchanged.

    Lion is elementwise, so each rank may update its shard on its own.
    """
    if type(t) in _PLAIN_TENSOR_TYPES:  # the common case, without a failing attribute lookup
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _random_bits16(n: int, seed: Tensor | int, device: torch.device) -> Tensor:
    """16 random bits per element for stochastic rounding: ``h((index + seed) mod 2**16)``.

    ``h`` is a bijection of 16-bit integers (xor-shifts and odd multipliers), so with ``seed``
    uniform on [0, 2**16) and fresh every step each element's bits are uniform and independent
    from one step to the next, which is what unbiased rounding of its momentum needs, and
    neighbouring elements get scrambled, not consecutive, values. Every product stays below
    2**31, so it is plain int32 arithmetic that torch.compile vectorises inside the update loop
    (inductor's RNG, or a 64-bit hash, made the bf16-state step 2-8x slower on CPU).
    """
    # int32 indices wrap past 2**31 elements; only their low 16 bits matter, so build those in int64.
    index = (
        torch.arange(n, device=device, dtype=torch.int32) if n < 2**31
        else (torch.arange(n, device=device) & 0xFFFF).to(torch.int32)
    )
    x = (index + seed) & 0xFFFF
    x = ((x ^ (x >> 8)) * 0x6D2B) & 0xFFFF
    x = ((x ^ (x >> 7)) * 0x5A35) & 0xFFFF
    return x ^ (x >> 8)


def _stochastic_round_to_bf16(x: Tensor, seed: Tensor | int) -> Tensor:
    """Round a contiguous fp32 tensor to bf16, up or down with probability given by the distance.

    Adds uniform random 16-bit noise to the low half of the fp32 bit pattern and truncates:
    the kept high half is exactly a bf16 value, and E[result] = x. Round-to-nearest would
    freeze a bf16 momentum whose per-step change (1 - beta2) * g is below half an ulp.
    """
    # int32 adds act on the raw bit pattern (the sign bit is never reached for finite x).
    noisy = (x.view(torch.int32) + _random_bits16(x.numel(), seed, x.device).view(x.shape)) & -65536
    # A NaN whose payload sits in the low 16 bits would become inf (or wrap to 0): keep it NaN.
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), noisy.view(torch.float32).to(torch.bfloat16))


def _stochastic_round_to_fp16(x: Tensor, seed: Tensor | int) -> Tensor:
    """Round a contiguous fp32 tensor to fp16 stochastically (unbiased to 2**-16 of an ulp).

    fp16 is not the top half of fp32's bits, so the two fp16 neighbours of ``x`` are found
    explicitly: its round-to-nearest value, and the next fp16 value past it towards ``x`` (one
    step of the 16-bit pattern, which is monotone in magnitude). The far neighbour is taken with
    probability distance / spacing. NaN, inf and exactly representable values are kept.
    """
    near = x.to(torch.float16)
    near32 = near.float()
    step = torch.where(x.abs() > near32.abs(), 1, -1).to(torch.int16)
    other32 = (near.view(torch.int16) + step).view(torch.float16).float()
    prob = (x - near32) / (other32 - near32)  # in [0, 1/2]; NaN when x is NaN/inf (keeps near)
    uniform = _random_bits16(x.numel(), seed, x.device).view(x.shape).float() * 2.0**-16
    return torch.where(uniform < prob, other32, near32).to(torch.float16)


def _round_to(x32: Tensor, dtype: torch.dtype, seed: Tensor | int | None) -> Tensor:
    """fp32 values as ``dtype``: exact for fp32, stochastic with ``seed``, else round-to-nearest."""
    if dtype == torch.float32:
        return x32
    if seed is None:
        return x32.to(dtype)
    x32 = x32.contiguous()
    if dtype == torch.bfloat16:
        return _stochastic_round_to_bf16(x32, seed)
    return _stochastic_round_to_fp16(x32, seed)


def _new_seed() -> int:
    """A fresh stochastic-rounding seed from torch's default generator (so manual_seed reproduces)."""
    return int(torch.randint(0, 1 << 16, (1,)))


def _param_stochastic(dtype: torch.dtype, param_rounding: str) -> bool:
    """Whether a param of ``dtype`` is stored by stochastic rounding (a bf16 momentum always is)."""
    return dtype != torch.float32 and param_rounding == "stochastic"


def _store_param(p: Tensor, new_w: Tensor, comp: Tensor | None, ok: Tensor | None, seed: Tensor | int | None) -> None:
    """Store the new fp32 weight ``new_w`` in ``p`` (rounded as ``seed`` says, see :func:`_round_to`)
    and, under Kahan summation, what the rounding dropped in ``comp``. Where ``ok`` is False the
    element keeps its stored bits (and residual) exactly: masking after rounding, not before."""
    new_p = _round_to(new_w, p.dtype, seed)
    if comp is not None:
        new_c = (new_w - new_p.float()).to(comp.dtype)
        comp.copy_(new_c if ok is None else torch.where(ok, new_c, comp))
    p.copy_(new_p if ok is None else torch.where(ok, new_p, p))


def _store_momentum(m: Tensor, new_m: Tensor, ok: Tensor | None, seed: Tensor | int | None) -> None:
    new = _round_to(new_m, m.dtype, seed)
    m.copy_(new if ok is None else torch.where(ok, new, m))


def _lion_tensor(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    comp: Tensor | None,
    lr: Any,
    decay: Any,
    beta1: Any,
    beta2: Any,
    p_seed: Tensor | int | None,
    m_seed: Tensor | int | None,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    """The one per-tensor Lion update, in place (for_loop runs it eagerly, compiled fuses it).

    Computes in fp32 whatever the storage. ``decay`` is ``1 - lr * weight_decay``. The weight
    being optimised is ``p + comp`` under Kahan summation (``comp`` holds what the last store
    of ``p`` rounded away), else ``p``. ``p_seed`` / ``m_seed`` choose stochastic rounding of
    the new param / momentum (None: round-to-nearest). Scalars may be floats or 0-d tensors.
    """
    g32 = g.float()
    if maximize:
        g32 = -g32
    m32 = m.float()
    p32 = p.float()
    w32 = p32 if comp is None else p32 + comp.float()
    update = torch.sign(m32 * beta1 + g32 * (1.0 - beta1))
    if cautious:
        update = _cautious_update(update, g32)
    new_w = w32 * decay - update * lr
    new_m = m32 * beta2 + g32 * (1.0 - beta2)
    ok = torch.isfinite(g32) if skip_nonfinite else None
    _store_param(p, new_w, comp, ok, p_seed)
    _store_momentum(m, new_m, ok, m_seed)


def _cautious_update(update: Tensor, grad: Tensor) -> Tensor:
    """Keep only update entries that agree in sign with the gradient, rescaled (Liang et al. 2024)."""
    agree = (update * grad > 0).to(update.dtype)
    fraction = agree.mean() if agree.numel() else agree.new_ones(())
    return update * agree / fraction.clamp(min=1e-3)


def _step_may_proceed(policy: str, grads: list[Tensor], grad_norm: float | Tensor | None = None) -> bool:
    """The 'skip_step' / 'raise' gate: False to skip the step; raises under 'raise'.

    ``grad_norm``, the global gradient norm when the caller has it (see ``Lion.set_grad_norm``),
    is the whole verdict: no gradient is read and every rank already holds the same value.
    Otherwise the gradients are read; with DTensor (FSDP2) gradients each rank holds only its
    shard, so the verdict is agreed over the mesh: every rank skips (or raises) together.
    """
    if policy not in ("skip_step", "raise"):
        return True
    if grad_norm is not None:
        finite = math.isfinite(float(grad_norm))
    else:
        finite = _all_finite([_local(g) for g in grads])
    mesh = None if grad_norm is not None else next((g.device_mesh for g in grads if hasattr(g, "device_mesh")), None)
    if mesh is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=_local(grads[0]).device)
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
        finite = bool(flag.item())
    if finite:
        return True
    if policy == "raise":
        what = "the gradient norm is" if grad_norm is not None else "a gradient contains"
        raise RuntimeError(f"Lion: {what} NaN or inf (nonfinite_grad='raise'); parameters were not updated")
    return False


def _any_nonfinite(grads: list[Tensor]) -> bool:
    """Whether some element of these same-device gradients is NaN or inf. A sum, or a sum of
    2-norms, is NaN or inf as soon as one element is; one that overflows only sends the list
    down the masked path, which masks element by element. One tensor (most CPU rounds) is
    summed: on CPU 1.4x faster than its 2-norm; several take one multi-tensor norm call."""
    total = grads[0].sum() if len(grads) == 1 else torch.stack(torch._foreach_norm(grads, 2)).sum()
    return not math.isfinite(float(total))


def _all_finite(grads: list[Tensor]) -> bool:
    """The 'skip_step' / 'raise' gate's one read of the gradients, on any devices."""
    if not grads:
        return True
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel():
            by_device[g.device].append(g)
    for device_grads in by_device.values():
        # The 2-norm is NaN or inf as soon as one element is, exactly the verdict of the norm that
        # gradient clipping computes (it also calls a gradient whose square overflows, |g| > ~1e19,
        # non-finite). On CPU torch's 2-norm is vectorised and threaded, the inf-norm is ~20x slower.
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(device_grads, 2))).all()):
            return False
    return True


# --------------------------------------------------------------------------------------
# Implementations: each updates params and exp_avgs in place
# --------------------------------------------------------------------------------------


def _for_loop_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
    param_rounding: str,
) -> None:
    for param, grad, exp_avg, comp in zip(params, grads, exp_avgs, kahan_comps):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        if p.numel() == 0:
            continue
        p_seed = _new_seed() if _param_stochastic(p.dtype, param_rounding) else None
        m_seed = _new_seed() if m.dtype == torch.bfloat16 else None
        _lion_tensor(p, g, m, None if comp is None else _local(comp), lr, decay, beta1, beta2, p_seed, m_seed,
                     maximize, cautious, skip_nonfinite)


# Elements per round of the CPU foreach path. Each foreach op streams its whole list through
# memory, so the five ops of a step over whole lists move 13 model-sized arrays. Over rounds of
# 1 MB of fp32 per list (p, g, m and the update: 4 MB, in the L3 cache of most CPUs) the ops of
# a round find their inputs in cache, and memory sees about 5 arrays: the MiniLM step is 2x
# faster (README benchmark). Measured here (32 MB L3): 128K-512K elements within 10%, 1M slower.
FOREACH_CACHE_ROUND = 1 << 18


def _cache_rounds(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor]) -> list[tuple[list, ...]]:
    """Split the lists of params, grads and fp32 momenta into rounds (params, grads, momenta,
    Kahan residuals: None) of about :data:`FOREACH_CACHE_ROUND` elements: a large tensor is cut
    into slices of its flat view, small ones share a round. A non-contiguous tensor (which has
    no flat view) is a piece of its own."""
    rounds: list[tuple[list, ...]] = []
    current: tuple[list, ...] = ([], [], [], [])
    filled = 0
    for p, g, m in zip(ps, gs, ms):
        if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
            flat = (p.view(-1), g.view(-1), m.view(-1))
            n = flat[0].numel()
            pieces = [tuple(t[i:i + FOREACH_CACHE_ROUND] for t in flat) for i in range(0, n, FOREACH_CACHE_ROUND)]
        else:
            pieces = [(p, g, m)]
        for piece in pieces:
            current[3].append(None)
            for lst, t in zip(current, piece):
                lst.append(t)
            filled += piece[0].numel()
            if filled >= FOREACH_CACHE_ROUND:
                rounds.append(current)
                current, filled = ([], [], [], []), 0
    if current[0]:
        rounds.append(current)
    return rounds


def _foreach_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
    param_rounding: str,
) -> None:
    """The arithmetic in ``torch._foreach_*`` ops per (device, dtypes) bucket; a low-precision
    param or momentum is then stored tensor by tensor with :func:`_round_to` (and its residual).
    On CPU an fp32 bucket runs in cache-sized rounds (:func:`_cache_rounds`): the same ops on
    the same elements, so the result is bit for bit the same. Cautious updates stay whole
    (their rescaling is a mean over each tensor), as do low-precision buckets (rounded per tensor)."""
    buckets: dict[tuple, list[list]] = defaultdict(lambda: [[], [], [], []])
    for param, grad, exp_avg, comp in zip(params, grads, exp_avgs, kahan_comps):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        if p.numel() == 0:
            continue
        bucket = buckets[(p.device, p.dtype, m.dtype, comp is not None)]
        for lst, t in zip(bucket, (p, g, m, None if comp is None else _local(comp))):
            lst.append(t)

    for (device, p_dtype, m_dtype, kahan), bucket in buckets.items():
        in_rounds = device.type == "cpu" and p_dtype == m_dtype == torch.float32 and not cautious
        for ps, gs, ms, cs in _cache_rounds(*bucket[:3]) if in_rounds else [bucket]:
            _foreach_round(ps, gs, ms, cs, lr=lr, decay=decay, beta1=beta1, beta2=beta2, maximize=maximize,
                           cautious=cautious, skip_nonfinite=skip_nonfinite, param_rounding=param_rounding,
                           kahan=kahan)


def _foreach_round(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    cs: list[Tensor | None],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
    param_rounding: str,
    kahan: bool,
) -> None:
    """One foreach step over lists of one device and dtype pair (a bucket, or a round of one)."""
    p_dtype, m_dtype = ps[0].dtype, ms[0].dtype
    fp32_params = p_dtype == torch.float32
    fp32_state = m_dtype == torch.float32
    g32 = gs if fp32_params and gs[0].dtype == torch.float32 else [g.float() for g in gs]
    if maximize:
        g32 = torch._foreach_neg(g32)
    # The weight being optimised: the param itself (fp32: updated in place), else an fp32
    # copy, plus the Kahan residual.
    w32 = ps if fp32_params else [p.float() for p in ps]
    if kahan:
        torch._foreach_add_(w32, [c.float() for c in cs])
    m32 = ms if fp32_state else [m.float() for m in ms]

    # beta * m + (1 - beta) * g as one lerp per list: 5 passes over memory in all, not 7.
    update = torch._foreach_lerp(m32, g32, 1.0 - beta1)
    torch._foreach_sign_(update)
    if cautious:
        update = [_cautious_update(u, g) for u, g in zip(update, g32)]

    # Masking needs out-of-place temporaries; one read of the grads decides whether the
    # common all-finite case can stay in place.
    masked = skip_nonfinite and _any_nonfinite(g32)
    if masked:
        new_w = torch._foreach_mul(w32, decay)
        torch._foreach_add_(new_w, update, alpha=-lr)
        new_m = torch._foreach_lerp(m32, g32, 1.0 - beta2)
        ok = [torch.isfinite(g) for g in g32]
    else:
        if decay != 1.0:  # the no-decay group (biases, norms) skips a pass
            torch._foreach_mul_(w32, decay)
        torch._foreach_add_(w32, update, alpha=-lr)
        torch._foreach_lerp_(m32, g32, 1.0 - beta2)
        new_w, new_m, ok = w32, m32, None

    if fp32_params:
        if masked:
            torch._foreach_copy_(ps, [torch.where(o, n, p) for o, n, p in zip(ok, new_w, ps)])
    else:
        stochastic = _param_stochastic(p_dtype, param_rounding)
        for i, (p, w) in enumerate(zip(ps, new_w)):
            _store_param(p, w, cs[i] if kahan else None, None if ok is None else ok[i],
                         _new_seed() if stochastic else None)
    if fp32_state:
        if masked:
            torch._foreach_copy_(ms, [torch.where(o, n, m) for o, n, m in zip(ok, new_m, ms)])
    else:
        for i, (m, n) in enumerate(zip(ms, new_m)):
            _store_momentum(m, n, None if ok is None else ok[i], _new_seed())


def _compiled_lion(*args: Any, **kwargs: Any) -> None:
    from lion_hf.optim.compiled import compiled_lion

    compiled_lion(*args, **kwargs)


def _cpp_lion(*args: Any, **kwargs: Any) -> None:
    from lion_hf.optim.cpu_kernel import cpp_lion

    cpp_lion(*args, **kwargs)


def _triton_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    decay: float,
    **kwargs: Any,
) -> None:
    from lion_hf.optim.triton import _triton_step

    local = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs)]
    comps = [None if c is None else _local(c) for c in kahan_comps]
    _triton_step(*local, comps, lr=lr, decay=decay, **kwargs)


_IMPL_FUNCTIONS: dict[str, Callable[..., None]] = {
    "for_loop": _for_loop_lion,
    "foreach": _foreach_lion,
    "compiled": _compiled_lion,
    "cpp": _cpp_lion,
    "triton": _triton_lion,
}


# --------------------------------------------------------------------------------------
# Functional API and impl resolution
# --------------------------------------------------------------------------------------


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    cautious: bool = False,
    nonfinite_grad: str = "skip_elements",
    param_rounding: str = "stochastic",
    impl: str = "foreach",
) -> bool:
    """Functional Lion step over lists of tensors, updated in place. See :class:`Lion`.

    ``kahan_comps`` (with ``param_rounding="kahan"``) holds one compensation tensor per bf16/fp16
    param, of the param's dtype and shape (None for fp32 params). ``impl`` must be a concrete
    implementation (not ``"auto"``; use :func:`resolve_impl`). Returns False when the step was
    skipped (``nonfinite_grad="skip_step"``), else True.
    """
    if impl not in _IMPL_FUNCTIONS:
        raise ValueError(f"impl must be one of {tuple(_IMPL_FUNCTIONS)} for lion(), got {impl!r}")
    _validate_options(impl, nonfinite_grad, param_rounding)
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(
            f"lion(): params, grads and exp_avgs must have the same length, got {len(params)}, {len(grads)} "
            f"and {len(exp_avgs)}"
        )
    if kahan_comps is None:
        kahan_comps = [None] * len(params)
    if len(kahan_comps) != len(params):
        raise ValueError(f"lion(): kahan_comps must have one entry per param, got {len(kahan_comps)} for {len(params)}")
    if param_rounding == "kahan":
        for i, (p, c) in enumerate(zip(params, kahan_comps)):
            if p.dtype != torch.float32:
                _check_kahan_comp(i, p, c)
    else:
        kahan_comps = [None] * len(params)
    if not _step_may_proceed(nonfinite_grad, grads):
        return False
    _lion_step(params, grads, exp_avgs, kahan_comps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
               maximize=maximize, cautious=cautious, skip_nonfinite=nonfinite_grad == "skip_elements",
               param_rounding=param_rounding, impl=impl)
    return True


def _check_kahan_comp(i: int, p: Tensor, c: Tensor | None) -> None:
    """The residual of bf16/fp16 param ``i`` under param_rounding='kahan' has its dtype and shape."""
    if c is None or c.dtype != p.dtype or c.shape != p.shape:
        raise ValueError(
            f"Lion: param_rounding='kahan' needs a compensation tensor (the Kahan residual) of the param's dtype "
            f"and shape for every bf16/fp16 param; param {i} ({p.dtype}, {tuple(p.shape)}) has "
            f"{None if c is None else (c.dtype, tuple(c.shape))}"
        )


def _lion_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
    param_rounding: str,
    impl: str,
) -> None:
    """The dispatch to ``impl``, on inputs already checked: by :func:`lion`, or by :class:`Lion`,
    which checks its options at every step and builds the lists itself."""
    _IMPL_FUNCTIONS[impl](
        params, grads, exp_avgs, kahan_comps, lr=float(lr), decay=1.0 - float(lr) * float(weight_decay),
        beta1=float(beta1), beta2=float(beta2), maximize=maximize, cautious=cautious, skip_nonfinite=skip_nonfinite,
        param_rounding=param_rounding)


def _recorded_failure(module: str, attribute: str) -> Exception | None:
    """A failure an impl's module recorded in this process (``compiled.compile_failure``,
    ``cpu_kernel.build_failure``); None when it was never imported, which is only once used."""
    import sys

    recorder = sys.modules.get(f"lion_hf.optim.{module}")
    return None if recorder is None else getattr(recorder, attribute)


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile and the cpp impl's build use: ``$CXX``, else g++, else c++
    (None if none is on the PATH)."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    # The mode is fixed when triton.language is first imported; before that, the environment decides it.
    import sys

    kernel = sys.modules.get("lion_hf.optim.triton")
    if kernel is not None:
        return kernel._INTERPRET
    return os.environ.get("TRITON_INTERPRET") == "1"


def impl_unavailable(impl: str, device: torch.device | str) -> str | None:
    """Why ``impl`` cannot run on ``device``, or None if it can: the one place that decides.

    ``compiled`` needs torch.compile with a C++ compiler (and dynamo not disabled) and no earlier
    compile failure in this process; ``cpp`` needs the CPU, a C++ compiler and no earlier build
    failure in this process; ``triton`` needs the triton package and a usable CUDA device,
    or a CPU with triton in interpreter mode (``TRITON_INTERPRET=1`` before triton's first import).
    """
    device = torch.device(device)
    if impl == "compiled":
        if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
            return "impl='compiled' needs torch.compile, and TORCHDYNAMO_DISABLE=1 is set"
        if cxx_compiler() is None:
            return "impl='compiled' needs torch.compile with a C++ compiler (g++) on the PATH"
        failure = _recorded_failure("compiled", "compile_failure")
        if failure is not None:
            return f"torch.compile failed earlier in this process ({type(failure).__name__}: {failure})"
        return None
    if impl == "cpp":
        if device.type != "cpu":
            return (f"impl='cpp' runs on the CPU; params are on {device.type!r}. Use impl='triton' or "
                    "'foreach' there.")
        if cxx_compiler() is None:
            return "impl='cpp' needs a C++ compiler (g++) on the PATH, or $CXX"
        failure = _recorded_failure("cpu_kernel", "build_failure")
        if failure is not None:
            return f"impl='cpp' failed to build earlier in this process ({type(failure).__name__}: {failure})"
        return None
    if impl == "triton":
        if not _triton_importable():
            return "impl='triton' needs the triton package: pip install triton"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "impl='triton': CUDA is not usable here"
        if device.type == "cpu" and _triton_interpreted():
            return None
        return (f"impl='triton' runs on CUDA devices (or on CPU under TRITON_INTERPRET=1); params are on "
                f"{device.type!r}. Use impl='compiled' or 'foreach' there.")
    return None  # for_loop and foreach run wherever torch does


def resolve_impl(impl: str, device: torch.device, numel: int = 0) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into the implementation that will run on ``device``.

    ``auto``: ``triton`` on CUDA when it can run there; on CPU ``cpp`` when it can run, else
    ``compiled`` if the job has at least ``AUTO_COMPILE_MIN_NUMEL`` elements and it can run;
    else ``foreach``. An explicit impl
    that cannot run on the device raises ``RuntimeError`` saying why (:func:`impl_unavailable`).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda" and impl_unavailable("triton", device) is None:
            return "triton"
        if device.type == "cpu" and impl_unavailable("cpp", device) is None:
            return "cpp"
        if device.type == "cpu" and numel >= AUTO_COMPILE_MIN_NUMEL and impl_unavailable("compiled", device) is None:
            return "compiled"
        return "foreach"
    reason = impl_unavailable(impl, device)
    if reason is not None:
        raise RuntimeError(reason)
    return impl


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


class Lion(Optimizer):
    r"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    For each parameter :math:`p` with gradient :math:`g` and momentum :math:`m` (zero at start):

    .. math::
        c &= \beta_1 m + (1 - \beta_1) g \\
        p &\leftarrow p\,(1 - \eta\lambda) - \eta\,\mathrm{sign}(c) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    with :math:`\mathrm{sign}(0) = 0`, learning rate :math:`\eta` and decoupled weight decay
    :math:`\lambda` (scaled by :math:`\eta`, as in AdamW). No epsilon, no bias correction. The
    update has unit magnitude per element, so Lion wants a 3-10x smaller lr and a 3-10x larger
    weight decay than AdamW (the product lr * wd sets the effective decay).

    Args:
        params: parameters or param groups (each group may set lr, betas, weight_decay,
            maximize, cautious, state_dtype, param_rounding).
        lr: learning rate (default 1e-4).
        betas: (beta1, beta2) in [0, 1): interpolation for the update, decay of the momentum
            (default (0.9, 0.99), the paper's).
        weight_decay: decoupled weight decay (default 0.0).
        maximize: maximise the objective instead of minimising.
        cautious: apply the update only where sign(update) agrees with the gradient, rescaled by
            1 / fraction agreeing (Liang et al. 2024, "Cautious Optimizers"); off by default.
            Under FSDP2 the fraction is taken per local shard.
        state_dtype: ``"fp32"`` (default) or ``"bf16"`` momentum. bf16 halves the optimizer state
            (2 instead of 4 bytes per parameter) and is stored with stochastic rounding, so the
            momentum stays unbiased even when one step's change is below half a bf16 ulp.
        param_rounding: how a bf16 or fp16 param stores its new value (fp32 params are exact):

            * ``"stochastic"`` (default): up or down with probability given by the distance, so
              E[stored] = exact value and no step is lost, at no extra memory. Lion moves each
              element by exactly ``lr``, which round-to-nearest drops whenever ``lr`` is under
              half an ulp (bf16 weights above about ``2**8 * lr``: 0.013 at lr 5e-5).
            * ``"kahan"``: Kahan-compensated summation: the residual that rounding drops is kept
              in ``state[p]["kahan_comp"]`` (the param's dtype, +2 bytes/param) and added back
              at the next step. Deterministic; costs the extra state and its traffic.
            * ``"nearest"``: plain round-to-nearest-even (what ``p.copy_(fp32)`` does); steps
              under half an ulp are lost. For comparison and bit-compatibility with other Lions.
        nonfinite_grad: what a NaN/inf gradient element does:

            * ``"skip_elements"`` (default): that element's parameter and momentum are left
              unchanged; the rest of the step proceeds. In ``compiled`` and ``triton`` it is
              fused into the update (a ``where`` in registers), in ``cpp`` each block of 16K
              elements checks its gradients while they are in cache: no extra pass over memory;
              ``foreach`` and ``for_loop`` add one read of the gradients.
            * ``"skip_step"``: if any gradient of the step is non-finite, nothing is updated and
              :attr:`skipped_steps` is incremented. Costs one extra read of the gradients and a
              host sync (plus one tiny all-reduce for DTensor/FSDP2 shards, so all ranks agree),
              unless the caller already has the global gradient norm: after
              :meth:`set_grad_norm` the verdict is that norm's finiteness, at no extra pass
              (``LionTrainer`` hands over the norm HF computes every step).
              Use it with gradient clipping: clipping by the global norm turns one bad element
              into NaN (or zero) gradients everywhere, which element-wise skipping cannot undo.
            * ``"raise"``: raise ``RuntimeError`` before anything is updated (same cost).
            * ``"propagate"``: no check: the NaN enters the momentum (and, depending on the kernel,
              the weight); that element stops learning. For benchmarking the check's cost only.
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"compiled"``, ``"cpp"`` or
            ``"triton"``. ``auto`` picks ``triton`` on CUDA when triton is installed. On CPU it
            picks ``cpp`` when a C++ compiler is found: one multi-tensor kernel call per step,
            built in about 2 s at first use and cached; the fastest CPU step, bit for bit
            ``for_loop``'s for fp32 and bf16 storage when it takes every tensor. What that kernel
            does not take (fp16 params, Kahan residuals) and every step without a compiler run as
            before: ``compiled``
            (torch.compile of the fused elementwise step; the first step pays a one-off compile of
            several seconds) for models of at least ``AUTO_COMPILE_MIN_NUMEL`` (1M) elements,
            ``foreach`` below that, where the compile would cost more than it saves. If building
            or compiling fails, the optimizer warns and continues with the next of these.

    All implementations compute in fp32 for fp32, bf16 and fp16 parameters, share one state
    layout (``state[p]["exp_avg"]``, a plain tensor) and so load each other's state dicts.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        cautious: bool = False,
        state_dtype: str = "fp32",
        param_rounding: str = "stochastic",
        nonfinite_grad: str = "skip_elements",
        impl: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
            lr = float(lr)
        _validate_hyperparameters(lr, betas, weight_decay, state_dtype)
        _validate_options(impl, nonfinite_grad, param_rounding)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, cautious=cautious,
            state_dtype=state_dtype, param_rounding=param_rounding,
        )
        # Kept out of param_groups on purpose: load_state_dict restores groups from the
        # checkpoint, and a state saved under one impl must run under the one asked for now.
        # Set before super().__init__, whose add_param_group calls check the impl per device.
        self.impl = impl
        self.nonfinite_grad = nonfinite_grad
        self.skipped_steps = 0
        self._grad_norm: float | Tensor | None = None
        self._resolved: dict[torch.device, str] = {}
        super().__init__(params, defaults)

    # Optimizer.__getstate__ keeps only defaults/state/param_groups: a deepcopy or a pickled
    # optimizer would lose these and fail at its next step.
    _INSTANCE_DEFAULTS: ClassVar[dict[str, Any]] = {
        "impl": "auto",
        "nonfinite_grad": "skip_elements",
        "skipped_steps": 0,
    }

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._INSTANCE_DEFAULTS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in self._INSTANCE_DEFAULTS.items():
            if not hasattr(self, name):
                setattr(self, name, default)
        self._resolved = {}
        self._grad_norm = None
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("cautious", False)
            group.setdefault("state_dtype", "fp32")
            group.setdefault("param_rounding", "stochastic")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validated before it is added: a rejected group never joins the optimizer."""
        param_group = dict(param_group)
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        lr = param_group.get("lr")
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
            param_group["lr"] = float(lr)
        merged = {**self.defaults, **param_group}
        _validate_hyperparameters(merged["lr"], merged["betas"], merged["weight_decay"], merged["state_dtype"])
        _validate_options(self.impl, self.nonfinite_grad, merged.get("param_rounding", "stochastic"))
        for p in param_group["params"]:
            _validate_param(p)
        if self.impl != "auto":
            # Fail now, not at the first step, when the impl cannot run on these params' device.
            for device in {p.device for p in param_group["params"]}:
                resolve_impl(self.impl, device)
        super().add_param_group(param_group)
        self._resolved.clear()  # "auto" counts parameters per device

    def _impl_for(self, device: torch.device) -> str:
        impl = self._resolved.get(device)
        if impl is None:
            numel = sum(p.numel() for g in self.param_groups for p in g["params"] if p.device == device)
            impl = resolve_impl(self.impl, device, numel)
            self._resolved[device] = impl
        return impl

    def _states_by_id(self) -> dict[int, dict[str, Any]]:
        """``self.state`` by the ids of its params, for :meth:`_collect`. The params' ``__hash__`` is a
        Python function (~0.4 us a call); one pass over the entries per step spares a call per param."""
        return {id(p): s for p, s in self.state.items()}

    def _collect(
        self, group: dict[str, Any], states_by_id: dict[int, dict[str, Any]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None]]:
        """The group's params with a gradient, their gradients, momenta and Kahan residuals (None
        where there is none); creates missing state. It runs every step, so it works list by
        list, each fact read once: on all-MiniLM-L6-v2's 105 tensors (2-core CPU) a loop with
        per-param branches and appends took about twice as long."""
        params = list(group["params"])
        grads = [p.grad for p in params]
        # Identity tests only: `None in grads` would call Tensor.__eq__(None) on every grad.
        if not all([g is not None for g in grads]):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if True in [g.is_sparse for g in grads]:
            raise RuntimeError("Lion does not support sparse gradients")
        states = [states_by_id.get(id(p)) for p in params]
        if not all([s is not None for s in states]):
            states = [self.state[p] if s is None else s for p, s in zip(params, states)]
        state_dtype = STATE_DTYPES[group["state_dtype"]]
        exp_avgs = [s.get("exp_avg") for s in states]
        if not all([m is not None for m in exp_avgs]) or {m.dtype for m in exp_avgs} != {state_dtype}:
            for i, (p, s) in enumerate(zip(params, states)):
                exp_avg = s.get("exp_avg")  # read again: a param listed twice shares its first entry's
                if exp_avg is None:
                    exp_avg = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                elif exp_avg.dtype != state_dtype:
                    exp_avg = exp_avg.to(state_dtype)
                s["exp_avg"] = exp_avgs[i] = exp_avg
        comps: list[Tensor | None] = [None] * len(params)
        if group["param_rounding"] == "kahan":
            for i, (p, s) in enumerate(zip(params, states)):
                if p.dtype != torch.float32:
                    comp = s.get("kahan_comp")
                    if comp is None:
                        comp = s["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    _check_kahan_comp(i, p, comp)  # a checkpoint of another model would not match
                    comps[i] = comp
                else:
                    s.pop("kahan_comp", None)
        elif True in ["kahan_comp" in s for s in states]:
            for s in states:
                s.pop("kahan_comp", None)  # rounding changed since the checkpoint: the residual (< 1 ulp) goes
        return params, grads, exp_avgs, comps

    def set_grad_norm(self, norm: float | Tensor) -> None:
        """The global norm of the gradients the next :meth:`step` will use, already computed by the
        caller (gradient clipping computes it). Under ``skip_step`` / ``raise`` that step then
        takes its verdict from the norm alone: it is finite exactly when every gradient is (a
        NaN or inf element makes it NaN or inf), so no gradient is read again. Every rank must
        pass the same global norm (HF's clipping all-reduces it). Used by one step, then cleared.
        """
        self._grad_norm = norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # The options may have been changed since __init__ checked them (they are plain
        # attributes and group entries), and the dispatch below does not go through lion().
        for group in self.param_groups:
            _validate_options(self.impl, self.nonfinite_grad, group["param_rounding"])
        states_by_id = self._states_by_id()
        work = [(group, *self._collect(group, states_by_id)) for group in self.param_groups]
        policy = self.nonfinite_grad
        grad_norm, self._grad_norm = self._grad_norm, None  # used by this step only
        if policy in ("skip_step", "raise"):
            # Checked across all groups first, so a skipped step leaves every group untouched.
            all_grads = [] if grad_norm is not None else [g for _, _, grads, _, _ in work for g in grads]
            if not _step_may_proceed(policy, all_grads, grad_norm):
                self.skipped_steps += 1
                return loss
            policy = "propagate"  # all finite: the masked path would change nothing
        skip_nonfinite = policy == "skip_elements"

        for group, params, grads, exp_avgs, comps in work:
            if not params:
                continue
            beta1, beta2 = group["betas"]
            tensors = (params, grads, exp_avgs, comps)
            devices = [p.device for p in params]
            if devices.count(devices[0]) == len(devices):  # the common case, without copying the lists
                split = [(devices[0], tensors)]
            else:
                by_device: dict[torch.device, list[int]] = defaultdict(list)
                for i, device in enumerate(devices):
                    by_device[device].append(i)
                split = [(device, tuple([ts[i] for i in idx] for ts in tensors)) for device, idx in by_device.items()]
            for device, device_tensors in split:
                _lion_step(
                    *device_tensors,
                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    maximize=group["maximize"], cautious=group["cautious"], skip_nonfinite=skip_nonfinite,
                    param_rounding=group["param_rounding"], impl=self._impl_for(device),
                )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps full precision and takes the ``state_dtype``
        this optimizer was built with (like ``impl``, the ``state_dtype`` and ``param_rounding``
        chosen now win over the checkpoint's; a Kahan residual is kept when both use "kahan").
        Keys may be indices or parameter names (FSDP2's distributed checkpoints)."""
        # torch casts every floating state tensor to its param's dtype; that would round an fp32
        # momentum of a bf16 param to bf16. Keep the saved tensors and restore them after.
        saved = {
            key: s["exp_avg"]
            for key, s in state_dict.get("state", {}).items()
            if isinstance(s, dict) and isinstance(s.get("exp_avg"), Tensor)
        }
        wanted = [(group["state_dtype"], group["param_rounding"]) for group in self.param_groups]
        super().load_state_dict(state_dict)  # checks that the groups match
        for group, (state_dtype, param_rounding) in zip(self.param_groups, wanted):
            group["state_dtype"] = state_dtype
            group["param_rounding"] = param_rounding
        # Saved keys map to current params by position in the groups, as in torch.
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        current = [(p, group) for group in self.param_groups for p in group["params"]]
        by_key = dict(zip(saved_keys, current))
        for key, exp_avg in saved.items():
            p, group = by_key[key]
            dtype = STATE_DTYPES[group["state_dtype"]]
            self.state[p]["exp_avg"] = exp_avg.to(device=p.device, dtype=dtype, copy=True)
        self._resolved.clear()


def _validate_hyperparameters(lr: Any, betas: Any, weight_decay: Any, state_dtype: Any) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {beta!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)}, got {state_dtype!r}")


def _validate_options(impl: Any, nonfinite_grad: Any, param_rounding: Any = "stochastic") -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if nonfinite_grad not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {nonfinite_grad!r}")
    if param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be one of {PARAM_ROUNDINGS}, got {param_rounding!r}")


def _validate_param(p: Tensor) -> None:
    if not isinstance(p, Tensor):
        raise ValueError(f"params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("Lion does not support complex parameters (sign() of a complex number is not defined here)")
    if p.dtype not in _PARAM_DTYPES:
        raise ValueError(f"Lion params must be float32, bfloat16 or float16, got {p.dtype}")
