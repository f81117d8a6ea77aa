"""The numerics every Lion impl shares: the per-tensor update, rounding to bf16/fp16, the hash
behind stochastic rounding, and the non-finite gate.

This is the bottom of ``lion_hf.optim``: it imports torch alone. The impls above it
(``for_loop``, ``foreach``, ``cpu_kernel``, ``triton_kernel``) import only this module, and
``lion.py`` (the class and the functional ``lion()``) sits on top of them through ``dispatch``.
The C++ and Triton kernels spell the same arithmetic in their own languages; their tests hold
them to :func:`lion_tensor`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NONFINITE_POLICIES",
    "PARAM_DTYPES",
    "PARAM_ROUNDINGS",
    "STATE_DTYPES",
    "all_finite",
    "any_nonfinite",
    "cautious_update",
    "draw_seeds",
    "lion_tensor",
    "local",
    "param_stochastic",
    "random_bits16",
    "round_to",
    "step_may_proceed",
    "stochastic_round_to_bf16",
    "stochastic_round_to_fp16",
    "store_momentum",
    "store_param",
]

NONFINITE_POLICIES = ("skip_elements", "skip_step", "raise", "propagate")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a bf16/fp16 param stores its new fp32 value (fp32 params are exact whatever is chosen).
# Lion moves every element by exactly lr, which is under half an ulp of a bf16 weight above
# about 2**8 * lr: round-to-nearest ("nearest") then drops the step. "stochastic" rounds up or
# down with probability given by the distance (unbiased, no memory); "kahan" keeps the rounding
# residual in a compensation tensor of the param's dtype (state "kahan_comp", +2 bytes/param).
PARAM_ROUNDINGS = ("stochastic", "kahan", "nearest")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor unchanged.

    Lion is elementwise, so each rank may update its shard on its own.
    """
    if type(t) in _PLAIN_TENSOR_TYPES:  # the common case, without a failing attribute lookup
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


# --------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------


