"""The ``compiled`` impl of Lion: ``torch.compile`` of the elementwise step, on chunks of tensors.

One graph serves every model: it takes COMPILE_CHUNK flattened tensors per call (with dynamic
sizes; the last chunk of a bucket is padded with 2-element dummies), and runs ``_lion_tensor``,
the arithmetic every impl shares, fused into one kernel per call. After its first call a graph
is called without dynamo (``compiled_call.DirectCompiled``), and how a list of tensors splits
into chunks is kept from step to step (:class:`_ChunkPlan`). On all-MiniLM-L6-v2 (105 tensors,
2-core CPU, kernels stubbed out) the Python around the kernels took 1.3 ms per step with the
chunks rebuilt every step and 0.4 ms with a kept plan; the kernels themselves take ~11 ms.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lion_hf.optim.lion import (
    _PLAIN_TENSOR_TYPES,
    _for_loop_lion,
    _foreach_lion,
    _lion_tensor,
    _local,
    _param_stochastic,
)

# Set when torch.compile fails in this process; later steps use foreach (and "auto" resolves to it).
compile_failure: Exception | None = None


# Tensors per compiled call. Every call has a fixed cost (through dynamo ~180 us on this CPU,
# called directly still tens of us), so one call per tensor would add milliseconds to a
# 105-tensor model; one call per whole list would compile a graph per model (20+ s).
# Fixed-size chunks of flattened tensors with dynamic sizes compile a single graph for every
# model (the last chunk is padded with 2-element dummies).
COMPILE_CHUNK = 16


def _lion_chunk(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    cs: list[Tensor] | None,
    hyper: Tensor,
    seeds: Tensor | None,
    param_stochastic: bool,
    maximize: bool,
    cautious: bool,
    skip_nonfinite: bool,
) -> None:
    """``_lion_tensor`` over one chunk. ``hyper`` = [lr, decay, beta1, beta2] as an fp32 tensor,
    so a scheduler that changes lr every step changes data, not the compiled graph; ``seeds`` is
    an int32 [chunk, 2] tensor (param, momentum) when anything is rounded stochastically."""
    lr, decay, beta1, beta2 = hyper[0], hyper[1], hyper[2], hyper[3]
    for i in range(len(ps)):
        p_seed = seeds[i, 0] if param_stochastic else None
        m_seed = seeds[i, 1] if ms[i].dtype == torch.bfloat16 else None
        _lion_tensor(ps[i], gs[i], ms[i], None if cs is None else cs[i], lr, decay, beta1, beta2, p_seed, m_seed,
                     maximize, cautious, skip_nonfinite)


_compiled_chunk: Callable[..., None] | None = None
_RECOMPILE_LIMIT = 64
# Inductor decides whether a CPU loop runs on all threads from the size hint of the first call:
# compiled on small tensors, the one shared graph would stay single-threaded for every model.
# min_chunk_size=1 makes every loop an OpenMP parallel loop. emulate_precision_casts: inductor
# otherwise keeps `x.to(bf16).float()` at fp32, which silently turns fp16 stochastic rounding
# and the Kahan residual into no-ops. size_asserts=False: inductor would check every input's
# size and stride again on each call (~25 us for a chunk's 64 tensors on this CPU); the chunks
# hold 1-D contiguous tensors of their params' lengths by construction (_build_plan), and the
# calls that go through dynamo are checked by its guards.
_INDUCTOR_OPTIONS = {"cpp.min_chunk_size": 1, "emulate_precision_casts": True, "size_asserts": False}


def _bucket_signature(bucket: tuple) -> tuple | None:
    """The part of a chunk's signature its bucket fixes (dtypes, Kahan), or None when its chunks
    must always go through dynamo, with its guards: off the CPU and for tensor subclasses. A
    chunk's full signature adds whether it has seeds, the grad mode and every flag of the call;
    beyond it, the graph depends only on facts ``compiled_lion`` guarantees (1-D contiguous
    tensors, equal lengths per param, lengths >= 2). Chunks with the same signature run the same
    graph, called without dynamo after the first (see ``compiled_call``)."""
    device, p_dtype, g_dtype, m_dtype, kahan, *types = bucket
    if device.type != "cpu" or any(t is not Tensor for t in types):
        return None
    return p_dtype, g_dtype, m_dtype, kahan


def _compile_patches() -> contextlib.ExitStack:
    """Config for the calls that may compile. Sizes of equal value must not be unified into one
    symbol (duck shaping), or the graph would be specialised to one chunk's pattern of equal
    sizes. Each combination of dtypes, rounding and flags is its own graph; a process with
    several optimizers or mixed-precision groups can need more than dynamo's default 8, and
    fullgraph=True would then fail."""
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT))
    return stack


def _get_compiled_chunk() -> Callable[..., None]:
    global _compiled_chunk
    if _compiled_chunk is None:
        from lion_hf.optim.compiled_call import DirectCompiled

        _compiled_chunk = DirectCompiled(_lion_chunk, options=_INDUCTOR_OPTIONS, patches=_compile_patches)
    return _compiled_chunk


def _flat(t: Tensor) -> Tensor:
    """``t`` (contiguous) as a 1-D plain tensor. A view costs ~2.5 us of dispatch on this CPU, so
    a 1-D plain tensor is passed as it is."""
    return t if type(t) is Tensor and t.dim() == 1 else t.view(-1)


class _Chunk(NamedTuple):
    bucket: tuple  # (device, p dtype, g dtype, m dtype, Kahan, tensor types of p, g, m)
    indices: list[int]  # of its tensors in the step's lists
    params: list[Tensor]  # flat views, padded to COMPILE_CHUNK
    exp_avgs: list[Tensor]
    kahan_comps: list[Tensor] | None
    grad_pad: list[Tensor]  # padding for the grads


class _Call(NamedTuple):
    """What one chunk's compiled call takes, but the grads and per-step tensors, for given flags."""

    device: torch.device
    on_cpu: bool
    signature: tuple | None
    grads_of: Callable[[list[Tensor]], tuple[Tensor, ...]]  # the chunk's grads from the step's list
    grad_pad: list[Tensor]
    params: list[Tensor]
    exp_avgs: list[Tensor]
    kahan_comps: list[Tensor] | None
    seeded: bool  # something is rounded stochastically: the call takes seeds
    flags: tuple[bool, ...]  # param_stochastic, maximize, cautious, skip_nonfinite


