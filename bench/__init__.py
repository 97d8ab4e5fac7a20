"""Benchmarks: run as programs (``python -m bench.NAME``), print distributions, never pass or fail."""
