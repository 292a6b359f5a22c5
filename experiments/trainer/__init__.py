"""The pieces of the trainer: optimizer, train / eval steps, checkpoints, metric logging."""
