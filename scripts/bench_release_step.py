"""One training step (forward, backward, optimizer step) with and without gradient release, interleaved.

Usage (CPU):
    python scripts/bench_release_step.py --pairs 12

MiniLM-L6's shapes (22.7M parameters, built from its config), batch 32 x 64 tokens, fp32, Lion with
``impl="auto"``. Two copies of the model train side by side, one with ``GradientRelease``
(``--sparse-embedding``: with ``sparse_embedding``, the word embedding's gradient sparse, stepped in
chunks of rows); each pair
of steps runs both, in alternating order, so drift in a shared machine's speed hits both alike. Prints
the median step of each, their ratio and the median of the pairwise ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from lion_hf import GradientRelease, Lion

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--sparse-embedding", action="store_true",
                        help="release with GradientRelease.sparse_embedding (the embedding's gradient sparse)")
    args = parser.parse_args(argv)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(**MINILM, num_labels=2))

    ordinary, released = build(), build()
    ordinary_opt, released_opt = Lion(ordinary.parameters(), lr=1e-5), Lion(released.parameters(), lr=1e-5)
    handle = GradientRelease(released_opt)
    if args.sparse_embedding:
        handle.sparse_embedding(released)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, MINILM["vocab_size"], (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, 2, (args.batch,), generator=gen)

    def step(model: torch.nn.Module, opt: Lion) -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(ordinary, ordinary_opt)
        step(released, released_opt)
    plain, release = [], []
    for i in range(args.pairs):
        if i % 2:
            plain.append(step(ordinary, ordinary_opt))
            release.append(step(released, released_opt))
        else:
            release.append(step(released, released_opt))
            plain.append(step(ordinary, ordinary_opt))
    a, b = statistics.median(plain), statistics.median(release)
    pairwise = statistics.median([r / p for p, r in zip(plain, release)])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch} x {args.seq}, {args.pairs} pairs, "
          f"sparse_embedding {args.sparse_embedding}")
    print(f"without release {a * 1e3:.0f} ms/step, with release {b * 1e3:.0f} ms/step, ratio {b / a:.3f}, "
          f"median pairwise ratio {pairwise:.3f}")


if __name__ == "__main__":
    main()
