"""Benchmarks for Nexus: `python -m bench.pipeline` and the micro suite (`python -m pytest bench/ -q`)."""
