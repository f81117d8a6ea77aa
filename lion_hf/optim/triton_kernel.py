"""Fused multi-tensor Triton kernel for one Lion step (Chen et al. 2023).

Semantics are those of :func:`lion_hf.optim.numerics.lion_tensor`, the one reference every impl
is held to (and the one its self-check below compares with), computed in fp32 registers whatever
the storage dtype::

    g  = -g if maximize
    c  = beta1 * m + (1 - beta1) * g ;  u = sign(c)           (sign(0) = sign(NaN) = 0, as torch.sign)
    u  = u * (u * g > 0) / max(mean(u * g > 0), 1e-3)          (cautious only; mean per tensor)
    p' = p * (1 - lr * wd) - lr * u
    m' = beta2 * m + (1 - beta2) * g
    skip_nonfinite: where g is NaN or +-inf, p' = p and m' = m

Launch scheme
-------------
``triton_lion_`` groups the tensors by (device, param dtype, momentum dtype, Kahan or not,
16-byte aligned or not) and launches **one** kernel per group over a 1-D grid that covers
every block of every tensor of the group (``BLOCK_SIZE`` = 2048 elements per program, a
[256, 8] tile, 8 warps). Two int64 tables,
both built once and cached, tell each program where to work:

* the *layout* table, keyed on the tensor sizes: ``numel`` of each tensor, then one entry per
  block, ``(tensor_index << 32) + block_index_within_tensor``. It is built with torch ops on
  the host and copied once; its size is 8 bytes per 2048 elements (0.1 % of an fp32 model).
* the *pointer* table, keyed on the data pointers: the addresses of every param, grad and
  momentum tensor. The kernel turns them into typed pointers (``int -> tl.pointer_type``).
  Gradients freed and reallocated by ``zero_grad(set_to_none=True)`` usually come back at the
  same addresses from the caching allocator, so the table is rebuilt only when one moves (a
  small LRU keeps the last few). A key is the exact list of addresses and sizes, so a cache
  hit is always a correct table.

So a step over 100-500 small tensors costs one launch (three with ``cautious``) plus a
Python loop over the tensors to compute the cache key, not one launch per tensor. Empty
tensors are skipped. A program whose block is full runs unmasked; only a tensor's last,
partial block takes the masked copy of the code. When every address is 16-byte aligned the
kernel tells the compiler so (``tl.multiple_of``), and full blocks then use 16-byte loads and
stores (a mask with a runtime bound, or an address of unknown alignment, would keep every
access scalar). Afterwards the autograd version counters of params and momenta are bumped,
as an in-place torch op would do, since the kernel writes through raw pointers.

Memory traffic per element: fp32 params with fp32 state read p, g, m and write p, m:
20 bytes/param, the minimum for Lion; fp32 params + bf16 state 16, bf16 params + bf16 state
10 (14 under Kahan, which reads and writes the 2-byte residual).
``skip_nonfinite`` costs no extra pass: it is a ``where`` in registers. ``cautious`` needs the
per-tensor fraction of agreeing signs before any element can be updated, so it adds a
read-only pass over g and m (``_agree_count_kernel``, one atomic add per program into an int64
counter per tensor) and a memset of the counters: 3 launches and +8 bytes/param (fp32 g, m).

Cautious
--------
Both kernels compute the agreeing fraction as torch's CPU mean does, ``count / numel`` as an fp32
quotient (exact below 2**24 elements, where the count is), clamp it at fp32 ``1e-3``, and divide
each agreeing update by it with ``div_rn``: for_loop's bits on a CPU reference. torch's CUDA mean
may round the fraction differently (by an fp32 ulp), which moves a weight by at most two fp32
roundings of its terms, ``2**-22 * (|w| * |decay| + lr / fraction)`` (a bf16/fp16 weight then by at
most one more step of its own, the Kahan residual taking up the rest): the self-check's tolerance
under ``cautious`` on a GPU, in value rather than in steps, since a weight that lands near zero has
many steps in one rounding of its terms.

Rounding
--------
bf16 and fp16 params are stored as ``param_rounding`` says. ``"stochastic"`` (the default)
rounds up or down with probability given by the distance: bf16 by adding 16 random bits to
the fp32 bit pattern and dropping them, fp16 by choosing between the nearest value and the
next one towards the exact result. ``"kahan"`` adds the residual tensor (4th pointer-table
segment, the param's dtype) to the weight before the step and stores what rounding drops
back into it. ``"nearest"`` is round-to-nearest-even (fp16 by the hardware conversion; bf16 by
integer ops on the fp32 bit pattern, which also makes the interpreter, whose fp32 -> bf16
cast truncates, agree bit for bit). A bf16 momentum is stored with **stochastic rounding**: a
uniform 16-bit integer is added to the fp32 bit pattern and the low 16 bits are dropped, so
the result is one of the two bf16 neighbours with probability given by the distance
(unbiased; round-to-nearest would freeze a momentum whose per-step change ``(1 - beta2) * g``
is under half a bf16 ulp). The bits come from Philox (``tl.randint4x``): one 128-bit draw per
row of 8 elements, counter = (global row index within the launch, stream), key = ``seed`` and
the group index, so every element of a step gets its own bits, and the param (stream 1) draws
bits independent of its momentum's (stream 0). Under ``Lion`` and ``lion()`` (``triton_lion``)
the seed is derived from the per-tensor seeds ``numerics.with_seeds`` drew for the step, with
no draw of its own, so torch's generator advances by the same draws whichever impl runs (the
random bits themselves differ: Philox here, the 16-bit hash elsewhere). The standalone
``triton_lion_`` with ``seed=None`` draws one from torch's default generator (``torch.manual_seed``
makes runs reproducible), only when some store rounds stochastically (a bf16 momentum, or a
bf16/fp16 param under ``"stochastic"``). NaN momenta stay NaN.

Scalars (lr, betas, weight decay, seed, tensor count) are runtime kernel arguments, never
``tl.constexpr``, and ``seed``/``n_tensors`` are excluded from integer specialisation, so an lr
schedule never recompiles. The flags (maximize, cautious, skip_nonfinite, stochastic rounding,
alignment) and the dtypes are constexpr: at most a handful of variants per process. There
is no autotuning (an autotuner would re-run an in-place update), just a fixed block size.

8-bit momentum (``state_dtype="int8"``)
---------------------------------------
An int8 momentum (codes of ``numerics.quantize_momentum``, with one fp32 scale per block of
``EIGHT_BIT_BLOCK`` = 256 elements in row-major order, the block's absmax) has its own kernel,
``_lion8_kernel``, launched the same way (one launch per group, the same layout table; the block
scales are one more pointer-table segment, and each tensor's two 16-bit seeds a small int32 table
copied each step). A program's 2048 elements are an [8, 256] tile, one row per block, so it holds
whole blocks: it widens the codes (``value(code) * scale``), runs the step above in fp32, takes
each row's new absmax on the bit patterns and codes the row again. The codes are rounded
stochastically from ``numerics.random_bits16`` of the element's row-major index and the tensor's
momentum seed, and bf16/fp16 params under ``"stochastic"`` from the same hash of the param's seed:
not Philox, so the random bits are the other impls' bits. ``m / absmax`` is divided with
``tl.math.div_rn`` (IEEE round-to-nearest: Triton's ``/`` compiles to an approximate division on
NVIDIA GPUs). So the 8-bit kernel computes ``numerics.lion_tensor``'s bits exactly (codes, scales,
params, Kahan residuals; NaN blocks alike; ``cautious`` too, see below) under the interpreter, and
compiled it runs the same IEEE fp32 and integer operations (its PTX has ``div.rn``, no FMA, no
flush-to-zero; not yet run on a GPU). An all-zero block keeps scale 0 and codes 0. The tensors
must be contiguous (the blocks and the random bits follow the row-major order); others run in
``foreach``. Traffic per element: fp32 params read p, g and a code and write p and a code, 14
bytes plus 8 per 256 for the scale (bf16 params: 8 bytes). It has run only under the interpreter
and compiled ahead of time for sm_80/sm_90 (no GPU yet): the self-check probes its kinds too (a
zero block, subnormal codes, NaN/inf grads), bit for bit.

Inputs
------
Params fp32, bf16 or fp16; each grad has its param's dtype and shape; momenta fp32, bf16 or int8
(8-bit, with their block scales).
Tensors must be contiguous, or at least non-overlapping and dense with identical strides for
p, g and m (e.g. channels_last weights): the update is elementwise, so memory order does not
matter. Anything else raises ``ValueError``. DTensor (FSDP2) arguments are replaced by their
local shard (``to_local()``); the update is elementwise, so shards are independent, except
that the ``cautious`` mean is then taken per local shard rather than over the whole tensor.

Interpreter (``TRITON_INTERPRET=1``)
-------------------------------------
Tests run the same ``@triton.jit`` kernels on CPU tensors through Triton's interpreter
(numpy). Raw pointer tables work there because CPU tensors' addresses are host addresses,
so the multi-tensor launch scheme is exercised unchanged. Interpreter mode is decided when
triton is first imported (``triton.language``'s own jit functions such as Philox are built
then), so ``TRITON_INTERPRET=1`` must be in the environment before anything imports triton;
this module follows whatever mode triton was imported in. In interpreter mode, CUDA tensors
(whose addresses the host cannot dereference) are staged through CPU copies and copied back:
correct, slow, for debugging only. CPU tensors without the interpreter raise ``RuntimeError``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    StepGroup,
    eight_bit_scale_numel,
    interpolate,
    lion_tensor,
    load_momentum,
    local,
    quantize_momentum,
)
from lion_hf.optim.options import PARAM_ROUNDINGS
from lion_hf.optim.signs import CHUNK_BYTES, ZERO_SIGNS_BYTE

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    raise ImportError(
        "lion_hf's Triton Lion kernel (impl='triton') needs the triton package: pip install triton "
        "(or pip install 'lion_hf[triton]')"
    ) from exc

__all__ = ["BLOCK_SIZE", "INTERPRET", "triton_lion", "triton_lion_", "triton_signs", "triton_vote"]

_ROWS = 256
_COLS = 8  # one Philox draw (4 x 32 bits) gives 16 bits to each of 8 elements
BLOCK_SIZE = _ROWS * _COLS
_NUM_WARPS = 8  # 8 elements per thread: two 16-byte fp32 accesses per tensor, ~32-58 registers

_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_STATE_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.int8: tl.int8}

# An 8-bit momentum's tile: one row per block of EIGHT_BIT_BLOCK codes (one scale each), BLOCK_SIZE
# elements in all, so that a program holds whole blocks and takes each block's absmax in registers.
_Q_COLS = EIGHT_BIT_BLOCK
_Q_ROWS = BLOCK_SIZE // EIGHT_BIT_BLOCK
# The code's format, numerics.dequantize_momentum's (cpu_kernel.cpp's Q8 spells it too): a sign and a 7-bit
# magnitude of 3 exponent and 4 mantissa bits, evenly spaced (as IEEE subnormals) below the smallest normal.
_Q_MANTISSA: tl.constexpr = tl.constexpr(4)
_Q_MANTISSA_MASK: tl.constexpr = tl.constexpr(15)
_Q_DROPPED: tl.constexpr = tl.constexpr(19)  # fp32 mantissa bits a code drops: 23 - 4
_Q_KEPT: tl.constexpr = tl.constexpr(-(1 << 19))  # the fp32 bits a code keeps: sign, exponent, 4 mantissa bits
_Q_NOISE_SHIFT: tl.constexpr = tl.constexpr(19 - 16)  # 16 random bits just below the kept ones
_Q_REBIAS: tl.constexpr = tl.constexpr(120)  # fp32 exponent = code exponent field + 127 - 7
_Q_SUBNORMAL_LIMIT: tl.constexpr = tl.constexpr(2.0**-6)  # the smallest normal code, 2 ** (1 - 7)
_Q_SUBNORMAL_STEP: tl.constexpr = tl.constexpr(2.0**-10)  # the subnormal codes' spacing, 2 ** (1 - 7 - 4)
_Q_SUBNORMAL_SCALE: tl.constexpr = tl.constexpr(2.0**10)
_Q_BLOCK: tl.constexpr = tl.constexpr(EIGHT_BIT_BLOCK)

# Interpreter or compiled mode is fixed when triton.language is first imported (its own jit
# functions, Philox included, are built then); build this module's kernels in the same mode.
INTERPRET = type(tl.randint4x).__name__ == "InterpretedFunction"

_TABLE_CACHE_SIZE = 16
_LAYOUT_CACHE_SIZE = 8
_tables: OrderedDict[tuple, tuple[Tensor, Tensor, int, bool]] = OrderedDict()
_layouts: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


def _jit(fn=None, **kwargs):
    """``triton.jit`` in the mode (interpreted or compiled) that triton.language was built in."""
    if fn is None:
        return lambda f: _jit(f, **kwargs)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = INTERPRET
        return triton.jit(fn, **kwargs)


@_jit
def _load_f32(ptrs, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Load and upcast to fp32; bf16 is widened with a shift (exact, same on every backend)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@_jit
def _store(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@_jit
def _bf16_from_bits(bits, add):
    """Round fp32 bit patterns to bf16 after adding ``add`` to the low half, then drop it.

    ``add`` = 0x7FFF + lsb gives round-to-nearest-even; a uniform 16-bit integer gives
    stochastic rounding. A carry into the exponent is the correct next binade (or inf).
    NaN is kept NaN (its payload may live only in the dropped bits).
    """
    high = (bits + add) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    high = tl.where(is_nan, (bits >> 16) | 0x40, high)
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@_jit
def _noise16(seed, stream, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Uniform 16-bit integers, one per element of the [ROWS, COLS] tile.

    One Philox call gives 4 x 32 random bits per row: 16 bits for each of its 8 elements. The
    counter is (global row index, ``stream``), so the momentum (stream 0) and the param
    (stream 1) of an element draw independent bits.
    """
    tl.static_assert(COLS == 8)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lo = rows.to(tl.uint32)
    hi = (rows >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero + stream, zero)
    col = tl.arange(0, COLS)[None, :]
    word = tl.where(col < 2, r0[:, None], tl.where(col < 4, r1[:, None], tl.where(col < 6, r2[:, None], r3[:, None])))
    return (word >> ((col & 1) * 16).to(tl.uint32)) & 0xFFFF


