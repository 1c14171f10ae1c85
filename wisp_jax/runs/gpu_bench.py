"""Host-to-device paging on a real accelerator, in a few minutes.

`run(config, workdir)` (configs/gpu_bench.py):

  1. Copy probe: pinned host -> device copies of `copy_sizes_mib` (1 MiB ..
     1 GiB), each timed `copy_repeats` times after a warm-up; the median
     time per size, its bandwidth, and a least-squares fit
     `time = latency + bytes / bandwidth`.
  2. Decode: a synthetic model (random bf16 weights, the `model` fields)
     whose experts do not fit the chosen expert budget
     (`expert_budget_fraction` of all expert bytes), decoded with
     `resident` (the reference; it does not fit the budget), `static_offload`
     at the budget (what fits stays, the rest streams), `transient` and
     `paged` with two policies at two capacities within the budget. Step
     times are measured with the sources interleaved inside each repeat
     (`runs.timing`).
  3. A hardware profile from the measurements (`hardware.json`: measured
     host-to-device bandwidth; per-pass overhead = resident's measured step
     minus the roofline's compute/HBM time) that `sim.hardware.get_profile`
     loads by path, and the measured vs predicted tokens/s of every mode.

On a CPU backend everything runs, but a "device" copy is a RAM copy (and an
in-jit transfer compiles to nothing): the summary says so, and its figures
are not PCIe figures.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wisp_jax.models.config import MoEConfig
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.runs import common
from wisp_jax.runs import decode as decode_lib
from wisp_jax.runs import timing
from wisp_jax.serving.generate import generate
from wisp_jax.sim import cost, hardware

MIB = 2**20


def copy_probe(sizes_mib, repeats: int) -> dict[str, Any]:
  """Pinned host -> device copy times per size, and the latency/bandwidth
  fit."""
  device = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  to_device = jax.jit(lambda x: jax.device_put(x, jax.memory.Space.Device))
  rows = []
  for size in sizes_mib:
    x = jax.device_put(np.ones((int(size * MIB),), np.uint8), host)
    jax.block_until_ready(to_device(x))  # compile and warm up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(to_device(x))
      times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    rows.append({"bytes": int(size * MIB), "median_s": median,
                 "min_s": min(times), "max_s": max(times),
                 "gb_per_s": size * MIB / median / 1e9})
    logging.info("copy %8.1f MiB: %.3f ms, %.2f GB/s", size, 1e3 * median,
                 rows[-1]["gb_per_s"])
    del x
  b = np.array([r["bytes"] for r in rows], np.float64)
  t = np.array([r["median_s"] for r in rows])
  slope, intercept = np.polyfit(b, t, 1)
  return {"copies": rows, "latency_s": max(float(intercept), 0.0),
          "bandwidth_bytes_per_s": (1.0 / slope if slope > 0 else
                                    rows[-1]["bytes"] / rows[-1]["median_s"])}


def _model_config(config) -> MoEConfig:
  m = config.model
  return MoEConfig(name="gpu-bench", vocab_size=m.vocab_size,
                   d_model=m.d_model, num_layers=m.num_layers,
                   num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                   head_dim=m.head_dim, num_experts=m.num_experts,
                   top_k=m.top_k, expert_ffn=m.expert_ffn,
                   max_seq_len=m.max_seq_len)


def _base_profile(name: str) -> hardware.HardwareProfile:
  """The datasheet profile the device's name matches (for its HBM and
  FLOP/s), or a generic CPU one."""
  for key, profile in hardware.PROFILES.items():
    if key.replace("-", " ").split()[0] in name.lower().replace("-", " "):
      return profile
  return hardware.HardwareProfile(
      name="cpu", h2d_bytes_per_s=10e9, h2d_nominal_bytes_per_s=10e9,
      h2d_source="placeholder", hbm_bytes_per_s=20e9, bf16_flops=1e11,
      memory_bytes=16 * 2**30)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Probes copies, decodes every mode, writes hardware.json + summary."""
  workdir = common.start(workdir, config)
  device = jax.devices()[0]
  backend = jax.default_backend()
  notes = []
  if backend == "cpu":
    notes.append("CPU backend: host and device share RAM, a 'device' copy "
                 "is a memcpy and in-jit transfers compile to nothing; these "
                 "are not PCIe figures.")
  probe = copy_probe(config.copy_sizes_mib, config.copy_repeats)

  c = _model_config(config)
  model = MoEModel(c, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  bank = bank_lib.make_bank(model.experts.weights())
  one = bank_lib.bytes_per_expert(bank)
  all_experts = c.num_layers * c.num_experts
  budget_experts = int(config.expert_budget_fraction * all_experts)
  slots = max(min(budget_experts // c.num_layers, c.num_experts), c.top_k)
  capacities = sorted({slots, max(c.top_k, slots // 2)})
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, c.vocab_size, config.prompt_len)
             for _ in range(config.batch)]
  sources = [{"name": "resident", "experts": "resident"},
             {"name": "static_offload", "experts": "static_offload",
              "slots_per_layer": min(budget_experts // c.num_layers,
                                     c.num_experts)},
             {"name": "transient", "experts": "transient"}]
  for policy in config.policies:
    for cap in capacities:
      sources.append({"name": f"paged_{policy}_S{cap}", "experts": "paged",
                      "policy": policy, "slots_per_layer": cap,
                      "num_slots": max(capacities)})
  timers, loads = {}, {}
  for source in sources:
    kwargs = decode_lib._kwargs(model, source, bank)
    timers[source["name"]] = decode_lib.step_timer(
        model, prompts, kwargs, config.short_tokens, config.long_tokens)
    stats = generate(model, prompts, config.long_tokens, **kwargs).stats
    loads[source["name"]] = float(stats.per_pass_loads[1:].sum(axis=1).mean())
  metrics = common.metrics(workdir)
  result = timing.interleaved(
      timers, config.repeats, "resident", max_spread=config.max_spread,
      on_measure=lambda m: metrics.write({"kind": "step_s", **m}))
  metrics.close()

  # The measured profile: this link's bandwidth; per-pass overhead from
  # resident's step minus the roofline (datasheet HBM and FLOP/s).
  base = _base_profile(device.device_kind)
  context = config.prompt_len + config.long_tokens // 2
  roofline = cost.step_cost(c, base, batch=config.batch, context_len=context,
                            mode="resident", memory_budget_bytes=2**62)
  resident_s = result.times["resident"].median
  overhead = max(resident_s - max(roofline.compute_s, roofline.hbm_s), 0.0)
  profile = {"name": f"measured:{device.device_kind}",
             "h2d_bytes_per_s": probe["bandwidth_bytes_per_s"],
             "h2d_nominal_bytes_per_s": base.h2d_nominal_bytes_per_s,
             "h2d_source": f"measured by runs.gpu_bench on {backend}",
             "hbm_bytes_per_s": base.hbm_bytes_per_s,
             "bf16_flops": base.bf16_flops,
             "memory_bytes": base.memory_bytes, "step_overhead_s": overhead}
  common.write_json(workdir / "hardware.json", profile)
  measured_profile = hardware.get_profile(profile)
  modes = []
  for source in sources:
    name = source["name"]
    predicted = cost.step_cost(
        c, measured_profile, batch=config.batch, context_len=context,
        mode="paged", misses=int(round(loads[name])),
        memory_budget_bytes=2**62)
    step = result.times[name].median
    modes.append({**source, "step_s": step,
                  "tokens_per_s": config.batch / step if step > 0 else None,
                  "predicted_tokens_per_s": predicted.decode_tokens_per_s,
                  "loads_per_step": loads[name],
                  "bytes_per_step": loads[name] * one,
                  "vs_resident": result.describe(name)})
  summary = {"backend": backend, "device": device.device_kind,
             "host": platform.processor() or platform.machine(),
             "notes": notes, "copy_probe": probe, "model": c.name,
             "expert_bytes": one, "all_expert_bytes": all_experts * one,
             "expert_budget_bytes": budget_experts * one,
             "capacities": capacities, "profile": profile, "modes": modes}
  summary["table"] = table(summary)
  common.finish(workdir, summary)
  print(summary["table"])
  return summary


def table(summary: dict[str, Any]) -> str:
  p = summary["copy_probe"]
  lines = [f"{summary['device']} ({summary['backend']}): pinned h2d "
           f"{p['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, per-copy latency "
           f"{1e6 * p['latency_s']:.1f} us"]
  lines.append(f"{'mode':<22}{'tok/s':>10}{'predicted':>11}{'MB/step':>10}"
               f"  x resident")
  for m in summary["modes"]:
    tps = f"{m['tokens_per_s']:>10.1f}" if m["tokens_per_s"] else f"{'-':>10}"
    lines.append(f"{m['name']:<22}{tps}{m['predicted_tokens_per_s']:>11.1f}"
                 f"{m['bytes_per_step'] / 1e6:>10.1f}  {m['vs_resident']}")
  return "\n".join(lines + [f"note: {n}" for n in summary["notes"]])
