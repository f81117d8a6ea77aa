"""Peak memory per parameter of a full fine-tune under HF Trainer, one process per setup.

Usage (CPU; the README's memory table):
    python scripts/bench_memory.py --models 350m --out docs/results/bench_memory
    python scripts/bench_memory.py --models 1.1b --setups lion_bf16 lion_bf16_release lion_bf16_int8_release \
        --out runs/bench_memory_1b

Each setup trains a Llama-style causal LM built from a config (random init, no download) for a few
HF Trainer steps on batch 1 x 32 tokens (the same sequence every step, so the loss must fall), in a
fresh Python process of its own. The figure is the process's peak resident memory above its start:
after the imports the script resets the kernel's high-water mark (``/proc/self/clear_refs``) and
reads the resident size; after training it reads the high-water mark (``VmHWM``); the difference,
over the parameter count, is bytes per parameter: weights, gradients, optimizer state, activations
and whatever the Trainer holds, all alike for every setup. Each row also records the loss of the
first and of the last step (a setup that did not train is marked).

Two options take out what is not the fine-tune's own memory (both off by default, so that rows stay
comparable with those measured without them; each row records them):

* ``--warm-up``: before the baseline, the child trains the same setup on the tiny model, so that
  the code pages of the kernels torch loads at first use, and its one-time allocations, are
  resident before the baseline is read (they do not grow with the model).
* ``--malloc-mmap-threshold BYTES``: sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the children: every
  allocation at least that large is its own mapping, returned to the system when freed. Without
  it glibc raises the threshold as large buffers are freed, and later gradients and activations
  below it come from the heap, whose freed holes stay resident (a glibc setting a user can make
  too; it does not change what is computed).

Setups (``--setups``; default: all that can run here):

* ``adamw_fp32``: HF's default optimizer (``adamw_torch_fused``), fp32 weights.
* ``lion_fp32``: LionTrainer, fp32 weights and momentum.
* ``lion_fp32_release``: the same with gradient release (the recipes' setting with
  ``--lion_gradient_release true``).
* ``lion_bf16``: pure bf16: bf16 weights, gradients and momentum (stochastic rounding).
* ``lion_bf16_release``: the same with gradient release (``lion_gradient_release=True``).
* ``lion_bf16_int8``: bf16 weights, 8-bit momentum (``lion_state_dtype="int8"``; where this
  version of the package has it).
* ``lion_bf16_int8_release``: bf16 weights, 8-bit momentum, gradient release.
* ``bnb_lion_8bit``: bitsandbytes' 8-bit Lion through HF's ``optim="lion_8bit"``, fp32 weights (HF's
  usual setting; betas 0.9/0.99).
* ``optimi_lion_bf16_release``: torch-optimi's Lion on bf16 weights (its Kahan summation on by default
  for bf16) with its own gradient release, handed to HF's Trainer with ``optimizers=``.

``--sparse-embedding`` runs the released setups with ``lion_sparse_embedding=True`` (the input
embedding's gradient sparse, expanded a chunk of rows at a time by the step), and
``--chunked-output`` runs every LionTrainer setup with ``lion_chunked_output_grad=True`` (the
output layer's weight gradient a range of rows at a time, each range stepped as computed under
release).
``--gradient-checkpointing`` runs every setup with HF's ``gradient_checkpointing=True`` (each decoder
layer's activations recomputed in backward instead of kept from the forward).

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODELS = {
    # ~374M: the model (hidden 1024, 24 layers, untied embeddings).
    "350m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    # ~1.1B: TinyLlama's shapes.
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    # MiniLM-L6's shapes as a sentiment classifier (22.7M parameters, half of them the word embedding):
    # the recipes' model, a BERT encoder with a 2-label head.
    "minilm": dict(arch="bert", hidden_size=384, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=12,
                   vocab_size=30522),
    # A smoke test of the script itself (seconds); its per-param figures mean little.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}
SETUPS = ("adamw_fp32", "lion_fp32", "lion_fp32_release", "lion_bf16", "lion_bf16_release", "lion_bf16_int8",
          "lion_bf16_int8_release", "bnb_lion_8bit", "optimi_lion_bf16_release")
LION_LR, ADAMW_LR = 1e-4, 3e-4


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _available(setup: str) -> str | None:
    """Why ``setup`` cannot run in this environment (None when it can)."""
    if "int8" in setup:
        from lion_hf.optim.options import STATE_DTYPES

        if "int8" not in STATE_DTYPES:
            return "this version of lion_hf has no 8-bit momentum (state_dtype='int8', issue 32)"
    if setup == "bnb_lion_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed (pip install bitsandbytes; it is in the [bench] extra)"
    if setup == "optimi_lion_bf16_release":
        try:
            import optimi  # noqa: F401
        except ImportError:
            return "torch-optimi is not installed (pip install torch-optimi; it is in the [bench] extra)"
    return None


def child(model_name: str, setup: str, steps: int, seq: int, warm_up: bool = False,
          sparse_embedding: bool = False, chunked_output: bool = False, checkpointing: bool = False) -> dict:
    """One setup in this process: build, train ``steps`` steps, measure. Returns the row. ``warm_up``:
    train the same setup on the tiny model first, before the baseline (see the module's help)."""
    if warm_up:
        child("tiny", setup, steps, seq, sparse_embedding=sparse_embedding, chunked_output=chunked_output,
              checkpointing=checkpointing)
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
    )

    from lion_hf import LionTrainer, LionTrainingArguments

    if setup == "bnb_lion_8bit":
        import bitsandbytes  # noqa: F401  (imported before the baseline: its code is not training memory)
    if setup == "optimi_lion_bf16_release":
        import optimi

    bf16 = "bf16" in setup
    shapes = dict(MODELS[model_name])
    classifier = shapes.pop("arch", "llama") == "bert"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (seq,), generator=gen)

    class Repeat(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> dict:
            labels = torch.tensor(1) if classifier else ids
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    # The baseline: everything imported, nothing built. Reset the high-water mark to the current size.
    Path("/proc/self/clear_refs").write_text("5")
    start_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()

    torch.manual_seed(0)
    if classifier:
        config = BertConfig(**shapes, max_position_embeddings=max(seq, 512), num_labels=2)
    else:
        config = LlamaConfig(**shapes, max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of a bf16 model at the peak
    try:
        model = BertForSequenceClassification(config) if classifier else LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in model.parameters())

    out = tempfile.mkdtemp(prefix="bench_memory_")
    common = dict(output_dir=out, per_device_train_batch_size=1, max_steps=steps, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  lr_scheduler_type="constant", weight_decay=0.0, gradient_checkpointing=checkpointing)
    losses = Losses()
    optimizers = (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup == "adamw_fp32":
            args = LionTrainingArguments(optim="adamw", learning_rate=ADAMW_LR, **common)
        elif setup == "bnb_lion_8bit":
            args = LionTrainingArguments(optim="lion_8bit", learning_rate=LION_LR, adam_beta1=0.9, adam_beta2=0.99,
                                         **common)
        elif setup == "optimi_lion_bf16_release":
            args = LionTrainingArguments(learning_rate=LION_LR, max_grad_norm=0.0, **common)
            opt = optimi.Lion(model.parameters(), lr=LION_LR, betas=(0.9, 0.99), gradient_release=True)
            optimi.prepare_for_gradient_release(model, opt)
            optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
        else:
            state_dtype = "int8" if "int8" in setup else "bf16" if bf16 else "fp32"
            release = setup.endswith("_release")
            args = LionTrainingArguments(learning_rate=LION_LR, lion_state_dtype=state_dtype,
                                         lion_gradient_release=release, max_grad_norm=0.0 if release else 1.0,
                                         lion_sparse_embedding=sparse_embedding and release,
                                         lion_chunked_output_grad=chunked_output, **common)
    trainer_cls = Trainer if setup == "optimi_lion_bf16_release" else LionTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=Repeat(), callbacks=[losses], optimizers=optimizers)
    trainer.train()
    peak_kib = _status_kib("VmHWM")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        "model": model_name,
        "setup": setup,
        "params": n_params,
        "peak_above_start_bytes": (peak_kib - start_kib) * 1024,
        "bytes_per_param": (peak_kib - start_kib) * 1024 / n_params,
        "losses": losses.losses,
        "trained": len(losses.losses) >= 2 and losses.losses[-1] < losses.losses[0],
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "seconds": time.perf_counter() - t0,
        "warm_up": warm_up,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "sparse_embedding": sparse_embedding,
        "chunked_output": chunked_output,
        "gradient_checkpointing": checkpointing,
    }


