"""The Lion optimizer (Chen et al. 2023): the class :class:`Lion` and the functional :func:`lion`.

The top of ``lion_hf.optim``: both validate their inputs (``validation``) and run every step
through ``dispatch.run_step``, which picks the impl (``for_loop``, ``foreach``, ``cpp``,
``triton``) and holds the shared numerics (``numerics``) to one definition. All impls share the
state layout (``state[p]["exp_avg"]`` and, under Kahan, ``"kahan_comp"``; plain tensors), so a
checkpoint moves freely between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lion_hf.optim.dispatch import resolve_impl, run_step
from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    PLAIN_TENSOR_TYPES,
    StepGroup,
    dequantize_momentum,
    eight_bit_chunks,
    eight_bit_scale_numel,
    eight_bit_state,
    offset_seed,
    quantize_momentum,
)
from lion_hf.optim.options import OPTIONS, STATE_DTYPES, defaults
from lion_hf.optim.validation import (
    check_loaded_state_dict,
    check_step_scalars,
    validate_group,
    validate_options,
    validate_param,
)

__all__ = ["Lion", "lion"]

# What a group saved by an older version may lack.
_GROUP_DEFAULTS = defaults("maximize", "cautious", "state_dtype", "param_rounding")
_BETAS = OPTIONS["betas"].default


def _momentum_dtype(p: Tensor, state_dtype: str) -> torch.dtype:
    """The dtype the momentum of ``p`` is stored in under ``state_dtype``: under "int8", 8-bit
    codes for the params :func:`~lion_hf.optim.numerics.eight_bit_state` takes, fp32 for the rest."""
    if state_dtype == "int8" and not eight_bit_state(p):
        return torch.float32
    return STATE_DTYPES[state_dtype]


def _refuse_dtensor(p: Tensor) -> None:
    if type(p) not in PLAIN_TENSOR_TYPES:
        raise ValueError("Lion: state_dtype='int8' does not take DTensor (FSDP2) params: the blocks of its "
                         "8-bit momentum would cross the shards. Use state_dtype='bf16' there.")


def _zero_momentum(p: Tensor, s: dict[str, Any], dtype: torch.dtype) -> None:
    """Create the momentum of ``p`` in ``s``: zeros of ``dtype``. An 8-bit one is zero codes and zero
    scales, what quantizing zeros gives (no fp32 tensor of the param's size on the way)."""
    if dtype != torch.int8:
        s["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return
    _refuse_dtensor(p)
    s["exp_avg"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
    s["exp_avg_scale"] = torch.zeros(eight_bit_scale_numel(p.numel()), dtype=torch.float32, device=p.device)


def _store_momentum_as(p: Tensor, s: dict[str, Any], exp_avg: Tensor, scale: Tensor | None, dtype: torch.dtype) -> None:
    """Set ``s["exp_avg"]`` (and ``s["exp_avg_scale"]``) to the momentum ``exp_avg`` (int8 codes
    with their block ``scale``, or a float tensor) stored as ``dtype``, on the param's device: codes
    to another dtype are dequantized, a float momentum to int8 is quantized (stochastically, with
    a fixed seed, so that a load is reproducible and draws nothing from the generator). Always a
    new tensor: the caller's is never aliased. A conversion runs in chunks of whole blocks
    (``numerics.eight_bit_chunks``), so that no fp32 copy of the whole tensor is made on the way
    (the same bits as converting it whole)."""
    if scale is not None and dtype == torch.int8:
        s["exp_avg"] = exp_avg.to(device=p.device, copy=True).contiguous()
        s["exp_avg_scale"] = scale.to(device=p.device, dtype=torch.float32, copy=True).contiguous()
        return
    exp_avg = exp_avg.detach()
    flat = exp_avg.reshape(-1)  # a view when contiguous; a copy of its own dtype otherwise
    if dtype == torch.int8:
        _refuse_dtensor(p)
        codes = torch.empty(exp_avg.numel(), dtype=torch.int8, device=p.device)
        new_scale = torch.empty(eight_bit_scale_numel(exp_avg.numel()), dtype=torch.float32, device=p.device)
        for start, stop in eight_bit_chunks(flat.numel()):
            chunk = flat[start:stop].to(device=p.device, dtype=torch.float32)
            codes[start:stop], new_scale[start // EIGHT_BIT_BLOCK:-(-stop // EIGHT_BIT_BLOCK)] = quantize_momentum(
                chunk, offset_seed(0, start))
        s["exp_avg"] = codes.view(exp_avg.shape)
        s["exp_avg_scale"] = new_scale
        return
    if scale is None:
        s["exp_avg"] = exp_avg.to(device=p.device, dtype=dtype, copy=True)
    else:
        value = torch.empty(exp_avg.numel(), dtype=dtype, device=p.device)
        for start, stop in eight_bit_chunks(flat.numel()):
            blocks = scale[start // EIGHT_BIT_BLOCK:-(-stop // EIGHT_BIT_BLOCK)].to(exp_avg.device)
            value[start:stop] = dequantize_momentum(flat[start:stop], blocks).to(device=p.device, dtype=dtype)
        s["exp_avg"] = value.view(exp_avg.shape)
    s.pop("exp_avg_scale", None)


def _refuse_a_set(params: Any) -> None:
    # torch refuses a set in a param group; Lion refuses it at the top level too: a set's order
    # changes between runs, and a checkpoint maps its state to params by position.
    if isinstance(params, (set, frozenset)):
        raise TypeError("Lion: params must be an ordered collection (a list, or model.parameters()), not a "
                        f"{type(params).__name__}: the order of tensors in a set changes between runs, and a "
                        "checkpoint's state is matched to params by position")


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    lr: float = OPTIONS["lr"].default,
    beta1: float = _BETAS[0],
    beta2: float = _BETAS[1],
    weight_decay: float = OPTIONS["weight_decay"].default,
    maximize: bool = OPTIONS["maximize"].default,
    cautious: bool = OPTIONS["cautious"].default,
    nonfinite_grad: str = OPTIONS["nonfinite_grad"].default,
    param_rounding: str = OPTIONS["param_rounding"].default,
    impl: str = OPTIONS["impl"].default,
) -> bool:
    """Functional Lion step over lists of tensors, updated in place. See :class:`Lion`.

    ``kahan_comps`` (with ``param_rounding="kahan"``) holds one compensation tensor per bf16/fp16
    param, of the param's dtype and shape (None for fp32 params). ``impl`` is chosen per device
    as in :class:`Lion`. Returns False when the step was skipped (``nonfinite_grad="skip_step"``),
    else True.
    """
    validate_options(impl, nonfinite_grad)
    group = validate_group(dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, maximize=maximize,
                                cautious=cautious, state_dtype="fp32", param_rounding=param_rounding))
    if kahan_comps is None or param_rounding != "kahan":
        kahan_comps = [None] * len(params)
    beta1, beta2 = group["betas"]
    step = StepGroup(list(params), list(grads), list(exp_avgs), list(kahan_comps), group["lr"], beta1, beta2,
                     group["weight_decay"], maximize, cautious, param_rounding)
    return run_step([step], impl=impl, nonfinite_grad=nonfinite_grad)


class Lion(Optimizer):
    r"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    For each parameter :math:`p` with gradient :math:`g` and momentum :math:`m` (zero at start):

    .. math::
        c &= \beta_1 m + (1 - \beta_1) g \\
        p &\leftarrow p\,(1 - \eta\lambda) - \eta\,\mathrm{sign}(c) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    with :math:`\mathrm{sign}(0) = 0`, learning rate :math:`\eta` and decoupled weight decay
    :math:`\lambda` (scaled by :math:`\eta`, as in AdamW). No epsilon, no bias correction. The
    update has unit magnitude per element, so Lion wants a smaller lr and a larger weight decay
    than AdamW (the product lr * wd sets the effective decay; docs/evidence.md has what this
    project measured).

    Args:
        params: parameters or param groups (each group may set lr, betas, weight_decay,
            maximize, cautious, state_dtype, param_rounding).
        lr: learning rate (default 1e-4).
        betas: (beta1, beta2) in [0, 1): interpolation for the update, decay of the momentum
            (default (0.9, 0.99), the paper's).
        weight_decay: decoupled weight decay (default 0.0).
        maximize: maximise the objective instead of minimising.
        cautious: apply the update only where sign(update) agrees with the gradient, rescaled by
            1 / fraction agreeing (Liang et al. 2024, "Cautious Optimizers"); off by default.
            Under FSDP2 the fraction is taken per local shard.
        state_dtype: ``"fp32"`` (default), ``"bf16"`` or ``"int8"`` momentum. bf16 halves the
            optimizer state (2 instead of 4 bytes per parameter) and is stored with stochastic
            rounding, so the momentum stays unbiased even when one step's change is below half a
            bf16 ulp. int8 stores 8-bit codes (``state[p]["exp_avg"]``, int8) with one fp32 scale per
            block of 256 elements (``state[p]["exp_avg_scale"]``), about 1 byte per parameter, also
            rounded stochastically; params under 4096 elements keep fp32 state
            (docs/implementations.md, "8-bit state").
        param_rounding: how a bf16 or fp16 param stores its new value (fp32 params are exact):

            * ``"stochastic"`` (default): up or down with probability given by the distance, so
              E[stored] = exact value and no step is lost, at no extra memory. Lion moves each
              element by exactly ``lr``, which round-to-nearest drops whenever ``lr`` is under
              half an ulp (bf16 weights above about ``2**8 * lr``).
            * ``"kahan"``: Kahan-compensated summation: the residual that rounding drops is kept
              in ``state[p]["kahan_comp"]`` (the param's dtype, +2 bytes/param) and added back
              at the next step. Deterministic; costs the extra state and its traffic.
            * ``"nearest"``: plain round-to-nearest-even (what ``p.copy_(fp32)`` does); steps
              under half an ulp are lost. For comparison and bit-compatibility with other Lions.
        nonfinite_grad: what a NaN/inf gradient element does:

            * ``"skip_elements"`` (default): that element's parameter and momentum are left
              unchanged; the rest of the step proceeds. The ``cpp`` and ``triton`` kernels fuse
              the check into the update; ``foreach`` and ``for_loop`` add one read of the grads.
            * ``"skip_step"``: if any gradient of the step is non-finite, nothing is updated and
              :attr:`skipped_steps` is incremented. Costs one extra read of the gradients (plus
              one tiny all-reduce for DTensor/FSDP2 shards, so all ranks agree), unless the
              caller already has the global gradient norm: after :meth:`set_grad_norm` the
              verdict is that norm's finiteness (``LionTrainer`` hands over the norm HF computes
              every step). Use it with gradient clipping: clipping by the global norm turns one
              bad element into NaN (or zero) gradients everywhere, which element-wise skipping
              cannot undo.
            * ``"raise"``: raise ``RuntimeError`` before anything is updated (same cost).
            * ``"propagate"``: no check: the NaN enters the momentum (and, depending on the impl,
              the weight); that element stops learning. For measuring the check's cost only.
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"cpp"`` or ``"triton"``
            (see ``lion_hf.optim.dispatch``): ``auto`` is ``triton`` on CUDA when triton is
            installed, ``cpp`` on the CPU when a C++ compiler is found (a C++ kernel built at
            first use and cached), ``foreach`` elsewhere. What a kernel does not take (a tensor
            that is not contiguous) runs in ``foreach``; if the C++ build fails, the optimizer
            warns and continues with ``foreach``.

    All implementations compute in fp32 for fp32, bf16 and fp16 parameters, share one state
    layout (``state[p]["exp_avg"]``, a plain tensor, and its ``"exp_avg_scale"`` when it is 8-bit)
    and so load each other's state dicts.

    Gradient release: ``lion_hf.GradientRelease(opt)`` steps each param during backward, as soon
    as its gradient is ready, and frees the gradient (docs/gradient_release.md); while it is
    attached (:attr:`gradient_release`), :meth:`step` updates nothing.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = OPTIONS["lr"].default,
        betas: tuple[float, float] = OPTIONS["betas"].default,
        weight_decay: float = OPTIONS["weight_decay"].default,
        *,
        maximize: bool = OPTIONS["maximize"].default,
        cautious: bool = OPTIONS["cautious"].default,
        state_dtype: str = OPTIONS["state_dtype"].default,
        param_rounding: str = OPTIONS["param_rounding"].default,
        nonfinite_grad: str = OPTIONS["nonfinite_grad"].default,
        impl: str = OPTIONS["impl"].default,
    ) -> None:
        _refuse_a_set(params)
        validate_options(impl, nonfinite_grad)
        # No sign-flip warning for the defaults: add_param_group warns for each group that uses them.
        defaults = validate_group(dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                       cautious=cautious, state_dtype=state_dtype, param_rounding=param_rounding),
                                  warn_decay=False)
        defaults.pop("params", None)
        # Kept out of param_groups on purpose: load_state_dict restores groups from the
        # checkpoint, and a state saved under one impl must run under the one asked for now.
        # Set before super().__init__, whose add_param_group calls check the impl per device.
        self.impl = impl
        self.nonfinite_grad = nonfinite_grad
        self.skipped_steps = 0
        self._grad_norm: float | Tensor | None = None
        # The lion_hf.optim.release.GradientRelease stepping this optimizer's params during backward,
        # or None. Set and cleared by that handle; while it is set, step() updates nothing.
        self.gradient_release: Any = None
        super().__init__(params, defaults)

    # Optimizer.__getstate__ keeps only defaults/state/param_groups: a deepcopy or a pickled
    # optimizer would lose these and fail at its next step.
    _INSTANCE_DEFAULTS: ClassVar[dict[str, Any]] = {**defaults("impl", "nonfinite_grad"), "skipped_steps": 0}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._INSTANCE_DEFAULTS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in self._INSTANCE_DEFAULTS.items():
            if not hasattr(self, name):
                setattr(self, name, default)
        self._grad_norm = None
        self.gradient_release = None  # its hooks live on the original's params, not on a copy's
        for group in self.param_groups:
            for key, default in _GROUP_DEFAULTS.items():
                group.setdefault(key, default)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validated before it is added: a rejected group never joins the optimizer."""
        param_group = dict(param_group)
        params = param_group["params"]
        _refuse_a_set(params)
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        merged = validate_group({**self.defaults, **param_group}, len(self.param_groups))
        for key in ("lr", "betas", "weight_decay"):
            if key in param_group:
                param_group[key] = merged[key]
        for p in param_group["params"]:
            validate_param(p)
        if self.impl != "auto":
            # Fail now, not at the first step, when the impl cannot run on these params' device.
            # Meta params (materialised later) are the step's ValueError if still meta then, in every impl.
            for device in {p.device for p in param_group["params"] if not p.is_meta}:
                resolve_impl(self.impl, device)
        super().add_param_group(param_group)

    def _states_by_id(self) -> dict[int, dict[str, Any]]:
        """``self.state`` by the ids of its params, for :meth:`_collect`. The params' ``__hash__`` is a
        Python function; one pass over the entries per step spares a call per param."""
        return {id(p): s for p, s in self.state.items()}

    def _collect(
        self, group: dict[str, Any], states_by_id: dict[int, dict[str, Any]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None], list[Tensor | None] | None]:
        """The group's params with a gradient, their gradients, momenta, Kahan residuals (None
        where there is none) and, under state_dtype "int8", the momenta's block scales (None where
        a momentum is not 8-bit; None for another state_dtype); creates missing state. It runs
        every step, so it works list by list, each fact read once."""
        params = list(group["params"])
        grads = [p.grad for p in params]
        # Identity tests only: `None in grads` would call Tensor.__eq__(None) on every grad.
        if not all([g is not None for g in grads]):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        states = [states_by_id.get(id(p)) for p in params]
        if not all([s is not None for s in states]):
            states = [self.state[p] if s is None else s for p, s in zip(params, states)]
        state_dtype = STATE_DTYPES[group["state_dtype"]]
        eight_bit = state_dtype == torch.int8
        exp_avgs = [s.get("exp_avg") for s in states]
        wanted = [_momentum_dtype(p, "int8") for p in params] if eight_bit else None
        present = all([m is not None for m in exp_avgs])
        if not present or ([m.dtype for m in exp_avgs] != wanted if eight_bit
                            else {m.dtype for m in exp_avgs} != {state_dtype}):
            for i, (p, s) in enumerate(zip(params, states)):
                dtype = wanted[i] if eight_bit else state_dtype
                exp_avg = s.get("exp_avg")  # read again: a param listed twice shares its first entry's
                if exp_avg is None:
                    _zero_momentum(p, s, dtype)
                elif exp_avg.dtype != dtype:
                    _store_momentum_as(p, s, exp_avg, s.get("exp_avg_scale"), dtype)
                exp_avgs[i] = s["exp_avg"]
        scales = [s.get("exp_avg_scale") for s in states] if eight_bit else None
        if not eight_bit and True in ["exp_avg_scale" in s for s in states]:
            for s in states:
                s.pop("exp_avg_scale", None)
        comps: list[Tensor | None] = [None] * len(params)
        if group["param_rounding"] == "kahan":
            for i, (p, s) in enumerate(zip(params, states)):
                if p.dtype != torch.float32:
                    comp = s.get("kahan_comp")
                    if comp is None:
                        comp = s["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    comps[i] = comp
                else:
                    s.pop("kahan_comp", None)
        elif True in ["kahan_comp" in s for s in states]:
            for s in states:
                s.pop("kahan_comp", None)  # rounding changed since the checkpoint: the residual (< 1 ulp) goes
        return params, grads, exp_avgs, comps, scales

    def _step_groups(self, groups: list[dict[str, Any]] | None = None) -> list[StepGroup]:
        """Each group's share of this step (its params with a gradient, their state, its
        hyperparameters), as the dispatcher takes it; ``groups`` (default: all) may be slices of
        the param groups (:meth:`step_group`)."""
        states_by_id = self._states_by_id() if groups is None else {}
        steps = []
        for group in self.param_groups if groups is None else groups:
            *tensors, scales = self._collect(group, states_by_id)
            steps.append(StepGroup(*tensors, group["lr"], *group["betas"], group["weight_decay"], group["maximize"],
                                   group["cautious"], group["param_rounding"], exp_avg_scales=scales))
        return steps

    def step_group(self, index: int, params: list[Tensor], grads: list[Tensor] | None = None) -> StepGroup:
        """The share of param group ``index`` that ``params`` (some of its params) take in a step,
        built as :meth:`step` builds it (their state created where missing, the group's
        hyperparameters as they are now), for stepping them apart from the rest: gradient release
        (``lion_hf.optim.release``) runs it through the dispatcher's one step path. Params without
        a gradient are left out, unless ``grads`` gives each param's gradient instead of its
        ``.grad`` (DDP's all-reduced bucket)."""
        group = self.param_groups[index]
        if grads is None:
            return self._step_groups([{**group, "params": list(params)}])[0]
        if len(grads) != len(params):
            raise ValueError(f"Lion.step_group: {len(params)} params but {len(grads)} grads")
        # _collect takes the params that have a .grad; the grads handed in replace them.
        held = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g
            step = self._step_groups([{**group, "params": list(params)}])[0]
        finally:
            for p, g in zip(params, held):
                if g is None:
                    p.grad = None
        return step._replace(grads=list(grads))

    def set_grad_norm(self, norm: float | Tensor) -> None:
        """The global norm of the gradients the next :meth:`step` will use, already computed by the
        caller (gradient clipping computes it). Under ``skip_step`` / ``raise`` that step then
        takes its verdict from the norm alone: it is finite exactly when every gradient is (a
        NaN or inf element makes it NaN or inf), so no gradient is read again. Every rank must
        pass the same global norm (HF's clipping all-reduces it). Used by one step, then cleared.
        """
        self._grad_norm = norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.gradient_release is not None:
            # Every param was stepped in backward, its gradient freed; the handle raises if a
            # gradient was left behind (a backward not marked as the last micro-batch).
            self.gradient_release.check_stepped()
            return loss

        # The options are plain attributes and group entries: a scheduler or a user may have
        # changed them since they were validated. These checks are a few comparisons, and the
        # step's one check of the impl's name (the dispatcher then checks only that it can run).
        validate_options(self.impl, self.nonfinite_grad)
        check_step_scalars(self.param_groups)
        grad_norm, self._grad_norm = self._grad_norm, None  # used by this step only
        # All groups in one dispatch: the C++ kernel then updates every tensor of the step in one call.
        # The dispatcher checks the tensors, then (under skip_step / raise) the non-finite gate across
        # all groups, so a skipped step leaves every group untouched.
        steps = self._step_groups()
        if not run_step(steps, impl=self.impl, nonfinite_grad=self.nonfinite_grad, grad_norm=grad_norm):
            self.skipped_steps += 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, validated first: its groups' hyperparameters as in ``__init__``, and
        its state as Lion's (another optimizer's state, or a non-finite momentum, is a
        ValueError; nothing is changed then). The momentum keeps full precision and takes the
        ``state_dtype`` this optimizer was built with (like ``impl``, the ``state_dtype`` and
        ``param_rounding`` chosen now win over the checkpoint's; a Kahan residual is kept when
        both use "kahan"). Keys may be indices or parameter names (FSDP2's distributed
        checkpoints). An 8-bit momentum (int8 codes and their block scales ``exp_avg_scale``) is
        checked too (shape, dtype, codes, finite scales >= 0); it loads bit for bit into an 8-bit
        Lion, and dequantized into one with fp32 or bf16 state; a float momentum loading into an
        8-bit Lion is quantized (stochastically, with a fixed seed)."""
        wanted = [(group["state_dtype"], group["param_rounding"]) for group in self.param_groups]
        checked = check_loaded_state_dict(state_dict, self.param_groups, _GROUP_DEFAULTS)
        for group in self.param_groups:
            if group["state_dtype"] == "int8":
                for p in group["params"]:
                    if type(p) not in PLAIN_TENSOR_TYPES and eight_bit_state(p):
                        raise ValueError("Lion: state_dtype='int8' does not take DTensor (FSDP2) params: the blocks "
                                         "of its 8-bit momentum would cross the shards. Use state_dtype='bf16'.")
        # torch casts every floating state tensor to its param's dtype (and 8-bit codes with them);
        # that would round an fp32 momentum of a bf16 param to bf16, and make a copy of each momentum
        # that is then thrown away. Hand torch the entries without them, and restore them after.
        saved = {
            key: (s["exp_avg"], s.get("exp_avg_scale"))
            for key, s in state_dict.get("state", {}).items()
            if isinstance(s, dict) and isinstance(s.get("exp_avg"), Tensor)
        }
        momentum_keys = ("exp_avg", "exp_avg_scale")
        stripped = {key: {name: t for name, t in s.items() if name not in momentum_keys} if key in saved else s
                    for key, s in state_dict.get("state", {}).items()}
        super().load_state_dict({**state_dict, "state": stripped})  # checks that the groups match
        for group, valid, (state_dtype, param_rounding) in zip(self.param_groups, checked, wanted):
            group.update(lr=valid["lr"], betas=valid["betas"], weight_decay=valid["weight_decay"],
                         state_dtype=state_dtype, param_rounding=param_rounding)
        # Saved keys map to current params by position in the groups, as in torch.
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        current = [(p, group) for group in self.param_groups for p in group["params"]]
        by_key = dict(zip(saved_keys, current))
        for key, (exp_avg, scale) in saved.items():
            p, group = by_key[key]
            state = self.state[p]
            state.pop("exp_avg_scale", None)
            _store_momentum_as(p, state, exp_avg, scale, _momentum_dtype(p, group["state_dtype"]))
