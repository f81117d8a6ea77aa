"""``LionTrainingArguments``: HF ``TrainingArguments`` with Lion's own fields and defaults."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from lion_hf.optim.options import OPTIONS, VOTES
from lion_hf.optim.validation import validate_group, validate_options

__all__ = [
    "AdamWLikeLearningRateWarning",
    "LionTrainingArguments",
    "default_nonfinite_policy",
    "scale_from_adamw",
]

LION_OPTIM = "lion"
# lion_distributed: "none" (Lion on the all-reduced gradient), or DistributedLion's vote.
LION_DISTRIBUTED = ("none", *VOTES)
# Short name for the baseline every comparison in this project uses (HF's default AdamW).
ADAMW_ALIAS, ADAMW_BASELINE = "adamw", "adamw_torch_fused"

# Above this a Lion lr was most likely copied from an AdamW config. Not HF's AdamW default 5e-5:
# Lion's best full fine-tuning lrs in this project's studies reach it (docs/evidence.md), and
# warning at those would contradict them.
_ADAMW_LIKE_LR = 1e-4
# The line that built the arguments, for the lr warning: __post_init__ <- the dataclass's
# generated __init__ <- its caller (HfArgumentParser's, when it parses them).
_CALLERS_STACKLEVEL = 3


class AdamWLikeLearningRateWarning(UserWarning):
    """A Lion learning rate that looks copied from an AdamW config. Its own category, so that code which means a
    large Lion lr (LoRA adapters want one) can filter exactly this warning."""


def scale_from_adamw(learning_rate: float, weight_decay: float, factor: float = 3.0) -> tuple[float, float]:
    """Lion (lr, weight_decay) from AdamW's: lr / factor and weight_decay * factor.

    Chen et al. advise a 3-10x smaller lr and a correspondingly larger weight decay, which keeps
    the effective decay ``lr * weight_decay`` unchanged. ``factor`` 3 is the conservative end of
    that advice; docs/evidence.md has the factors this project measured. Run a small grid.
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


