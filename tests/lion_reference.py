"""Float64 formula of one Lion step (Chen et al. 2023, Algorithm 2), for tests only.

The reference the impls are held to bit for bit is ``lion_hf.optim.numerics.lion_tensor`` (fp32,
each operation rounded as the kernels round it). This float64 form checks that reference itself
against the paper's algorithm, to within fp32 rounding: written for clarity, every quantity a new
float64 tensor, nothing updated in place.
"""

from __future__ import annotations

import torch

__all__ = ["lion_reference_step"]


def lion_reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    cautious: bool = False,
    skip_nonfinite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_param, new_exp_avg)`` in float64 after one Lion step.

    Chen et al. 2023, Algorithm 2::

        c  = beta1 * m + (1 - beta1) * g
        u  = sign(c)                      # sign(0) = 0
        p' = p * (1 - lr * wd) - lr * u   # decoupled weight decay, scaled by lr
        m' = beta2 * m + (1 - beta2) * g

    ``maximize`` negates ``g``. ``cautious`` (Liang et al. 2024) zeroes ``u`` where it
    disagrees in sign with ``g`` and rescales the rest by ``1 / max(mean(agree), 1e-3)``.
    ``skip_nonfinite`` leaves every element whose gradient is NaN or +-inf untouched
    (both ``p`` and ``m``), which is the optimizer's default policy.
    """
    p = param.detach().to(torch.float64)
    g = grad.detach().to(torch.float64)
    m = exp_avg.detach().to(torch.float64)
    if maximize:
        g = -g
    update = torch.sign(beta1 * m + (1.0 - beta1) * g)
    if cautious:
        agree = (update * g > 0).to(torch.float64)
        fraction = agree.mean() if agree.numel() else torch.tensor(1.0, dtype=torch.float64)
        update = update * agree / torch.clamp(fraction, min=1e-3)
    new_p = p * (1.0 - lr * weight_decay) - lr * update
    new_m = beta2 * m + (1.0 - beta2) * g
    if skip_nonfinite:
        ok = torch.isfinite(g)
        new_p = torch.where(ok, new_p, p)
        new_m = torch.where(ok, new_m, m)
    return new_p, new_m
