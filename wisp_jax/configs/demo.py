r"""The paging demo: continue real Python source, paged next to resident.

  .venv/bin/python experiments/demo.py --experts=paged --slots_per_layer=4
  .venv/bin/python experiments/demo.py --experts=paged --slots_per_layer=2,3,4,4
  .venv/bin/python experiments/demo.py --experts=paged --budget_gib=0.008
  make demo

The flags above set this config's fields; the rest are overridable too,
e.g. `--config=configs/demo.py:tiny --config.max_new_tokens=32`. Prints
each prompt and its continuation, then hit rate, bytes moved per token
and decode tokens/s of the chosen source next to resident, and whether
their tokens are equal (they are, bit for bit). About 12 s on a 2-core
x86-64 CPU VM (compiles included); `:tiny` shortens the prompts and the
continuations.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("demo", arg)
  config = ml_collections.ConfigDict()
  config.model = "default"  # or a Hugging Face / checkpoint directory
  config.experts = "paged"  # paged, transient, static_offload or resident
  # Slots per layer of `paged`: an int, or one per layer, comma-separated.
  config.slots_per_layer = "4"
  config.policy = "lru"
  # > 0: the device budget in GiB; the slots are what it leaves after the
  # dense weights and the KV cache of this batch (replaces slots_per_layer).
  config.budget_gib = 0.0
  config.num_prompts = 2
  config.first_prompt = 2  # index into wisp_jax.data.sample_prompts
  config.prompt_bytes = 160
  # Prompt + continuation stay within the 256-byte training context.
  config.max_new_tokens = 96
  config.temperature = 0.0  # 0: greedy
  config.seed = 0
  if arg == configs.TINY:
    config.prompt_bytes = 64
    config.max_new_tokens = 16
  return config
