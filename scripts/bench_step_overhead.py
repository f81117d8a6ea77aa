"""The optimizer step's fixed cost per step: a profile's tensors, each cut to 16 elements, so that the
kernels' arithmetic is next to nothing and what is left is the Python work of a step (the tensor checks,
the seeds, the kernel's arguments) and, for AdamW, torch's own.

Usage (CPU):
    python scripts/bench_step_overhead.py --profile minilm --steps 300

Lion with ``impl="cpp"`` and pure bf16 tensors with ``state_dtype="int8"`` (tensors this small keep an fp32
momentum, so the setup is what the 8-bit rows of scripts/bench_optimizer_step.py run, less the arithmetic),
the same with fp32 tensors and state, and torch's fused AdamW, each timed for ``--steps`` steps after a
warm-up, in rounds that alternate them; prints each one's median ms per step over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_optimizer_step import PROFILES, profile_shapes

from lion_hf import Lion


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="minilm", choices=list(PROFILES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    count = len(profile_shapes(args.profile))

    def tensors(dtype: torch.dtype) -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(torch.randn(16).to(dtype)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    optimizers = {
        "lion_cpp_bf16_int8_state": Lion(tensors(torch.bfloat16), lr=1e-4, impl="cpp", state_dtype="int8"),
        "lion_cpp_fp32": Lion(tensors(torch.float32), lr=1e-4, impl="cpp"),
        "adamw_fused": torch.optim.AdamW(tensors(torch.float32), lr=1e-4, fused=True),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for opt in optimizers.values():
        for _ in range(5):
            opt.step()
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    threads = torch.get_num_threads()
    print(f"{args.profile}: {count} tensors of 16 elements, torch {torch.__version__}, {threads} threads")
    for name, ms in times.items():
        print(f"  {name:26s} {statistics.median(ms):.3f} ms/step (rounds {min(ms):.3f}-{max(ms):.3f})")


if __name__ == "__main__":
    main()
