"""``impl="for_loop"``: one tensor at a time through :func:`~lion_hf.optim.numerics.lion_tensor`.

The readable reference every other impl is held to: plain torch ops, no fusion.
"""

from __future__ import annotations

import torch

from lion_hf.optim.numerics import StepGroup, lion_tensor, param_stochastic

__all__ = ["for_loop_lion"]


def for_loop_lion(groups: list[StepGroup], *, skip_nonfinite: bool) -> list[list[int]]:
    """One step over the groups' plain (local) tensors, already checked by the dispatcher; takes
    every tensor (returns no leftovers)."""
    for group in groups:
        pairs = [(None, None)] * len(group.params) if group.seeds is None else group.seeds.tolist()
        tensors = zip(group.params, group.grads, group.exp_avgs, group.kahan_comps, pairs)
        for p, g, m, comp, (p_seed, m_seed) in tensors:
            if p.numel() == 0:
                continue
            p_seed = p_seed if param_stochastic(p.dtype, group.param_rounding) else None
            m_seed = m_seed if m.dtype == torch.bfloat16 else None
            lion_tensor(p, g, m, comp, group.lr, group.decay, group.beta1, group.beta2, p_seed, m_seed,
                        group.maximize, group.cautious, skip_nonfinite)
    return [[] for _ in groups]
