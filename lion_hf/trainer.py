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
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from lion_hf.optim import IMPLS, Lion
from lion_hf.optim.validation import validate_group, validate_options
from lion_hf.param_groups import lion_param_groups, matrices_only
from lion_hf.training_args import LionTrainingArguments, default_nonfinite_policy

__all__ = ["LionFactory", "LionTrainer", "lion_optimizer_cls_and_kwargs", "lion_optimizers", "unwrap_optimizer"]


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

    Lion is built by HF's own ``create_optimizer`` (this class answers
    ``get_optimizer_cls_and_kwargs`` with ``Lion`` and its arguments), so it gets HF's decay /
    no-decay groups, per device mesh where needed, minus decay on tensors under 2-D
    (``get_decay_parameter_names``), and only trainable parameters, so a
    peft ``PeftModel`` trains its adapters alone. With ``LionTrainingArguments`` whose
    ``optim`` is an HF optimizer name (e.g. ``"adamw_torch_fused"``), HF's optimizer is built
    instead, which lets one script compare both. Everything else is the Trainer's, except the
    one loss-scaling decision described in :meth:`_loss_counts_items`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model_accepts_loss_kwargs and not self._loss_counts_items():
            self.model_accepts_loss_kwargs = False

    def _loss_counts_items(self) -> bool:
        """Whether the model's own loss consumes ``num_items_in_batch`` (HF's ``model_accepts_loss_kwargs``).

        HF (transformers 5) decides from the signature alone: a ``forward`` that takes
        ``**kwargs`` is handed ``num_items_in_batch``, and its loss is then taken for a sum
        already divided by the item count of the whole optimizer step. So HF multiplies it by
        the number of processes (``average_tokens_across_devices``, on by default) and does not
        divide it by the gradient-accumulation steps. Classification heads such as
        ``BertForSequenceClassification`` take ``**kwargs`` only to pass attention options on
        and return a per-batch mean: under that rule two processes double the logged loss and
        every gradient (clipping at ``max_grad_norm`` then bites at half the true norm, and
        AdamW on two processes trains differently from one), and gradient accumulation
        multiplies them by its step count. LionTrainer keeps HF's rule only where it holds:

        * a model that sets ``accepts_loss_kwargs`` is taken at its word (HF's own override);
        * otherwise the source of ``forward`` decides: the loss counts items when it names
          ``num_items_in_batch``, or hands its ``**kwargs`` to a callee whose name contains
          ``loss`` (``self.loss_function(..., **kwargs)`` of the causal-LM heads), or to a
          submodule (``self.<name>(..., **kwargs)``) whose own ``forward`` counts items,
          followed three levels down;
        * where a source cannot be read, HF's verdict stands.

        When this returns False the Trainer treats the loss as the per-batch mean it is:
        ``num_items_in_batch`` is not passed, the loss is not multiplied by the process count,
        and it is divided by the gradient-accumulation steps. A ``compute_loss_func`` is not
        affected (HF hands it the item count either way).
        """
        import ast
        import textwrap

        from transformers.trainer_utils import unwrap_peft_model

        model = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        if hasattr(model, "accepts_loss_kwargs"):
            return bool(model.accepts_loss_kwargs)
        verdicts: dict[type, bool | None] = {}

        def counts(module: nn.Module, depth: int) -> bool | None:
            if type(module) in verdicts:
                return verdicts[type(module)]
            verdicts[type(module)] = None  # a cycle reads as "unknown"
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(module.forward))))
            except (OSError, TypeError, SyntaxError, AttributeError):
                return None
            func = tree.body[0] if tree.body else None
            kwarg = getattr(getattr(func, "args", None), "kwarg", None)
            var_kw = kwarg.arg if kwarg is not None else None
            verdict: bool | None = False
            unknown = False
            for node in ast.walk(tree):
                named = (
                    (isinstance(node, ast.Name) and node.id == "num_items_in_batch")
                    or (isinstance(node, ast.Attribute) and node.attr == "num_items_in_batch")
                    or (isinstance(node, (ast.arg, ast.keyword)) and node.arg == "num_items_in_batch")
                    or (isinstance(node, ast.Constant) and node.value == "num_items_in_batch")
                )
                if named:
                    verdict = True
                    break
                if (
                    var_kw is None
                    or not isinstance(node, ast.Call)
                    or not any(
                        k.arg is None and isinstance(k.value, ast.Name) and k.value.id == var_kw for k in node.keywords
                    )
                ):
                    continue
                if "loss" in ast.unparse(node.func).lower():
                    verdict = True
                    break
                callee = node.func
                if (
                    depth > 0
                    and isinstance(callee, ast.Attribute)
                    and isinstance(callee.value, ast.Name)
                    and callee.value.id == "self"
                    and isinstance(getattr(module, callee.attr, None), nn.Module)
                ):
                    sub = counts(getattr(module, callee.attr), depth - 1)
                    if sub:
                        verdict = True
                        break
                    if sub is None:
                        unknown = True
            if not verdict and unknown:
                verdict = None
            verdicts[type(module)] = verdict
            return verdict

        verdict = counts(model, 3)
        return True if verdict is None else verdict

    def _uses_lion(self) -> bool:
        return not isinstance(self.args, LionTrainingArguments) or self.args.uses_lion

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # HF's names (subclasses that customise them are respected), minus the tensors under 2-D
        # for Lion (see lion_hf.param_groups). An HF optimizer keeps HF's rule unchanged.
        names = super().get_decay_parameter_names(model)
        if not self._uses_lion():
            return names
        kept = matrices_only(model, names)
        return [n for n in names if n in kept]

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: nn.Module | None = None) -> tuple[Any, Any]:
        # HF's create_optimizer calls this and builds the optimizer itself, with its decay and
        # no-decay groups (per device mesh under FSDP2/expert parallelism) and its SageMaker
        # wrapper; LionTrainer only names the class and its arguments.
        if not isinstance(args, LionTrainingArguments) or args.uses_lion:
            return Lion, _lion_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        ds_config = getattr(self.args, "hf_deepspeed_config", None)
        if (self.optimizer is None and self.optimizer_cls_and_kwargs is None and self._uses_lion()
                and ds_config is not None and "optimizer" in getattr(ds_config, "config", {})):
            warnings.warn(
                "The DeepSpeed config has an 'optimizer' section: DeepSpeed builds that optimizer and "
                "Lion is not used. Remove the section to train with Lion.",
                stacklevel=2,
            )
        optimizer = super().create_optimizer(model)
        inner = unwrap_optimizer(optimizer)
        if isinstance(inner, Lion) and not any(g["params"] for g in inner.param_groups):
            opt_model = self.model if model is None else model
            raise ValueError(f"{type(opt_model).__name__} has no trainable parameters (every requires_grad is False)")
        return optimizer

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


_LION_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(Lion.__init__).parameters.items()
                  if name not in ("self", "params")}
_LION_KWARGS = set(_LION_DEFAULTS)


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
    merged = {**_LION_DEFAULTS, **lion_kwargs}
    validate_options(merged.pop("impl"), merged.pop("nonfinite_grad"), impls=IMPLS)
    validate_group(merged)
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
