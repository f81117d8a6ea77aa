"""``impl="cpp"``: one call of a C++ kernel (``cpu_kernel.cpp``) over every CPU tensor of a step.

The kernel takes plain contiguous CPU tensors of every kind the other impls take: fp32, bf16 and
fp16 params (a grad of the param's dtype, or any other float grad, which is upcast to fp32 as
:func:`~lion_hf.optim.numerics.lion_tensor` upcasts it), fp32 or bf16 momenta, each
``param_rounding`` (Kahan residuals included). Given the same seeds it computes the step of
``impl="for_loop"`` bit for bit. What it does not take, it leaves to the dispatcher, which runs
it with ``foreach`` (one rule, in ``dispatch``): a tensor that is not contiguous (of param, grad,
momentum or residual). The dispatcher never hands it tensors that overlap in memory, on which
the kernel's threads would race.

The library is built and loaded by :mod:`~lion_hf.optim.cpu_kernel_build`. If that fails, a
warning says why, this process records the failure (``build_failure``), and ``dispatch`` then
stops choosing this impl.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lion_hf.optim import cpu_kernel_build

__all__ = ["build_failure", "cpp_lion", "kernel"]

# Set when the kernel failed to build or load in this process; ``dispatch`` reads it.
build_failure: Exception | None = None
_kernel: Callable[..., int] | None = None

_P = ctypes.c_void_p
_ARGTYPES = [ctypes.c_int64, *[_P] * 7, *[ctypes.c_float] * 6, *[ctypes.c_int] * 4]

# The kernel's tensor kinds (cpu_kernel.cpp): param dtype, grad fp32 although the param is not,
# bf16 momentum, and how a bf16/fp16 param is stored.
_PARAM_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_GRAD_FP32, _MOMENTUM_BF16 = 4, 8
_ROUNDING_KIND = {"nearest": 0, "stochastic": 1 << 4, "kahan": 2 << 4}


def kernel() -> Callable[..., int] | None:
    """The kernel function, built and loaded at the first call; None once that failed."""
    global _kernel, build_failure
    if _kernel is None and build_failure is None:
        try:
            function = cpu_kernel_build.load_library().lion_hf_cpu_step
        except (RuntimeError, OSError, AttributeError) as exc:
            build_failure = exc
            warnings.warn(f"Lion: impl='cpp' is unavailable ({exc}); this and later steps use impl='foreach'",
                          stacklevel=5)
            return None
        function.argtypes = _ARGTYPES
        function.restype = ctypes.c_int64  # tensors of a kind it does not know (nothing was updated)
        _kernel = function
    return _kernel


def _kind(p: Tensor, g: Tensor, m: Tensor, c: Tensor | None, rounding: int) -> int:
    """The kernel's kind for a param whose grad is already its dtype or fp32."""
    kind = _PARAM_KIND[p.dtype]
    if kind:
        kind |= rounding | (_GRAD_FP32 if g.dtype != p.dtype else 0)
    return kind | (_MOMENTUM_BF16 if m.dtype == torch.bfloat16 else 0)


def cpp_lion(
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
    seeds: Tensor | None,
) -> list[int]:
    """One kernel call over the tensors it takes; returns the indices of those it left (see the
    module docstring), which it has not touched. Tensors are plain, local and checked by the
    dispatcher; ``seeds`` as :func:`~lion_hf.optim.numerics.draw_seeds` draws them."""
    function = kernel()
    n_all = len(params)
    if function is None:
        return list(range(n_all))
    contiguous = [p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and (c is None or c.is_contiguous())
                  for p, g, m, c in zip(params, grads, exp_avgs, kahan_comps)]
    if all(contiguous):
        taken, left = list(range(n_all)), []
    else:
        taken = [i for i, ok in enumerate(contiguous) if ok]
        left = [i for i, ok in enumerate(contiguous) if not ok]
        params, grads, exp_avgs, kahan_comps = ([ts[i] for i in taken] for ts in (params, grads, exp_avgs, kahan_comps))
    n = len(params)
    if n == 0:
        return left
    # A grad of a third dtype is upcast as lion_tensor upcasts it (fp32 from bf16/fp16 is exact).
    grads = [g if g.dtype == p.dtype or g.dtype == torch.float32 else g.float() for p, g in zip(params, grads)]
    rounding = _ROUNDING_KIND[param_rounding]
    kinds = np.fromiter((_kind(p, g, m, c, rounding) for p, g, m, c in zip(params, grads, exp_avgs, kahan_comps)),
                        np.int32, n)
    residuals = [p if c is None else c for p, c in zip(params, kahan_comps)]  # the kernel reads only real ones
    tensors = [*params, *grads, *exp_avgs, *residuals]
    pointers = np.fromiter(map(Tensor.data_ptr, tensors), np.int64, 4 * n)
    numels = np.fromiter(map(Tensor.numel, params), np.int64, n)
    written = [*params, *exp_avgs, *[c for c in kahan_comps if c is not None]]
    if seeds is None:
        seed_array = np.zeros((n, 2), dtype=np.int32)
    else:
        seed_array = np.ascontiguousarray(seeds.numpy()[taken] if left else seeds.numpy())
    address = pointers.ctypes.data  # params, grads, momenta, residuals: n pointers each
    unknown = function(n, address, address + 8 * n, address + 16 * n, address + 24 * n, numels.ctypes.data,
                       kinds.ctypes.data, seed_array.ctypes.data, lr, decay, beta1, 1.0 - beta1, beta2,
                       1.0 - beta2, maximize, cautious, skip_nonfinite, torch.get_num_threads())
    if unknown:  # _kind and the kernel disagree: a bug here, never a silent no-op
        raise RuntimeError(f"Lion: the cpp kernel does not know {unknown} tensor kind(s) of {sorted(set(kinds))}")
    # Written through raw pointers, which autograd cannot see: bump the version counters as an
    # in-place op would (a stale saved tensor is then caught, as in the other impls).
    increment_version(written)
    return left
