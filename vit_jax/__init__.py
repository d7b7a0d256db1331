"""vit_jax: Vision Transformers in JAX/Flax, compatible with Google's vit_jax."""

__version__ = '0.1.0'
