"""Training: labels table -> multi-head artifact (single-task comparison, Ray Train path)."""
