"""Models, the training loop, tuning (Optuna) and data-parallel training."""
