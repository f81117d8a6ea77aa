"""Validation of everything that enters a Lion step: options, hyperparameters, loaded state and tensors.

One function checks a param group's hyperparameters and options, :func:`validate_group`, and every
place they enter calls it: ``Lion.__init__`` (the defaults), ``add_param_group``,
``load_state_dict`` and the functional ``lion()``. A step then runs only
:func:`check_step_scalars`, a few float comparisons per group that catch what a scheduler or
a user changed since (``group["lr"] = nan``). :func:`check_step_tensors` checks the tensors of
a step for every impl alike, so that a bad input is the same ``ValueError`` whichever impl
would have run.

Every hyperparameter is checked for what the kernels compute with: they hold lr, the decay
factor ``1 - lr * weight_decay`` and the betas in float32, so lr, weight_decay and their product
must be finite in float32 (at most about 3.4e38), on every door: the constructor,
``add_param_group``, a value set mid-run (the per-step check) and ``load_state_dict``.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lion_hf.optim.numerics import EIGHT_BIT_MAX_CODE, PARAM_DTYPES, eight_bit_scale_numel, ranges_overlap
from lion_hf.optim.options import IMPLS, NONFINITE_POLICIES, PARAM_ROUNDINGS, STATE_DTYPES

__all__ = [
    "StepMemory",
    "as_float",
    "check_eight_bit_state",
    "check_loaded_state",
    "check_loaded_state_dict",
    "check_step_scalars",
    "check_step_tensors",
    "overlapping",
    "readable_grads",
    "spans",
    "validate_group",
    "validate_options",
    "validate_param",
]

_MOMENTUM_DTYPES = tuple(STATE_DTYPES.values())
_MOMENTUM_DTYPE_SET, _PARAM_DTYPE_SET = frozenset(_MOMENTUM_DTYPES), frozenset(PARAM_DTYPES)
# Param-group keys of torch's other optimizers (Adam/AdamW, SGD, ...) that Lion's groups never hold:
# a group is refused with one (Lion(..., [{"params": ..., "eps": 1e-8}]) would silently ignore it), so
# that a checkpoint holding one always comes from another optimizer.
_OTHER_OPTIMIZERS_GROUP_KEYS = frozenset({"eps", "amsgrad", "momentum", "dampening", "nesterov", "capturable",
                                          "decoupled_weight_decay", "lr_decay", "initial_accumulator_value"})
_HYPERPARAMETERS = ("lr", "betas", "weight_decay")
_DTYPE, _LAYOUT, _IS_META, _NBYTES = (operator.attrgetter(name) for name in ("dtype", "layout", "is_meta",
                                                                              "nbytes"))
# The largest finite float32: the kernels compute with lr, weight_decay and 1 - lr * weight_decay in float32,
# and a larger value is inf there (the weights then become inf or NaN without any error).
_FP32_MAX = float(np.finfo(np.float32).max)
_GROUP_KEYS = ("lr", "betas", "weight_decay", "maximize", "cautious", "state_dtype", "param_rounding")


class StepMemory(NamedTuple):
    """Where the tensors of one group's step lie, as :func:`check_step_tensors` read them: the
    ``data_ptr`` (``starts``) and strided extent in bytes (``extents``, :func:`spans`) of each
    param, then each grad, each momentum, each Kahan residual there is and each block scale tensor
    there is, in that order; whether every param, grad, momentum and residual is contiguous; and
    the dtypes of the params, the grads and the momenta. Read once per step, for the seeds, the
    step's overlap check and the C++ kernel's pointers and kinds, by the caller that holds these
    very tensors until they are stepped."""

    starts: np.ndarray
    extents: np.ndarray
    contiguous: bool
    dtypes: tuple[list[torch.dtype], list[torch.dtype], list[torch.dtype]]


def as_float(value: Any, what: str) -> float:
    """``value`` as a float: a Python or numpy number, or a 1-element tensor or numpy array, as
    torch's own optimizers accept; a bool is refused (``lr=True`` is a bug, not 1.0)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{what} must be a real number or a 1-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        return float(value)
    if isinstance(value, np.ndarray):  # 0-d or 1-element, as torch's optimizers take them
        if value.size != 1 or value.dtype.kind not in "iuf":
            raise ValueError(f"{what} must be a real number or a 1-element array, got an array of shape "
                             f"{value.shape} and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's bool is no numbers.Real
        raise ValueError(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _in_group(index: int | None) -> str:
    return "Lion: " if index is None else f"Lion: param group {index}: "


def _missing_keys(group: dict[str, Any], index: int | None) -> None:
    missing = [key for key in _GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"{_in_group(index)}has no {', '.join(map(repr, missing))}: every Lion param group holds "
                         f"{', '.join(_GROUP_KEYS)} (was a key deleted from optimizer.param_groups?)")


def _hyperparameters(group: dict[str, Any], index: int | None) -> tuple[float, tuple[float, float], float]:
    where = _in_group(index)
    lr = as_float(group["lr"], f"{where}lr")
    if not math.isfinite(lr) or lr < 0 or lr > _FP32_MAX:
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr!r} (finite in float32, in which the "
                         f"kernels compute: at most {_FP32_MAX:.8g})")
    betas = group["betas"]
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (as_float(b, f"{where}betas[{i}]") for i, b in enumerate(betas))
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}betas: {name} must be in [0, 1), got {beta!r}")
    weight_decay = as_float(group["weight_decay"], f"{where}weight_decay")
    if not math.isfinite(weight_decay) or weight_decay < 0 or weight_decay > _FP32_MAX:
        raise ValueError(f"{where}weight_decay must be a finite number >= 0, got {weight_decay!r} (finite in "
                         f"float32, in which the kernels compute: at most {_FP32_MAX:.8g})")
    if lr * weight_decay > _FP32_MAX:
        raise ValueError(f"{where}lr * weight_decay = {lr * weight_decay!r} (lr {lr!r}, weight_decay {weight_decay!r}) "
                         f"is not finite in float32 (at most {_FP32_MAX:.8g}): the decay factor 1 - lr * weight_decay "
                         "would be -inf in the kernels")
    return lr, (beta1, beta2), weight_decay


