r"""Records a routing trace of the default model; see configs/record.py.

  .venv/bin/python experiments/record.py --config=configs/record.py \
      --workdir=workdirs/record
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from wisp_jax.traces import record

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recording config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  summary = record.run(_CONFIG.value, _WORKDIR.value)
  logging.info("recorded %d events (%d steps, %d requests) in %.1f s -> %s",
               summary["num_events"], summary["num_steps"],
               summary["num_requests"], summary["seconds"],
               summary["trace_path"])


if __name__ == "__main__":
  app.run(main)
