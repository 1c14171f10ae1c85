r"""Splits a device budget between expert slots and KV; see configs/allocate.py.

  .venv/bin/python experiments/allocate.py --config=configs/allocate.py \
      --workdir=workdirs/allocate
"""

from wisp_jax import launch
from wisp_jax.runs import allocate

if __name__ == "__main__":
  launch.main(allocate.run)
