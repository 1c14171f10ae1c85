r"""Trains the byte-level MoE model; see configs/train_default.py.

  .venv/bin/python experiments/train.py --config=configs/train_default.py \
      --workdir=workdirs/train_default
"""

from wisp_jax import launch
from wisp_jax.models import training

if __name__ == "__main__":
  launch.main(training.run)
