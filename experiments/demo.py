r"""Continues real Python source with paged experts, next to resident.

  .venv/bin/python experiments/demo.py --experts=paged --slots_per_layer=4
  .venv/bin/python experiments/demo.py --experts=paged \
      --slots_per_layer=2,3,4,4 --policy=lfu
  .venv/bin/python experiments/demo.py --experts=paged --budget_gib=0.008

Loads the shipped default model (never downloads anything) and prints each
prompt with its continuation, then hit rate, bytes moved per token and
tokens/s of the chosen source next to resident; see configs/demo.py for
the other fields (`--config.max_new_tokens=32`).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from wisp_jax.configs import demo as demo_config
from wisp_jax.runs import demo

_CONFIG = config_flags.DEFINE_config_file(
    "config", demo_config.__file__, "Config file (fields overridable).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Output directory.")
_EXPERTS = flags.DEFINE_enum(
    "experts", None, ["paged", "resident", "static_offload", "transient"],
    "Expert source compared with resident.")
_SLOTS = flags.DEFINE_string(
    "slots_per_layer", None, "Slots per layer of paged: an int or a "
    "comma-separated list, one per layer.")
_POLICY = flags.DEFINE_string("policy", None, "Paging policy (lru, lfu, "
                              "fifo, ws).")
_BUDGET = flags.DEFINE_float("budget_gib", None, "Device budget in GiB; "
                             "sets the slots per layer that fit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  for field, flag in (("experts", _EXPERTS), ("slots_per_layer", _SLOTS),
                      ("policy", _POLICY), ("budget_gib", _BUDGET)):
    if flag.value is not None:
      config[field] = flag.value
  print(demo.run(config, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
