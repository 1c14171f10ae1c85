r"""Host-to-device paging on the accelerator; see configs/gpu_bench.py.

  .venv/bin/python experiments/gpu_bench.py --config=configs/gpu_bench.py \
      --workdir=workdirs/gpu_bench
"""

from wisp_jax import launch
from wisp_jax.runs import gpu_bench

if __name__ == "__main__":
  launch.main(gpu_bench.run)
