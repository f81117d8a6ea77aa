"""Every documented command: the shell commands of README.md, docs/*.md and the recipes' -h examples, the README's
Python snippets, the paths the docs cite, and the lrs the docs give against the one table.

The default run checks what is cheap for every command: its recipe arguments parse as the recipe parses them
(a study config given to the single-run recipe, the failure a new user met, is caught here), the files it names
exist, the -h examples run; and it runs the README's Python snippets, each in a fresh process, on a tiny model
(the loading snippet on a folder that the README's own fine-tune command wrote). With ``-m slow`` every command
runs, with small limits appended (``--max_steps 2`` and small data subsets), ``accelerate launch`` included.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_recipes
from test_recipes import subprocess_env

from lion_hf.experiments import study
from lion_hf.experiments.arguments import (
    MEASURED_LEARNING_RATES,
    field_option_names,
    format_lr,
    parse_single_run_args,
)

# The recipe tests' tiny encoder and sentences (module-scoped fixtures).
tiny_model_dir = test_recipes.tiny_model_dir
tiny_encoder_dir = test_recipes.tiny_encoder_dir
tiny_data_dir = test_recipes.tiny_data_dir

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RECIPES = [REPO / "recipes" / "finetune_sentiment.py", REPO / "recipes" / "compare_optimizers.py"]
SHARED_DATA = REPO.parent / "shared" / "data"
# Options whose value is a folder or file the command writes, not one it reads.
OUTPUT_OPTIONS = {"--output_dir", "--output-dir", "--out"}
# Commands a test cannot run, each with the reason; anything else documented must run.
NOT_RUN = {
    "pip": "installs packages (needs the package index)",
    "sudo": "needs root: it builds network namespaces and a shaped veth pair",
    "python -m pytest": "the test suite itself",
}
# Placeholders of documented commands and what a test substitutes for them (relative to its work folder).
PLACEHOLDERS = {"OUT_DIR": "placeholder_out", "WORK_DIR": "placeholder_work"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # as documented, continuation lines joined, comments dropped

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _logical_lines(block: str, first_line: int):
    """(line number, command) of a shell block: continuation lines joined, comments and blank lines dropped."""
    pending, start = "", first_line
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(pending + line, comments=True)
        pending = ""
        if tokens:
            yield start, shlex.join(tokens)


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"^```(bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
            first = text[: match.start(2)].count("\n") + 1
            for line, command in _logical_lines(match.group(2), first):
                commands.append(Command(f"{doc.relative_to(REPO)}:{line}", command))
    for recipe in RECIPES:
        doc = recipe.read_text().split('"""')[1]
        examples = doc.split("examples:\n", 1)[1].split("\n\n", 1)[0]
        for line in examples.splitlines():
            if line.strip().startswith(("python ", "accelerate ", "torchrun ")):
                commands.append(Command(f"{recipe.relative_to(REPO)} -h", shlex.join(shlex.split(line, comments=True))))
    return commands


def not_run_reason(command: Command) -> str | None:
    for prefix, reason in NOT_RUN.items():
        if command.text.startswith(prefix):
            return reason
    return None


def split_command(argv: list[str]) -> tuple[dict[str, str], list[str], str, list[str]]:
    """(environment assignments, launcher tokens, script, script arguments) of a python / accelerate command."""
    env = {}
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    script_at = next(i for i, token in enumerate(argv) if token.endswith(".py"))
    return env, argv[:script_at], argv[script_at], argv[script_at + 1:]


def cited_paths(argv: list[str]) -> list[str]:
    """The repository paths a command reads (not what it writes: values of --output_dir and friends)."""
    paths = []
    for before, token in zip(["", *argv], argv):
        if before in OUTPUT_OPTIONS or token.startswith("runs/") or token in PLACEHOLDERS:
            continue
        if re.match(r"(recipes|docs|tests|scripts|lion_hf|\.\./shared)/", token):
            paths.append(token)
    return paths


COMMANDS = documented_commands()


def test_the_commands_are_found():
    texts = [c.text for c in COMMANDS]
    assert "python recipes/compare_optimizers.py" in texts
    assert any(t.startswith("python recipes/finetune_sentiment.py") for t in texts)
    assert sum(c.where.endswith(" -h") for c in COMMANDS) >= 8 and len(COMMANDS) >= 30


# ---------------------------------------------------------------- default run: cheap checks of every command


def _check_recipe_arguments(script: str, args: list[str], tmp: Path) -> None:
    if script.endswith("finetune_sentiment.py"):
        if not {"-h", "--help", "--help_all"} & set(args):
            parse_single_run_args([*args, "--output_dir", str(tmp / "run")])
        return
    cut = args.index("--") if "--" in args else len(args)
    argv = [*args[:cut], "--output_dir", str(tmp / "study"), "--report_only", *args[cut:]]
    # --report_only parses the whole study (config, every run's arguments) and then finds nothing finished.
    with pytest.raises(study.StudyConfigError, match="no finished runs"):
        study.main(argv, default_config=REPO / "recipes" / "configs" / "offline_default.yaml")


