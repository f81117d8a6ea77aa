"""Lion optimizer (Chen et al. 2023) with several interchangeable implementations.

The class :class:`Lion` owns validation and state; the functional :func:`lion` applies one
step to flat lists of tensors and dispatches on ``impl`` to one of

* ``_for_loop_lion``  - one tensor at a time, the readable reference;
* ``_foreach_lion``   - ``torch._foreach_*`` ops over lists of same-dtype tensors;
* ``_compiled_lion``  - a ``torch.compile``-d elementwise step over chunks of 16 flattened
  tensors (dynamic sizes: one graph for every model);
* ``_triton_lion``    - the fused multi-tensor Triton kernel (``lion_hf/optim/triton.py``,
  imported only when used).

Every implementation computes in fp32 whatever the storage dtype, and all of them share
the state layout (``state[p]["exp_avg"]``) so a checkpoint moves freely between them.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Lion", "lion", "IMPLS", "NONFINITE_POLICIES", "STATE_DTYPES", "resolve_impl"]

IMPLS = ("auto", "for_loop", "foreach", "compiled", "triton")
NONFINITE_POLICIES = ("skip_elements", "skip_step", "raise", "propagate")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Below this many parameter elements "auto" on CPU prefers foreach: the compiled path pays a
# one-off compile (17 s cold on 2 cores here, see README) that a tiny model never earns back.
AUTO_COMPILE_MIN_NUMEL = 1_000_000


# --------------------------------------------------------------------------------------
# Helpers shared by the implementations
# --------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor unchanged.

    Lion is elementwise, so each rank may update its shard on its own.
    """
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


def _new_seed() -> int:
    """A fresh stochastic-rounding seed from torch's default generator (so manual_seed reproduces)."""
    return int(torch.randint(0, 1 << 16, (1,)))


def _store_momentum(dst: Tensor, value32: Tensor) -> None:
    if dst.dtype == torch.bfloat16:
        dst.copy_(_stochastic_round_to_bf16(value32.contiguous(), _new_seed()))
    else:
        dst.copy_(value32)


def _cautious_update(update: Tensor, grad: Tensor) -> Tensor:
    """Keep only update entries that agree in sign with the gradient, rescaled (Liang et al. 2024)."""
    agree = (update * grad > 0).to(update.dtype)
    fraction = agree.mean() if agree.numel() else agree.new_ones(())
    return update * agree / fraction.clamp(min=1e-3)


def _step_may_proceed(policy: str, grads: list[Tensor]) -> bool:
    """The 'skip_step' / 'raise' gate: False to skip the step; raises under 'raise'.

    With DTensor (FSDP2) gradients each rank holds only its shard, so the verdict is agreed
    over the mesh: every rank skips (or raises) together, never some ranks alone.
    """
    if policy not in ("skip_step", "raise"):
        return True
    finite = _all_finite([_local(g) for g in grads])
    mesh = next((g.device_mesh for g in grads if hasattr(g, "device_mesh")), None)
    if mesh is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=_local(grads[0]).device)
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
        finite = bool(flag.item())
    if finite:
        return True
    if policy == "raise":
        raise RuntimeError("Lion: a gradient contains NaN or inf (nonfinite_grad='raise'); parameters were not updated")
    return False


def _all_finite(grads: list[Tensor]) -> bool:
    """One read of the gradients: by the 'skip_step' / 'raise' gate, and by foreach's
    'skip_elements' to keep the all-finite case in place."""
    if not grads:
        return True
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel():
            by_device[g.device].append(g)
    for device_grads in by_device.values():
        # inf-norm is inf or nan as soon as one element is; foreach keeps it to one kernel per chunk.
        norms = torch._foreach_norm(device_grads, float("inf"))
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
    return True


# --------------------------------------------------------------------------------------
# Implementations: each updates params and exp_avgs in place
# --------------------------------------------------------------------------------------


def _for_loop_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        if p.numel() == 0:
            continue
        g32 = g.float()
        if maximize:
            g32 = -g32
        m32 = m.float()
        p32 = p.float()
        update = torch.sign(m32 * beta1 + g32 * (1.0 - beta1))
        if cautious:
            update = _cautious_update(update, g32)
        new_p = p32 * (1.0 - lr * weight_decay) - update * lr
        new_m = m32 * beta2 + g32 * (1.0 - beta2)
        if skip_nonfinite:
            ok = torch.isfinite(g32)
            new_p = torch.where(ok, new_p, p32)
            new_m = torch.where(ok, new_m, m32)
        p.copy_(new_p)
        _store_momentum(m, new_m)


