"""Lion optimizer: the class and the float64 reference.

The functional step is ``lion_hf.lion`` (defined in ``lion_hf.optim.lion``); it is not
re-exported here so that ``lion_hf.optim.lion`` keeps naming the module.
"""

from lion_hf.optim.lion import IMPLS, NONFINITE_POLICIES, PARAM_ROUNDINGS, STATE_DTYPES, Lion, resolve_impl
from lion_hf.optim.reference import lion_reference_step

__all__ = [
    "IMPLS",
    "NONFINITE_POLICIES",
    "PARAM_ROUNDINGS",
    "STATE_DTYPES",
    "Lion",
    "lion_reference_step",
    "resolve_impl",
]
