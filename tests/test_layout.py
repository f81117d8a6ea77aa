"""The package's layers: the core never imports the experiments layer, and inside lion_hf/optim
imports flow one way (numerics at the bottom, the impls above it, the dispatcher and the class on
top), with no private name imported from another module."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lion_hf"
OPTIM = PACKAGE / "optim"

# Which lion_hf.optim modules each module may import (lazily or not): the layering, bottom to top.
ALLOWED = {
    "options": set(),
    "numerics": {"options"},
    "signs": {"options"},
    "cpu_kernel_build": set(),
    "validation": {"options", "numerics"},
    "for_loop": {"numerics", "signs"},
    "foreach": {"numerics", "signs"},
    "triton_kernel": {"options", "numerics", "signs"},
    "cpu_kernel": {"numerics", "cpu_kernel_build"},
    "dispatch": {"options", "numerics", "signs", "validation", "for_loop", "foreach", "cpu_kernel", "cpu_kernel_build",
                 "triton_kernel"},
    "lion": {"options", "numerics", "validation", "dispatch"},
    # DistributedLion runs its passes through the dispatcher: it imports no impl.
    "distributed": {"options", "numerics", "signs", "validation", "dispatch", "lion"},
    # Gradient release steps buckets of params through the dispatcher's prepare and apply stages.
    "release": {"options", "numerics", "validation", "dispatch", "lion"},
    "__init__": {"options", "dispatch", "lion", "distributed", "release"},
}
IMPL_MODULES = {"for_loop", "foreach", "cpu_kernel", "cpu_kernel_build", "triton_kernel"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import in the file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "lion_hf.optim":  # `from lion_hf.optim import cpu_kernel_build`
                found += [(f"lion_hf.optim.{alias.name}", []) for alias in node.names]
            else:
                found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_core_modules_do_not_import_the_experiments_layer():
    core = [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]
    assert len(core) >= 12, core  # __init__, optim/*, trainer, training_args, param_groups
    for path in core:
        for module, _ in _imports(path):
            assert not module.startswith("lion_hf.experiments"), f"{path} imports {module}"


def test_optim_modules_import_only_the_layers_below_them():
    modules = {p.stem for p in OPTIM.glob("*.py")}
    assert modules == set(ALLOWED), f"a module was added or removed: update the layering: {modules ^ set(ALLOWED)}"
    for name in sorted(modules):
        imported = {module.removeprefix("lion_hf.optim.") for module, _ in _imports(OPTIM / f"{name}.py")
                    if module.startswith("lion_hf.optim.")}
        assert imported <= ALLOWED[name], f"lion_hf/optim/{name}.py imports {sorted(imported - ALLOWED[name])}"
        assert not any(module.startswith("lion_hf.") and not module.startswith("lion_hf.optim")
                       for module, _ in _imports(OPTIM / f"{name}.py")), f"{name} imports outside lion_hf.optim"


def test_only_the_dispatcher_calls_an_impl():
    """Lion, lion() and DistributedLion step through dispatch (prepare_step, apply_step, vote_signs,
    vote_apply): none of them imports an impl's module, lazily or not, nor names an impl's function."""
    impl_functions = {"for_loop_lion", "for_loop_signs", "for_loop_vote_apply", "foreach_lion", "foreach_signs",
                      "foreach_vote_apply", "cpp_lion", "cpp_signs", "cpp_vote_apply", "triton_lion",
                      "sign_vote_kernels", "kernel"}
    for name in ("lion", "distributed", "release"):
        imported = {module.removeprefix("lion_hf.optim.") for module, _ in _imports(OPTIM / f"{name}.py")}
        assert not imported & IMPL_MODULES, f"{name}.py imports {sorted(imported & IMPL_MODULES)}"
        tree = ast.parse((OPTIM / f"{name}.py").read_text())
        called = {node.attr if isinstance(node, ast.Attribute) else node.id
                  for node in ast.walk(tree) if isinstance(node, (ast.Attribute, ast.Name))}
        assert not called & impl_functions, f"{name}.py names {sorted(called & impl_functions)}"


def test_no_private_name_is_imported_from_another_module():
    for path in PACKAGE.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("lion_hf"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(PACKAGE)} imports private {private} from {module}"


def test_importing_the_whole_core_loads_no_experiments_module():
    code = (
        "import sys, lion_hf, lion_hf.trainer, lion_hf.training_args, lion_hf.param_groups, lion_hf.optim.lion\n"
        "lion_hf.LionTrainer\n"
        "bad = sorted(m for m in sys.modules if m.startswith('lion_hf.experiments'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
