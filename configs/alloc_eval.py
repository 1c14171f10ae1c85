"""The config of wisp_jax/configs/alloc_eval.py (its docstring: how to run it)."""
from wisp_jax.configs.alloc_eval import get_config  # noqa: F401
