"""What a training run needs besides the adapter and the data (used by `train_text_to_image.py` and the app).

    config_file.py      `--config` TOML / YAML / JSON files
    optimizers.py       `--optimizer` choices (AdamW, 8-bit AdamW, Adafactor, Prodigy, schedule-free)
    lora_plus.py        LoRA+ parameter groups
    run_folder.py       the output folder: what a run wrote, nested-output checks
    run_safety.py       finite tensors, one run per folder, resume settings
    validation_loss.py  training loss and the validation loss of the training-time and merged model
    model_card.py       the README.md model card beside a trained adapter
    race_plot.py        validation-loss curves of runs and their figure
"""
