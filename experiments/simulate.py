r"""Replays a routing trace and predicts decode speed; see configs/simulate.py.

  .venv/bin/python experiments/simulate.py --config=configs/simulate.py \
      --workdir=workdirs/simulate
"""

from absl import logging

from wisp_jax import launch
from wisp_jax.runs import simulate


def _fmt(value) -> str:
  return "-" if value is None else f"{value:,.1f}"


def _fmt_bytes(value: int) -> str:
  return (f"{value / 2**30:.2f} GiB" if value >= 2**30
          else f"{value / 2**20:.2f} MiB")


def report(summary: dict, workdir: str) -> None:
  caps = summary["capacities"]
  logging.info("trace: %s (%d events)", summary["trace"]["source"],
               summary["trace"]["num_events"])
  logging.info("hit rate by slots per layer %s:", caps)
  for name, rates in summary["hit_rate"].items():
    logging.info("  %-6s %s", name, " ".join(f"{r:.3f}" for r in rates))
  logging.info("decode tokens/s by budget (resident / static_offload / "
               "transient / paged [slots]):")
  for row in summary["budgets"]:
    modes = row["modes"]
    logging.info("  %10s: %s / %s / %s / %s [%d]",
                 _fmt_bytes(row["budget_bytes"]),
                 _fmt(modes["resident"]["tokens_per_s"]),
                 _fmt(modes["static_offload"]["tokens_per_s"]),
                 _fmt(modes["transient"]["tokens_per_s"]),
                 _fmt(modes["paged"]["tokens_per_s"]),
                 modes["paged"]["slots_per_layer"])
  logging.info("wrote %s/summary.json, hit_rate.png, tokens_per_s.png",
               workdir)


if __name__ == "__main__":
  launch.main(simulate.run, report)
