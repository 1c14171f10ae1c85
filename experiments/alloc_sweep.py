r"""MV-WSA vs oracle vs fixed splits; see configs/alloc_sweep.py.

  .venv/bin/python experiments/alloc_sweep.py --config=configs/alloc_sweep.py \
      --workdir=workdirs/alloc_sweep
"""

from wisp_jax import launch
from wisp_jax.runs import alloc_sweep as sweep

if __name__ == "__main__":
  launch.main(sweep.run)
