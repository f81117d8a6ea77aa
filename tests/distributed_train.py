"""Train the tiny BERT with LionTrainer; rank 0 saves the final parameters.

Run by tests/test_distributed.py, once as a single process and once as
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_train.py --per_device_batch 4 --out f.pt --workdir w
with the same global batch, to show that DDP (gloo) trains the same model.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TokenDataset, tiny_bert  # noqa: E402

from lion_hf import LionTrainer, LionTrainingArguments  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--per_device_batch", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--max_steps", type=int, default=-1)
args = parser.parse_args()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    training_args = LionTrainingArguments(
        output_dir=args.workdir, per_device_train_batch_size=args.per_device_batch, num_train_epochs=2,
        learning_rate=1e-3, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        lion_impl="foreach", disable_tqdm=True, logging_steps=1, dataloader_drop_last=True, max_steps=args.max_steps,
    )
trainer = LionTrainer(model=tiny_bert(), args=training_args, train_dataset=TokenDataset())
trainer.train()
if trainer.accelerator.is_main_process:
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, args.out)
    print(f"world_size={trainer.accelerator.num_processes} steps={trainer.state.global_step}")
# Tear the process group down before exit: gloo aborting in a destructor made rank 1 exit with SIGABRT.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