def _help(name: str, prefix: str = "") -> str:
    """A Lion field's help: the option's own, and its choices."""
    option = OPTIONS[name]
    choices = f" One of {option.choices}." if option.choices and option.choices != (False, True) else ""
    return f"Lion {prefix + ' ' if prefix else ''}{name}: {option.help}{choices}"


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
    lr: see :func:`scale_from_adamw`). A Lion lr above 1e-4 triggers a warning that points at
    docs/evidence.md (what this project measured); values the user set are never changed. The
    Lion fields' defaults and help come from ``lion_hf.optim.options.OPTIONS``.

    Args:
        lion_beta1: interpolation between momentum and gradient for the update (default 0.9).
        lion_beta2: momentum decay (default 0.99).
        lion_impl: ``auto`` | ``for_loop`` | ``foreach`` | ``cpp`` | ``triton`` (see ``Lion``).
        lion_state_dtype: ``fp32``, ``bf16`` or ``int8`` momentum (bf16 and int8 are stochastically
            rounded; int8 keeps 8-bit codes with one fp32 scale per block of 256, tensors under 4096
            elements in fp32).
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
        lion_gradient_release: step each param during backward as soon as its gradient is ready
            and free the gradient (:class:`lion_hf.GradientRelease`; docs/gradient_release.md):
            the update is the ordinary one, gradient accumulation included, without a buffer of
            all the gradients. A global gradient norm needs every gradient before the first step,
            so clipping is off: ``max_grad_norm`` is set to 0 (a warning says so when it was > 0,
            as HF's default 1.0 is), and ``lion_nonfinite_grad`` is ``skip_elements`` unless
            ``propagate`` is asked for ("skip_step"/"raise" judge the whole step first and are
            refused). Under DDP each bucket is stepped after its all-reduce; refused with an HF
            optimizer, ``lion_distributed``, FSDP and DeepSpeed.
        lion_sparse_embedding: under ``lion_gradient_release`` in one process (not under
            ``torch_compile``), the input embedding returns a sparse gradient, which the step
            expands a chunk of rows at a time (:meth:`lion_hf.GradientRelease.sparse_embedding`),
            so its dense gradient is never at the peak. The same update, bit for bit, where the
            weight gets its gradient from one lookup per backward (a warning says when it does not:
            a weight also used by another op turns dense, two lookups in one loss may round
            differently). Off by default.
        lion_chunked_output_grad: the output layer's weight gradient (the LM head, vocab x
            hidden) computed a range of rows at a time (:class:`lion_hf.ChunkedOutputGrad`):
            under ``lion_gradient_release`` in one process each range is stepped as it is
            computed, so that gradient never exists whole; otherwise the ranges make the whole
            gradient. Released and ordinary runs with it compute the same bits. Not under FSDP or
            DeepSpeed; under mixed precision (``bf16``/``fp16``) or ``torch_compile`` it does
            nothing (a warning says so). Off by default.
    """

    optim: str = field(
        default=LION_OPTIM,
        metadata={
            "help": "'lion' (this package's Lion), 'adamw' (= adamw_torch_fused) or any Hugging Face optimizer name."
        },
    )
    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "Initial learning rate. " + OPTIONS["lr"].help + " See scale_from_adamw."},
    )
    lion_beta1: float = field(default=OPTIONS["betas"].default[0], metadata={"help": _help("betas", "beta1 of")})
    lion_beta2: float = field(default=OPTIONS["betas"].default[1], metadata={"help": _help("betas", "beta2 of")})
    lion_impl: str = field(default=OPTIONS["impl"].default, metadata={"help": _help("impl")})
    lion_state_dtype: str = field(default=OPTIONS["state_dtype"].default, metadata={"help": _help("state_dtype")})
    lion_param_rounding: str = field(default=OPTIONS["param_rounding"].default,
                                     metadata={"help": _help("param_rounding")})
    lion_cautious: bool = field(default=OPTIONS["cautious"].default, metadata={"help": _help("cautious")})
    lion_nonfinite_grad: str | None = field(
        default=None,
        metadata={"help": _help("nonfinite_grad") + " Default here: skip_step when max_grad_norm > 0 (clipping "
                          "spreads a NaN to every gradient), else skip_elements."},
    )

    lion_gradient_release: bool = field(
        default=OPTIONS["gradient_release"].default,
        metadata={"help": _help("gradient_release") + " Sets max_grad_norm to 0 (with a warning when it was > 0); "
                          "under DDP the step runs after each bucket's all-reduce; not under FSDP, DeepSpeed or "
                          "lion_distributed."},
    )

    lion_sparse_embedding: bool = field(
        default=False,
        metadata={"help": "Under lion_gradient_release in one process: the input embedding's gradient is sparse "
                          "(a row per token), expanded a chunk of rows at a time by the step, so its dense gradient "
                          "never exists; the same update where the weight gets its gradient from one lookup per "
                          "backward (docs/gradient_release.md)."},
    )

    lion_chunked_output_grad: bool = field(
        default=False,
        metadata={"help": "The output layer's (LM head's) weight gradient computed a range of rows at a time: under "
                          "lion_gradient_release in one process each range is stepped as computed, so that gradient "
                          "never exists whole; with or without release the same bits (docs/gradient_release.md). "
                          "Not under FSDP or DeepSpeed."},
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
        if self.lion_gradient_release:
            self._settle_gradient_release(use_lion)
        elif self.lion_sparse_embedding is True:
            raise ValueError("lion_sparse_embedding=True needs lion_gradient_release=True: the release steps the "
                             "embedding's sparse gradient (without it the ordinary step would get it, under HF's "
                             "gradient clipping, which torch cannot apply to sparse gradients)")
        if self.lion_nonfinite_grad is None:
            self.lion_nonfinite_grad = default_nonfinite_policy(self.max_grad_norm)
        elif (use_lion and self.lion_nonfinite_grad == "skip_elements"
              and default_nonfinite_policy(self.max_grad_norm) == "skip_step"):
            warnings.warn(
                f"lion_nonfinite_grad='skip_elements' with max_grad_norm={self.max_grad_norm:g}: gradient clipping "
                "turns one NaN/inf element into NaN or zero gradients everywhere, so a bad step still moves the "
                "weights (through momentum and weight decay). 'skip_step' skips such steps whole.",
                stacklevel=_CALLERS_STACKLEVEL,
            )
        choices = {f"lion_{name}": OPTIONS[name].choices
                   for name in ("impl", "state_dtype", "nonfinite_grad", "param_rounding", "cautious",
                                "gradient_release")}
        for name, allowed in {**choices, "lion_distributed": LION_DISTRIBUTED,
                              "lion_sparse_embedding": (False, True),
                              "lion_chunked_output_grad": (False, True)}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lion_beta1", "lion_beta2"):  # Lion's range, checked whether or not Lion trains
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if use_lion:  # Lion's own group validation: a nan/inf lr or weight decay fails here, not at train()
            kwargs = self.lion_kwargs()
            validate_options(kwargs.pop("impl"), kwargs.pop("nonfinite_grad"))
            validate_group({**kwargs, "maximize": False})
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if use_lion and self.learning_rate > _ADAMW_LIKE_LR:
            lr = self.learning_rate
            lion_lr, lion_decay = scale_from_adamw(lr, self.weight_decay)
            decay = f" and weight_decay={lion_decay:.3g} (the same lr * weight_decay)" if self.weight_decay > 0 else ""
            warnings.warn(
                f"learning_rate={lr:g} looks like an AdamW value for Lion, whose update has the same size in "
                f"every element and wants a smaller lr: scale_from_adamw suggests learning_rate={lion_lr:.3g}"
                f"{decay}; docs/evidence.md has the lrs this project measured (with LoRA adapters an lr this large "
                f"can be right). Keeping the value you set.",
                AdamWLikeLearningRateWarning,
                stacklevel=_CALLERS_STACKLEVEL,
            )

    def _settle_gradient_release(self, use_lion: bool) -> None:
        """What gradient release needs of the other arguments: refused where it cannot run, clipping off."""
        if not use_lion:
            raise ValueError(f"lion_gradient_release=True needs optim='lion' (this package's Lion steps each param in "
                             f"backward), got optim={str(self.optim)!r}")
        if self.lion_distributed != "none":
            raise ValueError(f"lion_gradient_release=True cannot run with lion_distributed={self.lion_distributed!r}: "
                             "Distributed Lion votes over the signs of the whole step, so no param can step before "
                             "every gradient is ready. Choose one (under DDP, gradient release steps each bucket "
                             "after its all-reduce).")
        if self.lion_nonfinite_grad in ("skip_step", "raise"):
            raise ValueError(f"lion_nonfinite_grad={self.lion_nonfinite_grad!r} cannot hold under "
                             "lion_gradient_release=True: it judges the whole step before anything moves, while "
                             "release steps each param as its gradient arrives. Use 'skip_elements' (each NaN/inf "
                             "element left unchanged; the default here) or 'propagate'.")
        if (self.max_grad_norm or 0) > 0:
            warnings.warn(
                f"lion_gradient_release=True: gradient clipping is off (max_grad_norm={self.max_grad_norm:g} set to "
                "0). Clipping scales every gradient by one global norm, which needs all of them before the first "
                "param steps; Lion takes only the sign of its update, so clipping changes it only through the mix of "
                "momentum and gradient (docs/gradient_release.md). Set max_grad_norm=0 to silence this.",
                stacklevel=_CALLERS_STACKLEVEL + 1,
            )
            self.max_grad_norm = 0.0

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
