"""Benchmarks of the pipeline against its targets (bench/README.md): ratios measured side by side, never in tests."""
