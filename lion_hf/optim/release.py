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

* **The input embedding's gradient, sparse** (opt-in). A classifier's word embedding is its
  largest tensor (half of MiniLM-L6), and its dense gradient is alive at the end of backward.
  :meth:`GradientRelease.sparse_embedding` makes it sparse (torch's ``nn.Embedding(sparse=True)``:
  a row per token), and the step expands it a chunk of rows at a time; each row sums its tokens
  with torch's dense embedding backward, in the same order, so where the weight's gradient comes
  from one lookup per backward the update is the same bits (otherwise a warning says so).

``step()`` only runs its closure while a release is attached (it raises when a gradient was left
behind, unstepped), and ``zero_grad()`` has nothing left to free.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lion_hf.optim.dispatch import apply_step, apply_step_by_rows, prepare_step
from lion_hf.optim.lion import Lion
from lion_hf.optim.numerics import row_chunks, sparse_rows, with_seeds
from lion_hf.optim.validation import check_step_scalars, validate_options

__all__ = ["DEFAULT_BUCKET_NUMEL", "RELEASE_POLICIES", "ChunkedOutputGrad", "GradientRelease"]

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
    :meth:`Lion.step` back its work. ``last_micro_batch`` is called once per backward (and, with
    :meth:`sparse_embedding`, at the embedding's forward too), so it must answer from where the
    loop is, not count its calls: False keeps the gradients for the next micro-batch (default:
    every backward is a step's last).
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
        self._embeddings: dict[int, tuple[torch.nn.Embedding, list[Any]]] = {}  # id(weight) -> (module, hooks)
        self._sparse_lookup: dict[int, int] = {}  # id(weight) -> its sparse lookups since its last gradient
        self._warned_lookups = False
        self._ddp = _ddp
        for other in list(_RELEASES):
            if other.active and not self._index.keys().isdisjoint(other._index):
                raise ValueError("a param of this optimizer is already stepped in backward by the GradientRelease of "
                                 "another optimizer (a Trainer that was not done with it?): two releases would step "
                                 "it twice. remove() that one first.")
        _RELEASES.add(self)
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
        for key in list(self._embeddings):
            self._drop_embedding(key)
        self._sparse_lookup.clear()
        if self.optimizer.gradient_release is self:
            self.optimizer.gradient_release = None

    def sparse_embedding(self, model: torch.nn.Module) -> bool:
        """Make the input embedding of ``model`` (its ``get_input_embeddings()``, as HF models have it)
        return a sparse gradient in the backwards this release steps: the step expands it a chunk of
        rows at a time (``numerics.sparse_rows``), so its dense gradient never exists, and the update
        is the same bits. Taken: an ``nn.Embedding`` without ``max_norm`` or ``scale_grad_by_freq``
        whose weight this optimizer trains and no other module uses (a tied weight also gets a dense
        gradient from its other use). Decided at each forward: sparse only in a step's last
        micro-batch with no gradient held (under accumulation the gradients stay dense, added up as
        without release), with gradients enabled, outside ``torch.compile`` (whose compiled kernels
        take no sparse tensors), and when the lookup's tokens are fewer than the embedding's rows
        (a sparse gradient holds a row per token). ``last_micro_batch`` is then also asked at that
        forward. Not under DDP (its buckets reduce dense gradients). :meth:`remove` restores the
        module. Returns whether the embedding was taken."""
        if self._ddp is not None:
            raise ValueError("sparse_embedding cannot run under DDP: DDP reduces buckets of dense gradients")
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else None
        if not isinstance(embedding, torch.nn.Embedding) or embedding.max_norm is not None \
                or embedding.scale_grad_by_freq or embedding.sparse:
            return False
        weight = embedding.weight
        uses = sum(q is weight for _, q in model.named_parameters(remove_duplicate=False))
        if not (weight.requires_grad and id(weight) in self._index and uses == 1):
            return False
        if id(weight) in self._embeddings:
            return True
        owner = _SPARSE_EMBEDDINGS.get(embedding)
        if owner is not None and owner.active:
            raise ValueError("this embedding is already made sparse by another GradientRelease; remove() it first")
        _SPARSE_EMBEDDINGS[embedding] = self
        # The flag is read when the lookup runs (its backward node keeps it): set just before, cleared
        # just after, so that between lookups the module is dense, as built.
        self._embeddings[id(weight)] = (embedding, [embedding.register_forward_pre_hook(_embedding_pre_hook),
                                                    embedding.register_forward_hook(_embedding_post_hook)])
        return True

    def _drop_embedding(self, key: int) -> None:
        """Give the embedding whose weight has id ``key`` back its dense gradient, as built."""
        embedding, handles = self._embeddings.pop(key)
        for handle in handles:
            handle.remove()
        if _SPARSE_EMBEDDINGS.get(embedding) is self:
            del _SPARSE_EMBEDDINGS[embedding]
        embedding.sparse = False

    def _sparse_now(self, embedding: torch.nn.Embedding, args: tuple) -> bool:
        """Whether this forward of ``embedding`` makes a sparse gradient (see :meth:`sparse_embedding`)."""
        weight = embedding.weight
        ids = args[0] if args else None
        if not (self.active and isinstance(ids, Tensor) and torch.is_grad_enabled() and weight.requires_grad
                and weight.grad is None) or torch.compiler.is_compiling():
            return False
        row_bytes = weight[0].numel() * weight.element_size()
        if ids.numel() * (row_bytes + 8) >= weight.shape[0] * row_bytes:  # a row and an int64 index per token
            return False
        if not (self.last_micro_batch is None or bool(self.last_micro_batch())):
            return False
        self._sparse_lookup[id(weight)] = self._sparse_lookup.get(id(weight), 0) + 1
        return True

    def _sparse_grad(self, p: Tensor) -> None:
        """At the hook of an embedding's weight made sparse: a sparse gradient that is not stepped now
        (not the step's last micro-batch, as ``last_micro_batch`` answered at backward) becomes the
        dense gradient of its lookup, bit for bit, so that the next micro-batches add to it as in the
        ordinary run; two lookups before one backward, or a dense gradient where the lookup was
        sparse (the weight used by another op too), warn, and the latter turns the embedding dense."""
        g = p.grad
        lookups = self._sparse_lookup.pop(id(p), None)
        if g is None:
            return
        if g.is_sparse:
            if not self._last:
                p.grad = sparse_rows(g, 0, p.shape[0])
            elif lookups is not None and lookups > 1 and not self._warned_lookups:
                self._warned_lookups = True
                warnings.warn(
                    "gradient release: the input embedding was looked up more than once before one backward (two "
                    "forward passes in one loss?). Its sparse gradients are summed in one pass per row: the same "
                    "sum as the ordinary run's, possibly rounded differently. LionTrainingArguments("
                    "lion_sparse_embedding=False) (or no sparse_embedding) keeps it dense.", stacklevel=2)
        elif lookups is not None:
            # The lookup made a sparse gradient but a dense one arrived: another op uses the weight too (an
            # output head multiplying by it), and the two were added in another order than the ordinary run's.
            self._drop_embedding(id(p))
            warnings.warn(
                "gradient release: the input embedding's weight is also used outside its module (a dense gradient "
                "was added to its sparse one), so this step's gradient may be rounded differently from the ordinary "
                "run's; it stays dense from now on.", stacklevel=2)

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

    def _entered(self, p: Tensor) -> None:
        """Called where a backward hands over param ``p`` (its hook, or an output layer's backward
        stepping it in rows): at a backward's first, ask whether it is the step's last
        micro-batch, once, and close the backward when the engine has run every node."""
        if self._in_backward:
            return
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

    def _hook(self, p: Tensor) -> None:
        self._entered(p)
        if id(p) in self._embeddings:
            self._sparse_grad(p)
        if self._last and p.grad is not None:
            self._check_once(p)
            self._pending.append(p)
            self._pending_numel += p.numel()
            if self._pending_numel >= self.bucket_numel:
                self._flush()

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
            stand_ins = [p.grad if p.grad is not None else _stand_in(p) for p in trainable]
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
                "the last micro-batch (last_micro_batch). With ChunkedOutputGrad (lion_chunked_output_grad), the "
                "output layer's weight must not also be used outside its module (a loss term on the weight itself).")
        self._stepped.add(id(p))

    def _step(self, params: list[Tensor], grads: list[Tensor] | None,
              by_rows: tuple[Callable[[int, int], Tensor], list[tuple[int, int]]] | None = None) -> None:
        """Lion's step of ``params`` (gradients ``grads``, default their ``.grad``): each group's slice
        (:meth:`Lion.step_group`) with the seeds drawn for its params, through the dispatcher's
        prepare and apply stages in one call, as :meth:`Lion.step` runs all its groups. With
        ``by_rows`` (``grad_rows, ranges``: one param, its ``grads`` a stand-in of its shape) the
        apply stage is :func:`~lion_hf.optim.dispatch.apply_step_by_rows`."""
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
        if prepared is None:  # only the skip_step / raise gate returns None; refused at _begin_step
            return
        if by_rows is None:
            apply_step(prepared)
        else:
            apply_step_by_rows(prepared, *by_rows)

    def _takes_rows(self, p: Tensor) -> bool:
        """Whether an output layer's backward (:class:`ChunkedOutputGrad`) hands ``p``'s gradient to
        this release now, a range of rows at a time: in the backward of a step's last micro-batch,
        outside DDP, with no gradient of earlier micro-batches held (that sum is stepped whole, by
        the hook, after autograd adds this backward's part to it)."""
        if not (self.active and self._ddp is None and id(p) in self._index and p.grad is None):
            return False
        self._entered(p)
        return self._last

    def _step_rows(self, p: Tensor, grad_rows: Callable[[int, int], Tensor], ranges: list[tuple[int, int]]) -> None:
        """Step ``p`` now, its gradient given a range of rows at a time by ``grad_rows``."""
        self._step([p], [_stand_in(p)], (grad_rows, ranges))

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


def _stand_in(p: Tensor) -> Tensor:
    # A gradient of p's shape, dtype and device that takes no memory (an expanded zero), where a step
    # needs one for its checks and state but reads its values elsewhere or not at all.
    return torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)


