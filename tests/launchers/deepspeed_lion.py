"""Lion under DeepSpeed ZeRO-2/3 on CPU (gloo), and the same training in one plain process.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        --mixed_precision no tests/launchers/deepspeed_lion.py --out ds.pt --workdir w
    python tests/launchers/deepspeed_lion.py --out one.pt --workdir w1        # the one-process reference

LionTrainer trains the tiny BERT for 4 steps of global batch 8 (weight decay 0.5); under
DeepSpeed the process state is started on gloo by the recipe's own helper
(``lion_hf.experiments.arguments.start_deepspeed_on_cpu``). The lr is constant because the two runs treat
the schedule differently at a skipped step: DeepSpeed's engine does not advance it, HF does when
Lion skips. Two steps are rigged, identically in both runs:

* step 1: every gradient is zero (loss * 0). With zero momentum Lion's update sign(0) is 0, so
  the step only decays: each decayed weight becomes w * (1 - lr * wd), every other weight stays
  bit for bit. That shows, on values, which weights ZeRO's flat partitions decayed.
* step 3: one gradient element is NaN on the last rank only (the first element of the word
  embeddings, which lies in rank 0's partition), so the ranks' own partitions disagree; every
  rank must skip the step.

A checkpoint is written at step 2; under DeepSpeed a second trainer then resumes from it and
trains to step 4. Rank 0 saves what tests/test_distributed.py checks: parameters (gathered
under ZeRO-3) at the start and after every step, the resumed run's parameters, the wrapper
chain, what every Lion.step() call saw, per-rank partition sizes and the per-rank verdicts of
the NaN step.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tiny_models
from tiny_models import TokenDataset, tiny_bert  # noqa: E402

from lion_hf import Lion, LionTrainer, LionTrainingArguments  # noqa: E402
from lion_hf.trainer import unwrap_optimizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--workdir", required=True)
parser.add_argument("--no_resume", action="store_true", help="skip the resume-from-step-2 run")
args = parser.parse_args()

GLOBAL_BATCH, MAX_STEPS, SAVE_STEP, ZERO_STEP, NAN_STEP = 8, 4, 2, 1, 3
LR, WD = 1e-3, 0.5
USE_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
NAN_PARAM = "bert.embeddings.word_embeddings.weight"

if USE_DEEPSPEED:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute on 2 cores
    # the first time) that serves only its inference all-reduce; training communicates through
    # torch.distributed. This script skips the build; the recipe tests (slow) keep it.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from lion_hf.experiments.arguments import start_deepspeed_on_cpu

    # The recipe's own helper: accelerate's process state on gloo, handed to TrainingArguments.
    values: dict = {}
    if not start_deepspeed_on_cpu(values) or values != {"accelerator_config": {"use_configured_state": True}}:
        raise SystemExit(f"start_deepspeed_on_cpu did not start DeepSpeed on CPU: {values}")
    accelerator_config = values["accelerator_config"]
else:
    accelerator_config = None


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the model defines it (gathered from ZeRO-3's partitions; collective there)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def gather(obj):
    out = [None] * world()[1]
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    else:
        out[0] = obj
    return out


class RiggedTrainer(LionTrainer):
    """Zero gradients at ZERO_STEP; a NaN in one gradient element on the last rank at NAN_STEP."""

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        if self.state.global_step + 1 == ZERO_STEP:
            loss = loss * 0.0
        return loss

    def training_step(self, model, inputs, *a, **kw):
        hook = None
        rank, size = world()
        if self.state.global_step + 1 == NAN_STEP and rank == size - 1:
            param = dict(self.accelerator.unwrap_model(self.model).named_parameters())[NAN_PARAM]

            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad

            hook = param.register_hook(poison)
        try:
            return super().training_step(model, inputs, *a, **kw)
        finally:
            if hook is not None:
                hook.remove()


class Recorder(TrainerCallback):
    """Parameters after every step; what Lion.step() saw; the per-rank verdicts of the NaN step."""

    def __init__(self, trainer: LionTrainer) -> None:
        self.trainer = trainer
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.calls: list[dict] = []
        self.between_steps: list[list[int]] = []
        self.nan_step: dict = {}
        self._lion_before: list[torch.Tensor] | None = None

    def lion(self) -> Lion:
        return unwrap_optimizer(self.trainer.optimizer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = full_params(self.trainer.accelerator.unwrap_model(self.trainer.model))
        lion = self.lion()
        step, calls = lion.step, self.calls

        def spy(*a, **kw):
            calls.append(
                {
                    "global_step": self.trainer.state.global_step + 1,
                    "groups": [[(p.dim(), p.numel(), str(p.dtype)) for p in g["params"]] for g in lion.param_groups],
                    "weight_decay": [g["weight_decay"] for g in lion.param_groups],
                }
            )
            return step(*a, **kw)

        lion.step = spy

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == NAN_STEP:
            lion = self.lion()
            self._lion_before = [t.detach().clone() for s in lion.state.values() for t in s.values()]
            self._lion_before += [p.detach().clone() for p in lion.state]  # the partitions Lion owns

    def on_step_end(self, args, state, control, **kwargs):
        lion = self.lion()
        self.between_steps.append([len(g["params"]) for g in lion.param_groups])
        self.snapshots[state.global_step] = full_params(self.trainer.accelerator.unwrap_model(self.trainer.model))
        if state.global_step == NAN_STEP:
            after = [t.detach() for s in lion.state.values() for t in s.values()] + [p.detach() for p in lion.state]
            unchanged = len(after) == len(self._lion_before) and all(
                torch.equal(a, b) for a, b in zip(after, self._lion_before)
            )
            engine = self.trainer.model_wrapped
            self.nan_step = {
                "lion_state_and_partition_unchanged": gather(unchanged),
                "lion_skipped_steps": gather(lion.skipped_steps),
                "engine_skipped_steps": gather(getattr(engine, "skipped_steps", None)),
            }


def owns_nan_element(engine, param: torch.nn.Parameter) -> bool | None:
    """Whether this rank's ZeRO partition holds element 0 of ``param`` (None: not under ZeRO)."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3 splits every parameter evenly, in rank order
        return world()[0] * param.ds_tensor.ds_numel == 0
    zero = getattr(engine, "optimizer", None)
    for i, params in enumerate(getattr(zero, "params_in_partition", None) or []):  # ZeRO-1/2
        for j, p in enumerate(params):
            if p is param:
                return j > 0 or zero.first_offset[i] == 0
    return False if hasattr(zero, "params_in_partition") else None


