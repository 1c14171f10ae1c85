r"""Replays a routing trace and predicts decode speed; see configs/simulate.py.

  .venv/bin/python experiments/simulate.py --config=configs/simulate.py \
      --workdir=workdirs/simulate
"""

from wisp_jax import launch
from wisp_jax.runs import simulate

if __name__ == "__main__":
  launch.main(simulate.run, simulate.report)
