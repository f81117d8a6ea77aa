"""Fine-tune a transformer on a sentiment task with Lion or AdamW: one run, its record in OUTPUT_DIR/run.json.

examples:
  python recipes/finetune_sentiment.py                        # Lion, offline: MiniLM-L6 + movie sentences
  python recipes/finetune_sentiment.py --optim adamw --output-dir runs/adamw
  python recipes/finetune_sentiment.py recipes/configs/sst2_local.yaml --optim lion --learning_rate 5e-5
  python recipes/finetune_sentiment.py --use_peft true        # LoRA (lr default: lion 1e-3, adamw 2e-3)
  python recipes/finetune_sentiment.py --output_dir runs/x --resume_from_checkpoint true
  accelerate launch --multi_gpu --num_processes 2 recipes/finetune_sentiment.py   # 2 processes, one DDP job
    (on a machine without GPUs the processes train as one CPU DDP job over gloo; torchrun works the same)

A YAML/JSON config may come first: its keys are the options below, and options after it override it.
Unset, --learning_rate is the measured default for the optimizer and mode, and --output_dir a new
runs/finetune_sentiment/<date>_<time> folder, so a second run never collides with the first.
"""

from lion_hf.experiments.finetune import main

if __name__ == "__main__":
    main(description=__doc__)