def _grads_of(indices: list[int]) -> Callable[[list[Tensor]], tuple[Tensor, ...]]:
    # itemgetter of one index returns the item itself, not a 1-tuple.
    return operator.itemgetter(*indices) if len(indices) > 1 else lambda grads, i=indices[0]: (grads[i],)


class _ChunkPlan:
    """How one list of (param, grad, momentum, residual) splits into compiled chunks; kept from
    step to step for the same tensors (:func:`_plan_for`).

    ``chunks``: the :class:`_Chunk` list. ``leftovers``: the indices the for-loop updates
    (1-element or strided tensors). A kept plan holds while its tensors still sit on the memory
    its views were taken of (``memory``) and the grads keep their types, dtypes and lengths
    (``grad_meta``) and are contiguous. Its check costs a handful of passes over the lists
    (each ~10-25 us for 105 tensors on a 2-core CPU, more with cold caches).
    """

    __slots__ = ("calls", "chunks", "cpu_hyper", "grad_meta", "leftovers", "memory", "refs")

    def __init__(self) -> None:
        self.chunks: list[_Chunk] = []
        self.leftovers: list[int] = []
        self.calls: dict[tuple, list[_Call]] = {}  # per flags of a call: see _calls
        self.cpu_hyper: tuple[Tensor, Any] | None = None  # see _hyper
        self.memory: tuple[list[int], list[int]] = ([], [])
        self.grad_meta: tuple[list, ...] = ()
        self.refs: list[weakref.ref] = []  # kept plans: weak references that drop the plan


