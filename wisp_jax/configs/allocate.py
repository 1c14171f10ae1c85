r"""MV-WSA configurator: one workload, one budget -> slots per layer + KV.

Full run (OLMoE-1B-7B shapes on an RTX 3090, 8 GiB budget, a synthetic
high-locality trace; about 6 s on a 2-core x86-64 CPU VM):

  .venv/bin/python experiments/allocate.py --config=configs/allocate.py \
      --workdir=workdirs/allocate

Quick run (the `tiny` preset):

  .venv/bin/python experiments/allocate.py --config=configs/allocate.py:tiny \
      --workdir=workdirs/allocate_tiny

Prints the per-layer split and writes it to `workdir/split.json`
(`slots_per_layer`, `kv_blocks`), which `experiments/serve.py
--config.engine.split_file=workdirs/allocate/split.json` and
`wisp_jax.generate(..., split="workdirs/allocate/split.json")` accept.
Override single fields, e.g. `--config.workload.trace.path=trace.npz`
(a `RoutingTrace` of this model), `--config.budget_gib=12`,
`--config.workload.concurrency=32`, `--config.uniform=True`.
"""

import ml_collections

from wisp_jax import configs
from wisp_jax.runs.allocate import workload_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Configurator config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("allocate", arg)
  config = ml_collections.ConfigDict()
  config.name = "allocate"
  config.model = "olmoe-1b-7b"
  config.hardware = "rtx3090"
  config.bytes_per_param = 2
  config.block_size = 16
  config.budget_gib = 8.0  # <= 0: the accelerator's memory
  config.workspace_gib = 1.0
  config.uniform = False  # report the uniform-cap split as "the" split
  config.workload = workload_config()
  if arg == configs.TINY:
    config.model = "tiny"
    config.block_size = 4
    config.budget_gib = 60_000 / 2**30  # bytes, in GiB
    config.workspace_gib = 0.0
    config.workload = workload_config(4, (4, 40), (4, 40))
    config.workload.trace.num_requests = 8
    config.workload.trace.tokens_per_request = 32
  return config