def _table(rows: list[dict]) -> str:
    lines = ["| model | setup | params | peak RSS above start | bytes/param | loss step 1 -> last | trained |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['setup']} | | | | not run: {r['error']} | |")
            continue
        losses = r["losses"]
        lines.append(f"| {r['model']} | {r['setup']} | {r['params'] / 1e6:.0f}M | "
                     f"{r['peak_above_start_bytes'] / 2**30:.2f} GiB | {r['bytes_per_param']:.2f} | "
                     f"{losses[0]:.3f} -> {losses[-1]:.3f} | {'yes' if r['trained'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["350m"], choices=list(MODELS))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="runs/bench_memory")
    parser.add_argument("--warm-up", action="store_true",
                        help="train the setup on the tiny model before the baseline (kernels' code pages resident)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the children (e.g. 65536: freed buffers go back)")
    parser.add_argument("--sparse-embedding", action="store_true",
                        help="released setups make the input embedding's gradient sparse (lion_sparse_embedding=True)")
    parser.add_argument("--chunked-output", action="store_true",
                        help="LionTrainer setups compute the output layer's weight gradient a range of rows at a time "
                             "(lion_chunked_output_grad=True)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every setup with HF's gradient_checkpointing=True")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = child(*args.child, steps=args.steps, seq=args.seq, warm_up=args.warm_up,
                    sparse_embedding=args.sparse_embedding, chunked_output=args.chunked_output,
                    checkpointing=args.gradient_checkpointing)
        print("ROW " + json.dumps(row), flush=True)
        return

    rows = []
    for model_name in args.models:
        for setup in args.setups:
            reason = _available(setup)
            if reason is not None:
                print(f"{model_name} {setup}: skipped: {reason}", flush=True)
                rows.append({"model": model_name, "setup": setup, "error": reason})
                continue
            cmd = [sys.executable, __file__, "--child", model_name, setup, "--steps", str(args.steps), "--seq",
                   str(args.seq), *(["--warm-up"] if args.warm_up else []),
                   *(["--sparse-embedding"] if args.sparse_embedding else []),
                   *(["--chunked-output"] if args.chunked_output else []),
                   *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
            env = dict(os.environ)
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
            row = next((json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")), None)
            if result.returncode != 0 or row is None:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                row = {"model": model_name, "setup": setup, "error": f"exit {result.returncode}: {tail[0][:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    meta = {"command": "python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "steps": args.steps,
            "batch": f"1 x {args.seq} tokens", "warm_up": args.warm_up,
            "malloc_mmap_threshold": args.malloc_mmap_threshold, "sparse_embedding": args.sparse_embedding,
            "chunked_output": args.chunked_output, "gradient_checkpointing": args.gradient_checkpointing}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(
        f"# Peak memory per parameter (scripts/bench_memory.py)\n\n`{meta['command']}`\n\n"
        f"{meta['date']}, {meta['machine']}, {meta['cores']} cores, torch {meta['torch']}, transformers "
        f"{meta['transformers']}; {args.steps} HF Trainer steps, batch {meta['batch']}, each setup in its own "
        "process; peak RSS above the process's start (after imports"
        f"{', and a warm-up on the tiny model' if args.warm_up else ''})"
        f"{'; MALLOC_MMAP_THRESHOLD_=' + str(args.malloc_mmap_threshold) if args.malloc_mmap_threshold else ''}"
        ".\n\n" + _table(rows) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
