"""The recipes' command lines and configs, parsed (lion_hf.experiments.arguments, .study): every HF spelling, nothing
else; configs checked like the command line; the defaults settled after parsing; what a study refuses; --help.
Nothing here trains."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lion_hf.experiments import arguments, study
from lion_hf.experiments.arguments import RecipeArgumentError, format_lr, parse_recipe_args
from lion_hf.training_args import AdamWLikeLearningRateWarning, LionTrainingArguments, scale_from_adamw

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "recipes" / "configs" / "offline_default.yaml"


@pytest.mark.parametrize("argv", [
    ["--output_dir", "mine"], ["--output-dir", "mine"], ["--output_dir=mine"], ["--output-dir=mine"],
])
def test_every_spelling_hf_accepts_sets_the_output_dir(argv):
    _, _, training_args, _ = parse_recipe_args(["--optim", "adamw", *argv])
    assert training_args.output_dir == "mine"


def test_a_config_takes_dashed_keys_too_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output-dir: from_file\nlearning_rate: 1e-4\noptim: adamw\nuse_peft: true\n")
    _, _, training_args, _ = parse_recipe_args([str(config)])
    # "1e-4" is a string to YAML: converted as the command line converts it.
    assert training_args.output_dir == "from_file" and training_args.learning_rate == 1e-4
    model_args, _, training_args, _ = parse_recipe_args([str(config), "--output_dir", "cli", "--use_peft", "false"])
    assert training_args.output_dir == "cli" and model_args.use_peft is False


def test_abbreviations_and_unknown_names_are_errors_naming_them(tmp_path):
    with pytest.raises(RecipeArgumentError, match=r"unknown argument --output_d \(did you mean --output_dir[ )]"):
        parse_recipe_args(["--output_d", "x"])
    with pytest.raises(RecipeArgumentError, match=r"--lerning_rate \(did you mean --learning_rate[ )?]"):
        parse_recipe_args(["--lerning_rate=1e-4"])
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(RecipeArgumentError, match=r"typo\.yaml: unknown argument 'learning_rat' \(did you mean "
                                                  r"learning_rate[ )?]"):
        parse_recipe_args([str(config)])
    with pytest.raises(RecipeArgumentError, match="unexpected argument stray"):
        parse_recipe_args(["--optim", "adamw", "stray"])


def test_config_values_are_checked_as_on_the_command_line(tmp_path):
    config = tmp_path / "bad.yaml"
    for text, message in (("learning_rate: fast\n", r"learning_rate: 'fast' is not a valid value"),
                          ("eval_strategy: sometimes\n", r"eval_strategy: 'sometimes' is not one of"),
                          ("- a list\n", "expected a mapping"),
                          ("output_dir: a\noutput-dir: b\n", "output_dir is given twice")):
        config.write_text(text)
        with pytest.raises(RecipeArgumentError, match=message):
            parse_recipe_args([str(config)])


def test_the_command_line_is_never_rewritten(monkeypatch):
    argv = ["--optim", "adamw", "--output-dir", "x"]
    monkeypatch.setattr(sys, "argv", ["finetune_sentiment.py", *argv])
    parse_recipe_args()
    parse_recipe_args(argv)
    assert sys.argv == ["finetune_sentiment.py", *argv] and argv == ["--optim", "adamw", "--output-dir", "x"]


@pytest.mark.parametrize(("optim", "peft", "lr"), [
    ("lion", False, 5e-5), ("adamw", False, 1e-4), ("lion", True, 1e-3), ("adamw", True, 2e-3),
    ("adamw_torch", False, 1e-4), ("lion_32bit", True, 1e-3), ("sgd", False, 5e-5),
])
def test_measured_lr_default_per_optimizer_and_mode_is_stated(optim, peft, lr):
    with warnings.catch_warnings():
        # The LoRA default for Lion (1e-3) is large on purpose: the "AdamW-like lr" warning must not fire on it.
        warnings.simplefilter("error", AdamWLikeLearningRateWarning)
        _, _, training_args, run_args = parse_recipe_args(["--optim", optim, "--use_peft", str(peft),
                                                           "--output_dir", "x"])
    assert training_args.learning_rate == lr
    assert any(note.startswith(f"learning_rate {format_lr(lr)}:") for note in run_args.notes), run_args.notes
    _, _, training_args, run_args = parse_recipe_args(["--optim", optim, "--learning_rate", "3e-5",
                                                       "--output_dir", "x"])
    assert training_args.learning_rate == 3e-5 and not any("learning_rate" in n for n in run_args.notes)


def test_a_run_without_output_dir_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, first, run_args = parse_recipe_args(["--optim", "adamw"])
    assert Path(first.output_dir).parent == Path(arguments.DEFAULT_OUTPUT_ROOT)
    assert any("a new folder for this run" in n for n in run_args.notes)
    Path(first.output_dir).mkdir(parents=True)  # the first run has started (same second or not)
    _, _, second, _ = parse_recipe_args(["--optim", "adamw"])
    assert second.output_dir != first.output_dir and not Path(second.output_dir).exists()
    (Path(first.output_dir) / "checkpoint-4").mkdir()
    with pytest.raises(RecipeArgumentError, match=rf"--output_dir {first.output_dir}"):
        parse_recipe_args(["--resume_from_checkpoint", "true"])


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)


def test_without_an_accelerator_use_cpu_defaults_to_true(no_accelerator):
    _, _, training_args, _ = parse_recipe_args(["--output_dir", "x"])
    assert training_args.use_cpu is True and training_args.dataloader_pin_memory is False
    assert training_args.ddp_find_unused_parameters is False


def test_several_cpu_processes_that_could_not_form_one_job_are_errors_naming_the_fix(no_accelerator, monkeypatch):
    # What torchrun / `accelerate launch --multi_gpu` set for each of 2 processes (checked before any process group).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RecipeArgumentError, match=r"independent copies.*Drop --use_cpu false"):
        parse_recipe_args(["--output_dir", "x", "--use_cpu", "false"])
    with pytest.raises(RecipeArgumentError, match=r"--ddp_backend nccl needs GPUs.*--ddp_backend gloo"):
        parse_recipe_args(["--output_dir", "x", "--ddp_backend", "nccl"])


def test_deepspeed_on_cpu_starts_gloo_and_merges_the_accelerator_config(no_accelerator, monkeypatch, tmp_path):
    import accelerate

    started = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: started.append(kwargs))
    values = {"accelerator_config": None}
    assert arguments.start_deepspeed_on_cpu(values) is False and not started  # not under DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    file = tmp_path / "accelerator.json"
    file.write_text('{"split_batches": false}')
    for given in ('{"split_batches": false}', str(file), {"split_batches": False}):
        values = {"accelerator_config": given}
        assert arguments.start_deepspeed_on_cpu(values) is True
        assert values["accelerator_config"] == {"split_batches": False, "use_configured_state": True}
    values = {"accelerator_config": None}
    arguments.start_deepspeed_on_cpu(values)
    assert values["accelerator_config"] == {"use_configured_state": True} and started == [{"backend": "gloo"}] * 4
    with pytest.raises(RecipeArgumentError, match="neither a JSON mapping nor a JSON file"):
        arguments.start_deepspeed_on_cpu({"accelerator_config": str(tmp_path / "missing.json")})
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # a GPU: accelerate's own path
    assert arguments.start_deepspeed_on_cpu({"accelerator_config": None}) is False and len(started) == 5


def test_help_shows_the_recipes_and_lions_options_first_with_examples(capsys):
    from lion_hf.experiments import finetune

    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--help"], description=(REPO / "recipes" / "finetune_sentiment.py").read_text().split('"""')[1])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 140, len(lines)  # HF's full help is ~770 lines (--help_all); every lion_ option is shown
    hf_part = next(i for i, line in enumerate(lines) if line.startswith("common Hugging Face"))
    own = [f.name for dtype in (arguments.ModelArguments, arguments.DataArguments, arguments.RunArguments)
           for f in __import__("dataclasses").fields(dtype) if f.init]
    own += [name for name in vars(LionTrainingArguments)["__annotations__"]]
    first_screen = "\n".join(lines[:hf_part])
    for name in own:
        assert f"--{name} " in first_screen, name
    assert "examples:" in first_screen and "accelerate launch" in first_screen
    with pytest.raises(SystemExit):
        finetune.main(["--help_all"])
    assert len(capsys.readouterr().out.splitlines()) > 500


