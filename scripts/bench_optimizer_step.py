"""Optimizer step time and memory: every Lion impl against torch's fused AdamW, in one run.

Usage (CPU, the README's MiniLM table; its BERT-base table adds --profiles base and --only):
    python scripts/bench_optimizer_step.py --device cpu --profiles minilm --steps 15 --rounds 3 \\
        --no-for-loop --out runs/bench_cpu
GPU (an H200 in the README, when one is lent):
    python scripts/bench_optimizer_step.py --device cuda --profiles minilm base large llama-1b --out runs/bench_cuda

Each profile is the list of parameter shapes of a real model, built on the meta device (no
weights are loaded). The peers are other Lion implementations (and DeepSpeed's CPU Adam) where
installed (``pip install -e ".[bench]"``). For every optimizer the script runs warm-up steps (which include
torch.compile / Triton compilation, reported as "first step"), then times ``--steps`` steps
and reports the median. Ratios are against ``torch.optim.AdamW(fused=True)``, whose steps
alternate with each optimizer's (the ratio uses AdamW's median over the same window, which
cancels the bandwidth drift of a shared machine). Effective bandwidth counts the bytes each
algorithm must move per parameter: Lion fp32 reads p, g, m and writes p, m (20 B); AdamW reads
p, g, m, v and writes p, m, v (28 B); pure-bf16 Lion 10 B (14 B with Kahan), bf16 AdamW 14 B; with 8-bit
momentum (``state_dtype="int8"``, and bitsandbytes' Lion8bit) fp32 weights move 14 B, bf16 weights 8 B
(the block scales, 4 B per 256 elements, are left out).
The ``*_bf16_*`` rows store params, grads and state in bf16 (no fp32 copy), as GPU fine-tuning
with ``torch_dtype=torch.bfloat16`` does; their ratio is still to fp32 fused AdamW, the baseline.
On CUDA the script also measures a device-to-device copy as the bandwidth ceiling. On the CPU the
``bare_c_loop`` row is the floor: a plain C loop of Lion's fp32 arithmetic over one flat array of
the profile's element count (p, g, m: 20 B per element), compiled for this CPU when the script
runs (OpenMP, torch's thread count); the "x bare loop" column reads every row against it.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lion_hf import Lion

# name -> (config class name, config kwargs); shapes come from the transformers model classes.
PROFILES: dict[str, tuple[str, dict]] = {
    "tiny": ("BertConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)),
    "minilm": (
        "BertConfig",
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    ),
    "base": ("BertConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "large": (
        "BertConfig",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    ),
    "llama-1b": (
        "LlamaConfig",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=32000),
    ),
}

# Bytes each algorithm must move per parameter, and the dtype its params and grads are stored in.
# Lion reads p, g, m and writes p, m; AdamW reads p, g, m, v and writes p, m, v; Kahan adds a
# read and a write of its 2-byte residual.
KINDS = {
    "lion": (20, torch.float32),
    "lion_bf16_state": (16, torch.float32),
    "adamw": (28, torch.float32),
    "lion_bf16": (10, torch.bfloat16),          # bf16 weights + bf16 momentum: pure bf16
    "lion_bf16_kahan": (14, torch.bfloat16),
    "lion_fp16": (14, torch.float16),           # fp16 weights and grads, fp32 momentum (the default state)
    "lion_fp16_kahan": (18, torch.float16),
    "adamw_bf16": (14, torch.bfloat16),
    "lion_8bit_state": (14, torch.float32),     # fp32 p, g; 8-bit momentum (+ block scales, ignored)
    "lion_bf16_8bit_state": (8, torch.bfloat16),  # bf16 p, g; 8-bit momentum (+ block scales, ignored)
}


def profile_shapes(name: str) -> list[torch.Size]:
    import transformers

    config_name, kwargs = PROFILES[name]
    config = getattr(transformers, config_name)(**kwargs)
    if config_name == "BertConfig":
        model_cls = transformers.AutoModelForSequenceClassification
    else:
        model_cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = model_cls.from_config(config)
    return [p.shape for p in model.parameters()]


class TrainerDefaultLion:
    """Lion as ``LionTrainer`` builds and drives it with its defaults: ``impl="auto"``,
    ``nonfinite_grad="skip_step"`` (HF clips by default), and before every step the global
    gradient norm HF has already computed (so the verdict reads no gradient)."""

    def __init__(self, params: list[torch.Tensor], **kwargs) -> None:
        from lion_hf.training_args import default_nonfinite_policy

        self.inner = Lion(params, nonfinite_grad=default_nonfinite_policy(1.0), **kwargs)
        self.state = self.inner.state
        self.norm = torch.tensor(1.0, device=params[0].device)  # finite: HF's clip result

    def step(self) -> None:
        self.inner.set_grad_norm(self.norm)
        self.inner.step()


_BARE_LOOP_SOURCE = r"""
#include <stdint.h>
void bare_lion(float* p, const float* g, float* m, int64_t n, float lr, float decay, float b1, float b2) {
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float c = m[i] * b1 + g[i] * (1.f - b1);
    p[i] = p[i] * decay - lr * (float)((c > 0.f) - (c < 0.f));
    m[i] = m[i] * b2 + g[i] * (1.f - b2);
  }
}
"""


class BareLoop:
    """The memory floor of a Lion step on this CPU: one plain C loop over flat fp32 p, g and m of the
    profile's element count (no tensors, no dispatch), built here with the C++ compiler the kernel
    uses, in a fresh private directory, and loaded from there."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        import ctypes
        import subprocess
        import tempfile

        from lion_hf.optim.cpu_kernel_build import cxx_compiler

        compiler = cxx_compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler: the bare loop cannot be built")
        numel = sum(p.numel() for p in params)
        self.p, self.g, self.m = (torch.zeros(numel) for _ in range(3))
        self.g.normal_()
        self.state = {0: {"exp_avg": self.m}}
        self._dir = tempfile.TemporaryDirectory()  # mode 0700: no other user can swap the library
        source = Path(self._dir.name) / "bare.cpp"
        source.write_text('extern "C" {' + _BARE_LOOP_SOURCE + "}")
        library = Path(self._dir.name) / "bare.so"
        subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
                        str(source), "-o", str(library)], check=True, timeout=120)
        self._lib = ctypes.CDLL(str(library))
        self._fn = self._lib.bare_lion
        self._fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 4
        self._numel = numel

    def step(self) -> None:
        self._fn(self.p.data_ptr(), self.g.data_ptr(), self.m.data_ptr(), self._numel, 1e-4, 1 - 1e-5, 0.9, 0.99)


