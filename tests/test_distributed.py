"""Two CPU processes train what one process trains: DDP (gloo) and DeepSpeed ZeRO-2/3.

Loss scale. transformers 5 hands ``num_items_in_batch`` to every model whose ``forward`` takes
``**kwargs`` and, with ``average_tokens_across_devices`` (on by default), multiplies the loss by
the process count. A sequence-classification head returns a per-batch mean and ignores the
count, so two processes doubled the logged loss and every gradient (measured here: first
loss 1.397 vs 0.699, grad_norm 0.902 vs 0.451). LionTrainer keeps HF's rule only for models
whose loss consumes the count (``LionTrainer._loss_counts_items``); the tests below compare
AdamW, which sees the gradient's scale, as well as Lion, which takes only its sign.

Tolerances. With the same global batch the all-reduced gradient is the mean of per-process
means, equal to the one-process mean up to float rounding. AdamW's update is continuous in the
gradient, so its parameters match to 1e-5 (measured: 8.6e-8 after 3 steps; with the doubled
loss 1.2e-3, 14,605 of 17,900 elements off). Lion takes sign(c), and rounding flips it where
c ~ 0; a flipped element then differs by up to 2 * lr per step and nudges later gradients.
Measured: 5 of 17,900 elements after 3 DDP steps, 0 under ZeRO-2 and 5 under ZeRO-3 after 4;
so the tests allow 0.5% and a max difference of 2 * lr * steps. A DDP or ZeRO bug (ranks
stepping on their own half-batch gradient, a partition stepped twice) makes a large share of
elements differ from the first step.

DeepSpeed runs on CPU through the recipes' ``start_deepspeed_on_cpu`` (accelerate's state on
gloo). ZeRO-2 is in the default run (about 30-40 s with its one-process reference), ZeRO-3 and
the recipe itself under both stages are ``slow``. FSDP: accelerate applies FSDP only on GPU
distributed types (its state maps a CPU run to MULTI_CPU, i.e. DDP), so Lion on FSDP2 shards
is tested with torch's ``fully_shard`` directly (tests/launchers/fsdp2_lion.py).
"""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LAUNCHERS = TESTS / "launchers"
TRAIN_SCRIPT = LAUNCHERS / "distributed_train.py"
DEEPSPEED_SCRIPT = LAUNCHERS / "deepspeed_lion.py"
FSDP2_SCRIPT = LAUNCHERS / "fsdp2_lion.py"
RECIPE = REPO / "recipes" / "finetune_sentiment.py"
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate"

sys.path.insert(0, str(TESTS))
from tiny_models import TokenDataset, tiny_bert  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # No ACCELERATE_* from the caller's shell: each run says what it needs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    path = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _run(cmd, cwd, env) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _launch(config: list[str], script, script_args, cwd, env) -> str:
    return _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *config,
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(script),
            *script_args,
        ],
        cwd,
        env,
    )


def _rel_close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _assert_lion_close(one: dict, two: dict, lr: float, steps: int) -> None:
    assert one.keys() == two.keys()
    off = total = 0
    for name in one:
        diff = (one[name] - two[name]).abs()
        assert float(diff.max()) <= 2 * lr * steps + 1e-6, name
        off += int((diff > 1e-5).sum())
        total += diff.numel()
    assert off <= 0.005 * total, f"{off} of {total} elements differ"


# --------------------------------------------------------------------------------------
# The loss-scale decision (no processes launched)
# --------------------------------------------------------------------------------------


def _trainer_verdict(model, tmp_path) -> bool:
    from lion_hf import LionTrainer, LionTrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = LionTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        return LionTrainer(model=model, args=args).model_accepts_loss_kwargs


