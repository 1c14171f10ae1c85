r"""MV-WSA alone (no search) vs the exact oracle on held-out workloads.

Full run (the sweep's six workloads drawn again with seeds 1-3, for
OLMoE-1B-7B, Qwen3-30B-A3B and Mixtral-8x7B shapes, each on two
hardware profiles; over 50 min on a busy 2-core x86-64 CPU VM, most of it
in the Qwen3 shapes' oracle):

  .venv/bin/python experiments/alloc_eval.py --config=configs/alloc_eval.py \
      --workdir=workdirs/alloc_eval

Quick run (the `tiny` preset, one seed): `--config=configs/alloc_eval.py:tiny`.

Seeds are offsets: a workload's length sample and routing trace seeds
become seed + 1000 x s, so no cell repeats a sweep cell (seed 0 is the
sweep's own draw; it is not in the default list). Override fields, e.g.
`--config.seeds=4,5` or a shape's profiles, a comma-separated string:
`--config.shapes.olmoe.hardware=t4,h100-pcie`.
"""

import ml_collections

from wisp_jax import configs
from wisp_jax.configs import alloc_sweep


def _shape(model, hardware, budgets_gib, bytes_per_param=2):
  return ml_collections.ConfigDict({
      "model": model, "hardware": hardware, "budgets_gib": budgets_gib,
      "bytes_per_param": bytes_per_param})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Evaluation config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("alloc_eval", arg)
  sweep = alloc_sweep.get_config("tiny" if arg == configs.TINY else "")
  config = ml_collections.ConfigDict()
  config.seeds = (1, 2, 3)
  config.block_size = sweep.block_size
  config.workspace_gib = sweep.workspace_gib
  config.workloads = sweep.workloads
  config.shapes = ml_collections.ConfigDict({
      "olmoe": _shape("olmoe-1b-7b", "a40,t4", (6.0, 8.0, 12.0)),
      "qwen3": _shape("qwen3-30b-a3b", "rtx3090,h100-pcie",
                      (16.0, 24.0, 40.0)),
      # bf16 Mixtral pages only above ~26 GiB (2 slots x 32 layers).
      "mixtral": _shape("mixtral-8x7b", "a40,h100-pcie", (32.0, 48.0, 64.0))})
  if arg == configs.TINY:
    config.seeds = (1,)
    config.shapes = ml_collections.ConfigDict({
        "tiny": _shape("tiny", "rtx3090,t4", sweep.budgets_gib)})
  return config