class ChunkedOutputGrad:
    """Compute the weight gradient of ``model``'s output layer (its ``get_output_embeddings()``, the
    LM head: vocab x hidden, as large as the input embedding) a range of rows at a time.

    Under a :class:`GradientRelease` stepping that weight, in the backward of a step's last
    micro-batch each range is stepped as soon as it is computed, so the layer's whole gradient
    never exists (with the input embedding's made sparse, :meth:`GradientRelease.sparse_embedding`,
    the largest gradients of a language model are then never at the peak). Otherwise (no release,
    an earlier micro-batch, DDP, a step that needs the whole gradient such as ``cautious``, or a
    backward in which the layer was called more than once) the ranges are written into the whole
    gradient, returned as autograd's own. The weight must not also be used outside the module (a
    loss term on the weight itself): its part would reach the release after the ranges were
    stepped, which the release refuses (RuntimeError). Either way each range is the same product
    (``grad[:, a:b].T @ x`` for the rows ``a:b`` of :func:`~lion_hf.optim.numerics.row_chunks`,
    each into a fresh tensor), so a released run and an ordinary run that both use this compute the
    same bits by construction. Against the layer's own backward (one product for the whole weight)
    a BLAS may round a row of a smaller product differently; docs/gradient_release.md says where
    that was measured. The input's gradient is the layer's own (``grad @ weight``, before the
    weight is stepped).

    Taken: a ``torch.nn.Linear`` without bias whose weight requires a gradient and is used by no
    other module (a tied input embedding would add its gradient to the same tensor). Its forward
    runs the chunked backward while the module is taken and gradients are enabled, outside
    autocast, ``torch.compile``'s tracing and ``torch.func`` transforms; otherwise (and after
    :meth:`remove`, or in a copy of the model) it is the module's own.
    ``ChunkedOutputGrad.unavailable(model)`` says why a model cannot be
    taken (None when it can); the constructor raises ValueError with that reason.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        reason = self.unavailable(model)
        if reason is not None:
            raise ValueError(f"ChunkedOutputGrad cannot take this model's output layer: {reason}")
        self.module: torch.nn.Linear = model.get_output_embeddings()
        self._nodes: weakref.WeakSet = weakref.WeakSet()  # live backward nodes of the layer's calls
        self.module.forward = _ChunkedForward(self.module)
        _CHUNKED_OUTPUTS[self.module] = self

    @staticmethod
    def unavailable(model: torch.nn.Module) -> str | None:
        """Why ``model``'s output layer cannot be taken, or None."""
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        if output is None:
            return "the model has no output layer (get_output_embeddings() returned none)"
        if type(output) is not torch.nn.Linear:
            return f"its output layer is a {type(output).__name__}, not a torch.nn.Linear"
        if output.bias is not None:
            return "its output layer has a bias"
        if not output.weight.requires_grad:
            return "its output layer's weight is frozen"
        if sum(q is output.weight for _, q in model.named_parameters(remove_duplicate=False)) != 1:
            return "its output layer's weight is shared with another module (tied to the input embedding?)"
        if output in _CHUNKED_OUTPUTS:
            return "its output layer is already taken by another ChunkedOutputGrad"
        if "forward" in vars(output) and not isinstance(vars(output)["forward"], _ChunkedForward):
            return "its output layer's forward is replaced by something else (a hook of another library?)"
        return None

    @property
    def active(self) -> bool:
        return _CHUNKED_OUTPUTS.get(self.module) is self

    def remove(self) -> None:
        """Give the layer its own forward back."""
        if self.active:
            del _CHUNKED_OUTPUTS[self.module]
            if isinstance(vars(self.module).get("forward"), _ChunkedForward):
                del self.module.forward

    def __enter__(self) -> ChunkedOutputGrad:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _ChunkedForward:
    """The taken output layer's forward. It holds the module weakly (the module holds it), and a
    copy of the model, whose module is not in the map, runs the module's own forward."""

    def __init__(self, module: torch.nn.Linear) -> None:
        self._module = weakref.ref(module)

    def __call__(self, x: Tensor) -> Tensor:
        module = self._module()
        if (module is not None and module in _CHUNKED_OUTPUTS and torch.is_grad_enabled()
                and module.weight.requires_grad and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()):
            return _OutputRows.apply(x, module.weight, _CHUNKED_OUTPUTS[module]._nodes)
        return torch.nn.Linear.forward(module, x)

    def __reduce__(self) -> tuple:
        # Copies and pickles of the model bind a new one to the copied module (pickle memoizes the
        # module before its attributes), which is not taken: it runs the module's own forward.
        return (_ChunkedForward, (self._module(),))


