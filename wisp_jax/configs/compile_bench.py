r"""Compile time of the decode step vs depth, resident and paged.

  .venv/bin/python experiments/compile_bench.py \
      --config=configs/compile_bench.py --workdir=workdirs/compile_bench

Real Qwen3-30B-A3B widths (E=128, K=8) from shapes, at L = 4, 16, 32, 48,
plus the unrolled layer loop at L = 4, 16 for reference. About 2 minutes on
a 2-core x86-64 CPU VM. Quick run: `--config=configs/compile_bench.py:tiny`.
Override a field, e.g. `--config.layers="(4, 48)"`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.check_arg("compile_bench", arg)
  config = ml_collections.ConfigDict()
  config.model = "qwen3-30b-a3b"
  config.batch = 8
  config.cache_len = 1024
  config.layers = (4, 16, 32, 48)
  config.unrolled_layers = (4, 16)
  config.repeats = 2
  if arg == "tiny":
    config.model = "qwen3-30b-a3b-small"
    config.layers = (2, 8)
    config.unrolled_layers = ()
    config.repeats = 1
  return config
