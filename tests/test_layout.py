"""The package's two layers: the core (optimizer, Trainer integration) never imports the experiments layer."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lion_hf"


def test_core_modules_do_not_import_the_experiments_layer():
    core = [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]
    assert len(core) >= 8, core  # __init__, optim/*, trainer, training_args, param_groups
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("lion_hf.experiments") for n in names), f"{path} imports {names}"


def test_importing_the_whole_core_loads_no_experiments_module():
    code = (
        "import sys, lion_hf, lion_hf.trainer, lion_hf.training_args, lion_hf.param_groups, lion_hf.optim.lion\n"
        "lion_hf.LionTrainer\n"
        "bad = sorted(m for m in sys.modules if m.startswith('lion_hf.experiments'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