def _flat_grads(grads: list[Tensor]) -> list[Tensor]:
    """A kept plan's ``grads`` (plain and contiguous, checked) in their 1-D form, as
    :func:`_build_plan` flattens them; the for-loop's leftovers take the grads as they are,
    from the step's own list."""
    return list(map(_flat, grads))


# Plans of plain-tensor lists, keyed by the ids of their params and states. A plan holds views
# of those tensors; a weak reference on each drops the plan when one dies, so a plan never keeps
# a dead model's or optimizer's memory alive, and the ids in a key are those of live tensors.
_plans: dict[tuple[int, ...], _ChunkPlan] = {}
# A bound for loops whose set of params with grads changes every step (each set is its own plan).
_MAX_PLANS = 64
_padding: dict[tuple, tuple[list[Tensor], ...]] = {}


def _memory(params: list[Tensor], states: list[Tensor]) -> tuple[list[int], list[int]]:
    # Lengths too: a param cut on the same memory (p.data = p.data[:k]) keeps its data pointer,
    # and its grad may still be the old one, of the old length.
    tensors = [*params, *states]
    return list(map(Tensor.data_ptr, tensors)), list(map(Tensor.numel, tensors))


def _grad_meta(grads: list[Tensor]) -> tuple[list, ...]:
    # No dims: a kept plan flattens every grad again (_flat_grads).
    return list(map(type, grads)), [g.dtype for g in grads], list(map(Tensor.numel, grads))


def _plan_key(params: list[Tensor], exp_avgs: list[Tensor], kahan_comps: list[Tensor | None]) -> tuple[int, ...]:
    # Led by whether residuals follow, so keys with and without them never meet.
    if all([c is None for c in kahan_comps]):  # no residuals: their ids would all be id(None)
        return (0, *map(id, params), *map(id, exp_avgs))
    return (1, *map(id, params), *map(id, exp_avgs), *map(id, kahan_comps))


def _build_plan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                kahan_comps: list[Tensor | None]) -> tuple[_ChunkPlan, list[Tensor]]:
    """Buckets by device, dtypes and tensor types, cut into chunks of COMPILE_CHUNK, and this
    step's grads with each chunked one in its 1-D plain form. Raises ValueError for a grad,
    momentum or residual whose length is not its param's."""
    plan = _ChunkPlan()
    flat_grads = list(grads)
    buckets: dict[tuple, list[list]] = defaultdict(lambda: [[], [], [], []])
    for i, (param, grad, exp_avg, comp) in enumerate(zip(params, grads, exp_avgs, kahan_comps)):
        p, g, m = _local(param), _local(grad), _local(exp_avg)
        c = None if comp is None else _local(comp)
        n = p.numel()
        if g.numel() != n or m.numel() != n or (c is not None and c.numel() != n):
            # The graph reads all four with the param's length (and is called without guards).
            raise ValueError(
                f"Lion: a param of shape {tuple(p.shape)} has a grad of shape {tuple(g.shape)} and a momentum of "
                f"shape {tuple(m.shape)}" + ("" if c is None else f" and a Kahan residual of shape {tuple(c.shape)}"))
        if n == 0:
            continue
        if n == 1 or not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
                          and (c is None or c.is_contiguous())):
            # Size 1 would be its own specialised graph; strided tensors cannot be flattened in place.
            plan.leftovers.append(i)
            continue
        # Detached: a view links to its base, which keeps the base's Python object alive and so
        # would stop the weak references that drop a kept plan from ever firing.
        p, m, c = (None if t is None else t.view(-1).detach() for t in (p, m, c))
        flat_grads[i] = _flat(g)
        # The tensor types are in the key so that a chunk's first tensors speak for all of them
        # (_bucket_signature); a grad's is that of its flat form.
        key = (p.device, p.dtype, g.dtype, m.dtype, c is not None, type(p), type(flat_grads[i]), type(m))
        for lst, t in zip(buckets[key], (i, p, m, c)):
            lst.append(t)
    for key, (idx, ps, ms, cs) in buckets.items():
        device, p_dtype, g_dtype, m_dtype, kahan = key[:5]
        pad = _padding.get(key)
        if pad is None:
            # Distinct dummies: a tensor passed twice would make dynamo guard on the aliasing
            # and compile one graph per amount of padding.
            pad = tuple([torch.zeros(2, dtype=dt, device=device) for _ in range(COMPILE_CHUNK)]
                        for dt in (p_dtype, g_dtype, m_dtype, p_dtype))
            _padding[key] = pad
        for start in range(0, len(idx), COMPILE_CHUNK):
            end = start + COMPILE_CHUNK
            missing = max(0, end - len(idx))
            plan.chunks.append(_Chunk(
                key, idx[start:end], ps[start:end] + pad[0][:missing], ms[start:end] + pad[2][:missing],
                cs[start:end] + pad[3][:missing] if kahan else None, pad[1][:missing]))
    return plan, flat_grads


