r"""The online controller vs fixed splits; see configs/online.py.

  .venv/bin/python experiments/online.py --config=configs/online.py \
      --workdir=workdirs/online
"""

from wisp_jax import launch
from wisp_jax.runs import online as online_bench

if __name__ == "__main__":
  launch.main(online_bench.run)
