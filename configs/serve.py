"""The config of wisp_jax/configs/serve.py (its docstring: how to run it)."""
from wisp_jax.configs.serve import get_config  # noqa: F401
