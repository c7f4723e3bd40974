"""Deterministic synthetic product catalog (images + labels + truth) for the demo, tests and benchmarks."""
