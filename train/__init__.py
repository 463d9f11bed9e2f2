"""The trainer: model, losses, distributed loop, checkpoints and evaluation."""