def _foreach_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    buckets: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[], [], []])
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        if p.numel() == 0:
            continue
        bucket = buckets[(p.device, p.dtype, m.dtype)]
        bucket[0].append(p)
        bucket[1].append(g)
        bucket[2].append(m)

    for (_, p_dtype, m_dtype), (ps, gs, ms) in buckets.items():
        fp32_params = p_dtype == torch.float32
        fp32_state = m_dtype == torch.float32
        g32 = gs if fp32_params and gs[0].dtype == torch.float32 else [g.float() for g in gs]
        if maximize:
            g32 = torch._foreach_neg(g32)
        p32 = ps if fp32_params else [p.float() for p in ps]
        m32 = ms if fp32_state else [m.float() for m in ms]

        update = torch._foreach_mul(m32, beta1)
        torch._foreach_add_(update, g32, alpha=1.0 - beta1)
        torch._foreach_sign_(update)
        if cautious:
            update = [_cautious_update(u, g) for u, g in zip(update, g32)]

        # Masking needs out-of-place temporaries; one read of the grads decides whether the
        # common all-finite case can stay in place.
        if skip_nonfinite and not _all_finite(g32):
            new_p = torch._foreach_mul(p32, 1.0 - lr * weight_decay)
            torch._foreach_add_(new_p, update, alpha=-lr)
            new_m = torch._foreach_mul(m32, beta2)
            torch._foreach_add_(new_m, g32, alpha=1.0 - beta2)
            ok = [torch.isfinite(g) for g in g32]
            torch._foreach_copy_(ps, [torch.where(o, n, old) for o, n, old in zip(ok, new_p, p32)])
            new_m = [torch.where(o, n, old) for o, n, old in zip(ok, new_m, m32)]
        else:
            torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
            torch._foreach_add_(p32, update, alpha=-lr)
            if not fp32_params:
                torch._foreach_copy_(ps, p32)
            torch._foreach_mul_(m32, beta2)
            torch._foreach_add_(m32, g32, alpha=1.0 - beta2)
            new_m = m32
        if fp32_state:
            if new_m is not ms:
                torch._foreach_copy_(ms, new_m)
        else:
            for m, n in zip(ms, new_m):
                _store_momentum(m, n)


