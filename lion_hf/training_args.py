"""``LionTrainingArguments``: HF ``TrainingArguments`` with Lion's own fields and defaults."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from lion_hf.optim import IMPLS, NONFINITE_POLICIES, PARAM_ROUNDINGS, STATE_DTYPES
from lion_hf.optim.validation import validate_group, validate_options

__all__ = [
    "LION_DISTRIBUTED",
    "LION_OPTIM",
    "AdamWLikeLearningRateWarning",
    "LionTrainingArguments",
    "default_nonfinite_policy",
    "scale_from_adamw",
]

LION_OPTIM = "lion"
# lion_distributed: "none" (Lion on the all-reduced gradient), or DistributedLion's vote.
LION_DISTRIBUTED = ("none", "majority", "average")
# Short name for the baseline every comparison in this project uses (HF's default AdamW).
ADAMW_ALIAS, ADAMW_BASELINE = "adamw", "adamw_torch_fused"

# Above this a Lion lr was most likely copied from an AdamW config. Not HF's AdamW default 5e-5:
# Lion's best full fine-tuning lrs in this project's studies reach 1e-4 (docs/evidence.md), and
# warning at those would contradict them.
_ADAMW_LIKE_LR = 1e-4


class AdamWLikeLearningRateWarning(UserWarning):
    """A Lion learning rate that looks copied from an AdamW config. Its own category, so that code which means a
    large Lion lr (LoRA adapters want one) can filter exactly this warning."""


def _first_frame_outside_the_libraries() -> int:
    """The ``stacklevel`` (counted from the caller of this function) of the first frame that is neither lion_hf,
    transformers (HfArgumentParser) nor a dataclass-generated ``__init__`` (``<string>``): the line of the user's
    code that built the arguments, which is what a warning about their value should point at."""
    skipped = (str(Path(__file__).resolve().parent), str(Path(transformers.__file__).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (frame.f_code.co_filename == "<string>"
                                        or str(Path(frame.f_code.co_filename).resolve()).startswith(skipped)):
        frame, level = frame.f_back, level + 1
    return level


def scale_from_adamw(learning_rate: float, weight_decay: float, factor: float = 3.0) -> tuple[float, float]:
    """Lion (lr, weight_decay) from AdamW's: lr / factor and weight_decay * factor.

    Chen et al. advise a 3-10x smaller lr and a correspondingly larger weight decay, which keeps
    the effective decay ``lr * weight_decay`` unchanged. ``factor`` 3 is the conservative end of
    that advice, and at small batch even it undershoots: in this project's fine-tunes the best
    factor was 2, and 2 or less for LoRA adapters (docs/evidence.md). Run a small grid.
    """
    if learning_rate <= 0 or weight_decay < 0 or factor <= 0:
        raise ValueError(
            f"scale_from_adamw needs learning_rate > 0, weight_decay >= 0, factor > 0; got "
            f"{learning_rate}, {weight_decay}, {factor}"
        )
    return learning_rate / factor, weight_decay * factor


def default_nonfinite_policy(max_grad_norm: float | None) -> str:
    """Lion's ``nonfinite_grad`` for a run that clips gradients to ``max_grad_norm`` (<= 0 or None: no clipping).

    Clipping by the global norm mixes every gradient element into one scale factor: one NaN
    makes every gradient NaN, one inf makes every finite gradient zero. Element-wise skipping
    cannot undo that, so a clipped run skips the whole step instead.
    """
    return "skip_step" if (max_grad_norm or 0) > 0 else "skip_elements"


@dataclass
class LionTrainingArguments(TrainingArguments):
    r"""``TrainingArguments`` for training with Lion (``LionTrainer`` or ``lion_optimizers``).

    ``optim`` defaults to ``"lion"``; any of HF's optimizer names (e.g. ``"adamw_torch_fused"``,
    for which ``"adamw"`` is a short alias) also works, so one config can compare both. With
    ``optim="lion"``, ``learning_rate`` and ``weight_decay`` are Lion's (the decayed group gets
    ``weight_decay``; biases, norms and other 1-D params get none) and the fields below configure
    it. The ``adam_*`` fields are ignored: Lion's betas are ``lion_beta1``/``lion_beta2`` (the
    paper's 0.9/0.99, not Adam's 0.999).

    Defaults differ from ``TrainingArguments`` where Lion needs it: ``learning_rate`` is 2e-5
    (HF's AdamW default is 5e-5; Lion's update has unit size per element so it wants a smaller
    lr: see :func:`scale_from_adamw`). A Lion lr above 1e-4 triggers a warning (5e-5 and 1e-4 were
    Lion's best lrs in this project's full fine-tuning measurements); values the user set are
    never changed.

    Args:
        lion_beta1: interpolation between momentum and gradient for the update (default 0.9).
        lion_beta2: momentum decay (default 0.99).
        lion_impl: ``auto`` | ``for_loop`` | ``foreach`` | ``cpp`` | ``triton`` (see ``Lion``).
        lion_state_dtype: ``fp32`` or ``bf16`` momentum (bf16 is stochastically rounded).
        lion_param_rounding: how bf16/fp16 weights store each step: ``stochastic`` (default,
            unbiased, no memory), ``kahan`` (compensation buffer, +2 bytes/param) or ``nearest``
            (drops steps under half an ulp). Irrelevant for fp32 weights.
        lion_cautious: cautious variant (update only where it agrees with the gradient).
        lion_nonfinite_grad: ``skip_elements`` | ``skip_step`` | ``raise`` | ``propagate``.
            Unset, it is ``skip_step`` when gradients are clipped (``max_grad_norm > 0``, HF's
            default) and ``skip_elements`` otherwise: clipping by the global norm spreads one
            NaN/inf element to every gradient (all NaN, or all zero), so only skipping the whole
            step keeps that step from moving the weights.
        lion_distributed: ``none`` (default: Lion on DDP's all-reduced gradient) | ``majority`` |
            ``average``: train with :class:`lion_hf.DistributedLion` under DDP: DDP's gradient
            all-reduce is turned off, each rank keeps its own momentum and only the signs of the
            local updates are exchanged and voted (docs/distributed_lion.md). Clipping and the
            logged grad norm are then per rank (rank 0's is logged). Refused under FSDP and
            DeepSpeed; on one process plain Lion trains, with a warning.
    """

    optim: str = field(
        default=LION_OPTIM,
        metadata={
            "help": "'lion' (this package's Lion), 'adamw' (= adamw_torch_fused) or any Hugging Face optimizer name."
        },
    )
    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "Initial learning rate. Lion wants less than AdamW: measured here (MiniLM-L6 on SST-2, "
                          "batch 32) its best was AdamW's / 2 for a full fine-tune (5e-5 vs 1e-4) and half AdamW's "
                          "with LoRA (1e-3 vs 2e-3); docs/evidence.md. See scale_from_adamw."},
    )
    lion_beta1: float = field(
        default=0.9, metadata={"help": "Lion beta1: momentum/gradient interpolation for the update."}
    )
    lion_beta2: float = field(default=0.99, metadata={"help": "Lion beta2: decay of the momentum."})
    lion_impl: str = field(
        default="auto",
        metadata={"help": f"Lion implementation, one of {IMPLS}. 'auto' = triton on CUDA, cpp (a C++ kernel "
                          "built with g++) on the CPU, else foreach."},
    )
    lion_state_dtype: str = field(
        default="fp32", metadata={"help": f"Momentum dtype, one of {tuple(STATE_DTYPES)} (bf16 halves state memory)."}
    )
    lion_param_rounding: str = field(
        default="stochastic",
        metadata={"help": f"How bf16/fp16 weights store each Lion step, one of {PARAM_ROUNDINGS}: 'stochastic' "
                          "(unbiased, no memory), 'kahan' (+2 bytes/param), 'nearest' (drops steps under half "
                          "an ulp). fp32 weights are exact whatever is chosen."},
    )
    lion_cautious: bool = field(
        default=False, metadata={"help": "Cautious Lion: apply the update only where it agrees with the gradient."}
    )
    lion_nonfinite_grad: str | None = field(
        default=None,
        metadata={"help": f"What a NaN/inf gradient does, one of {NONFINITE_POLICIES} (see lion_hf.Lion). "
                          "Default: skip_step when max_grad_norm > 0 (clipping spreads a NaN to every "
                          "gradient), else skip_elements."},
    )

    lion_distributed: str = field(
        default="none",
        metadata={"help": f"One of {LION_DISTRIBUTED}. 'majority'/'average': Distributed Lion under DDP (no gradient "
                          "all-reduce; each rank's own momentum; the ranks exchange 1.6 bits per parameter and vote). "
                          "Clipping and the logged grad norm are per rank. Not under FSDP or DeepSpeed."},
    )

    def __post_init__(self) -> None:
        if str(self.optim) == ADAMW_ALIAS:
            self.optim = ADAMW_BASELINE
        use_lion = str(self.optim) == LION_OPTIM
        hf_names = [o.value for o in OptimizerNames]
        if not use_lion and str(self.optim) not in hf_names:
            raise ValueError(
                f"optim={str(self.optim)!r} is not an optimizer name; use {LION_OPTIM!r} (this package's Lion), "
                f"{ADAMW_ALIAS!r} (= {ADAMW_BASELINE}) or one of Hugging Face's: {', '.join(hf_names)}"
            )
        if use_lion:
            # The parent validates optim against HF's own names; let it see one, then restore.
            self.optim = "adamw_torch_fused"
        super().__post_init__()
        if use_lion:
            self.optim = LION_OPTIM
        for name in ("lion_beta1", "lion_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.lion_nonfinite_grad is None:
            self.lion_nonfinite_grad = default_nonfinite_policy(self.max_grad_norm)
        elif (use_lion and self.lion_nonfinite_grad == "skip_elements"
              and default_nonfinite_policy(self.max_grad_norm) == "skip_step"):
            warnings.warn(
                f"lion_nonfinite_grad='skip_elements' with max_grad_norm={self.max_grad_norm:g}: gradient clipping "
                "turns one NaN/inf element into NaN or zero gradients everywhere, so a bad step still moves the "
                "weights (through momentum and weight decay). 'skip_step' skips such steps whole.",
                stacklevel=2,
            )
        choices = {
            "lion_impl": IMPLS,
            "lion_state_dtype": tuple(STATE_DTYPES),
            "lion_nonfinite_grad": NONFINITE_POLICIES,
            "lion_param_rounding": PARAM_ROUNDINGS,
            "lion_distributed": LION_DISTRIBUTED,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if use_lion:  # Lion's own group validation: a nan/inf lr or weight decay fails here, not at train()
            kwargs = self.lion_kwargs()
            validate_options(kwargs.pop("impl"), kwargs.pop("nonfinite_grad"), impls=IMPLS)
            validate_group({**kwargs, "maximize": False})
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if use_lion and self.learning_rate > _ADAMW_LIKE_LR:
            lr = self.learning_rate
            decay = (f" and weight_decay={self.weight_decay * 2:.3g} (the same lr * weight_decay)"
                     if self.weight_decay > 0 else "")
            warnings.warn(
                f"learning_rate={lr:g} looks like an AdamW value for Lion, whose update has the same size in "
                f"every element. Measured here (MiniLM-L6 on SST-2, batch 32): Lion's best full fine-tuning lr was "
                f"AdamW's / 2 (5e-5 against 1e-4), so try learning_rate={lr / 2:.3g}{decay}; with LoRA adapters "
                f"Lion tied AdamW at half its lr (1e-3 against 2e-3), where an lr this large can be right. Keeping "
                f"the value you set.",
                AdamWLikeLearningRateWarning,
                stacklevel=_first_frame_outside_the_libraries(),
            )

    @property
    def uses_lion(self) -> bool:
        return self.optim == LION_OPTIM

    def lion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lion_hf.Lion`` (groups carry their own weight decay)."""
        return dict(
            lr=self.learning_rate,
            betas=(self.lion_beta1, self.lion_beta2),
            weight_decay=self.weight_decay,
            cautious=self.lion_cautious,
            state_dtype=self.lion_state_dtype,
            param_rounding=self.lion_param_rounding,
            nonfinite_grad=self.lion_nonfinite_grad,
            impl=self.lion_impl,
        )
