"""The compressed tiers' PCIe traffic on the default model (bf16).

  .venv/bin/python -m wisp_jax.serving.tier_traffic

Paged LRU decodes 8 held-out real-text prompts with a raw or coded host
bank (`paging.bank.make_compressed_bank`) and a compressed device tier
(`paging.bank.make_tiered_bank`) of Z experts per layer, planned on 8
other prompts as the most routed experts or as those an LRU cache of the
same slots misses most (`sim.mrc.expert_misses`); raw slots above it are
the equal-bytes reference. Every run's logits are checked equal to
resident's. Prints a markdown table (about a minute on two CPU cores).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from wisp_jax.models.default import load_default
from wisp_jax.paging import api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving import record
from wisp_jax.serving.generate import generate
from wisp_jax.sim import mrc
from wisp_jax.traces import trace as trace_lib


def tier_traffic(slots: int = 3, tiers=(2, 4), new_tokens: int = 48
                 ) -> list[dict[str, Any]]:
  """Expert traffic of paged LRU on the default model (bf16) with a raw or
  coded host bank and device tiers of `tiers` experts per layer, planned
  on 8 profiling prompts as the most routed experts or as those an LRU
  cache of `slots` misses most (`sim.mrc.expert_misses`); decoding 8
  other prompts."""
  model = load_default(dtype=jnp.bfloat16)
  prompts = record.real_text_prompts(16, 96)
  profile, held = prompts[:8], prompts[8:]
  routing = generate(model, profile, new_tokens, record_routing=True)
  reference = generate(model, held, new_tokens, return_logits=True)
  tokens = reference.tokens.size
  weights = model.experts.weights()
  rows = []
  # Raw slots above `slots` first (the tiers' bytes, counted in raw slots,
  # lie between), then each host bank with each tier.
  runs = [(False, 0, slots + extra, "") for extra in (1, 2)] + [
      (coded, size, slots, plan) for coded in (False, True)
      for size in (0,) + tuple(tiers)
      for plan in (("routed", "missed") if size else ("",))]
  raw_bytes = bank_lib.bytes_per_expert(bank_lib.make_bank(weights))
  profile_trace = trace_lib.from_generate(routing, model.config)
  missed = mrc.expert_misses(profile_trace, slots)  # [L, E] at `slots`
  for coded, size, capacity, plan in runs:
    if plan == "missed":  # what LRU at `slots` keeps missing
      tier = bank_lib.tier_from_counts(missed, size)
    else:  # what is routed most
      tier = api.hot_set_from_routing(routing.routing_ids,
                                      model.config.num_experts, size)
    if size:
      bank = bank_lib.make_tiered_bank(weights, tier, coded)
    else:
      bank = (bank_lib.make_compressed_bank(weights) if coded else
              bank_lib.make_bank(weights))
    out = generate(model, held, new_tokens, experts="paged",
                   slots_per_layer=capacity, bank=bank, return_logits=True)
    if not np.array_equal(out.logits, reference.logits):
      raise AssertionError(f"tier {size}, coded host {coded}: logits "
                           "differ from resident")
    stats = out.stats
    rows.append({"host bank": "coded" if coded else "raw", "tier": size,
                 "plan": plan,
                 "slots": capacity, "loads": int(stats.loads.sum()),
                 "tier_loads": int(stats.tier_loads.sum()),
                 "pcie_bytes_per_token": stats.bytes_moved / tokens,
                 "tier_bytes": bank_lib.tier_bytes(bank),
                 "raw_expert_bytes": raw_bytes})
  return rows


def tier_markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| host bank | raw slots | tier experts/layer | tier plan | loads "
           "| from tier | PCIe bytes/token | tier device bytes (= raw "
           "experts) |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['host bank']} | {r['slots']} | {r['tier']} "
                 f"| {r['plan'] or '-'} "
                 f"| {r['loads']} | {r['tier_loads']} "
                 f"| {r['pcie_bytes_per_token']:,.0f} | {r['tier_bytes']:,} "
                 f"(= {r['tier_bytes'] / r['raw_expert_bytes']:.2f}) |")
  return "\n".join(lines)


def main() -> None:
  print("compressed tiers, default model, paged LRU (logits equal to "
        "resident's):\n")
  print(tier_markdown(tier_traffic()))


if __name__ == "__main__":
  main()