def peer_factories(device: str, lr: float, wd: float) -> dict[str, tuple[str, Callable]]:
    """Other Lion implementations users pick, where installed (pip install 'lion_hf[bench]')."""
    table: dict[str, tuple[str, Callable]] = {}
    if device == "cpu":
        try:  # ZeRO-Offload's CPU optimizers (their C++ extensions build at first use, ~80 s)
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            from deepspeed.ops.lion import DeepSpeedCPULion

            table["deepspeed_cpu_lion"] = (
                "lion", lambda ps: DeepSpeedCPULion(ps, lr=lr, betas=(0.9, 0.99), weight_decay=wd))
            table["deepspeed_cpu_adam"] = (
                "adamw", lambda ps: DeepSpeedCPUAdam(ps, lr=lr, weight_decay=wd, adamw_mode=True))
        except ImportError:
            pass
    try:
        import optimi

        table["optimi_lion"] = ("lion", lambda ps: optimi.Lion(ps, lr=lr, weight_decay=wd, foreach=True))
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        table["pytorch_optimizer_lion"] = ("lion", lambda ps: pytorch_optimizer.Lion(ps, lr=lr, weight_decay=wd))
    except ImportError:
        pass
    try:
        from lion_pytorch import Lion as LionPytorch

        table["lion_pytorch"] = ("lion", lambda ps: LionPytorch(ps, lr=lr, weight_decay=wd))
        if device == "cuda":
            table["lion_pytorch_triton"] = ("lion", lambda ps: LionPytorch(ps, lr=lr, weight_decay=wd, use_triton=True))
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        # HF's optim="lion_32bit" / "lion_8bit" (betas from adam_beta1/2 there; the paper's here).
        table["bnb_lion_32bit"] = ("lion", lambda ps: bnb.optim.Lion32bit(ps, lr=lr, weight_decay=wd))
        table["bnb_lion_8bit"] = ("lion_8bit_state", lambda ps: bnb.optim.Lion8bit(ps, lr=lr, weight_decay=wd))
        table["bnb_lion_8bit_bf16"] = ("lion_bf16_8bit_state",
                                       lambda ps: bnb.optim.Lion8bit(ps, lr=lr, weight_decay=wd))
    except ImportError:
        pass
    if device == "cpu":
        table["bare_c_loop"] = ("lion", BareLoop)
    return table


