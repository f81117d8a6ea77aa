"""Train the tiny BERT with LionTrainer, with or without gradient release; rank 0 saves parameters and logs.

Run by tests/test_release.py as one process, as two DDP processes
    accelerate launch --multi_gpu --num_processes 2 tests/launchers/release_train.py \
        --per_device_batch 4 --out f.pt --workdir w
(the same global batch as one process at batch 8), and as a run that the test kills with SIGKILL
once a checkpoint exists and then resumes (``--resume``). The saved file maps ``params`` (name ->
tensor), ``log`` (loss per step), ``world_size``, ``steps`` and ``released`` (steps the release ran
in backward; 0 without release).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
from tiny_models import TokenDataset, tiny_bert

from lion_hf import LionTrainer, LionTrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--per_device_batch", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--max_steps", type=int, default=6)
parser.add_argument("--release", type=int, default=1)
parser.add_argument("--grad_accum", type=int, default=1)
parser.add_argument("--lion_impl", default="cpp")
parser.add_argument("--model_dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--lion_state_dtype", default="fp32")
parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --workdir")
parser.add_argument("--step_sleep", type=float, default=0.0, help="seconds to wait after each step (a kill window)")
args = parser.parse_args()


class Sleep(TrainerCallback):
    def on_step_end(self, *_, **__):
        time.sleep(args.step_sleep)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    training_args = LionTrainingArguments(
        output_dir=args.workdir,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=100,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_grad_norm=0.0,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        lion_impl=args.lion_impl,
        lion_state_dtype=args.lion_state_dtype,
        lion_gradient_release=bool(args.release),
        disable_tqdm=True,
        logging_steps=1,
        dataloader_drop_last=True,
    )
model = tiny_bert()
if args.model_dtype == "bfloat16":
    model = model.to(torch.bfloat16)
trainer = LionTrainer(model=model, args=training_args, train_dataset=TokenDataset(),
                      callbacks=[Sleep()] if args.step_sleep else None)
trainer.train(resume_from_checkpoint=True if args.resume else None)
release = trainer.gradient_release
unwrapped = trainer.accelerator.unwrap_model(trainer.model)
print(f"world_size={trainer.accelerator.num_processes} steps={trainer.state.global_step} "
      f"released={0 if release is None else release.steps}", flush=True)
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    torch.save({
        "params": {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters()},
        "log": [e for e in trainer.state.log_history if "loss" in e],
        "world_size": trainer.accelerator.num_processes,
        "steps": trainer.state.global_step,
        "released": 0 if release is None else release.steps,
    }, args.out)
# Tear the process group down before exit: gloo aborting in a destructor made rank 1 exit with SIGABRT.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