@pytest.mark.parametrize(("argv", "message"), [
    (["--lion_state_dtype", "int4"], "lion_state_dtype must be one of ('fp32', 'bf16', 'int8'), got 'int4'"),
    (["--lion_gradient_release", "true", "--lion_distributed", "majority"],
     "lion_gradient_release=True cannot run with lion_distributed='majority'"),
])
def test_values_the_arguments_dataclasses_refuse_are_one_line_errors_of_the_script(argv, message, monkeypatch,
                                                                                  capsys, tmp_path):
    from lion_hf.experiments import finetune

    with pytest.raises(RecipeArgumentError) as error:
        parse_recipe_args([*argv, "--output_dir", str(tmp_path / "run")])
    assert message in str(error.value)
    monkeypatch.setattr(sys, "argv", ["finetune_sentiment.py", *argv, "--output_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        finetune.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_data_that_is_not_there_or_does_not_fit_is_a_one_line_error_of_the_script(monkeypatch, capsys, tmp_path):
    from lion_hf.experiments import finetune

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("sentence,label\nfine,1\nbad,7\n")
    for argv, message in ((["--data_dir", str(tmp_path / "missing")], "data_dir is not a folder"),
                          (["--train_file", str(bad / "train.csv"), "--text_column", "text"],
                           "text column 'text' not found")):
        monkeypatch.setattr(sys, "argv", ["finetune_sentiment.py", *argv, "--output_dir", str(tmp_path / "run")])
        with pytest.raises(SystemExit) as exit_info:
            finetune.main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "the data:" in err and message in err and "Traceback" not in err, err


def test_help_fits_120_columns_and_cuts_each_option_at_a_sentence_end(capsys):
    from lion_hf.experiments import finetune

    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out) <= 120, max(out, key=len)
    entries: dict[str, str] = {}
    for line in out:
        if line.startswith("  --"):
            name, _, text = line.strip().partition(" ")
            entries[name] = text.strip()
        elif entries and line.startswith(" " * 32):
            entries[name] += " " + line.strip()
    assert "--lion_cautious" in entries
    # A first sentence cut inside "(Liang et al. 2024)" leaves a parenthesis open (counted with brackets, for
    # the half-open "[0, 1)").
    for name, text in entries.items():
        assert text.count("(") + text.count("[") == text.count(")") + text.count("]"), (name, text)
    assert "(Liang et al. 2024)" in entries["--lion_cautious"]


# ------------------------------------------------------------------------------------------- study


def _config(tmp_path, **extra):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"optimizers": {"adamw": {"learning_rate": [1e-4]}}, **extra}))
    return path


