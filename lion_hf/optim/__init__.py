"""Lion optimizer: the class, the functional step, the impl choice and the float64 reference.

Layers, bottom to top (imports flow one way; ``tests/test_layout.py`` checks):

* ``numerics``: the per-tensor update, rounding, the hash, the non-finite gate;
* ``validation``: options, hyperparameters, loaded state and step tensors;
* the impls, each importing only the layers below: ``for_loop``, ``foreach``, ``cpu_kernel``
  (with ``cpu_kernel_build`` and ``cpu_kernel.cpp``), ``triton_kernel``;
* ``dispatch``: which impl runs, and the one path of every step;
* ``lion``: the ``Lion`` class and the functional ``lion()``;
* ``distributed``: ``DistributedLion`` (each rank its own momentum, signs exchanged and voted) and
  its wire format (``pack_signs``, ``unpack_signs``, ``combine_signs``).

``reference`` (the float64 ground truth for tests) stands apart. The functional step is
``lion_hf.lion`` (defined in ``lion_hf.optim.lion``); it is not re-exported here, so that
``lion_hf.optim.lion`` keeps naming the module.
"""

from lion_hf.optim.dispatch import IMPLS, impl_unavailable, resolve_impl
from lion_hf.optim.distributed import DistributedLion, combine_signs, pack_signs, unpack_signs
from lion_hf.optim.lion import Lion
from lion_hf.optim.numerics import NONFINITE_POLICIES, PARAM_ROUNDINGS, STATE_DTYPES
from lion_hf.optim.reference import lion_reference_step

__all__ = [
    "IMPLS",
    "NONFINITE_POLICIES",
    "PARAM_ROUNDINGS",
    "STATE_DTYPES",
    "DistributedLion",
    "Lion",
    "combine_signs",
    "impl_unavailable",
    "lion_reference_step",
    "pack_signs",
    "resolve_impl",
    "unpack_signs",
]
