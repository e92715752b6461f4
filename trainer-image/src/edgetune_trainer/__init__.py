"""edgetune's trainer: fine-tune a frozen base model with LoRA on node-local data within budgets,
then package, sign and upload the adapter delta. Run as ``python -m edgetune_trainer``."""