@pytest.mark.parametrize("extra", [
    ["--output_dir", "x"], ["--output-dir", "x"], ["--output_dir=x"], ["--run_name", "a"], ["--seed", "3"],
    ["--learning_rate", "1e-3"], ["--optim", "lion"], ["--weight-decay", "0.1"],
    ["--resume_from_checkpoint", "true"], ["--overwrite_output_dir"],
])
def test_a_study_refuses_extra_arguments_that_would_redirect_its_runs(tmp_path, extra):
    name = extra[0].split("=")[0][2:].replace("-", "_")
    with pytest.raises(study.StudyConfigError, match=rf"after `--`: --{name} would be the same for every run"):
        study.main([str(_config(tmp_path)), "--", *extra], default_config=DEFAULT_CONFIG)


def test_a_study_config_is_checked_key_by_key(tmp_path):
    def refused(message, **config):
        with pytest.raises(RecipeArgumentError, match=message):  # StudyConfigError is one
            study.load_config(_config(tmp_path, **config))

    refused(r"common: output_dir cannot be set there", common={"output_dir": "x"})
    refused(r"unknown key 'seed' \(did you mean 'seeds'\?\)", seed=[0])
    refused(r"common: unknown argument .max_step. \(did you mean max_steps", common={"max_step": 3})
    refused(r"optimizers\.adamw: unknown key 'lr'", optimizers={"adamw": {"learning_rate": [1e-4], "lr": 1}})
    refused(r"optimizers\.lion\.args: unknown argument 'lion_beta'",
            optimizers={"lion": {"learning_rate": [1e-4], "args": {"lion_beta": 0.9}}})
    refused(r"sweep\.argument: learning_rate cannot be set there", sweep={"argument": "learning_rate",
                                                                           "values": [1e-4]})
    refused(r"sweep: unknown key 'value'", sweep={"argument": "max_length", "values": [8], "value": 3})


