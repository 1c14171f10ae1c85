r"""The three-way split (raw slots, compressed tier, KV) vs the two-way one.

Full run (the sweep's six workloads drawn with held-out seed 1, OLMoE-1B-7B
shapes on an RTX 3090 and Mixtral-8x7B shapes on an A40, two decoders,
raw and coded host banks; about 6 min on a 2-core x86-64 CPU VM):

  .venv/bin/python experiments/tier_split.py --config=configs/tier_split.py \
      --workdir=workdirs/tier_split

Quick run (the `tiny` preset): `--config=configs/tier_split.py:tiny`.

A decoder is a name and its rate in raw bytes of output per second:
`cpu` is the codec's rate measured on a 2-core x86-64 CPU VM
(`python -m wisp_jax.compress.measure`), `gpu` an assumed GPU kernel (no
GPU was measured). `ratio` is the codec's raw / coded bytes on the shipped
model's experts. Override fields, e.g. `--config.ratio=1.3`,
`--config.seeds=2,3` or `--config.shapes.olmoe.budgets_gib=4,6`.
"""

import ml_collections

from wisp_jax import configs
from wisp_jax.configs import alloc_eval


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Comparison config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("tier_split", arg)
  base = alloc_eval.get_config("tiny" if arg == configs.TINY else "")
  config = ml_collections.ConfigDict()
  config.seeds = (1,)
  config.block_size = base.block_size
  config.workspace_gib = base.workspace_gib
  config.workloads = base.workloads
  config.ratio = 1.43
  config.decoders = ml_collections.ConfigDict({"cpu": 2.8e9, "gpu": 2e11})
  config.hosts = ("raw", "coded")
  if arg == configs.TINY:
    config.shapes = base.shapes
    config.shapes.tiny.hardware = "t4"
    return config
  config.shapes = ml_collections.ConfigDict({
      "olmoe": base.shapes.olmoe, "mixtral": base.shapes.mixtral})
  config.shapes.olmoe.hardware = "rtx3090"
  config.shapes.olmoe.budgets_gib = (4.0, 6.0, 8.0, 12.0)
  config.shapes.mixtral.hardware = "a40"
  return config