def test_loss_kwargs_kept_only_for_losses_that_count_items(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    # BERT's classifier: **kwargs for attention options, a per-batch mean loss.
    assert _trainer_verdict(tiny_bert(), tmp_path) is False
    # Llama's classifier calls self.loss_function without **kwargs: a mean as well.
    assert _trainer_verdict(LlamaForSequenceClassification(config), tmp_path) is False
    # A causal LM hands **kwargs (num_items_in_batch) to its loss: HF's rule holds.
    assert _trainer_verdict(LlamaForCausalLM(config), tmp_path) is True
    # An explicit accepts_loss_kwargs wins either way.
    for model, said in ((tiny_bert(), True), (LlamaForCausalLM(config), False)):
        model.accepts_loss_kwargs = said
        assert _trainer_verdict(model, tmp_path) is said


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    # The same rule decides whether the loss is divided by the accumulation steps: batch 4 x 2
    # accumulated must log what batch 8 logs (HF's rule here: loss and grad_norm doubled).
    from lion_hf import LionTrainer, LionTrainingArguments

    logs = []
    for batch, accumulate in ((8, 1), (4, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = LionTrainingArguments(
                output_dir=str(tmp_path / str(batch)),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulate,
                optim="adamw",
                learning_rate=1e-3,
                max_steps=2,
                logging_steps=1,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
            )
        trainer = LionTrainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
        trainer.train()
        logs.append([e for e in trainer.state.log_history if "loss" in e])
    for a, b in zip(*logs, strict=True):
        assert _rel_close(a["loss"], b["loss"]) and _rel_close(a["grad_norm"], b["grad_norm"]), (a, b)


# --------------------------------------------------------------------------------------
# DDP: accelerate launch --multi_gpu --num_processes 2 (gloo on CPU)
# --------------------------------------------------------------------------------------

DDP_STEPS = 3


def _ddp_one_and_two(tmp, extra: list[str]) -> tuple[dict, dict]:
    """distributed_train.py as one process (batch 8) and as two DDP processes (batch 4 each)."""
    one, two = tmp / "one.pt", tmp / "two.pt"
    stdout = _run(
        [
            sys.executable,
            str(TRAIN_SCRIPT),
            "--per_device_batch",
            "8",
            "--max_steps",
            str(DDP_STEPS),
            "--out",
            str(one),
            "--workdir",
            str(tmp / "w1"),
            *extra,
        ],
        tmp,
        _env(ACCELERATE_USE_CPU="1"),
    )
    assert f"optim=lion world_size=1 steps={DDP_STEPS}" in stdout, stdout
    # --multi_gpu picks accelerate's torchrun launcher; the script's use_cpu=True makes it gloo on
    # CPU (accelerate's --cpu launcher would need mpirun for two processes).
    stdout = _launch(
        ["--multi_gpu"],
        TRAIN_SCRIPT,
        ["--per_device_batch", "4", "--max_steps", str(DDP_STEPS), "--out", str(two), "--workdir", str(tmp / "w2"),
         *extra],
        tmp,
        _env(ACCELERATE_USE_CPU="1"),
    )
    assert f"optim=lion world_size=2 steps={DDP_STEPS}" in stdout, stdout
    return torch.load(one, weights_only=True), torch.load(two, weights_only=True)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return _ddp_one_and_two(tmp_path_factory.mktemp("ddp"), [])


@pytest.mark.parametrize("optim", ["adamw", "lion"])
def test_ddp_two_cpu_processes_match_one(ddp_runs, optim):
    one, two = (run[optim] for run in ddp_runs)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["model_accepts_loss_kwargs"] is False and two["model_accepts_loss_kwargs"] is False
    assert [e["step"] for e in one["log"]] == [e["step"] for e in two["log"]] == list(range(1, DDP_STEPS + 1))
    first_one, first_two = one["log"][0], two["log"][0]
    assert _rel_close(first_one["loss"], first_two["loss"]), (first_one, first_two)
    assert _rel_close(first_one["grad_norm"], first_two["grad_norm"]), (first_one, first_two)
    if optim == "adamw":
        for a, b in zip(one["log"], two["log"]):
            assert _rel_close(a["loss"], b["loss"]) and _rel_close(a["grad_norm"], b["grad_norm"]), (a, b)
        for name, p in one["params"].items():
            assert float((p - two["params"][name]).abs().max()) <= 1e-5, name
    else:
        _assert_lion_close(one["params"], two["params"], lr=1e-3, steps=DDP_STEPS)


def test_ddp_two_cpu_processes_match_one_with_the_cpp_impl(tmp_path, ddp_runs):
    # cpp (what auto picks on CPU) hands its kernel raw pointers, and both ranks may build it at
    # once; under DDP the grads are all-reduced in place between steps. Both runs are also held to
    # the single-process foreach run, so a step that went wrong everywhere shows too.
    one, two = (run["lion"] for run in _ddp_one_and_two(tmp_path, ["--optims", "lion", "--lion_impl", "cpp"]))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    foreach_one = ddp_runs[0]["lion"]
    for run in (one, two):
        _assert_lion_close(foreach_one["params"], run["params"], lr=1e-3, steps=DDP_STEPS)


# --------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 / ZeRO-3 (tests/launchers/deepspeed_lion.py; see its docstring for the rigged steps)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_reference")
    out = tmp / "one.pt"
    stdout = _run(
        [sys.executable, str(DEEPSPEED_SCRIPT), "--out", str(out), "--workdir", str(tmp / "w"), "--no_resume"],
        tmp,
        _env(),
    )
    assert "world_size=1" in stdout, stdout[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["zero2", "zero3"])
def ds_run(request, tmp_path_factory):
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    out = tmp / "ds.pt"
    output = _launch(
        ["--config_file", str(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml")],
        DEEPSPEED_SCRIPT,
        ["--out", str(out), "--workdir", str(tmp / "w")],
        tmp,
        _env(),
    )
    return stage, torch.load(out, weights_only=False), output


def test_deepspeed_wraps_lion(ds_run):
    stage, ds, output = ds_run
    zero_optimizer = "DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3"
    assert ds["world_size"] == 2 and ds["zero_stage"] == stage
    assert ds["distributed_type"] == "DistributedType.DEEPSPEED" and ds["engine"] == "DeepSpeedEngine"
    assert ds["optimizer_chain"] == ["DeepSpeedOptimizerWrapper", zero_optimizer, "Lion"]
    assert ds["lion_is_inner"]
    assert "untested optimizer" in output  # DeepSpeed's own word that it wraps a foreign optimizer


def test_zero_steps_lion_on_one_flat_partition_per_group(ds_run, ds_reference):
    stage, ds, _ = ds_run
    numel = {wd: 0 for wd in (ds["weight_decay"], 0.0)}
    count = dict.fromkeys(numel, 0)
    for name, p in ds_reference["snapshots"][0].items():
        wd = ds["weight_decay"] if name in ds["decay_names"] else 0.0
        numel[wd] += p.numel()
        count[wd] += 1
    stepped = {wd: [] for wd in numel}
    for calls in ds["calls_per_rank"]:
        # One step() per param group per training step; none at the skipped NaN step.
        assert [c["global_step"] for c in calls] == [1, 1, 2, 2, 4, 4]
        for call in calls:
            filled = [(wd, g) for wd, g in zip(call["weight_decay"], call["groups"]) if g]
            assert len(filled) == 1, call
            wd, [(dim, n, dtype)] = filled[0]
            assert (dim, dtype) == (1, "torch.float32"), call
            stepped[wd].append(n)
    for wd, sizes in stepped.items():
        # Each rank steps a shard: half the group, plus ZeRO's alignment padding.
        per_rank = sizes[0]
        assert set(sizes) == {per_rank}
        assert numel[wd] <= 2 * per_rank <= numel[wd] + 2 * (count[wd] + 8), (wd, per_rank, numel[wd])
    # Between steps ZeRO-3 leaves Lion's groups empty; ZeRO-2 keeps each group's partition.
    assert all(sizes == ([0, 0] if stage == 3 else [1, 1]) for sizes in ds["between_steps"]), ds["between_steps"]


def test_zero_keeps_the_no_decay_group(ds_run):
    # Step 1 has zero gradients and zero momentum: Lion only decays, w -> w * (1 - lr * wd).
    _, ds, _ = ds_run
    before, after = ds["snapshots"][0], ds["snapshots"][1]
    factor = 1 - ds["lr"] * ds["weight_decay"]
    no_decay = [n for n in before if n not in ds["decay_names"]]
    assert any(n.endswith("bias") for n in no_decay) and any("LayerNorm.weight" in n for n in no_decay)
    assert not [n for n in ds["decay_names"] if n.endswith("bias") or "LayerNorm" in n]
    for name in no_decay:
        assert torch.equal(after[name], before[name]), f"{name} was decayed"
    for name in ds["decay_names"]:
        assert not torch.equal(after[name], before[name]), name
        torch.testing.assert_close(after[name], before[name] * factor, rtol=1e-6, atol=0)


def test_nan_gradient_on_one_rank_skips_the_step_on_every_rank(ds_run, ds_reference):
    _, ds, _ = ds_run
    # The NaN went into the last rank's gradient, at an element another rank's partition holds.
    owners = ds["nan_element_owner"]
    assert owners.count(True) == 1 and owners[ds["nan_rank"]] is False, owners
    before, after = ds["snapshots"][2], ds["snapshots"][3]
    assert all(torch.equal(after[n], before[n]) for n in before), "the NaN step moved some weights"
    nan_step = ds["nan_step"]
    assert nan_step["lion_state_and_partition_unchanged"] == [True, True], nan_step
    # DeepSpeed's all-reduced gradient norm is non-finite on every rank, so its engine skips the
    # step everywhere before Lion is called (Lion's own skip_step never sees the NaN).
    assert nan_step["engine_skipped_steps"] == [1, 1], nan_step
    log = {e["step"]: e for e in ds["log"]}
    assert not torch.isfinite(torch.tensor(log[3]["grad_norm"]))
    # The one-process run skips the same step through Lion's skip_step; step 4 moves again.
    assert ds_reference["nan_step"]["lion_skipped_steps"] == [1]
    assert not all(torch.equal(ds["snapshots"][4][n], after[n]) for n in after)


def test_deepspeed_matches_one_process(ds_run, ds_reference):
    _, ds, _ = ds_run
    one = {e["step"]: e for e in ds_reference["log"]}
    for entry in ds["log"]:
        assert _rel_close(entry["loss"], one[entry["step"]]["loss"]), (entry, one[entry["step"]])
        if entry["step"] != 3:  # the NaN step: inf under DeepSpeed, nan from HF's clipping
            assert _rel_close(entry["grad_norm"], one[entry["step"]]["grad_norm"]), (entry, one[entry["step"]])
    for step in (1, 2, 3, 4):
        # Steps 2 and 4 move by sign; step 1 only decays and step 3 is skipped.
        _assert_lion_close(ds_reference["snapshots"][step], ds["snapshots"][step], lr=ds["lr"], steps=2)


def test_deepspeed_resume_reproduces_the_uninterrupted_run(ds_run):
    _, ds, _ = ds_run
    assert ds["resumed_steps"] == 4
    # The resumed log carries the checkpoint's history (steps 1-2) and then its own steps 3-4.
    resumed, uninterrupted_log = ({e["step"]: e for e in log} for log in (ds["resumed_log"], ds["log"]))
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[4]["loss"] == uninterrupted_log[4]["loss"]
    uninterrupted = ds["snapshots"][4]
    for name, p in ds["resumed_final"].items():
        assert torch.equal(p, uninterrupted[name]), name


# --------------------------------------------------------------------------------------
# The recipe itself under DeepSpeed (slow: DeepSpeed JIT-builds its CPU comm op on first use)
# --------------------------------------------------------------------------------------

WORDS = ["good", "great", "fine", "lovely", "bad", "awful", "poor", "dull", "movie", "film", "plot", "the", "a", "was"]


def _tiny_recipe_inputs(folder: Path) -> tuple[Path, Path]:
    from transformers import BertTokenizer

    model_dir, data_dir = folder / "model", folder / "data"
    model_dir.mkdir()
    data_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    tiny_bert().save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("validation", 16)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            word = ["bad", "awful", "poor", "dull", "good", "great", "fine", "lovely"][i % 2 * 4 + i % 4]
            filler = [WORDS[8 + int(j)] for j in torch.randint(0, 6, (3,), generator=gen)]
            rows.append(f"{' '.join(filler[:2])} {word} {filler[2]}\t{i % 2}")
        (data_dir / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return model_dir, data_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_runs_under_deepspeed_on_cpu(stage, tmp_path):
    model_dir, data_dir = _tiny_recipe_inputs(tmp_path)
    common = [
        "--model_name_or_path",
        str(model_dir),
        "--data_dir",
        str(data_dir),
        "--max_length",
        "16",
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--lion_impl",
        "foreach",
        "--learning_rate",
        "1e-3",
    ]
    _run(
        [
            sys.executable,
            str(RECIPE),
            *common,
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "true",
            "--output_dir",
            str(tmp_path / "one"),
        ],
        tmp_path,
        _env(),
    )
    # No --use_cpu: the recipe starts accelerate's state on gloo itself.
    output = _launch(
        ["--config_file", str(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml")],
        RECIPE,
        [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "ds")],
        tmp_path,
        _env(),
    )
    assert "untested optimizer" in output
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    ds = json.loads((tmp_path / "ds" / "run.json").read_text())
    assert (one["world_size"], ds["world_size"]) == (1, 2)
    assert one["global_batch_size"] == ds["global_batch_size"] == 8
    assert ds["steps"] == one["steps"] == 3
    first_one, first_ds = one["history"]["train"][0], ds["history"]["train"][0]
    assert _rel_close(first_one["loss"], first_ds["loss"]), (first_one, first_ds)
    assert abs(one["weights_changed_fraction"] - ds["weights_changed_fraction"]) <= 0.005


# --------------------------------------------------------------------------------------
# FSDP2: torch's fully_shard (accelerate's FSDP path needs GPUs)
# --------------------------------------------------------------------------------------


def test_lion_on_fsdp2_dtensor_shards(tmp_path):
    # Each impl against an unsharded replica, skip_step agreement and DCP resume (see the script).
    stdout = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(FSDP2_SCRIPT),
        ],
        tmp_path,
        _env(),
    )
    for impl in ("for_loop", "foreach", "cpp"):
        assert f"{impl}: sharded=True max_diff=" in stdout, stdout
    assert "skip_step: verdicts=[(1, True), (1, True)]" in stdout, stdout
    assert "dcp resume: key types=['str'] same=True" in stdout, stdout
    assert "FAILED" not in stdout, stdout
