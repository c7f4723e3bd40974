"""Benchmarks of the tagging pipeline against its targets (DESIGN.md): ratios measured side by side, never in tests."""
