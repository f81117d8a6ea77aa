"""lion_hf: the Lion optimizer for Hugging Face Transformers.

Public API only. The optimizer imports torch alone; the Trainer integration imports
transformers on first use, and the Triton kernel loads only when ``impl="triton"`` runs.
"""

from importlib import import_module
from typing import Any

from lion_hf.optim import ChunkedOutputGrad, DistributedLion, GradientRelease, Lion
from lion_hf.optim.lion import lion

__version__ = "0.1.0"

_LAZY = {
    "LionTrainer": "lion_hf.trainer",
    "LionFactory": "lion_hf.trainer",
    "lion_optimizers": "lion_hf.trainer",
    "lion_optimizer_cls_and_kwargs": "lion_hf.trainer",
    "LionTrainingArguments": "lion_hf.training_args",
    "scale_from_adamw": "lion_hf.training_args",
    "lion_param_groups": "lion_hf.param_groups",
}

__all__ = ["ChunkedOutputGrad", "DistributedLion", "GradientRelease", "Lion", "lion", "__version__", *_LAZY]


def __dir__() -> list[str]:
    # The lazy exports too, so tab completion (IPython, editors) offers LionTrainer and friends.
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lion_hf' has no attribute {name!r}")
