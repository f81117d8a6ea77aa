"""LionTrainer, LionTrainingArguments and the factories on a tiny BERT built from a config (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import TokenDataset, tiny_bert  # tests/ is on sys.path under pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from lion_hf import (
    Lion,
    LionTrainer,
    LionTrainingArguments,
    lion_optimizer_cls_and_kwargs,
    lion_optimizers,
    scale_from_adamw,
)


def lion_args(tmp_path, **overrides) -> LionTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
        weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        lion_impl="foreach", disable_tqdm=True,
    )
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "looks like AdamW" lr warning is tested on its own
        return LionTrainingArguments(**base)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lion_trainer_builds_lion_with_hf_groups_and_trains(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    trainer = LionTrainer(model=model, args=lion_args(tmp_path, num_train_epochs=3), train_dataset=TokenDataset())
    opt = trainer.create_optimizer()
    assert isinstance(opt, Lion)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.99) and decayed["lr"] == 1e-3
    assert all(p.ndim >= 2 and "LayerNorm" not in names[id(p)] for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} == {
        n for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n
    }
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    assert result.training_loss < 0.69
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "pooler" not in n)


def test_lion_trainer_with_an_hf_optim_name_builds_hf_optimizer(tmp_path):
    trainer = LionTrainer(
        model=tiny_bert(), args=lion_args(tmp_path, optim="adamw_torch"), train_dataset=TokenDataset()
    )
    assert isinstance(trainer.create_optimizer(), torch.optim.AdamW)


def test_optimizers_factory_with_plain_trainer(tmp_path):
    model = tiny_bert()
    args = lion_args(tmp_path, warmup_steps=4, lr_scheduler_type="linear", num_train_epochs=2)
    dataset = TokenDataset()
    optimizer, scheduler = lion_optimizers(model, args, num_training_steps=16)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, scheduler))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] < lrs[3] < lrs[4] and lrs[4] == pytest.approx(1e-3) and lrs[-1] < lrs[4], lrs


def test_optimizer_cls_and_kwargs_weight_decay_reaches_lion(tmp_path):
    args = lion_args(tmp_path, weight_decay=0.0)
    # The trap: with a plain (Lion, kwargs) pair HF's groups override the kwargs' weight decay.
    trapped = Trainer(model=tiny_bert(), args=args, optimizer_cls_and_kwargs=(Lion, {"lr": 1e-3, "weight_decay": 0.3}))
    assert [g["weight_decay"] for g in trapped.create_optimizer().param_groups] == [0.0, 0.0]
    trainer = Trainer(
        model=tiny_bert(), args=args, train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(lr=1e-3, weight_decay=0.3, impl="foreach"),
    )
    opt = trainer.create_optimizer()
    assert isinstance(opt, Lion)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    trainer.train()
    with pytest.raises(ValueError, match="weight_decay"):
        lion_optimizer_cls_and_kwargs(lr=1e-4, weight_decay=-1.0)
    with pytest.raises(ValueError, match="unknown Lion arguments"):
        lion_optimizer_cls_and_kwargs(eps=1e-8)
    with pytest.raises(ValueError, match="lr is required"):
        lion_optimizer_cls_and_kwargs(weight_decay=0.1)
    with pytest.raises(ValueError, match="impl must be one of"):
        lion_optimizer_cls_and_kwargs(lr=1e-4, impl="fast")
    with pytest.raises(ValueError, match="nonfinite_grad must be one of"):
        lion_optimizer_cls_and_kwargs(lr=1e-4, nonfinite_grad="ignore")


def test_lora_trains_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    before = params_of(model)
    trainer = LionTrainer(model=model, args=lion_args(tmp_path), train_dataset=TokenDataset())
    trainer.train()
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert opt_params == trainable
    for name, p in model.named_parameters():
        if p.requires_grad:
            if "lora_B" in name or "classifier" in name:
                assert not torch.equal(before[name], p), f"{name} did not train"
        else:
            assert torch.equal(before[name], p), f"frozen {name} changed"


def _train(tmp_path, model, **overrides):
    trainer = LionTrainer(model=model, args=lion_args(tmp_path, **overrides), train_dataset=TokenDataset())
    trainer.train()
    return trainer


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    # Tolerance: the accumulated gradient differs from the big-batch one by float rounding,
    # which can flip sign(c) where c is ~0 (rarely seen embedding rows); a flip then persists
    # through the momentum. Allow it on at most 2% of the model's elements.
    big = _train(tmp_path / "a", tiny_bert(), per_device_train_batch_size=16, learning_rate=1e-3)
    acc = _train(tmp_path / "b", tiny_bert(), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                 learning_rate=1e-3)
    off = total = 0
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        off += int(((p - q).abs() > 1e-5).sum())
        total += p.numel()
    assert off <= 0.02 * total, f"{off} of {total} elements differ"


def test_warmup_schedule_and_bf16_autocast_on_cpu(tmp_path):
    trainer = _train(tmp_path, tiny_bert(), bf16=True, warmup_steps=3, lr_scheduler_type="linear", num_train_epochs=2)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] < lrs[1] < lrs[2], lrs
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_checkpoint_resume_is_exact(tmp_path):
    # Run A trains 16 steps straight and saves at step 8; run B starts from another init, resumes
    # from that checkpoint and trains to 16. Resume restores params, Lion's momentum, the
    # scheduler and the data order, so B must end where A did (CPU, deterministic; 1e-6 absolute).
    kw = dict(num_train_epochs=2, lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps", save_steps=8)
    straight = _train(tmp_path, tiny_bert(), **kw)
    checkpoint = tmp_path / "out" / "checkpoint-8"
    saved_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert len(saved_state) > 0 and all("exp_avg" in s for s in saved_state.values())

    resumed = LionTrainer(model=tiny_bert(seed=1), args=lion_args(tmp_path / "b", **kw), train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == straight.state.global_step == 16
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(straight.optimizer.state[p]["exp_avg"], resumed.optimizer.state[q]["exp_avg"],
                                   rtol=0, atol=1e-6)


def test_training_args_validation_and_adamw_warning(tmp_path):
    with pytest.raises(ValueError, match="lion_beta2"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_beta2=1.0)
    with pytest.raises(ValueError, match="lion_impl"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_impl="fast")
    with pytest.raises(ValueError, match="lion_state_dtype"):
        LionTrainingArguments(output_dir=str(tmp_path), lion_state_dtype="fp16")
    with pytest.warns(UserWarning, match="looks like an AdamW value"):
        args = LionTrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, report_to=[])
    assert args.learning_rate == 2e-4, "a value the user set must never change"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LionTrainingArguments(output_dir=str(tmp_path), report_to=[])  # Lion defaults: no warning
        for lr in (5e-5, 1e-4):  # Lion's measured best full fine-tuning lrs: no warning either
            LionTrainingArguments(output_dir=str(tmp_path), learning_rate=lr, report_to=[])
    assert LionTrainingArguments(output_dir=str(tmp_path), report_to=[]).lion_kwargs()["betas"] == (0.9, 0.99)


def test_scale_from_adamw_keeps_effective_decay():
    lr, wd = scale_from_adamw(6e-5, 0.01, factor=3)
    assert lr == pytest.approx(2e-5) and wd == pytest.approx(0.03)
    assert lr * wd == pytest.approx(6e-5 * 0.01)
    with pytest.raises(ValueError):
        scale_from_adamw(-1.0, 0.0)


def test_plain_training_arguments_get_lion_betas_not_adams(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.2, report_to=[], use_cpu=True)
    opt = LionTrainer(model=tiny_bert(), args=args, train_dataset=TokenDataset()).create_optimizer()
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.param_groups[0]["weight_decay"] == 0.2


def test_nan_gradient_skips_the_step_and_is_logged(tmp_path):
    model = tiny_bert()
    poison = {"on": False}
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)

    class PoisonStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            poison["on"] = state.global_step == 3

    trainer = LionTrainer(model=model, args=lion_args(tmp_path, lion_nonfinite_grad="skip_step", max_grad_norm=0.0),
                          train_dataset=TokenDataset(), callbacks=[PoisonStep3()])
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer).skipped_steps == 1
    logged = [h.get("lion_skipped_steps") for h in trainer.state.log_history if "loss" in h]
    assert logged[:3] == [None, None, None] and logged[3:] == [1] * (len(logged) - 3), logged
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_policy_follows_gradient_clipping(tmp_path):
    assert lion_args(tmp_path).lion_nonfinite_grad == "skip_step"  # HF clips by default (max_grad_norm 1.0)
    assert lion_args(tmp_path, max_grad_norm=0.0).lion_nonfinite_grad == "skip_elements"
    with pytest.warns(UserWarning, match="gradient clipping"):
        LionTrainingArguments(output_dir=str(tmp_path), report_to=[], lion_nonfinite_grad="skip_elements")
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    opt, _ = lion_optimizers(tiny_bert(), plain, num_training_steps=10)
    assert opt.nonfinite_grad == "skip_step"


def test_inf_gradient_under_default_clipping_leaves_weights_untouched(tmp_path):
    # Clipping turns one inf element into NaN there and zero gradients elsewhere; a Lion step on
    # those would still move every weight (momentum and weight decay). The default skips it.
    model = tiny_bert()
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    snapshots = {}

    def poison(grad):
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    class PoisonStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                snapshots["before"] = params_of(model)
                snapshots["hook"] = weight.register_hook(poison)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                snapshots["after"] = params_of(model)
                snapshots["hook"].remove()

    args = lion_args(tmp_path, max_steps=4)
    assert args.max_grad_norm > 0
    trainer = LionTrainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[PoisonStep2()])
    trainer.train()
    assert trainer.optimizer.optimizer.skipped_steps == 1
    assert all(torch.equal(snapshots["before"][n], snapshots["after"][n]) for n in snapshots["before"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lion_trainer_hands_hf_grad_norm_to_lion_so_skip_step_reads_no_gradient(tmp_path, monkeypatch):
    """The default under clipping (skip_step) takes its verdict from the norm HF already
    computed: no extra pass over the gradients, and a poisoned step is still skipped."""
    from lion_hf.optim import numerics

    def no_scan(*args, **kwargs):
        raise AssertionError("skip_step read the gradients although HF's grad norm was handed over")

    monkeypatch.setattr(numerics, "all_finite", no_scan)
    model = tiny_bert()
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    poison = {"on": False}
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)

    class PoisonStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            poison["on"] = state.global_step == 2

    for max_grad_norm in (1.0, 0.0):  # HF computes the norm for its log even without clipping
        args = lion_args(tmp_path, max_steps=4, max_grad_norm=max_grad_norm, lion_nonfinite_grad="skip_step")
        trainer = LionTrainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[PoisonStep2()])
        trainer.train()
        assert trainer.optimizer.optimizer.skipped_steps == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_pure_bf16_checkpoint_resume_is_exact(tmp_path, rounding):
    """bf16 weights, gradients and momentum, no fp32 copy: resuming from a checkpoint ends bit for
    bit where the uninterrupted run did. The Kahan residual is in optimizer.pt; stochastic
    rounding draws from torch's generator, whose state HF saves (rng_state.pth) and restores."""
    kw = dict(num_train_epochs=2, lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps", save_steps=8,
              lion_state_dtype="bf16", lion_param_rounding=rounding)
    straight = _train(tmp_path, tiny_bert().to(torch.bfloat16), **kw)
    checkpoint = tmp_path / "out" / "checkpoint-8"
    saved_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert all(("kahan_comp" in s) == (rounding == "kahan") for s in saved_state.values())

    resumed = LionTrainer(model=tiny_bert(seed=1).to(torch.bfloat16), args=lion_args(tmp_path / "b", **kw),
                          train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == straight.state.global_step == 16
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        for key, value in straight.optimizer.state[p].items():
            assert torch.equal(value, resumed.optimizer.state[q][key]), key


def test_unknown_optim_names_lion_in_the_error_and_dir_lists_lazy_exports(tmp_path):
    import lion_hf

    with pytest.raises(ValueError, match="'lionn' is not an optimizer name; use 'lion'"):
        LionTrainingArguments(output_dir=str(tmp_path), optim="lionn", report_to=[])
    assert {"LionTrainer", "LionTrainingArguments", "lion_optimizers", "Lion"} <= set(dir(lion_hf))


def test_lion_is_built_through_hfs_optimizer_path(tmp_path):
    args = LionTrainingArguments(output_dir=str(tmp_path), learning_rate=3e-5, weight_decay=0.1, lion_beta2=0.95,
                                 report_to=[])
    cls, kwargs = LionTrainer.get_optimizer_cls_and_kwargs(args)
    assert cls is Lion and kwargs["betas"] == (0.9, 0.95) and kwargs["lr"] == 3e-5
    adamw = LionTrainingArguments(output_dir=str(tmp_path), optim="adamw", report_to=[])
    assert LionTrainer.get_optimizer_cls_and_kwargs(adamw)[0] is torch.optim.AdamW

    class NoDecayOnEmbeddings(LionTrainer):  # a subclass's own decay rule still reaches Lion
        def get_decay_parameter_names(self, model):
            return [n for n in super().get_decay_parameter_names(model) if "embeddings" not in n]

    model = tiny_bert()
    trainer = NoDecayOnEmbeddings(model=model, args=args, train_dataset=TokenDataset())
    opt = trainer.create_optimizer()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and not any("embeddings" in n for n in names)
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in names)

    frozen = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        LionTrainer(model=frozen, args=args, train_dataset=TokenDataset()).create_optimizer()
