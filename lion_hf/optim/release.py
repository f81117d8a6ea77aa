"""Gradient release: each parameter stepped by Lion the moment its gradient is ready, in backward, and
the gradient freed.

Lion's update of a parameter needs that parameter's gradient alone, so nothing waits for the
whole model's gradients: a post-accumulate-grad hook on each parameter (torch's
``Tensor.register_post_accumulate_grad_hook``) hands it to a small bucket, and once the bucket's
gradients hold ``bucket_numel`` elements (and at the end of backward) its params are stepped,
through the dispatcher's one step path (:func:`~lion_hf.optim.dispatch.prepare_step` then
:func:`~lion_hf.optim.dispatch.apply_step` on each param's slice of its group,
:meth:`Lion.step_group`), and their gradients set to None. One dispatch per bucket, not per param,
keeps the per-call cost of the kernels out of backward; ``bucket_numel=0`` steps each param alone.
At most a bucket's gradients are alive at once instead of all of them: a full fine-tune saves the
gradients' bytes (2 or 4 per parameter) at the peak.

* **Exact.** A step in backward computes what :meth:`Lion.step` computes from the same gradient
  with the group's lr at that moment (a scheduler steps after the optimizer, so the lr of step
  ``k`` is the same). The stochastic-rounding seeds of a step are drawn all at once, at the
  step's first released param, in the order :meth:`Lion.step` draws them (every trainable param
  in group order), so bf16 weights and momenta round as in the ordinary run whenever every
  trainable param gets a gradient (a param that gets none in a step shifts the order of that
  step's seeds, which the ordinary step draws for the params with a gradient only).
* **Gradient accumulation.** ``last_micro_batch`` (a callable) says whether the backward running
  now is the last micro-batch of a step: the hooks of the other micro-batches do nothing, so the
  gradients add up in ``.grad`` as usual, and the last backward steps each param on the sum and
  frees it. The update is the ordinary one, bit for bit; the gradients live across the
  micro-batches, so with accumulation the peak holds them as without release.
* **Clipping and non-finite policies.** A global gradient norm needs every gradient before the
  first step, so there is no clipping under release, and ``nonfinite_grad`` "skip_step" /
  "raise" (which judge the whole step before anything moves) are refused: "skip_elements" (each
  NaN/inf element left as it was) or "propagate" run.
* **DDP.** The hooks fire before DDP's all-reduce; :meth:`GradientRelease.ddp` registers a DDP
  communication hook instead, which all-reduces each bucket and steps its params on the reduced
  gradients as the bucket arrives (the optimizer-overlap scheme). DDP keeps its own bucket
  buffers, so there the gain is the overlap, not memory.

* **The largest gradients, in chunks.** With a dense-gradient release the peak still holds the
  largest single gradient: in a language model the input embedding's and the output layer's
  (vocab x hidden each). :meth:`GradientRelease.chunk_embeddings` keeps both from ever being whole:
  the input embedding returns a sparse gradient (torch's ``nn.Embedding(sparse=True)``: the rows of
  the batch's tokens), which the step expands a chunk of rows at a time, and the output layer's
  backward computes its weight's gradient a chunk of rows at a time and steps each chunk at once.
  The update is the same bits (the chunks compute what the whole tensors do: each row of an
  embedding's gradient sums its tokens in the same order, each row of a matmul's is its own dot
  products), for one backward per step; under accumulation or autocast the output layer keeps its
  whole gradient.

``step()`` only runs its closure while a release is attached (it raises when a gradient was left
behind, unstepped), and ``zero_grad()`` has nothing left to free.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lion_hf.optim.dispatch import apply_step, apply_step_by_rows, prepare_step
from lion_hf.optim.lion import Lion
from lion_hf.optim.numerics import with_seeds
from lion_hf.optim.validation import check_step_scalars, validate_options

__all__ = ["DEFAULT_BUCKET_NUMEL", "RELEASE_POLICIES", "GradientRelease"]

# Ready params are stepped together once their gradients hold this many elements (or at the end
# of backward): one dispatch per bucket instead of per param, for at most this many gradient
# elements held beyond the ordinary release (16 MB of fp32).
DEFAULT_BUCKET_NUMEL = 1 << 22
# The nonfinite_grad policies a released step can honour: each judges one element at a time.
RELEASE_POLICIES = ("skip_elements", "propagate")


def _check_policy(optimizer: Lion) -> None:
    if optimizer.nonfinite_grad not in RELEASE_POLICIES:
        raise ValueError(
            f"gradient release steps each param as soon as its gradient is ready, so nonfinite_grad="
            f"{optimizer.nonfinite_grad!r} (which judges the whole step before anything moves) cannot hold: "
            f"use one of {RELEASE_POLICIES} (skip_elements leaves each NaN/inf element as it was)")


class GradientRelease:
    """Steps ``optimizer``'s params during backward and frees their gradients (module docstring).

    ``GradientRelease(optimizer)`` registers a post-accumulate-grad hook on every param that
    requires a gradient; :meth:`remove` (or leaving a ``with`` block) takes them off and gives
    :meth:`Lion.step` back its work. ``last_micro_batch`` is called once per backward: False
    keeps the gradients for the next micro-batch (default: every backward is a step's last).
    Under DDP use :meth:`GradientRelease.ddp` instead.

    Example, a plain loop with accumulation over ``n`` micro-batches::

        i = 0
        release = GradientRelease(opt, last_micro_batch=lambda: (i + 1) % n == 0)
        for i, batch in enumerate(loader):
            model(**batch).loss.div(n).backward()   # the last micro-batch's backward steps
            if (i + 1) % n == 0:
                opt.step()                          # updates nothing; checks no gradient was left
                scheduler.step()
    """

    def __init__(self, optimizer: Lion, *, last_micro_batch: Callable[[], bool] | None = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, _ddp: Any = None) -> None:
        if not isinstance(optimizer, Lion):
            raise TypeError(f"GradientRelease steps a lion_hf Lion, got {type(optimizer).__name__}")
        if type(optimizer) is not Lion:
            raise ValueError(f"gradient release is not available for {type(optimizer).__name__}: its step is not one "
                             "param at a time (DistributedLion votes over the whole step's signs); use Lion")
        if optimizer.gradient_release is not None:
            raise ValueError("this optimizer already has a GradientRelease attached; remove() it first")
        _check_policy(optimizer)
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 0:
            raise ValueError(f"bucket_numel must be an int >= 0 (0: each param on its own), got {bucket_numel!r}")
        if last_micro_batch is not None and not callable(last_micro_batch):
            raise TypeError(f"last_micro_batch must be a callable returning a bool, got {last_micro_batch!r}")
        self.optimizer = optimizer
        self.last_micro_batch = last_micro_batch
        self.bucket_numel = bucket_numel
        self._pending: list[Tensor] = []  # ready params waiting for their bucket's dispatch
        self._pending_numel = 0
        self.steps = 0  # steps run in backward
        self._index: dict[int, int] = {}  # id(param) -> its group's index
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._index.setdefault(id(p), index)
        self._seeds: dict[int, Tensor | None] | None = None  # this step's, by id(param), once drawn
        self._stepped: set[int] = set()  # ids of the params this step has stepped
        self._in_backward = False
        self._nested_end = False
        self._last = True
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []  # what chunk_embeddings changed on modules, to restore
        self._ddp = _ddp
        if _ddp is None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        optimizer.gradient_release = self

    # ------------------------------------------------------------------ turning it on and off

    @classmethod
    def ddp(cls, optimizer: Lion, ddp_model: torch.nn.parallel.DistributedDataParallel,
            process_group: Any = None) -> GradientRelease:
        """Release under DDP: a communication hook on ``ddp_model`` all-reduces each bucket (the mean
        over ranks, as DDP's own) and then steps the bucket's params on the reduced gradients. DDP
        takes one communication hook per model, for good: :meth:`remove` turns this one into a plain
        all-reduce. Gradient accumulation goes through DDP's ``no_sync()``, whose backwards run no
        hook; the synced backward is the step."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"GradientRelease.ddp needs a DistributedDataParallel model, got "
                            f"{type(ddp_model).__name__}")
        release = cls(optimizer, _ddp=ddp_model)

        def release_hook(state, bucket):  # unannotated: DDP refuses annotations other than its own classes
            if release.optimizer.gradient_release is not release:
                return allreduce_hook(state, bucket)
            if bucket.index() == 0:  # DDP launches its buckets in order: a backward's first
                release._begin_step()
            reduced = allreduce_hook(state, bucket)

            def step_bucket(fut):
                pairs = [(p, g) for p, g in zip(bucket.parameters(), bucket.gradients()) if id(p) in release._index]
                with release._lock:
                    release._step([p for p, _ in pairs], [g for _, g in pairs])
                return fut.value()

            return reduced.then(step_bucket)

        ddp_model.register_comm_hook(process_group, release_hook)
        return release

    def remove(self) -> None:
        """Turn release off: the hooks go (under DDP the comm hook only all-reduces from now on) and
        :meth:`Lion.step` steps again. Gradients already accumulated stay for that step."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._undo:
            self._undo.pop()()
        if self.optimizer.gradient_release is self:
            self.optimizer.gradient_release = None

    def chunk_embeddings(self, model: torch.nn.Module) -> list[str]:
        """Keep the input embedding's and the output layer's gradients from ever being whole (module
        docstring), on ``model`` (what its ``get_input_embeddings()`` / ``get_output_embeddings()``
        return, as HF models have them). Taken: an ``nn.Embedding`` (without ``max_norm`` or
        ``scale_grad_by_freq``) and a bias-free ``nn.Linear`` whose weight this optimizer trains and
        no other module uses (a tied weight gets a dense gradient from its other use anyway).
        :meth:`remove` restores both modules. Not under DDP, whose buckets need every gradient.
        The embedding is made sparse at each forward that is a step's last micro-batch with no
        gradient held (``last_micro_batch`` is asked then too), so under gradient accumulation it
        keeps its dense gradient. Returns which it took ("input", "output")."""
        if self._ddp is not None:
            raise ValueError("chunk_embeddings cannot run under DDP: DDP reduces each bucket of whole gradients")
        uses: dict[int, int] = {}
        for _, q in model.named_parameters(remove_duplicate=False):
            uses[id(q)] = uses.get(id(q), 0) + 1

        def own(weight: Any) -> bool:  # trained by this optimizer, used by this module alone
            return (isinstance(weight, Tensor) and weight.requires_grad and id(weight) in self._index
                    and uses.get(id(weight)) == 1)

        taken = []
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else None
        if (isinstance(embedding, torch.nn.Embedding) and own(embedding.weight) and not embedding.sparse
                and embedding.max_norm is None and not embedding.scale_grad_by_freq):
            handle = embedding.register_forward_pre_hook(functools.partial(_embedding_pre_hook, self))
            self._undo.append(functools.partial(setattr, embedding, "sparse", False))
            self._undo.append(handle.remove)
            taken.append("input")
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        if (type(output) is torch.nn.Linear and output.bias is None and own(output.weight)
                and "forward" not in vars(output)):
            output.forward = functools.partial(_output_forward, output, self)
            self._undo.append(functools.partial(vars(output).pop, "forward", None))
            taken.append("output")
        return taken

    @property
    def active(self) -> bool:
        return self.optimizer.gradient_release is self

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block backwards keep their gradients (the last-micro-batch answer is False)."""
        saved = self.last_micro_batch
        self.last_micro_batch = lambda: False
        try:
            yield
        finally:
            self.last_micro_batch = saved

    # ------------------------------------------------------------------ the step in backward

    def _hook(self, p: Tensor) -> None:
        if self._entered(p) and p.grad is not None:
            self._check_once(p)
            self._pending.append(p)
            self._pending_numel += p.numel()
            if self._pending_numel >= self.bucket_numel:
                self._flush()

    def _entered(self, p: Tensor) -> bool:
        """Called at each param ``p`` a backward hands over (its hook, or an output layer's backward):
        at the first, asks whether it is the last micro-batch of a step and begins the step.
        Whether this backward steps."""
        if not self._in_backward:
            # A backward's first hook: ask whether it is the step's last micro-batch, once, and
            # close the backward when the engine has run every node.
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            # After a backward that ended nested in another's node (reentrant checkpointing) the outer
            # one may go on firing hooks of the same step: a param not stepped yet continues it.
            continuing = self._nested_end and self._last and id(p) not in self._stepped
            self._nested_end = False
            if not continuing:
                self._last = True if self.last_micro_batch is None else bool(self.last_micro_batch())
                if self._last:
                    self._begin_step()
        return self._last

    def _flush(self) -> None:
        """Step the params whose gradients are ready, in one dispatch, and free their gradients."""
        pending, self._pending, self._pending_numel = self._pending, [], 0
        if pending:
            self._step(pending, None)
            for p in pending:
                p.grad = None

    def _end_backward(self) -> None:
        self._in_backward = False
        self._flush()
        current_node = getattr(torch._C, "_current_autograd_node", lambda: None)
        if current_node() is not None:
            # The backward that ended ran inside a node of another (reentrant checkpointing): the
            # outer one goes on, and hooks it fires may still belong to this step (see _hook).
            self._nested_end = True
            return
        if self._last:
            self._seeds = None

    def _begin_step(self) -> None:
        """Checks and seeds of a step, as :meth:`Lion.step` makes them before the dispatcher runs."""
        opt = self.optimizer
        validate_options(opt.impl, opt.nonfinite_grad)
        _check_policy(opt)
        check_step_scalars(opt.param_groups)
        self._seeds = self._draw_seeds()
        self._stepped = set()
        self.steps += 1

    def _draw_seeds(self) -> dict[int, Tensor | None]:
        """Each param's row of the step's stochastic-rounding seeds, drawn in one call in the order
        the ordinary step draws them (:func:`~lion_hf.optim.numerics.with_seeds` over every
        trainable param, group by group). The groups are built by :meth:`Lion.step_group`, so each
        momentum exists with the dtype the step will store (created here at the first step, as the
        ordinary step creates it before drawing); a param whose gradient is not there yet stands in
        with a zero-stride tensor (with_seeds reads dtypes and sizes only)."""
        opt = self.optimizer
        templates, params = [], []
        for index, group in enumerate(opt.param_groups):
            trainable = [p for p in group["params"] if p.requires_grad]
            if not trainable:
                continue
            stand_ins = [p.grad if p.grad is not None else torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
                         for p in trainable]
            templates.append(opt.step_group(index, trainable, stand_ins))
            params.append(trainable)
        seeds: dict[int, Tensor | None] = {}
        for template, group_params in zip(with_seeds(templates), params):
            for i, p in enumerate(group_params):
                seeds.setdefault(id(p), None if template.seeds is None else template.seeds[i:i + 1])
        return seeds

    def _check_once(self, p: Tensor) -> None:
        if id(p) in self._stepped:
            # Its gradient arrived in two parts, each firing the hook (a param used both inside and
            # outside a reentrant checkpoint, or two backward calls in one micro-batch): stepping
            # again would apply a second, partial update.
            raise RuntimeError(
                f"gradient release: a param of shape {tuple(p.shape)} received its gradient twice in one step, so it "
                "would be stepped twice on partial gradients (reentrant activation checkpointing with the param also "
                "used outside the checkpoint, or several backward calls for one micro-batch). Use non-reentrant "
                "checkpointing (HF's default), one backward per micro-batch, or mark the earlier backwards as not "
                "the last micro-batch (last_micro_batch).")
        self._stepped.add(id(p))

    def _step(self, params: list[Tensor], grads: list[Tensor] | None) -> None:
        """Lion's step of ``params`` (gradients ``grads``, default their ``.grad``): each group's slice
        (:meth:`Lion.step_group`) with the seeds drawn for its params, through the dispatcher's
        prepare and apply stages in one call, as :meth:`Lion.step` runs all its groups."""
        opt = self.optimizer
        if self._seeds is None:  # a bucket outside a begun step (should not happen): begin one
            self._begin_step()
        if grads is not None:
            for p in params:
                self._check_once(p)
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault(self._index[id(p)], []).append(i)
        steps = []
        for index, positions in sorted(by_group.items()):
            step = opt.step_group(index, [params[i] for i in positions],
                                  None if grads is None else [grads[i] for i in positions])
            if not step.params:
                continue
            rows = [self._seeds.get(id(p)) for p in step.params]
            if rows[0] is not None:
                step = step._replace(seeds=torch.cat(rows))
            steps.append(step)
        if not steps:
            return
        prepared = prepare_step(steps, impl=opt.impl, nonfinite_grad=opt.nonfinite_grad, draw_seeds=False)
        if prepared is not None:  # only the skip_step / raise gate returns None; refused above
            apply_step(prepared)

    def _takes_rows(self, weight: Tensor) -> bool:
        # Whether an output layer's backward now hands its weight's gradient over in rows: while
        # this release is attached (outside DDP), in the backward of a step's last micro-batch, with
        # no gradient of earlier micro-batches held (that sum is stepped whole, by the hook).
        return self.active and self._ddp is None and self._last and self._in_backward and weight.grad is None

    def _sparse_now(self, weight: Tensor) -> bool:
        # Whether an input embedding's forward now makes a sparse gradient: in the last micro-batch of
        # a step, with no gradient of earlier ones held. Under accumulation every micro-batch then
        # makes a dense one, added up as without chunking (a dense and a sparse gradient would add
        # in another order).
        return (self.active and self._ddp is None and weight.grad is None and torch.is_grad_enabled()
                and (self.last_micro_batch is None or bool(self.last_micro_batch())))

    def _step_rows(self, p: Tensor, grad_rows: Callable[[int, int], Tensor]) -> None:
        """Step ``p`` now, its gradient given a chunk of rows at a time by ``grad_rows(start, stop)``
        (:func:`~lion_hf.optim.dispatch.apply_step_by_rows`), with the seeds drawn for it."""
        opt = self.optimizer
        self._check_once(p)
        stand_in = torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)  # shape and dtype, no memory
        step = opt.step_group(self._index[id(p)], [p], [stand_in])
        row = self._seeds.get(id(p)) if self._seeds is not None else None
        if row is not None:
            step = step._replace(seeds=row)
        prepared = prepare_step([step], impl=opt.impl, nonfinite_grad=opt.nonfinite_grad, draw_seeds=False)
        if prepared is not None:
            apply_step_by_rows(prepared, grad_rows)

    def check_stepped(self) -> None:
        """Called by :meth:`Lion.step` while this release is attached: every param's gradient should
        have been stepped and freed in backward. A gradient still held means the last backward was
        not marked as the last micro-batch (or a param got its gradient without a hook): stepping
        nothing then would lose the update silently, so this raises."""
        if self._ddp is not None:
            return  # DDP writes the reduced gradients back after the hooks stepped them
        held = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if held:
            raise RuntimeError(
                f"Lion.step() under gradient release found {len(held)} param(s) still holding a gradient (first: "
                f"shape {tuple(held[0].shape)}): release steps each param in the backward of a step's last "
                "micro-batch, and the last backward was not marked as one (last_micro_batch returned False), or "
                "these params had no hook (requires_grad set after the release was attached). Mark the last "
                "micro-batch, or remove() the release to step them here.")


