"""The config of wisp_jax/configs/demo.py (its docstring: how to run it)."""
from wisp_jax.configs.demo import get_config  # noqa: F401
