"""Which impl runs a step, and the one path every step takes to it.

:func:`resolve_impl` is the one function that decides which implementation runs on a device
(``auto``: ``triton`` on CUDA, ``cpp`` on the CPU, ``foreach`` wherever those cannot run), and
:func:`impl_unavailable` the one that says why an impl cannot run. :func:`run_step` is the path
of every step, from ``Lion.step`` and from the functional ``lion()``: it takes the local shards
of DTensors, makes grads readable (zero tensors, negated views), checks the tensors for every impl
alike (shapes, dtypes, devices, memory that is really there), checks an explicit impl again for
each device, runs the ``skip_step`` / ``raise`` gate, draws the stochastic-rounding seeds, splits
the tensors by device, and runs each device's impl. The one rule for what a fused kernel does not
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
from typing import Any

import torch

from lion_hf.optim.cpu_kernel_build import cxx_compiler
from lion_hf.optim.for_loop import for_loop_lion
from lion_hf.optim.foreach import foreach_lion
from lion_hf.optim.numerics import PLAIN_TENSOR_TYPES, StepGroup, local, step_may_proceed, with_seeds
from lion_hf.optim.validation import check_step_tensors, overlapping, readable_grads

__all__ = ["IMPLS", "impl_unavailable", "resolve_impl", "run_step"]

IMPLS = ("auto", "for_loop", "foreach", "cpp", "triton")


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
        hint = " (the torch.compile impl was removed: 'cpp' is the CPU kernel)" if impl == "compiled" else ""
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}{hint}")
    device = torch.device(device)
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
    return resolve_impl(impl, device)


def run_step(groups: list[StepGroup], *, impl: str, skip_nonfinite: bool, nonfinite_grad: str | None = None,
             grad_norm: float | torch.Tensor | None = None) -> bool:
    """One step over the groups' tensors (hyperparameters already validated). ``impl`` may be
    ``auto`` (resolved per device) or an explicit impl, checked again here for each device the
    tensors are on (a model moved with ``.cuda()`` after ``Lion(..., impl="cpp")`` was built is a
    RuntimeError, not a kernel reading device memory); a kernel that turns out unusable at run
    time (the C++ build failed) leaves its tensors to ``foreach``.

    The tensors are checked first, then, under ``nonfinite_grad`` "skip_step" or "raise", the
    non-finite gate runs (:func:`~lion_hf.optim.numerics.step_may_proceed`, with ``grad_norm``
    when the caller has it); returns False when it skipped the step, else True."""
    gate_grads = [g for group in groups for g in group.grads]  # DTensors kept: the gate agrees over their mesh
    groups = [_local(group) for group in groups if group.params]
    devices: dict[torch.device, None] = {}  # ordered: the first group's device first
    for group in groups:
        devices.update(dict.fromkeys(check_step_tensors(group.params, group.grads, group.exp_avgs,
                                                        group.kahan_comps, group.param_rounding)))
    concrete_impls = {device: resolve_impl(impl, device) if impl == "auto"
                      else _explicit_impl_checked(impl, device, os.environ.get("CXX")) for device in devices}
    if nonfinite_grad in ("skip_step", "raise"):
        if not step_may_proceed(nonfinite_grad, gate_grads, grad_norm):
            return False
        skip_nonfinite = False  # all finite: the masked path would change nothing
    if not groups:
        return True
    groups = with_seeds(groups)
    for device, concrete in concrete_impls.items():
        if len(devices) == 1:
            on_device = groups
        else:
            on_device = [group.subset([i for i, p in enumerate(group.params) if p.device == device])
                         for group in groups]
            on_device = [group for group in on_device if group.params]
        # Tensors that share memory update one after the other, whichever impl was asked for: one
        # check over every tensor of the step on this device, by their strided extents.
        if concrete != "for_loop" and overlapping(
                [t for group in on_device for ts in group[:4] for t in ts if t is not None]):
            for_loop_lion(on_device, skip_nonfinite=skip_nonfinite)
            continue
        lefts = _IMPL_FUNCTIONS[concrete](on_device, skip_nonfinite=skip_nonfinite)
        rest = [group.subset(left) for group, left in zip(on_device, lefts) if left]
        if rest:
            foreach_lion(rest, skip_nonfinite=skip_nonfinite)
    return True
