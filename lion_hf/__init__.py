"""lion_hf: the Lion optimizer for Hugging Face Transformers.

Public API only; heavy modules (transformers, triton) load when first used.
"""

from lion_hf.optim import Lion, lion_reference_step
from lion_hf.optim.lion import lion

__version__ = "0.1.0"

__all__ = ["Lion", "lion", "lion_reference_step", "__version__"]
