"""Cross-backend benchmark suite: ``python -m benchmarks --help``."""
