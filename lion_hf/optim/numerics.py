"""The numerics every Lion impl shares: the per-tensor update, rounding to bf16/fp16, the hash
behind stochastic rounding, and the non-finite gate.

It sits at the bottom of ``lion_hf.optim`` (it imports torch alone). The impls above it
(``for_loop``, ``foreach``, ``cpu_kernel``, ``triton_kernel``) import only this module, and
``lion.py`` (the class and the functional ``lion()``) sits on top of them through ``dispatch``.
The C++ and Triton kernels spell the same arithmetic in their own languages; their tests hold
them to :func:`lion_tensor`.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EIGHT_BIT_BLOCK",
    "EIGHT_BIT_CHUNK",
    "EIGHT_BIT_MAX_CODE",
    "EIGHT_BIT_MIN_NUMEL",
    "PARAM_DTYPES",
    "PLAIN_TENSOR_TYPES",
    "ROW_CHUNK_NUMEL",
    "StepGroup",
    "all_finite",
    "any_nonfinite",
    "apply_update",
    "cautious_update",
    "dequantize_momentum",
    "eight_bit_chunks",
    "eight_bit_scale_numel",
    "eight_bit_state",
    "interpolate",
    "lion_tensor",
    "load_momentum",
    "local",
    "momentum_stochastic",
    "offset_seed",
    "param_stochastic",
    "quantize_momentum",
    "ranges_overlap",
    "row_chunks",
    "sparse_row_sums",
    "sparse_rows",
    "step_may_proceed",
    "stochastic_round_to_bf16",
    "stochastic_round_to_fp16",
    "store_momentum",
    "store_param",
    "with_seeds",
]

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE = operator.attrgetter("dtype")
_FP32_ONLY = {torch.float32}

# The tensor types that are their own local shard (anything else may be a DTensor).
PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})


class StepGroup(NamedTuple):
    """One param group's share of a step: its tensors (local shards, checked) and hyperparameters.

    Every impl takes a step as a list of these (all on one device) and updates them in place.
    ``kahan_comps`` holds the Kahan residual of each bf16/fp16 param under ``param_rounding``
    "kahan" (None elsewhere); ``seeds`` each tensor's stochastic-rounding seeds
    (:func:`with_seeds`), or None when no store of the group rounds stochastically;
    ``exp_avg_scales`` the block scales of each 8-bit (int8) momentum (None for the others, and
    for the whole group when it holds none; see :func:`quantize_momentum`).
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    kahan_comps: list[Tensor | None]
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool
    cautious: bool
    param_rounding: str
    seeds: Tensor | None = None
    exp_avg_scales: list[Tensor | None] | None = None

    @property
    def decay(self) -> float:
        """The weight's factor ``1 - lr * weight_decay`` (decoupled decay)."""
        return 1.0 - self.lr * self.weight_decay

    def subset(self, indices: list[int]) -> StepGroup:
        """The same group over the tensors at ``indices``, with their seeds and scales."""
        pick = [[ts[i] for i in indices] for ts in (self.params, self.grads, self.exp_avgs, self.kahan_comps)]
        return self._replace(params=pick[0], grads=pick[1], exp_avgs=pick[2], kahan_comps=pick[3],
                             seeds=None if self.seeds is None else self.seeds[indices],
                             exp_avg_scales=None if self.exp_avg_scales is None
                             else [self.exp_avg_scales[i] for i in indices])

    def scales(self) -> list[Tensor | None]:
        """The block scales of each momentum, None where it is not 8-bit."""
        return [None] * len(self.params) if self.exp_avg_scales is None else self.exp_avg_scales


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2); any other tensor unchanged.

    Lion is elementwise, so each rank may update its shard on its own.
    """
    if type(t) in PLAIN_TENSOR_TYPES:  # the common case, without a failing attribute lookup
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


def with_seeds(groups: list[StepGroup],
               dtypes: list[tuple[list[torch.dtype], list[torch.dtype]] | None] | None = None) -> list[StepGroup]:
    """The groups with their stochastic-rounding seeds: per tensor an int32 CPU row of the param's
    and the momentum's seed (0 where that store is not stochastic; None for a group where none
    is). Drawn from torch's CPU generator (so ``manual_seed`` reproduces a run and HF's
    checkpointed RNG state resumes it) in one call, in the order one tensor after the other, group
    after group, would draw them: a non-empty tensor's param seed, then its momentum seed.
    ``for_loop``, ``foreach`` and the C++ kernel round with these, so a step split between them
    rounds as one impl would; the Triton kernel keys its Philox bits by a hash of them, drawing
    nothing more, so the generator advances alike under every impl (its bits differ).
    ``dtypes``: per group, the dtypes of its params and momenta where the caller has read them
    this step (None where not), else they are read here."""
    needed: list[np.ndarray | None] = []
    counts: list[int] = []  # seeds drawn per group
    for index, group in enumerate(groups):
        read = None if dtypes is None else dtypes[index]
        p_dtypes, m_dtypes = (list(map(_DTYPE, group.params)), list(map(_DTYPE, group.exp_avgs))) if read is None \
            else read
        if set(p_dtypes) == _FP32_ONLY and set(m_dtypes) == _FP32_ONLY:
            needed.append(None)
            counts.append(0)
            continue
        # One row per tensor, (param, momentum): each dtype's verdict looked up, not asked per tensor.
        param_verdict = {d: param_stochastic(d, group.param_rounding) for d in set(p_dtypes)}
        momentum_verdict = {d: momentum_stochastic(d) for d in set(m_dtypes)}
        flags = np.array([list(map(param_verdict.__getitem__, p_dtypes)),
                          list(map(momentum_verdict.__getitem__, m_dtypes))], dtype=bool).T
        flags &= np.array(list(map(Tensor.numel, group.params)), dtype=bool)[:, None]  # an empty tensor draws none
        needed.append(flags)
        counts.append(int(flags.sum()))
    count = sum(counts)
    if not count:
        return groups
    drawn = torch.randint(0, 1 << 16, (count,), device="cpu", dtype=torch.int32).numpy()
    out, used = [], 0
    for group, flags, n in zip(groups, needed, counts):
        if not n:
            out.append(group)
            continue
        seeds = np.zeros(flags.shape, dtype=np.int32)
        seeds[flags] = drawn[used:used + n]  # row-major: each tensor's param seed before its momentum seed
        used += n
        out.append(group._replace(seeds=torch.from_numpy(seeds)))
    return out


def param_stochastic(dtype: torch.dtype, param_rounding: str) -> bool:
    """Whether a param of ``dtype`` is stored by stochastic rounding (a bf16 momentum always is)."""
    return dtype != torch.float32 and param_rounding == "stochastic"


def momentum_stochastic(dtype: torch.dtype) -> bool:
    """Whether a momentum of ``dtype`` is stored by stochastic rounding: bf16 and 8-bit ones are."""
    return dtype == torch.bfloat16 or dtype == torch.int8


# --------------------------------------------------------------------------------------
# 8-bit momentum (state_dtype="int8")
# --------------------------------------------------------------------------------------

# Elements per block of an 8-bit momentum: one fp32 scale per block, so 1 + 4 / 256 bytes per element.
EIGHT_BIT_BLOCK = 256
# A momentum of fewer elements stays fp32 under state_dtype="int8" (biases, norms, small heads):
# together they are a sliver of the state, and a block's scale would cost more there. The one rule,
# applied where the state is created or loaded (Lion), so that every impl sees the same tensors.
EIGHT_BIT_MIN_NUMEL = 4096
# A code is a sign and a 7-bit magnitude: an 8-bit float of m / absmax with _EXPONENT_BITS exponent
# bits and the rest mantissa (cpu_kernel.cpp's Q8 holds the same constants).
_EXPONENT_BITS = 3
_MANTISSA_BITS = 7 - _EXPONENT_BITS
_TOP = (1 << _EXPONENT_BITS) - 1  # the exponent field of 1.0
_DROPPED = 23 - _MANTISSA_BITS  # the fp32 mantissa bits a code drops
_REBIAS = 127 - _TOP  # fp32 exponent = the code's exponent field + _REBIAS
# The largest code magnitude (1.0: exponent field _TOP, mantissa 0), the block's absmax itself.
EIGHT_BIT_MAX_CODE = _TOP << _MANTISSA_BITS
# Below the smallest normal code codes step linearly (as IEEE subnormals), by _SUBNORMAL_STEP.
_SUBNORMAL_LIMIT = 2.0 ** (1 - _TOP)
_SUBNORMAL_STEP = 2.0 ** (1 - _TOP - _MANTISSA_BITS)


# Elements of an 8-bit momentum that the impls written in torch ops (for_loop, foreach) step at a
# time: its fp32 value, the gradient's and the new codes' temporaries then take a few MB, not
# several fp32 copies of the tensor. A whole number of blocks, so that each chunk's blocks are the
# tensor's (the result is the same bits).
EIGHT_BIT_CHUNK = 1 << 16


def eight_bit_state(p: Tensor) -> bool:
    """Whether state_dtype="int8" stores the momentum of ``p`` in 8 bits (else in fp32)."""
    return p.numel() >= EIGHT_BIT_MIN_NUMEL


def eight_bit_scale_numel(numel: int) -> int:
    """How many block scales an 8-bit momentum of ``numel`` elements has."""
    return -(-numel // EIGHT_BIT_BLOCK)


def _blocks(t: Tensor) -> Tensor:
    """``t``'s elements in row-major order, zero-padded to whole blocks: (blocks, EIGHT_BIT_BLOCK)."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % EIGHT_BIT_BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, EIGHT_BIT_BLOCK)


