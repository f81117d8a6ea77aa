"""``impl="for_loop"``: one tensor at a time through :func:`~lion_hf.optim.numerics.lion_tensor`.

Plain torch ops, no fusion: the readable form of the reference (``numerics.lion_tensor``) over a
whole step, and the impl of a step whose tensors share memory, which must update one after the
other. DistributedLion's two passes (:func:`for_loop_signs`, :func:`for_loop_vote_apply`) go
through the same numerics.

An 8-bit momentum is stepped in chunks of whole blocks (``numerics.eight_bit_chunks``), each
through the same per-tensor function with its slice of the scales and its offset seeds: the
same bits as the whole tensor at once, with temporaries of a chunk's size, not several fp32
copies of the tensor. (Under ``cautious`` the update's rescaling is a mean over the whole
tensor, so such a tensor, or one that is not contiguous, is stepped whole.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    StepGroup,
    apply_update,
    eight_bit_chunks,
    interpolate,
    lion_tensor,
    load_momentum,
    momentum_stochastic,
    offset_seed,
    param_stochastic,
)
from lion_hf.optim.signs import write_trits

__all__ = ["for_loop_lion", "for_loop_signs", "for_loop_vote_apply"]


def _tensors(group: StepGroup):
    """(p, g, m, comp, p_seed, m_seed, m_scale) of the group's non-empty tensors, the seeds None
    where that store is not stochastic, ``m_scale`` the block scales of an 8-bit momentum."""
    pairs = [(None, None)] * len(group.params) if group.seeds is None else group.seeds.tolist()
    for p, g, m, comp, (p_seed, m_seed), scale in zip(group.params, group.grads, group.exp_avgs, group.kahan_comps,
                                                      pairs, group.scales()):
        if p.numel() == 0:
            continue
        yield (p, g, m, comp, p_seed if param_stochastic(p.dtype, group.param_rounding) else None,
               m_seed if momentum_stochastic(m.dtype) else None, scale)


def _chunks(p: Tensor, g: Tensor, m: Tensor, comp: Tensor | None, p_seed: int | None, m_seed: int | None,
            scale: Tensor | None, whole: bool = False):
    """The tensor's share of a step as (p, g, m, comp, p_seed, m_seed, scale, start, stop) pieces: the
    tensor itself (start 0, stop its numel), or, for a contiguous 8-bit momentum (unless ``whole``),
    chunks of flat views of each of its tensors (``numerics.eight_bit_chunks``)."""
    tensors = (p, g, m) if comp is None else (p, g, m, comp)
    if scale is None or whole or not all(t.is_contiguous() for t in tensors):
        yield p, g, m, comp, p_seed, m_seed, scale, 0, p.numel()
        return
    flat = [t.view(-1) for t in (p, g, m)]
    flat_comp = None if comp is None else comp.view(-1)
    for start, stop in eight_bit_chunks(p.numel()):
        yield (*(t[start:stop] for t in flat), None if flat_comp is None else flat_comp[start:stop],
               offset_seed(p_seed, start), offset_seed(m_seed, start),
               scale[start // EIGHT_BIT_BLOCK:-(-stop // EIGHT_BIT_BLOCK)], start, stop)


def for_loop_lion(groups: list[StepGroup], *, skip_nonfinite: bool) -> list[list[int]]:
    """One step over the groups' plain (local) tensors, already checked by the dispatcher; takes
    every tensor (returns no leftovers)."""
    for group in groups:
        for tensor in _tensors(group):
            for p, g, m, comp, p_seed, m_seed, scale, _, _ in _chunks(*tensor, whole=group.cautious):
                lion_tensor(p, g, m, comp, group.lr, group.decay, group.beta1, group.beta2, p_seed, m_seed,
                            group.maximize, group.cautious, skip_nonfinite, scale)
    return [[] for _ in groups]


def _g32(g: Tensor, maximize: bool) -> Tensor:
    g32 = g.float()
    return -g32 if maximize else g32


def for_loop_signs(groups: list[StepGroup], trits: Tensor, *, zero_nonfinite: bool) -> None:
    """DistributedLion's first pass: the sign of every element's ``c = m * beta1 + g * (1 - beta1)``
    added to ``trits`` (uint8, filled with 1; the step's elements tensor after tensor, group after
    group); ``zero_nonfinite``: an element with a NaN/inf gradient sends sign 0."""
    offset = 0
    for group in groups:
        for whole_g, whole_m, whole_scale in zip(group.grads, group.exp_avgs, group.scales()):
            for _, g, m, _, _, _, scale, start, stop in _chunks(whole_g, whole_g, whole_m, None, None, None,
                                                                whole_scale):
                g32 = _g32(g, group.maximize)
                c = interpolate(load_momentum(m, scale), g32, group.beta1)
                if zero_nonfinite:
                    c = torch.where(torch.isfinite(g32), c, 0.0)
                write_trits(trits[offset + start:offset + stop], c)
            offset += whole_g.numel()


def for_loop_vote_apply(groups: list[StepGroup], update: Tensor, *, keep_nonfinite_momentum: bool) -> None:
    """DistributedLion's second pass: every weight steps by the voted ``update`` (fp32, flat, the
    step's elements in the order of :func:`for_loop_signs`), the momentum by this rank's own
    gradient; ``keep_nonfinite_momentum``: where the gradient is NaN/inf the momentum keeps its
    value (the weight still follows the vote, so that replicas stay identical)."""
    offset = 0
    for group in groups:
        for tensor in _tensors(group):
            for p, g, m, comp, p_seed, m_seed, scale, start, stop in _chunks(*tensor):
                g32 = _g32(g, group.maximize)
                u = update[offset + start:offset + stop].view(p.shape)
                apply_update(p, g32, m, comp, u, group.lr, group.decay, group.beta2, p_seed, m_seed, None,
                             torch.isfinite(g32) if keep_nonfinite_momentum else None, scale)
            offset += tensor[0].numel()