def _warn_sign_flipping_decay(where: str, stacklevel: int) -> None:
    # One text per group (no value in it): Python's default warning filter then shows it once per
    # group and call site, however often a scheduler changes lr, as torch's own warnings behave.
    warnings.warn(f"{where}lr * weight_decay >= 1: the decay factor 1 - lr * weight_decay is <= 0 and flips the "
                  "weights' sign every step. Lion's weight_decay is multiplied by lr (decoupled, as in AdamW): use a "
                  "smaller one.", stacklevel=stacklevel + 1)


def validate_options(impl: Any = None, nonfinite_grad: Any = None) -> None:
    """The optimizer-wide options (not part of any param group), against ``options.OPTIONS``."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"Lion: impl must be one of {IMPLS}, got {impl!r}")
    if nonfinite_grad is not None and nonfinite_grad not in NONFINITE_POLICIES:
        raise ValueError(f"Lion: nonfinite_grad must be one of {NONFINITE_POLICIES}, got {nonfinite_grad!r}")


def validate_group(group: dict[str, Any], index: int | None = None, *, warn_decay: bool = True) -> dict[str, Any]:
    """Check a param group's hyperparameters and options (lr, betas, weight_decay, maximize,
    cautious, state_dtype, param_rounding: every key present; another optimizer's option such as
    ``eps`` is refused); returns the group with lr, betas and weight_decay as floats. A bad value
    is a ValueError naming the group, the key and the value; a missing key is a ValueError naming
    it. Warns when ``lr * weight_decay >= 1`` (unless ``warn_decay`` is False): the decay factor
    ``1 - lr * weight_decay`` is then zero or negative, which flips the weights' sign every step
    instead of shrinking them."""
    where = _in_group(index)
    foreign = sorted(set(group) & _OTHER_OPTIMIZERS_GROUP_KEYS)
    if foreign:
        raise ValueError(f"{where}{', '.join(map(repr, foreign))} is an option of other optimizers (AdamW, SGD, ...), "
                         "not Lion's (no epsilon, no amsgrad, no momentum term): remove it from the param group")
    _missing_keys(group, index)
    lr, betas, weight_decay = _hyperparameters(group, index)
    for key in ("maximize", "cautious"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{where}{key} must be True or False, got {group[key]!r}")
    if group["state_dtype"] not in STATE_DTYPES:
        raise ValueError(f"{where}state_dtype must be one of {tuple(STATE_DTYPES)}, got {group['state_dtype']!r}")
    if group["param_rounding"] not in PARAM_ROUNDINGS:
        raise ValueError(f"{where}param_rounding must be one of {PARAM_ROUNDINGS}, got {group['param_rounding']!r}")
    if lr * weight_decay >= 1.0 and warn_decay:
        _warn_sign_flipping_decay(where, stacklevel=4)
    return {**group, "lr": lr, "betas": betas, "weight_decay": weight_decay}


def check_step_scalars(groups: list[dict[str, Any]]) -> None:
    """The per-step check: each group's lr, betas and weight decay are still in range and finite in
    float32 (a buggy scheduler can set NaN or 1e39), its options are still valid and none of its
    keys was deleted (a ValueError naming the group and the key). Warns, as the constructor does,
    when a group's ``lr * weight_decay`` is now >= 1 (the same text per group: Python's default
    warning filter shows it once per group). Plain float comparisons; the full
    :func:`validate_group` runs only where a bad value names its cause."""
    for index, group in enumerate(groups):
        try:
            lr, betas, weight_decay = group["lr"], group["betas"], group["weight_decay"]
            # A tuple of two floats, else validate_group names what is wrong (a betas of length 3 included).
            ok = type(betas) is tuple and len(betas) == 2 and type(betas[0]) is float and type(betas[1]) is float
            ok = (ok and type(lr) is float and type(weight_decay) is float
                  and 0.0 <= lr <= _FP32_MAX and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0
                  and 0.0 <= weight_decay <= _FP32_MAX and lr * weight_decay <= _FP32_MAX
                  and type(group["maximize"]) is bool and type(group["cautious"]) is bool
                  and group["param_rounding"] in PARAM_ROUNDINGS and group["state_dtype"] in STATE_DTYPES)
        except KeyError:
            ok = False
        if not ok:  # raises naming the key, or accepts another real number type as a float
            group.update(validate_group(group, index, warn_decay=False))
        if group["lr"] * group["weight_decay"] >= 1.0:
            _warn_sign_flipping_decay(_in_group(index), stacklevel=3)


def validate_param(p: Any) -> None:
    if not isinstance(p, Tensor):
        raise ValueError(f"Lion: params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("Lion does not support complex parameters (sign() of a complex number is not defined here)")
    if p.dtype not in PARAM_DTYPES:
        raise ValueError(f"Lion: params must be float32, bfloat16 or float16, got {p.dtype}")


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a stride-0 or interleaved view): a sufficient
    test for no overlap is that each stride, in increasing order, passes the extent of the ones
    before it."""
    if t.is_contiguous():
        return False
    extent = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def _first(bad: list[bool]) -> int:
    return bad.index(True)