def test_study_options_go_before_the_double_dash_and_run_options_after(tmp_path):
    for forgot in (["--max_steps", "5"], ["--max-steps=5"]):
        with pytest.raises(study.StudyConfigError, match=r"--max.steps(=5)?: argument of each run, not of the study: "
                                                         r"put it after `--`"):
            study.main([str(_config(tmp_path)), *forgot], default_config=DEFAULT_CONFIG)
    # A value missing after `--` is an error naming the option, not argparse's usage of every option.
    with pytest.raises(RecipeArgumentError, match=r"^argument --max_steps/--max-steps: expected one argument$"):
        study.main([str(_config(tmp_path)), "--", "--max_steps"], default_config=DEFAULT_CONFIG)
    with pytest.raises(study.StudyConfigError, match=r"unknown argument --rerunn"):
        study.main([str(_config(tmp_path)), "--rerunn"], default_config=DEFAULT_CONFIG)


def test_a_bad_run_argument_stops_the_study_before_anything_runs(tmp_path):
    config = _config(tmp_path, common={"max_length": 8})
    with pytest.raises(RecipeArgumentError, match=r"unknown argument --lion_beta"):
        study.main([str(config), "--output_dir", str(tmp_path / "out"), "--", "--lion_beta", "0.9"],
                   default_config=DEFAULT_CONFIG)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- lr guidance


def test_lion_lr_warning_points_at_the_evidence_and_at_the_callers_line(tmp_path):
    """No measured figure in the warning or the help (they live in docs/evidence.md); the warning
    points at the line that built the arguments (HfArgumentParser's, when it parses them)."""
    from transformers import HfArgumentParser

    with pytest.warns(AdamWLikeLearningRateWarning) as caught:
        LionTrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, report_to=[])
        HfArgumentParser(LionTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--learning_rate", "3e-4", "--weight_decay", "0.1"])
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name, "hf_argparser.py"], [
        w.filename for w in caught]
    first, second = (str(w.message) for w in caught)
    lion_lr, lion_wd = scale_from_adamw(3e-4, 0.1)
    assert "docs/evidence.md" in first and f"learning_rate={scale_from_adamw(2e-4, 0)[0]:.3g}" in first
    assert "weight_decay" not in first  # no "weight_decay=0" suggestion when there is no decay to scale
    assert f"learning_rate={lion_lr:.3g}" in second and f"weight_decay={lion_wd:.3g}" in second
    help_text = next(f.metadata["help"] for f in __import__("dataclasses").fields(LionTrainingArguments)
                     if f.name == "learning_rate")
    assert "docs/evidence.md" in help_text
    for text in (first, second, help_text):  # no measured lr, ratio or data set quoted
        assert not any(figure in text for figure in ("5e-5", "1e-3", "2e-3", "/ 2", "SST-2", "MiniLM")), text


def test_the_layer_says_how_to_install_what_it_misses(tmp_path):
    # peft hidden from the import system, as on an install without the `recipes` extra.
    code = "import sys\nsys.modules['peft'] = None\nimport lion_hf.experiments\n"  # None: "not importable"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and 'pip install "lion_hf[recipes]"' in result.stderr
    assert "peft" in result.stderr.splitlines()[-1]


def test_settled_values_are_recorded_in_the_run_arguments(tmp_path):
    # The lr and the device the recipe chose are part of what a run trained under (a resume must match them).
    from lion_hf.experiments.finetune import run_arguments

    parsed = parse_recipe_args(["--output_dir", str(tmp_path)])
    recorded = run_arguments(*parsed[:3])
    assert recorded["training"]["learning_rate"] == 5e-5 and "output_dir" not in recorded["training"]
    assert json.loads(json.dumps(recorded)) == recorded


# ------------------------------------------------------------------------------------------- issue 34: no argument
# silently dropped or overridden, no grid point counted twice, every late failure moved to parse time


def _study_refuses(tmp_path, message, *after, study_args=(), **config):
    out = tmp_path / "out"
    with pytest.raises(study.StudyConfigError, match=message):
        study.main([str(_config(tmp_path, **config)), "--output_dir", str(out), *study_args, *after],
                   default_config=DEFAULT_CONFIG)
    assert not out.exists(), "refused before any run started"


