"""The config of wisp_jax/configs/tier_split.py (its docstring: how to run it)."""
from wisp_jax.configs.tier_split import get_config  # noqa: F401