def _lion_elementwise(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    hyper: Tensor,
    seed: Tensor | None,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    """One Lion step on 1-D tensors, written so that torch.compile fuses it into one loop.

    ``hyper`` = [lr, beta1, beta2, weight_decay] as an fp32 tensor, so a scheduler that
    changes lr every step changes data, not the compiled graph.
    """
    lr, beta1, beta2, wd = hyper[0], hyper[1], hyper[2], hyper[3]
    g32 = g.float()
    if maximize:
        g32 = -g32
    m32 = m.float()
    p32 = p.float()
    update = torch.sign(m32 * beta1 + g32 * (1.0 - beta1))
    if cautious:
        update = _cautious_update(update, g32)
    new_p = p32 * (1.0 - lr * wd) - update * lr
    new_m = m32 * beta2 + g32 * (1.0 - beta2)
    if skip_nonfinite:
        ok = torch.isfinite(g32)
        new_p = torch.where(ok, new_p, p32)
        new_m = torch.where(ok, new_m, m32)
    p.copy_(new_p)
    if seed is not None:
        m.copy_(_stochastic_round_to_bf16(new_m, seed))
    else:
        m.copy_(new_m)


# Tensors per compiled call. One call costs ~20 us of dynamo/inductor dispatch on CPU, so one
# call per tensor adds ~2 ms to a 105-tensor model; one call per whole list would compile a
# graph per model (20+ s). Fixed-size chunks of flattened tensors with dynamic sizes compile a
# single graph for every model (the last chunk is padded with 2-element dummies).
COMPILE_CHUNK = 16


def _lion_chunk(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    hyper: Tensor,
    seeds: Tensor | None,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    for i in range(len(ps)):
        seed = seeds[i] if seeds is not None else None
        _lion_elementwise(ps[i], gs[i], ms[i], hyper, seed, maximize, cautious, skip_nonfinite)


_compiled_chunk: Callable[..., None] | None = None
_padding: dict[tuple, tuple[list[Tensor], ...]] = {}


def _get_compiled_chunk() -> Callable[..., None]:
    global _compiled_chunk
    if _compiled_chunk is None:
        # Inductor decides whether a CPU loop runs on all threads from the size hint of the
        # first call: compiled on small tensors, the one shared graph would stay single-threaded
        # for every model. min_chunk_size=1 makes every loop an OpenMP parallel loop.
        _compiled_chunk = torch.compile(
            _lion_chunk, dynamic=True, fullgraph=True, options={"cpp.min_chunk_size": 1}
        )
    return _compiled_chunk


def _flat(t: Tensor) -> Tensor:
    # detach() drops the view's link to its base: dynamo would otherwise guard on the base's
    # rank and recompile whenever a chunk mixes matrices and vectors differently.
    return t.view(-1).detach()


def _compiled_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
    fallback: Callable[[list[Tensor], list[Tensor], list[Tensor], Exception], None] | None = None,
) -> None:
    """The compiled step. ``fallback(ps, gs, ms, exc)``, if given, receives every tensor not yet
    updated when a chunk fails to compile or run, so nothing is ever updated twice."""
    import torch.fx.experimental._config as fx_config

    step = _get_compiled_chunk()
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                  cautious=cautious, skip_nonfinite=skip_nonfinite)
    buckets: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[], [], []])
    leftovers: list[list[Tensor]] = [[], [], []]
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        n = p.numel()
        if n == 0:
            continue
        if n == 1 or not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()):
            # Size 1 would be its own specialised graph; strided tensors cannot be flattened in place.
            target = leftovers
        else:
            target = buckets[(p.device, p.dtype, g.dtype, m.dtype)]
            p, g, m = _flat(p), _flat(g), _flat(m)
        target[0].append(p)
        target[1].append(g)
        target[2].append(m)

    chunks = [
        (key, ps[i:i + COMPILE_CHUNK], gs[i:i + COMPILE_CHUNK], ms[i:i + COMPILE_CHUNK])
        for key, (ps, gs, ms) in buckets.items()
        for i in range(0, len(ps), COMPILE_CHUNK)
    ]
    hyper_by_device: dict[torch.device, Tensor] = {}
    failure: tuple[int, Exception] | None = None
    # Sizes of equal value must not be unified into one symbol (duck shaping), or the graph
    # would be specialised to one chunk's pattern of equal sizes.
    with fx_config.patch(use_duck_shape=False):
        for n_done, (key, ps, gs, ms) in enumerate(chunks):
            device, _, _, m_dtype = key
            hyper = hyper_by_device.get(device)
            if hyper is None:
                hyper = torch.tensor([lr, beta1, beta2, weight_decay], dtype=torch.float32).to(device, non_blocking=True)
                hyper_by_device[device] = hyper
            if len(ps) < COMPILE_CHUNK:
                # Distinct dummies: a tensor passed twice would make dynamo guard on the aliasing
                # and compile one graph per amount of padding.
                pad = _padding.get(key)
                if pad is None:
                    pad = tuple([torch.zeros(2, dtype=dt, device=device) for _ in range(COMPILE_CHUNK)] for dt in key[1:])
                    _padding[key] = pad
                missing = COMPILE_CHUNK - len(ps)
                ps, gs, ms = ps + pad[0][:missing], gs + pad[1][:missing], ms + pad[2][:missing]
            seeds = (
                torch.randint(0, 1 << 16, (COMPILE_CHUNK,), dtype=torch.int32).to(device, non_blocking=True)
                if m_dtype == torch.bfloat16 else None
            )
            try:
                step(ps, gs, ms, hyper, seeds, maximize, cautious, skip_nonfinite)
            except Exception as exc:
                if fallback is None:
                    raise
                failure = (n_done, exc)
                break
    if failure is not None:
        # Compilation fails before the graph runs, so that chunk and the rest are untouched.
        rest = [c[1:] for c in chunks[failure[0]:]] + [leftovers]
        fallback(*([t for part in rest for t in part[i]] for i in range(3)), failure[1])
        return
    if leftovers[0]:
        _for_loop_lion(*leftovers, **kwargs)