@_jit
def _fp16_stochastic(x, noise):
    """fp32 -> fp16, rounded up or down with probability given by the distance (as
    ``lion_hf.optim.numerics.stochastic_round_to_fp16``): the far neighbour of the nearest fp16
    value is one step of its 16-bit pattern towards ``x``."""
    near = x.to(tl.float16)
    near32 = near.to(tl.float32)
    bits = near.to(tl.int16, bitcast=True)
    other_bits = tl.where(tl.abs(x) > tl.abs(near32), bits + 1, bits - 1).to(tl.int16)
    other32 = other_bits.to(tl.float16, bitcast=True).to(tl.float32)
    # IEEE division, as torch divides (Triton's / may be approximate on a GPU): the 8-bit kernel, whose
    # random bits are for_loop's, then stores for_loop's bits.
    prob = tl.math.div_rn(x - near32, other32 - near32)
    uniform = noise.to(tl.float32) * (1.0 / 65536.0)
    return tl.where(uniform < prob, other32, near32).to(tl.float16)


@_jit
def _store_param_value(w, noise, P_DTYPE: tl.constexpr, P_STOCHASTIC: tl.constexpr):
    """The new fp32 weight ``w`` in the param's dtype: stochastic or round-to-nearest-even."""
    if P_DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        if P_STOCHASTIC:
            return _bf16_from_bits(bits, noise)
        else:
            return _bf16_from_bits(bits, 0x7FFF + ((bits >> 16) & 1))
    elif P_DTYPE == tl.float16:
        if P_STOCHASTIC:
            return _fp16_stochastic(w, noise)
        else:
            return w.to(tl.float16)
    else:
        return w


@_jit
def _store_param(p_ptrs, c_ptrs, mask, new_w, p, c, finite, noise, P_DTYPE: tl.constexpr,
                 P_STOCHASTIC: tl.constexpr, KAHAN: tl.constexpr, SKIP_NONFINITE: tl.constexpr, MASKED: tl.constexpr):
    """Store the new fp32 weight ``new_w`` as the param, rounded with ``noise`` as ``param_rounding``
    says, and under Kahan what that rounding dropped as the residual. ``p`` and ``c`` are the param
    and residual as loaded (``c`` read under KAHAN only), ``finite`` where the grad is finite (read
    under SKIP_NONFINITE only). One body for every momentum dtype, so that the 8-bit kernel rounds
    and keeps the residual exactly as the others do."""
    new_p = _store_param_value(new_w, noise, P_DTYPE, P_STOCHASTIC)
    if KAHAN:
        new_c = new_w - new_p.to(tl.float32)
        if SKIP_NONFINITE:
            # Re-rounding p + c could move p by a tie: a skipped element keeps its exact bits.
            new_p = tl.where(finite, new_p, p.to(P_DTYPE))
            new_c = tl.where(finite, new_c, c)
        _store(c_ptrs, _store_param_value(new_c, 0, P_DTYPE, False), mask, MASKED)
    _store(p_ptrs, new_p, mask, MASKED)


@_jit
def _sign(c):
    """sign as torch.sign (and the reference): sign(0) = sign(NaN) = 0."""
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))


