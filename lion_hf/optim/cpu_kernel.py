"""``impl="cpp"``: one call of a C++ kernel (``cpu_kernel.cpp``) over every CPU tensor of a step.

The kernel takes plain contiguous CPU tensors of every kind the other impls take: fp32, bf16 and
fp16 params (a grad of the param's dtype, or any other float grad, which is upcast to fp32 as
:func:`~lion_hf.optim.numerics.lion_tensor` upcasts it), fp32, bf16 or 8-bit momenta, each
``param_rounding`` (Kahan residuals included). Given the same seeds it computes the step of
:func:`~lion_hf.optim.numerics.lion_tensor` (the reference; ``impl="for_loop"``) bit for bit.
What it does not take, it leaves to the dispatcher, which runs it with ``foreach`` (one rule,
in ``dispatch``): a tensor that is not contiguous (of param, grad, momentum or residual). It
checks no memory itself: the dispatcher hands it only tensors that passed
``validation.check_step_tensors`` (in-bounds storage, no zero tensor or negated view) and a step
whose tensors do not overlap (one check in ``dispatch.apply_step`` over every tensor of the step,
by strided extent; a step whose tensors overlap runs in ``for_loop``, as the kernel's threads
would race on shared elements). DistributedLion's two passes (:func:`cpp_signs`,
:func:`cpp_vote_apply`) take the whole step or none of it.

The library is built and loaded by :mod:`~lion_hf.optim.cpu_kernel_build`. If that fails, a
warning says why, this process records the failure (``build_failure``), and ``dispatch`` then
stops choosing this impl.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lion_hf.optim import cpu_kernel_build
from lion_hf.optim.numerics import StepGroup

__all__ = ["build_failure", "cpp_lion", "cpp_signs", "cpp_vote_apply", "kernel", "sign_vote_kernels"]

# Set when the kernel failed to build or load in this process; ``dispatch`` reads it.
build_failure: Exception | None = None
_loaded: ctypes.CDLL | None = None
_kernel: Callable[..., int] | None = None
_sign_vote: tuple[Callable[..., int], Callable[..., None]] | None = None

_P = ctypes.c_void_p
# n, params, grads, momenta, residuals, scales, numels, kinds, groups, seeds, hyper, skip_nonfinite, threads
_ARGTYPES = [ctypes.c_int64, *[_P] * 10, ctypes.c_int, ctypes.c_int]

# The kernel's tensor kinds (cpu_kernel.cpp): param dtype, grad fp32 although the param is not,
# bf16 or 8-bit momentum, and how a bf16/fp16 param is stored.
_PARAM_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_GRAD_FP32, _MOMENTUM_BF16, _CAUTIOUS, _MOMENTUM_INT8 = 4, 8, 64, 128
_MOMENTUM_KIND = {torch.float32: 0, torch.bfloat16: _MOMENTUM_BF16, torch.int8: _MOMENTUM_INT8}
_ROUNDING_KIND = {"nearest": 0, "stochastic": 1 << 4, "kahan": 2 << 4}
_DTYPE = operator.attrgetter("dtype")


def _library() -> ctypes.CDLL | None:
    """The kernel's library, built and loaded at the first call; None once that failed."""
    global _loaded, build_failure
    if _loaded is None and build_failure is None:
        try:
            # Threads taking their first cpp step at once: one builds and loads, the others wait for it.
            with cpu_kernel_build.exclusive():
                if _loaded is None and build_failure is None:
                    library = cpu_kernel_build.load_library()
                    library.lion_hf_cpu_step, library.lion_hf_dist_signs, library.lion_hf_dist_apply  # noqa: B018
                    _loaded = library
        except Exception as exc:  # whatever went wrong, a step falls back to foreach and never raises it
            build_failure = exc
            warnings.warn(f"Lion: impl='cpp' is unavailable ({exc}); this and later steps use impl='foreach'",
                          stacklevel=6)
    return _loaded


