"""Weight-decay / no-decay parameter groups, the way Hugging Face Trainer builds them.

No decay on biases and normalisation weights (HF's rule: LayerNorm modules and names
containing ``bias``/``norm``), and, as in timm, on any parameter with fewer than 2 dims:
a 1-D tensor is a bias, a gain or a scale, and decaying it towards zero only hurts.
Only parameters with ``requires_grad`` are returned, so frozen LoRA base weights never
reach the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["decay_parameter_names", "lion_param_groups"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay (HF's rule, minus every <2-D tensor)."""
    from transformers.trainer_pt_utils import get_parameter_names

    hf_patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    names = set(get_parameter_names(model, [nn.LayerNorm], hf_patterns))
    return {n for n, p in model.named_parameters() if n in names and p.ndim >= 2}


def lion_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Two param groups for ``model``: decayed (``weight_decay``) and not (0.0); empty groups dropped.

    ``decay_names`` overrides the rule above (``LionTrainer`` passes the Trainer's own
    ``get_decay_parameter_names`` so a subclass that customises it is respected).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay = set(decay_names) if decay_names is not None else decay_parameter_names(model)
    decayed, not_decayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decayed if name in decay and param.ndim >= 2 else not_decayed).append(param)
    if not decayed and not not_decayed:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (every requires_grad is False)")
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