def eight_bit_chunks(numel: int) -> list[tuple[int, int]]:
    """The (start, stop) element ranges, in row-major order, that cut a tensor of ``numel`` elements
    into chunks of at most :data:`EIGHT_BIT_CHUNK` elements, each starting on a block boundary: a
    chunk's block scales are ``scale[start // EIGHT_BIT_BLOCK:]`` (as many as it has blocks), and its
    random bits those of :func:`offset_seed`. Stepping the chunks one after the other computes
    the bits of the whole tensor's step (every operation is per element or per block)."""
    size = EIGHT_BIT_CHUNK
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


# --------------------------------------------------------------------------------------
# Sparse gradients (nn.Embedding(sparse=True)): never dense as a whole
# --------------------------------------------------------------------------------------

# Elements of a param with a sparse gradient stepped at a time: its dense gradient then exists one
# chunk at a time (4 MB of fp32), never whole, and each chunk is still large enough for a kernel's
# threads.
ROW_CHUNK_NUMEL = 1 << 20


def row_chunks(shape: torch.Size | tuple[int, ...], eight_bit: bool) -> list[tuple[int, int]]:
    """The (start_row, stop_row) ranges that cut a tensor of ``shape`` along its first dim into
    chunks of about :data:`ROW_CHUNK_NUMEL` elements (at least one row). With ``eight_bit`` each
    chunk starts on a block boundary of the 8-bit momentum, so that its block scales are the
    tensor's. A chunk starting at element ``start`` rounds with :func:`offset_seed`, so the chunks
    stepped one after the other compute the whole tensor's bits."""
    rows, row_numel = shape[0], math.prod(shape[1:])
    if rows == 0 or row_numel == 0:
        return []
    step = max(1, ROW_CHUNK_NUMEL // row_numel)
    if eight_bit:
        align = EIGHT_BIT_BLOCK // math.gcd(row_numel, EIGHT_BIT_BLOCK)  # rows per whole number of blocks
        step = -(-step // align) * align
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def sparse_rows(g: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a sparse COO gradient (sparse along its first dim, as
    ``nn.Embedding(sparse=True)`` makes it) as a dense tensor. Each row sums its entries with
    torch's own dense embedding backward, in the order they are stored: for the gradient of one
    embedding lookup these are the bits of the dense gradient the same lookup without
    ``sparse=True`` gives (an uncoalesced gradient holds its entries in token order)."""
    index = g._indices()[0]
    values = g._values()
    keep = (index >= start) & (index < stop)
    rows = values[keep].reshape(-1, math.prod(g.shape[1:]))
    dense = torch.ops.aten.embedding_dense_backward(rows, index[keep] - start, stop - start, -1, False)
    return dense.view(stop - start, *g.shape[1:])


def sparse_row_sums(g: Tensor) -> Tensor:
    """The rows of a sparse COO gradient that hold entries, summed as :func:`sparse_rows` sums them
    (the same entries of each row, in the same order), one row per distinct index."""
    index = g._indices()[0]
    rows, position = torch.unique(index, sorted=True, return_inverse=True)
    values = g._values().reshape(index.numel(), -1)
    return torch.ops.aten.embedding_dense_backward(values, position, rows.numel(), -1, False)


def offset_seed(seed: Tensor | int | None, start: int) -> Tensor | int | None:
    """The seed under which the :func:`random_bits16` of a slice that starts at element ``start``
    of a tensor are that tensor's bits under ``seed`` (the bits hash ``index + seed`` mod 2**16)."""
    return None if seed is None else (seed + (start & 0xFFFF)) & 0xFFFF


def dequantize_momentum(codes: Tensor, scale: Tensor) -> Tensor:
    """An 8-bit momentum as fp32 (a new tensor of the codes' shape): ``value(code) * scale``.

    A code is a signed 8-bit float of ``m / absmax``: its magnitude ``k`` (0..112) holds 3 exponent
    and 4 mantissa bits, ``2**(k // 16 - 7) * (1 + (k % 16) / 16)`` for ``k >= 16`` (112 is 1.0),
    and ``k * 2**-10`` below (evenly spaced down to 0, as IEEE subnormals are). Each element's block
    (``EIGHT_BIT_BLOCK`` elements in row-major order) has one fp32 scale, the block's absmax.
    """
    k = _blocks(codes).to(torch.int32)
    negative = k < 0
    k = k.abs()
    mask = (1 << _MANTISSA_BITS) - 1
    normal = (((k >> _MANTISSA_BITS) + _REBIAS) << 23 | (k & mask) << _DROPPED).view(torch.float32)
    value = torch.where(k > mask, normal, k.float() * _SUBNORMAL_STEP)
    value = torch.where(negative, -value, value) * scale.view(-1, 1)
    return value.view(-1)[:codes.numel()].view(codes.shape)


def quantize_momentum(m32: Tensor, seed: Tensor | int, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """An fp32 momentum as 8-bit codes (int8, its shape) and block scales (fp32, one per block).

    Each block's scale is its absmax (the largest ``|m|``, so that element is exact; taken on the
    bit patterns, so a NaN makes the scale NaN), and each element is coded from ``x = m / scale``,
    in [-1, 1], by stochastic rounding to one of its two neighbouring codes (unbiased to 2**-16
    of a code step): at or above 2**-6, 16 random bits are added below the 4 kept mantissa bits
    of x's fp32 pattern, which is then truncated (as bf16 state rounds); below, ``x * 2**10``
    plus a uniform in [0, 1) is truncated to an integer. The random bits are
    :func:`random_bits16` of each element's row-major index and ``seed`` (``noise``, for
    measurements only, replaces them). An all-zero block has scale 0 and codes 0; a NaN x (a
    block holding a NaN or inf) is code 0, and its block's scale is NaN.
    """
    blocks = _blocks(m32.float())
    magnitude_bits = blocks.contiguous().view(torch.int32) & 0x7FFFFFFF
    scale = magnitude_bits.amax(dim=1).view(torch.float32)
    x = blocks / scale.view(-1, 1)
    a = x.abs()
    if noise is None:
        noise = random_bits16(a.numel(), seed, a.device).view(a.shape)
    kept = (a.view(torch.int32) + (noise << (_DROPPED - 16))) & -(1 << _DROPPED)
    normal = ((kept >> 23) - _REBIAS << _MANTISSA_BITS) + ((kept >> _DROPPED) & ((1 << _MANTISSA_BITS) - 1))
    low = torch.where(a < _SUBNORMAL_LIMIT, a, 0.0)
    subnormal = torch.floor(low * (1 / _SUBNORMAL_STEP) + noise.float() * 2.0**-16).to(torch.int32)
    k = torch.where(a < _SUBNORMAL_LIMIT, subnormal, normal)
    k = torch.where(torch.isnan(x), 0, k)
    codes = torch.where(x < 0, -k, k).to(torch.int8)
    return codes.view(-1)[:m32.numel()].view(m32.shape), scale


def load_momentum(m: Tensor, scale: Tensor | None) -> Tensor:
    """The momentum as fp32: dequantized when it is 8-bit (``scale``: its block scales)."""
    return m.float() if scale is None else dequantize_momentum(m, scale)


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


def store_momentum(m: Tensor, new_m: Tensor, ok: Tensor | None, seed: Tensor | int | None,
                   scale: Tensor | None = None, m32: Tensor | None = None) -> None:
    """Store the new fp32 momentum ``new_m`` in ``m``; where ``ok`` is False the element keeps its
    value. An 8-bit momentum (``scale``: its block scales, ``m32``: its value before the step) is
    stored whole: the kept values join the new ones and every block is quantized again."""
    if scale is not None:
        kept = new_m if ok is None else torch.where(ok, new_m, m32)
        codes, new_scale = quantize_momentum(kept, seed)
        m.copy_(codes)
        scale.copy_(new_scale)
        return
    new = round_to(new_m, m.dtype, seed)
    m.copy_(new if ok is None else torch.where(ok, new, m))


def cautious_update(update: Tensor, grad: Tensor) -> Tensor:
    """Keep only update entries that agree in sign with the gradient, rescaled (Liang et al. 2024)."""
    agree = (update * grad > 0).to(update.dtype)
    fraction = agree.mean() if agree.numel() else agree.new_ones(())
    return update * agree / fraction.clamp(min=1e-3)


def interpolate(m32: Tensor, g32: Tensor, beta: Any) -> Tensor:
    """``m * beta + g * (1 - beta)``: two rounded fp32 products and a rounded sum, in this order."""
    return m32 * beta + g32 * (1.0 - beta)


def apply_update(
    p: Tensor,
    g32: Tensor,
    m: Tensor,
    comp: Tensor | None,
    update: Tensor,
    lr: Any,
    decay: Any,
    beta2: Any,
    p_seed: Tensor | int | None,
    m_seed: Tensor | int | None,
    param_ok: Tensor | None,
    momentum_ok: Tensor | None,
    m_scale: Tensor | None = None,
    m32: Tensor | None = None,
) -> None:
    """The second half of the Lion update, in place, from an ``update`` computed beforehand (Lion's
    own sign, or DistributedLion's vote): decoupled decay and the step of the weight, its
    rounding, and the momentum from the fp32 gradient ``g32`` (already negated under maximize).
    Where ``param_ok`` / ``momentum_ok`` is False, the param / momentum keeps its stored bits (an
    8-bit momentum, ``m_scale`` its block scales, keeps its value, quantized again with its block).
    ``m32``: the momentum as fp32, when the caller has it already."""
    p32 = p.float()
    w32 = p32 if comp is None else p32 + comp.float()
    new_w = w32 * decay - update * lr
    if m32 is None:
        m32 = load_momentum(m, m_scale)
    new_m = interpolate(m32, g32, beta2)
    store_param(p, new_w, comp, param_ok, p_seed)
    store_momentum(m, new_m, momentum_ok, m_seed, m_scale, m32)


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
    m_scale: Tensor | None = None,
) -> None:
    """The one per-tensor Lion update, in place: the reference every impl (``for_loop``,
    ``foreach``, the C++ and Triton kernels) is held to, bit for bit where they round alike.

    Computes in fp32 whatever the storage. ``decay`` is ``1 - lr * weight_decay``. The weight
    being optimised is ``p + comp`` under Kahan summation (``comp`` holds what the last store
    of ``p`` rounded away), else ``p``. ``p_seed`` / ``m_seed`` choose stochastic rounding of
    the new param / momentum (None: round-to-nearest). An 8-bit momentum ``m`` (int8 codes) comes
    with ``m_scale``, its block scales (:func:`quantize_momentum`), and is computed with as its
    fp32 value and stored again, blocks and scales anew. Scalars may be floats or 0-d tensors.
    Each product and sum is its own rounded fp32 operation, in this order; the C++ kernel is
    built without FMA contraction so that it rounds alike.
    """
    g32 = g.float()
    if maximize:
        g32 = -g32
    m32 = load_momentum(m, m_scale)
    update = torch.sign(interpolate(m32, g32, beta1))
    if cautious:
        update = cautious_update(update, g32)
    ok = torch.isfinite(g32) if skip_nonfinite else None
    apply_update(p, g32, m, comp, update, lr, decay, beta2, p_seed, m_seed, ok, ok, m_scale, m32)


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
        if g.is_sparse:
            g = sparse_row_sums(g)  # the rows the step will sum: fp16 entries can overflow only there
        if g.numel():
            by_device[g.device].append(g)
    for device_grads in by_device.values():
        # The 2-norm is NaN or inf as soon as one element is, exactly the verdict of the norm that
        # gradient clipping computes (it also calls a gradient whose square overflows, |g| > ~1e19,
        # non-finite). torch's 2-norm is vectorised and threaded on CPU, unlike its inf-norm.
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(device_grads, 2))).all()):
            return False
    return True


def ranges_overlap(starts: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether any two of these non-empty memory ranges (start addresses, byte sizes) overlap: then
    a step's tensors share memory (a param listed twice, a grad that is its param, overlapping
    views) and must update one after the other."""
    nonempty = sizes > 0
    starts, sizes = starts[nonempty], sizes[nonempty]
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], starts[order] + sizes[order]
    return bool((ends[:-1] > starts[1:]).any())
