"""The ``cpp`` impl of Lion: one call of a C++ kernel over every fp32 or bf16 tensor of a step, on the CPU.

``cpu_kernel.cpp`` is built at first use with the system's C++ compiler (g++, ~2 s) into a
cache directory (``$LION_HF_CACHE``, else ``~/.cache/lion_hf``; the file name carries a hash of
the source, the compiler's path and version, its flags and the CPU's feature flags, since it is
built for this CPU with ``-march=native``), and called through ctypes with arrays of data
pointers. One call updates all tensors: the compiled impl needs one call per 16 tensors, with
Python around each. The step as ``LionTrainer`` builds it was 0.74-0.78x torch's fused AdamW on
all-MiniLM-L6-v2 and 0.72-0.75x on BERT-base over four runs (2-core CPU, README benchmark), the
compiled one 0.76-0.85x.

The kernel takes plain, contiguous CPU tensors: an fp32 or bf16 param with a grad of its dtype,
an fp32 or bf16 momentum, no Kahan residual. A bf16 value is stored by stochastic rounding (the
momentum always; the param under ``param_rounding="stochastic"``) or round-to-nearest, with
the same hash and the same draws of seeds as ``impl="for_loop"``: when it takes every tensor of
a call, it equals that impl bit for bit given the same generator state (with tensors that run
elsewhere the seeds are drawn in another order). The rest of a step (fp16 params, a grad of
another dtype than its param, Kahan residuals, strided or subclass tensors) runs as
``impl="auto"`` would run it without this impl: ``compiled`` when the call (a param group on one
device) has at least :data:`~lion_hf.optim.lion.AUTO_COMPILE_MIN_NUMEL` elements, else
``foreach``; so do calls whose tensors overlap in memory (the kernel's threads would race on
them). If the build fails, a warning says why and this and every later step run with those impls;
:func:`~lion_hf.optim.lion.impl_unavailable` then reports the failure.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lion_hf.optim import lion as _lion

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -ffp-contract=off: no product is fused into an FMA, so every result rounds as torch's separate
# ops round it (the step is bit for bit impl="for_loop"'s). -march=native: vectorised for this CPU.
# -fno-trapping-math: nothing reads floating-point exception flags, and without it g++ leaves
# the cautious update's loop scalar (20x slower); it changes no value (no reassociation).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-shared",
         "-fPIC")

# Set when the kernel failed to build in this process; later steps use the other impls.
build_failure: Exception | None = None
_kernel: Callable[..., None] | None = None

_P = ctypes.c_void_p
_ARGTYPES = [ctypes.c_int64, *[_P] * 6, *[ctypes.c_float] * 6, *[ctypes.c_int] * 4]


def cache_dir() -> Path:
    root = os.environ.get("LION_HF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_hf"


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cxx: str) -> Path:
    digest = hashlib.sha256()
    parts = (SOURCE.read_bytes(), cxx.encode(), _compiler_version(cxx).encode(), " ".join(FLAGS).encode(),
             _cpu_features().encode())
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"lion_cpu_kernel_{digest.hexdigest()[:20]}.so"


def build() -> Path:
    """Build the kernel's shared library unless the cache holds it already; its path. Raises
    RuntimeError with the compiler's output if it fails. Processes that build at once (ranks of
    one job) each write their own file and rename it into place, so none loads a partial one."""
    cxx = _lion.cxx_compiler()
    if cxx is None:
        raise RuntimeError("impl='cpp' needs a C++ compiler (g++) on the PATH, or $CXX")
    path = library_path(cxx)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        # A bound, so that a hung compiler cannot hang training (it takes ~2 s).
        result = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, path)
    return path


def _load() -> Callable[..., None] | None:
    """The kernel, built and loaded at the first call; None once building or loading failed."""
    global _kernel, build_failure
    if _kernel is None and build_failure is None:
        try:
            function = ctypes.CDLL(str(build())).lion_hf_cpu_step
        except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as exc:
            build_failure = exc
            warnings.warn(f"Lion: impl='cpp' is unavailable ({exc}); this and later steps use impl='compiled' or "
                          "'foreach'", stacklevel=4)
            return None
        function.argtypes = _ARGTYPES
        function.restype = ctypes.c_int64  # tensors of a kind it does not know (nothing was updated)
        _kernel = function
    return _kernel


# The kernel's tensor kinds (cpu_kernel.cpp) by (param, grad, momentum) dtypes; a bf16 param
# stored by stochastic rounding adds _PARAM_STOCHASTIC.
_KINDS = {
    (torch.float32, torch.float32, torch.float32): 0,
    (torch.float32, torch.float32, torch.bfloat16): 2,
    (torch.bfloat16, torch.bfloat16, torch.float32): 1,
    (torch.bfloat16, torch.bfloat16, torch.bfloat16): 3,
}
_BF16_PARAM, _BF16_MOMENTUM, _PARAM_STOCHASTIC = 1, 2, 4


def _kind(p: Tensor, g: Tensor, m: Tensor, c: Tensor | None, param_stochastic: bool) -> int:
    """The kernel's kind for this param, or -1 where it does not take it: plain contiguous CPU
    tensors, fp32 or bf16 (the grad of the param's dtype), no Kahan residual."""
    plain = _lion._PLAIN_TENSOR_TYPES
    if not (c is None and type(p) in plain and type(g) in plain and type(m) in plain
            and p.is_cpu and g.is_cpu and m.is_cpu
            and p.is_contiguous() and g.is_contiguous() and m.is_contiguous()):
        return -1
    kind = _KINDS.get((p.dtype, g.dtype, m.dtype), -1)
    if kind >= 0 and kind & _BF16_PARAM and param_stochastic:
        kind |= _PARAM_STOCHASTIC
    return kind


def _run_elsewhere(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   kahan_comps: list[Tensor | None], call_numel: int, **kwargs) -> None:
    """What the kernel does not take, run as ``impl="auto"`` would run it without ``cpp``:
    ``compiled`` when the call (a param group on one device, under :class:`Lion`) has at least
    ``AUTO_COMPILE_MIN_NUMEL`` elements, else ``foreach``."""
    use_compiled = (call_numel >= _lion.AUTO_COMPILE_MIN_NUMEL
                    and _lion.impl_unavailable("compiled", params[0].device) is None)
    run = _lion._IMPL_FUNCTIONS["compiled" if use_compiled else "foreach"]
    run(params, grads, exp_avgs, kahan_comps, **kwargs)


def _overlapping(pointers: np.ndarray, nbytes: np.ndarray) -> bool:
    """Whether any two of these non-empty memory ranges overlap: a param listed twice, a grad
    that is its param, overlapping views. The kernel's threads would then race on one element
    (and its ``__restrict`` promise would not hold), so such a call runs elsewhere."""
    nonempty = nbytes > 0
    starts = pointers[nonempty]
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], starts[order] + nbytes[nonempty][order]
    return bool((ends[:-1] > starts[1:]).any())


