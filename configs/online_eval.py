"""The config of wisp_jax/configs/online_eval.py (its docstring: how to run it)."""
from wisp_jax.configs.online_eval import get_config  # noqa: F401