def random_bits16(n: int, seed: Tensor | int, device: torch.device) -> Tensor:
    """16 random bits per element for stochastic rounding: ``h((index + seed) mod 2**16)``.

    ``h`` is a bijection of 16-bit integers (xor-shifts and odd multipliers), so with ``seed``
    uniform on [0, 2**16) and fresh every step each element's bits are uniform and independent
    from one step to the next, which is what unbiased rounding needs, and neighbouring elements
    get scrambled, not consecutive, values. Every product stays below 2**31: plain int32
    arithmetic that a C++ compiler vectorises and Triton keeps in registers.
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


def stochastic_round_to_bf16(x: Tensor, seed: Tensor | int) -> Tensor:
    """Round a contiguous fp32 tensor to bf16, up or down with probability given by the distance.

    Adds uniform random 16-bit noise to the low half of the fp32 bit pattern and truncates:
    the kept high half is exactly a bf16 value, and E[result] = x. Round-to-nearest would
    freeze a bf16 momentum whose per-step change (1 - beta2) * g is below half an ulp.
    """
    # int32 adds act on the raw bit pattern (the sign bit is never reached for finite x).
    noisy = (x.view(torch.int32) + random_bits16(x.numel(), seed, x.device).view(x.shape)) & -65536
    # A NaN whose payload sits in the low 16 bits would become inf (or wrap to 0): keep it NaN.
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), noisy.view(torch.float32).to(torch.bfloat16))


def stochastic_round_to_fp16(x: Tensor, seed: Tensor | int) -> Tensor:
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
    uniform = random_bits16(x.numel(), seed, x.device).view(x.shape).float() * 2.0**-16
    return torch.where(uniform < prob, other32, near32).to(torch.float16)


def round_to(x32: Tensor, dtype: torch.dtype, seed: Tensor | int | None) -> Tensor:
    """fp32 values as ``dtype``: exact for fp32, stochastic with ``seed``, else round-to-nearest."""
    if dtype == torch.float32:
        return x32
    if seed is None:
        return x32.to(dtype)
    x32 = x32.contiguous()
    if dtype == torch.bfloat16:
        return stochastic_round_to_bf16(x32, seed)
    return stochastic_round_to_fp16(x32, seed)


def draw_seeds(params: list[Tensor], exp_avgs: list[Tensor], param_rounding: str) -> Tensor | None:
    """Stochastic-rounding seeds for one step: an int32 CPU tensor of shape [n, 2], the param's and
    the momentum's seed per tensor (0 where that store is not stochastic), or None when no store
    of the step is. Drawn from torch's CPU generator (so ``manual_seed`` reproduces a run and
    HF's checkpointed RNG state resumes it) in one call, in the order one tensor after the other
    would draw them: a non-empty tensor's param seed, then its momentum seed. Every impl rounds
    with these, so a step split between impls rounds as one impl would."""
    needed = [
        (bool(p.numel()) and param_stochastic(p.dtype, param_rounding), bool(p.numel()) and m.dtype == torch.bfloat16)
        for p, m in zip(params, exp_avgs)
    ]
    count = sum(a + b for a, b in needed)
    if not count:
        return None
    drawn = torch.randint(0, 1 << 16, (count,), device="cpu", dtype=torch.int32)
    mask = torch.tensor(needed, dtype=torch.bool).view(-1, 2)
    seeds = torch.zeros(mask.shape, dtype=torch.int32)
    seeds[mask] = drawn  # row-major: each tensor's param seed before its momentum seed
    return seeds


def param_stochastic(dtype: torch.dtype, param_rounding: str) -> bool:
    """Whether a param of ``dtype`` is stored by stochastic rounding (a bf16 momentum always is)."""
    return dtype != torch.float32 and param_rounding == "stochastic"


# --------------------------------------------------------------------------------------
# The per-tensor update
# --------------------------------------------------------------------------------------


def store_param(p: Tensor, new_w: Tensor, comp: Tensor | None, ok: Tensor | None, seed: Tensor | int | None) -> None:
    """Store the new fp32 weight ``new_w`` in ``p`` (rounded as ``seed`` says, see :func:`round_to`)
    and, under Kahan summation, what the rounding dropped in ``comp``. Where ``ok`` is False the
    element keeps its stored bits (and residual) exactly: masking after rounding, not before."""
    new_p = round_to(new_w, p.dtype, seed)
    if comp is not None:
        new_c = (new_w - new_p.float()).to(comp.dtype)
        comp.copy_(new_c if ok is None else torch.where(ok, new_c, comp))
    p.copy_(new_p if ok is None else torch.where(ok, new_p, p))


def store_momentum(m: Tensor, new_m: Tensor, ok: Tensor | None, seed: Tensor | int | None) -> None:
    new = round_to(new_m, m.dtype, seed)
    m.copy_(new if ok is None else torch.where(ok, new, m))


def cautious_update(update: Tensor, grad: Tensor) -> Tensor:
    """Keep only update entries that agree in sign with the gradient, rescaled (Liang et al. 2024)."""
    agree = (update * grad > 0).to(update.dtype)
    fraction = agree.mean() if agree.numel() else agree.new_ones(())
    return update * agree / fraction.clamp(min=1e-3)


def lion_tensor(
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
    """The one per-tensor Lion update, in place: the definition every impl is held to.

    Computes in fp32 whatever the storage. ``decay`` is ``1 - lr * weight_decay``. The weight
    being optimised is ``p + comp`` under Kahan summation (``comp`` holds what the last store
    of ``p`` rounded away), else ``p``. ``p_seed`` / ``m_seed`` choose stochastic rounding of
    the new param / momentum (None: round-to-nearest). Scalars may be floats or 0-d tensors.
    Each product and sum is its own rounded fp32 operation, in this order; the C++ kernel is
    built without FMA contraction so that it rounds alike.
    """
    g32 = g.float()
    if maximize:
        g32 = -g32
    m32 = m.float()
    p32 = p.float()
    w32 = p32 if comp is None else p32 + comp.float()
    update = torch.sign(m32 * beta1 + g32 * (1.0 - beta1))
    if cautious:
        update = cautious_update(update, g32)
    new_w = w32 * decay - update * lr
    new_m = m32 * beta2 + g32 * (1.0 - beta2)
    ok = torch.isfinite(g32) if skip_nonfinite else None
    store_param(p, new_w, comp, ok, p_seed)
    store_momentum(m, new_m, ok, m_seed)


# --------------------------------------------------------------------------------------
# The non-finite gate of "skip_step" and "raise"
# --------------------------------------------------------------------------------------


def step_may_proceed(policy: str, grads: list[Tensor], grad_norm: float | Tensor | None = None) -> bool:
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
        finite = all_finite([local(g) for g in grads])
    mesh = None if grad_norm is not None else next((g.device_mesh for g in grads if hasattr(g, "device_mesh")), None)
    if mesh is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=local(grads[0]).device)
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
        finite = bool(flag.item())
    if finite:
        return True
    if policy == "raise":
        what = "the gradient norm is" if grad_norm is not None else "a gradient contains"
        raise RuntimeError(f"Lion: {what} NaN or inf (nonfinite_grad='raise'); parameters were not updated")
    return False


def any_nonfinite(grads: list[Tensor]) -> bool:
    """Whether some element of these same-device gradients is NaN or inf. A sum, or a sum of
    2-norms, is NaN or inf as soon as one element is; one that overflows only sends the list
    down the masked path, which masks element by element. One tensor is summed (cheaper than
    its norm); several take one multi-tensor norm call."""
    total = grads[0].sum() if len(grads) == 1 else torch.stack(torch._foreach_norm(grads, 2)).sum()
    return not math.isfinite(float(total))


def all_finite(grads: list[Tensor]) -> bool:
    """The 'skip_step' / 'raise' gate's one read of the gradients, on any devices."""
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel():
            by_device[g.device].append(g)
    for device_grads in by_device.values():
        # The 2-norm is NaN or inf as soon as one element is, exactly the verdict of the norm that
        # gradient clipping computes (it also calls a gradient whose square overflows, |g| > ~1e19,
        # non-finite). torch's 2-norm is vectorised and threaded on CPU, unlike its inf-norm.
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(device_grads, 2))).all()):
            return False
    return True