def optimizer_factories(device: str, include_for_loop: bool) -> dict[str, tuple[str, Callable]]:
    """name -> (bytes kind, factory(params) -> optimizer)."""
    lr, wd = 1e-4, 0.1

    def lion(**kwargs) -> Callable:
        return lambda ps: Lion(ps, lr=lr, weight_decay=wd, **kwargs)

    table: dict[str, tuple[str, Callable]] = {
        "adamw_fused": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True)),
        "adamw_foreach": ("adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=True)),
    }
    if include_for_loop:
        table["adamw_for_loop"] = ("adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=False))
        table["lion_for_loop"] = ("lion", lion(impl="for_loop"))
    table["lion_trainer_default"] = ("lion", lambda ps: TrainerDefaultLion(ps, lr=lr, weight_decay=wd))
    table["lion_standalone_skip_step"] = ("lion", lion(nonfinite_grad="skip_step"))
    kernel = "triton" if device == "cuda" else "cpp"  # what "auto" (so the trainer's default row) runs
    for impl in (kernel, "foreach"):
        table[f"lion_{impl}"] = ("lion", lion(impl=impl))
        table[f"lion_{impl}_nocheck"] = ("lion", lion(impl=impl, nonfinite_grad="propagate"))
        table[f"lion_{impl}_bf16_state"] = ("lion_bf16_state", lion(impl=impl, state_dtype="bf16"))
        table[f"lion_{impl}_int8_state"] = ("lion_8bit_state", lion(impl=impl, state_dtype="int8"))
    # Pure bf16 (bf16 weights, grads and state), the GPU fine-tuning setup, and fp16 weights (fp32
    # state): Lion's default keeps every step by stochastic rounding; Kahan and round-to-nearest
    # for comparison. foreach rounds tensor by tensor (slow): its stochastic rows only.
    table["adamw_fused_bf16"] = ("adamw_bf16", lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True))
    for impl in (kernel, "foreach"):
        for rounding in ("stochastic", "kahan", "nearest") if impl == kernel else ("stochastic",):
            suffix = "_kahan" if rounding == "kahan" else ""
            table[f"lion_{impl}_bf16_{rounding}"] = (
                f"lion_bf16{suffix}", lion(impl=impl, state_dtype="bf16", param_rounding=rounding))
            table[f"lion_{impl}_fp16_{rounding}"] = (f"lion_fp16{suffix}", lion(impl=impl, param_rounding=rounding))
        # Pure bf16 weights with 8-bit momentum: 1 byte of state per parameter.
        table[f"lion_{impl}_bf16_int8_state"] = ("lion_bf16_8bit_state", lion(impl=impl, state_dtype="int8"))
    table.update(peer_factories(device, lr, wd))
    return table


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(opt: torch.optim.Optimizer, device: str) -> float:
    """Seconds for one ``opt.step()`` (CUDA events on GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def copy_bandwidth(device: str, numel: int) -> float:
    """GB/s of dst.copy_(src) (read + write) on the device: the ceiling a pointwise kernel can hit."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * numel * 4 / statistics.median(times) / 1e9


