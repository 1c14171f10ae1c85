r"""The three-way split (raw slots, compressed tier, KV) vs the two-way one;
see configs/tier_split.py.

  .venv/bin/python experiments/tier_split.py --config=configs/tier_split.py \
      --workdir=workdirs/tier_split
"""

from wisp_jax import launch
from wisp_jax.runs import tier_split

if __name__ == "__main__":
  launch.main(tier_split.run)
