r"""MV-WSA configurator: one workload, one budget -> slots per layer + KV.

Full run (OLMoE-1B-7B shapes on an RTX 3090, 8 GiB budget, a synthetic
high-locality trace):

  .venv/bin/python experiments/allocate.py --config=configs/allocate.py \
      --workdir=workdirs/allocate

Quick run (the `tiny` preset):

  .venv/bin/python experiments/allocate.py --config=configs/allocate.py:tiny \
      --workdir=workdirs/allocate_tiny

Override single fields, e.g. `--config.workload.trace.path=trace.npz`
(a `RoutingTrace` of this model), `--config.budget_gib=12`,
`--config.workload.concurrency=32`, `--config.uniform=True`.
"""

import ml_collections

from wisp_jax.runs.allocate import workload_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Configurator config; `arg="tiny"` shrinks model, trace and budget."""
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
  if arg == "tiny":
    config.model = "tiny"
    config.block_size = 4
    config.budget_gib = 60_000 / 2**30  # bytes, in GiB
    config.workspace_gib = 0.0
    config.workload = workload_config(4, (4, 40), (4, 40))
    config.workload.trace.num_requests = 8
    config.workload.trace.tokens_per_request = 32
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use '' or 'tiny'.")
  return config
