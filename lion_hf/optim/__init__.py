"""Lion optimizer: the class, the functional step and the float64 reference."""

from lion_hf.optim.lion import IMPLS, NONFINITE_POLICIES, STATE_DTYPES, Lion, lion, resolve_impl
from lion_hf.optim.reference import lion_reference_step

__all__ = ["IMPLS", "NONFINITE_POLICIES", "STATE_DTYPES", "Lion", "lion", "lion_reference_step", "resolve_impl"]