def kernel() -> Callable[..., int] | None:
    """The kernel function, built and loaded at the first call; None once that failed."""
    global _kernel
    if _kernel is None:
        library = _library()
        if library is None:
            return None
        function = library.lion_hf_cpu_step
        function.argtypes = _ARGTYPES
        function.restype = ctypes.c_int64  # tensors of a kind it does not know (nothing was updated)
        _kernel = function
    return _kernel


def sign_vote_kernels() -> tuple[Callable[..., int], Callable[..., None]] | None:
    """Distributed Lion's two passes over fp32 tensors (``lion_hf_dist_signs``, ``lion_hf_dist_apply``
    in cpu_kernel.cpp), or None when the library cannot be built or loaded."""
    global _sign_vote
    if _sign_vote is None:
        library = _library()
        if library is None:
            return None
        signs, apply = library.lion_hf_dist_signs, library.lion_hf_dist_apply
        # n, grads, momenta, numels, groups, hyper, zero_nonfinite, count_nonfinite, out, threads
        signs.argtypes = [ctypes.c_int64, *[_P] * 5, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int]
        signs.restype = ctypes.c_int64
        # n, params, grads, momenta, numels, groups, hyper, gathered, world, row_bytes, average,
        # inv_world, keep_nonfinite_momentum, threads
        apply.argtypes = [ctypes.c_int64, *[_P] * 7, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_float,
                          ctypes.c_int, ctypes.c_int]
        apply.restype = None
        _sign_vote = (signs, apply)
    return _sign_vote


def _split_contiguous(group: StepGroup) -> tuple[StepGroup, list[int]]:
    """The group's contiguous tensors (param, grad, momentum and residual), and the indices of the
    rest. The common all-contiguous case costs one C-level pass per list."""
    comps = [c for c in group.kahan_comps if c is not None]
    if all(all(map(Tensor.is_contiguous, ts)) for ts in (group.params, group.grads, group.exp_avgs, comps)):
        return group, []
    contiguous = [p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and (c is None or c.is_contiguous())
                  for p, g, m, c in zip(group.params, group.grads, group.exp_avgs, group.kahan_comps)]
    return group.subset([i for i, ok in enumerate(contiguous) if ok]), [i for i, ok in enumerate(contiguous) if not ok]


@functools.lru_cache(maxsize=64)
def _kind_table(flags: int) -> dict[tuple[torch.dtype, torch.dtype, torch.dtype], int]:
    """(param, grad, momentum) dtypes -> the kernel's kind, for a group's rounding and cautious
    ``flags``; the grad is already the param's dtype or fp32."""
    table = {}
    for p_dtype in _PARAM_KIND:
        for g_dtype in {p_dtype, torch.float32}:
            for m_dtype, m_kind in _MOMENTUM_KIND.items():
                kind = _PARAM_KIND[p_dtype]
                if kind:
                    kind |= flags | (_GRAD_FP32 if g_dtype != p_dtype else 0)
                else:
                    kind |= flags & _CAUTIOUS  # an fp32 param stores exactly: no rounding
                table[(p_dtype, g_dtype, m_dtype)] = kind | m_kind
    return table


