r"""Compile time of the decode step vs depth; see configs/compile_bench.py.

  .venv/bin/python experiments/compile_bench.py \
      --config=configs/compile_bench.py --workdir=workdirs/compile_bench
"""

from wisp_jax import launch
from wisp_jax.runs import compile_bench

if __name__ == "__main__":
  launch.main(compile_bench.run)
