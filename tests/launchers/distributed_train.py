"""Train the tiny BERT with LionTrainer, with HF's AdamW and with Lion; rank 0 saves parameters and logs.

Run by tests/test_distributed.py, once as a single process and once as
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_train.py \
        --per_device_batch 4 --out f.pt --workdir w
with the same global batch, to show that DDP (gloo) trains the same model. The saved file maps
each optimizer (``--optims adamw,lion``: trained in turn, from the same start) to ``params``
(name -> tensor), ``log`` (the Trainer's log history: loss and grad_norm per step), ``world_size``
and ``model_accepts_loss_kwargs``.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
from tiny_models import TokenDataset, tiny_bert

from lion_hf import LionTrainer, LionTrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--per_device_batch", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--optims", default="adamw,lion", help="comma-separated; each trains in turn from the same start")
parser.add_argument("--lion_impl", default="foreach", help="Lion's impl")
args = parser.parse_args()


def train(optim: str) -> dict:
    # AdamW and Lion both clip at 1.0 (HF's default), where a gradient scaled by the process count
    # would show: clipping would bite at a fraction of the true norm.
    lr = 1e-3 if optim == "lion" else 3e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_args = LionTrainingArguments(
            output_dir=f"{args.workdir}/{optim}",
            per_device_train_batch_size=args.per_device_batch,
            num_train_epochs=2,
            optim=optim,
            learning_rate=lr,
            weight_decay=0.1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            lion_impl=args.lion_impl,
            disable_tqdm=True,
            logging_steps=1,
            dataloader_drop_last=True,
            max_steps=args.max_steps,
        )
    trainer = LionTrainer(model=tiny_bert(), args=training_args, train_dataset=TokenDataset())
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    print(f"optim={optim} world_size={trainer.accelerator.num_processes} steps={trainer.state.global_step}", flush=True)
    return {
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
        "log": [e for e in trainer.state.log_history if "loss" in e],
        "world_size": trainer.accelerator.num_processes,
        "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
    }


records = {optim: train(optim) for optim in args.optims.split(",")}
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    torch.save(records, args.out)
# Tear the process group down before exit: gloo aborting in a destructor made rank 1 exit with SIGABRT.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
