r"""The throughput model against executed engine runs; see
configs/model_check.py.

  .venv/bin/python experiments/model_check.py \
      --config=configs/model_check.py --workdir=workdirs/model_check
"""

from wisp_jax import launch
from wisp_jax.runs import model_check

if __name__ == "__main__":
  launch.main(model_check.run)
