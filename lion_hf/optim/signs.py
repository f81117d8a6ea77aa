"""DistributedLion's wire format: the ternary signs packed five to a byte, and their vote.

Below the impls (it imports torch alone): ``for_loop`` and ``foreach`` write signs with
:func:`write_trits` and :func:`pack_trits`, the C++ kernel (``cpu_kernel.cpp``) writes the same
bytes itself, and every impl's apply pass reads the vote of :func:`combine_signs` (or, in the
C++ kernel, the same sums in the same order).

One rank's buffer per step, one flat uint8 tensor:

* :data:`HEADER_BYTES` (12) header bytes: byte 0 the rank's non-finite flag (1: a gradient of
  the step is NaN/inf under ``skip_step``/``raise``), bytes 1-3 a 24-bit stochastic-rounding
  base seed (little-endian; every rank uses rank 0's), bytes 4-7 a CRC-32 of the layout (which
  params of the groups have a gradient, every param's size and dtype), bytes 8-11 a CRC-32 of
  everything else that shapes the update (each group's hyperparameters as the kernels compute
  with them in fp32, ``maximize``, ``param_rounding``, ``state_dtype``; the vote, the non-finite
  policy and the world size), so that ranks that disagree on any of it fail together instead of
  drifting apart;
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

Bytes each rank hands to ``torch.distributed`` per step: ``12 + ceil(N / 5)``, i.e. 1.6 bits per
element, against ``4 N`` for an fp32 gradient all-reduce's input: under 1/16 of it once
N >= 252. Each rank receives ``world_size`` such buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lion_hf.optim.options import VOTES

__all__ = [
    "HEADER_BYTES",
    "TRITS_PER_BYTE",
    "ZERO_SIGNS_BYTE",
    "combine_signs",
    "pack_signs",
    "pack_trits",
    "packed_nbytes",
    "unpack_signs",
    "write_trits",
]

HEADER_BYTES = 12
TRITS_PER_BYTE = 5
CHUNK_BYTES = 4096  # the kernel's unit of work too (cpu_kernel.cpp: kSignChunkBytes)
ZERO_SIGNS_BYTE = 121  # five zero signs: trits 1 + 3 + 9 + 27 + 81


def packed_nbytes(numel: int, header_bytes: int = HEADER_BYTES) -> int:
    """Bytes of one rank's buffer for ``numel`` elements: ``header_bytes + ceil(numel / 5)``."""
    return header_bytes + -(-numel // TRITS_PER_BYTE)


def write_trits(trits: Tensor, t: Tensor) -> None:
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

    The torch-ops codec (what ``DistributedLion`` uses where the C++ kernel does not take the
    step): several uint8 passes over N bytes (docs/distributed_lion.md has what it costs).
    """
    numel = sum(t.numel() for t in tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    nbytes = packed_nbytes(numel, 0)
    trits = torch.ones(nbytes * TRITS_PER_BYTE, dtype=torch.uint8, device=device)
    offset = 0
    for t in tensors:
        write_trits(trits[offset:offset + t.numel()], t)
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
