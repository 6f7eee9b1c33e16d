"""The library's private modules; the public names are in ``epi_jax/__init__.py``."""