def test_every_documented_command_parses_and_names_files_that_exist(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(REPO)  # the docs' relative paths (recipes/..., ../shared/data/...) are from the checkout
    failures = []
    for n, command in enumerate(COMMANDS):
        if not_run_reason(command):
            continue
        argv = command.argv
        missing = [p for p in cited_paths(argv) if not (REPO / p).exists()]
        if missing and not (all(p.startswith("../shared") for p in missing) and not SHARED_DATA.is_dir()):
            failures.append(f"{command}\n    names missing files: {missing}")
            continue
        _, _, script, args = split_command(argv)
        if not script.startswith("recipes/"):
            continue
        if any(str(p).startswith("../shared") for p in cited_paths(args)) and not SHARED_DATA.is_dir():
            continue
        try:
            _check_recipe_arguments(script, args, tmp_path / str(n))
        except Exception as exc:  # every failure is reported, with its command
            failures.append(f"{command}\n    {type(exc).__name__}: {exc}")
    assert not failures, "documented commands that no longer run:\n" + "\n".join(failures)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_the_recipes_help_runs_and_shows_its_examples(recipe, monkeypatch):
    for option in ("-h", "--help_all") if recipe.name == "finetune_sentiment.py" else ("-h",):
        monkeypatch.setattr(sys, "argv", [str(recipe), option])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(recipe), run_name="__main__")
        assert exit_.value.code in (0, None), option
        assert "examples:" in printed.getvalue() and "python recipes/" in printed.getvalue()


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_paths_and_anchors_the_docs_cite_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                missing.append(f"{doc.name}: link {target}")
            elif anchor and file.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in headings:
                    missing.append(f"{doc.name}: link {target} (no such heading)")
        for path in re.findall(r"`((?:recipes|docs|tests|scripts|lion_hf)/[\w./-]+)`", text):
            if not (REPO / path).exists() and not path.startswith("runs/"):
                missing.append(f"{doc.name}: `{path}`")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------- the README's Python snippets, fresh processes


def readme_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


PRELUDE = """
import sys
sys.path.insert(0, {tests!r})
import torch
from transformers import Trainer, TrainingArguments
from tiny_models import TokenDataset, tiny_bert

model, train = tiny_bert(), TokenDataset(n=32)
args = TrainingArguments(output_dir="prelude_out", max_steps=2, per_device_train_batch_size=8, report_to="none",
                         use_cpu=True, save_strategy="no")
"""
EPILOGUE = """
if "trainer" in globals():
    trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps > 0
elif "optimizer" in globals():
    batch = {k: torch.stack([train[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    before = [p.detach().clone() for p in model.parameters()]
    model(**batch).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
print("SNIPPET OK")
"""


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)


