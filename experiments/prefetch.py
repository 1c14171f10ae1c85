r"""What prefetching is worth; see configs/prefetch.py.

  .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py \
      --workdir=workdirs/prefetch
"""

from wisp_jax import launch
from wisp_jax.runs import prefetch

if __name__ == "__main__":
  launch.main(prefetch.run, prefetch.report)