def _plan_for(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              kahan_comps: list[Tensor | None]) -> tuple[_ChunkPlan, list[Tensor]]:
    """The chunk plan for these tensors and the grads in the form its chunks take: the kept
    plan while it holds (checked in 0.1-0.3 ms for all-MiniLM-L6-v2's 105 tensors on this CPU;
    bucketing and viewing them again costs ~1 ms), else a new one, kept when every tensor is a
    plain tensor and every grad contiguous."""
    key = _plan_key(params, exp_avgs, kahan_comps)
    states = exp_avgs if key[0] == 0 else [*exp_avgs, *(c for c in kahan_comps if c is not None)]
    plan = _plans.get(key)
    grads_contiguous = all(map(Tensor.is_contiguous, grads))
    if (plan is not None and grads_contiguous and plan.grad_meta == _grad_meta(grads)
            and plan.memory == _memory(params, states)):
        return plan, _flat_grads(grads)
    plan, flat_grads = _build_plan(params, grads, exp_avgs, kahan_comps)
    if grads_contiguous and all(type(t) in _PLAIN_TENSOR_TYPES for t in (*params, *grads, *states)):
        plan.memory, plan.grad_meta = _memory(params, states), _grad_meta(grads)
        # The callback holds the dict itself: at interpreter exit this module's globals may be
        # cleared before a model that is still alive dies.
        plan.refs = [weakref.ref(t, lambda _, key=key, plans=_plans: plans.pop(key, None)) for t in (*params, *states)]
        if len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest; its weak references die with it
        _plans[key] = plan
    return plan, flat_grads


def _hyper(plan: _ChunkPlan, device: torch.device, on_cpu: bool, values: tuple[float, ...]) -> Tensor:
    """``values`` ([lr, decay, beta1, beta2]) as an fp32 tensor on ``device``. On the CPU a plan
    keeps one and writes the values into it through a numpy view: the kernels read it before
    their call returns, and a new tensor per step cost ~10 us, ~60 us with the caches cold
    after the backward pass (2-core CPU). Elsewhere, where kernels run asynchronously, every
    step gets its own."""
    if not on_cpu:
        return torch.tensor(values, dtype=torch.float32, device="cpu").to(device, non_blocking=True)
    if plan.cpu_hyper is None:  # on the CPU whatever torch's default device is
        hyper = torch.tensor(values, dtype=torch.float32, device="cpu")
        plan.cpu_hyper = (hyper, hyper.numpy())
    else:
        plan.cpu_hyper[1][:] = values  # rounded to fp32 as torch.tensor rounds them
    return plan.cpu_hyper[0]


