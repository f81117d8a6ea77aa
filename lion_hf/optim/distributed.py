"""Distributed Lion (Liu et al. 2024, "Communication Efficient Distributed Training with Distributed Lion").

Each rank keeps its own momentum, computes Lion's interpolation ``c = beta1 * m + (1 - beta1) * g``
from its own (local, not all-reduced) gradient, and sends only the ternary sign of ``c``. The
ranks combine the signs by majority vote or by their average, and every rank applies the same
combined update, so the replicas stay identical while the gradients are never all-reduced.

The top of ``lion_hf.optim``: it builds on the class ``lion.Lion`` (its validation, state layout
and collection of a step's tensors), and runs its step through the dispatcher's two stages
(``dispatch.prepare_step``, then the vote's passes ``dispatch.vote_signs`` and
``dispatch.vote_apply``), in the impl the device's ``resolve_impl`` picks, with the update's
arithmetic in the impls' shared numerics. The wire format (packed signs, header) is
``lion_hf.optim.signs``.
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from lion_hf.optim.dispatch import PreparedStep, prepare_step, vote_apply, vote_signs
from lion_hf.optim.lion import Lion
from lion_hf.optim.numerics import PLAIN_TENSOR_TYPES, with_seeds
from lion_hf.optim.options import DISTRIBUTED_DEFAULTS, OPTIONS, VOTES, defaults
from lion_hf.optim.signs import (
    HEADER_BYTES,
    ZERO_SIGNS_BYTE,
    combine_signs,
    pack_signs,
    packed_nbytes,
    unpack_signs,
)
from lion_hf.optim.validation import check_step_scalars, validate_options

__all__ = [
    "HEADER_BYTES",
    "DistributedLion",
    "combine_signs",
    "pack_signs",
    "packed_nbytes",
    "unpack_signs",
]

_HANDSHAKE_BYTES = 16  # the params' CRC-32, their count and their element count (4 + 4 + 8)


def _all_gather(output: Tensor, buffer: Tensor, group: Any) -> None:
    """The step's one collective (looked up at call time, so tests can count it). An error from
    it (a rank that left, or one whose collective is another) names what usually causes it."""
    dist = torch.distributed
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        gather(output, buffer, group=group)
    except RuntimeError as exc:
        raise RuntimeError(f"DistributedLion: the step's all_gather failed ({exc}). Every rank must call step() "
                           "together, with the same params: a rank that skipped a step() call, raised before it or "
                           "exited makes the others' collective fail (or wait until the process group's "
                           "timeout).") from exc


def _crc(values: Iterable[Any]) -> int:
    return zlib.crc32(repr(list(values)).encode())


def _layout_check(groups: list[dict[str, Any]], present: set[int]) -> int:
    """CRC-32 of which params of the groups have a gradient and of every param's size and dtype, in order."""
    return _crc((p.numel(), str(p.dtype), id(p) in present) for group in groups for p in group["params"])


def _fp32_bytes(*values: float) -> bytes:
    # The hyperparameters as the kernels compute with them: two ranks whose lrs round to one
    # fp32 value step alike, two whose fp32 values differ do not.
    return struct.pack(f"<{len(values)}f", *values)