class _RowsInBackward(torch.autograd.Function):
    """``x @ weight.T`` whose backward, in a step of gradient release, steps ``weight`` a chunk of
    rows at a time instead of returning its gradient. The products are the ones autograd's own
    backward of a linear layer computes (``grad.mm(weight)`` for the input; for the weight,
    ``grad.T.mm(x)``, whose rows are each a row of the chunked product), so every bit is the same."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, release: GradientRelease) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.release = release
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        release: GradientRelease = ctx.release
        grad2d = grad.reshape(-1, grad.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        # The input's gradient first: the weight is stepped in place below.
        grad_x = grad2d.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        if not (release._entered(weight) and release._takes_rows(weight)):
            return grad_x, grad2d.t().mm(x2d), None  # kept for the next micro-batch, or no release now
        release._step_rows(weight, lambda start, stop: grad2d[:, start:stop].t().mm(x2d))
        return grad_x, None, None


def _embedding_pre_hook(release: GradientRelease, module: torch.nn.Embedding, args: Any) -> None:
    # Decided at each forward: a sparse gradient only where the release will step it alone.
    module.sparse = release._sparse_now(module.weight)


def _output_forward(module: torch.nn.Linear, release: GradientRelease, x: Tensor) -> Tensor:
    # The output layer's forward under chunk_embeddings: the chunked backward while this release
    # steps in backward; the module's own otherwise (no grad, autocast, after remove()).
    if (torch.is_grad_enabled() and release.active and module.weight.requires_grad
            and not torch.is_autocast_enabled(x.device.type)):
        return _RowsInBackward.apply(x, module.weight, release)
    return torch.nn.Linear.forward(module, x)
