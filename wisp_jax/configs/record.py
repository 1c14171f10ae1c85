r"""Records the routing of the shipped default model on real-text prompts.

Full run (32 held-out stdlib function openings, 128 new tokens each, waves
of 8):

  .venv/bin/python experiments/record.py --config=configs/record.py \
      --workdir=workdirs/record

Quick run (4 prompts, 16 new tokens):

  .venv/bin/python experiments/record.py --config=configs/record.py:tiny \
      --workdir=workdirs/record_tiny

Writes `workdir/trace.npz` (a `wisp_jax.traces.trace.RoutingTrace`), which
`experiments/simulate.py --config.trace=workdirs/record/trace.npz` replays.
Override single fields, e.g. `--config.max_new_tokens=64`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Recording config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("record", arg)
  config = ml_collections.ConfigDict()
  config.model = "default"  # the shipped checkpoint (wisp_jax/assets)
  config.num_prompts = 32
  config.max_prompt_bytes = 160  # byte-level model: bytes = tokens
  config.max_new_tokens = 128
  config.batch_size = 8  # prompts served together (one wave)
  # Cut each wave's prompts to its shortest one: no left padding, so a
  # replay of the trace equals the live pager exactly.
  config.equal_length = True
  if arg == configs.TINY:
    config.num_prompts = 4
    config.max_new_tokens = 16
    config.batch_size = 2
  return config