def build(output_dir: str) -> tuple[RiggedTrainer, Recorder]:
    world_size = world()[1] if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_args = LionTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            max_steps=MAX_STEPS,
            learning_rate=LR,
            weight_decay=WD,
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=SAVE_STEP,
            save_only_model=False,
            report_to=[],
            seed=0,
            lion_impl="foreach",
            disable_tqdm=True,
            logging_steps=1,
            dataloader_drop_last=True,
            accelerator_config=accelerator_config,
            use_cpu=not USE_DEEPSPEED,
        )
    trainer = RiggedTrainer(model=tiny_bert(), args=training_args, train_dataset=TokenDataset())
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    return trainer, recorder


trainer, recorder = build(f"{args.workdir}/run")
trainer.train()
rank, size = world()
lion = unwrap_optimizer(trainer.optimizer)
chain, opt = [], trainer.optimizer
while opt is not None and len(chain) < 8:
    chain.append(type(opt).__name__)
    opt = getattr(opt, "optimizer", None)
model = trainer.accelerator.unwrap_model(trainer.model)
decay_names = sorted(trainer.get_decay_parameter_names(model))
engine = trainer.model_wrapped
record = {
    "world_size": size,
    "distributed_type": str(trainer.accelerator.distributed_type),
    "engine": type(engine).__name__,
    "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
    "optimizer_chain": chain,
    "lion_is_inner": isinstance(lion, Lion) and getattr(getattr(engine, "optimizer", None), "optimizer", None) is lion,
    "calls_per_rank": gather(recorder.calls),
    "between_steps": recorder.between_steps,
    "snapshots": recorder.snapshots,
    "nan_step": recorder.nan_step,
    "nan_rank": size - 1,
    "nan_element_owner": gather(owns_nan_element(engine, dict(model.named_parameters())[NAN_PARAM])),
    "log": [e for e in trainer.state.log_history if "loss" in e],
    "decay_names": decay_names,
    "lr": LR,
    "weight_decay": WD,
    "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
}
print(f"rank={rank} world_size={size} engine={record['engine']} stage={record['zero_stage']} chain={chain}", flush=True)

if not args.no_resume:
    # A fresh trainer (fresh model, Lion and DeepSpeed engine) resumes from the step-2 checkpoint
    # of the run above. accelerate refuses a second DeepSpeed Accelerator in one process; dropping
    # its accelerator state (the process state stays) gives the new one what a new process gets.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    checkpoint = Path(args.workdir) / "run" / f"checkpoint-{SAVE_STEP}"
    resumed, _ = build(f"{args.workdir}/run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    record["resumed_final"] = full_params(resumed.accelerator.unwrap_model(resumed.model))
    record["resumed_steps"] = resumed.state.global_step
    record["resumed_log"] = [e for e in resumed.state.log_history if "loss" in e]

if rank == 0:
    torch.save(record, args.out)
    print(f"saved {args.out}", flush=True)
if dist.is_initialized():
    from lion_hf.experiments.finetune import end_process_group

    end_process_group()
