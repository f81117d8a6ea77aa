"""One training step (forward, backward, optimizer step) with and without gradient release, interleaved.

Usage (CPU):
    python scripts/bench_release_step.py --pairs 12

MiniLM-L6's shapes (22.7M parameters, built from its config), batch 32 x 64 tokens, fp32, Lion with
``impl="auto"``. Two copies of the model train side by side, one with ``GradientRelease``
(``--sparse-embedding``: with ``sparse_embedding``, the word embedding's gradient sparse, stepped in
chunks of rows; ``--chunked-output``: with ``ChunkedOutputGrad``, the output layer's weight gradient
stepped a range of rows at a time); each pair
of steps runs both, in alternating order, so drift in a shared machine's speed hits both alike. Prints
the median step of each, their ratio and the median of the pairwise ratios.

``--llama``: instead, a causal LM with the 374M memory benchmark's widths (hidden 1024, intermediate
2816, vocab 32000, untied) and 4 layers, pure bf16 with 8-bit momentum, where the output layer and
the embedding are half the parameters (then ``--sparse-embedding --chunked-output`` are the memory
benchmark's released setup).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lion_hf import ChunkedOutputGrad, GradientRelease, Lion

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
LLAMA = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2816, vocab_size=32000,
             tie_word_embeddings=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--sparse-embedding", action="store_true",
                        help="release with GradientRelease.sparse_embedding (the embedding's gradient sparse)")
    parser.add_argument("--chunked-output", action="store_true",
                        help="release with ChunkedOutputGrad (the output layer's gradient stepped in ranges of rows)")
    parser.add_argument("--llama", action="store_true",
                        help="a 4-layer causal LM of the 374M benchmark's widths, pure bf16 + 8-bit momentum")
    args = parser.parse_args(argv)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        if args.llama:
            return LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16)
        return BertForSequenceClassification(BertConfig(**MINILM, num_labels=2))

    state_dtype = "int8" if args.llama else "fp32"
    ordinary, released = build(), build()
    ordinary_opt = Lion(ordinary.parameters(), lr=1e-5, state_dtype=state_dtype)
    released_opt = Lion(released.parameters(), lr=1e-5, state_dtype=state_dtype)
    handle = GradientRelease(released_opt)
    if args.sparse_embedding:
        handle.sparse_embedding(released)
    if args.chunked_output:
        ChunkedOutputGrad(released)
    gen = torch.Generator().manual_seed(0)
    vocab = (LLAMA if args.llama else MINILM)["vocab_size"]
    ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=gen)
    labels = ids if args.llama else torch.randint(0, 2, (args.batch,), generator=gen)

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
          f"{'llama 4 layers bf16 int8' if args.llama else 'MiniLM-L6 fp32'}, "
          f"sparse_embedding {args.sparse_embedding}, chunked_output {args.chunked_output}")
    print(f"without release {a * 1e3:.0f} ms/step, with release {b * 1e3:.0f} ms/step, ratio {b / a:.3f}, "
          f"median pairwise ratio {pairwise:.3f}")


if __name__ == "__main__":
    main()
