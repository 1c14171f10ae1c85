"""The config of wisp_jax/configs/simulate.py (its docstring: how to run it)."""
from wisp_jax.configs.simulate import get_config  # noqa: F401
