"""tinyllm-jax: multi-teacher reasoning distillation into T5 students, in JAX."""

__version__ = "0.1.0"
