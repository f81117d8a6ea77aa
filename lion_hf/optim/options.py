"""Every option of Lion in one table: its name, default, allowed values and help text.

The bottom of ``lion_hf.optim`` (it imports torch alone). ``Lion``, the functional ``lion()``,
``DistributedLion``, ``LionTrainingArguments`` and the trainer take their defaults and help text
from :data:`OPTIONS`; ``validation`` checks values against its ``choices``; and
``tests/test_options.py`` fails when a signature and the table disagree. A new option, or a new
allowed value, is added here first.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = [
    "DISTRIBUTED_DEFAULTS",
    "GROUP_OPTIONS",
    "IMPLS",
    "NONFINITE_POLICIES",
    "NOT_LION_ARGUMENTS",
    "OPTIONS",
    "PARAM_ROUNDINGS",
    "STATE_DTYPES",
    "VOTES",
    "Option",
    "defaults",
]

IMPLS = ("auto", "for_loop", "foreach", "cpp", "triton")
NONFINITE_POLICIES = ("skip_elements", "skip_step", "raise", "propagate")
# The momentum's storage. "int8": blockwise 8-bit codes (``numerics.quantize_momentum``), one fp32
# scale per block of 256 elements, stored by stochastic rounding; momenta of fewer than
# ``numerics.EIGHT_BIT_MIN_NUMEL`` elements stay fp32.
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
# How a bf16/fp16 param stores its new fp32 value (fp32 params are exact whatever is chosen).
# Lion moves every element by exactly lr, which is under half an ulp of a bf16 weight above
# about 2**8 * lr: round-to-nearest ("nearest") then drops the step. "stochastic" rounds up or
# down with probability given by the distance (unbiased, no memory); "kahan" keeps the rounding
# residual in a compensation tensor of the param's dtype (state "kahan_comp", +2 bytes/param).
PARAM_ROUNDINGS = ("stochastic", "kahan", "nearest")
VOTES = ("majority", "average")


class Option(NamedTuple):
    """One option: ``choices`` lists the allowed values (None for a number, whose range
    ``validation`` checks and ``help`` states); ``group`` says whether a param group may set it."""

    name: str
    default: Any
    choices: tuple | None
    group: bool
    help: str


OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("lr", 1e-4, None, True, "Learning rate, >= 0. Lion's update has the same size in every element, so it "
           "wants a smaller lr than AdamW (docs/evidence.md has what this project measured)."),
    Option("betas", (0.9, 0.99), None, True, "(beta1, beta2), each in [0, 1): beta1 interpolates momentum and "
           "gradient for the update, beta2 decays the momentum (the paper's 0.9, 0.99)."),
    Option("weight_decay", 0.0, None, True, "Decoupled weight decay, >= 0, multiplied by lr as in AdamW."),
    Option("maximize", False, (False, True), True, "Maximise the objective instead of minimising it."),
    Option("cautious", False, (False, True), True, "Cautious Lion: apply the update only where it agrees in sign "
           "with the gradient, rescaled (Liang et al. 2024)."),
    Option("state_dtype", "fp32", tuple(STATE_DTYPES), True, "Momentum dtype; bf16 halves the optimizer state, "
           "int8 (8-bit codes with one fp32 scale per block of 256, about 1 byte/param; tensors under 4096 "
           "elements stay fp32) quarters it; both are stored with stochastic rounding."),
    Option("param_rounding", "stochastic", PARAM_ROUNDINGS, True, "How bf16/fp16 weights store each step: "
           "'stochastic' (unbiased, no memory), 'kahan' (a compensation buffer, +2 bytes/param) or 'nearest' "
           "(drops steps under half an ulp). fp32 weights are exact whatever is chosen."),
    Option("nonfinite_grad", "skip_elements", NONFINITE_POLICIES, False, "What a NaN/inf gradient does: "
           "'skip_elements' leaves those elements unchanged, 'skip_step' skips the whole step, 'raise' raises "
           "before anything is updated, 'propagate' does not check."),
    Option("impl", "auto", IMPLS, False, "Implementation: 'auto' is triton on CUDA, cpp (a C++ kernel built at "
           "first use) on the CPU, else foreach."),
    Option("vote", "majority", VOTES, False, "DistributedLion: how the ranks' signs combine: 'majority' (a tie "
           "does not move the weight) or 'average' (the mean sign, in steps of 1 / world size)."),
    Option("gradient_release", False, (False, True), False, "Gradient release (lion_hf.optim.release."
           "GradientRelease, LionTrainer): each param is stepped during backward as soon as its gradient is ready "
           "and the gradient freed, so the gradients of the whole model never live at once. No gradient clipping "
           "(a global norm needs every gradient first); nonfinite_grad 'skip_elements' or 'propagate'."),
)}

# The options that Lion's constructor does not take: DistributedLion's vote, and gradient release
# (a GradientRelease attached to a Lion, or LionTrainingArguments.lion_gradient_release).
NOT_LION_ARGUMENTS = ("vote", "gradient_release")

# The keys a param group holds (the rest are optimizer-wide).
GROUP_OPTIONS = tuple(name for name, option in OPTIONS.items() if option.group)

# Where DistributedLion's default differs from Lion's, and why: a NaN on one rank must stop every
# rank's step, or the replicas would move differently.
DISTRIBUTED_DEFAULTS = {"nonfinite_grad": "skip_step"}


def defaults(*names: str) -> dict[str, Any]:
    """The table's defaults of ``names`` (every option when none is named)."""
    return {name: OPTIONS[name].default for name in (names or OPTIONS)}
