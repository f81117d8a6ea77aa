"""Where Distributed Lion pays: training steps of two ranks joined by a bandwidth-limited link.

Usage (root, Linux; the README's table):
    python scripts/bench_distributed_network.py --profiles minilm base --rates 1gbit 100mbit \\
        --out runs/bench_network

The script makes two network namespaces of its own, joins them with a veth pair whose two ends are
shaped with ``tc`` (a token-bucket filter at each ``--rates`` value; ``none`` leaves the link
unshaped), gives the ends two addresses inside 10.213.0.0/30, and starts one rank in each namespace:
gloo over TCP between them, through nothing but that link. The namespaces and the pair are deleted at
the end, whatever happened. No other address is used.

Each rank trains a BERT-shaped classifier built from its config (random weights, random tokens of
its own, ``--batch`` x ``--seq-len``), the same way for every method:

- ``ddp_adamw``: DDP (gradients all-reduced in fp32 buckets) + fused AdamW, the baseline;
- ``ddp_lion``: DDP + ``lion_hf.Lion``;
- ``distributed_lion_majority`` / ``_average``: DDP with its gradient all-reduce turned off by
  ``LionTrainer``'s communication hook + ``lion_hf.DistributedLion``, which exchanges packed signs.

Reported per step (median of ``--steps`` after one warm-up step): the wall time of forward, backward
and optimizer step on rank 0, and the bytes rank 0's end of the link sent (read from the kernel's
interface counters, so TCP/IP framing is included). The same step with one process and no network
(``local``) is the compute floor. Writes ``<out>.json`` and ``<out>.md``.

Without root or network namespaces the script says so and stops; ``--bytes-only`` then prints the
bytes each method hands to ``torch.distributed`` per step and the time they imply at each rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

PROFILES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
METHODS = ("ddp_adamw", "ddp_lion", "distributed_lion_majority", "distributed_lion_average")
SUBNET = "10.213.0."  # the two ends: .1 (rank 0, the rendezvous) and .2
PORT = 29612


def parse_rate(text: str) -> float | None:
    """'1gbit' -> bits per second; 'none' -> None (unshaped)."""
    text = text.strip().lower()
    if text == "none":
        return None
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if text.endswith(suffix):
            try:
                value = float(text[: -len(suffix)])
            except ValueError:
                break
            if value > 0:
                return value * scale
    raise argparse.ArgumentTypeError(f"rate {text!r}: expected a positive number with gbit, mbit or kbit "
                                     "(as tc writes it, e.g. 1gbit, 100mbit), or 'none'")


def build_model(profile: str, seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(**PROFILES[profile], num_labels=2)
    return transformers.BertForSequenceClassification(config)


def make_optimizer(method: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from lion_hf import DistributedLion, Lion

    if method == "ddp_adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    if method == "ddp_lion":
        return Lion(params, lr=5e-5, weight_decay=0.02)
    return DistributedLion(params, lr=5e-5, weight_decay=0.02, vote=method.rsplit("_", 1)[1])


def timed_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, steps: int,
                counter: Path | None) -> tuple[list[float], list[int]]:
    """Seconds and bytes sent (when a counter file is given) of each step after a warm-up step."""
    times, sent = [], []
    for i in range(steps + 1):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # both ranks start each step together
        before = int(counter.read_text()) if counter else 0
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i:  # the first step builds kernels and state
            times.append(elapsed)
            sent.append(int(counter.read_text()) - before if counter else 0)
    return times, sent


def random_batch(args: argparse.Namespace, rank: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    return {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq_len), generator=generator),
            "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (args.batch,), generator=generator)}


def worker(args: argparse.Namespace) -> None:
    """One rank inside its namespace: every profile x method, one JSON line per result on stdout."""
    from torch.nn.parallel import DistributedDataParallel

    from lion_hf.trainer import local_gradients_hook

    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://{SUBNET}1:{PORT}",
                                         rank=args.rank, world_size=2)
    counter = Path(f"/sys/class/net/{args.ifname}/statistics/tx_bytes")
    try:
        for profile in args.profiles:
            for method in METHODS:
                model = DistributedDataParallel(build_model(profile, seed=0))
                if method.startswith("distributed_lion"):
                    model.register_comm_hook(None, local_gradients_hook)  # as LionTrainer does
                optimizer = make_optimizer(method, list(model.parameters()))
                times, sent = timed_steps(model, optimizer, random_batch(args, args.rank), args.steps, counter)
                if args.rank == 0:
                    print(json.dumps({"profile": profile, "method": method, "seconds": times, "sent": sent}),
                          flush=True)
                del model, optimizer
    finally:
        torch.distributed.destroy_process_group()


def local_floor(args: argparse.Namespace) -> list[dict]:
    """The step with one process and no network, Lion and AdamW: what the link adds to."""
    torch.set_num_threads(args.threads)
    rows = []
    for profile in args.profiles:
        for method in ("ddp_adamw", "ddp_lion"):
            model = build_model(profile, seed=0)
            optimizer = make_optimizer(method, list(model.parameters()))
            times, _ = timed_steps(model, optimizer, random_batch(args, 0), args.steps, None)
            rows.append({"profile": profile, "method": "local_" + method.removeprefix("ddp_"), "seconds": times})
    return rows


def codec_cost(args: argparse.Namespace) -> list[dict]:
    """Milliseconds of the optimizer step alone, one process, on the profile's shapes: Lion's
    (the default impl) against DistributedLion's as rank 0 of 2 with the collective replaced by a
    local copy (the other rank's signs fixed), in its C++ kernel path and in its torch path; and
    the torch codec functions by themselves. What the sign exchange costs beyond Lion's step."""
    torch.set_num_threads(args.threads)
    return [{"profile": profile, "ms": _step_costs(profile, args.steps)} for profile in args.profiles]


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: state, buffers, the kernel's first load
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _step_costs(profile: str, steps: int) -> dict[str, float]:
    from lion_hf import DistributedLion, Lion
    from lion_hf.optim import cpu_kernel, distributed
    from lion_hf.optim.distributed import HEADER_BYTES, combine_signs, pack_signs

    shapes = [p.shape for p in build_model(profile, seed=0).parameters()]
    updates = [torch.randn(s) for s in shapes]
    n = sum(u.numel() for u in updates)
    other = pack_signs([-u for u in updates])
    gathered = torch.stack([pack_signs(updates), other])

    def gather(output: torch.Tensor, buffer: torch.Tensor, group: object) -> None:
        rows = output.view(2, -1)
        rows[0] = buffer
        rows[1, HEADER_BYTES:] = other
        rows[1, :HEADER_BYTES] = buffer[:HEADER_BYTES]

    def optimizer(cls: type) -> torch.optim.Optimizer:
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        for p, u in zip(params, updates):
            p.grad = u.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialised": on purpose
            return cls(params, lr=5e-5, weight_decay=0.02)

    real = distributed._all_gather, DistributedLion.world_size, cpu_kernel.sign_vote_kernels
    distributed._all_gather, DistributedLion.world_size = gather, lambda self: 2
    try:
        repeats = max(5, steps)
        timings = {"Lion step": _median_ms(optimizer(Lion).step, repeats),
                   "DistributedLion step, C++ kernel": _median_ms(optimizer(DistributedLion).step, repeats)}
        cpu_kernel.sign_vote_kernels = lambda: None  # the torch-ops path
        timings["DistributedLion step, torch ops"] = _median_ms(optimizer(DistributedLion).step, repeats)
        timings["pack_signs (torch)"] = _median_ms(lambda: pack_signs(updates), repeats)
        timings["combine_signs (torch, 2 ranks)"] = _median_ms(lambda: combine_signs(gathered, n, "majority"),
                                                               repeats)
    finally:
        distributed._all_gather, DistributedLion.world_size, cpu_kernel.sign_vote_kernels = real
    return timings


def payload_bytes(profile: str) -> dict[str, int]:
    """Bytes one rank hands to torch.distributed per step: DDP all-reduces every fp32 gradient;
    Distributed Lion all-gathers its packed signs (lion_hf.optim.distributed.packed_nbytes)."""
    from lion_hf.optim.distributed import packed_nbytes

    n = sum(p.numel() for p in build_model(profile, seed=0).parameters())
    return {"params": n, "ddp": 4 * n, "distributed_lion": packed_nbytes(n)}


class Link:
    """Two namespaces joined by a shaped veth pair; removed on exit."""

    def __init__(self, tag: str, rate: float | None) -> None:
        self.ns = [f"lionhf{tag}a", f"lionhf{tag}b"]
        self.ifname = [f"lh{tag}a", f"lh{tag}b"]  # interface names: 15 characters at most
        self.rate = rate

    def _ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)

    def __enter__(self) -> Link:
        try:
            for ns in self.ns:
                self._ip("netns", "add", ns)
            self._ip("link", "add", self.ifname[0], "netns", self.ns[0], "type", "veth",
                     "peer", "name", self.ifname[1], "netns", self.ns[1])
            for i, (ns, ifname) in enumerate(zip(self.ns, self.ifname)):
                self._ip("-n", ns, "addr", "add", f"{SUBNET}{i + 1}/30", "dev", ifname)
                self._ip("-n", ns, "link", "set", ifname, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                if self.rate is not None:
                    # Token bucket at the rate; a burst of 1 ms of traffic (at least 64 KB) keeps
                    # the rate accurate without starving TCP.
                    burst = max(65536, int(self.rate / 8 / 1000))
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
                                    "rate", f"{int(self.rate)}bit", "burst", str(burst), "latency", "100ms"],
                                   check=True, capture_output=True, text=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it, and its peer
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_link(args: argparse.Namespace, rate_text: str) -> list[dict]:
    tag = f"{os.getpid() % 100000}"
    with Link(tag, parse_rate(rate_text)) as link:
        # c10d warns that a namespace has no hostname for its address: nothing is wrong.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCH_CPP_LOG_LEVEL": "ERROR"}
        procs = []
        for rank in (0, 1):
            env_rank = {**env, "GLOO_SOCKET_IFNAME": link.ifname[rank]}
            argv = ["ip", "netns", "exec", link.ns[rank], sys.executable, __file__, "--worker",
                    "--rank", str(rank), "--ifname", link.ifname[rank], "--threads", str(args.threads),
                    "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                    "--profiles", *args.profiles]
            procs.append(subprocess.Popen(argv, env=env_rank, stdout=subprocess.PIPE, text=True))
        try:
            out, _ = procs[0].communicate(timeout=args.timeout)
            procs[1].wait(timeout=60)
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"a rank failed at rate {rate_text}: exit codes {[p.returncode for p in procs]}")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        row["rate"] = rate_text
    return rows


