r"""Serves a workload of real-text prompts with the continuous-batching engine.

Full run (the shipped default model if present, else the `default` preset
with random weights; a device budget split between expert slots and KV):

  .venv/bin/python experiments/serve.py --config=configs/serve.py \
      --workdir=workdirs/serve

Quick run (the `tiny` preset, a pool small enough to preempt; about 20 s
on a 2-core x86-64 CPU VM, compiles included):

  .venv/bin/python experiments/serve.py --config=configs/serve.py:tiny \
      --workdir=workdirs/serve_tiny

Serve with the split `experiments/allocate.py` chose (its slots per layer
and KV blocks; the model must have as many layers):
`--config.engine.split_file=workdirs/allocate/split.json`. Override single
fields, e.g. `--config.engine.policy=lfu`, `--config.workload.arrival=all`,
`--config.workload.file=requests.jsonl` (format in
`wisp_jax/serving/request_stream.py`). Writes `serve_steps.png` (batch, KV
blocks in use and hit rate over engine steps) next to the JSON files.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Serving config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("serve", arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  # "auto": the shipped checkpoint if present, else the "default" preset
  # with random weights; "shipped"; or a preset name (random weights).
  config.model = "auto"
  # MoEConfig fields replacing a preset's (not used for the checkpoint).
  config.model_overrides = ml_collections.ConfigDict()
  config.dtype = "float32"

  config.engine = ml_collections.ConfigDict()
  config.engine.experts = "paged"  # paged, resident, transient, static_offload
  config.engine.policy = "lru"
  config.engine.slots_per_layer = 4
  config.engine.kv_blocks = 0  # <= 0: every block the budget leaves
  # A split.json (experiments/allocate.py) replacing the two fields above.
  config.engine.split_file = ""
  config.engine.block_size = 16
  config.engine.max_batch = 8
  config.engine.min_prefill_bucket = 16

  # Device bytes for dense weights + expert slots + KV + workspace.
  config.budget = ml_collections.ConfigDict()
  config.budget.total_mib = 8.0  # 0: no budget (then set engine.kv_blocks)
  config.budget.workspace_mib = 0.5

  config.workload = ml_collections.ConfigDict()
  config.workload.file = ""  # a JSON-lines workload replaces the fields below
  config.workload.num_requests = 32
  config.workload.prompt_len_min = 32
  config.workload.prompt_len_max = 192
  config.workload.max_new_tokens_min = 32
  config.workload.max_new_tokens_max = 128
  config.workload.arrival = "poisson"  # or "all"
  config.workload.rate = 0.5  # requests per engine step (poisson)
  config.workload.temperature = 0.0
  config.workload.seed = 0

  config.warmup = True  # compile the steps before the timed run
  config.log_every = 20

  if arg == configs.TINY:
    # Same shapes as tests/serving/engine_test.py (they share compiles).
    config.model = "tiny"
    config.engine.slots_per_layer = 2
    config.engine.kv_blocks = 10
    config.engine.block_size = 4
    config.engine.max_batch = 4
    config.engine.min_prefill_bucket = 32
    config.budget.total_mib = 0.0
    config.workload.num_requests = 8
    config.workload.prompt_len_min = 4
    config.workload.prompt_len_max = 16
    config.workload.max_new_tokens_min = 4
    config.workload.max_new_tokens_max = 8
    config.workload.rate = 1.0
    config.log_every = 5
  return config