class DistributedLion(Lion):
    r"""Distributed Lion: each rank steps with its own momentum and exchanges only signs.

    Per rank r, with its local gradient :math:`g_r` and momentum :math:`m_r`:

    .. math::
        c_r &= \beta_1 m_r + (1 - \beta_1) g_r \\
        u &= \mathrm{sign}\big(\textstyle\sum_r \mathrm{sign}(c_r)\big) \text{ (majority) or }
             \tfrac{1}{W}\textstyle\sum_r \mathrm{sign}(c_r) \text{ (average)} \\
        p &\leftarrow p\,(1 - \eta\lambda) - \eta\,u \\
        m_r &\leftarrow \beta_2 m_r + (1 - \beta_2) g_r

    Call :meth:`step` on every rank, with each rank's OWN gradients (not under DDP's gradient
    all-reduce: ``LionTrainer`` turns it off with a no-op communication hook). One
    ``all_gather`` per step of ``12 + ceil(N / 5)`` bytes per rank (N elements; the format is in
    ``lion_hf.optim.signs``), and one of 16 bytes at construction (see below). Every rank
    applies the same update with the same ops to the same (identical) weights, so replicas stay
    bit-identical, bf16 weights under stochastic rounding included (the rounding seeds come from
    rank 0's draw, carried in the gathered buffer). The momenta are local and differ between
    ranks; ``state_dict()`` holds this rank's.

    Args:
        params, lr, betas, weight_decay, maximize, state_dtype, param_rounding: as :class:`Lion`.
        vote: ``"majority"`` (default; the paper's MaVo: a tie does not move the weight) or
            ``"average"`` (the mean of the signs, in steps of 1 / world_size).
        process_group: the group to combine over (default: the whole world).
        nonfinite_grad: ``"skip_step"`` (default here): a NaN/inf gradient on any rank makes every
            rank skip the step, momenta included (the flag travels in the same buffer;
            :attr:`skipped_steps` counts it on every rank). ``"raise"``: every rank raises.
            ``"skip_elements"``: the bad elements abstain on that rank (send sign 0) and keep their
            momentum there; the weights still follow the other ranks' vote, so they stay
            identical. ``"propagate"``: no check (a NaN ``c`` is sent as 0).
        impl: as :class:`Lion`: the step's two passes (the signs, then the vote's update) run in
            the impl ``resolve_impl`` picks for the device, through the same dispatcher as Lion's
            step: ``cpp`` (two passes of the C++ kernel, when every param, grad and momentum is
            a contiguous fp32 CPU tensor; else foreach), ``foreach``, or ``for_loop``; on CUDA
            the passes run in foreach (the Triton kernel has no sign pass yet). Every impl gives
            the same bits, so ranks whose impls differ still keep identical replicas.

    ``cautious`` is refused: its mask comes from each rank's own gradient, which would break the
    replicas' agreement. With no process group initialised, or a world of one, the step is
    :class:`Lion`'s, bit for bit (a warning at construction says so when torch.distributed is
    not initialised). Params must be plain tensors (not FSDP2 DTensor shards): the vote needs
    each rank's full local gradient.

    Every rank must agree on everything that shapes the update: the params (their sizes and
    dtypes, and which have a gradient), each group's hyperparameters as the kernels compute with
    them (fp32), ``maximize``, ``param_rounding``, ``state_dtype``, the vote and the non-finite
    policy. Each step's buffer carries checksums of them, and ranks that disagree all raise the
    same RuntimeError, before anything is updated. The params' sizes decide the buffer's size, so
    they are compared first, in one 16-byte ``all_gather`` at construction (as DDP's constructor
    compares the params; again at the next step after a param group is added): ranks built with
    different params all raise, instead of one dying in the collective. Every rank must call
    :meth:`step` together: a rank that skips a call leaves the others' collective to meet its
    next one (an error from the collective says so) or to wait until the process group's timeout.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = OPTIONS["lr"].default,
        betas: tuple[float, float] = OPTIONS["betas"].default,
        weight_decay: float = OPTIONS["weight_decay"].default,
        *,
        vote: str = OPTIONS["vote"].default,
        process_group: Any = None,
        maximize: bool = OPTIONS["maximize"].default,
        state_dtype: str = OPTIONS["state_dtype"].default,
        param_rounding: str = OPTIONS["param_rounding"].default,
        nonfinite_grad: str = DISTRIBUTED_DEFAULTS["nonfinite_grad"],
        impl: str = OPTIONS["impl"].default,
    ) -> None:
        _check_vote(vote)
        self.vote = vote
        self.process_group = process_group
        self._agreed_layout: int | None = None
        super().__init__(params, lr, betas, weight_decay, maximize=maximize, cautious=False,
                         state_dtype=state_dtype, param_rounding=param_rounding, nonfinite_grad=nonfinite_grad,
                         impl=impl)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            warnings.warn("DistributedLion: torch.distributed is not initialised: it steps as plain Lion (one "
                          "process) until a process group exists.", stacklevel=2)
        elif self.world_size() > 1:
            # As DDP's constructor compares the ranks' params, so that every step's collective meets
            # buffers of one size.
            self._agree_on_params(next((p.device for g in self.param_groups for p in g["params"]),
                                       torch.device("cpu")))

    _INSTANCE_DEFAULTS: ClassVar[dict[str, Any]] = {
        **Lion._INSTANCE_DEFAULTS, **DISTRIBUTED_DEFAULTS, **defaults("vote")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A process group does not pickle: a copy uses the default group. load_state_dict (which
        # calls __setstate__) keeps this optimizer's.
        self.process_group = getattr(self, "process_group", None)
        # Kept through load_state_dict (which calls __setstate__; the params stay the same); a
        # copy unpickled elsewhere agrees again at its first step.
        self._agreed_layout = getattr(self, "_agreed_layout", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("cautious", self.defaults.get("cautious", False)):
            raise ValueError("DistributedLion: cautious=True is not supported: its mask comes from each rank's own "
                             "gradient, so the ranks' updates (and replicas) would differ.")
        super().add_param_group(param_group)

    def world_size(self) -> int:
        """The ranks this optimizer combines over: 1 when torch.distributed is not initialised."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _options_check(self, world_size: int) -> int:
        """CRC-32 of everything besides the layout that shapes the update (see the class docstring)."""
        record = bytearray(_fp32_bytes(world_size))
        record += f"{self.vote}/{self.nonfinite_grad}".encode()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            record += _fp32_bytes(group["lr"], 1.0 - group["lr"] * group["weight_decay"], beta1, 1.0 - beta1,
                                  beta2, 1.0 - beta2)
            record += f"/{group['maximize']}/{group['param_rounding']}/{group['state_dtype']}".encode()
        return zlib.crc32(bytes(record))

    def _agree_on_params(self, device: torch.device) -> None:
        """At construction, and again after the params change (a group added on every rank): one
        all_gather of 16 bytes per rank (the params' sizes and dtypes, their count and element
        count), so that ranks built with different params all raise here, with the same message,
        instead of handing the step's collective buffers of other sizes (whose size the params
        decide)."""
        params = [p for group in self.param_groups for p in group["params"]]
        layout = _crc((p.numel(), str(p.dtype)) for p in params)
        if layout == self._agreed_layout or not torch.distributed.is_initialized():
            return
        world_size = self.world_size()
        record = struct.pack("<IIq", layout, len(params), sum(p.numel() for p in params))
        mine = torch.tensor(list(record), dtype=torch.uint8, device=device)
        gathered = torch.empty(world_size * _HANDSHAKE_BYTES, dtype=torch.uint8, device=device)
        _all_gather(gathered, mine, self.process_group)
        records = [struct.unpack("<IIq", bytes(row)) for row in gathered.view(world_size, -1).cpu().tolist()]
        if len(set(records)) != 1:
            described = "; ".join(f"rank {r}: {count} params of {numel} elements"
                                  for r, (_, count, numel) in enumerate(records))
            raise RuntimeError(f"DistributedLion: the ranks were built with different params ({described}; or the "
                               "same counts with other sizes or dtypes). Every rank must step the same model's "
                               "params in the same order. Nothing was updated.")
        self._agreed_layout = layout

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step on every rank together (each with its local gradients); see the class docstring."""
        world_size = self.world_size()
        if world_size == 1:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        validate_options(self.impl, self.nonfinite_grad)
        _check_vote(self.vote)
        check_step_scalars(self.param_groups)
        if any(group["cautious"] for group in self.param_groups):
            raise ValueError("DistributedLion: cautious=True is not supported (see the class docstring)")
        steps = self._step_groups()
        if not {type(t) for s in steps for t in s.params + s.grads} <= PLAIN_TENSOR_TYPES:
            raise ValueError("DistributedLion steps plain tensors; these params or grads are DTensor shards "
                             "(FSDP2): the sign vote needs each rank's full local gradient. Use Lion there.")
        if any(g.is_sparse for s in steps for g in s.grads):
            raise ValueError("DistributedLion takes dense gradients: a param has a sparse one (nn.Embedding(sparse="
                             "True)); its passes read every rank's signs of whole tensors. Use a dense embedding.")
        policy = self.nonfinite_grad
        # The gate is the vote's own (every rank's flag travels in the buffer): not the dispatcher's.
        prepared = prepare_step(steps, impl=self.impl, nonfinite_grad=policy, gate=False, draw_seeds=False)
        device = next(iter(prepared.impls), None) or next(
            (p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
        self._agree_on_params(device)
        grad_norm, self._grad_norm = self._grad_norm, None

        numel = sum(p.numel() for s in prepared.groups for p in s.params)
        stochastic = any(p.dtype != torch.float32 or m.dtype != torch.float32
                         for s in prepared.groups for p, m in zip(s.params, s.exp_avgs))
        signs_bytes = packed_nbytes(numel, 0)  # the signs of the params with a gradient; then zero signs
        buffer = torch.empty(packed_nbytes(sum(p.numel() for g in self.param_groups for p in g["params"])),
                             dtype=torch.uint8, device=device)
        buffer[HEADER_BYTES + signs_bytes:] = ZERO_SIGNS_BYTE
        signs = buffer[HEADER_BYTES:HEADER_BYTES + signs_bytes]
        gated = policy in ("skip_step", "raise")
        if gated and grad_norm is not None:
            bad_here = not math.isfinite(float(grad_norm))
            if bad_here:
                signs.fill_(ZERO_SIGNS_BYTE)  # skipped by every rank anyway
            else:
                vote_signs(prepared, signs, count_nonfinite=False)
        else:
            bad_here = vote_signs(prepared, signs, count_nonfinite=gated)
        seed = int(torch.randint(0, 1 << 24, (1,))) if stochastic else 0
        present = {id(p) for s in prepared.groups for p in s.params}
        layout = _layout_check(self.param_groups, present)
        header = [int(bad_here), seed & 0xFF, (seed >> 8) & 0xFF, seed >> 16, *layout.to_bytes(4, "little"),
                  *self._options_check(world_size).to_bytes(4, "little")]
        buffer[:HEADER_BYTES] = torch.tensor(header, dtype=torch.uint8)

        gathered = torch.empty((world_size, buffer.numel()), dtype=torch.uint8, device=device)
        _all_gather(gathered.view(-1), buffer, self.process_group)

        headers = gathered[:, :HEADER_BYTES].cpu().tolist()
        _check_agreement(headers)
        bad_ranks = [rank for rank, h in enumerate(headers) if h[0]]
        if bad_ranks:
            if policy == "raise":
                raise RuntimeError(f"DistributedLion: a gradient on rank(s) {bad_ranks} contains NaN or inf "
                                   "(nonfinite_grad='raise'); no rank updated its parameters")
            self.skipped_steps += 1
            return loss
        if stochastic:
            prepared = _seeded(prepared, headers[0][1] | (headers[0][2] << 8) | (headers[0][3] << 16))
        vote_apply(prepared, gathered, HEADER_BYTES, vote=self.vote)
        return loss


def _check_vote(vote: Any) -> None:
    if vote not in VOTES:
        raise ValueError(f"DistributedLion: vote must be one of {VOTES}, got {vote!r}")


def _check_agreement(headers: list[list[int]]) -> None:
    """The same RuntimeError on every rank (they all hold every header) when the ranks' layouts
    or update-shaping options differ; nothing has been updated yet."""
    for first, what in ((4, "step different sets of params (their gradients cover different tensors or element "
                            "counts, or their dtypes differ); every rank must have a gradient for the same params"),
                        (8, "disagree on what shapes the update: a group's lr, weight_decay or betas (as fp32), "
                            "maximize, param_rounding, state_dtype, the vote or nonfinite_grad; every rank must "
                            "build DistributedLion with the same options and change them (a scheduler) alike")):
        checks = [tuple(h[first:first + 4]) for h in headers]
        if len(set(checks)) != 1:
            others = [rank for rank, check in enumerate(checks) if check != checks[0]]
            raise RuntimeError(f"DistributedLion: the ranks {what} (rank(s) {others} differ from rank 0). "
                               "Nothing was updated.")


def _seeded(prepared: PreparedStep, base_seed: int) -> PreparedStep:
    """The step with the seeds of its roundings, drawn as Lion draws them but from rank 0's base
    seed (so every rank rounds alike); the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        return prepared._replace(groups=with_seeds(prepared.groups))
