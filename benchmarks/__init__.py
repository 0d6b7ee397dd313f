"""Benchmarks that print measured tables; run each from the repository root: python -m benchmarks.NAME --help."""
