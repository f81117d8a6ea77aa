"""The experiments layer: what the recipes use to compare Lion with AdamW, not part of the optimizer.

* :mod:`lion_hf.experiments.arguments`: the recipes' argument dataclasses and their parser (configs, the
  defaults settled after parsing, the compact ``--help``).
* :mod:`lion_hf.experiments.checkpoints`: which checkpoint a run resumes from, verified before anything is
  recorded or deleted.
* :mod:`lion_hf.experiments.finetune`: one fine-tuning run (``recipes/finetune_sentiment.py``).
* :mod:`lion_hf.experiments.study`: many runs and their report (``recipes/compare_optimizers.py``).
* :mod:`lion_hf.experiments.data`: sentiment datasets (Hub tasks, local files read through
  ``datasets.load_dataset``, and an offline default), as ``text``/``label`` splits, checked.
* :mod:`lion_hf.experiments.metrics`: accuracy and macro-F1, also as a local ``evaluate`` module.
* :mod:`lion_hf.experiments.records`: :class:`RunRecord`, the schema of one run's ``run.json``.
* :mod:`lion_hf.experiments.tracking`: Trainer callbacks (history, memory, bytes, progress).
* :mod:`lion_hf.experiments.report`: Markdown/JSON/PNG reports over many run records.

The core (``lion_hf.optim``, ``lion_hf.trainer``, ``lion_hf.training_args``,
``lion_hf.param_groups``) never imports this package; ``tests/test_layout.py`` checks that.
"""

import importlib.util
import logging
import os

# The packages of the `recipes` extra. Checked here, when the layer is first imported, so that a missing
# one stops a study before its first run, not at the report after hours of training.
RECIPES_EXTRA = {"datasets": "datasets", "evaluate": "evaluate", "peft": "peft", "matplotlib": "matplotlib",
                 "yaml": "pyyaml"}



def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a module left half-imported
        return False


_missing = sorted(dist for module, dist in RECIPES_EXTRA.items() if not _installed(module))
if _missing:
    raise ImportError(
        f"lion_hf.experiments and the recipes need {', '.join(_missing)}, which are not installed: "
        'pip install "lion_hf[recipes]"'
    )


def _quiet_third_party_startup() -> None:
    """Silence two start-up messages that do not concern a recipe run, before the libraries that print them load.

    DeepSpeed, which accelerate imports whenever it is installed, warns "Setting accelerator to CPU" on every
    machine without a GPU, DeepSpeed run or not; naming the CPU accelerator it would pick anyway skips that
    detection. bitsandbytes, which peft imports, warns that its optional 4-bit CPU kernel package is missing.
    """
    import torch

    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


_quiet_third_party_startup()