def test_each_readme_snippet_runs_in_a_fresh_process(tmp_path, tiny_encoder_dir, tiny_data_dir):
    snippets = readme_snippets()
    loaders = [s for s in snippets if "pipeline(" in s]
    assert len(loaders) == 1 and len(snippets) >= 4
    # The folder the loading snippet reads is the one the README's fine-tune command writes: run that command
    # (on the tiny encoder and sentences, 2 steps) in a work folder, then the snippet there.
    folder = re.search(r'model="([^"]+)"', loaders[0]).group(1)
    command = next(c for c in COMMANDS if c.where.startswith("README.md") and f"--output_dir {folder}" in c.text)
    _, _, script, args = split_command(command.argv)
    run = subprocess.run(
        [sys.executable, str(REPO / script), *args, "--model_name_or_path", str(tiny_encoder_dir), "--data_dir",
         str(tiny_data_dir), "--max_length", "16", "--max_steps", "2", "--per_device_train_batch_size", "8",
         "--disable_tqdm", "true", "--lion_impl", "foreach"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"model and tokenizer saved in {folder}" in run.stdout.strip().splitlines()[-1]
    for n, snippet in enumerate(snippets):
        work = tmp_path / f"snippet{n}"
        work.mkdir()
        if snippet in loaders:
            (work / folder).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder).rename(work / folder)
            code = snippet
        else:
            code = PRELUDE.format(tests=str(REPO / "tests")) + snippet + EPILOGUE
        result = _run_python(code, work)
        assert result.returncode == 0, f"README snippet {n}:\n{snippet}\n{result.stderr[-3000:]}"
        assert "disagrees" not in result.stderr, result.stderr
        if snippet in loaders:
            assert "'label':" in result.stdout and "'score':" in result.stdout, result.stdout
        else:
            assert "SNIPPET OK" in result.stdout


# ---------------------------------------------------------------- one lr story


def _flat(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_the_docs_give_each_setup_the_lr_of_the_table():
    t = {key: format_lr(lr) for key, lr in MEASURED_LEARNING_RATES.items()}
    assert MEASURED_LEARNING_RATES[("lion_majority", False)] == 2 * MEASURED_LEARNING_RATES[("lion", False)]
    readme, recipes_md, dlion = _flat(REPO / "README.md"), _flat(REPO / "docs/recipes.md"), _flat(
        REPO / "docs/distributed_lion.md")
    assert (f"An unset lr is the measured default: Lion {t['lion', False]} / AdamW {t['adamw', False]} for a full "
            f"fine-tune, {t['lion', True]} / {t['adamw', True]} with LoRA (`--use_peft true`), "
            f"{t['lion_majority', False]} for each DistributedLion vote") in readme
    assert re.search(rf"Lion\(model\.parameters\(\), lr={t['lion', False]},", readme)
    assert re.search(rf'LionTrainingArguments\(output_dir="out", learning_rate={t["lion", False]},', readme)
    for text in (readme, dlion):  # every snippet that turns a vote on gives it the vote's lr
        for lr in re.findall(r"(?:lr|learning_rate)=([\d.e-]+),[^)]*?(?:lion_distributed|vote)=", text):
            assert lr == t["lion_majority", False], lr
    assert f"the lr these docs and the README give a vote is {t['lion_majority', False]}, 2x Lion's " \
           f"{t['lion', False]}" in dlion
    rows = {
        "| `--optim lion` (and HF's `lion_32bit`, `lion_8bit`, ...) |": (t["lion", False], t["lion", True]),
        "| `--optim adamw` (and HF's `adamw_*`) |": (t["adamw", False], t["adamw", True]),
        "| `--optim lion --lion_distributed majority`, several processes |": (t["lion_majority", False],
                                                                              f"{t['lion', True]} (Lion's"),
        "| `--optim lion --lion_distributed average`, several processes |": (t["lion_average", False],
                                                                             f"{t['lion', True]} (Lion's"),
    }
    for row, (full, lora) in rows.items():
        assert f"{row} {full} | {lora}" in recipes_md, row


# ---------------------------------------------------------------- -m slow: every command runs


def _limits(script: str, args: list[str]) -> list[str]:
    """Small limits appended to a command (argparse keeps the last value of an option given twice)."""
    if script.endswith("finetune_sentiment.py"):
        return ["--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32", "--save_steps", "1",
                "--disable_tqdm", "true"]
    if script.endswith("compare_optimizers.py"):
        return ["--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32"]
    if "bench_" in script:
        return ["--steps", "1", "--rounds", "1"]
    return []


def _runnable(command: Command, work: Path, n: int) -> list[str]:
    env, launcher, script, args = split_command(command.argv)
    args = [str(work / a) if a.startswith("runs/") else str(work / PLACEHOLDERS[a]) if a in PLACEHOLDERS else a
            for a in args]
    if script.endswith("compare_optimizers.py"):
        cut = args.index("--") if "--" in args else len(args)
        args = [*args[:cut], "--output_dir", str(work / f"study{n}"), "--seeds", "0", "--", *args[cut + 1:],
                *_limits(script, args)]
    elif script.startswith("recipes/"):
        named = any(a in OUTPUT_OPTIONS for a in args)
        args = [*args, *_limits(script, args), *([] if named else ["--output_dir", str(work / f"run{n}")])]
    else:
        args = [*args, *_limits(script, args), *(["--out", str(work / f"bench{n}")] if "bench_" in script else [])]
    if launcher[:2] == ["accelerate", "launch"]:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *launcher[2:]]
    else:
        launcher = [sys.executable, *launcher[1:]]
    return [f"{k}={v}" for k, v in env.items()] + launcher + [script, *args]


DOC_FILES = sorted({c.where.split(":")[0].split(" ")[0] for c in COMMANDS})


@pytest.mark.slow
@pytest.mark.parametrize("source", DOC_FILES)
def test_every_documented_command_runs(source, tmp_path):
    """The commands of one file, in its order (a resume follows the run it resumes), with small limits."""
    failures = []
    for n, command in enumerate(c for c in COMMANDS if c.where.startswith(source)):
        if not_run_reason(command):
            continue
        if "../shared" in command.text and not SHARED_DATA.is_dir():
            continue
        argv = _runnable(command, tmp_path, n)
        env = {**subprocess_env(), **dict(a.split("=", 1) for a in argv if re.fullmatch(r"[A-Z_]+=\S*", a))}
        argv = [a for a in argv if not re.fullmatch(r"[A-Z_]+=\S*", a)]
        if "checkpoint-" in " ".join(argv):  # a resume from a named checkpoint: the last one the run above kept
            argv = [re.sub(r"checkpoint-\d+$", "checkpoint-2", a) for a in argv]
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            failures.append(f"{command}\n    {shlex.join(argv)}\n{(result.stdout + result.stderr)[-2000:]}")
    assert not failures, "\n".join(failures)


def test_the_run_options_the_limits_use_exist():
    names = set(field_option_names())
    for option in _limits("recipes/finetune_sentiment.py", []) + _limits("recipes/compare_optimizers.py", []):
        assert not option.startswith("--") or option[2:] in names, option
