"""The config of wisp_jax/configs/gpu_bench.py (its docstring: how to run it)."""
from wisp_jax.configs.gpu_bench import get_config  # noqa: F401
