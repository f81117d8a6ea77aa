"""Where the compiled Lion step's time goes on CPU, against fused AdamW in the same run.

Usage:
    python scripts/profile_compiled_step.py --profile minilm --steps 40

One process, the shapes of a real model (random values). Every timed Lion step follows a fused
AdamW step, as in ``bench_optimizer_step.py``, so both run with the caches another optimizer step
left behind. Reported, as medians over the timed steps, in ms and as a fraction of AdamW's step:

* ``step``: Lion's whole ``step()``, as ``LionTrainer`` builds it (``skip_step`` with the
  gradient norm handed over) or with ``--policy propagate``;
* ``kernel calls``: the compiled chunk calls inside that step (timed around each call);
* ``collect``, ``plan``, ``grad views``: the Python parts with a function of their own;
* ``rest``: the remainder (torch's optimizer-step wrapper, dispatch, the per-chunk loop);
* ``one flat tensor``: the same compiled step over a single tensor as large as the whole model,
  one call per step: the ceiling for the kernel calls.

Then, timed before the parts, the step's Python alone: the same step with every compiled chunk
call replaced by a no-op, back to back and right after an AdamW step. Timing a part adds a few
microseconds per wrapped call. Ad-hoc numbers quoted in the README come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer_step import PROFILES, TrainerDefaultLion, profile_shapes

from lion_hf import Lion
from lion_hf.optim import compiled
from lion_hf.optim.compiled_call import DirectCompiled


class _Timer:
    """Seconds spent in the wrapped functions since the last ``reset``, per label."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def reset(self) -> None:
        self.spent = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def _model(shapes: list[torch.Size], gen: torch.Generator) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _stepper(params: list[torch.nn.Parameter], policy: str) -> Callable[[], None]:
    if policy == "skip_step":  # what LionTrainer builds, norm handed over, as the benchmark drives it
        return TrainerDefaultLion(params, lr=1e-4, weight_decay=0.1, impl="compiled").step
    return Lion(params, lr=1e-4, weight_decay=0.1, impl="compiled", nonfinite_grad=policy).step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="minilm", choices=list(PROFILES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--policy", default="skip_step", choices=["skip_step", "propagate"],
                        help="skip_step with the norm handed over is what LionTrainer builds by default")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")

    shapes = profile_shapes(args.profile)
    gen = torch.Generator().manual_seed(0)
    adamw = torch.optim.AdamW(_model(shapes, gen), lr=1e-4, weight_decay=0.1, fused=True)
    lion_step = _stepper(_model(shapes, gen), args.policy)
    numel = sum(s.numel() for s in shapes)
    flat_step = _stepper(_model([torch.Size([numel])], gen), args.policy)
    for _ in range(3):  # compiles, then warm-up
        adamw.step()
        lion_step()
        flat_step()

    python_alone = _python_alone(adamw, lion_step, args.steps)

    timer = _Timer()
    timer.wrap(Lion, "_collect", "collect")
    timer.wrap(compiled, "_plan_for", "plan")
    timer.wrap(compiled, "_flat_grads", "grad views")
    timer.wrap(DirectCompiled, "__call__", "kernel calls")
    rows: dict[str, list[float]] = {}
    for _ in range(args.steps):
        for label, step in (("step", lion_step), ("one flat tensor", flat_step)):
            start = time.perf_counter()
            adamw.step()
            rows.setdefault("fused AdamW", []).append(time.perf_counter() - start)
            timer.reset()
            start = time.perf_counter()
            step()
            total = time.perf_counter() - start
            rows.setdefault(label, []).append(total)
            if label == "step":
                # A kept plan's grad views are taken inside _plan_for: count them once.
                timer.spent["plan"] -= timer.spent.get("grad views", 0.0)
                for part, seconds in timer.spent.items():
                    rows.setdefault(part, []).append(seconds)
                rows.setdefault("rest", []).append(total - sum(timer.spent.values()))

    adamw_ms = statistics.median(rows["fused AdamW"]) * 1e3
    print(f"{args.profile}: {len(shapes)} tensors, {numel / 1e6:.1f}M params, policy {args.policy}, "
          f"{args.steps} steps; torch {torch.__version__}, {torch.get_num_threads()} threads")
    medians = {}
    for label in ("fused AdamW", "step", "kernel calls", "collect", "plan", "grad views", "rest", "one flat tensor"):
        ms = statistics.median(rows[label]) * 1e3
        medians[label] = ms
        print(f"  {label:16s} {ms:8.3f} ms  {ms / adamw_ms:6.3f} x AdamW")
    print("  the step's Python alone (kernel calls stubbed out, timed before the parts above):")
    for label, seconds in python_alone.items():
        medians[label] = seconds * 1e3
        print(f"    {label:30s} {seconds * 1e3:8.3f} ms")
    return medians


def _python_alone(adamw: torch.optim.Optimizer, lion_step: Callable[[], None], steps: int) -> dict[str, float]:
    """Median seconds of Lion's step with every compiled chunk call replaced by a no-op: back to
    back (warm caches), and right after a fused AdamW step (the caches a real step meets)."""
    saved = compiled._compiled_chunk
    compiled._compiled_chunk = lambda *args: None
    try:
        rows: dict[str, list[float]] = {"back to back": [], "after an AdamW step": []}
        for _ in range(steps):
            start = time.perf_counter()
            lion_step()
            rows["back to back"].append(time.perf_counter() - start)
            adamw.step()
            start = time.perf_counter()
            lion_step()
            rows["after an AdamW step"].append(time.perf_counter() - start)
    finally:
        compiled._compiled_chunk = saved
    return {label: statistics.median(times) for label, times in rows.items()}


if __name__ == "__main__":
    main()