def _calls(plan: _ChunkPlan, param_rounding: str, maximize: bool, cautious: bool, skip_nonfinite: bool,
           grad_enabled: bool) -> list[_Call]:
    """The plan's chunks as calls for these flags, built once per plan and flags."""
    key = (param_rounding, maximize, cautious, skip_nonfinite, grad_enabled)
    calls = plan.calls.get(key)
    if calls is None:
        calls = []
        for bucket, idx, ps, ms, cs, grad_pad in plan.chunks:
            device, p_dtype, _, m_dtype = bucket[:4]
            signature = _bucket_signature(bucket)
            param_stochastic = _param_stochastic(p_dtype, param_rounding)
            seeded = param_stochastic or m_dtype == torch.bfloat16
            # Every flag _lion_chunk branches on is in the signature (each is its own graph).
            flags = (param_stochastic, maximize, cautious, skip_nonfinite)
            if signature is not None:
                signature = (*signature, seeded, grad_enabled, *flags)
            calls.append(_Call(device, device.type == "cpu", signature, _grads_of(idx), grad_pad, ps, ms, cs, seeded,
                               flags))
        plan.calls[key] = calls
    return calls


def compiled_lion(
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
    """The compiled step. If torch.compile fails (no working C++ toolchain, an inductor bug), it
    warns once, finishes this step with ``foreach`` on exactly the tensors not yet updated (the
    failing chunk never ran), and runs every later step with ``foreach`` too: the failure is
    recorded in :data:`compile_failure`, which :func:`~lion_hf.optim.lion.impl_unavailable` reports."""
    global compile_failure
    kwargs = dict(lr=lr, decay=decay, beta1=beta1, beta2=beta2, maximize=maximize, cautious=cautious,
                  skip_nonfinite=skip_nonfinite, param_rounding=param_rounding)
    if compile_failure is not None:
        _foreach_lion(params, grads, exp_avgs, kahan_comps, **kwargs)
        return
    step = _get_compiled_chunk()
    plan, flat_grads = _plan_for(params, grads, exp_avgs, kahan_comps)
    calls = _calls(plan, param_rounding, maximize, cautious, skip_nonfinite, torch.is_grad_enabled())
    hyper_by_device: dict[torch.device, Tensor] = {}
    failure: tuple[int, Exception] | None = None
    # Chunks off the CPU always go through dynamo (no signature): enter its config once for all.
    off_cpu = any(call.signature is None for call in calls)
    with _compile_patches() if off_cpu else contextlib.nullcontext():
        for n_done, (device, on_cpu, signature, grads_of, grad_pad, ps, ms, cs, seeded, flags) in enumerate(calls):
            hyper = hyper_by_device.get(device)
            if hyper is None:
                hyper = hyper_by_device[device] = _hyper(plan, device, on_cpu, (lr, decay, beta1, beta2))
            seeds = None
            if seeded:  # drawn from the CPU generator on every device (its state is what a checkpoint saves)
                seeds = torch.randint(0, 1 << 16, (COMPILE_CHUNK, 2), dtype=torch.int32, device="cpu")
                if not on_cpu:
                    seeds = seeds.to(device, non_blocking=True)
            try:
                step(signature, ps, [*grads_of(flat_grads), *grad_pad], ms, cs, hyper, seeds, *flags)
            except Exception as exc:
                failure = (n_done, exc)
                break
    rest = plan.leftovers
    if failure is not None:
        n_done, exc = failure
        compile_failure = exc
        warnings.warn(f"Lion: torch.compile failed ({type(exc).__name__}: {exc}); this and later steps use "
                      "impl='foreach'", stacklevel=3)
        # Compilation fails before the graph runs, so that chunk and the rest are untouched.
        rest = [i for chunk in plan.chunks[n_done:] for i in chunk.indices] + rest
    if rest:
        run = _for_loop_lion if failure is None else _foreach_lion
        run(*([ts[i] for i in rest] for ts in (params, grads, exp_avgs, kahan_comps)), **kwargs)
