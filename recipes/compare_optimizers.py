"""Lion vs AdamW under identical conditions: every setup x lr x seed of a config, then one report.

examples:
  python recipes/compare_optimizers.py                     # offline default, minutes on 2 CPU cores
  python recipes/compare_optimizers.py recipes/configs/sst2_local.yaml --output-dir runs/sst2
  python recipes/compare_optimizers.py recipes/configs/sst2_local.yaml --seeds 0 -- --max_steps 50
  accelerate launch --multi_gpu --num_processes 2 recipes/compare_optimizers.py   # each run on both processes

The config (YAML) has `common` arguments of recipes/finetune_sentiment.py shared by every run, `seeds`,
`target_accuracy`, `title`, an optional `sweep` of one argument, and per setup under `optimizers` a
`learning_rate` grid, a `weight_decay`, an `optim` (default: the setup's name) and extra `args`; Lion may say
`scale_from_adamw: k` to take AdamW's grid / k and weight decay * k. Runs of one seed share the data order and
classifier-head init whatever the optimizer. Writes one folder per run (run.json) and report.md,
report.json and plots into --output_dir.

Arguments after `--` go to every run; one that a setup's `args` or the sweep sets is refused, as are repeated
seeds or learning rates (or lrs that print alike).

Rerunning the same command finishes a study: a run whose run.json was written with the same arguments is
reused, one that stopped after a checkpoint of the same arguments resumes, any other starts from scratch.
"""

from pathlib import Path

from lion_hf.experiments.study import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "offline_default.yaml"

if __name__ == "__main__":
    main(default_config=DEFAULT_CONFIG, description=__doc__)
