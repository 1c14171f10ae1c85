r"""Records a routing trace of the default model; see configs/record.py.

  .venv/bin/python experiments/record.py --config=configs/record.py \
      --workdir=workdirs/record
"""

from absl import logging

from wisp_jax import launch
from wisp_jax.runs import record


def report(summary: dict, workdir: str) -> None:
  del workdir
  logging.info("recorded %d events (%d steps, %d requests) in %.1f s -> %s",
               summary["num_events"], summary["num_steps"],
               summary["num_requests"], summary["seconds"],
               summary["trace_path"])


if __name__ == "__main__":
  launch.main(record.run, report)
