r"""The online controller vs fixed splits; see configs/online.py.

  .venv/bin/python experiments/online.py --config=configs/online.py \
      --workdir=workdirs/online
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from wisp_jax.serving import online_bench

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Online controller config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  online_bench.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
