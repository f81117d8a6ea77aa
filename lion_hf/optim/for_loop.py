"""``impl="for_loop"``: one tensor at a time through :func:`~lion_hf.optim.numerics.lion_tensor`.

The readable reference every other impl is held to: plain torch ops, no fusion.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lion_hf.optim.numerics import lion_tensor, param_stochastic

__all__ = ["for_loop_lion"]


def for_loop_lion(
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
) -> None:
    """One step over plain (local) tensors, already checked by the dispatcher. ``seeds`` holds
    each tensor's stochastic-rounding seeds (see :func:`~lion_hf.optim.numerics.draw_seeds`)."""
    pairs = [(None, None)] * len(params) if seeds is None else seeds.tolist()
    for p, g, m, comp, (p_seed, m_seed) in zip(params, grads, exp_avgs, kahan_comps, pairs):
        if p.numel() == 0:
            continue
        p_seed = p_seed if param_stochastic(p.dtype, param_rounding) else None
        m_seed = m_seed if m.dtype == torch.bfloat16 else None
        lion_tensor(p, g, m, comp, lr, decay, beta1, beta2, p_seed, m_seed, maximize, cautious, skip_nonfinite)