class _OutputRows(torch.autograd.Function):
    """``x @ weight.T`` whose backward computes the weight's gradient a range of rows at a time
    (see :class:`ChunkedOutputGrad`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, nodes: weakref.WeakSet) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.nodes = nodes
        nodes.add(ctx)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        # The input's gradient first: a release steps the weight in place below.
        grad_x = grad2d.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        # needs_input_grad is fixed at the forward: whether this backward wants the weight's gradient
        # (torch.autograd.grad over other inputs, backward(inputs=...)) is the engine's to say.
        if not (ctx.needs_input_grad[1] and torch._C._will_engine_execute_node(ctx.next_functions[1][0])):
            return grad_x, None, None
        ranges = row_chunks(weight.shape, True)
        starts = {first: last for first, last in ranges}

        def grad_rows(first: int, last: int) -> Tensor:
            # Rows first:last as the products of the ranges they hold, each computed alone into a
            # fresh tensor (the same call whether it is stepped or joined), then joined in place.
            if starts.get(first) == last:
                return grad2d[:, first:last].t().mm(x2d)
            rows = torch.empty((last - first, *weight.shape[1:]), dtype=grad.dtype, device=grad.device)
            at = first
            while at < last:
                stop = starts[at]
                rows[at - first:stop - first] = grad2d[:, at:stop].t().mm(x2d)
                at = stop
            return rows

        # Stepped in rows only where this node is the only use of the weight in this backward: the
        # gradients of two calls of the layer (a loss over slices of the sequence) are added by
        # autograd before the weight's hook, as in the ordinary run.
        uses = sum(torch._C._will_engine_execute_node(node) for node in list(ctx.nodes))
        if uses == 1:
            for release in list(_RELEASES):
                if release._takes_rows(weight):
                    release._step_rows(weight, grad_rows, ranges)
                    return grad_x, None, None
        return grad_x, grad_rows(0, weight.shape[0]), None


# Each output layer a ChunkedOutputGrad has taken, and that object (a weak map: see _ChunkedForward).
_CHUNKED_OUTPUTS: weakref.WeakKeyDictionary[torch.nn.Linear, ChunkedOutputGrad] = weakref.WeakKeyDictionary()


# Each input embedding a release makes sparse, and that release: a weak map, so that the module
# holds no reference to the release (a copy or a pickle of the model carries none, and its hook,
# a plain function, then finds no release and leaves the copy as it is).
_SPARSE_EMBEDDINGS: weakref.WeakKeyDictionary[torch.nn.Embedding, GradientRelease] = weakref.WeakKeyDictionary()


# Every GradientRelease made, so that a second one over the same params is refused while the first steps.
_RELEASES: weakref.WeakSet[GradientRelease] = weakref.WeakSet()


def _embedding_pre_hook(module: torch.nn.Embedding, args: tuple) -> None:
    release = _SPARSE_EMBEDDINGS.get(module)
    if release is not None:
        module.sparse = release._sparse_now(module, args)


def _embedding_post_hook(module: torch.nn.Embedding, args: tuple, output: Tensor) -> None:
    if module in _SPARSE_EMBEDDINGS:
        module.sparse = False
