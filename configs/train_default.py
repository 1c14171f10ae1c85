"""The config of wisp_jax/configs/train_default.py (its docstring: how to run it)."""
from wisp_jax.configs.train_default import get_config  # noqa: F401
