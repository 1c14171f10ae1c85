r"""Trains the byte-level MoE model; see configs/train_default.py.

  .venv/bin/python experiments/train.py --config=configs/train_default.py \
      --workdir=workdirs/train_default
"""

from wisp_jax import launch
from wisp_jax.runs import train

if __name__ == "__main__":
  launch.main(train.run)
