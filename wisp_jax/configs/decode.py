r"""Decode benchmark of every expert source on the shipped default model.

  .venv/bin/python experiments/decode.py --config=configs/decode.py \
      --workdir=workdirs/decode

Quick run: `--config=configs/decode.py:tiny` (the same model and sources,
fewer and shorter runs). Override fields on the command line, e.g.
`--config.batch=4 --config.dtype=bfloat16`, or the sources (a tuple of
dicts): `--config.sources="({'name': 'resident', 'experts': 'resident'},
{'name': 'paged', 'experts': 'paged', 'slots_per_layer': 3})"`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Benchmark config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("decode", arg)
  config = ml_collections.ConfigDict()
  config.model = "default"  # or a preset name (random weights)
  config.dtype = "float32"
  config.batch = 1  # single-stream decode, as in WiSP's headline setting
  config.prompt_bytes = 64
  config.short_tokens = 16
  config.long_tokens = 144
  config.repeats = 5
  half = 4  # E/2 of the default model (E = 8)
  config.sources = (
      {"name": "resident", "experts": "resident"},
      {"name": "static_offload", "experts": "static_offload"},
      {"name": "transient", "experts": "transient"},
      {"name": "paged_lru_E/2", "experts": "paged", "slots_per_layer": half,
       "policy": "lru"},
      {"name": "paged_lfu_E/2", "experts": "paged", "slots_per_layer": half,
       "policy": "lfu"},
      # Every expert resident from the start: the pager's bookkeeping cost.
      {"name": "paged_hit100", "experts": "paged", "slots_per_layer": 8,
       "policy": "lru", "hot_set": "all"},
  )
  if arg == configs.TINY:
    config.short_tokens, config.long_tokens, config.repeats = 4, 20, 2
  return config