def spans(tensors: list[Tensor]) -> np.ndarray:
    """Each tensor's extent in bytes from its ``data_ptr``: from its first element to the end of
    its last one along its strides, ``((size - 1) * stride summed over dims + 1) * itemsize``
    (0 when empty). More than ``numel * itemsize`` for a strided view (a sliced column)."""
    sizes = np.fromiter(map(_NBYTES, tensors), np.int64, len(tensors))
    if not all(map(Tensor.is_contiguous, tensors)):
        for i, t in enumerate(tensors):
            if t.numel() and not t.is_contiguous():
                sizes[i] = (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
    return sizes


def _which(name: str, i: int) -> str:
    return f"param {i}" if name == "param" else f"the {name} of param {i}"


def _check_memory(name: str, tensors: list[Tensor], indices: list[int] | None = None) -> None:
    """Every non-empty tensor lies inside memory it owns: the kernels read and write through raw
    pointers, so a tensor whose storage was freed (``untyped_storage().resize_(0)``, data_ptr 0)
    or shrunk below its strided extent would crash the process or corrupt other memory, and a
    zero tensor or a lazily negated view (``torch._neg_view``) does not hold its values in memory
    at all. A grad that is one was made readable before (:func:`readable_grads`); a tensor that
    is written to cannot be, and is a ValueError naming it (``indices``: the params' indices of
    ``tensors``, when it is not one per param)."""
    if not tensors:
        return
    which = (lambda i: _which(name, i if indices is None else indices[i]))
    if True in map(Tensor._is_zerotensor, tensors) or True in map(Tensor.is_neg, tensors):
        i = _first([t._is_zerotensor() or t.is_neg() for t in tensors])
        what = "a zero tensor (torch._efficientzerotensor)" if tensors[i]._is_zerotensor() else "a negative view"
        raise ValueError(f"Lion: {which(i)} is {what}: its values are not in memory, so it cannot be updated in "
                         "place. Give it a tensor of its own (.clone(), or .resolve_neg()).")
    try:
        starts = np.fromiter(map(Tensor.data_ptr, tensors), np.int64, len(tensors))
        storages = list(map(Tensor.untyped_storage, tensors))
    except RuntimeError:  # tensors without storage (XLA, lazy): no impl reads their memory through pointers
        return
    extents = spans(tensors)  # 0 exactly when empty
    ends = starts + extents
    low = np.fromiter(map(torch.UntypedStorage.data_ptr, storages), np.int64, len(tensors))
    high = low + np.fromiter(map(torch.UntypedStorage.nbytes, storages), np.int64, len(tensors))
    bad = (extents > 0) & ((starts == 0) | (starts < low) | (ends > high))
    if bad.any():
        i = int(np.argmax(bad))
        t = tensors[i]
        raise ValueError(f"Lion: {which(i)} (shape {tuple(t.shape)}, strides {t.stride()}, storage offset "
                         f"{t.storage_offset()}) needs {int(ends[i] - starts[i])} bytes from its start but its storage "
                         f"holds {int(high[i] - low[i])} bytes{' (it was freed)' if high[i] == low[i] else ''}: its "
                         "memory is not there to update. Was its storage resized or freed (FSDP, "
                         "untyped_storage().resize_(0)) without being restored before the step?")


def readable_grads(grads: list[Tensor]) -> list[Tensor]:
    """The grads with the ones whose values are not in memory made plain: a zero tensor
    (``torch._efficientzerotensor``, data_ptr 0) becomes real zeros, a lazily negated or
    conjugated view its resolved copy. Every impl then reads the same values (the C++ kernel
    reads raw memory, which would ignore a negation bit). The same list when there is none."""
    if True in map(Tensor._is_zerotensor, grads) or True in map(Tensor.is_neg, grads) or True in map(
            Tensor.is_conj, grads):
        return [torch.zeros(g.shape, dtype=g.dtype, device=g.device) if g._is_zerotensor()
                else g.resolve_conj().resolve_neg() for g in grads]
    return grads


def check_step_tensors(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       kahan_comps: list[Tensor | None], param_rounding: str,
                       exp_avg_scales: list[Tensor | None] | None = None,
                       memory: list[StepMemory | None] | None = None) -> list[torch.device]:
    """The tensors of one group's step (local shards), for every impl alike: each grad and momentum
    has its param's shape and device; dtypes are ones Lion computes with; no param is on the meta
    device; nothing the step writes is an inference tensor (outside inference mode); a Kahan
    residual matches its param; an 8-bit (int8) momentum has its block scales (``exp_avg_scales``)
    and no other momentum has any; a sparse grad is COO, sparse along the first dim (stepped a
    chunk of dense rows at a time by the dispatcher). ValueError naming the tensor. Fast on the
    common case (list comparisons).
    Returns the devices the params are on, in order of first appearance. With ``memory`` (a list),
    appends where the tensors lie (:class:`StepMemory`), or None where the common case's path did
    not read it."""
    plain = _plain_step(params, grads, exp_avgs, kahan_comps)
    if plain is not None:  # every check before the block scales' has passed
        dtypes, indices, starts, extents, contiguous = plain
        m_dtypes = dtypes[2]
        no_scales = exp_avg_scales is None or (type(exp_avg_scales) is list and len(exp_avg_scales) == len(exp_avgs)
                                               and all([scale is None for scale in exp_avg_scales]))
        if torch.int8 in m_dtypes or not no_scales:
            _check_scales(exp_avgs, exp_avg_scales)  # else it would pass: no int8 momentum, no scale
        devices = _first_devices(params, indices)
        if param_rounding == "kahan":
            _check_kahan_comps(params, kahan_comps)
        if memory is not None:
            if not no_scales:
                scales = [scale for scale in exp_avg_scales if scale is not None]
                try:
                    starts = np.concatenate([starts, np.fromiter(map(Tensor.data_ptr, scales), np.int64, len(scales))])
                except Exception:  # scales without storage: the step's memory is read tensor by tensor
                    memory.append(None)
                    return devices
                extents = np.concatenate([extents, spans(scales)])
            memory.append(StepMemory(starts, extents, contiguous, dtypes))
        return devices
    if memory is not None:
        memory.append(None)
    # Something is unusual (or wrong): the checks one after the other, the first that fails raising.
    if not len(params) == len(grads) == len(exp_avgs) == len(kahan_comps):
        raise ValueError(f"Lion: params, grads, exp_avgs and kahan_comps must have the same length, got "
                         f"{len(params)}, {len(grads)}, {len(exp_avgs)} and {len(kahan_comps)}")
    shapes = list(map(Tensor.size, params))
    for name, tensors in (("grad", grads), ("momentum (exp_avg)", exp_avgs)):
        if list(map(Tensor.size, tensors)) != shapes:
            i = _first([t.shape != s for t, s in zip(tensors, shapes)])
            raise ValueError(f"Lion: param {i} has shape {tuple(shapes[i])} but its {name} has shape "
                             f"{tuple(tensors[i].shape)}")
    for name, tensors in (("param", params), ("momentum (exp_avg)", exp_avgs)):
        if True in [layout is not torch.strided for layout in map(_LAYOUT, tensors)]:
            i = _first([t.layout is not torch.strided for t in tensors])
            raise ValueError(f"Lion: {_which(name, i)} has layout {tensors[i].layout}; params and momenta must be "
                             "dense (strided) tensors, only gradients may be sparse")
    sparse = [layout is not torch.strided for layout in map(_LAYOUT, grads)]
    if True in sparse:
        _check_sparse_grads([g for g, s in zip(grads, sparse) if s], [i for i, s in enumerate(sparse) if s])
    p_dtypes, g_dtypes, m_dtypes = (set(map(_DTYPE, ts)) for ts in (params, grads, exp_avgs))
    if not p_dtypes <= set(PARAM_DTYPES):
        i = _first([p.dtype not in PARAM_DTYPES for p in params])
        raise ValueError(f"Lion: param {i} has dtype {params[i].dtype}; Lion params are float32, bfloat16 or float16")
    if not all(d.is_floating_point for d in g_dtypes):
        i = _first([not g.dtype.is_floating_point for g in grads])
        raise ValueError(f"Lion: the grad of param {i} has dtype {grads[i].dtype}; gradients must be floating point")
    if not m_dtypes <= set(_MOMENTUM_DTYPES):
        i = _first([m.dtype not in _MOMENTUM_DTYPES for m in exp_avgs])
        raise ValueError(f"Lion: the momentum (exp_avg) of param {i} has dtype {exp_avgs[i].dtype}; it must be "
                         "float32, bfloat16 or int8 (8-bit codes, with their block scales)")
    if any(True in map(_IS_META, ts) for ts in (params, grads, exp_avgs)):
        raise ValueError("Lion cannot step params on the meta device: they hold no values. Materialise them first "
                         "(e.g. module.to_empty(device=...) and load the weights) and build the optimizer after.")
    # The kernels write through raw pointers, past the check torch makes on an in-place op: every
    # impl refuses what torch's in-place ops refuse.
    if not torch.is_inference_mode_enabled():
        comps = [c for c in kahan_comps if c is not None]
        for name, tensors in (("param", params), ("momentum (exp_avg)", exp_avgs), ("Kahan residual", comps)):
            if True in map(Tensor.is_inference, tensors):
                i = _first(list(map(Tensor.is_inference, tensors)))
                if name == "Kahan residual":
                    i = [j for j, c in enumerate(kahan_comps) if c is not None][i]
                raise ValueError(f"Lion: {_which(name, i)} is an inference tensor (made under torch.inference_mode()): "
                                 "it cannot be updated in place outside inference mode. Make it outside inference "
                                 "mode (or step a .clone() of it made there).")
    comp_indices = [i for i, c in enumerate(kahan_comps) if c is not None]
    for name, tensors, indices in (("param", params, None), ("momentum (exp_avg)", exp_avgs, None),
                                   ("Kahan residual", [kahan_comps[i] for i in comp_indices], comp_indices)):
        if not all(map(Tensor.is_contiguous, tensors)):
            for i, t in enumerate(tensors):
                if _overlaps_itself(t):
                    raise ValueError(f"Lion: {_which(name, i if indices is None else indices[i])} (shape "
                                     f"{tuple(t.shape)}, strides {t.stride()}) has elements that share memory (an "
                                     "expanded or overlapping view): it cannot be updated in place. Use a tensor of "
                                     "its own (.clone()).")
    _check_memory("param", params)
    if True in sparse:  # a sparse gradient's values are read by torch ops, a chunk of dense rows at a time
        dense_grads = [i for i, s in enumerate(sparse) if not s]
        _check_memory("grad", [grads[i] for i in dense_grads], dense_grads)
    else:
        _check_memory("grad", grads)
    _check_memory("momentum (exp_avg)", exp_avgs)
    _check_memory("Kahan residual", [kahan_comps[i] for i in comp_indices], comp_indices)
    if exp_avg_scales is not None or torch.int8 in m_dtypes:
        _check_scales(exp_avgs, exp_avg_scales)
    # Device indices (-1 for the CPU) are cheaper to compare than device objects.
    indices = list(map(Tensor.get_device, params))
    if list(map(Tensor.get_device, grads)) != indices or list(map(Tensor.get_device, exp_avgs)) != indices:
        i = _first([not p.device == g.device == m.device for p, g, m in zip(params, grads, exp_avgs)])
        raise ValueError(f"Lion: param {i} is on {params[i].device} but its grad is on {grads[i].device} and its "
                         f"momentum on {exp_avgs[i].device}")
    devices = _first_devices(params, indices)
    if param_rounding == "kahan":
        _check_kahan_comps(params, kahan_comps)
    return devices


def _first_devices(params: list[Tensor], indices: list[int]) -> list[torch.device]:
    # The devices of the params (device indices ``indices``), in order of first appearance.
    first_of_each = {}
    for i, index in enumerate(indices):
        first_of_each.setdefault(index, i)
    return [params[i].device for i in first_of_each.values()]


def _check_kahan_comps(params: list[Tensor], kahan_comps: list[Tensor | None]) -> None:
    for i, (p, c) in enumerate(zip(params, kahan_comps)):
        if p.dtype != torch.float32 and (c is None or c.dtype != p.dtype or c.shape != p.shape
                                         or c.device != p.device):
            raise ValueError(
                f"Lion: param_rounding='kahan' needs a compensation tensor (the Kahan residual) of the param's "
                f"dtype, shape and device for every bf16/fp16 param; param {i} ({p.dtype}, {tuple(p.shape)}) "
                f"has {None if c is None else (c.dtype, tuple(c.shape), str(c.device))}"
            )


def _plain_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                kahan_comps: list[Tensor | None]) -> tuple[tuple[list[torch.dtype], list[torch.dtype],
                                                                 list[torch.dtype]], list[int], np.ndarray,
                                                           np.ndarray, bool] | None:
    """:func:`check_step_tensors` up to the block scales, on the common case: every tensor dense,
    non-empty, in memory of its own. Each fact is read once, over the params, grads, momenta and
    residuals at a time, and one bounds check covers them all; a storage whose data_ptr is not 0
    rules out a meta tensor (its storage holds no memory) and a zero tensor (whose storage has no
    data_ptr to read). Returns the dtypes of the params, grads and momenta, the params' device
    indices, the tensors' data_ptrs and extents (params, grads, momenta, residuals) and whether
    all are contiguous; or None as soon as anything differs from that case, without raising: the
    checks one after the other then raise the error, or take what this path leaves (an empty
    tensor, a sparse grad, a tensor without storage)."""
    n = len(params)
    if not n == len(grads) == len(exp_avgs) == len(kahan_comps):
        return None
    try:
        shapes = list(map(Tensor.size, params))
        if list(map(Tensor.size, grads)) != shapes or list(map(Tensor.size, exp_avgs)) != shapes:
            return None
        if True in [layout is not torch.strided for layout in map(_LAYOUT, grads)]:
            return None
        dtypes = list(map(_DTYPE, params)), list(map(_DTYPE, grads)), list(map(_DTYPE, exp_avgs))
        if (not set(dtypes[0]) <= _PARAM_DTYPE_SET or not set(dtypes[2]) <= _MOMENTUM_DTYPE_SET
                or not all(d.is_floating_point for d in set(dtypes[1]))):
            return None
        comps = [c for c in kahan_comps if c is not None]
        tensors = [*params, *grads, *exp_avgs, *comps]
        starts = list(map(Tensor.data_ptr, tensors))
        storages = list(map(Tensor.untyped_storage, tensors))
        lows = list(map(torch.UntypedStorage.data_ptr, storages))
        if 0 in starts or 0 in lows:  # empty, freed, a meta tensor
            return None
        if not torch.is_inference_mode_enabled() and (True in map(Tensor.is_inference, params)
                                                      or True in map(Tensor.is_inference, exp_avgs)
                                                      or True in map(Tensor.is_inference, comps)):
            return None
        contiguous = False not in map(Tensor.is_contiguous, tensors)
        if not contiguous:
            if True in map(_overlaps_itself, params) or True in map(_overlaps_itself, exp_avgs) or True in map(
                    _overlaps_itself, comps):
                return None
            extents = spans(tensors)
        else:
            extents = np.fromiter(map(_NBYTES, tensors), np.int64, len(tensors))
        if True in map(Tensor.is_neg, tensors):
            return None
        low = np.array(lows, dtype=np.int64)
        high = low + np.fromiter(map(torch.UntypedStorage.nbytes, storages), np.int64, len(tensors))
        starts_array = np.array(starts, dtype=np.int64)
        if ((extents > 0) & ((starts_array < low) | (starts_array + extents > high))).any():
            return None
        indices = list(map(Tensor.get_device, params))
        if list(map(Tensor.get_device, grads)) != indices or list(map(Tensor.get_device, exp_avgs)) != indices:
            return None
    except Exception:  # what the checks one after the other make of it
        return None
    return dtypes, indices, starts_array, extents, contiguous