def _triton_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    **kwargs: Any,
) -> None:
    from lion_hf.optim.triton import triton_lion_

    triton_lion_(
        [_local(p) for p in params], [_local(g) for g in grads], [_local(m) for m in exp_avgs], **kwargs
    )


_IMPL_FUNCTIONS: dict[str, Callable[..., None]] = {
    "for_loop": _for_loop_lion,
    "foreach": _foreach_lion,
    "compiled": _compiled_lion,
    "triton": _triton_lion,
}


# --------------------------------------------------------------------------------------
# Functional API and impl resolution
# --------------------------------------------------------------------------------------


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    cautious: bool = False,
    nonfinite_grad: str = "skip_elements",
    impl: str = "foreach",
) -> bool:
    """Functional Lion step over lists of tensors, updated in place. See :class:`Lion`.

    ``impl`` must be a concrete implementation (not ``"auto"``; use :func:`resolve_impl`).
    Returns False when the step was skipped (``nonfinite_grad="skip_step"``), else True.
    """
    if impl not in _IMPL_FUNCTIONS:
        raise ValueError(f"impl must be one of {tuple(_IMPL_FUNCTIONS)} for lion(), got {impl!r}")
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(
            f"lion(): params, grads and exp_avgs must have the same length, got {len(params)}, {len(grads)} "
            f"and {len(exp_avgs)}"
        )
    if nonfinite_grad not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {nonfinite_grad!r}")
    if not _step_may_proceed(nonfinite_grad, grads):
        return False
    _IMPL_FUNCTIONS[impl](
        params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        maximize=maximize, cautious=cautious, skip_nonfinite=nonfinite_grad == "skip_elements",
    )
    return True


