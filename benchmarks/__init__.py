"""The speed benchmark suite (``python -m aitk_inference.benchmarks.run``); BENCHMARKS.md has the method and results."""
