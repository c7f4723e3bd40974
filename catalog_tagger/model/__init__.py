"""The multi-head model: backbone registry, the model, its artifact on disk, and inference helpers."""