def _check_sparse_grads(grads: list[Tensor], indices: list[int]) -> None:
    """Sparse gradients Lion steps: COO, sparse along the first dim only (``nn.Embedding(sparse=True)``'s
    form), expanded to dense rows a chunk at a time (``numerics.sparse_rows``)."""
    for g, i in zip(grads, indices):
        if g.layout != torch.sparse_coo or g.sparse_dim() != 1:
            what = f"{g.sparse_dim()} sparse dims" if g.layout == torch.sparse_coo else f"layout {g.layout}"
            raise ValueError(f"Lion: the grad of param {i} is sparse with {what}; Lion takes sparse gradients in COO "
                             "layout, sparse along the first dim only "
                             "(what nn.Embedding(sparse=True) makes). Give it a dense gradient (.to_dense()).")


def _check_scales(exp_avgs: list[Tensor], scales: list[Tensor | None] | None) -> None:
    """Each 8-bit momentum's block scales: fp32, contiguous, one per block, on its device; none
    for another momentum."""
    if scales is None or len(scales) != len(exp_avgs):
        raise ValueError(f"Lion: an 8-bit (int8) momentum needs its block scales: exp_avg_scales must list one "
                         f"per momentum (None where it is not int8), got "
                         f"{None if scales is None else f'{len(scales)} for {len(exp_avgs)} momenta'}")
    for i, (m, scale) in enumerate(zip(exp_avgs, scales)):
        if (m.dtype == torch.int8) != (scale is not None):
            raise ValueError(f"Lion: the momentum (exp_avg) of param {i} has dtype {m.dtype} and "
                             f"{'no' if scale is None else 'a'} block scale tensor: an int8 momentum has one, "
                             "others have none")
        if scale is None:
            continue
        blocks = eight_bit_scale_numel(m.numel())
        if scale.dtype != torch.float32 or scale.dim() != 1 or scale.numel() != blocks or scale.device != m.device:
            raise ValueError(f"Lion: the block scales (exp_avg_scale) of param {i} must be a 1-D float32 tensor of "
                             f"{blocks} elements on {m.device}, got {scale.dtype}, shape {tuple(scale.shape)} on "
                             f"{scale.device}")
        if not scale.is_contiguous():
            raise ValueError(f"Lion: the block scales (exp_avg_scale) of param {i} are not contiguous")
    indices = [i for i, scale in enumerate(scales) if scale is not None]
    _check_memory("block scales (exp_avg_scale)", [scales[i] for i in indices], indices)