def _compile_available() -> bool:
    """torch.compile on CPU needs inductor's C++ toolchain; respect users who disabled dynamo."""
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return False
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def resolve_impl(impl: str, device: torch.device, numel: int = 0) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into the implementation that will run on ``device``.

    ``auto``: ``triton`` on CUDA when triton is importable; on CPU ``compiled`` if the job has
    at least ``AUTO_COMPILE_MIN_NUMEL`` elements and a C++ compiler is present; else ``foreach``.
    An explicit impl that cannot run on the device raises ``RuntimeError``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda" and _triton_importable():
            return "triton"
        if device.type == "cpu" and numel >= AUTO_COMPILE_MIN_NUMEL and _compile_available():
            return "compiled"
        return "foreach"
    if impl == "triton":
        if not _triton_importable():
            raise RuntimeError("impl='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"impl='triton' runs on CUDA devices (or on CPU under TRITON_INTERPRET=1); params are on "
                f"{device.type!r}. Use impl='compiled' or 'foreach' there."
            )
    if impl == "compiled" and not _compile_available():
        raise RuntimeError("impl='compiled' needs torch.compile with a C++ compiler (g++) on the PATH")
    return impl


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


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
            maximize, cautious, state_dtype).
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
        nonfinite_grad: what a NaN/inf gradient element does:

            * ``"skip_elements"`` (default): that element's parameter and momentum are left
              unchanged; the rest of the step proceeds. In ``compiled`` and ``triton`` it is
              fused into the update (a ``where`` in registers): no extra pass over memory;
              ``foreach`` and ``for_loop`` add one read of the gradients.
            * ``"skip_step"``: if any gradient of the step is non-finite, nothing is updated and
              :attr:`skipped_steps` is incremented. Costs one extra read of the gradients and a
              host sync (plus one tiny all-reduce for DTensor/FSDP2 shards, so all ranks agree).
              Use it with gradient clipping: clipping by the global norm turns one bad element
              into NaN (or zero) gradients everywhere, which element-wise skipping cannot undo.
            * ``"raise"``: raise ``RuntimeError`` before anything is updated (same cost).
            * ``"propagate"``: no check: the NaN enters the momentum (and, depending on the kernel,
              the weight); that element stops learning. For benchmarking the check's cost only.
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"compiled"`` or ``"triton"``.
            ``auto`` picks ``triton`` on CUDA when triton is installed; on CPU it picks
            ``compiled`` (torch.compile of the fused elementwise step: fastest per step, but the
            first step pays a one-off compile of several seconds) for models of at least
            ``AUTO_COMPILE_MIN_NUMEL`` (1M) elements, and ``foreach`` below that, where the compile
            would cost more than it saves. If compiling fails under ``auto`` the optimizer warns
            and continues with ``foreach``.

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
        nonfinite_grad: str = "skip_elements",
        impl: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
            lr = float(lr)
        _validate_hyperparameters(lr, betas, weight_decay, state_dtype)
        _validate_options(impl, nonfinite_grad)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, cautious=cautious,
            state_dtype=state_dtype,
        )
        # Kept out of param_groups on purpose: load_state_dict restores groups from the
        # checkpoint, and a state saved under one impl must run under the one asked for now.
        # Set before super().__init__, whose add_param_group calls check the impl per device.
        self.impl = impl
        self.nonfinite_grad = nonfinite_grad
        self.skipped_steps = 0
        self._resolved: dict[torch.device, str] = {}
        super().__init__(params, defaults)

    # Optimizer.__getstate__ keeps only defaults/state/param_groups: a deepcopy or a pickled
    # optimizer would lose these and fail at its next step.
    _INSTANCE_DEFAULTS = {"impl": "auto", "nonfinite_grad": "skip_elements", "skipped_steps": 0}

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
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("cautious", False)
            group.setdefault("state_dtype", "fp32")

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

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params, grads, exp_avgs = [], [], []
        state_dtype = STATE_DTYPES[group["state_dtype"]]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lion does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            elif state["exp_avg"].dtype != state_dtype:
                state["exp_avg"] = state["exp_avg"].to(state_dtype)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
        return params, grads, exp_avgs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = [(group, *self._collect(group)) for group in self.param_groups]
        policy = self.nonfinite_grad
        if policy in ("skip_step", "raise"):
            # Checked across all groups first, so a skipped step leaves every group untouched.
            if not _step_may_proceed(policy, [g for _, _, grads, _ in work for g in grads]):
                self.skipped_steps += 1
                return loss
            policy = "propagate"  # all finite: the masked path would change nothing

        for group, params, grads, exp_avgs in work:
            if not params:
                continue
            beta1, beta2 = group["betas"]
            by_device: dict[torch.device, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_device[p.device].append(i)
            for device, idx in by_device.items():
                self._run(
                    device,
                    [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    maximize=group["maximize"], cautious=group["cautious"], nonfinite_grad=policy,
                )
        return loss

    def _run(self, device: torch.device, *tensors: list[Tensor], **kwargs: Any) -> None:
        impl = self._impl_for(device)
        if impl == "compiled" and self.impl == "auto":
            # step() has already applied skip_step / raise: only the element mask is left.
            policy = kwargs.pop("nonfinite_grad")
            kwargs["skip_nonfinite"] = policy == "skip_elements"

            def degrade(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], exc: Exception) -> None:
                # Compiler missing or broken: finish this step and run later ones with foreach.
                warnings.warn(f"Lion: torch.compile failed ({type(exc).__name__}: {exc}); using impl='foreach'")
                self._resolved[device] = "foreach"
                _foreach_lion(ps, gs, ms, **kwargs)

            _compiled_lion(*tensors, fallback=degrade, **kwargs)
            return
        lion(*tensors, impl=impl, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the momentum keeps full precision and takes the ``state_dtype``
        this optimizer was built with (like ``impl``, the choice made now wins over the
        checkpoint's). Keys may be indices or parameter names (FSDP2's distributed checkpoints)."""
        # torch casts every floating state tensor to its param's dtype; that would round an fp32
        # momentum of a bf16 param to bf16. Keep the saved tensors and restore them after.
        saved = {
            key: s["exp_avg"]
            for key, s in state_dict.get("state", {}).items()
            if isinstance(s, dict) and isinstance(s.get("exp_avg"), Tensor)
        }
        wanted_state_dtypes = [group["state_dtype"] for group in self.param_groups]
        super().load_state_dict(state_dict)  # checks that the groups match
        for group, state_dtype in zip(self.param_groups, wanted_state_dtypes):
            group["state_dtype"] = state_dtype
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


def _validate_options(impl: Any, nonfinite_grad: Any) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if nonfinite_grad not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {nonfinite_grad!r}")


def _validate_param(p: Tensor) -> None:
    if not isinstance(p, Tensor):
        raise ValueError(f"params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("Lion does not support complex parameters (sign() of a complex number is not defined here)")
    if p.dtype not in _PARAM_DTYPES:
        raise ValueError(f"Lion params must be float32, bfloat16 or float16, got {p.dtype}")
