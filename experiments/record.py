r"""Records a routing trace of the default model; see configs/record.py.

  .venv/bin/python experiments/record.py --config=configs/record.py \
      --workdir=workdirs/record
"""

from wisp_jax import launch
from wisp_jax.runs import record

if __name__ == "__main__":
  launch.main(record.run)
