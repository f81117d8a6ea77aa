"""Fine-tune a transformer on a sentiment task with Lion or AdamW: one run, kept in OUTPUT_DIR (model, tokenizer,
run.json).

examples:
  python recipes/finetune_sentiment.py                        # Lion, offline: MiniLM-L6 + movie sentences, minutes
  python recipes/finetune_sentiment.py --optim adamw --output-dir runs/adamw
  python recipes/finetune_sentiment.py recipes/configs/single_sst2_local.yaml --optim lion --learning_rate 5e-5
  python recipes/finetune_sentiment.py --use_peft true        # LoRA (lr default: lion 1e-3, adamw 2e-3)
  python recipes/finetune_sentiment.py --num_train_epochs 3   # a longer run is one you ask for
  accelerate launch --multi_gpu --num_processes 2 recipes/finetune_sentiment.py   # 2 processes, one DDP job
    (on a machine without GPUs the processes train as one CPU DDP job over gloo; torchrun works the same)

A YAML/JSON config of these options may come first, and options after it override it (a study config is
for recipes/compare_optimizers.py). Unset, the run is short (1 epoch at batch 32; on the offline data the
main job's 2,400 rows), --learning_rate is the measured default for the optimizer and mode, and --output_dir
a new runs/finetune_sentiment/<date>_<time> folder, so a second run never collides with the first. The model
and tokenizer are saved there at the end, whatever --save_strategy says; the last line says how to load them.
"""

from lion_hf.experiments.finetune import main

if __name__ == "__main__":
    main(description=__doc__)
