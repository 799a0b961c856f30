"""Training: the step (train_module), the loop (trainer), schedules, metrics, FLOPs."""
