r"""MV-WSA alone vs the exact oracle on held-out workloads; see
configs/alloc_eval.py.

  .venv/bin/python experiments/alloc_eval.py --config=configs/alloc_eval.py \
      --workdir=workdirs/alloc_eval
"""

from wisp_jax import launch
from wisp_jax.runs import alloc_eval

if __name__ == "__main__":
  launch.main(alloc_eval.run)