def cpp_lion(groups: list[StepGroup], *, skip_nonfinite: bool,
             checked: list[tuple[np.ndarray, tuple[list[torch.dtype], ...]]] | None = None) -> list[list[int]]:
    """One kernel call over every tensor of every group that it takes; returns, per group, the
    indices of the tensors it left (see the module docstring), which it has not touched. The
    tensors are plain, local, checked and free of overlap (the dispatcher's checks). ``checked``:
    per group, as the dispatcher's check read them this step when every tensor is contiguous, the
    data_ptrs of its params, grads, momenta, then of its Kahan residuals there are and its block
    scale tensors there are, and the dtypes of its params, grads and momenta; else these are read
    here."""
    function = kernel()
    if function is None:
        return [list(range(len(group.params))) for group in groups]
    ps: list[Tensor] = []
    gs: list[Tensor] = []  # held until the call: an upcast grad lives only here
    ms: list[Tensor] = []
    cs: list[Tensor | None] = []
    scales: list[Tensor | None] = []
    kinds: list[np.ndarray] = []
    members: list[np.ndarray] = []
    seed_rows: list[np.ndarray] = []
    columns: list[np.ndarray] = []  # per group, (5, n) pointers: params, grads, momenta, residuals, scales
    lefts: list[list[int]] = []
    hyper = np.empty((len(groups), 7), dtype=np.float32)
    for index, group in enumerate(groups):
        hyper[index] = (group.lr, group.decay, group.beta1, 1.0 - group.beta1, group.beta2, 1.0 - group.beta2,
                        -1.0 if group.maximize else 1.0)
        read, (p_dtypes, g_dtypes, m_dtypes) = (None, (None,) * 3) if checked is None else checked[index]
        taken, left = (group, []) if read is not None else _split_contiguous(group)
        lefts.append(left)
        n = len(taken.params)
        if not n:
            continue
        if read is None:
            p_dtypes, g_dtypes, m_dtypes = (list(map(_DTYPE, ts)) for ts in (taken.params, taken.grads,
                                                                              taken.exp_avgs))
        grads = taken.grads
        if g_dtypes != p_dtypes:
            # A grad of a third dtype is upcast as lion_tensor upcasts it (fp32 from bf16/fp16 is exact).
            upcast = [g if g.dtype == p.dtype or g.dtype == torch.float32 else g.float()
                      for p, g in zip(taken.params, grads)]
            if any(g is not h for g, h in zip(grads, upcast)):
                grads, g_dtypes, read = upcast, list(map(_DTYPE, upcast)), None  # new grads: their pointers read here
        table = _kind_table(_ROUNDING_KIND[group.param_rounding] | (_CAUTIOUS if group.cautious else 0))
        kinds.append(np.fromiter(map(table.__getitem__, zip(p_dtypes, g_dtypes, m_dtypes)), np.int32, n))
        members.append(np.full(n, index, dtype=np.int32))
        seed_rows.append(np.zeros((n, 2), dtype=np.int32) if taken.seeds is None else taken.seeds.numpy())
        group_scales = taken.scales()
        if read is None:
            residuals = [p if c is None else c for p, c in zip(taken.params, taken.kahan_comps)]  # the kernel
            scale_tensors = [p if s is None else s for p, s in zip(taken.params, group_scales)]  # reads only real ones
            column = np.fromiter(map(Tensor.data_ptr, [*taken.params, *grads, *taken.exp_avgs, *residuals,
                                                       *scale_tensors]), np.int64, 5 * n).reshape(5, n)
        else:
            column = np.empty((5, n), dtype=np.int64)
            column[:3] = read[:3 * n].reshape(3, n)
            column[3:] = column[0]  # where there is no residual or scale, the param's (never read)
            stored = 3 * n
            for row, optional in ((3, taken.kahan_comps), (4, group_scales)):
                present = [t is not None for t in optional]
                if True in present:
                    count = present.count(True)
                    column[row, np.flatnonzero(present)] = read[stored:stored + count]
                    stored += count
        columns.append(column)
        ps += taken.params
        gs += grads
        ms += taken.exp_avgs
        cs += taken.kahan_comps
        scales += group_scales
    n = len(ps)
    if n == 0:
        return lefts
    pointers = np.ascontiguousarray(columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1))
    numels = np.fromiter(map(Tensor.numel, ps), np.int64, n)
    kind_array = kinds[0] if len(kinds) == 1 else np.concatenate(kinds)
    member_array = members[0] if len(members) == 1 else np.concatenate(members)
    seeds = seed_rows[0] if len(seed_rows) == 1 else np.concatenate(seed_rows)
    seeds = np.ascontiguousarray(seeds, dtype=np.int32)
    address = pointers.ctypes.data  # params, grads, momenta, residuals, scales: n pointers each
    unknown = function(n, address, address + 8 * n, address + 16 * n, address + 24 * n, address + 32 * n,
                       numels.ctypes.data,
                       kind_array.ctypes.data, member_array.ctypes.data, seeds.ctypes.data, hyper.ctypes.data,
                       skip_nonfinite, torch.get_num_threads())
    if unknown:  # _kind and the kernel disagree: a bug here, never a silent no-op
        raise RuntimeError(f"Lion: the cpp kernel does not know {unknown} tensor kind(s) of "
                           f"{sorted(set(kind_array.tolist()))}")
    # Written through raw pointers, which autograd cannot see: bump the version counters as an
    # in-place op would (a stale saved tensor is then caught, as in the other impls).
    increment_version([*ps, *ms, *[c for c in cs if c is not None], *[s for s in scales if s is not None]])
    return lefts


