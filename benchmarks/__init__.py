"""Benchmarks for mongo-events: ``python -m benchmarks [--quick] [--json]``."""