def check_eight_bit_state(codes: Any, scale: Any, shape: torch.Size, where: str) -> None:
    """A saved 8-bit momentum: int8 codes of the param's ``shape`` whose magnitudes are codes
    (at most ``numerics.EIGHT_BIT_MAX_CODE``), and fp32 block scales, one per block, finite and
    >= 0 (an absmax). ValueError naming ``where`` otherwise."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int8 or codes.shape != shape:
        found = (codes.dtype, tuple(codes.shape)) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"Lion: the 8-bit momentum (exp_avg) of {where} must be an int8 tensor of its param's "
                         f"shape {tuple(shape)}, got {found}")
    blocks = eight_bit_scale_numel(codes.numel())
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != (blocks,):
        found = (scale.dtype, tuple(scale.shape)) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"Lion: the block scales (exp_avg_scale) of {where} must be a float32 tensor of shape "
                         f"({blocks},), got {found}")
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        bad = int((~(torch.isfinite(scale) & (scale >= 0))).sum())
        raise ValueError(f"Lion: the block scales (exp_avg_scale) of {where} hold {bad} value(s) that are NaN, inf "
                         "or negative: the checkpoint is corrupt")
    if codes.numel() and int(codes.to(torch.int16).abs().max()) > EIGHT_BIT_MAX_CODE:
        raise ValueError(f"Lion: the 8-bit momentum (exp_avg) of {where} holds codes beyond "
                         f"+-{EIGHT_BIT_MAX_CODE}: it was not written by this Lion")


def check_loaded_state(state: dict[Any, Any]) -> None:
    """A loaded optimizer state is Lion's: each entry holds an ``exp_avg`` (and at most a Kahan
    ``kahan_comp``), all finite. Another optimizer's state (AdamW's ``exp_avg_sq``, ``step``) is
    a ValueError that says so, as is a non-finite momentum: a checkpoint whose momentum is NaN or
    inf would silently freeze or poison the elements it covers, and which of its values were
    meant cannot be known, so it is refused rather than repaired."""
    for key, entry in state.items():
        if not isinstance(entry, dict) or not entry:
            continue
        foreign = sorted(set(entry) - {"exp_avg", "kahan_comp", "exp_avg_scale"})
        if foreign or "exp_avg" not in entry:
            found = ", ".join(map(repr, sorted(entry)))
            raise ValueError(f"Lion: the state of param {key!r} holds {found}: this state dict comes from another "
                             "optimizer (Lion keeps only 'exp_avg', its block scales 'exp_avg_scale' when it is "
                             "8-bit, and 'kahan_comp' under Kahan rounding). "
                             "Resume it with the optimizer that saved it, or start Lion without its state.")
        for name in ("exp_avg", "kahan_comp"):  # block scales: check_eight_bit_state
            value = entry.get(name)
            if name in entry and not isinstance(value, Tensor):
                raise ValueError(f"Lion: the {name} of param {key!r} is a {type(value).__name__}, not a tensor")
            if isinstance(value, Tensor) and value.is_meta:
                raise ValueError(f"Lion: the {name} of param {key!r} is on the meta device: it holds no values, so "
                                 "this state dict cannot be resumed (was it saved from a model not yet materialised?)")
            if isinstance(value, Tensor) and value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"Lion: the {name} of param {key!r} has {bad} NaN or inf value(s): the checkpoint "
                                 "is corrupt (or was saved after a step that propagated a non-finite gradient)")


def overlapping(tensors: list[Tensor]) -> bool:
    """Whether any two of these tensors may share memory (a param listed twice, a grad that is
    its param, overlapping views): their byte ranges from ``data_ptr`` over their strided
    :func:`spans` intersect. Conservative for interleaved views (two columns of one matrix),
    which then run tensor after tensor too, correctly. Such a step is not elementwise-independent:
    it runs tensor after tensor, as for_loop defines it, in every impl."""
    try:
        starts = np.fromiter(map(Tensor.data_ptr, tensors), np.int64, len(tensors))
    except RuntimeError:  # tensors without storage (XLA, lazy): only for_loop and foreach run there, in torch ops
        return False
    return ranges_overlap(starts, spans(tensors))


def _refuse_foreign(problem: str) -> ValueError:
    return ValueError(f"Lion: {problem}: this state dict was not saved by lion_hf's Lion. Resume it with the "
                      "optimizer that saved it, or start Lion without its state.")


def check_loaded_state_dict(state_dict: Any, current_groups: list[dict[str, Any]],
                            group_defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole of a state dict about to be loaded, before anything is changed: its layout
    (``state`` and ``param_groups``, as many groups of as many params as the optimizer's), each
    saved group's hyperparameters (:func:`validate_group`, with ``group_defaults`` for the keys
    older checkpoints lack and the current groups' ``state_dtype`` and ``param_rounding``), and
    its state: every entry keyed by a saved param, Lion's (:func:`check_loaded_state`), with a
    floating-point momentum (and Kahan residual) of its param's shape. A ValueError names the
    problem. Returns the validated groups, in order."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        raise _refuse_foreign("a state dict is a dict with 'state' and 'param_groups' (a list of groups)")
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise _refuse_foreign(f"its 'state' is a {type(state).__name__}, not a dict")
    saved_groups = state_dict["param_groups"]
    for index, saved in enumerate(saved_groups):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise _refuse_foreign(f"its param group {index} is not a dict with a 'params' list")
    foreign = sorted({key for group in saved_groups for key in group} & _OTHER_OPTIMIZERS_GROUP_KEYS)
    if foreign:
        raise ValueError(f"Lion: the state dict's param groups hold {', '.join(map(repr, foreign))}: it comes "
                         "from another optimizer (AdamW, SGD, ...). Resume it with the optimizer that saved it, or "
                         "start Lion without its state.")
    if len(saved_groups) != len(current_groups):
        raise ValueError(f"Lion: the state dict has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(current_groups)}")
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(f"Lion: param group {index} of the state dict holds {len(saved['params'])} params, "
                             f"this optimizer's {len(current['params'])}")
        missing = [key for key in _HYPERPARAMETERS if key not in saved]
        if missing:
            found = ", ".join(map(repr, sorted(k for k in saved if k != "params")))
            raise _refuse_foreign(f"its param group {index} has no {', '.join(map(repr, missing))} (it holds {found})")
    checked = [validate_group({**group_defaults, **saved, "state_dtype": current["state_dtype"],
                               "param_rounding": current["param_rounding"]}, index)
               for index, (saved, current) in enumerate(zip(saved_groups, current_groups))]
    params_by_key = {key: p for saved, current in zip(saved_groups, current_groups)
                     for key, p in zip(saved["params"], current["params"])}
    unknown = [key for key in state if key not in params_by_key]
    if unknown:
        raise ValueError(f"Lion: the state dict holds state for {', '.join(map(repr, unknown[:5]))}, which no param "
                         "group of it lists: it is damaged or was edited")
    check_loaded_state(state)
    for key, entry in state.items():
        if not isinstance(entry, dict):
            raise ValueError(f"Lion: the state of param {key!r} is a {type(entry).__name__}, not a dict")
        p = params_by_key[key]
        codes = entry.get("exp_avg")
        if "exp_avg_scale" in entry or (isinstance(codes, Tensor) and codes.dtype == torch.int8):
            check_eight_bit_state(entry.get("exp_avg"), entry.get("exp_avg_scale"), p.shape, f"param {key!r}")
        for name in ("exp_avg", "kahan_comp"):
            value = entry.get(name)
            if value is None or (name == "exp_avg" and "exp_avg_scale" in entry):
                continue
            if not value.dtype.is_floating_point:
                raise ValueError(f"Lion: the {name} of param {key!r} has dtype {value.dtype}; it must be "
                                 "floating point")
            if value.shape != p.shape:
                raise ValueError(f"Lion: the {name} of param {key!r} has shape {tuple(value.shape)} but its param "
                                 f"has shape {tuple(p.shape)}: the checkpoint is of another model")
    return checked