# --------------------------------------------------------------------------------------
# DistributedLion's two passes (lion_hf_dist_signs, lion_hf_dist_apply)
# --------------------------------------------------------------------------------------


def _vote_arguments(groups: list[StepGroup]) -> tuple | None:
    """The two passes' arguments when the kernel takes the whole step (every tensor a contiguous
    fp32 CPU tensor; the dispatcher has already sent a step whose tensors overlap to for_loop),
    else None: then the step runs in foreach, with the same arithmetic and the same bytes."""
    columns = [[t for group in groups for t in getattr(group, name)] for name in ("params", "grads", "exp_avgs")]
    if not columns[0]:
        return None
    tensors = [t for column in columns for t in column]
    if (set(map(_DTYPE, tensors)) != {torch.float32} or set(map(Tensor.get_device, tensors)) != {-1}
            or not all(map(Tensor.is_contiguous, tensors))):
        return None
    kernels = sign_vote_kernels()
    if kernels is None:
        return None
    n = len(columns[0])
    pointers = np.fromiter((t.data_ptr() for column in columns for t in column), np.int64, 3 * n)
    numels = np.fromiter(map(Tensor.numel, columns[0]), np.int64, n)
    members = np.array([i for i, group in enumerate(groups) for _ in group.params], dtype=np.int32)
    signs_hyper = np.array([(g.beta1, 1.0 - g.beta1, -1.0 if g.maximize else 1.0) for g in groups], dtype=np.float32)
    apply_hyper = np.array([(g.lr, g.decay, g.beta2, 1.0 - g.beta2, -1.0 if g.maximize else 1.0) for g in groups],
                           dtype=np.float32)
    return kernels, n, pointers, numels, members, signs_hyper, apply_hyper, columns


def cpp_signs(groups: list[StepGroup], out: Tensor, *, zero_nonfinite: bool, count_nonfinite: bool) -> int | None:
    """Pass 1: the packed signs of the step's ``c`` written to ``out`` (uint8, CPU, the bytes after
    the header); returns the number of non-finite gradient elements (0 unless ``count_nonfinite``),
    or None when the kernel does not take the step (nothing written)."""
    arguments = _vote_arguments(groups)
    if arguments is None:
        return None
    (signs, _), n, pointers, numels, members, signs_hyper, _, _ = arguments
    address = pointers.ctypes.data
    return int(signs(n, address + 8 * n, address + 16 * n, numels.ctypes.data, members.ctypes.data,
                     signs_hyper.ctypes.data, zero_nonfinite, count_nonfinite, out.data_ptr(),
                     torch.get_num_threads()))


def cpp_vote_apply(groups: list[StepGroup], gathered: Tensor, offset: int, *, average: bool,
                   keep_nonfinite_momentum: bool) -> bool:
    """Pass 2: every rank's packed signs (``gathered``: (world size, bytes per rank) uint8, the
    signs at byte ``offset`` of each row) summed and voted, and the step applied. False when the
    kernel does not take the step (nothing changed)."""
    arguments = _vote_arguments(groups)
    if arguments is None:
        return False
    (_, apply), n, pointers, numels, members, _, apply_hyper, columns = arguments
    world = gathered.shape[0]
    address = pointers.ctypes.data
    apply(n, address, address + 8 * n, address + 16 * n, numels.ctypes.data, members.ctypes.data,
          apply_hyper.ctypes.data, gathered.data_ptr() + offset, world, gathered.shape[1], average, 1.0 / world,
          keep_nonfinite_momentum, torch.get_num_threads())
    # Written through raw pointers: bump the version counters as an in-place op would.
    increment_version(columns[0] + columns[2])
    return True
