"""Weight-decay / no-decay parameter groups, the way Hugging Face Trainer builds them.

No decay on biases and normalisation weights (HF's rule: LayerNorm modules and names
containing ``bias``/``norm``), and, as in timm, on any parameter with fewer than 2 dims:
a 1-D tensor is a bias, a gain or a scale, and decaying it towards zero only hurts.
Only parameters with ``requires_grad`` are returned, so frozen LoRA base weights never
reach the optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["decay_parameter_names", "lion_param_groups", "matrices_only"]


def _original_ndim(param: Tensor) -> int:
    """Dims of the parameter as the model defines it: DeepSpeed ZeRO-3 partitions leave shape [0]."""
    ds_shape = getattr(param, "ds_shape", None)
    return len(ds_shape) if ds_shape is not None else param.ndim


def _hf_decay_names(model: nn.Module) -> set[str]:
    from transformers.trainer_pt_utils import get_parameter_names

    hf_patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [nn.LayerNorm], hf_patterns))


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay (HF's rule, minus every <2-D tensor)."""
    names = _hf_decay_names(model)
    return {n for n, p in model.named_parameters() if n in names and _original_ndim(p) >= 2}


def matrices_only(model: nn.Module, names: Iterable[str]) -> set[str]:
    """``names`` without the parameters under 2-D (biases, gains, scales), unless every trainable
    parameter is 1-D: then they are flattened shards (FSDP1's FlatParameter or its views), not
    real shapes, and the names alone decide (with a warning), since decaying by name beats none."""
    names = set(names)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if trainable and all(_original_ndim(p) < 2 for _, p in trainable) and any(n in names for n, _ in trainable):
        warnings.warn(
            "lion_param_groups: every trainable parameter is 1-D (flattened by a sharding wrapper?); "
            "choosing weight decay by name only, without the 'no decay below 2-D' rule",
            stacklevel=3,
        )
        return names
    return {n for n, p in model.named_parameters() if n in names and _original_ndim(p) >= 2}


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
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (every requires_grad is False)")
    names = decay_names if decay_names is not None else _hf_decay_names(model)
    decay = matrices_only(model, names)
    decayed, not_decayed = [], []
    for name, param in trainable:
        (decayed if name in decay else not_decayed).append(param)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
