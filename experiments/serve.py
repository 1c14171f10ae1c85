r"""Serves a workload with the continuous-batching engine; see configs/serve.py.

  .venv/bin/python experiments/serve.py --config=configs/serve.py \
      --workdir=workdirs/serve
"""

from wisp_jax import launch
from wisp_jax.runs import serve

if __name__ == "__main__":
  launch.main(serve.run)
