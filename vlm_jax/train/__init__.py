"""Training: optimiser and parameter groups, the pure train step, checkpoints and the loop."""