def markdown(results: dict) -> str:
    lines = ["# Distributed Lion on a bandwidth-limited link", "",
             f"`{results['command']}`", "",
             f"{results['machine']}; {results['date']}; 2 ranks in 2 network namespaces joined by a veth pair "
             f"shaped with tc tbf, gloo over TCP; batch {results['batch']} x {results['seq_len']} tokens per rank, "
             f"{results['threads']} thread(s) per rank; median of {results['steps']} steps after a warm-up.", "",
             "| shapes | link | method | s / step | x DDP AdamW | MB sent / step (rank 0, wire) | "
             "MB handed to collectives |", "|---|---|---|---:|---:|---:|---:|"]
    for profile in results["profiles"]:
        payload = results["payload"][profile]
        for row in results["local"]:
            if row["profile"] == profile:
                lines.append(f"| {profile} | none (one process) | {row['method']} | "
                             f"{statistics.median(row['seconds']):.2f} | | | |")
        for rate in results["rates"]:
            rows = [r for r in results["rows"] if r["profile"] == profile and r["rate"] == rate]
            base = next(statistics.median(r["seconds"]) for r in rows if r["method"] == "ddp_adamw")
            for row in rows:
                median = statistics.median(row["seconds"])
                handed = payload["ddp"] if row["method"].startswith("ddp") else payload["distributed_lion"]
                lines.append(f"| {profile} | {rate} | {row['method']} | {median:.2f} | {median / base:.2f} | "
                             f"{statistics.median(row['sent']) / 1e6:.1f} | {handed / 1e6:.1f} |")
    names = list(results["codec"][0]["ms"]) if results["codec"] else []
    lines += ["", f"The optimizer step alone, one process, {results['threads']} thread(s), ms (median; DistributedLion "
              "as rank 0 of 2 with the collective replaced by a local copy):", "",
              "| shapes | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in results["codec"]:
        lion = row["ms"]["Lion step"]
        lines.append(f"| {row['profile']} | " + " | ".join(
            f"{ms:.1f}" + ("" if name == "Lion step" else f" ({ms / lion:.2f}x)") for name, ms in row["ms"].items())
            + " |")
    lines += ["", "Parameters: " + ", ".join(f"{p} {results['payload'][p]['params'] / 1e6:.1f}M"
                                               for p in results["profiles"]) + "."]
    return "\n".join(lines) + "\n"


def bytes_only(args: argparse.Namespace) -> None:
    print("| shapes | method | MB per step | " + " | ".join(f"s at {r}" for r in args.rates) + " |")
    for profile in args.profiles:
        payload = payload_bytes(profile)
        for method, nbytes in (("DDP (fp32 all-reduce)", payload["ddp"]),
                               ("DistributedLion", payload["distributed_lion"])):
            implied = [f"{nbytes * 8 / parse_rate(r):.2f}" if parse_rate(r) else "-" for r in args.rates]
            print(f"| {profile} | {method} | {nbytes / 1e6:.1f} | " + " | ".join(implied) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["minilm", "base"], choices=list(PROFILES))
    parser.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"],
                        help="tc rates of the link (e.g. 1gbit 100mbit; 'none' = unshaped)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per link")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_network"))
    parser.add_argument("--bytes-only", action="store_true",
                        help="no namespaces: print the bytes per step and the time they imply at --rates")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ifname", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for rate in args.rates:
        parse_rate(rate)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 1 or args.threads < 1:
        parser.error("--steps, --batch, --seq-len and --threads must be positive")
    if args.worker:
        worker(args)
        return
    if args.bytes_only:
        bytes_only(args)
        return
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        sys.exit("this benchmark makes network namespaces: it needs root and the ip and tc tools "
                 "(or run it with --bytes-only for the bytes and the times they imply)")
    results = {"command": "python scripts/bench_distributed_network.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, host {socket.gethostname()}",
               "date": time.strftime("%Y-%m-%d"), "profiles": args.profiles, "rates": args.rates,
               "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads,
               "payload": {p: payload_bytes(p) for p in args.profiles}, "local": local_floor(args),
               "codec": codec_cost(args), "rows": []}
    for rate in args.rates:
        print(f"[bench] link at {rate} ...", flush=True)
        results["rows"] += run_link(args, rate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
