"""Distributed Lion (Liu et al. 2024, "Communication Efficient Distributed Training with Distributed Lion").

Each rank keeps its own momentum, computes Lion's interpolation ``c = beta1 * m + (1 - beta1) * g``
from its own (local, not all-reduced) gradient, and sends only the ternary sign of ``c``. The
ranks combine the signs by majority vote or by their average, and every rank applies the same
combined update, so the replicas stay identical while the gradients are never all-reduced.

The top of ``lion_hf.optim``: it builds on the class ``lion.Lion`` (its validation, state layout
and one-process step) and on the shared numerics (rounding, seeds).

Wire format (one ``all_gather`` of one flat uint8 buffer per step, per rank):

* :data:`HEADER_BYTES` (8) header bytes: byte 0 the rank's non-finite flag (1: a gradient of the
  step is NaN/inf under ``skip_step``/``raise``), bytes 1-3 a 24-bit stochastic-rounding base seed
  (little-endian; every rank uses rank 0's), bytes 4-7 a CRC-32 of the layout (which params of
  the groups have a gradient, and every param's size), so that ranks whose gradients cover
  different params fail together instead of mixing unrelated elements;
* then the signs of the N elements of the params that have a gradient (every param group, param
  after param), base 3:
  trit ``t = sign + 1`` in {0, 1, 2}, five trits per byte ``t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``
  (at most 242 < 256): ``ceil(N / 5)`` bytes. The five trits of a byte are not neighbours: the
  elements are cut into chunks of :data:`CHUNK_BYTES` x 5 (the last one shorter), and a chunk of
  S bytes holds its element ``o`` in byte ``o % S`` as digit ``o // S``. Planar digits let both
  the packing and the unpacking run over contiguous memory (vectorised, in torch ops and in the
  C++ kernel alike); the padding at the end of the last chunk is sign 0. The buffer is sized for
  every param of the groups, gradient or not (the rest is zero signs), so every rank hands the
  collective a buffer of the same size even when their gradients differ (which the check then
  refuses on every rank together).

Bytes each rank hands to ``torch.distributed`` per step: ``8 + ceil(N / 5)``, i.e. 1.6 bits per
element, against ``4 N`` for an fp32 gradient all-reduce's input: under 1/16 of it once
N >= 172. Each rank receives ``world_size`` such buffers.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lion_hf.optim import cpu_kernel
from lion_hf.optim.dispatch import IMPLS
from lion_hf.optim.lion import Lion
from lion_hf.optim.numerics import StepGroup, all_finite, store_momentum, store_param, with_seeds
from lion_hf.optim.validation import (
    check_step_scalars,
    check_step_tensors,
    overlapping,
    readable_grads,
    validate_options,
)

__all__ = [
    "CHUNK_BYTES",
    "HEADER_BYTES",
    "VOTES",
    "DistributedLion",
    "combine_signs",
    "pack_signs",
    "pack_trits",
    "packed_nbytes",
    "unpack_signs",
]

VOTES = ("majority", "average")
HEADER_BYTES = 8
TRITS_PER_BYTE = 5
CHUNK_BYTES = 4096  # the kernel's unit of work too (cpu_kernel.cpp: kSignChunkBytes)
_ZERO_SIGNS_BYTE = 121  # five zero signs: trits 1 + 3 + 9 + 27 + 81


def packed_nbytes(numel: int, header_bytes: int = HEADER_BYTES) -> int:
    """Bytes of one rank's buffer for ``numel`` elements: ``header_bytes + ceil(numel / 5)``."""
    return header_bytes + -(-numel // TRITS_PER_BYTE)


def _write_trits(trits: Tensor, t: Tensor) -> None:
    """``trits`` (uint8, filled with 1) += sign(t): 0, 1 or 2; NaN counts as sign 0."""
    flat = t.reshape(-1)
    trits.add_(flat > 0)
    trits.sub_((flat < 0).view(torch.uint8))


def _chunks(nbytes: int) -> list[tuple[int, int, int]]:
    """(first byte, end byte, bytes per chunk) of the runs of equal chunks: the full ones, then the rest."""
    full = nbytes // CHUNK_BYTES * CHUNK_BYTES
    runs = [(0, full, CHUNK_BYTES)] if full else []
    return runs + ([(full, nbytes, nbytes - full)] if nbytes > full else [])


def pack_trits(trits: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack a flat uint8 tensor of trits (0, 1, 2; its length a multiple of 5) into bytes, base 3,
    in the planar chunk layout of the module docstring: ``len(trits) / 5`` bytes, written to
    ``out`` when given. Horner's rule in uint8 (every partial sum stays <= 242)."""
    nbytes = trits.numel() // TRITS_PER_BYTE
    out = torch.empty(nbytes, dtype=torch.uint8, device=trits.device) if out is None else out
    for first, stop, size in _chunks(nbytes):
        digits = trits[first * TRITS_PER_BYTE:stop * TRITS_PER_BYTE].view(-1, TRITS_PER_BYTE, size)
        packed = out[first:stop].view(-1, size)
        torch.mul(digits[:, 4], 3, out=packed)
        for d in (3, 2, 1):
            packed.add_(digits[:, d]).mul_(3)
        packed.add_(digits[:, 0])
    return out


def pack_signs(tensors: Sequence[Tensor], *, header_bytes: int = 0) -> Tensor:
    """The ternary signs (-1, 0, +1; NaN counts as 0) of every element of ``tensors``, in order,
    packed 5 per byte (see the module docstring), after ``header_bytes`` zero bytes: a uint8 tensor
    of ``packed_nbytes(N, header_bytes)`` bytes on the first tensor's device.

    The torch-ops codec (what :class:`DistributedLion` uses where the C++ kernel does not take the
    step): several uint8 passes over N bytes, slower than a Lion step on CPU
    (docs/distributed_lion.md has the measured figures).
    """
    numel = sum(t.numel() for t in tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    nbytes = packed_nbytes(numel, 0)
    trits = torch.ones(nbytes * TRITS_PER_BYTE, dtype=torch.uint8, device=device)
    offset = 0
    for t in tensors:
        _write_trits(trits[offset:offset + t.numel()], t)
        offset += t.numel()
    out = torch.zeros(header_bytes + nbytes, dtype=torch.uint8, device=device)
    pack_trits(trits, out=out[header_bytes:])
    return out


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """The int8 signs packed in ``packed`` (uint8, last dimension the packed bytes, no header;
    leading dimensions kept, e.g. ``(world_size, nbytes)``): shape ``(..., numel)``."""
    nbytes = packed.shape[-1]
    rows = packed.reshape(math.prod(packed.shape[:-1]), nbytes)
    signs = torch.empty((rows.shape[0], nbytes * TRITS_PER_BYTE), dtype=torch.uint8, device=packed.device)
    for first, stop, size in _chunks(nbytes):
        rest = rows[:, first:stop].reshape(rows.shape[0], -1, size).clone()
        digits = signs[:, first * TRITS_PER_BYTE:stop * TRITS_PER_BYTE].view(rows.shape[0], -1, TRITS_PER_BYTE, size)
        for d in range(TRITS_PER_BYTE):
            # trit - 1 in uint8 wraps 0 to 255, which is -1 once viewed as int8
            torch.sub(torch.remainder(rest, 3), 1, out=digits[:, :, d])
            rest.floor_divide_(3)
    return signs.view(torch.int8).view(*packed.shape[:-1], -1)[..., :numel]


def combine_signs(gathered: Tensor, numel: int, vote: str) -> Tensor:
    """The combined fp32 update of ``numel`` elements from every rank's packed signs.

    ``gathered`` is ``(world_size, nbytes)`` uint8 (the packed signs, headers cut off).
    ``"majority"``: ``sign(sum of signs)``, a tie is 0 (no move); ``"average"``: the sum times
    fp32 ``1 / world_size`` (e.g. +0.5 for one +1 and one 0 on two ranks; a product, as the C++
    kernel computes it, so that both give the same bits). Unpacked one rank at a time (int16
    sums), so the memory is about 4 bytes per element whatever the world size. Every rank
    computes it from the same bytes with the same ops: the result is identical.
    """
    if vote not in VOTES:
        raise ValueError(f"DistributedLion: vote must be one of {VOTES}, got {vote!r}")
    world_size = gathered.shape[0]
    total = torch.zeros(numel, dtype=torch.int16, device=gathered.device)
    for rank in range(world_size):
        total.add_(unpack_signs(gathered[rank], numel))
    if vote == "majority":
        return torch.sign(total).to(torch.float32)
    return total.to(torch.float32).mul_(1.0 / world_size)


def _all_gather(output: Tensor, buffer: Tensor, group: Any) -> None:
    """The step's one collective (looked up at call time, so tests can count it)."""
    dist = torch.distributed
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, buffer, group=group)


def _layout_check(groups: list[dict[str, Any]], present: set[int]) -> int:
    """CRC-32 of which params of the groups have a gradient and of every param's size, in order."""
    layout = [(p.numel(), id(p) in present) for group in groups for p in group["params"]]
    return zlib.crc32(repr(layout).encode())


@dataclass
class _KernelWork:
    """The C++ kernel's arguments for one step: pointer arrays and per-tensor group numbers."""

    signs: Callable[..., int]
    apply: Callable[..., None]
    n: int
    params: int
    grads: int
    exp_avgs: int
    numels: int
    groups: int
    signs_hyper: int
    apply_hyper: int
    keep: tuple  # the numpy arrays behind those addresses


def _kernel_work(work: list[tuple], stochastic: bool) -> _KernelWork | None:
    """The step's arguments for the C++ kernel when it takes the whole step (every tensor a
    contiguous fp32 CPU tensor, none sharing memory with another, the library loaded), else None:
    then the step runs in torch ops, with the same arithmetic and the same bytes on the wire."""
    if stochastic:
        return None
    tensors = [(p, g, m) for _, params, grads, exp_avgs, _ in work for p, g, m in zip(params, grads, exp_avgs)]
    if not tensors or not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                              for triple in tensors for t in triple):
        return None
    kernels = cpu_kernel.sign_vote_kernels()
    if kernels is None:
        return None
    columns = [list(column) for column in zip(*tensors)]  # params, grads, momenta
    if overlapping([t for column in columns for t in column]):
        return None  # the kernel's threads would race on shared elements: tensor by tensor in torch
    n = len(tensors)
    pointers = np.fromiter((t.data_ptr() for column in columns for t in column), np.int64, 3 * n)
    numels = np.fromiter(map(Tensor.numel, columns[0]), np.int64, n)
    groups = np.array([i for i, (_, params, _, _, _) in enumerate(work) for _ in params], dtype=np.int32)
    signs_hyper = np.array([(g["betas"][0], 1.0 - g["betas"][0], -1.0 if g["maximize"] else 1.0)
                            for g, *_ in work], dtype=np.float32)
    apply_hyper = np.array([(g["lr"], 1.0 - g["lr"] * g["weight_decay"], g["betas"][1], 1.0 - g["betas"][1],
                             -1.0 if g["maximize"] else 1.0) for g, *_ in work], dtype=np.float32)
    address = pointers.ctypes.data
    return _KernelWork(*kernels, n, address, address + 8 * n, address + 16 * n, numels.ctypes.data,
                       groups.ctypes.data, signs_hyper.ctypes.data, apply_hyper.ctypes.data,
                       (pointers, numels, groups, signs_hyper, apply_hyper))


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
    ``all_gather`` per step of ``8 + ceil(N / 5)`` bytes per rank (N elements; the format is in
    this module's docstring). Every rank applies the same update with the same ops to the same
    (identical) weights, so replicas stay bit-identical, bf16 weights under stochastic rounding
    included (the rounding seeds come from rank 0's draw, carried in the gathered buffer). The
    momenta are local and differ between ranks; ``state_dict()`` holds this rank's.

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
        impl: the :class:`Lion` impl of a one-process step (see below). The distributed step runs
            in two passes of the C++ kernel when every param, grad and momentum is a contiguous
            fp32 CPU tensor (and none overlaps another), else in torch ops with
            :func:`lion_hf.optim.numerics.store_param`'s rounding; both give the same bits.

    ``cautious`` is refused: its mask comes from each rank's own gradient, which would break the
    replicas' agreement. With no process group initialised, or a world of one, the step is
    :class:`Lion`'s, bit for bit (a warning at construction says so when torch.distributed is
    not initialised). Params must be plain tensors (not FSDP2 DTensor shards): the vote needs
    each rank's full local gradient.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        vote: str = "majority",
        process_group: Any = None,
        maximize: bool = False,
        state_dtype: str = "fp32",
        param_rounding: str = "stochastic",
        nonfinite_grad: str = "skip_step",
        impl: str = "auto",
    ) -> None:
        if vote not in VOTES:
            raise ValueError(f"DistributedLion: vote must be one of {VOTES}, got {vote!r}")
        self.vote = vote
        self.process_group = process_group
        super().__init__(params, lr, betas, weight_decay, maximize=maximize, cautious=False,
                         state_dtype=state_dtype, param_rounding=param_rounding, nonfinite_grad=nonfinite_grad,
                         impl=impl)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            warnings.warn("DistributedLion: torch.distributed is not initialised: it steps as plain Lion (one "
                          "process) until a process group exists.", stacklevel=2)

    _INSTANCE_DEFAULTS: ClassVar[dict[str, Any]] = {
        **Lion._INSTANCE_DEFAULTS, "nonfinite_grad": "skip_step", "vote": "majority"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.process_group = None  # a process group does not pickle: the default group

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
        validate_options(self.impl, self.nonfinite_grad, impls=IMPLS)
        if self.vote not in VOTES:
            raise ValueError(f"DistributedLion: vote must be one of {VOTES}, got {self.vote!r}")
        check_step_scalars(self.param_groups)
        if any(group["cautious"] for group in self.param_groups):
            raise ValueError("DistributedLion: cautious=True is not supported (see the class docstring)")
        states_by_id = self._states_by_id()
        work = [(group, params, readable_grads(grads), exp_avgs, comps)
                for group in self.param_groups
                for params, grads, exp_avgs, comps in [self._collect(group, states_by_id)]]
        device = None
        for group, params, grads, exp_avgs, comps in work:
            if not params:
                continue
            if not {type(t) for t in params + grads} <= {Tensor, torch.nn.Parameter}:
                raise ValueError("DistributedLion steps plain tensors; these params or grads are DTensor shards "
                                 "(FSDP2): the sign vote needs each rank's full local gradient. Use Lion there.")
            check_step_tensors(params, grads, exp_avgs, comps, group["param_rounding"])
            device = device or params[0].device
        device = device or torch.device("cpu")
        policy = self.nonfinite_grad
        grad_norm, self._grad_norm = self._grad_norm, None
        all_grads = [g for _, _, grads, _, _ in work for g in grads]
        numel = sum(p.numel() for _, params, _, _, _ in work for p in params)
        stochastic = any(p.dtype != torch.float32 or m.dtype != torch.float32
                         for _, params, _, exp_avgs, _ in work for p, m in zip(params, exp_avgs))
        kernels = _kernel_work(work, stochastic)
        bad_here = False
        if policy in ("skip_step", "raise") and grad_norm is not None:
            bad_here = not math.isfinite(float(grad_norm))
        elif policy in ("skip_step", "raise") and kernels is None:
            bad_here = not all_finite(all_grads)  # else counted by the kernel's first pass
        seed = int(torch.randint(0, 1 << 24, (1,))) if stochastic else 0
        present = {id(p) for _, params, _, _, _ in work for p in params}
        check = _layout_check(self.param_groups, present)
        signs_bytes = packed_nbytes(numel, 0)  # the signs of the params with a gradient; then zero signs
        buffer = torch.empty(packed_nbytes(sum(p.numel() for g in self.param_groups for p in g["params"])),
                             dtype=torch.uint8, device=device)
        buffer[HEADER_BYTES + signs_bytes:] = _ZERO_SIGNS_BYTE
        if kernels is not None:
            # The C++ kernel's pass 1 writes the signs and, when nothing else decided it, counts
            # the non-finite grads in the same pass.
            signs_pass, count_nonfinite = kernels.signs, policy in ("skip_step", "raise") and grad_norm is None
            bad = signs_pass(kernels.n, kernels.grads, kernels.exp_avgs, kernels.numels, kernels.groups,
                             kernels.signs_hyper, policy == "skip_elements", count_nonfinite,
                             buffer.data_ptr() + HEADER_BYTES, torch.get_num_threads())
            if count_nonfinite:
                bad_here = bad > 0
        header = [int(bad_here), seed & 0xFF, (seed >> 8) & 0xFF, seed >> 16, *check.to_bytes(4, "little")]
        buffer[:HEADER_BYTES] = torch.tensor(header, dtype=torch.uint8)
        if kernels is not None:
            pass  # the signs are written
        elif bad_here:
            buffer[HEADER_BYTES:] = _ZERO_SIGNS_BYTE  # skipped by every rank anyway
        else:
            trits = torch.ones(signs_bytes * TRITS_PER_BYTE, dtype=torch.uint8, device=device)
            offset = 0
            for group, _params, grads, exp_avgs, _ in work:
                beta1 = group["betas"][0]
                for g, m in zip(grads, exp_avgs):
                    g32 = g.float()
                    if group["maximize"]:
                        g32 = -g32
                    c = m.float() * beta1 + g32 * (1.0 - beta1)
                    if policy == "skip_elements":
                        c = torch.where(torch.isfinite(g32), c, 0.0)
                    _write_trits(trits[offset:offset + g.numel()], c)
                    offset += g.numel()
            pack_trits(trits, out=buffer[HEADER_BYTES:HEADER_BYTES + signs_bytes])

        gathered = torch.empty((world_size, buffer.numel()), dtype=torch.uint8, device=device)
        _all_gather(gathered.view(-1), buffer, self.process_group)

        headers = gathered[:, :HEADER_BYTES].cpu().tolist()
        if len({tuple(h[4:HEADER_BYTES]) for h in headers}) != 1:
            raise RuntimeError("DistributedLion: the ranks step different sets of params (their gradients cover "
                               "different tensors or element counts); every rank must have a gradient for the same "
                               "params. Nothing was updated.")
        bad_ranks = [rank for rank, h in enumerate(headers) if h[0]]
        if bad_ranks:
            if policy == "raise":
                raise RuntimeError(f"DistributedLion: a gradient on rank(s) {bad_ranks} contains NaN or inf "
                                   "(nonfinite_grad='raise'); no rank updated its parameters")
            self.skipped_steps += 1
            return loss
        if kernels is not None:
            kernels.apply(kernels.n, kernels.params, kernels.grads, kernels.exp_avgs, kernels.numels, kernels.groups,
                          kernels.apply_hyper, gathered.data_ptr() + HEADER_BYTES, world_size, gathered.shape[1],
                          self.vote == "average", 1.0 / world_size, policy == "skip_elements",
                          torch.get_num_threads())
            # Written through raw pointers: bump the version counters as an in-place op would.
            increment_version([p for _, params, _, _, _ in work for p in params]
                              + [m for _, _, _, exp_avgs, _ in work for m in exp_avgs])
            return loss
        update = combine_signs(gathered[:, HEADER_BYTES:HEADER_BYTES + signs_bytes], numel, self.vote)
        base_seed = headers[0][1] | (headers[0][2] << 8) | (headers[0][3] << 16)
        self._apply(work, update, base_seed if stochastic else None, mask_momentum=policy == "skip_elements")
        return loss

    def _apply(self, work: list[tuple], update: Tensor, base_seed: int | None, mask_momentum: bool) -> None:
        """Every rank: the same decoupled update of the (identical) weights from the combined
        ``update``; the momentum from the rank's own gradient."""
        steps = [StepGroup(params, grads, exp_avgs, comps, group["lr"], *group["betas"], group["weight_decay"],
                           group["maximize"], False, group["param_rounding"])
                 for group, params, grads, exp_avgs, comps in work]
        if base_seed is not None:
            # The seeds of every rank's roundings, drawn as Lion draws them but from rank 0's base
            # seed; the global generator is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed)
                steps = with_seeds(steps)
        offset = 0
        for s in steps:
            for i, (p, g, m, comp) in enumerate(zip(s.params, s.grads, s.exp_avgs, s.kahan_comps)):
                n = p.numel()
                u = update[offset:offset + n].view(p.shape)
                offset += n
                p_seed = m_seed = None
                if s.seeds is not None:
                    p_seed = s.seeds[i, 0] if p.dtype != torch.float32 and s.param_rounding == "stochastic" else None
                    m_seed = s.seeds[i, 1] if m.dtype == torch.bfloat16 else None
                g32 = g.float()
                if s.maximize:
                    g32 = -g32
                m32 = m.float()
                p32 = p.float()
                w32 = p32 if comp is None else p32 + comp.float()
                new_w = w32 * s.decay - u * s.lr
                new_m = m32 * s.beta2 + g32 * (1.0 - s.beta2)
                store_param(p, new_w, comp, None, p_seed)
                store_momentum(m, new_m, torch.isfinite(g32) if mask_momentum else None, m_seed)
