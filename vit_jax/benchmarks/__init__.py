"""Speed measurements: the timing harness (`vit_jax.inference_time` and the
benchmark scripts use it)."""
