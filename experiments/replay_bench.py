r"""Replay speed per policy; see configs/replay_bench.py.

  .venv/bin/python experiments/replay_bench.py \
      --config=configs/replay_bench.py --workdir=workdirs/replay_bench
"""

from wisp_jax import launch
from wisp_jax.runs import replay_bench

if __name__ == "__main__":
  launch.main(replay_bench.run)