def test_a_study_refuses_extras_that_would_override_a_setups_args_or_the_sweep(tmp_path):
    setups = {"lion": {"learning_rate": [1e-4]},
              "lion_bf16": {"optim": "lion", "learning_rate": [1e-4], "args": {"model_dtype": "bfloat16"}}}
    _study_refuses(tmp_path, r"after `--`: --model_dtype float32 would override optimizers\.lion_bf16\.args\."
                             r"model_dtype \('bfloat16'\) while its folders and report rows still say lion_bf16",
                   "--", "--model-dtype", "float32", optimizers=setups)
    sweep = {"argument": "per_device_train_batch_size", "values": [8, 32]}
    _study_refuses(tmp_path, r"after `--`: --per_device_train_batch_size 16 would override the swept argument "
                             r"\(sweep\.values \[8, 32\]\)",
                   "--", "--per_device_train_batch_size", "16", sweep=sweep)
    _study_refuses(tmp_path, r"optimizers\.adamw\.args sets per_device_train_batch_size, the swept argument",
                   sweep=sweep, optimizers={"adamw": {"learning_rate": [1e-4],
                                                      "args": {"per_device_train_batch_size": 4}}})
    # An extra that sets what no setup sets is what `--` is for: it reaches every run.
    planned = study.plan_study(study.load_config(_config(tmp_path, optimizers=setups)), tmp_path / "o", [0],
                               ["--max_steps", "3"])
    assert [p.parsed[2].max_steps for p in planned] == [3, 3]


@pytest.mark.parametrize("config, study_args, message", [
    ({"seeds": [0, 1, 0]}, (), r"seeds: seeds 0 and 0 are the same value given twice"),
    ({}, ("--seeds", "2", "2"), r"seeds: seeds 2 and 2 are the same value given twice"),
    ({"optimizers": {"adamw": {"learning_rate": [1e-4, 0.0001]}}}, (),
     r"optimizers\.adamw\.learning_rate: learning rates 0\.0001 and 0\.0001 are the same value given twice"),
    ({"optimizers": {"adamw": {"learning_rate": [1e-4, 1.00000001e-4]}}}, (),
     r"learning rates 0\.0001 and 0\.000100000001 both print as 0\.0001: they would train into one run folder"),
    ({"optimizers": {"../escape": {"optim": "adamw", "learning_rate": [1e-4]}}}, (),
     r"optimizers\.\.\./escape: '\.\./escape' becomes a run folder's name"),
    ({"sweep": {"argument": "lr_scheduler_type", "values": ["linear"], "label": "a/b"}}, (),
     r"sweep\.label: 'a/b' becomes a run folder's name"),
], ids=["seed", "seed_cli", "lr_spelled_twice", "lr_printed_alike", "setup_path", "sweep_label"])
def test_duplicate_grid_points_and_names_that_leave_the_folder_are_refused(tmp_path, config, study_args, message):
    _study_refuses(tmp_path, message, study_args=study_args, **config)


@pytest.mark.parametrize("argv, message", [
    (["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be a whole number >= 1, got 0"),
    (["--per_device_train_batch_size", "-2"], r"--per_device_train_batch_size must be a whole number >= 1, got -2"),
    (["--max_train_samples", "0"], r"--max_train_samples must be a whole number >= 1, got 0"),
    (["--max_length", "0"], r"--max_length must be a whole number >= 1, got 0"),
])
def test_counts_are_checked_when_parsed(argv, message):
    with pytest.raises(RecipeArgumentError, match=message):
        parse_recipe_args(["--output_dir", "unused", *argv])


@pytest.mark.parametrize("text, message", [
    ("seed: null\n", r"seed: null is not a value of this option \(it takes int\)"),
    ("split_seed: {a: 1}\n", r"split_seed: a mapping is not a value of this option \(it takes int\), got \{'a': 1\}"),
    ("learning_rate: {x: 1}\n", r"learning_rate: a mapping is not a value"),
    ("seed: [1, 2]\n", r"seed: a list is not a value of this option \(it takes int\), got \[1, 2\]"),
])
def test_yaml_null_and_mappings_are_refused_where_the_option_takes_neither(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(RecipeArgumentError, match=message):
        parse_recipe_args([str(config), "--output_dir", "unused"])
    # Where an option does take them: unset (null) and a mapping of scheduler arguments.
    config.write_text("max_train_samples: null\nlr_scheduler_kwargs: {power: 2.0}\noutput_dir: null\n")
    _, data_args, training_args, _ = parse_recipe_args([str(config)])
    assert data_args.max_train_samples is None and training_args.lr_scheduler_kwargs == {"power": 2.0}


def test_target_accuracy_is_the_studys_own(tmp_path):
    # The report scores against the config's top-level target_accuracy: one set for the runs elsewhere would be
    # silently replaced by it (in common) or disagree with the report (after `--`).
    _study_refuses(tmp_path, r"common: target_accuracy cannot be set there", common={"target_accuracy": 0.9})
    _study_refuses(tmp_path, r"after `--`: --target_accuracy would be the same for every run", "--",
                   "--target_accuracy", "0.9")
