"""Lion in Hugging Face Trainer: a subclass, and factories for an unmodified ``Trainer``.

Three ways in, from most to least integrated:

* ``LionTrainer(model, args=LionTrainingArguments(...), ...)``: builds Lion in
  ``create_optimizer``, which is the one hook HF calls on every path (DeepSpeed drops an
  ``optimizers=`` instance and calls it; FSDP forbids ``optimizers=``).
* ``Trainer(..., optimizers=lion_optimizers(model, args, train_dataset=train))``.
* ``Trainer(..., optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(lr=..., weight_decay=...))``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from lion_hf.optim import OPTIONS, ChunkedOutputGrad, DistributedLion, GradientRelease, Lion
from lion_hf.optim.options import NOT_LION_ARGUMENTS
from lion_hf.optim.validation import validate_group, validate_options
from lion_hf.param_groups import lion_param_groups, matrices_only
from lion_hf.training_args import LionTrainingArguments, default_nonfinite_policy

__all__ = [
    "LionFactory",
    "LionTrainer",
    "check_chunked_output",
    "check_distributed_lion",
    "check_gradient_release",
    "lion_optimizer_cls_and_kwargs",
    "lion_optimizers",
    "local_gradients_hook",
    "unwrap_optimizer",
]

# Each rank's DistributedLion momentum, saved beside HF's optimizer.pt (which holds rank 0's only).
DISTRIBUTED_LION_STATE = "optimizer_rank{rank}.pt"


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


def local_gradients_hook(state, bucket):  # unannotated: DDP refuses annotations other than its own classes
    """A DDP communication hook that communicates nothing: the bucket's gradients stay each rank's
    own, unscaled (DDP's default hook would divide them by the world size and all-reduce them).
    For :class:`lion_hf.DistributedLion`, which exchanges signs itself:
    ``ddp_model.register_comm_hook(None, local_gradients_hook)``."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def check_distributed_lion(args: TrainingArguments, *, deepspeed: bool, fsdp: bool) -> str | None:
    """The vote ``args.lion_distributed`` asks for (None for "none" or plain TrainingArguments); a
    ValueError where Distributed Lion cannot run: under DeepSpeed (its engine all-reduces and
    partitions the gradients and steps the optimizer on its own path) or FSDP (each rank holds a
    shard of the reduced gradient, while the sign vote needs each rank's full local gradient),
    with an HF optimizer, or with ``lion_cautious`` (its mask is per rank)."""
    vote = getattr(args, "lion_distributed", "none")
    if vote == "none":
        return None
    if deepspeed or fsdp:
        what = "DeepSpeed" if deepspeed else "FSDP"
        why = ("its engine all-reduces and partitions the gradients and steps the optimizer on its own path"
               if deepspeed else "each rank holds only a shard of the reduced gradient")
        raise ValueError(f"lion_distributed={vote!r} cannot run under {what}: {why}, while Distributed Lion needs "
                         "each rank's full local gradient and a replicated model. Use DDP (accelerate launch "
                         "--multi_gpu), or lion_distributed='none'.")
    if not getattr(args, "uses_lion", True):
        raise ValueError(f"lion_distributed={vote!r} needs optim='lion', got optim={args.optim!r}")
    if getattr(args, "lion_cautious", False):
        raise ValueError("lion_distributed does not support lion_cautious=True: the cautious mask comes from each "
                         "rank's own gradient, so the replicas would drift apart")
    return vote


def check_gradient_release(args: TrainingArguments, *, deepspeed: bool, fsdp: bool) -> bool:
    """Whether ``args`` asks for gradient release (``lion_gradient_release``); a ValueError under
    DeepSpeed (its engine runs backward, partitions and reduces the gradients and steps the
    optimizer on its own schedule, so no hook of ours may step a param mid-backward) or FSDP (the
    gradient of a param is complete only after FSDP's reduce-scatter of its unit, in FSDP's own
    post-backward hook, and it is a shard)."""
    if not getattr(args, "lion_gradient_release", False):
        return False
    if deepspeed:
        raise ValueError("lion_gradient_release=True cannot run under DeepSpeed: its engine runs backward, reduces and "
                         "partitions the gradients and steps the optimizer on its own schedule, so a param cannot be "
                         "stepped as its gradient arrives. Use DDP (accelerate launch --multi_gpu) or one process, or "
                         "lion_gradient_release=False.")
    if fsdp:
        raise ValueError("lion_gradient_release=True cannot run under FSDP: a param's gradient is ready only after "
                         "FSDP's reduce-scatter of its unit, in FSDP's own post-backward hook, and each rank holds a "
                         "shard of it. Use DDP (accelerate launch --multi_gpu) or one process, or "
                         "lion_gradient_release=False.")
    return True


def check_chunked_output(args: TrainingArguments, *, deepspeed: bool, fsdp: bool) -> bool:
    """Whether ``args`` asks for the output layer's gradient in ranges of rows
    (``lion_chunked_output_grad``); a ValueError under DeepSpeed or FSDP, whose engines hold the
    output layer's weight as flattened or sharded storage, not the module's own tensor."""
    if not getattr(args, "lion_chunked_output_grad", False):
        return False
    if deepspeed or fsdp:
        raise ValueError(f"lion_chunked_output_grad=True cannot run under {'DeepSpeed' if deepspeed else 'FSDP'}: its "
                         "engine holds the output layer's weight as flattened or sharded storage, which the chunked "
                         "backward does not compute into. Use DDP or one process, or lion_chunked_output_grad=False.")
    return True


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

    With ``LionTrainingArguments(lion_distributed="majority" | "average")`` on several DDP
    processes it trains with :class:`lion_hf.DistributedLion`: DDP's gradient all-reduce is
    replaced by :func:`local_gradients_hook` (registered on the DDP model at the first training
    step), ``average_tokens_across_devices`` is turned off on these arguments (so a loss that
    counts items divides by the rank's own count, and no count is gathered), each rank's momentum
    is saved as ``optimizer_rank{r}.pt`` in every checkpoint and restored on resume. On one
    process plain Lion trains (with a warning); FSDP and DeepSpeed are refused.

    With ``LionTrainingArguments(lion_gradient_release=True)`` each param is stepped during
    backward and its gradient freed (:class:`lion_hf.GradientRelease`, attached at the first
    training step): on one process by a post-accumulate-grad hook per param, told which
    micro-batch is a step's last by accelerate's ``sync_gradients`` (what HF's loop sets before
    each micro-batch); under DDP by a communication hook that steps each bucket after its
    all-reduce. HF's ``optimizer.step()`` then updates nothing, the scheduler steps as usual, and
    no gradient norm is computed or logged (clipping is off, see ``LionTrainingArguments``).

    With ``lion_chunked_output_grad=True`` the model's output layer computes its weight gradient a
    range of rows at a time (:class:`lion_hf.ChunkedOutputGrad`, attached at the first training
    step, with or without release, and removed when ``train()`` ends): under release in one
    process each range is stepped as it is computed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model_accepts_loss_kwargs and not self._loss_counts_items():
            self.model_accepts_loss_kwargs = False
        self._lion_vote = check_distributed_lion(self.args, deepspeed=self.is_deepspeed_enabled,
                                                 fsdp=self.is_fsdp_enabled)
        self._lion_release_wanted = check_gradient_release(self.args, deepspeed=self.is_deepspeed_enabled,
                                                           fsdp=self.is_fsdp_enabled)
        self._lion_release: GradientRelease | None = None
        self._lion_chunked_output_wanted = check_chunked_output(self.args, deepspeed=self.is_deepspeed_enabled,
                                                                fsdp=self.is_fsdp_enabled)
        self._lion_chunked_output: ChunkedOutputGrad | None = None
        self._lion_chunked_output_skipped = False  # the layer could not be taken in this train(): warned
        if self._lion_vote is not None:
            if self.args.world_size > 1:
                # Each rank's loss must be its own mean: no count of the other ranks' items, no
                # multiplication by the process count (there is no all-reduce to divide it again).
                self.args.average_tokens_across_devices = False
            else:
                warnings.warn(
                    f"lion_distributed={self._lion_vote!r} on one process: training with plain Lion (Distributed "
                    "Lion on one rank is the same update). Launch several processes (accelerate launch "
                    "--multi_gpu --num_processes N) to vote.",
                    stacklevel=2,
                )

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
            kwargs = _lion_kwargs(args)
            if getattr(args, "lion_distributed", "none") != "none" and args.world_size > 1:
                kwargs.pop("cautious")  # refused by check_distributed_lion when set
                return DistributedLion, {**kwargs, "vote": args.lion_distributed}
            return Lion, kwargs
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The DDP wrapper exists once accelerate has prepared the model, before the first backward.
        if getattr(self, "_lion_vote", None) is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            if not getattr(model, "_lion_local_gradients", False):
                # Without the all-reduce only DistributedLion keeps the replicas together: an
                # optimizer of the user's own (optimizers= or optimizer_cls_and_kwargs=) would let
                # every rank drift on its own gradients.
                if self._distributed_lion() is None:
                    raise ValueError(
                        f"lion_distributed={self._lion_vote!r} turns off DDP's gradient all-reduce, which only "
                        f"DistributedLion makes up for, but this Trainer steps "
                        f"{type(unwrap_optimizer(self.optimizer)).__name__} (an optimizer passed with optimizers= or "
                        "optimizer_cls_and_kwargs=?). Let LionTrainer build the optimizer, or set "
                        "lion_distributed='none'.")
                model.register_comm_hook(None, local_gradients_hook)
                model._lion_local_gradients = True
        if getattr(self, "_lion_chunked_output_wanted", False):
            self._attach_chunked_output()
        if getattr(self, "_lion_release_wanted", False):
            self._attach_gradient_release(model)
        return super().training_step(model, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            # The release's hooks stay on the model's params only while this Trainer trains: another
            # Trainer (or optimizer) on the same model afterwards must not find them stepping its params.
            if getattr(self, "_lion_release", None) is not None:
                self._lion_release.remove()
            if getattr(self, "_lion_chunked_output", None) is not None:
                self._lion_chunked_output.remove()
                self._lion_chunked_output = None
            self._lion_chunked_output_skipped = False

    @property
    def gradient_release(self) -> GradientRelease | None:
        """The :class:`lion_hf.GradientRelease` stepping the params in backward (None before the first
        training step, and without ``lion_gradient_release``)."""
        return getattr(self, "_lion_release", None)

    def _attach_chunked_output(self) -> None:
        """The output layer's chunked weight gradient, taken once per train() (a warning where it cannot be)."""
        if self._lion_chunked_output is not None or self._lion_chunked_output_skipped:
            return
        reason = ChunkedOutputGrad.unavailable(self.model)
        if reason is None and (self.args.bf16 or self.args.fp16 or self.args.torch_compile):
            reason = ("under mixed precision (bf16/fp16, autocast) or torch_compile the layer's own forward and "
                      "backward run (for pure bf16 convert the model with model.to(torch.bfloat16) instead)")
        if reason is not None:
            self._lion_chunked_output_skipped = True
            warnings.warn(f"lion_chunked_output_grad=True does nothing here: {reason}.", stacklevel=2)
            return
        self._lion_chunked_output = ChunkedOutputGrad(self.model)

    def _attach_gradient_release(self, model: nn.Module) -> None:
        """The release of the optimizer HF steps, attached once (again if train() built another)."""
        inner = unwrap_optimizer(self.optimizer)
        release = self._lion_release
        if release is not None and release.optimizer is inner and release.active:
            return
        if type(inner) is not Lion:
            raise ValueError(f"lion_gradient_release=True steps lion_hf.Lion in backward, but this Trainer steps "
                             f"{type(inner).__name__} (an optimizer passed with optimizers= or "
                             "optimizer_cls_and_kwargs=?). Let LionTrainer build the optimizer, or set "
                             "lion_gradient_release=False.")
        if release is not None:
            release.remove()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if getattr(model, "_lion_release_hook", None) is not None:
                raise ValueError("this DDP model already carries the gradient-release communication hook of another "
                                 "optimizer (DDP takes one hook per model); build a new Trainer for a new optimizer")
            self._lion_release = GradientRelease.ddp(inner, model)
            model._lion_release_hook = self._lion_release
            if getattr(self.args, "lion_sparse_embedding", False):
                warnings.warn("lion_sparse_embedding=True does nothing under DDP (its buckets reduce dense "
                              "gradients): the embedding's gradient stays dense.", stacklevel=2)
        else:
            accelerator = self.accelerator
            # HF's loop sets sync_gradients before each micro-batch: True on a step's last one.
            self._lion_release = GradientRelease(inner, last_micro_batch=lambda: accelerator.sync_gradients)
            if getattr(self.args, "lion_sparse_embedding", False):
                if getattr(self.args, "torch_compile", False):
                    warnings.warn("lion_sparse_embedding=True does nothing under torch_compile (compiled kernels take "
                                  "no sparse tensors): the embedding's gradient stays dense.", stacklevel=2)
                elif not self._lion_release.sparse_embedding(model):
                    warnings.warn("lion_sparse_embedding=True: the model's input embedding cannot be made sparse (not "
                                  "an nn.Embedding this optimizer trains alone, tied to another module, or with "
                                  "max_norm / scale_grad_by_freq): its gradient stays dense.", stacklevel=2)

    def _distributed_lion(self) -> DistributedLion | None:
        inner = unwrap_optimizer(self.optimizer)
        return inner if isinstance(inner, DistributedLion) and inner.world_size() > 1 else None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # HF saves rank 0's optimizer state alone; Distributed Lion's momenta differ per rank.
        super()._save_optimizer_and_scheduler(output_dir)
        optimizer = self._distributed_lion()
        if optimizer is not None:
            os.makedirs(output_dir, exist_ok=True)
            rank = self.args.process_index
            torch.save({"optimizer": optimizer.state_dict(), "rank": rank, "world_size": self.args.world_size},
                       os.path.join(output_dir, DISTRIBUTED_LION_STATE.format(rank=rank)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # every rank: rank 0's state from optimizer.pt
        optimizer = self._distributed_lion()
        if checkpoint is None or optimizer is None:
            return
        rank = self.args.process_index
        path = os.path.join(checkpoint, DISTRIBUTED_LION_STATE.format(rank=rank))
        if not os.path.isfile(path):
            warnings.warn(f"{path} is missing (a checkpoint of a run without lion_distributed, or of fewer "
                          "processes): this rank resumes with rank 0's momentum from optimizer.pt.", stacklevel=2)
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["world_size"] != self.args.world_size:
            warnings.warn(f"{path} was saved by a run of {saved['world_size']} processes, this one has "
                          f"{self.args.world_size}: each rank resumes with the momentum of the rank of its index.",
                          stacklevel=2)
        optimizer.load_state_dict(saved["optimizer"])

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
        if self._lion_release is not None and self._lion_release.active:
            return None  # the gradients were stepped and freed in backward: a norm over none would read 0
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


# Lion's keyword arguments and their defaults: every option of the table that Lion's constructor takes.
_LION_DEFAULTS = {name: option.default for name, option in OPTIONS.items() if name not in NOT_LION_ARGUMENTS}
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
    validate_options(merged.pop("impl"), merged.pop("nonfinite_grad"))
    validate_group(merged)
    return LionFactory, dict(lion_kwargs)


def _steps_from_dataset(args: TrainingArguments, train_dataset: Any) -> int:
    """The optimizer steps HF's Trainer takes over ``train_dataset`` under ``args`` (epochs x updates per epoch)."""
    import math

    per_step = args.train_batch_size * max(args.world_size, 1)
    batches = len(train_dataset) // per_step if args.dataloader_drop_last else math.ceil(len(train_dataset) / per_step)
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def lion_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int | None = None,
    *,
    train_dataset: Any = None,
) -> tuple[Lion, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: Lion + the scheduler ``args`` describes.

    The schedule's length is the run's: ``args.max_steps`` when set (> 0), else the steps HF takes over
    ``train_dataset`` (its length, the batch size, accumulation, processes and epochs of ``args``). A
    ``num_training_steps`` given as well and disagreeing with that warns (the lr would decay over another
    length than the Trainer trains); given alone, it is used as it is.

    Not for DeepSpeed or FSDP (HF drops or refuses an optimizer instance there): use
    ``LionTrainer``.
    """
    derived, source = None, ""
    if args.max_steps > 0:
        derived, source = args.max_steps, f"args.max_steps={args.max_steps}"
    elif train_dataset is not None:
        if not hasattr(train_dataset, "__len__"):
            raise TypeError("train_dataset has no length to derive the schedule from: set args.max_steps or pass "
                            "num_training_steps")
        derived = _steps_from_dataset(args, train_dataset)
        source = f"the {derived} steps of {len(train_dataset)} rows over {args.num_train_epochs:g} epochs"
    if num_training_steps is None:
        if derived is None:
            raise ValueError("lion_optimizers needs the schedule's length: set args.max_steps, pass train_dataset=, "
                             "or pass num_training_steps")
        num_training_steps = derived
    elif num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be > 0, got {num_training_steps}")
    elif derived is not None and num_training_steps != derived:
        warnings.warn(f"num_training_steps={num_training_steps} disagrees with {source}: the lr schedule would run "
                      f"over {num_training_steps} steps while the Trainer trains {derived}. Leave num_training_steps "
                      "unset to take the run's length.", UserWarning, stacklevel=2)
    if getattr(args, "lion_gradient_release", False):
        # A plain Trainer would train without it, silently: only LionTrainer attaches the release.
        raise ValueError("lion_gradient_release=True needs LionTrainer (it attaches the release at the first training "
                         "step); with a plain Trainer attach lion_hf.GradientRelease to the optimizer yourself")
    optimizer = Lion(lion_param_groups(model, args.weight_decay), **_lion_kwargs(args))
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return optimizer, scheduler
