r"""The online controllers judged out of sample; see configs/online_eval.py.

  .venv/bin/python experiments/online_eval.py \
      --config=configs/online_eval.py --workdir=workdirs/online_eval
"""

from wisp_jax import launch
from wisp_jax.runs import online_eval

if __name__ == "__main__":
  launch.main(online_eval.run)
