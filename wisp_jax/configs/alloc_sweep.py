r"""MV-WSA vs the per-workload oracle vs fixed splits, over workloads x budgets.

Full run (OLMoE-1B-7B shapes on an RTX 3090; 13 min on a 2-core x86-64
CPU VM, most of it the six workloads' engine-order curves):

  .venv/bin/python experiments/alloc_sweep.py --config=configs/alloc_sweep.py \
      --workdir=workdirs/alloc_sweep

Qwen3-30B-A3B shapes on an A40:

  .venv/bin/python experiments/alloc_sweep.py \
      --config=configs/alloc_sweep.py:qwen3 --workdir=workdirs/alloc_sweep_qwen3

Quick run (the `tiny` preset): `--config=configs/alloc_sweep.py:tiny`.

Workloads: short (128-512 tokens) or long (2048-6144 token) prompts, low
(4) or high (32) concurrency, high routing locality (sticky, p_keep 0.9,
Zipf 1.0), low locality (Zipf 0.2, no temporal reuse) and mixed layers
(half of each). Override single fields, e.g. `--config.budgets_gib=8,16`
or `--config.hardware=a40`; workload names hold hyphens, so change a
workload's fields in Python: `config.workloads["short-C4-high"].concurrency
= 8`.
"""

import ml_collections

from wisp_jax import configs
from wisp_jax.runs.allocate import workload_config

HIGH = "sticky:p_keep=0.9,alpha=1.0"
LOW = "zipf:alpha=0.2"
MIXED = f"{HIGH};{LOW}"
SHORT, LONG, OUTPUT = (128, 512), (2048, 6144), (128, 512)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sweep config; `arg` is '', 'qwen3' or 'tiny'."""
  arg = configs.check_arg("alloc_sweep", arg, ("qwen3",))
  config = ml_collections.ConfigDict()
  config.model = "olmoe-1b-7b"
  config.hardware = "rtx3090"
  config.bytes_per_param = 2
  config.block_size = 16
  config.workspace_gib = 1.0
  config.budgets_gib = (6.0, 8.0, 12.0)
  config.focus_workload = "mixed-mid-C16"  # per-layer slots plot
  config.marginal_workload = "short-C32-low"  # marginal values plot
  w = workload_config
  config.workloads = ml_collections.ConfigDict({
      "short-C4-high": w(4, SHORT, OUTPUT, HIGH),
      "short-C32-high": w(32, SHORT, OUTPUT, HIGH),
      "short-C32-low": w(32, SHORT, OUTPUT, LOW),
      "long-C4-low": w(4, LONG, OUTPUT, LOW),
      "long-C16-high": w(16, LONG, OUTPUT, HIGH),
      "mixed-mid-C16": w(16, (512, 2048), OUTPUT, MIXED),
  })
  if arg == "qwen3":
    config.model = "qwen3-30b-a3b"
    config.hardware = "a40"
    config.budgets_gib = (16.0, 24.0, 40.0)
  elif arg == configs.TINY:
    config.model = "tiny"
    config.block_size = 4
    config.workspace_gib = 0.0
    config.budgets_gib = (40_000 / 2**30, 60_000 / 2**30)
    config.workloads = ml_collections.ConfigDict({
        "short-high": w(4, (4, 16), (4, 16), HIGH),
        "long-low": w(4, (24, 48), (4, 16), LOW),
        "mixed": w(4, (8, 32), (4, 16), "sticky:p_keep=0.9;uniform")})
    for workload in config.workloads.values():
      workload.trace.num_requests = 8
      workload.trace.tokens_per_request = 32
    config.focus_workload = "mixed"
    config.marginal_workload = "long-low"
  return config
