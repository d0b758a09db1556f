"""Benchmarks of tinyllm-jax against the reference systems; run `python -m benchmarks.run`."""
