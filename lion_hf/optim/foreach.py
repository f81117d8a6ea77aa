"""``impl="foreach"``: the step in ``torch._foreach_*`` ops, for any device torch runs on.

The portable impl: no compiler, any accelerator, and what the fused kernels do not take (see
``dispatch``). The arithmetic is :func:`~lion_hf.optim.numerics.lion_tensor`'s, op for op, over
lists of tensors that share a device and dtypes; a low-precision param or momentum is then
stored tensor by tensor, with the seeds ``for_loop`` would use for it.

On CPU an all-fp32 list runs in cache-sized rounds: each foreach op streams its whole list
through memory, so the ops of one step over whole lists would move about a dozen model-sized
arrays; over rounds that fit in the last-level cache memory sees p, g and m about once. The
rounds run the same ops on the same elements, so the result is bit for bit the same.

An 8-bit momentum runs in rounds of whole blocks on every device (``numerics.eight_bit_chunks``:
its tensors cut into chunks, each with its slice of the block scales and offset seeds), so that
its fp32 value, the new codes and the other temporaries take a few MB at a time, not several
fp32 copies of the model's largest tensor. Under ``cautious`` (its rescaling is a mean over a
whole tensor) and for a tensor that is not contiguous, the bucket runs whole.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    EIGHT_BIT_CHUNK,
    StepGroup,
    any_nonfinite,
    cautious_update,
    eight_bit_chunks,
    load_momentum,
    offset_seed,
    param_stochastic,
    store_momentum,
    store_param,
)
from lion_hf.optim.signs import write_trits

__all__ = ["FOREACH_CACHE_ROUND", "cache_rounds", "foreach_lion", "foreach_signs", "foreach_vote_apply"]

# Elements per round of the CPU path: 1 MB of fp32 per list, so that p, g, m and the update of
# a round (4 MB) stay in the last-level cache of most CPUs. docs/implementations.md has the
# measurement behind the choice.
FOREACH_CACHE_ROUND = 1 << 18


def cache_rounds(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor]) -> list[tuple[list, ...]]:
    """Split lists of params, grads and momenta into rounds (params, grads, momenta, Kahan
    residuals: None) of about :data:`FOREACH_CACHE_ROUND` elements: a large tensor is cut into
    slices of its flat view, small ones share a round. A non-contiguous tensor (which has no
    flat view) is a piece of its own."""
    size = FOREACH_CACHE_ROUND
    rounds: list[tuple[list, ...]] = []
    current: tuple[list, ...] = ([], [], [], [])
    filled = 0
    for p, g, m in zip(ps, gs, ms):
        if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
            flat = (p.view(-1), g.view(-1), m.view(-1))
            pieces = [tuple(t[i:i + size] for t in flat) for i in range(0, flat[0].numel(), size)]
        else:
            pieces = [(p, g, m)]
        for piece in pieces:
            current[3].append(None)
            for lst, t in zip(current, piece):
                lst.append(t)
            filled += piece[0].numel()
            if filled >= size:
                rounds.append(current)
                current, filled = ([], [], [], []), 0
    if current[0]:
        rounds.append(current)
    return rounds


def _eight_bit_pieces(tensors: tuple, seeds: tuple[int, int] | None, scale: Tensor):
    """One tensor with an 8-bit momentum (``tensors``: its param, grad, momentum, Kahan residual or
    None, given update or None, each of its shape) as pieces (the same five, then its (param,
    momentum) seeds and block scales, and the piece's first element): chunks of their flat views
    when all are contiguous, else the tensor whole."""
    if not all(t.is_contiguous() for t in tensors if t is not None):
        return [(*tensors, seeds, scale, 0)]
    flat = [None if t is None else t.view(-1) for t in tensors]
    pieces = []
    for start, stop in eight_bit_chunks(tensors[0].numel()):
        piece_seeds = None if seeds is None else (offset_seed(seeds[0], start), offset_seed(seeds[1], start))
        pieces.append((*(None if t is None else t[start:stop] for t in flat), piece_seeds,
                       scale[start // EIGHT_BIT_BLOCK:-(-stop // EIGHT_BIT_BLOCK)], start))
    return pieces


def _eight_bit_rounds(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], cs: list[Tensor | None],
                     seeds: list[tuple[int, int]], updates: list[Tensor] | None,
                     scales: list[Tensor]) -> list[tuple[list, ...]]:
    """Lists of tensors with 8-bit momenta cut into rounds (params, grads, momenta, Kahan residuals,
    seeds, updates or None, block scales) of about :data:`~lion_hf.optim.numerics.EIGHT_BIT_CHUNK`
    elements: a large tensor in chunks of whole blocks, small ones sharing a round."""
    given = [None] * len(ps) if updates is None else updates
    rounds: list[tuple[list, ...]] = []
    current: tuple[list, ...] = ([], [], [], [], [], [], [])
    filled = 0
    for p, g, m, c, pair, u, scale in zip(ps, gs, ms, cs, seeds, given, scales):
        for p_i, g_i, m_i, c_i, u_i, pair_i, scale_i, _ in _eight_bit_pieces((p, g, m, c, u), pair, scale):
            for lst, t in zip(current, (p_i, g_i, m_i, c_i, pair_i, u_i, scale_i)):
                lst.append(t)
            filled += p_i.numel()
            if filled >= EIGHT_BIT_CHUNK:
                rounds.append(current)
                current, filled = ([], [], [], [], [], [], []), 0
    if current[0]:
        rounds.append(current)
    if updates is None:
        rounds = [(*r[:5], None, r[6]) for r in rounds]
    return rounds


def foreach_lion(groups: list[StepGroup], *, skip_nonfinite: bool) -> list[list[int]]:
    """One step over the groups' plain (local) tensors, already checked by the dispatcher; takes
    every tensor (returns no leftovers). Each group is bucketed by (device, param dtype, grad
    dtype, momentum dtype, Kahan residual or not)."""
    for group in groups:
        _foreach_group(group, None, mask_params=skip_nonfinite, mask_momenta=skip_nonfinite)
    return [[] for _ in groups]


def foreach_signs(groups: list[StepGroup], trits: Tensor, *, zero_nonfinite: bool) -> None:
    """DistributedLion's first pass (see ``for_loop.for_loop_signs``): ``c`` of each group in
    foreach ops, its signs added to ``trits``; an 8-bit momentum's in chunks of whole blocks."""
    offset = 0
    for group in groups:
        # (grad, momentum, block scales, the piece's first element in trits) of each piece.
        pieces = []
        for g, m, scale in zip(group.grads, group.exp_avgs, group.scales()):
            if scale is None:
                pieces.append((g, m, None, offset))
            else:
                pieces += [(g_i, m_i, scale_i, offset + start)
                           for g_i, m_i, _, _, _, _, scale_i, start in _eight_bit_pieces((g, m, None, None, None),
                                                                                          None, scale)]
            offset += g.numel()
        # The whole tensors in one list, each 8-bit round in its own.
        batches = [[piece for piece in pieces if piece[2] is None]]
        batches += [[piece] for piece in pieces if piece[2] is not None]
        for batch in batches:
            if not batch:
                continue
            g32 = [g if g.dtype == torch.float32 else g.float() for g, _, _, _ in batch]
            if group.maximize:
                g32 = torch._foreach_neg(g32)
            m32 = [m if m.dtype == torch.float32 else load_momentum(m, scale) for _, m, scale, _ in batch]
            for g, ci, (_, _, _, at) in zip(g32, _interpolate(m32, g32, group.beta1), batch):
                if zero_nonfinite:
                    ci = torch.where(torch.isfinite(g), ci, 0.0)
                write_trits(trits[at:at + g.numel()], ci)


def foreach_vote_apply(groups: list[StepGroup], update: Tensor, *, keep_nonfinite_momentum: bool) -> None:
    """DistributedLion's second pass (see ``for_loop.for_loop_vote_apply``): Lion's foreach step with
    the voted ``update`` in place of each rank's own sign."""
    offset = 0
    for group in groups:
        updates = []
        for p in group.params:
            updates.append(update[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        _foreach_group(group, updates, mask_params=False, mask_momenta=keep_nonfinite_momentum)


def _foreach_group(group: StepGroup, updates: list[Tensor] | None, *, mask_params: bool, mask_momenta: bool) -> None:
    """The group's step in buckets of one (device, param dtype, grad dtype, momentum dtype, Kahan
    residual or not); ``updates``: one given update per tensor (else each tensor's own sign)."""
    pairs = [(0, 0)] * len(group.params) if group.seeds is None else group.seeds.tolist()
    given = [None] * len(group.params) if updates is None else updates
    buckets: dict[tuple, list[list]] = defaultdict(lambda: [[], [], [], [], [], [], []])
    for p, g, m, comp, pair, u, scale in zip(group.params, group.grads, group.exp_avgs, group.kahan_comps, pairs,
                                             given, group.scales()):
        if p.numel() == 0:
            continue
        bucket = buckets[(p.device, p.dtype, g.dtype, m.dtype, comp is not None)]
        for lst, t in zip(bucket, (p, g, m, comp, pair, u, scale)):
            lst.append(t)

    flags = dict(lr=group.lr, decay=group.decay, beta1=group.beta1, beta2=group.beta2, maximize=group.maximize,
                 cautious=group.cautious, mask_params=mask_params, mask_momenta=mask_momenta,
                 param_rounding=group.param_rounding)
    for (device, p_dtype, g_dtype, m_dtype, kahan), (ps, gs, ms, cs, bucket_seeds, us, scales) in buckets.items():
        all_fp32 = p_dtype == g_dtype == m_dtype == torch.float32
        if device.type == "cpu" and all_fp32 and not group.cautious and updates is None:  # nothing to round
            rounds = [(*r, None, None, r[3]) for r in cache_rounds(ps, gs, ms)]
        elif m_dtype == torch.int8 and not group.cautious:
            rounds = _eight_bit_rounds(ps, gs, ms, cs, bucket_seeds, None if updates is None else us, scales)
        else:
            rounds = [(ps, gs, ms, cs, bucket_seeds, None if updates is None else us, scales)]
        for round_ps, round_gs, round_ms, round_cs, round_seeds, round_us, round_scales in rounds:
            _foreach_round(round_ps, round_gs, round_ms, round_cs, round_seeds, round_us, round_scales, kahan=kahan,
                           **flags)


def _interpolate(m32: list[Tensor], g32: list[Tensor], beta: float) -> list[Tensor]:
    """``m * beta + g * (1 - beta)`` as two rounded products and a rounded sum, as lion_tensor
    computes it. (``_foreach_lerp`` would save a pass but turns an inf momentum into NaN.)"""
    out = torch._foreach_mul(m32, beta)
    torch._foreach_add_(out, torch._foreach_mul(g32, 1.0 - beta))
    return out


def _foreach_round(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    cs: list[Tensor | None],
    seeds: list[tuple[int, int]] | None,
    given: list[Tensor] | None,
    scales: list[Tensor | None],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
    maximize: bool,
    cautious: bool,
    mask_params: bool,
    mask_momenta: bool,
    param_rounding: str,
    kahan: bool,
) -> None:
    """One foreach step over lists of one device and dtypes (a bucket, or a round of one), with
    each tensor's (param, momentum) seeds where it has low-precision storage. ``given``: the
    update of each tensor, computed beforehand (DistributedLion's vote), else each tensor's own
    sign. ``scales``: the block scales of each 8-bit momentum (None for the others).
    ``mask_params`` / ``mask_momenta``: where a gradient is NaN/inf, that param / momentum
    element keeps its value."""
    p_dtype, m_dtype = ps[0].dtype, ms[0].dtype
    fp32_params = p_dtype == torch.float32
    fp32_state = m_dtype == torch.float32
    g32 = gs if gs[0].dtype == torch.float32 else [g.float() for g in gs]
    if maximize:
        g32 = torch._foreach_neg(g32)
    # The weight being optimised: the param itself (fp32: updated in place), else an fp32
    # copy, plus the Kahan residual.
    w32 = ps if fp32_params else [p.float() for p in ps]
    if kahan:
        torch._foreach_add_(w32, [c.float() for c in cs])
    m32 = ms if fp32_state else [load_momentum(m, scale) for m, scale in zip(ms, scales)]

    if given is None:
        update = _interpolate(m32, g32, beta1)
        torch._foreach_sign_(update)
        if cautious:
            update = [cautious_update(u, g) for u, g in zip(update, g32)]
    else:
        update = given
    # A rescaled (cautious) or voted update is not exact times lr: round u * lr as lion_tensor does.
    scaled = torch._foreach_mul(update, lr) if cautious or given is not None else None

    def apply(w: list[Tensor]) -> None:
        if scaled is not None:
            torch._foreach_sub_(w, scaled)
        else:  # u * lr is exact for u in {-1, 0, 1}, so the fused add rounds as w - u * lr does
            torch._foreach_add_(w, update, alpha=-lr)

    # Masking needs out-of-place temporaries; one read of the grads decides whether the
    # common all-finite case can stay in place.
    masked = (mask_params or mask_momenta) and any_nonfinite(g32)
    if masked:
        new_w = torch._foreach_mul(w32, decay)
        apply(new_w)
        new_m = _interpolate(m32, g32, beta2)
        ok = [torch.isfinite(g) for g in g32]
    else:
        if decay != 1.0:  # w * 1.0 is w: the no-decay group (biases, norms) skips a pass
            torch._foreach_mul_(w32, decay)
        apply(w32)
        if fp32_state:  # in place: the same three roundings as _interpolate
            torch._foreach_mul_(m32, beta2)
            torch._foreach_add_(m32, torch._foreach_mul(g32, 1.0 - beta2))
            new_m = m32
        else:
            new_m = _interpolate(m32, g32, beta2)
        new_w, ok = w32, None

    p_ok = ok if mask_params else None
    m_ok = ok if mask_momenta else None
    if fp32_params:
        if masked:
            kept = new_w if p_ok is None else [torch.where(o, n, p) for o, n, p in zip(p_ok, new_w, ps)]
            torch._foreach_copy_(ps, kept)
    else:
        stochastic = param_stochastic(p_dtype, param_rounding)
        for i, (p, w) in enumerate(zip(ps, new_w)):
            store_param(p, w, cs[i] if kahan else None, None if p_ok is None else p_ok[i],
                        seeds[i][0] if stochastic else None)
    if fp32_state:
        if masked:
            kept = new_m if m_ok is None else [torch.where(o, n, m) for o, n, m in zip(m_ok, new_m, ms)]
            torch._foreach_copy_(ms, kept)
    else:
        for i, (m, n) in enumerate(zip(ms, new_m)):
            store_momentum(m, n, None if m_ok is None else m_ok[i], seeds[i][1], scales[i], m32[i])
