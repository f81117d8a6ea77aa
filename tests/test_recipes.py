"""The recipes end to end on a tiny BERT (built from a config, saved locally) and a few dozen rows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_bert
from transformers import BertTokenizer, TrainerCallback

from lion_hf.experiments import finetune, study
from lion_hf.experiments.arguments import parse_recipe_args
from lion_hf.experiments.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DEFAULT_CONFIG = RECIPES / "configs" / "offline_default.yaml"


def to_argv(config: dict) -> list[str]:
    """Argument values as a command line, as a user would type them (lists spread)."""
    argv = []
    for key, value in config.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def compare(argv: list[str]) -> dict:
    return study.main(argv, default_config=DEFAULT_CONFIG)


def subprocess_env() -> dict[str, str]:
    """This checkout first on the path, in every child process too (accelerate launch passes it on)."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

WORDS = ["good", "great", "fine", "lovely", "bad", "awful", "poor", "dull", "movie", "film", "plot", "the", "a", "was"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    tiny_bert().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, tiny_model_dir):
    """The encoder alone, as a pretrained checkpoint is: the classifier head is new, as with MiniLM."""
    folder = tmp_path_factory.mktemp("tiny_encoder")
    BertTokenizer(str(tiny_model_dir / "vocab.txt")).save_pretrained(folder)
    tiny_bert().bert.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_data")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("validation", 16)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            word = ["bad", "awful", "poor", "dull"][i % 4] if label == 0 else ["good", "great", "fine", "lovely"][i % 4]
            filler = [WORDS[8 + int(j)] for j in torch.randint(0, 6, (3,), generator=gen)]
            rows.append(f"{' '.join(filler[:2])} {word} {filler[2]}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


def common_args(model_dir, data_dir, out):
    return {
        "model_name_or_path": str(model_dir), "data_dir": str(data_dir), "max_length": 16,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "num_train_epochs": 2,
        "eval_strategy": "steps", "eval_steps": 3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "use_cpu": True, "lion_impl": "foreach", "output_dir": str(out),
    }


def test_finetune_one_run_writes_its_record(tiny_model_dir, tiny_data_dir, tmp_path):
    argv = to_argv(common_args(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    record = finetune.main(argv + ["--optim", "lion", "--learning_rate", "3e-3", "--weight_decay", "0.1"])
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["optimizer"] == "lion" and saved["steps"] == 12 and saved["train_rows"] == 48
    assert saved["optimizer_class"] == "Lion"
    assert saved["eval_rows"] == 16 and len(saved["history"]["eval"]) >= 4
    assert saved["optimizer_state_bytes"] == sum(p.numel() * 4 for p in tiny_bert().parameters())
    assert saved["peak_memory_bytes"] > 0 and 0.0 <= saved["best_eval_accuracy"] <= 1.0
    assert record.history["train"][-1]["loss"] < record.history["train"][0]["loss"]
    assert record.global_batch_size == 8 and record.resumed_from == []


def test_finetune_with_lora_and_yaml_config_plus_overrides(tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**common_args(tiny_model_dir, tiny_data_dir, tmp_path / "lora"),
                                      "use_peft": True, "lora_r": 2, "lora_target_modules": "query,value",
                                      "learning_rate": 1.0e-3}))
    model_args, data_args, training_args, _ = parse_recipe_args([str(config), "--learning_rate", "2e-3"])
    assert model_args.use_peft and training_args.learning_rate == 2e-3  # the CLI overrides the file
    record = finetune.run(model_args, data_args, training_args)
    full_state = sum(p.numel() * 4 for p in tiny_bert().parameters())
    assert 0 < record.optimizer_state_bytes < full_state / 4, "LoRA should optimise only the adapters and head"
    assert record.peft is True


def test_compare_optimizers_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    common = common_args(tiny_model_dir, tiny_data_dir, "unused")
    del common["output_dir"]
    config.write_text(yaml.safe_dump({
        "title": "tiny comparison", "target_accuracy": 0.6, "seeds": [0, 1], "common": common,
        "optimizers": {"adamw": {"learning_rate": [1e-2], "weight_decay": 0.01},
                       "lion": {"scale_from_adamw": 3}},
    }))
    out = tmp_path / "out"
    paths = compare([str(config), "--output_dir", str(out), "--progress_seconds", "0", "--", "--eval_steps", "2"])
    printed = capsys.readouterr().out
    assert paths["json"] == out / "report.json", "--output_dir after the config path must be honoured"
    # Progress: which run of how many, its step, and the time left for it and for the study.
    assert "[compare] 4 runs in" in printed and "4 to start" in printed
    assert "[compare] run 1/4 adamw lr=0.01 wd=0.01 seed=0: step 1/12 (8%)" in printed
    assert "left; study ~" in printed and "[compare] run 4/4 lion lr=0.00333333 wd=0.03 seed=1: step 12/12" in printed
    run_dirs = sorted(d.name for d in out.iterdir() if d.is_dir())
    assert run_dirs == ["adamw_lr0.01_seed0", "adamw_lr0.01_seed1",
                        "lion_lr0.00333333_seed0", "lion_lr0.00333333_seed1"]
    assert all((out / d / "run.json").is_file() for d in run_dirs)
    report = json.loads(paths["json"].read_text())
    # The override after `--` reached every run: an eval every 2 steps, not every 3.
    assert all([e["step"] for e in r["history"]["eval"]][:3] == [2, 4, 6] for r in report["runs"])
    assert set(report["summary"]["optimizers"]) == {"adamw", "lion"}
    lion = report["summary"]["optimizers"]["lion"]
    assert lion["learning_rate"] == pytest.approx(1e-2 / 3) and lion["weight_decay"] == pytest.approx(0.03)
    assert lion["seeds"] == [0, 1] and len(report["runs"]) == 4
    md = paths["markdown"].read_text()
    assert "# tiny comparison" in md and "| best eval acc |" in md
    for name in ("train_loss", "eval_accuracy"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    # Same data order and head init per seed: the first logged loss (before any update takes
    # effect on it) is identical for both optimizers.
    first = {(r["optimizer"], r["seed"]): r["history"]["train"][0]["loss"] for r in report["runs"]}
    assert first[("adamw", 0)] == first[("lion", 0)] and first[("adamw", 1)] == first[("lion", 1)]
    assert "4 runs took" in md and "reused" not in md
    # The same command again reuses every run, and says so (not "0 runs took 0.0 min").
    again = compare([str(config), "--output_dir", str(out), "--", "--eval_steps", "2"])
    assert "Nothing ran: reused 4 finished runs from an earlier invocation." in again["markdown"].read_text()


def test_compare_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optimizers": {"sgdd": {"learning_rate": [0.1]}}}))
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgdd'.*HF's optimizer names"):
        study.optimizer_grid(study.load_config(bad))
    bad.write_text(yaml.safe_dump({"optimizers": {"sgd": {"learning_rate": [0.1]}}}))  # an HF name is a setup
    assert study.optimizer_grid(study.load_config(bad))[0][:3] == ("sgd", "sgd", 0.1)
    bad.write_text(yaml.safe_dump({"optimizers": {"lion_bf16": {"optim": "lion", "learning_rate": [1e-4],
                                                                "args": ["model_dtype", "bfloat16"]}}}))
    with pytest.raises(ValueError, match="args: expected a mapping"):
        study.optimizer_grid(study.load_config(bad))
    bad.write_text(yaml.safe_dump({"optimizers": {"lion": {"scale_from_adamw": 3}}}))
    with pytest.raises(ValueError, match="needs an adamw entry"):
        study.optimizer_grid(study.load_config(bad))
    bad.write_text(yaml.safe_dump({"seeds": [0]}))
    with pytest.raises(ValueError, match="optimizers"):
        study.load_config(bad)
    for spec, message in (({"learning_rate": []}, "grid is empty"), (None, "needs a learning_rate")):
        bad.write_text(yaml.safe_dump({"optimizers": {"adamw": spec}}))
        with pytest.raises(ValueError, match=message):
            study.optimizer_grid(study.load_config(bad))
    with pytest.raises(ValueError, match=r"after `--`: --output_dir would be the same for every run"):
        compare([str(bad), "--", "--output_dir=elsewhere"])


def test_shipped_configs_parse():
    for path in sorted((RECIPES / "configs").glob("*.yaml")):
        if path.name.startswith("single_"):  # one run's options, for finetune_sentiment.py
            continue
        grid = study.optimizer_grid(study.load_config(path))
        optims = {optim for _, optim, *_ in grid}
        assert "lion" in optims and optims <= {"adamw", "lion", "lion_32bit", "lion_8bit"}, path
        common = study.load_config(path)["common"]
        for _, _, _, _, setup_args in grid:
            parse_recipe_args(
                to_argv({**common, **setup_args, "output_dir": "unused"}))


@pytest.mark.parametrize("forward_dtype", [None, "float32"])
def test_pure_bf16_run_stores_everything_in_bf16_and_counts_six_bytes_per_param(
        tiny_model_dir, tiny_data_dir, tmp_path, forward_dtype):
    args = {**common_args(tiny_model_dir, tiny_data_dir, tmp_path / "bf16"), "num_train_epochs": 1,
            "model_dtype": "bfloat16", "lion_state_dtype": "bf16", "forward_dtype": forward_dtype}
    model_args, data_args, training_args, _ = parse_recipe_args(
        to_argv(args) + ["--optim", "lion", "--learning_rate", "3e-3"])
    seen = {}

    class Spy(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.setdefault("dtypes", {t.dtype for p in model.parameters() for t in (p, p.grad)})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["start"] = [p.detach().clone() for p in model.parameters()]

        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen["end"] = [p.detach().clone() for p in model.parameters()]

    record = finetune.run(model_args, data_args, training_args, extra_callbacks=[Spy()])
    assert seen["dtypes"] == {torch.bfloat16}, "weights and gradients must all be bf16: no fp32 master copy"
    per = record.bytes_per_param
    assert (per["weight"], per["grad"], per["optimizer_state"], per["total"]) == (2.0, 2.0, 2.0, 6.0)
    moved = sum(int((a != b).sum()) for a, b in zip(seen["start"], seen["end"]))
    assert moved > 0.5 * sum(a.numel() for a in seen["start"]), "most bf16 weights should have moved"
    assert record.model_dtype == "bfloat16" and record.lion_param_rounding == "stochastic"
    assert record.weights_changed_fraction == pytest.approx(moved / sum(a.numel() for a in seen["start"]))


def test_fp32_adamw_counts_sixteen_bytes_per_param_and_bad_dtypes_are_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    args = {**common_args(tiny_model_dir, tiny_data_dir, tmp_path / "adamw"), "num_train_epochs": 1,
            "max_train_samples": 8}
    record = finetune.main(to_argv(args) + ["--optim", "adamw"])
    assert record.bytes_per_param["total"] == pytest.approx(16.0, abs=0.01)  # + a step counter per tensor
    with pytest.raises(ValueError, match="--model_dtype must be one of"):
        finetune.main(to_argv({**args, "model_dtype": "bf16"}))


def test_compare_setups_carry_their_own_arguments(tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "setups.yaml"
    common = {**common_args(tiny_model_dir, tiny_data_dir, "unused"), "num_train_epochs": 1}
    del common["output_dir"]
    config.write_text(yaml.safe_dump({
        "seeds": [0], "common": common,
        "optimizers": {"lion": {"learning_rate": [3e-3]},
                       "lion_bf16": {"optim": "lion", "learning_rate": [3e-3],
                                     "args": {"model_dtype": "bfloat16", "lion_state_dtype": "bf16"}}},
    }))
    out = tmp_path / "out"
    paths = compare([str(config), "--output_dir", str(out)])
    report = json.loads(paths["json"].read_text())
    assert set(report["summary"]["optimizers"]) == {"lion", "lion_bf16"}
    by_setup = {r["setup"]: r for r in report["runs"]}
    assert by_setup["lion_bf16"]["bytes_per_param"]["total"] == 6.0
    assert by_setup["lion"]["bytes_per_param"]["total"] == 12.0  # fp32 weights, grads and momentum
    assert "| weights+grads+state B/param |" in paths["markdown"].read_text()


# ---------------------------------------------------------------- interrupted runs resume


def _kill_when(cmd: list[str], ready, cwd: Path, timeout: float = 300.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` holds; the run must not have finished."""
    import signal
    import subprocess
    import time

    env = {**subprocess_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed:\n"
                                 + proc.stdout.read()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to reach its kill point")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _resume_args(model_dir, data_dir, out, optim_args):
    return {**common_args(model_dir, data_dir, out), "num_train_epochs": 1, "max_steps": 24, "eval_steps": 8,
            "save_strategy": "steps", "save_steps": 4, "seed": 3, **optim_args}


@pytest.mark.parametrize("optim_args", [
    {"optim": "lion", "learning_rate": 3e-3, "weight_decay": 0.1, "model_dtype": "bfloat16",
     "lion_state_dtype": "bf16"},
    {"optim": "adamw", "learning_rate": 1e-2, "weight_decay": 0.01},
], ids=["lion_bf16", "adamw"])
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tiny_data_dir, tmp_path, optim_args):
    from safetensors.torch import load_file

    killed = tmp_path / "killed"
    argv = to_argv(_resume_args(tiny_model_dir, tiny_data_dir, killed, optim_args))
    _kill_when([sys.executable, str(RECIPES / "finetune_sentiment.py"), *argv],
               lambda: (killed / "checkpoint-8" / "trainer_state.json").is_file(), tmp_path)
    assert not (killed / "run.json").exists() and not (killed / "checkpoint-24").exists()

    # Rerunning into the folder without saying what to do is refused, not trained over.
    with pytest.raises(ValueError, match=r"already holds checkpoints.*--resume_from_checkpoint true"):
        finetune.main(argv)
    # An attempt that fails (a folder that is no checkpoint) records nothing: the next attempt, under another
    # lr, is still refused, naming the difference, instead of resuming the run at the wrong lr.
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        finetune.main(argv + ["--learning_rate", "1e-3", "--resume_from_checkpoint", str(tiny_data_dir)])
    with pytest.raises(CheckpointError, match=r"other arguments: training\.learning_rate \(0\.0\d+ there, 0\.001 now"):
        finetune.main(argv + ["--learning_rate", "1e-3", "--resume_from_checkpoint", "true"])
    resumed = finetune.main(argv + ["--resume_from_checkpoint", "true"])

    straight_dir = tmp_path / "straight"
    straight = finetune.main(
        to_argv(_resume_args(tiny_model_dir, tiny_data_dir, straight_dir, optim_args)))

    assert resumed.steps == straight.steps == 24 and len(resumed.resumed_from) == 1
    assert int(resumed.resumed_from[0].rsplit("-", 1)[1]) >= 8
    a = load_file(str(killed / "checkpoint-24" / "model.safetensors"))
    b = load_file(str(straight_dir / "checkpoint-24" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    if optim_args.get("model_dtype") == "bfloat16":
        assert {t.dtype for t in a.values()} == {torch.bfloat16}
    assert resumed.final_eval["eval_loss"] == straight.final_eval["eval_loss"]
    assert resumed.final_eval["eval_accuracy"] == straight.final_eval["eval_accuracy"]
    # run.json holds the whole run: every logged step, from both segments, with the same values.
    assert [(e["step"], e["loss"]) for e in resumed.history["train"]] == \
           [(e["step"], e["loss"]) for e in straight.history["train"]]
    assert [(e["step"], e["eval_accuracy"]) for e in resumed.history["eval"]] == \
           [(e["step"], e["eval_accuracy"]) for e in straight.history["eval"]]
    assert resumed.steps_to_target == straight.steps_to_target
    seconds = [e["seconds"] for e in resumed.history["train"]]
    assert seconds == sorted(seconds) and resumed.train_seconds >= seconds[-1]
    # --overwrite_output_dir trains from scratch and deletes the old checkpoints first.
    fresh = finetune.main(argv + ["--overwrite_output_dir", "true", "--max_steps", "8", "--save_steps", "8"])
    assert fresh.resumed_from == [] and sorted(d.name for d in killed.glob("checkpoint-*")) == ["checkpoint-8"]


def test_compare_rerun_redoes_only_unfinished_runs(tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "study.yaml"
    common = {**_resume_args(tiny_model_dir, tiny_data_dir, "unused", {})}
    del common["output_dir"], common["seed"]  # the study sets both, run by run
    config.write_text(yaml.safe_dump({
        "seeds": [0], "common": common,
        "optimizers": {"adamw": {"learning_rate": [1e-2], "weight_decay": 0.01},
                       "lion": {"learning_rate": [3e-3], "weight_decay": 0.1}},
    }))
    out = tmp_path / "out"
    cmd = [sys.executable, str(RECIPES / "compare_optimizers.py"), str(config), "--output_dir", str(out)]
    # Kill the study once the first run has finished and the second has saved a checkpoint.
    _kill_when(cmd, lambda: (out / "lion_lr0.003_seed0" / "checkpoint-4" / "trainer_state.json").is_file(), tmp_path)
    first = out / "adamw_lr0.01_seed0" / "run.json"
    assert first.is_file() and not (out / "lion_lr0.003_seed0" / "run.json").exists()
    first_written = first.stat().st_mtime_ns
    assert not list(first.parent.glob("checkpoint-*")), "a finished run's checkpoints are deleted"

    paths = compare([str(config), "--output_dir", str(out)])
    assert first.stat().st_mtime_ns == first_written, "the finished run was redone"
    report = json.loads(paths["json"].read_text())
    by_setup = {r["setup"]: r for r in report["runs"]}
    assert by_setup["adamw"]["resumed_from"] == [] and len(by_setup["lion"]["resumed_from"]) == 1
    assert by_setup["lion"]["steps"] == 24

    # Changed arguments are not mistaken for a finished run: the same grid point with another
    # max_length is run again.
    parsed = parse_recipe_args(to_argv(
        {**common, "optim": "adamw", "learning_rate": 1e-2, "weight_decay": 0.01, "seed": 0, "run_name": "adamw",
         "output_dir": str(first.parent)}))
    assert study.run_status(first.parent, parsed)[0] == "finished"
    parsed[1].max_length = 12
    assert study.run_status(first.parent, parsed)[0] == "new"


def test_main_command_does_not_warn_about_its_own_config():
    # `python recipes/compare_optimizers.py` runs offline_default.yaml: its Lion lr is one this
    # project measured as good, so the "looks like an AdamW lr" warning must not fire on it.
    import warnings

    path = DEFAULT_CONFIG
    config = study.load_config(path)
    for _, optim, lr, wd, setup_args in study.optimizer_grid(config):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*looks like an AdamW value")
            parse_recipe_args(to_argv(
                {**config["common"], **setup_args, "optim": optim, "learning_rate": lr, "weight_decay": wd,
                 "output_dir": "unused"}))


def test_compare_sweeps_batch_size_with_a_grid_per_value(tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "sweep.yaml"
    common = {**common_args(tiny_model_dir, tiny_data_dir, "unused"), "num_train_epochs": 1, "eval_steps": 0.5}
    for key in ("output_dir", "per_device_train_batch_size"):
        del common[key]
    config.write_text(yaml.safe_dump({
        "seeds": [0], "common": common, "title": "batch sweep",
        "sweep": {"argument": "per_device_train_batch_size", "values": [4, 16], "label": "bs"},
        "optimizers": {"adamw": {"learning_rate": {4: [1e-2], 16: [2e-2]}, "weight_decay": 0.01},
                       "lion": {"learning_rate": {4: [1e-3], 16: [3e-3, 6e-3]}, "weight_decay": 0.1}},
    }))
    out = tmp_path / "out"
    paths = compare([str(config), "--output_dir", str(out)])
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == [
        "adamw_bs16_lr0.02_seed0", "adamw_bs4_lr0.01_seed0", "lion_bs16_lr0.003_seed0", "lion_bs16_lr0.006_seed0",
        "lion_bs4_lr0.001_seed0"]
    report = json.loads(paths["json"].read_text())
    # Same epochs at every batch size: 48 rows are 12 steps at batch 4 and 3 at batch 16.
    assert {(r["global_batch_size"], r["steps"]) for r in report["runs"]} == {(4, 12), (16, 3)}
    assert report["summary"]["values"] == [4, 16]
    assert report["summary"]["per_value"]["4"]["optimizers"]["adamw"]["learning_rate"] == 1e-2
    md = paths["markdown"].read_text()
    assert "## Best dev accuracy against global_batch_size" in md and "| 16 | 3 |" in md
    assert paths["sweep_accuracy"].read_bytes()[:4] == b"\x89PNG"
    # --report_only runs nothing and reports what has finished.
    again = compare([str(config), "--output_dir", str(out), "--report_only"])
    assert json.loads(again["json"].read_text())["summary"] == report["summary"]


def test_sweep_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"

    def grid(config):
        bad.write_text(yaml.safe_dump(config))
        return study.optimizer_grid(study.load_config(bad))

    with pytest.raises(ValueError, match="sweep needs an 'argument'"):
        grid({"sweep": {"argument": "per_device_train_batch_size"}, "optimizers": {"adamw": {"learning_rate": 1}}})
    with pytest.raises(ValueError, match="is swept; remove it from common"):
        grid({"sweep": {"argument": "max_length", "values": [8]}, "common": {"max_length": 8},
              "optimizers": {"adamw": {"learning_rate": 1}}})
    with pytest.raises(ValueError, match=r"no grid for swept value 256 \(grids given for \['32'\]\)"):
        grid({"sweep": {"argument": "per_device_train_batch_size", "values": [32, 256]},
              "optimizers": {"adamw": {"learning_rate": {32: [1e-4]}}}})
    with pytest.raises(ValueError, match="a mapping of grids needs a sweep section"):
        grid({"optimizers": {"adamw": {"learning_rate": {32: [1e-4]}}}})
    # HF's own optimizer names are setups too (lion_32bit is HF's bitsandbytes Lion).
    points = grid({"sweep": {"argument": "per_device_train_batch_size", "values": [32, 256]},
                   "optimizers": {"lion_32bit": {"learning_rate": [1e-4, 2e-4]}}})
    assert [(o, lr, a["per_device_train_batch_size"]) for _, o, lr, _, a in points] == [
        ("lion_32bit", 1e-4, 32), ("lion_32bit", 2e-4, 32), ("lion_32bit", 1e-4, 256), ("lion_32bit", 2e-4, 256)]


# ---------------------------------------------------------------- resume that cannot be talked into the wrong thing


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A finished 8-step Lion run with checkpoints at steps 4 and 8 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    args = {**_resume_args(tiny_model_dir, tiny_data_dir, out, {"optim": "lion", "learning_rate": 3e-3}),
            "max_steps": 8, "save_total_limit": 5}  # every checkpoint kept (the recipe keeps 2 unless told)
    finetune.main(to_argv(args))
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    return out, args


def _copy(checkpointed, tmp_path) -> tuple[Path, list[str]]:
    import shutil

    source, args = checkpointed
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out, to_argv({**args, "output_dir": str(out)})


def test_a_damaged_checkpoint_is_named_and_the_intact_one_before_it_offered(checkpointed, tmp_path):
    out, argv = _copy(checkpointed, tmp_path)
    state = out / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # cut off, as a full disk leaves it
    for _ in range(2):  # and again on the retry: named every time, never picked silently
        with pytest.raises(CheckpointError, match=rf"{state}: JSONDecodeError.*newest intact checkpoint before it "
                                                  rf"is {out / 'checkpoint-4'}"):
            finetune.main([*argv, "--resume_from_checkpoint", "true"])
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    intact = optimizer.read_bytes()
    optimizer.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match=rf"{optimizer}: not a torch archive.*No intact checkpoint precedes"):
        finetune.main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    optimizer.write_bytes(intact)
    resumed = finetune.main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert resumed.steps == 8 and resumed.resumed_from == [str(out / "checkpoint-4")]


def test_a_checkpoint_missing_a_file_or_its_arguments_is_refused_unless_a_partial_resume_is_allowed(
        checkpointed, tmp_path):
    out, argv = _copy(checkpointed, tmp_path)
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    (out / "checkpoint-4" / "rng_state.pth").unlink()
    resume = [*argv, "--resume_from_checkpoint", str(out / "checkpoint-4")]
    with pytest.raises(CheckpointError, match=r"checkpoint-4 lacks optimizer\.pt; rng_state\.pth: resuming would not "
                                              r"continue the run exactly.*--allow_partial_resume true"):
        finetune.main(resume)
    with pytest.warns(UserWarning, match=r"partial resume.*lacks optimizer\.pt; rng_state\.pth"):
        record = finetune.main([*resume, "--allow_partial_resume", "true"])
    assert record.steps == 8 and record.resumed_from == [str(out / "checkpoint-4")]
    # A checkpoint that does not say what it was trained under (another script, an older recipe).
    state_file = out / "checkpoint-8" / "trainer_state.json"  # saved again, whole, by the partial resume
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["RunArgumentsRecorder"]
    state_file.write_text(json.dumps(state))
    (state_file.parent / "lion_hf_digests.json").unlink()  # nor had an older recipe its digests
    with pytest.raises(CheckpointError, match=r"checkpoint-8 lacks the run arguments it was trained under"):
        finetune.main([*argv, "--resume_from_checkpoint", "true"])


def test_nothing_is_deleted_before_the_inputs_are_validated(checkpointed, tmp_path):
    out, argv = _copy(checkpointed, tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_bytes("sentence\tlabel\nun film très bon\t1\nnul\t0\n".encode("latin-1"))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=rf"{bad}: not utf-8 text: line 2.*--encoding"):
        finetune.main([*argv, "--overwrite_output_dir", "true", "--train_file", str(bad)])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "a bad input cost the old outputs"
    # A finished run in the folder (its run.json) is not written over without --overwrite_output_dir either.
    import shutil

    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    with pytest.raises(CheckpointError, match=r"already holds a finished run \(run\.json\).*--overwrite_output_dir"):
        finetune.main(argv)


def test_a_second_run_into_the_default_folder_is_not_an_error(tiny_encoder_dir, tiny_data_dir, tmp_path,
                                                               monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = {**common_args(tiny_encoder_dir, tiny_data_dir, "unused"), "max_steps": 2, "save_steps": 1,
            "save_strategy": "steps", "eval_strategy": "no"}
    del args["output_dir"]
    first = finetune.main(to_argv(args))
    second = finetune.main(to_argv(args))
    folders = sorted((tmp_path / "runs" / "finetune_sentiment").iterdir())
    assert len(folders) == 2 and all((f / "checkpoint-2").is_dir() and (f / "run.json").is_file() for f in folders)
    assert first.steps == second.steps == 2
    printed = capfd.readouterr()
    # One short line per run for the new head, none of transformers' multi-line LOAD REPORT.
    assert printed.out.count("[finetune] new classifier head") == 2 and "LOAD REPORT" not in printed.out + printed.err
    assert "a new folder for this run" in printed.out


# ---------------------------------------------------------------- several CPU processes: one DDP job


def test_two_processes_without_use_cpu_train_as_one_gloo_job(tiny_encoder_dir, tiny_data_dir, tmp_path):
    """The trap: `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs, no --use_cpu."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {**common_args(tiny_encoder_dir, tiny_data_dir, tmp_path / "ddp"), "num_train_epochs": 1}
    del args["use_cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(RECIPES / "finetune_sentiment.py"), *to_argv(args), "--optim", "adamw"]
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    record = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert (record["world_size"], record["global_batch_size"], record["steps"]) == (2, 16, 3)
    assert output.count("2 processes on a machine without a GPU: they train as one DDP job over gloo") == 1
    assert output.count("[finetune] new classifier head") == 1  # the main process speaks for both
    for noise in ("Setting accelerator to CPU", "LOAD REPORT", "find_unused_parameters", "pin_memory",
                  "gemm_4bit"):
        assert noise not in output, noise


# ---------------------------------------------------------------- issue 34: one writer, digests, process counts


def test_a_second_run_into_a_folder_being_written_fails_at_once_and_a_killed_run_leaves_no_lock(
        tiny_model_dir, tiny_data_dir, tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    args = {**_resume_args(tiny_model_dir, tiny_data_dir, out, {"optim": "lion", "learning_rate": 3e-3}),
            "max_steps": 100000, "eval_strategy": "no"}
    argv = to_argv(args)
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(RECIPES / "finetune_sentiment.py"), *argv], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-4" / "trainer_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or never saved"
            time.sleep(0.05)
        # Whatever the second run asks for, it does not touch the folder while the first one writes it (and, were
        # it let through, it would stop after 3 steps rather than train the first one's 100000).
        for extra in (["--overwrite_output_dir", "true", "--max_steps", "3"],
                      ["--resume_from_checkpoint", "true", "--max_steps", "3"]):
            began = time.monotonic()
            with pytest.raises(CheckpointError, match=rf"output_dir {out} is being written by another run \(pid "
                                                      rf"{first.pid} on host "):
                finetune.main(argv + extra)
            assert time.monotonic() - began < 5, "refused at once, before loading anything"
        # The first run goes on saving (and rotating its checkpoints: checkpoint-4 may be gone by now).
        assert first.poll() is None and any(out.glob("checkpoint-*/trainer_state.json"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The killed run's lock died with it: the folder is free for the next run.
    fresh = finetune.main(argv + ["--overwrite_output_dir", "true", "--max_steps", "2", "--save_steps", "2"])
    assert fresh.steps == 2 and sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_flipped_bit_in_the_weights_is_refused_on_resume(checkpointed, tmp_path):
    out, argv = _copy(checkpointed, tmp_path)
    weights = out / "checkpoint-8" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside the tensor data: the file's structure is untouched
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{weights}: its sha256 differs from the one recorded in "
                                              rf"lion_hf_digests\.json.*newest intact checkpoint before it is "
                                              rf"{out / 'checkpoint-4'}"):
        finetune.main([*argv, "--resume_from_checkpoint", "true"])
    digests = json.loads((out / "checkpoint-4" / "lion_hf_digests.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(digests)


def test_a_resume_that_changes_only_bookkeeping_continues_to_the_same_weights(checkpointed, tmp_path):
    from safetensors.torch import load_file

    source, _ = checkpointed
    out, argv = _copy(checkpointed, tmp_path)
    import shutil

    shutil.rmtree(out / "checkpoint-8")
    (out / "run.json").unlink()
    changed = ["--save_steps", "2", "--logging_steps", "3", "--eval_steps", "2", "--report_to", "none",
               "--disable_tqdm", "false", "--target_accuracy", "0.5"]
    record = finetune.main([*argv, *changed, "--resume_from_checkpoint", "true"])
    assert record.steps == 8 and record.resumed_from == [str(out / "checkpoint-4")]
    # The new intervals apply (HF alone would keep the checkpoint's): a save every 2 steps from step 4 on.
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    a = load_file(str(out / "checkpoint-8" / "model.safetensors"))
    b = load_file(str(source / "checkpoint-8" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a bookkeeping change changed the training"
    with pytest.raises(CheckpointError, match=r"other arguments: training\.max_grad_norm"):
        finetune.main([*argv, "--max_grad_norm", "0.5", "--resume_from_checkpoint", str(out / "checkpoint-4")])


def test_a_resume_on_another_process_count_is_refused_unless_allowed_and_then_recorded(checkpointed, tmp_path):
    from lion_hf.experiments.checkpoints import write_digests

    out, argv = _copy(checkpointed, tmp_path)
    import shutil

    shutil.rmtree(out / "checkpoint-8")
    (out / "run.json").unlink()
    # checkpoint-4 as three processes leave it: one RNG file per process, the count recorded, digests resealed.
    checkpoint = out / "checkpoint-4"
    for rank in range(3):
        shutil.copy(checkpoint / "rng_state.pth", checkpoint / f"rng_state_{rank}.pth")
    (checkpoint / "rng_state.pth").unlink()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["stateful_callbacks"]["RunArgumentsRecorder"]["attributes"]["world_size"] = 3
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    write_digests(checkpoint)
    resume = [*argv, "--resume_from_checkpoint", "true"]
    with pytest.raises(CheckpointError, match=r"checkpoint-4 was trained by 3 processes and this run has 1 \(global "
                                              r"batch 24 there, 8 now\)"):
        finetune.main(resume)
    with pytest.warns(UserWarning, match=r"trained by 3 processes and this run has 1"):
        record = finetune.main([*resume, "--allow_partial_resume", "true"])
    change = {"step": 4, "world_size_before": 3, "world_size": 1, "global_batch_size_before": 24,
              "global_batch_size": 8}
    assert record.batch_changes == [change]
    assert (record.world_size, record.global_batch_size) == (3, 24), "run.json keeps the batch the run started with"
    saved = json.loads((out / "run.json").read_text())
    assert saved["batch_changes"] == [change] and saved["global_batch_size"] == 24
    # The next checkpoint carries the change on, for a later resume's run.json.
    later = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert later["stateful_callbacks"]["RunArgumentsRecorder"]["attributes"]["batch_changes"] == [change]


def test_a_lora_target_module_the_model_lacks_is_named(tiny_model_dir):
    from lion_hf.experiments.arguments import ModelArguments, RecipeArgumentError

    for targets, missing in (("query,valu", "valu"), ("qkv", "qkv")):
        args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_target_modules=targets)
        with pytest.raises(RecipeArgumentError, match=rf"--lora_target_modules '{targets}' names no module of the "
                                                      rf"model: {missing}\. Its linear layers are named: .*\bquery\b"):
            finetune.build_model(args, 2, ["neg", "pos"])
    model = finetune.build_model(ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True,
                                                lora_target_modules="query,value"), 2, ["neg", "pos"])
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_under_two_processes_every_rank_stops_at_a_held_lock_and_digests_cover_every_ranks_files(
        tiny_encoder_dir, tiny_data_dir, tmp_path):
    """The main process takes the lock and broadcasts the outcome: no rank waits for one that has left."""
    import socket
    import subprocess

    from lion_hf.experiments.checkpoints import OutputLock, digest_mismatches

    def launch(out, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = {**common_args(tiny_encoder_dir, tiny_data_dir, out), "max_steps": 2, "save_strategy": "steps",
                "save_steps": 2, "eval_strategy": "no"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(RECIPES / "finetune_sentiment.py"), *to_argv(args), *extra]
        return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)

    with OutputLock(tmp_path / "held"):
        result = launch(tmp_path / "held")
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count(f"output_dir {tmp_path / 'held'} is being written by another run "
                                                 f"(pid {os.getpid()} on host") == 2, "each rank says why it stopped"
    result = launch(tmp_path / "free")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    checkpoint = tmp_path / "free" / "checkpoint-2"
    digests = json.loads((checkpoint / "lion_hf_digests.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(digests) and digest_mismatches(checkpoint) == []