def _seeds(kinds: np.ndarray, numels: np.ndarray) -> np.ndarray:
    """Stochastic-rounding seeds, [param, momentum] per tensor, drawn from torch's default
    generator in the order impl="for_loop" draws them (a non-empty tensor's param seed, then its
    momentum seed), so that with the same generator state the two impls round alike. None is
    drawn for an all-fp32 step."""
    nonempty = numels > 0
    needed = np.stack([((kinds & _PARAM_STOCHASTIC) != 0) & nonempty, ((kinds & _BF16_MOMENTUM) != 0) & nonempty],
                      axis=1)
    seeds = np.zeros(needed.shape, dtype=np.int32)
    count = int(needed.sum())
    if count:
        # One draw of `count` values is the same sequence as `count` draws of one (_new_seed),
        # from the same generator: that of torch's default device, as _new_seed draws.
        seeds[needed] = torch.randint(0, 1 << 16, (count,)).cpu().numpy()
    return seeds


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
) -> None:
    """The ``cpp`` step: one kernel call over the tensors it takes (:func:`_kind`), the rest
    through :func:`_run_elsewhere`. Raises ValueError for a grad or momentum whose shape is not
    its param's (the kernel reads all three with the param's length)."""
    kwargs = dict(lr=lr, decay=decay, beta1=beta1, beta2=beta2, maximize=maximize, cautious=cautious,
                  skip_nonfinite=skip_nonfinite, param_rounding=param_rounding)
    kernel = _load()
    if kernel is None:
        _run_elsewhere(params, grads, exp_avgs, kahan_comps, sum(map(Tensor.numel, params)), **kwargs)
        return
    stochastic = param_rounding == "stochastic"
    all_kinds = [_kind(*ts, stochastic) for ts in zip(params, grads, exp_avgs, kahan_comps)]
    takes = [k >= 0 for k in all_kinds]
    if all(takes):
        ps, gs, ms, kinds = params, grads, exp_avgs, all_kinds
    else:
        ps, gs, ms, kinds = ([t for t, ok in zip(ts, takes) if ok] for ts in (params, grads, exp_avgs, all_kinds))
    n = len(ps)
    if n:
        shapes = list(map(Tensor.size, ps))
        if shapes != list(map(Tensor.size, gs)) or shapes != list(map(Tensor.size, ms)):
            i = next(i for i, (p, g, m) in enumerate(zip(ps, gs, ms)) if not p.shape == g.shape == m.shape)
            raise ValueError(f"Lion: a param of shape {tuple(ps[i].shape)} has a grad of shape {tuple(gs[i].shape)} "
                             f"and a momentum of shape {tuple(ms[i].shape)}")
        tensors = [*ps, *gs, *ms]
        numels = np.fromiter(map(Tensor.numel, tensors), np.int64, 3 * n)
        pointers = np.fromiter(map(Tensor.data_ptr, tensors), np.int64, 3 * n)
        kind_array = np.array(kinds, dtype=np.int32)
        p_bytes = np.where(kind_array & _BF16_PARAM, 2, 4)
        m_bytes = np.where(kind_array & _BF16_MOMENTUM, 2, 4)
        if _overlapping(pointers, numels * np.concatenate([p_bytes, p_bytes, m_bytes])):
            takes, n = [False] * len(params), 0
        else:
            seeds = _seeds(kind_array, numels[:n])
            address = pointers.ctypes.data  # p, g, m pointers, then the params' lengths (the first n numels)
            unknown = kernel(n, address, address + 8 * n, address + 16 * n, numels.ctypes.data,
                             kind_array.ctypes.data, seeds.ctypes.data, lr, decay, beta1, 1.0 - beta1, beta2,
                             1.0 - beta2, maximize, cautious, skip_nonfinite, torch.get_num_threads())
            if unknown:  # _kind and the kernel disagree: a bug here, never a silent no-op
                raise RuntimeError(f"Lion: the cpp kernel does not know {unknown} tensor kind(s) of "
                                   f"{sorted(set(kinds))}")
            # Written through raw pointers, which autograd cannot see: bump the version counters
            # as an in-place op would (a stale saved tensor is then caught, as in the other impls).
            increment_version([*ps, *ms])
    if n < len(params):  # counted only here: the common step hands every tensor to the kernel
        rest = [i for i, ok in enumerate(takes) if not ok]
        _run_elsewhere(*([ts[i] for i in rest] for ts in (params, grads, exp_avgs, kahan_comps)),
                       sum(map(Tensor.numel, params)), **kwargs)