def _start(factory: Callable, base: list[torch.Tensor], grads: list[torch.Tensor], device: str, warmup: int,
           dtype: torch.dtype = torch.float32):
    """Fresh params + optimizer, first step (timed: it includes any compilation) and warm-up.

    Returns (params, optimizer, first-step seconds, CUDA bytes allocated before): peak memory
    counts what each optimizer's own params, grads, state and temporaries add.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    params = [torch.nn.Parameter(b.to(device, dtype)) for b in base]
    for p, g in zip(params, grads):
        p.grad = g.to(device, dtype)
    opt = factory(params)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        opt.step()
    _sync(device)
    return params, opt, first, allocated


def bench_profile(
    name: str, device: str, steps: int, warmup: int, include_for_loop: bool, only: list[str] | None,
    rounds: int = 1,
) -> dict:
    """Time every optimizer on one profile.

    Each optimizer's steps alternate with steps of fused AdamW (kept alive for the whole
    profile), and its ratio is to AdamW's median over that same window: on a shared machine
    memory bandwidth drifts from minute to minute, and alternating cancels the drift. With
    ``rounds`` > 1 the whole list runs that many times (each optimizer rebuilt every round); a
    row then reports the median of its per-round ratios and their range, and its median step
    over all rounds.
    """
    shapes = profile_shapes(name)
    numel = sum(s.numel() for s in shapes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # One set of params/grads for every optimizer. Each gets its own Parameter objects, but where no
    # dtype or device change is needed (fp32 on the CPU) they share this memory: values drift
    # from optimizer to optimizer, which timing does not notice.
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    result = {"profile": name, "tensors": len(shapes), "params": numel, "rounds": rounds, "optimizers": {}}
    factories = optimizer_factories(device, include_for_loop)
    _, baseline, baseline_first, allocated = _start(factories["adamw_fused"][1], base, grads, device, warmup)
    baseline_peak = torch.cuda.max_memory_allocated() - allocated if device == "cuda" else None
    baseline_times: list[float] = []
    runs: dict[str, dict] = {}  # per optimizer: step times, per-round ratios, first step, state, memory
    for round_index in range(rounds):
        for opt_name, (kind, factory) in factories.items():
            if opt_name == "adamw_fused" or (only and opt_name not in only) or opt_name in result["optimizers"]:
                continue
            try:
                params, opt, first, allocated = _start(factory, base, grads, device, warmup, KINDS[kind][1])
                times, window = [], []
                for _ in range(steps):
                    window.append(time_step(baseline, device))
                    times.append(time_step(opt, device))
            except Exception as exc:  # one failing optimizer must not lose the rest of the table
                result["optimizers"][opt_name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {opt_name:28s} failed: {exc}")
                continue
            baseline_times += window
            run = runs.setdefault(opt_name, {"kind": kind, "times": [], "ratios": [], "first": first,
                                             "state_bytes": state_bytes(opt), "adamw_window": []})
            run["times"] += times
            run["adamw_window"] += window
            run["ratios"].append(statistics.median(times) / statistics.median(window))
            if device == "cuda":
                run["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - allocated
            print(f"  [{round_index + 1}/{rounds}] {opt_name:28s} {statistics.median(times) * 1e3:9.2f} ms  "
                  f"x{run['ratios'][-1]:.2f} (AdamW {statistics.median(window) * 1e3:.2f} ms alongside)  "
                  f"first {first:6.2f} s")
            del opt, params
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    for opt_name, run in runs.items():
        if opt_name in result["optimizers"]:  # failed in a later round
            continue
        median = statistics.median(run["times"])
        row = {
            "ms_per_step": median * 1e3,
            "first_step_s": run["first"],
            "gb_per_s": KINDS[run["kind"]][0] * numel / median / 1e9,
            "state_bytes": run["state_bytes"],
            "ratio_to_adamw_fused": statistics.median(run["ratios"]),
            "adamw_fused_ms_in_window": statistics.median(run["adamw_window"]) * 1e3,
        }
        if rounds > 1:
            row["ratio_range"] = [min(run["ratios"]), max(run["ratios"])]
        if "peak_memory_bytes" in run:
            row["peak_memory_bytes"] = run["peak_memory_bytes"]
        result["optimizers"][opt_name] = row
    if not baseline_times:  # nothing else ran: time the baseline on its own
        baseline_times = [time_step(baseline, device) for _ in range(steps)]
    median = statistics.median(baseline_times)
    row = {
        "ms_per_step": median * 1e3, "first_step_s": baseline_first,
        "gb_per_s": KINDS["adamw"][0] * numel / median / 1e9, "state_bytes": state_bytes(baseline),
        "ratio_to_adamw_fused": 1.0,
    }
    if device == "cuda":
        row["peak_memory_bytes"] = baseline_peak
    result["optimizers"] = {"adamw_fused": row, **result["optimizers"]}
    print(f"  {'adamw_fused (all windows)':28s} {row['ms_per_step']:9.2f} ms")
    return result


def to_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Machine: {env['machine']}; torch {env['torch']}; {env['threads']} threads; device {env['device']}"
        + (f"; copy bandwidth {env['copy_gb_per_s']:.0f} GB/s" if env.get("copy_gb_per_s") else ""),
        "",
        "| profile | params (tensors) | optimizer | ms/step | x fused AdamW (range over rounds) | x bare loop | GB/s "
        "| state MB | first step s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for prof in results["profiles"]:
        bare = prof["optimizers"].get("bare_c_loop", {}).get("ms_per_step")
        for name, row in prof["optimizers"].items():
            if "error" in row:
                lines.append(f"| {prof['profile']} | | {name} | failed: {row['error'][:60]} | | | | | |")
                continue
            floor = f"{row['ms_per_step'] / bare:.2f}" if bare else "-"
            ratio = f"{row.get('ratio_to_adamw_fused', float('nan')):.2f}"
            if "ratio_range" in row:
                ratio += " ({:.2f}-{:.2f})".format(*row["ratio_range"])
            lines.append(
                f"| {prof['profile']} | {prof['params'] / 1e6:.1f}M ({prof['tensors']}) | {name} | "
                f"{row['ms_per_step']:.2f} | {ratio} | {floor} | "
                f"{row['gb_per_s']:.1f} | {row['state_bytes'] / 2**20:.0f} | {row['first_step_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--profiles", nargs="+", default=["minilm"], choices=list(PROFILES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list this many times; rows report the median ratio and its range")
    parser.add_argument("--no-for-loop", action="store_true", help="skip the slow per-tensor baselines")
    parser.add_argument("--only", nargs="*", help="optimizer names to run (adamw_fused always runs)")
    parser.add_argument("--out", default="runs/bench_optimizer_step", help="output path prefix (.json and .md)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")

    env = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device == "cuda":
        env["copy_gb_per_s"] = copy_bandwidth("cuda", 1 << 28)
    results = {"environment": env, "profiles": []}
    for name in args.profiles:
        print(f"profile {name}")
        results["profiles"].append(
            bench_profile(name, args.device, args.steps, args.warmup, not args.no_for_loop, args.only, args.rounds)
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    markdown = to_markdown(results)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
