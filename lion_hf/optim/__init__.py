"""Lion optimizer: the class, the functional step, Distributed Lion and the impl choice.

Layers, bottom to top (imports flow one way; ``tests/test_layout.py`` checks):

* ``options``: every option with its default, allowed values and help (the one table);
* ``numerics``: the per-tensor update (``lion_tensor``, the reference every impl is held to),
  rounding, the hash, the non-finite gate; ``signs``: Distributed Lion's wire format;
* ``validation``: options, hyperparameters, loaded state and step tensors;
* the impls, each importing only the layers below: ``for_loop``, ``foreach``, ``cpu_kernel``
  (with ``cpu_kernel_build`` and ``cpu_kernel.cpp``), ``triton_kernel``;
* ``dispatch``: which impl runs, and the one path of every step (prepare, then apply; and
  Distributed Lion's two passes);
* ``lion``: the ``Lion`` class and the functional ``lion()``;
* ``distributed``: ``DistributedLion`` (each rank its own momentum, signs exchanged and voted);
* ``release``: ``GradientRelease`` (each param stepped during backward, its gradient freed) and
  ``ChunkedOutputGrad`` (an output layer's weight gradient a range of rows at a time).

The functional step is ``lion_hf.lion`` (defined in ``lion_hf.optim.lion``); it is not
re-exported here, so that ``lion_hf.optim.lion`` keeps naming the module.
"""

from lion_hf.optim.dispatch import impl_unavailable, resolve_impl
from lion_hf.optim.distributed import DistributedLion, combine_signs, pack_signs, unpack_signs
from lion_hf.optim.lion import Lion
from lion_hf.optim.options import IMPLS, NONFINITE_POLICIES, OPTIONS, PARAM_ROUNDINGS, STATE_DTYPES, VOTES
from lion_hf.optim.release import ChunkedOutputGrad, GradientRelease

__all__ = [
    "IMPLS",
    "NONFINITE_POLICIES",
    "OPTIONS",
    "PARAM_ROUNDINGS",
    "STATE_DTYPES",
    "VOTES",
    "ChunkedOutputGrad",
    "DistributedLion",
    "GradientRelease",
    "Lion",
    "combine_signs",
    "impl_unavailable",
    "pack_signs",
    "resolve_impl",
    "unpack_signs",
]
