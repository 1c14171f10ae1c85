"""The config of wisp_jax/configs/decode.py (its docstring: how to run it)."""
from wisp_jax.configs.decode import get_config  # noqa: F401
