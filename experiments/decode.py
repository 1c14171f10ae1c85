r"""Decode benchmark per expert source; see configs/decode.py.

  .venv/bin/python experiments/decode.py --config=configs/decode.py \
      --workdir=workdirs/decode
"""

from wisp_jax import launch
from wisp_jax.runs import decode as decode_bench

if __name__ == "__main__":
  launch.main(decode_bench.run)
