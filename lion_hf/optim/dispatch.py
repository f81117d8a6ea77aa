"""Which impl runs a step, and the one path every step takes to it.

:func:`resolve_impl` is the one function that decides which implementation runs on a device
(``auto``: ``triton`` on CUDA, ``cpp`` on the CPU, ``foreach`` wherever those cannot run), and
:func:`impl_unavailable` the one that says why an impl cannot run. Every step, from ``Lion.step``,
the functional ``lion()`` and ``DistributedLion.step``, takes one path in two stages.
:func:`prepare_step` takes the local shards of DTensors, makes grads readable (zero tensors,
negated views), checks the tensors for every impl alike (shapes, dtypes, devices, memory that is
really there), resolves the impl of each device (an explicit one is checked again there), runs the
``skip_step`` / ``raise`` gate and draws the stochastic-rounding seeds. :func:`apply_step` splits
the tensors by device and runs each device's impl (:func:`run_step` is the two in a row);
DistributedLion runs its two passes over the same prepared step with :func:`vote_signs` and
:func:`vote_apply`, in the same impls. The one rule for what a fused kernel does not
take (``cpp``: tensors that are not contiguous; ``triton``: tensors it cannot update as flat
memory): the kernel leaves them untouched and they run in ``foreach``, the impl that runs
everywhere. A call whose tensors share memory (a param listed twice, overlapping views) runs in
``for_loop``, one tensor after the other, whichever impl was asked for: that is what such a step
means, and the fused impls would race on (or read stale) shared elements.

The impls' modules are imported only when their impl runs (triton's import is slow, and the C++
kernel is built at first use).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lion_hf.optim.cpu_kernel_build import cxx_compiler
from lion_hf.optim.for_loop import for_loop_lion, for_loop_signs, for_loop_vote_apply
from lion_hf.optim.foreach import foreach_lion, foreach_signs, foreach_vote_apply
from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    PLAIN_TENSOR_TYPES,
    StepGroup,
    all_finite,
    local,
    offset_seed,
    ranges_overlap,
    row_chunks,
    sparse_rows,
    step_may_proceed,
    with_seeds,
)
from lion_hf.optim.options import IMPLS
from lion_hf.optim.signs import TRITS_PER_BYTE, ZERO_SIGNS_BYTE, combine_signs, pack_trits, packed_nbytes
from lion_hf.optim.validation import StepMemory, check_step_tensors, overlapping, readable_grads

__all__ = [
    "PreparedStep",
    "apply_step",
    "apply_step_by_rows",
    "impl_unavailable",
    "prepare_step",
    "resolve_impl",
    "run_step",
    "vote_apply",
    "vote_signs",
]


@functools.lru_cache(maxsize=8)
def _compiler_found(cxx_setting: str | None) -> bool:
    return cxx_compiler() is not None


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    # The mode is fixed when triton.language is first imported; before that, the environment decides it.
    kernel = sys.modules.get("lion_hf.optim.triton_kernel")
    if kernel is not None:
        return kernel.INTERPRET
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cpp_build_failure() -> Exception | None:
    module = sys.modules.get("lion_hf.optim.cpu_kernel")
    return None if module is None else module.build_failure


def impl_unavailable(impl: str, device: torch.device | str, *, count_build_failure: bool = True) -> str | None:
    """Why ``impl`` cannot run on ``device``, or None if it can: the one place that decides.

    ``cpp`` needs the CPU, a C++ compiler and no earlier build failure in this process (unless
    ``count_build_failure`` is False: an explicit ``impl="cpp"`` whose build failed runs its
    steps in ``foreach``, after one warning); ``triton`` needs the triton package and a usable
    CUDA device, or a CPU with triton in interpreter mode (``TRITON_INTERPRET=1`` before triton's
    first import). ``for_loop`` and ``foreach`` run wherever torch does.
    """
    device = torch.device(device)
    if impl == "cpp":
        if device.type != "cpu":
            return f"impl='cpp' runs on the CPU; params are on {device.type!r}. Use impl='triton' or 'foreach' there."
        if not _compiler_found(os.environ.get("CXX")):
            return "impl='cpp' needs a C++ compiler (g++) on the PATH, or $CXX"
        failure = _cpp_build_failure() if count_build_failure else None
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
                f"{device.type!r}. Use impl='cpp' or 'foreach' there.")
    return None


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The implementation that runs ``impl`` on ``device``: ``auto`` is ``triton`` on CUDA and
    ``cpp`` on the CPU where they can run, else ``foreach``. An explicit impl that cannot run on
    the device raises RuntimeError saying why (a failed C++ build is not such a reason: its steps
    run in ``foreach``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return _resolve(impl, torch.device(device))


def _resolve(impl: str, device: torch.device) -> str:
    # resolve_impl past the check of the name, which the optimizer made once for the step.
    if impl == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
        if preferred is not None and impl_unavailable(preferred, device) is None:
            return preferred
        return "foreach"
    reason = impl_unavailable(impl, device, count_build_failure=False)
    if reason is not None:
        raise RuntimeError(reason)
    return impl


def _cpp(*args: Any, **kwargs: Any) -> list[list[int]]:
    from lion_hf.optim.cpu_kernel import cpp_lion

    return cpp_lion(*args, **kwargs)


def _triton(*args: Any, **kwargs: Any) -> list[list[int]]:
    from lion_hf.optim.triton_kernel import triton_lion

    return triton_lion(*args, **kwargs)


# Each impl updates what it takes of a step's groups and returns, per group, the indices it left.
_IMPL_FUNCTIONS: dict[str, Callable[..., list[list[int]]]] = {
    "for_loop": for_loop_lion,
    "foreach": foreach_lion,
    "cpp": _cpp,
    "triton": _triton,
}


def _local(group: StepGroup) -> StepGroup:
    if set(map(type, group.params)) <= PLAIN_TENSOR_TYPES:  # no DTensor params: no DTensor grads or momenta either
        grads = readable_grads(group.grads)
        return group if grads is group.grads else group._replace(grads=grads)
    return group._replace(params=[local(t) for t in group.params],
                          grads=readable_grads([local(t) for t in group.grads]),
                          exp_avgs=[local(t) for t in group.exp_avgs],
                          kahan_comps=[None if c is None else local(c) for c in group.kahan_comps])


@functools.lru_cache(maxsize=64)
def _explicit_impl_checked(impl: str, device: torch.device, cxx_setting: str | None) -> str:
    # Cached: the step's check of an explicit impl then costs a dict lookup per device. A failure
    # raises and is not cached, so it is raised again at every step.
    return _resolve(impl, device)


class PreparedStep(NamedTuple):
    """A step ready to run: the groups' local, readable, checked tensors (with their seeds, once
    drawn), the impl of each device they are on (in order of first appearance), whether an
    element with a NaN/inf gradient is to be left unchanged, and where each group's tensors lie
    (``memory``, as the check read them, one entry per group: None where it did not) for
    :func:`apply_step` when it steps these very groups."""

    groups: list[StepGroup]
    impls: dict[torch.device, str]
    skip_nonfinite: bool
    memory: list[StepMemory | None] | None = None


def prepare_step(groups: list[StepGroup], *, impl: str, nonfinite_grad: str, grad_norm: float | Tensor | None = None,
                 gate: bool = True, draw_seeds: bool = True) -> PreparedStep | None:
    """The first stage of every step (hyperparameters and ``impl``'s name already validated, once,
    by the caller): local shards, readable grads, the tensor checks, each device's impl (an
    explicit impl is checked again for each device the tensors are on: a model moved with
    ``.cuda()`` after ``Lion(..., impl="cpp")`` was built is a RuntimeError, not a kernel reading
    device memory), then, with ``gate`` under ``nonfinite_grad`` "skip_step" or "raise", the
    non-finite gate (:func:`~lion_hf.optim.numerics.step_may_proceed`, with ``grad_norm`` when the
    caller has it), and the stochastic-rounding seeds (``draw_seeds``; DistributedLion draws them
    later, from rank 0's seed). None when the gate skipped the step."""
    gate_grads = [g for group in groups for g in group.grads]  # DTensors kept: the gate agrees over their mesh
    groups = [_local(group) for group in groups if group.params]
    devices: dict[torch.device, None] = {}  # ordered: the first group's device first
    memory: list[StepMemory | None] = []
    for group in groups:
        devices.update(dict.fromkeys(check_step_tensors(group.params, group.grads, group.exp_avgs,
                                                        group.kahan_comps, group.param_rounding,
                                                        group.exp_avg_scales, memory=memory)))
    cxx = os.environ.get("CXX")
    impls = {device: _resolve(impl, device) if impl == "auto" else _explicit_impl_checked(impl, device, cxx)
             for device in devices}
    skip_nonfinite = nonfinite_grad == "skip_elements"
    if gate and nonfinite_grad in ("skip_step", "raise"):
        if not step_may_proceed(nonfinite_grad, gate_grads, grad_norm):
            return None
    if draw_seeds and groups:
        groups = with_seeds(groups, [None if m is None else (m.dtypes[0], m.dtypes[2]) for m in memory])
    return PreparedStep(groups, impls, skip_nonfinite, memory)


def _on_device(prepared: PreparedStep, device: torch.device) -> list[StepGroup]:
    if len(prepared.impls) == 1:
        return prepared.groups
    on_device = [group.subset([i for i, p in enumerate(group.params) if p.device == device])
                 for group in prepared.groups]
    return [group for group in on_device if group.params]


def _shares_memory(groups: list[StepGroup], memory: list[StepMemory] | None = None) -> bool:
    # One check over every tensor of the step on a device, by their strided extents: those the
    # tensor check read for these groups (``memory``), else read now.
    if memory is not None:
        return ranges_overlap(np.concatenate([m.starts for m in memory]), np.concatenate([m.extents for m in memory]))
    return overlapping([t for group in groups for ts in (*group[:4], group.scales()) for t in ts if t is not None])


def _run(concrete: str, groups: list[StepGroup], skip_nonfinite: bool,
         memory: list[StepMemory] | None = None) -> None:
    # The impl of the device on these groups; what a fused kernel leaves runs in foreach, tensors
    # that share memory in for_loop. ``memory``: where these groups' tensors lie, when the check read it.
    if concrete != "for_loop" and _shares_memory(groups, memory):
        for_loop_lion(groups, skip_nonfinite=skip_nonfinite)
        return
    if concrete == "cpp" and memory is not None and all(m.contiguous for m in memory):
        # The kernel's pointers and dtypes as the check read them (every tensor contiguous: it takes them all).
        lefts = _IMPL_FUNCTIONS[concrete](groups, skip_nonfinite=skip_nonfinite,
                                          checked=[(m.starts, m.dtypes) for m in memory])
    else:
        lefts = _IMPL_FUNCTIONS[concrete](groups, skip_nonfinite=skip_nonfinite)
    rest = [group.subset(left) for group, left in zip(groups, lefts) if left]
    if rest:
        foreach_lion(rest, skip_nonfinite=skip_nonfinite)


def apply_step(prepared: PreparedStep) -> None:
    """The second stage: each device's impl runs its share of the step. What a fused kernel
    leaves runs in ``foreach``; tensors that share memory update one after the other in
    ``for_loop``, whichever impl was asked for. A param with a sparse gradient is stepped a
    chunk of rows at a time after the others (:func:`_step_sparse`)."""
    skip_nonfinite = prepared.skip_nonfinite
    for device, concrete in prepared.impls.items():
        on_device = _on_device(prepared, device)
        memory = prepared.memory
        if on_device is not prepared.groups or memory is None or len(memory) != len(on_device) or None in memory:
            memory = None  # read again over the tensors stepped here
        sparse_steps = []
        if any(g.is_sparse for group in on_device for g in group.grads):
            dense_groups = []
            for group in on_device:
                sparse = {i for i, g in enumerate(group.grads) if g.is_sparse}
                sparse_steps += [group.subset([i]) for i in sorted(sparse)]
                kept = [i for i in range(len(group.params)) if i not in sparse]
                if kept:
                    dense_groups.append(group.subset(kept))
            on_device, memory = dense_groups, None
        if on_device:
            _run(concrete, on_device, skip_nonfinite, memory)
        for group in sparse_steps:
            _step_sparse(concrete, group, skip_nonfinite)


def _step_sparse(concrete: str, group: StepGroup, skip_nonfinite: bool) -> None:
    # One param with a sparse gradient: each chunk of rows gets its dense gradient made alone
    # (numerics.sparse_rows).
    p, g, scale = group.params[0], group.grads[0], group.scales()[0]
    _step_rows(concrete, group, functools.partial(sparse_rows, g), row_chunks(p.shape, scale is not None),
               skip_nonfinite)


def apply_step_by_rows(prepared: PreparedStep, grad_rows: Callable[[int, int], Tensor],
                       ranges: list[tuple[int, int]]) -> None:
    """The second stage for one param whose gradient is never whole: ``grad_rows(first, last)``
    returns its rows ``first:last`` (dense, the param's dtype) for each ``(first, last)`` of
    ``ranges`` (row ranges covering the param in order; with 8-bit momentum each must start on a
    block boundary, as :func:`~lion_hf.optim.numerics.row_chunks` with ``eight_bit`` cuts them),
    and the param is stepped a range at a time: the same bits as one step on the whole gradient.
    Where a step needs the whole gradient at once (cautious, a param or state without row slices
    of flat memory) it gets ``grad_rows(0, rows)``. ``prepared`` holds that one param, its grad a
    stand-in of its shape and dtype (e.g. an expanded zero), so the ``skip_step`` / ``raise`` gate
    of :func:`prepare_step` cannot see the gradient: the caller runs only the element-wise policies
    (gradient release refuses the others). Gradient release steps an output layer's weight this way
    inside its backward."""
    ranges = [tuple(pair) for pair in ranges]  # read once: an iterator would be spent by the checks
    sizes = [len(group.params) for group in prepared.groups]
    if sizes != [1]:
        raise ValueError(f"apply_step_by_rows steps one param, got groups of {sizes} params")
    group = prepared.groups[0]
    p, scale = group.params[0], group.scales()[0]
    if p.dim() == 0:
        raise ValueError("apply_step_by_rows steps a param with rows, got a 0-dim param")
    stops = [last for _, last in ranges]
    if not ranges or [first for first, _ in ranges] != [0, *stops[:-1]] or stops[-1] != p.shape[0] \
            or any(first >= last for first, last in ranges):
        raise ValueError(f"apply_step_by_rows: ranges must cover rows 0..{p.shape[0]} in order, got {ranges}")
    row_numel = p[0].numel()
    if scale is not None and any(first * row_numel % EIGHT_BIT_BLOCK for first, _ in ranges):
        raise ValueError(f"apply_step_by_rows: with 8-bit momentum each range must start on a block of "
                         f"{EIGHT_BIT_BLOCK} elements (rows of {row_numel}), got {ranges}")

    def checked_rows(first: int, last: int) -> Tensor:
        rows = grad_rows(first, last)
        want = p[first:last]
        if not isinstance(rows, Tensor) or rows.shape != want.shape or rows.dtype != p.dtype \
                or rows.device != p.device or rows.is_sparse:
            got = (f"{type(rows).__name__} of shape {tuple(rows.shape)}, {rows.dtype} on {rows.device}"
                   if isinstance(rows, Tensor) else type(rows).__name__)
            raise ValueError(f"apply_step_by_rows: grad_rows({first}, {last}) must return a dense tensor of shape "
                             f"{tuple(want.shape)}, {p.dtype} on {p.device}; got {got}")
        return rows

    _step_rows(prepared.impls[p.device], group, checked_rows, ranges, prepared.skip_nonfinite)


def _step_rows(concrete: str, group: StepGroup, grad_rows: Callable[[int, int], Tensor],
               ranges: list[tuple[int, int]], skip_nonfinite: bool) -> None:
    # One param's step a range of rows at a time, each range with its slice of the state, its block
    # scales and its offset seeds. Cautious rescales by a mean over the whole tensor, and a strided
    # param or state has no row slices of flat memory: those take the whole gradient.
    p, m, comp, scale = group.params[0], group.exp_avgs[0], group.kahan_comps[0], group.scales()[0]
    state = (p, m) if comp is None else (p, m, comp)
    if group.cautious or not all(t.is_contiguous() for t in state):
        _run(concrete, [group._replace(grads=[grad_rows(0, p.shape[0])])], skip_nonfinite)
        return
    row_numel = p[0].numel()
    for first, last in ranges:
        start, stop = first * row_numel, last * row_numel
        chunk = group._replace(
            params=[p[first:last]], grads=[grad_rows(first, last)], exp_avgs=[m[first:last]],
            kahan_comps=[None if comp is None else comp[first:last]],
            seeds=None if group.seeds is None else offset_seed(group.seeds, start),
            exp_avg_scales=None if group.exp_avg_scales is None else [
                None if scale is None else scale[start // EIGHT_BIT_BLOCK:-(-stop // EIGHT_BIT_BLOCK)]])
        _run(concrete, [chunk], skip_nonfinite)


def run_step(groups: list[StepGroup], *, impl: str, nonfinite_grad: str,
             grad_norm: float | Tensor | None = None) -> bool:
    """One step over the groups' tensors: :func:`prepare_step`, then :func:`apply_step`. Returns
    False when the non-finite gate skipped the step, else True."""
    prepared = prepare_step(groups, impl=impl, nonfinite_grad=nonfinite_grad, grad_norm=grad_norm)
    if prepared is None:
        return False
    apply_step(prepared)
    return True


# --------------------------------------------------------------------------------------
# DistributedLion's two passes over a prepared step (one device), in the device's impl
# --------------------------------------------------------------------------------------


def _vote_impl(prepared: PreparedStep) -> tuple[str, list[StepGroup]]:
    """The one device's impl for the vote's passes: ``for_loop`` where tensors share memory;
    ``cpp`` (its two passes, over the whole step or none of it); ``triton`` (its sign pass and
    its vote; the update is then applied in foreach); ``foreach`` elsewhere."""
    if len(prepared.impls) > 1:
        raise ValueError(f"DistributedLion: the params are on several devices ({', '.join(map(str, prepared.impls))}); "
                         "the sign vote steps the params of one device")
    concrete = next(iter(prepared.impls.values()), "foreach")
    if concrete != "for_loop" and _shares_memory(prepared.groups):
        return "for_loop", prepared.groups
    return concrete, prepared.groups


def vote_signs(prepared: PreparedStep, out: Tensor, *, count_nonfinite: bool) -> bool:
    """Pass 1 of DistributedLion: the packed signs of every element's ``c`` (the step's elements
    in order) written to ``out`` (uint8, ``packed_nbytes(N, 0)`` bytes); elements with a NaN/inf
    gradient send sign 0 under ``skip_nonfinite``. With ``count_nonfinite``, returns whether a
    gradient is NaN/inf (then the signs may be left as zero signs: the step is skipped), else
    False."""
    concrete, groups = _vote_impl(prepared)
    zero_nonfinite = prepared.skip_nonfinite
    if concrete == "cpp":
        from lion_hf.optim.cpu_kernel import cpp_signs

        count = cpp_signs(groups, out, zero_nonfinite=zero_nonfinite, count_nonfinite=count_nonfinite)
        if count is not None:  # its one pass both wrote the signs and counted the non-finite grads
            return count > 0
        concrete = "foreach"
    if count_nonfinite and not all_finite([g for group in groups for g in group.grads]):
        out.fill_(ZERO_SIGNS_BYTE)  # skipped by every rank anyway
        return True
    trits = torch.ones(out.numel() * TRITS_PER_BYTE, dtype=torch.uint8, device=out.device)
    if concrete == "triton":
        from lion_hf.optim.triton_kernel import triton_signs

        if not triton_signs(groups, trits, zero_nonfinite=zero_nonfinite):
            foreach_signs(groups, trits, zero_nonfinite=zero_nonfinite)
    else:
        (for_loop_signs if concrete == "for_loop" else foreach_signs)(groups, trits, zero_nonfinite=zero_nonfinite)
    pack_trits(trits, out=out)
    return False


def vote_apply(prepared: PreparedStep, gathered: Tensor, offset: int, *, vote: str) -> None:
    """Pass 2 of DistributedLion: the vote of every rank's signs (``gathered``: one row per rank,
    the signs at byte ``offset``) applied to the weights, and each momentum stepped by this rank's
    own gradient (kept where it is NaN/inf under ``skip_nonfinite``), in the impl of pass 1."""
    concrete, groups = _vote_impl(prepared)
    keep = prepared.skip_nonfinite
    if concrete == "cpp":
        from lion_hf.optim.cpu_kernel import cpp_vote_apply

        if cpp_vote_apply(groups, gathered, offset, average=vote == "average", keep_nonfinite_momentum=keep):
            return
        concrete = "foreach"
    numel = sum(p.numel() for group in groups for p in group.params)
    signs = gathered[:, offset:offset + packed_nbytes(numel, 0)]
    update = None
    if concrete == "triton":
        from lion_hf.optim.triton_kernel import triton_vote

        update = triton_vote(signs, numel, vote)
    if update is None:
        update = combine_signs(signs, numel, vote)
    (for_loop_vote_apply if concrete == "for_loop" else foreach_vote_apply)(groups, update,
                                                                           keep_nonfinite_momentum=keep)
