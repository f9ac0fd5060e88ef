"""Benchmarks for prelabel: `python -m benchmarks.run` (see benchmarks/README.md). Not imported by the tests."""
