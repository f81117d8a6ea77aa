"""Lion in Hugging Face Trainer: a subclass, and factories for an unmodified ``Trainer``.

Three ways in, from most to least integrated:

* ``LionTrainer(model, args=LionTrainingArguments(...), ...)``: builds Lion in
  ``create_optimizer``, which is the one hook HF calls on every path (DeepSpeed drops an
  ``optimizers=`` instance and calls it; FSDP forbids ``optimizers=``).
* ``Trainer(..., optimizers=lion_optimizers(model, args, num_training_steps))``.
* ``Trainer(..., optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(lr=..., weight_decay=...))``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn
from accelerate.utils import DistributedType
from transformers import Trainer, TrainingArguments, get_scheduler

from lion_hf.optim.lion import Lion, _validate_hyperparameters, _validate_options
from lion_hf.param_groups import lion_param_groups
from lion_hf.training_args import LionTrainingArguments, default_nonfinite_policy

__all__ = ["LionTrainer", "LionFactory", "lion_optimizer_cls_and_kwargs", "lion_optimizers", "unwrap_optimizer"]


def _lion_kwargs(args: TrainingArguments) -> dict[str, Any]:
    """Lion kwargs from any TrainingArguments: Lion's own fields, or Lion defaults + lr/wd."""
    if isinstance(args, LionTrainingArguments):
        return args.lion_kwargs()
    # Plain TrainingArguments: its adam_beta* belong to Adam (beta2 0.999); use Lion's betas.
    return dict(lr=args.learning_rate, weight_decay=args.weight_decay,
                nonfinite_grad=default_nonfinite_policy(args.max_grad_norm))


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's / DeepSpeed's wrappers (which nest ``.optimizer``)."""
    for _ in range(8):  # bounded: a wrapper that points at itself must not hang us
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


class LionTrainer(Trainer):
    """``transformers.Trainer`` that optimises with :class:`lion_hf.Lion`.

    Lion gets HF's decay / no-decay groups (:func:`lion_hf.param_groups.lion_param_groups`
    with the Trainer's ``get_decay_parameter_names``) and only trainable parameters, so a
    peft ``PeftModel`` trains its adapters alone. With ``LionTrainingArguments`` whose
    ``optim`` is an HF optimizer name (e.g. ``"adamw_torch_fused"``), HF's optimizer is built
    instead, which lets one script compare both. Everything else is the Trainer's.
    """

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        uses_lion = not isinstance(self.args, LionTrainingArguments) or self.args.uses_lion
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and uses_lion:
            ds_config = getattr(self.args, "hf_deepspeed_config", None)
            if ds_config is not None and "optimizer" in getattr(ds_config, "config", {}):
                warnings.warn(
                    "The DeepSpeed config has an 'optimizer' section: DeepSpeed builds that optimizer and "
                    "Lion is not used. Remove the section to train with Lion.",
                    stacklevel=2,
                )
            opt_model = self.model if model is None else model
            groups = lion_param_groups(
                opt_model, self.args.weight_decay, decay_names=self.get_decay_parameter_names(opt_model)
            )
            self.optimizer = Lion(groups, **_lion_kwargs(self.args))
            return self.optimizer
        return super().create_optimizer(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # HF computes the global gradient norm before every optimizer step (clipping, or for the
        # log). It is finite exactly when every gradient is, so Lion's skip_step verdict comes from
        # it instead of another read of every gradient. Not under DeepSpeed, whose engine steps
        # and reports the norm on its own schedule.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        inner = unwrap_optimizer(self.optimizer)
        if (isinstance(inner, Lion) and grad_norm is not None
                and getattr(self.accelerator, "distributed_type", None) != DistributedType.DEEPSPEED):
            inner.set_grad_norm(grad_norm)
        return grad_norm

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Make skipped steps (nonfinite_grad="skip_step") visible in every logger HF reports to.
        inner = unwrap_optimizer(self.optimizer)
        if isinstance(inner, Lion) and inner.skipped_steps:
            logs = {**logs, "lion_skipped_steps": inner.skipped_steps}
        super().log(logs, *args, **kwargs)


class LionFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(LionFactory, kwargs))``.

    HF instantiates a non-Optimizer class and calls it with the model. Building the groups
    here is what lets the ``weight_decay`` in ``kwargs`` reach Lion: with a plain
    ``(Lion, kwargs)`` pair HF's own groups override it with ``args.weight_decay``.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> Lion:
        weight_decay = kwargs.pop("weight_decay", 0.0)
        return Lion(lion_param_groups(model, weight_decay), **kwargs)


_LION_KWARGS = set(inspect.signature(Lion.__init__).parameters) - {"self", "params"}


def lion_optimizer_cls_and_kwargs(**lion_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(LionFactory, lion_kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; kwargs as ``Lion``'s.

    ``lr`` is required: HF passes these kwargs as they are, so ``args.learning_rate`` would not
    reach Lion. The Trainer's ``max_grad_norm`` does not reach the factory either: with gradient
    clipping on (HF's default) pass ``nonfinite_grad="skip_step"`` (see ``Lion``).
    """
    unknown = set(lion_kwargs) - _LION_KWARGS
    if unknown:
        raise ValueError(f"unknown Lion arguments {sorted(unknown)}; allowed: {sorted(_LION_KWARGS)}")
    if "lr" not in lion_kwargs:
        raise ValueError("lr is required: HF does not pass args.learning_rate to an optimizer_cls_and_kwargs factory")
    # Fail here, not when the Trainer first builds the optimizer deep inside train().
    _validate_options(lion_kwargs.get("impl", "auto"), lion_kwargs.get("nonfinite_grad", "skip_elements"),
                      lion_kwargs.get("param_rounding", "stochastic"))
    _validate_hyperparameters(
        lion_kwargs["lr"], lion_kwargs.get("betas", (0.9, 0.99)), lion_kwargs.get("weight_decay", 0.0),
        lion_kwargs.get("state_dtype", "fp32"),
    )
    return LionFactory, dict(lion_kwargs)


def lion_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int,
) -> tuple[Lion, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: Lion + the scheduler ``args`` describes.

    Not for DeepSpeed or FSDP (HF drops or refuses an optimizer instance there): use
    ``LionTrainer``.
    """
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be > 0, got {num_training_steps}")
    optimizer = Lion(lion_param_groups(model, args.weight_decay), **_lion_kwargs(args))
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return optimizer, scheduler
