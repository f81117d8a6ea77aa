"""LionTrainer with lion_distributed on DDP (gloo, CPU): run by tests/test_distributed_lion.py as

    accelerate launch --multi_gpu --num_processes 2 tests/launchers/distributed_lion_train.py OUT WORKDIR

Two trainings of the tiny BERT, majority vote, batch 4 per rank, gradient accumulation 2, 4 optimizer
steps: "straight" (saving a checkpoint at step 2) and "resumed" (a new LionTrainer resumed from
that checkpoint). Each rank saves ``OUT/rank{r}.pt``: per run the final params and this rank's
momenta by name, the log history, each optimizer step's gathers (calls of
``torch.distributed.all_gather_single``) and every Python-level collective; for the straight run
also the classifier's gradient at step 1 and the same gradient recomputed here from the rank's
own micro-batches (its local mean loss), and the optimizer's class.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_lion_checks import Recorder
from tiny_models import TokenDataset, tiny_bert

from lion_hf import LionTrainer, LionTrainingArguments
from lion_hf.trainer import unwrap_optimizer

out_dir, workdir = sys.argv[1], sys.argv[2]
ACCUMULATE, STEPS = 2, 4


class Probe(TrainerCallback):
    def __init__(self, recorder):
        self.recorder, self.gathers, self.grads, self._before = recorder, [], [], 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = len(self.recorder.calls)
        self.grads.append(model.classifier.weight.grad.detach().clone())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.gathers.append(self.recorder.calls[self._before:])


class RecordingTrainer(LionTrainer):
    """Keeps the inputs of the first optimizer step's micro-batches."""

    inputs: list

    def training_step(self, model, inputs, *args, **kwargs):
        if len(self.inputs) < ACCUMULATE:
            self.inputs.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


def train(name: str, resume: str | None = None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = LionTrainingArguments(
            output_dir=f"{workdir}/{name}", per_device_train_batch_size=4, gradient_accumulation_steps=ACCUMULATE,
            max_steps=STEPS, learning_rate=1e-3, weight_decay=0.1, lion_distributed="majority", lion_impl="foreach",
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            logging_steps=1, dataloader_drop_last=True,
        )
    with Recorder() as recorder:
        probe = Probe(recorder)
        trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=TokenDataset(), callbacks=[probe])
        trainer.inputs = []
        trainer.train(resume_from_checkpoint=resume)
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = unwrap_optimizer(trainer.optimizer)
    names = {p: n for n, p in model.named_parameters()}
    record = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "momenta": {names[p]: s["exp_avg"].clone() for p, s in optimizer.state.items()},
        "log": [e for e in trainer.state.log_history if "loss" in e],
        "gathers": probe.gathers,
        "collectives": [name for name, _ in recorder.calls],
        "grads": probe.grads,
        "optimizer": type(optimizer).__name__,
        "average_tokens_across_devices": trainer.args.average_tokens_across_devices,
        "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
        "global_step": trainer.state.global_step,
    }
    if resume is None:
        # The rank's own mean-loss gradient of step 1, from the same start and its micro-batches.
        reference = tiny_bert()
        reference.train()
        for inputs in trainer.inputs:
            (reference(**inputs).loss / ACCUMULATE).backward()
        record["reference_grad"] = reference.classifier.weight.grad.detach().clone()
    return record


def own_optimizer() -> str:
    """lion_distributed with an optimizer of the user's own: DDP's all-reduce must not be turned
    off under it (the replicas would drift apart); the ValueError's text, or "trained"."""
    from lion_hf import Lion

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = LionTrainingArguments(output_dir=f"{workdir}/own", per_device_train_batch_size=4, max_steps=1,
                                     lion_distributed="majority", save_strategy="no", report_to=[], use_cpu=True,
                                     disable_tqdm=True)
        model = tiny_bert()
        trainer = LionTrainer(model=model, args=args, train_dataset=TokenDataset(),
                              optimizers=(Lion(model.parameters(), lr=1e-3), None))
        try:
            trainer.train()
        except ValueError as exc:
            return str(exc)
    return "trained"


records = {"straight": train("straight")}
records["resumed"] = train("resumed", resume=f"{workdir}/straight/checkpoint-2")
records["own_optimizer"] = own_optimizer()
records["rank"], records["world_size"] = dist.get_rank(), dist.get_world_size()
torch.save(records, f"{out_dir}/rank{dist.get_rank()}.pt")
print(f"world_size={dist.get_world_size()} done", flush=True)
dist.barrier()
dist.destroy_process_group()
