"""Training: labels table + tasks.yaml -> a multi-head model artifact; ``pipeline.train`` is the entry point.

config (TrainConfig) -> labels (table -> targets) -> data (decode once; batches; augmentation) -> split ->
loop.fit (losses, evaluate, progress), or distributed (the same fit on Ray Train workers) -> evaluate (thresholds
on val, metrics on test) -> outputs (split.parquet, metrics.csv, training_report.json) -> compare (--single-task).
"""