@_jit
def _cautious(u, g, count, n):
    """The cautious update ``u * agree / max(mean(agree), 1e-3)`` as numerics.cautious_update
    computes it: the mean an fp32 quotient of the agreeing count (exact below 2**24 elements) by the
    element count, clamped at fp32 1e-3, and each update divided by it with IEEE rounding (Triton's
    ``/`` may be approximate on a GPU). A disagreeing element's update is u * 0 (-0.0 for u = -1)."""
    fraction = tl.maximum(tl.math.div_rn(count.to(tl.float32), n.to(tl.float32)), 1e-3)
    agree = tl.where(u * g > 0, 1.0, 0.0)
    return tl.math.div_rn(u * agree, fraction + tl.zeros_like(u))


@_jit
def _lion_step(p, g, m, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
               P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
               KAHAN: tl.constexpr, MASKED: tl.constexpr):
    """The step maths on fp32 tiles of the param ``p``, grad ``g`` and momentum ``m`` as loaded (the
    Kahan residual is loaded here, under KAHAN). Returns the new fp32 weight and momentum, the
    residual (0.0 without KAHAN) and where the grad is finite (True without SKIP_NONFINITE), the
    last two as :func:`_store_param` takes them. One body for every momentum dtype, so that the
    8-bit kernel steps exactly as the others do; a skipped element keeps its weight and momentum."""
    if MAXIMIZE:
        g = -g
    w = p
    c = 0.0  # no residual: _store_param reads c under KAHAN only
    if KAHAN:
        c = _load_f32(c_ptrs, mask, P_DTYPE, MASKED)
        w = p + c  # the weight being optimised: the stored param plus what its rounding dropped
    u = _sign(beta1 * m + one_minus_beta1 * g)
    if CAUTIOUS:
        u = _cautious(u, g, count, n)
    new_w = w * decay - lr * u
    new_m = beta2 * m + one_minus_beta2 * g
    finite = True  # _store_param reads it under SKIP_NONFINITE only
    if SKIP_NONFINITE:
        # Exponent bits all ones <=> NaN or +-inf; a bit test cannot be folded away by fast-math.
        finite = (g.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
        new_w = tl.where(finite, new_w, w)
        new_m = tl.where(finite, new_m, m)
    return new_w, new_m, c, finite


@_jit
def _block(ptr_table, layout, n_tensors, P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
           ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, KAHAN: tl.constexpr = False):
    """This program's block: tensor index, its numel, element pointers of the [ROWS, COLS] tile
    (param, grad, momentum, Kahan residual: the param's pointers when there is none), and how
    many of the tile's elements exist (ROWS * COLS except in a tensor's last block)."""
    pid = tl.program_id(0)
    info = tl.load(layout + n_tensors + pid)
    t = info >> 32
    start = (info - (t << 32)) * (ROWS * COLS)
    n = tl.load(layout + t)
    remaining = tl.minimum(n - start, ROWS * COLS).to(tl.int32)
    p_ptr = tl.load(ptr_table + t).to(tl.pointer_type(P_DTYPE)) + start
    g_ptr = tl.load(ptr_table + n_tensors + t).to(tl.pointer_type(P_DTYPE)) + start
    m_ptr = tl.load(ptr_table + 2 * n_tensors + t).to(tl.pointer_type(M_DTYPE)) + start
    c_ptr = p_ptr
    if KAHAN:
        c_ptr = tl.load(ptr_table + 3 * n_tensors + t).to(tl.pointer_type(P_DTYPE)) + start
    if ALIGNED:
        # Lets the compiler use 16-byte loads and stores (only in unmasked full blocks).
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    return t, n, p_ptr + offs, g_ptr + offs, m_ptr + offs, c_ptr + offs, offs, remaining


@_jit
def _count_tile(counts, t, g_ptrs, m_ptrs, mask, beta1, one_minus_beta1, P_DTYPE: tl.constexpr,
                M_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    g = _load_f32(g_ptrs, mask, P_DTYPE, MASKED)
    m = _load_f32(m_ptrs, mask, M_DTYPE, MASKED)
    if MAXIMIZE:
        g = -g
    u = _sign(beta1 * m + one_minus_beta1 * g)
    # masked-out lanes loaded g = 0, so they never count as agreeing
    agree = tl.where(u * g > 0, 1, 0)
    tl.atomic_add(counts + t, tl.sum(agree).to(tl.int64))


@_jit(do_not_specialize=["n_tensors"])
def _agree_count_kernel(
    ptr_table, layout, counts, n_tensors, beta1, one_minus_beta1,
    P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """Cautious pre-pass: counts[t] += number of elements of this block with sign(c) * g > 0."""
    t, _, _, g_ptrs, m_ptrs, _, offs, remaining = _block(
        ptr_table, layout, n_tensors, P_DTYPE, M_DTYPE, ALIGNED, ROWS, COLS)
    mask = offs < remaining
    if remaining == ROWS * COLS:
        _count_tile(counts, t, g_ptrs, m_ptrs, mask, beta1, one_minus_beta1, P_DTYPE, M_DTYPE, MAXIMIZE, False)
    else:
        _count_tile(counts, t, g_ptrs, m_ptrs, mask, beta1, one_minus_beta1, P_DTYPE, M_DTYPE, MAXIMIZE, True)


@_jit
def _lion_tile(
    p_ptrs, g_ptrs, m_ptrs, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, seed,
    P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, STOCHASTIC: tl.constexpr, P_STOCHASTIC: tl.constexpr, KAHAN: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr,
):
    p = _load_f32(p_ptrs, mask, P_DTYPE, MASKED)
    g = _load_f32(g_ptrs, mask, P_DTYPE, MASKED)
    m = _load_f32(m_ptrs, mask, M_DTYPE, MASKED)
    new_w, new_m, c, finite = _lion_step(p, g, m, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2,
                                         one_minus_beta2, P_DTYPE, MAXIMIZE, CAUTIOUS, SKIP_NONFINITE, KAHAN, MASKED)

    p_noise = 0
    if P_STOCHASTIC:
        p_noise = _noise16(seed, 1, ROWS, COLS)
    _store_param(p_ptrs, c_ptrs, mask, new_w, p, c, finite, p_noise, P_DTYPE, P_STOCHASTIC, KAHAN, SKIP_NONFINITE,
                 MASKED)

    if STOCHASTIC:
        noise = _noise16(seed, 0, ROWS, COLS)
        _store(m_ptrs, _bf16_from_bits(new_m.to(tl.uint32, bitcast=True), noise), mask, MASKED)
    else:
        _store(m_ptrs, new_m.to(M_DTYPE), mask, MASKED)


@_jit(do_not_specialize=["n_tensors", "seed"])
def _lion_kernel(
    ptr_table, layout, counts, n_tensors, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, seed,
    P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, P_STOCHASTIC: tl.constexpr = False, KAHAN: tl.constexpr = False,
):
    """One Lion step on one block of one tensor (see the module docstring).

    Full blocks run unmasked (so aligned tensors get 16-byte accesses); only a tensor's last,
    partial block pays for the mask.
    """
    t, n, p_ptrs, g_ptrs, m_ptrs, c_ptrs, offs, remaining = _block(
        ptr_table, layout, n_tensors, P_DTYPE, M_DTYPE, ALIGNED, ROWS, COLS, KAHAN)
    mask = offs < remaining
    count = n * 0
    if CAUTIOUS:
        count = tl.load(counts + t)
    if remaining == ROWS * COLS:
        _lion_tile(p_ptrs, g_ptrs, m_ptrs, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, seed, P_DTYPE, M_DTYPE, MAXIMIZE, CAUTIOUS, SKIP_NONFINITE, STOCHASTIC,
                   P_STOCHASTIC, KAHAN, ROWS, COLS, False)
    else:
        _lion_tile(p_ptrs, g_ptrs, m_ptrs, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, seed, P_DTYPE, M_DTYPE, MAXIMIZE, CAUTIOUS, SKIP_NONFINITE, STOCHASTIC,
                   P_STOCHASTIC, KAHAN, ROWS, COLS, True)


# --------------------------------------------------------------------------------------
# 8-bit momentum (state_dtype="int8"): whole blocks per program, the other impls' bits
# --------------------------------------------------------------------------------------


@_jit
def _hash16(index, seed):
    """numerics.random_bits16: 16 random bits from an element's row-major ``index`` (int64) and a
    16-bit ``seed``. Integer ops only (every product below 2**31), so every backend gets the bits
    for_loop gets."""
    x = ((index & 0xFFFF).to(tl.int32) + seed) & 0xFFFF
    x = ((x ^ (x >> 8)) * 0x6D2B) & 0xFFFF
    x = ((x ^ (x >> 7)) * 0x5A35) & 0xFFFF
    return x ^ (x >> 8)


@_jit
def _code_value(codes):
    """The value of each 8-bit code in [-1, 1] (numerics.dequantize_momentum before its scale): an
    fp32 pattern built from the code's bits, or k * 2**-10 for the subnormal codes; both exact."""
    k = codes.to(tl.int32)
    negative = k < 0
    k = tl.where(negative, -k, k)
    normal = ((((k >> _Q_MANTISSA) + _Q_REBIAS) << 23) | ((k & _Q_MANTISSA_MASK) << _Q_DROPPED)).to(
        tl.float32, bitcast=True)
    value = tl.where(k > _Q_MANTISSA_MASK, normal, k.to(tl.float32) * _Q_SUBNORMAL_STEP)
    return tl.where(negative, -value, value)


@_jit
def _dequantize8(codes, scale):
    """numerics.dequantize_momentum of a [rows, EIGHT_BIT_BLOCK] tile of codes with one scale per
    row: each code's value times its row's scale, one rounded fp32 product."""
    return _code_value(codes) * scale[:, None]


@_jit
def _quantize8(m, noise):
    """numerics.quantize_momentum of a [rows, EIGHT_BIT_BLOCK] fp32 tile (lanes past the tensor's
    end hold 0, as the reference's zero padding): each row's scale is its absmax taken on the bit
    patterns (a NaN wins: the scale is NaN), x = m / scale divided with IEEE rounding (``div_rn``:
    Triton's ``/`` may be approximate on a GPU), then the stochastic code from ``noise``. Returns
    (int8 codes, fp32 scales)."""
    magnitude_bits = m.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    scale = tl.max(magnitude_bits, axis=1).to(tl.float32, bitcast=True)
    # An all-zero block (scale 0) gets x = 0 / 1 = 0, not the reference's 0 / 0 = NaN: both are code 0,
    # and the interpreter's numpy does not warn about an invalid division.
    divisor = tl.where(scale == 0.0, 1.0, scale)
    x = tl.math.div_rn(m, tl.broadcast_to(divisor[:, None], m.shape))
    a = tl.abs(x)
    kept = (a.to(tl.int32, bitcast=True) + (noise << _Q_NOISE_SHIFT)) & _Q_KEPT
    normal = (((kept >> 23) - _Q_REBIAS) << _Q_MANTISSA) + ((kept >> _Q_DROPPED) & _Q_MANTISSA_MASK)
    low = tl.where(a < _Q_SUBNORMAL_LIMIT, a, 0.0)
    # A sum >= 0: truncation is the reference's floor (and needs no libdevice call).
    subnormal = (low * _Q_SUBNORMAL_SCALE + noise.to(tl.float32) * (1.0 / 65536.0)).to(tl.int32)
    k = tl.where(a < _Q_SUBNORMAL_LIMIT, subnormal, normal)
    k = tl.where(x != x, 0, k)  # NaN x (a NaN or inf in the block): code 0
    codes = tl.where(x < 0, -k, k).to(tl.int8)
    return codes, scale


@_jit
def _block8(ptr_table, seed_table, layout, n_tensors, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
            ROWS: tl.constexpr, COLS: tl.constexpr, KAHAN: tl.constexpr):
    """:func:`_block` for a tensor with an 8-bit momentum, plus its scales' pointers (one per row:
    the last pointer-table segment), which of the tile's rows exist, the elements' row-major
    indices (the hash's counter) and the tensor's two 16-bit seeds (param, momentum)."""
    t, n, p_ptrs, g_ptrs, m_ptrs, c_ptrs, offs, remaining = _block(
        ptr_table, layout, n_tensors, P_DTYPE, tl.int8, ALIGNED, ROWS, COLS, KAHAN)
    info = tl.load(layout + n_tensors + tl.program_id(0))
    start = (info - (t << 32)) * (ROWS * COLS)
    segment = 4 if KAHAN else 3
    s_ptr = tl.load(ptr_table + segment * n_tensors + t).to(tl.pointer_type(tl.float32)) + start // COLS
    rows = tl.arange(0, ROWS)
    p_seed = tl.load(seed_table + 2 * t)
    m_seed = tl.load(seed_table + 2 * t + 1)
    return (t, n, p_ptrs, g_ptrs, m_ptrs, c_ptrs, s_ptr + rows, rows * COLS < remaining, start + offs, offs,
            remaining, p_seed, m_seed)


@_jit
def _load_momentum8(m_ptrs, s_ptrs, mask, row_mask, MASKED: tl.constexpr):
    if MASKED:
        codes = tl.load(m_ptrs, mask=mask, other=0)
        scale = tl.load(s_ptrs, mask=row_mask, other=0.0)
    else:
        codes = tl.load(m_ptrs)
        scale = tl.load(s_ptrs)
    return _dequantize8(codes, scale)


@_jit
def _count8_tile(counts, t, g_ptrs, m_ptrs, s_ptrs, mask, row_mask, beta1, one_minus_beta1, P_DTYPE: tl.constexpr,
                 MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    g = _load_f32(g_ptrs, mask, P_DTYPE, MASKED)
    m = _load_momentum8(m_ptrs, s_ptrs, mask, row_mask, MASKED)
    if MAXIMIZE:
        g = -g
    u = _sign(beta1 * m + one_minus_beta1 * g)
    agree = tl.where(u * g > 0, 1, 0)  # masked-out lanes loaded g = 0: never agreeing
    tl.atomic_add(counts + t, tl.sum(agree).to(tl.int64))


@_jit(do_not_specialize=["n_tensors"])
def _agree_count8_kernel(
    ptr_table, seed_table, layout, counts, n_tensors, beta1, one_minus_beta1,
    P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    KAHAN: tl.constexpr = False,
):
    """The cautious pre-pass (:func:`_agree_count_kernel`) over 8-bit momenta."""
    t, _, _, g_ptrs, m_ptrs, _, s_ptrs, row_mask, _, offs, remaining, _, _ = _block8(
        ptr_table, seed_table, layout, n_tensors, P_DTYPE, ALIGNED, ROWS, COLS, KAHAN)
    mask = offs < remaining
    if remaining == ROWS * COLS:
        _count8_tile(counts, t, g_ptrs, m_ptrs, s_ptrs, mask, row_mask, beta1, one_minus_beta1, P_DTYPE, MAXIMIZE,
                     False)
    else:
        _count8_tile(counts, t, g_ptrs, m_ptrs, s_ptrs, mask, row_mask, beta1, one_minus_beta1, P_DTYPE, MAXIMIZE,
                     True)


@_jit
def _lion8_tile(
    p_ptrs, g_ptrs, m_ptrs, c_ptrs, s_ptrs, mask, row_mask, index, count, n, lr, decay, beta1, one_minus_beta1,
    beta2, one_minus_beta2, p_seed, m_seed, P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, P_STOCHASTIC: tl.constexpr, KAHAN: tl.constexpr, MASKED: tl.constexpr,
):
    p = _load_f32(p_ptrs, mask, P_DTYPE, MASKED)
    g = _load_f32(g_ptrs, mask, P_DTYPE, MASKED)
    m = _load_momentum8(m_ptrs, s_ptrs, mask, row_mask, MASKED)
    # A skipped element's new_m is its widened momentum, coded again with its block.
    new_w, new_m, c, finite = _lion_step(p, g, m, c_ptrs, mask, count, n, lr, decay, beta1, one_minus_beta1, beta2,
                                         one_minus_beta2, P_DTYPE, MAXIMIZE, CAUTIOUS, SKIP_NONFINITE, KAHAN, MASKED)

    p_noise = 0
    if P_STOCHASTIC:
        # The hash of the param's seed, as every other impl rounds the param: the same bits.
        p_noise = _hash16(index, p_seed)
    _store_param(p_ptrs, c_ptrs, mask, new_w, p, c, finite, p_noise, P_DTYPE, P_STOCHASTIC, KAHAN, SKIP_NONFINITE,
                 MASKED)

    if MASKED:
        # Past the tensor's end the reference pads with zeros (a masked lane's m is 0 * scale: NaN
        # where the scale is inf or NaN), so that the block's new absmax is the existing elements'.
        new_m = tl.where(mask, new_m, 0.0)
    codes, new_scale = _quantize8(new_m, _hash16(index, m_seed))
    _store(m_ptrs, codes, mask, MASKED)
    _store(s_ptrs, new_scale, row_mask, MASKED)


@_jit(do_not_specialize=["n_tensors"])
def _lion8_kernel(
    ptr_table, seed_table, layout, counts, n_tensors, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, P_STOCHASTIC: tl.constexpr = False,
    KAHAN: tl.constexpr = False,
):
    """One Lion step on ROWS whole blocks of one tensor whose momentum is 8-bit: widen the codes,
    step as :func:`_lion_kernel` does, take each block's new absmax and code it again."""
    t, n, p_ptrs, g_ptrs, m_ptrs, c_ptrs, s_ptrs, row_mask, index, offs, remaining, p_seed, m_seed = _block8(
        ptr_table, seed_table, layout, n_tensors, P_DTYPE, ALIGNED, ROWS, COLS, KAHAN)
    mask = offs < remaining
    count = n * 0
    if CAUTIOUS:
        count = tl.load(counts + t)
    if remaining == ROWS * COLS:
        _lion8_tile(p_ptrs, g_ptrs, m_ptrs, c_ptrs, s_ptrs, mask, row_mask, index, count, n, lr, decay, beta1,
                    one_minus_beta1, beta2, one_minus_beta2, p_seed, m_seed, P_DTYPE, MAXIMIZE, CAUTIOUS,
                    SKIP_NONFINITE, P_STOCHASTIC, KAHAN, False)
    else:
        _lion8_tile(p_ptrs, g_ptrs, m_ptrs, c_ptrs, s_ptrs, mask, row_mask, index, count, n, lr, decay, beta1,
                    one_minus_beta1, beta2, one_minus_beta2, p_seed, m_seed, P_DTYPE, MAXIMIZE, CAUTIOUS,
                    SKIP_NONFINITE, P_STOCHASTIC, KAHAN, True)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _dense_strides(t: Tensor) -> bool:
    """True when the tensor's elements fill ``numel`` consecutive slots (any dimension order)."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _layout_problem(p: Tensor, g: Tensor, m: Tensor, c: Tensor | None) -> str | None:
    """Why the kernel cannot update this param as flat memory, or None: it needs the grad in the
    param's dtype, and p, g, m (and the residual) contiguous, or dense with identical strides. With
    an 8-bit (int8) momentum they must be contiguous: its blocks and random bits follow the
    row-major order, which is then the memory order."""
    if g.dtype != p.dtype:
        return f"its grad is {g.dtype} but the param is {p.dtype}"
    tensors = (p, g, m) if c is None else (p, g, m, c)
    if m.dtype == torch.int8 and p.numel() and not all(t.is_contiguous() for t in tensors):
        return "its momentum is 8-bit and a tensor is not contiguous (the blocks run in row-major order)"
    if all(t.is_contiguous() for t in tensors) or p.numel() == 0:
        return None
    for t in tensors:
        if not _dense_strides(t):
            return f"a tensor of shape {tuple(t.shape)} with strides {t.stride()} is not dense"
    if not all(_same_layout(p, t) for t in tensors[1:]):
        return f"its tensors have different memory layouts (strides {[t.stride() for t in tensors]})"
    return None


def _lru_get(cache: OrderedDict, key: tuple) -> Any:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _lru_put(cache: OrderedDict, key: tuple, value: Any, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def _layout_table(device: torch.device, numels: tuple[int, ...]) -> tuple[Tensor, int]:
    """[numel of each tensor] + [(tensor << 32) + block for each block], and the block count."""
    key = (device, numels)
    hit = _lru_get(_layouts, key)
    if hit is not None:
        return hit
    sizes = torch.tensor(numels, dtype=torch.int64)
    blocks = (sizes + BLOCK_SIZE - 1) // BLOCK_SIZE
    n_blocks = int(blocks.sum())
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    within = torch.arange(n_blocks, dtype=torch.int64) - first[owner]
    table = torch.cat([sizes, (owner << 32) + within]).to(device)
    _lru_put(_layouts, key, (table, n_blocks), _LAYOUT_CACHE_SIZE)
    return table, n_blocks


def _group_tables(
    device: torch.device, ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], cs: list[Tensor] | None = None,
    ss: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, int, bool]:
    """(pointer table, layout table, block count, all 16-byte aligned), cached on the addresses:
    segments of params, grads, momenta, then Kahan residuals and 8-bit momenta's block scales when
    there are some."""
    addresses = [t.data_ptr() for ts in (ps, gs, ms, cs or [], ss or []) for t in ts]
    numels = tuple(t.numel() for t in ps)
    key = (device, ps[0].dtype, ms[0].dtype, tuple(addresses), numels)
    hit = _lru_get(_tables, key)
    if hit is not None:
        return hit
    layout, n_blocks = _layout_table(device, numels)
    pointers = torch.tensor(addresses, dtype=torch.int64).to(device)
    aligned = all(a % 16 == 0 for a in addresses)
    entry = (pointers, layout, n_blocks, aligned)
    _lru_put(_tables, key, entry, _TABLE_CACHE_SIZE)
    return entry


def _launch_group(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], cs: list[Tensor] | None, ss: list[Tensor] | None = None,
    *, device: torch.device, hyper: tuple[float, ...], seed: int, maximize: bool, cautious: bool,
    skip_nonfinite: bool, param_rounding: str, tensor_seeds: list[tuple[int, int]] | None = None,
) -> None:
    """One group's launches: ``ss``, the block scales, when its momenta are 8-bit (then
    ``tensor_seeds`` holds each tensor's param and momentum seeds; ``seed`` keys Philox otherwise)."""
    lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2 = hyper
    p_dtype = _PARAM_DTYPES[ps[0].dtype]
    m_dtype = _STATE_DTYPES[ms[0].dtype]
    pointers, layout, n_blocks, aligned = _group_tables(device, ps, gs, ms, cs, ss)
    n_tensors = len(ps)
    grid = (n_blocks,)
    if ss is not None:
        _launch_group8(pointers, layout, grid, n_tensors, ps[0].dtype, aligned, device=device, hyper=hyper,
                       maximize=maximize, cautious=cautious, skip_nonfinite=skip_nonfinite,
                       param_rounding=param_rounding, kahan=cs is not None,
                       tensor_seeds=tensor_seeds or [(0, 0)] * n_tensors)
        return
    # enable_fp_fusion=False: no multiply-add is contracted into an FMA, so each product and sum
    # rounds as torch's separate ops round it (the kernel is memory-bound: this costs nothing).
    common = dict(P_DTYPE=p_dtype, M_DTYPE=m_dtype, MAXIMIZE=maximize, ALIGNED=aligned, ROWS=_ROWS, COLS=_COLS,
                  num_warps=_NUM_WARPS, enable_fp_fusion=False)
    counts = layout  # placeholder pointer, never read without CAUTIOUS
    if cautious:
        counts = torch.zeros(n_tensors, dtype=torch.int64, device=device)
        _agree_count_kernel[grid](pointers, layout, counts, n_tensors, beta1, one_minus_beta1, **common)
    _lion_kernel[grid](
        pointers, layout, counts, n_tensors, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, seed,
        CAUTIOUS=cautious, SKIP_NONFINITE=skip_nonfinite, STOCHASTIC=m_dtype == tl.bfloat16,
        P_STOCHASTIC=p_dtype != tl.float32 and param_rounding == "stochastic", KAHAN=cs is not None, **common,
    )


def _launch_group8(pointers: Tensor, layout: Tensor, grid: tuple[int], n_tensors: int, p_dtype: torch.dtype,
                   aligned: bool, *, device: torch.device, hyper: tuple[float, ...], maximize: bool, cautious: bool,
                   skip_nonfinite: bool, param_rounding: str, kahan: bool, tensor_seeds: list[tuple[int, int]]) -> None:
    """The 8-bit momentum kernel's launches (the cautious count first), [8, 256] tiles: a row a block."""
    lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2 = hyper
    # The seeds change every step: a small int32 table of them, copied each launch.
    seeds = torch.tensor(tensor_seeds, dtype=torch.int32).view(-1).to(device)
    common = dict(P_DTYPE=_PARAM_DTYPES[p_dtype], MAXIMIZE=maximize, ALIGNED=aligned, ROWS=_Q_ROWS, COLS=_Q_COLS,
                  KAHAN=kahan, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    counts = layout  # placeholder pointer, never read without CAUTIOUS
    if cautious:
        counts = torch.zeros(n_tensors, dtype=torch.int64, device=device)
        _agree_count8_kernel[grid](pointers, seeds, layout, counts, n_tensors, beta1, one_minus_beta1, **common)
    _lion8_kernel[grid](
        pointers, seeds, layout, counts, n_tensors, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
        CAUTIOUS=cautious, SKIP_NONFINITE=skip_nonfinite,
        P_STOCHASTIC=p_dtype != torch.float32 and param_rounding == "stochastic", **common,
    )


def _aligned(*tensors: Tensor | None) -> bool:
    """Whether every data pointer is 16-byte aligned, as the kernel's vector accesses need."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not INTERPRET and not torch.cuda.is_available():
            raise RuntimeError("Lion: tensors are on CUDA but CUDA is not available")
    elif device.type != "cpu" or not INTERPRET:
        hint = (" On CPU it runs only under Triton's interpreter: set TRITON_INTERPRET=1 before triton is first "
                "imported (for tests; impl='cpp' and 'foreach' are the CPU implementations)."
                if device.type == "cpu" else "")
        raise RuntimeError(f"Lion: the Triton kernel cannot run on {device.type!r} tensors.{hint}")


def _run_group(ps, gs, ms, cs, ss=None, *, device: torch.device, **kwargs: Any) -> None:
    """One group's launch on its device (staged through CPU copies for CUDA tensors under the
    interpreter, which dereferences table addresses on the host), then the version bump."""
    if device.type == "cpu":
        _launch_group(ps, gs, ms, cs, ss, device=device, **kwargs)
    elif INTERPRET:
        staged = [[t.detach().cpu() for t in ts] for ts in (ps, gs, ms, cs or [], ss or [])]
        _launch_group(*staged[:3], staged[3] if cs is not None else None, staged[4] if ss is not None else None,
                      device=torch.device("cpu"), **kwargs)
        with torch.no_grad():
            for dst, src in zip(ps + ms + (cs or []) + (ss or []), staged[0] + staged[2] + staged[3] + staged[4]):
                dst.copy_(src)
    else:
        with torch.cuda.device(device):
            _launch_group(ps, gs, ms, cs, ss, device=device, **kwargs)
    # The kernel writes through raw pointers, which autograd cannot see: bump the version counters
    # as an in-place torch op would (catches use of a stale saved tensor).
    increment_version(ps + ms + (cs or []) + (ss or []))


# ---------------------------------------------------------------------------------------------
# The self-check: the kernel's first run in a process, per device and kind, on a small probe
# ---------------------------------------------------------------------------------------------

# (device, param dtype, momentum dtype, Kahan, aligned, maximize, cautious, skip, param rounding) -> why the
# kernel's result differed from the reference on the probe, or None when it agreed.
_verdicts: dict[tuple, str | None] = {}


def _probe(device: torch.device, p_dtype: torch.dtype, m_dtype: torch.dtype, kahan: bool, aligned: bool):
    """Params, grads, momenta, residuals and (8-bit momenta) block scales of the probe: a lone
    element, a full block and a partial one; zeros (sign 0), NaN and inf grads, large weights (bf16
    steps under half an ulp); views at a storage offset when the kind is the misaligned one. An
    8-bit momentum's first block of 256 is all zeros with its grads (scale 0), and every third
    element is 1000x smaller than the rest (the subnormal codes)."""
    gen = torch.Generator().manual_seed(20240611)
    eight_bit = m_dtype == torch.int8
    tensors = []
    for n in (1, BLOCK_SIZE + 37):
        p = torch.randn(n, generator=gen) * 4
        g = torch.randn(n, generator=gen)
        m = torch.randn(n, generator=gen) * 0.1
        g[: n // 7] = 0.0
        m[: n // (7 if eight_bit else 14)] = 0.0
        if n > 8:
            g[-4:] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
        c = p * 2**-10 * torch.rand(n, generator=gen)
        if eight_bit:
            m[::3] *= 1e-3
            codes, scale = quantize_momentum(m, 4242)
            tensors.append([p.to(p_dtype), g.to(p_dtype), codes, c.to(p_dtype), scale])
        else:
            tensors.append([t.to(dtype) for t, dtype in ((p, p_dtype), (g, p_dtype), (m, m_dtype), (c, p_dtype))])
    out = []
    for ts in tensors:
        placed = []
        for t in ts:
            holder = torch.zeros(t.numel() + (0 if aligned else 1), dtype=t.dtype, device=device)
            view = holder[0 if aligned else 1:]
            view.copy_(t)
            placed.append(view)
        out.append(placed)
    ps, gs, ms, cs = ([t[i] for t in out] for i in range(4))
    return ps, gs, ms, (cs if kahan else None), ([t[4] for t in out] if eight_bit else None)


def _first_difference(kernel: Tensor, reference: Tensor, what: str, steps: int,
                      slack: Tensor | None = None) -> str | None:
    """Where the kernel's tensor differs from the reference's by more than ``steps`` steps of the bit
    pattern (0 where the arithmetic and rounding are the same, 1 for Philox stochastic rounding:
    either neighbour) and, when ``slack`` is given, by more than ``slack`` in value; NaN against NaN
    agrees."""
    nan = kernel.isnan() | reference.isnan()
    both_nan = kernel.isnan() & reference.isnan()
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32}[kernel.element_size()]
    a, b = kernel.view(as_int).long(), reference.view(as_int).long()
    bad = (a - b).abs() > steps
    if slack is not None:
        bad &= (kernel.double() - reference.double()).abs() > slack
    bad = (bad & ~nan) | (nan & ~both_nan)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    return (f"{what} of {kernel.numel()} elements, element {i}: kernel {float(kernel[i])!r}, reference "
            f"{float(reference[i])!r}")


def _cautious_slack(p: Tensor, g: Tensor, m: Tensor, c: Tensor | None, s: Tensor | None, lr: float, decay: float,
                    beta1: float, maximize: bool) -> Tensor:
    """How far a cautious weight may lie from the reference's in value: two fp32 roundings of its
    terms, ``2**-22 * (|w| * |decay| + lr / fraction)``. The kernel computes the agreeing fraction
    as torch's CPU mean does (an fp32 quotient), bit for bit against a CPU reference; torch's CUDA
    mean may round it differently, which moves the update lr / fraction by an fp32 ulp."""
    g32 = -g.float() if maximize else g.float()
    agree = (torch.sign(interpolate(load_momentum(m, s), g32, beta1)) * g32 > 0).float()
    fraction = max(float(agree.mean()), 1e-3)
    w = p.double() + (0.0 if c is None else c.double())
    return 2.0**-22 * (w.abs() * abs(decay) + lr / fraction)


def _self_check(key: tuple, hyper: tuple[float, ...], param_rounding: str) -> str | None:
    """Run the kernel once on the probe of ``key``'s kind and compare with numerics.lion_tensor."""
    verdict = _verdicts.get(key, ...)
    if verdict is not ...:
        return verdict
    device, p_dtype, m_dtype, kahan, aligned, maximize, cautious, skip_nonfinite, _ = key
    ps, gs, ms, cs, ss = _probe(device, p_dtype, m_dtype, kahan, aligned)
    refs = [[t.clone() for t in ts] for ts in (ps, ms, cs or [], ss or [])]
    lr, decay, beta1, _, beta2, _ = hyper
    stochastic_param = p_dtype != torch.float32 and param_rounding == "stochastic"
    slacks = [None] * len(ps)
    if cautious:
        slacks = [_cautious_slack(ps[i], gs[i], ms[i], cs[i] if kahan else None, ss[i] if ss is not None else None,
                                  lr, decay, beta1, maximize) for i in range(len(ps))]
    # The 8-bit kernel rounds with the hash of these seeds, as lion_tensor does: the same bits.
    tensor_seeds = [(1000 + 17 * i, 50000 + 31 * i) for i in range(len(ps))]
    _run_group(ps, gs, ms, cs, ss, device=device, hyper=hyper, seed=12345 + (6789 << 32), maximize=maximize,
               cautious=cautious, skip_nonfinite=skip_nonfinite, param_rounding=param_rounding,
               tensor_seeds=tensor_seeds if ss is not None else None)
    for i, g in enumerate(gs):
        p_seed, m_seed = tensor_seeds[i] if ss is not None else (None, None)
        lion_tensor(refs[0][i], g, refs[1][i], refs[2][i] if kahan else None, lr, decay, beta1, beta2,
                    p_seed if stochastic_param else None, m_seed, maximize, cautious, skip_nonfinite,
                    refs[3][i] if ss is not None else None)
    # Philox bits (all but the 8-bit kernel) may land a stochastic store on the other neighbour; under
    # cautious a bf16/fp16 weight may cross a rounding boundary (its fp32 value within the slack).
    param_steps = (1 if stochastic_param and ss is None else 0) + (1 if cautious and p_dtype != torch.float32 else 0)
    verdict = None
    for i in range(len(ps)):
        slack = slacks[i]
        residual_slack = None
        if slack is not None and kahan:  # the residual takes up the weight's difference, then is rounded
            residual_slack = slack + 2.0**-8 * refs[2][i].double().abs() + 2.0**-24
        verdict = (_first_difference(ps[i], refs[0][i], "param", param_steps, slack)
                   or _first_difference(ms[i], refs[1][i], "momentum", 0 if m_dtype != torch.bfloat16 else 1)
                   or (_first_difference(ss[i], refs[3][i], "block scale", 0) if ss is not None else None)
                   or (_first_difference(cs[i], refs[2][i], "Kahan residual", param_steps, residual_slack)
                       if kahan else None))
        if verdict is not None:
            break
    _verdicts[key] = verdict
    if verdict is not None:
        warnings.warn(f"Lion: the Triton kernel's step differs from the reference on {device} for {p_dtype} params "
                      f"with {m_dtype} momentum (param_rounding={param_rounding!r}, cautious={cautious}, "
                      f"aligned={aligned}): {verdict}. Tensors of this kind run in foreach in this process.",
                      stacklevel=4)
    return verdict


def _launch_all(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], cs: list[Tensor | None], *, lr: float, decay: float,
    beta1: float, beta2: float, maximize: bool, cautious: bool, skip_nonfinite: bool, param_rounding: str,
    seed: int | None, self_check: bool, ss: list[Tensor | None] | None = None,
    tensor_seeds: list[tuple[int, int]] | None = None,
) -> list[int]:
    """One launch per (device, param dtype, momentum dtype, Kahan, 16-byte aligned) group: a
    misaligned view gets element accesses without taking its group's vector accesses away. With
    ``self_check``, a kind's first launch in the process is preceded by the probe, and a kind that
    failed it is not launched: the indices of its tensors are returned. ``ss``: each 8-bit
    momentum's block scales (None for the others); ``tensor_seeds``: each tensor's 16-bit (param,
    momentum) seeds, the 8-bit kernel's random bits (``seed`` keys the others' Philox bits)."""
    ss = [None] * len(ps) if ss is None else ss
    tensor_seeds = [(0, 0)] * len(ps) if tensor_seeds is None else tensor_seeds
    groups: dict[tuple, tuple[list, ...]] = {}
    for i, (p, g, m, c, s) in enumerate(zip(ps, gs, ms, cs, ss)):
        if p.numel() == 0:
            continue
        group = groups.setdefault((p.device, p.dtype, m.dtype, c is not None, _aligned(p, g, m, c, s)),
                                  ([], [], [], [], [], [], []))
        for lst, t in zip(group, (p, g, m, c, s, tensor_seeds[i], i)):
            if t is not None:
                lst.append(t)
    if not groups:
        return []
    for device, *_ in groups:
        _check_device(device)
    # The 8-bit kernel hashes the per-tensor seeds instead: it needs no Philox seed.
    needs_bits = any(m_dtype == torch.bfloat16 or (m_dtype != torch.int8 and p_dtype != torch.float32
                                                   and param_rounding == "stochastic")
                     for _, p_dtype, m_dtype, _, _ in groups)
    if seed is None and needs_bits:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    seed = 0 if seed is None else int(seed)
    hyper = (float(lr), float(decay), float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2))
    flags = dict(maximize=bool(maximize), cautious=bool(cautious), skip_nonfinite=bool(skip_nonfinite))
    left: list[int] = []
    for k, (key, (gps, ggs, gms, gcs, gss, gseeds, indices)) in enumerate(groups.items()):
        device, p_dtype, m_dtype, kahan, _ = key
        if self_check:
            rounding = param_rounding if p_dtype != torch.float32 else "nearest"
            if _self_check((*key, *flags.values(), rounding), hyper, param_rounding) is not None:
                left += indices
                continue
        # Philox key: low word the seed, high word the group (+1 keeps the value above 2**32, so the
        # argument is always an int64 and never selects another specialisation).
        group_seed = (seed & 0xFFFFFFFF) + ((k + 1) << 32)
        eight_bit = m_dtype == torch.int8
        _run_group(gps, ggs, gms, gcs if kahan else None, gss if eight_bit else None, device=device, hyper=hyper,
                   seed=group_seed, param_rounding=param_rounding, tensor_seeds=gseeds if eight_bit else None,
                   **flags)
    return sorted(left)


def _philox_seed(seeds: Tensor) -> int:
    """A 31-bit Philox seed from a group's per-tensor seeds (``with_seeds``: 16-bit values, 0 where
    a store is not stochastic): a polynomial hash of them all, so it changes whenever any drawn
    seed does, and the step draws nothing more from torch's generator than the other impls."""
    seed = 0
    for value in seeds.flatten().tolist():
        seed = (seed * 65537 + value + 1) & 0x7FFFFFFF
    return seed


def triton_lion(groups: list[StepGroup], *, skip_nonfinite: bool) -> list[list[int]]:
    """The ``triton`` impl for the dispatcher: tensors already local and checked. Updates those
    it takes (:func:`_layout_problem`) and returns, per group, the indices of the rest, untouched.
    Where a group's seeds say a store rounds stochastically, the Philox seed is derived from
    them (:func:`_philox_seed`): no draw of its own, so the generator's stream is every impl's.
    The 8-bit kernel hashes each tensor's own seeds, as for_loop does."""
    lefts = []
    for group in groups:
        taken = [_layout_problem(p, g, m, c) is None
                 for p, g, m, c in zip(group.params, group.grads, group.exp_avgs, group.kahan_comps)]
        left = [i for i, ok in enumerate(taken) if not ok]
        kept = [i for i, ok in enumerate(taken) if ok]
        part = group.subset(kept) if left else group
        failed = _launch_all(part.params, part.grads, part.exp_avgs, part.kahan_comps, lr=part.lr, decay=part.decay,
                             beta1=part.beta1, beta2=part.beta2, maximize=part.maximize, cautious=part.cautious,
                             skip_nonfinite=skip_nonfinite, param_rounding=part.param_rounding,
                             seed=None if part.seeds is None else _philox_seed(part.seeds),
                             self_check=True, ss=part.scales(),
                             tensor_seeds=None if part.seeds is None else [tuple(s) for s in part.seeds.tolist()])
        left += [kept[i] for i in failed]
        lefts.append(sorted(left))
    return lefts


def triton_lion_(
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
    param_rounding: str = "stochastic",
    kahan_comps: list[Tensor | None] | None = None,
    seed: int | None = None,
    exp_avg_scales: list[Tensor | None] | None = None,
) -> None:
    """One Lion step over lists of tensors with the fused Triton kernel alone, in place.

    ``params`` and ``exp_avgs`` are updated; see the module docstring for the semantics,
    supported dtypes and layouts. ``param_rounding`` is how bf16/fp16 params are stored:
    ``"stochastic"`` (default), ``"nearest"``, or ``"kahan"``, which needs ``kahan_comps``: one
    residual tensor per bf16/fp16 param, of its dtype and shape (None for fp32 params).
    ``seed`` feeds the stochastic rounding (``None``: drawn from torch's default generator). An
    8-bit (int8) momentum comes with its block scales in ``exp_avg_scales`` (None for the others;
    see ``numerics.quantize_momentum``), both updated; its tensor's 16-bit param and momentum
    seeds are drawn from a generator seeded with ``seed`` (or from torch's default one). All
    inputs are validated before any tensor is modified: a tensor the kernel cannot update is a
    ``ValueError`` here (``lion_hf.Lion`` and ``lion()`` run such tensors with ``foreach``
    instead), and a device it cannot run on a ``RuntimeError``.
    """
    if param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"triton_lion_: param_rounding must be one of {PARAM_ROUNDINGS}, got {param_rounding!r}")
    if kahan_comps is None or param_rounding != "kahan":
        kahan_comps = [None] * len(params)
    if exp_avg_scales is None:
        exp_avg_scales = [None] * len(params)
    if not (len(params) == len(grads) == len(exp_avgs) == len(kahan_comps) == len(exp_avg_scales)):
        raise ValueError(
            f"triton_lion_: got {len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
            f"{len(kahan_comps)} kahan_comps and {len(exp_avg_scales)} exp_avg_scales"
        )
    ps, gs, ms, cs, ss = [], [], [], [], []
    for i, (param, grad, exp_avg, comp, scale) in enumerate(zip(params, grads, exp_avgs, kahan_comps,
                                                                 exp_avg_scales)):
        p, g, m = local(param), local(grad), local(exp_avg)
        if p.dtype not in _PARAM_DTYPES:
            raise ValueError(f"triton_lion_: param {i} has dtype {p.dtype}; supported: fp32, bf16, fp16")
        if m.dtype not in _STATE_DTYPES:
            raise ValueError(f"triton_lion_: exp_avg {i} has dtype {m.dtype}; supported: fp32, bf16, int8 (8-bit)")
        if not (p.shape == g.shape == m.shape):
            raise ValueError(f"triton_lion_: param {i}, its grad and exp_avg differ in shape: "
                             f"{tuple(p.shape)}, {tuple(g.shape)}, {tuple(m.shape)}")
        if not (p.device == g.device == m.device):
            raise ValueError(f"triton_lion_: param {i}, its grad and exp_avg are on {p.device}, {g.device}, "
                             f"{m.device}")
        if g.is_sparse:
            raise ValueError(f"triton_lion_: grad {i} is sparse; Lion needs dense gradients")
        if g.dtype != p.dtype:
            raise ValueError(f"triton_lion_: grad {i} has dtype {g.dtype} but its param is {p.dtype}")
        c = None
        if param_rounding == "kahan" and p.dtype != torch.float32:
            if comp is None:
                raise ValueError(f"triton_lion_: param_rounding='kahan' needs kahan_comps[{i}] for a {p.dtype} param")
            c = local(comp)
            if c.dtype != p.dtype or c.shape != p.shape or c.device != p.device or c.stride() != p.stride():
                raise ValueError(
                    f"triton_lion_: kahan_comps[{i}] must match its param's dtype, shape, device and strides; got "
                    f"{c.dtype} {tuple(c.shape)} on {c.device} for {p.dtype} {tuple(p.shape)} on {p.device}"
                )
        s = None
        if m.dtype == torch.int8 or scale is not None:
            blocks = eight_bit_scale_numel(m.numel())
            if m.dtype != torch.int8 or scale is None:
                raise ValueError(f"triton_lion_: exp_avg {i} is {m.dtype} "
                                 f"{'without' if scale is None else 'with'} exp_avg_scales[{i}]: an int8 (8-bit) "
                                 "momentum, and only one, comes with its block scales")
            s = local(scale)
            if (s.dtype != torch.float32 or s.dim() != 1 or s.numel() != blocks or s.device != m.device
                    or not s.is_contiguous()):
                raise ValueError(f"triton_lion_: exp_avg_scales[{i}] must be a contiguous 1-D float32 tensor of "
                                 f"{blocks} elements on {m.device}; got {s.dtype} {tuple(s.shape)} on {s.device}")
        problem = _layout_problem(p, g, m, c)
        if problem is not None:
            raise ValueError(f"triton_lion_: param {i}: {problem}; the Triton kernel updates flat memory: make "
                             "them contiguous or use impl='foreach'")
        for lst, t in zip((ps, gs, ms, cs, ss), (p, g, m, c, s)):
            lst.append(t)
    tensor_seeds = None
    if any(s is not None for s in ss):
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        tensor_seeds = [tuple(s) for s in torch.randint(0, 1 << 16, (len(ps), 2), generator=gen).tolist()]
    _launch_all(ps, gs, ms, cs, lr=lr, decay=1.0 - float(lr) * float(weight_decay), beta1=beta1, beta2=beta2,
                maximize=maximize, cautious=cautious, skip_nonfinite=skip_nonfinite, param_rounding=param_rounding,
                seed=seed, self_check=False, ss=ss, tensor_seeds=tensor_seeds)


# ---------------------------------------------------------------------------------------------
# DistributedLion's sign pass and vote (the wire format: lion_hf.optim.signs)
# ---------------------------------------------------------------------------------------------

_VOTE_BLOCK = 1024
_SIGN_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SIGN_STATE_DTYPES = {**_SIGN_DTYPES, torch.int8: tl.int8}


@_jit
def _trits_kernel(g_ptr, m_ptr, s_ptr, out_ptr, n, beta1, one_minus_beta1, flip, G_DTYPE: tl.constexpr,
                  M_DTYPE: tl.constexpr, ZERO_NONFINITE: tl.constexpr, BLOCK: tl.constexpr):
    """trit = sign(c) + 1 of ``c = m * beta1 + g' * (1 - beta1)`` (``g' = g * flip``, -1 under
    maximize), as two rounded products and a sum (numerics.interpolate); sign(NaN) = 0, and an
    element with a NaN/inf gradient sends 0 under ZERO_NONFINITE. An 8-bit (int8) momentum is
    widened with its block's scale (``s_ptr``: the block scales; unused otherwise)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = _load_f32(g_ptr + offsets, mask, G_DTYPE, True) * flip
    if M_DTYPE == tl.int8:
        codes = tl.load(m_ptr + offsets, mask=mask, other=0)
        scale = tl.load(s_ptr + offsets // _Q_BLOCK, mask=mask, other=0.0)
        m = _code_value(codes) * scale
    else:
        m = _load_f32(m_ptr + offsets, mask, M_DTYPE, True)
    product_m = m * beta1
    product_g = g * one_minus_beta1
    c = product_m + product_g
    if ZERO_NONFINITE:
        c = tl.where(tl.abs(g) < float("inf"), c, 0.0)
    trit = tl.where(c > 0, 2, tl.where(c < 0, 0, 1)).to(tl.uint8)
    tl.store(out_ptr + offsets, trit, mask=mask)


@_jit
def _vote_kernel(gathered_ptr, row_bytes, world, out_ptr, numel, nbytes, full_bytes, last_size, inv_world,
                 CHUNK: tl.constexpr, ZERO_SIGNS: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr):
    """The combined update of every element from every rank's packed signs (one row per rank):
    per packed byte, its five digits summed over the ranks, then sign(sum) (majority) or
    sum * (1 / world) (average), written to the element each digit stands for (planar chunks:
    element ``o`` of a chunk of S bytes is digit ``o // S`` of byte ``o % S``)."""
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = b < nbytes
    full = b < full_bytes
    size = tl.where(full, CHUNK, last_size)
    chunk_byte = tl.where(full, (b // CHUNK) * CHUNK, full_bytes)
    chunk_element = chunk_byte * 5
    weight = 1
    for d in tl.static_range(5):
        total = tl.zeros([BLOCK], dtype=tl.int32)
        for r in range(world):
            byte = tl.load(gathered_ptr + r * row_bytes + b, mask=in_range, other=ZERO_SIGNS).to(tl.int32)
            total += (byte // weight) % 3 - 1
        element = chunk_element + d * size + (b - chunk_byte)
        if AVERAGE:
            value = total.to(tl.float32) * inv_world
        else:
            value = tl.where(total > 0, 1.0, tl.where(total < 0, -1.0, 0.0))
        tl.store(out_ptr + element, value, mask=in_range & (element < numel))
        weight = weight * 3


def _runs_here(device: torch.device) -> bool:
    return device.type == "cpu" if INTERPRET else device.type == "cuda"


def triton_signs(groups: list[StepGroup], trits: Tensor, *, zero_nonfinite: bool) -> bool:
    """DistributedLion's first pass (see ``for_loop.for_loop_signs``): each tensor's trits added
    into ``trits`` (uint8, the step's elements in order), one launch per tensor. False, with
    nothing written, when a tensor is one the kernel does not take (not contiguous, not on the
    device the kernel runs on): the step's signs then run in foreach. An 8-bit momentum is widened
    with its block scales, as ``numerics.dequantize_momentum`` widens it (the same fp32 product)."""
    tensors = [(g, m, s, group) for group in groups for g, m, s in zip(group.grads, group.exp_avgs, group.scales())]
    if not _runs_here(trits.device) or not all(
            g.is_contiguous() and m.is_contiguous() and g.device == trits.device and m.device == trits.device
            and g.dtype in _SIGN_DTYPES and m.dtype in _SIGN_STATE_DTYPES
            and (m.dtype != torch.int8 or (s is not None and s.is_contiguous() and s.device == m.device))
            for g, m, s, _ in tensors):
        return False
    offset = 0
    for g, m, s, group in tensors:
        n = g.numel()
        if n:
            _trits_kernel[(triton.cdiv(n, _VOTE_BLOCK),)](
                g, m, m if s is None else s, trits[offset:offset + n], n, group.beta1, 1.0 - group.beta1,
                -1.0 if group.maximize else 1.0, G_DTYPE=_SIGN_DTYPES[g.dtype], M_DTYPE=_SIGN_STATE_DTYPES[m.dtype],
                ZERO_NONFINITE=zero_nonfinite, BLOCK=_VOTE_BLOCK)
        offset += n
    return True


def triton_vote(gathered: Tensor, numel: int, vote: str) -> Tensor | None:
    """The fp32 update of ``numel`` elements voted from ``gathered`` ((world size, packed bytes)
    uint8, headers cut off), as ``signs.combine_signs`` computes it; None when the kernel does not
    run on its device."""
    if not _runs_here(gathered.device):
        return None
    gathered = gathered.contiguous()
    world, nbytes = gathered.shape
    full = nbytes // CHUNK_BYTES * CHUNK_BYTES
    out = torch.empty(numel, dtype=torch.float32, device=gathered.device)
    if nbytes:
        _vote_kernel[(triton.cdiv(nbytes, _VOTE_BLOCK),)](
            gathered, nbytes, world, out, numel, nbytes, full, nbytes - full, 1.0 / world, CHUNK=CHUNK_BYTES,
            ZERO_SIGNS=ZERO_SIGNS_BYTE, AVERAGE=vote == "average", BLOCK=_VOTE_BLOCK)
    return out
