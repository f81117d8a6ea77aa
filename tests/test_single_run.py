"""One run of recipes/finetune_sentiment.py as a new user gets it: short unless asked, kept (model and tokenizer),
configs of its own, one final evaluation, the lr table; and lion_optimizers' schedule length."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import test_recipes
import torch
import yaml
from test_recipes import common_args, to_argv
from tiny_models import TokenDataset, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from lion_hf import lion_optimizers
from lion_hf.experiments import finetune, study
from lion_hf.experiments.arguments import (
    MEASURED_LEARNING_RATES,
    OFFLINE_DEFAULT_DATA,
    RecipeArgumentError,
    default_learning_rate,
    parse_single_run_args,
)

# The tiny encoder and sentences of the recipe tests (module-scoped fixtures, built once here too).
tiny_model_dir = test_recipes.tiny_model_dir
tiny_encoder_dir = test_recipes.tiny_encoder_dir
tiny_data_dir = test_recipes.tiny_data_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"


# ---------------------------------------------------------------- defaults: a run of minutes


def test_no_arguments_make_a_short_run_on_the_main_jobs_data(tmp_path):
    _, data_args, training_args, run_args = parse_single_run_args(["--output_dir", str(tmp_path / "r")])
    # HF's defaults would be 3 epochs at batch 8, a checkpoint every 500 steps with none ever deleted.
    assert training_args.num_train_epochs == 1 and training_args.per_device_train_batch_size == 32
    assert training_args.save_total_limit == 2 and training_args.eval_strategy == "steps"
    main_job = yaml.safe_load((CONFIGS / "offline_default.yaml").read_text())["common"]
    assert {k: getattr(data_args, k) for k in OFFLINE_DEFAULT_DATA} == {k: main_job[k] for k in OFFLINE_DEFAULT_DATA}
    assert training_args.per_device_train_batch_size == main_job["per_device_train_batch_size"]
    assert "the recipe's defaults for a run of minutes" in run_args.notes[0] and "max_train_samples 2400" in \
        run_args.notes[0]


def test_what_the_user_sets_wins_over_the_recipes_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"per_device_train_batch_size": 8, "num_train_epochs": 2}))
    _, data_args, training_args, run_args = parse_single_run_args(
        [str(config), "--num_train_epochs", "3", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "r")])
    assert training_args.per_device_train_batch_size == 8 and training_args.num_train_epochs == 3
    # Other data than the offline default: all of it, at HF's length.
    assert data_args.max_train_samples is None and data_args.max_eval_samples is None and data_args.max_length == 128
    assert "num_train_epochs" not in run_args.notes[0] and "save_total_limit 2" in run_args.notes[0]
    _, _, training_args, _ = parse_single_run_args(["--max_steps", "7", "--output_dir", str(tmp_path / "r")])
    assert training_args.max_steps == 7


# ---------------------------------------------------------------- configs: each script its own kind


def test_a_study_config_given_to_the_single_run_names_compare_optimizers_and_the_reverse(tmp_path):
    with pytest.raises(RecipeArgumentError, match=r"study config for recipes/compare_optimizers\.py .*run "
                                                  r"`python recipes/compare_optimizers\.py .*sst2_local\.yaml`"):
        parse_single_run_args([str(CONFIGS / "sst2_local.yaml")])
    with pytest.raises(RecipeArgumentError, match=r"one run's options for recipes/finetune_sentiment\.py: run "
                                                  r"`python recipes/finetune_sentiment\.py .*single_sst2_local"):
        study.load_config(CONFIGS / "single_sst2_local.yaml")


def test_the_shipped_single_run_configs_parse_as_one_run(tmp_path):
    configs = sorted(CONFIGS.glob("single_*.yaml"))
    assert configs
    for path in configs:
        _, data_args, training_args, _ = parse_single_run_args([str(path), "--output_dir", str(tmp_path / "r")])
        assert training_args.num_train_epochs >= 1 and data_args.max_train_samples is None, path
        assert (REPO / data_args.data_dir).is_dir() or not (REPO.parent / "shared").is_dir(), data_args.data_dir


# ---------------------------------------------------------------- a run is kept, evaluated once


class CountEvaluations(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def tiny_single_run(model_dir, data_dir, out, *extra) -> list[str]:
    args = {**common_args(model_dir, data_dir, out), "max_steps": 4, "eval_steps": 2, "save_strategy": "no",
            "max_eval_samples": 16}
    del args["num_train_epochs"]
    return to_argv(args) + ["--optim", "adamw", *extra]


def test_the_final_evaluation_runs_once(tiny_encoder_dir, tiny_data_dir, tmp_path):
    counter = CountEvaluations()
    parsed = parse_single_run_args(tiny_single_run(tiny_encoder_dir, tiny_data_dir, tmp_path / "r"))
    record = finetune.run(*parsed, extra_callbacks=[counter])
    assert counter.steps == [2, 4]  # HF evaluates at the last step; the run used to evaluate it again
    assert record.final_eval["eval_accuracy"] == record.history["eval"][-1]["eval_accuracy"]
    assert record.final_eval["eval_loss"] == record.history["eval"][-1]["eval_loss"]


def test_the_run_keeps_its_model_under_save_strategy_no_and_says_how_to_load_it(tiny_encoder_dir, tiny_data_dir,
                                                                                   tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, pipeline

    out = tmp_path / "r"
    finetune.main(tiny_single_run(tiny_encoder_dir, tiny_data_dir, out))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "run.json").is_file()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"[finetune] model and tokenizer saved in {out}: load with pipeline('text-classification', "
                    f"model='{out}') or AutoModelForSequenceClassification.from_pretrained('{out}')")
    trained = AutoModelForSequenceClassification.from_pretrained(out)
    start = tiny_bert().bert.state_dict()
    moved = [n for n, t in trained.bert.state_dict().items() if n in start and not torch.equal(t, start[n])]
    assert moved, "the saved weights are the trained ones, not the starting ones"
    answer = pipeline("text-classification", model=str(out))("a good film")
    assert answer[0]["label"] in trained.config.id2label.values() and 0.0 <= answer[0]["score"] <= 1.0


def test_a_lora_run_says_how_many_parameters_it_trains_and_saves_its_adapters(tiny_encoder_dir, tiny_data_dir,
                                                                               tmp_path, capsys):
    out = tmp_path / "lora"
    finetune.main(tiny_single_run(tiny_encoder_dir, tiny_data_dir, out, "--use_peft", "true", "--lora_r", "2"))
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("[finetune] LoRA: "))
    trainable, total = (int(n.replace(",", "")) for n in line.split()[2:7:4])
    assert 0 < trainable < total / 2 and total > sum(p.numel() for p in tiny_bert().parameters())
    assert (out / "adapter_config.json").is_file() and "AutoPeftModelForSequenceClassification" in printed


# ---------------------------------------------------------------- the lr table


def test_each_vote_defaults_to_its_row_of_the_table_twice_lions():
    for vote in ("majority", "average"):
        lr, why = default_learning_rate("lion", False, vote)
        assert lr == MEASURED_LEARNING_RATES[(f"lion_{vote}", False)] == 2 * MEASURED_LEARNING_RATES[("lion", False)]
        assert f"DistributedLion {vote}" in why and "docs/distributed_lion.md" in why
    assert default_learning_rate("lion", True, "majority")[0] == MEASURED_LEARNING_RATES[("lion", True)]
    assert default_learning_rate("lion_32bit", False, "majority")[0] == MEASURED_LEARNING_RATES[("lion", False)]


def test_one_process_with_a_vote_gets_lions_lr_since_it_trains_plain_lion(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, _, training_args, _ = parse_single_run_args(
        ["--lion_distributed", "majority", "--output_dir", str(tmp_path / "r")])
    assert training_args.learning_rate == MEASURED_LEARNING_RATES[("lion", False)]


# ---------------------------------------------------------------- lion_optimizers: the run's schedule length


def _steps_until_zero(scheduler, optimizer, limit=100) -> int:
    for step in range(1, limit):
        optimizer.step()
        scheduler.step()
        if scheduler.get_last_lr()[0] == 0.0:
            return step
    return limit


def test_lion_optimizers_takes_the_schedule_from_max_steps_or_the_dataset_as_the_trainer_counts(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=6, learning_rate=1e-3,
                             lr_scheduler_type="linear")
    optimizer, scheduler = lion_optimizers(tiny_bert(), args)
    assert _steps_until_zero(scheduler, optimizer) == 6
    for rows, batch, accumulation, epochs in ((50, 8, 3, 1.5),):  # 7 batches, 3 updates an epoch, 5 steps
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 num_train_epochs=epochs, lr_scheduler_type="linear", save_strategy="no")
        model, data = tiny_bert(), TokenDataset(n=rows)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizers=lion_optimizers(model, args, train_dataset=data))
        trainer.train()
        assert trainer.lr_scheduler.get_last_lr()[0] == 0.0, (rows, batch, accumulation, epochs)
        expected = math.ceil(epochs * math.ceil(math.ceil(rows / batch) / accumulation))
        assert trainer.state.global_step == trainer.state.max_steps == expected


def test_lion_optimizers_warns_when_the_given_length_disagrees_with_the_run(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=24)
    with pytest.warns(UserWarning, match=r"num_training_steps=1000 disagrees with args\.max_steps=24"):
        lion_optimizers(tiny_bert(), args, num_training_steps=1000)
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.warns(UserWarning, match=r"num_training_steps=5 disagrees with the 24 steps of 64 rows over 3 epochs"):
        lion_optimizers(tiny_bert(), plain, num_training_steps=5, train_dataset=TokenDataset(n=64))
    with pytest.raises(ValueError, match="needs the schedule's length"):
        lion_optimizers(tiny_bert(), plain)


def test_the_package_ships_py_typed():
    import tomllib

    import lion_hf

    assert (Path(lion_hf.__file__).parent / "py.typed").is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["lion_hf"]
