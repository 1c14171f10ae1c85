"""The offline configurator: `run(config, workdir)`; see configs/allocate.py.

Trace (a `RoutingTrace` .npz, or a synthetic spec) + model preset +
hardware + budget -> MV-WSA split (slots per layer, KV blocks) with its
predicted tokens/s, next to the uniform-cap MV-WSA, the fixed splits and
the per-workload oracle. Writes `config.json` and `summary.json` to
`workdir`.

A synthetic spec is `kind:key=value,...` per layer group, groups separated
by `;` (layers split evenly), e.g. `sticky:p_keep=0.9,alpha=1.0;zipf:alpha=0.2`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from absl import logging

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.alloc import baselines
from wisp_jax.alloc import curves as curves_lib
from wisp_jax.alloc import solver
from wisp_jax.alloc.throughput import Budget
from wisp_jax.alloc.workload import Workload, sample_lengths
from wisp_jax.models import config as config_lib
from wisp_jax.models.config import MoEConfig
from wisp_jax.sim.hardware import get_profile
from wisp_jax.traces.trace import RoutingTrace

GIB = 2**30


def workload_config(concurrency: int = 8, prompt=(128, 512),
                    output=(128, 512),
                    trace: str = "sticky:p_keep=0.9,alpha=1.0"
                    ) -> ml_collections.ConfigDict:
  """One workload: lengths, concurrency and its routing trace."""
  w = ml_collections.ConfigDict()
  w.concurrency = concurrency  # requests that want to run at once
  w.min_concurrency = 1  # KV floor: this many longest requests
  w.prompt_len_min, w.prompt_len_max = prompt
  w.output_len_min, w.output_len_max = output
  w.num_samples = 256  # sampled (prompt, output) pairs
  w.seed = 0
  w.trace = ml_collections.ConfigDict()
  w.trace.path = ""  # a RoutingTrace .npz replaces the synthetic trace
  # kind:key=value,... per layer group, groups separated by ';'.
  w.trace.synthetic = trace
  w.trace.num_requests = 32
  w.trace.tokens_per_request = 128
  w.trace.seed = 0
  return w


def parse_groups(spec: str) -> list[dict[str, Any]]:
  """`"sticky:p_keep=0.9,alpha=1;zipf:alpha=0.2"` -> layer-group dicts."""
  groups = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    kind, _, args = part.partition(":")
    group: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (a.strip() for a in args.split(","))):
      key, eq, value = item.partition("=")
      if not eq:
        raise ValueError(f"bad synthetic trace argument {item!r} in "
                         f"{spec!r}; write key=value.")
      group[key.strip()] = float(value)
    groups.append(group)
  if not groups:
    raise ValueError(f"empty synthetic trace spec {spec!r}; e.g. "
                     "'sticky:p_keep=0.9,alpha=1.0'.")
  return groups


def build_curves(trace_config: ml_collections.ConfigDict,
                 model: MoEConfig) -> curves_lib.RoutingCurves:
  """Routing curves from `trace_config.path` or its synthetic spec."""
  if trace_config.path:
    trace = RoutingTrace.load(trace_config.path)
  else:
    trace = curves_lib.synthetic_trace(
        model.num_layers, model.num_experts, model.top_k,
        parse_groups(trace_config.synthetic), trace_config.num_requests,
        trace_config.tokens_per_request, trace_config.seed)
  return curves_lib.curves_from_trace(trace)


def build_workload(config: ml_collections.ConfigDict,
                   workload_config: ml_collections.ConfigDict,
                   curves: curves_lib.RoutingCurves | None = None,
                   name: str = "workload") -> Workload:
  """The `Workload` of `config` (model, hardware) and `workload_config`."""
  model = config_lib.get_config(config.model)
  wc = workload_config
  if curves is None:
    curves = build_curves(wc.trace, model)
  prompt, output = sample_lengths(
      wc.num_samples, (wc.prompt_len_min, wc.prompt_len_max),
      (wc.output_len_min, wc.output_len_max), wc.seed)
  return Workload(model=model, hardware=get_profile(config.hardware),
                  prompt_lens=prompt, output_lens=output,
                  concurrency=wc.concurrency, curves=curves,
                  bytes_per_param=config.bytes_per_param,
                  block_size=config.block_size,
                  min_concurrency=wc.min_concurrency, name=name)


def budget_of(config: ml_collections.ConfigDict, budget_gib: float,
              workload: Workload) -> Budget:
  """A `Budget` of `budget_gib` (<= 0: the accelerator's memory)."""
  total = (int(budget_gib * GIB) if budget_gib > 0
           else workload.hardware.memory_bytes)
  return Budget(total, int(config.workspace_gib * GIB))


def allocate_all(workload: Workload, budget: Budget
                 ) -> dict[str, solver.Allocation]:
  """MV-WSA (per-layer and uniform), the oracles and the fixed splits."""
  out = {"mv-wsa": solver.solve(workload, budget),
         "mv-wsa-uniform": solver.solve(workload, budget, uniform=True),
         "oracle": baselines.oracle(workload, budget),
         "oracle-uniform": baselines.oracle(workload, budget, uniform=True)}
  for name, allocation in baselines.fixed_allocations(workload,
                                                      budget).items():
    out[f"fixed-{name}"] = allocation
  return out


SPLIT_FILE = "split.json"


def split_table(summary: dict[str, Any]) -> str:
  """The chosen split per layer, then every method's tokens/s vs oracle."""
  split = summary["split"]
  slots = split["slots_per_layer"]
  lines = [f"split for {summary['workload']['name']} "
           f"({summary['budget']['total_label']}): {split['kv_blocks']} KV "
           f"blocks, {sum(slots)} expert slots",
           reports.text_table(["layer"] + [str(i) for i in range(len(slots))],
                              [["slots"] + list(slots)]), ""]
  rows = [[name, a["tokens_per_s"], summary["relative_to_oracle"][name],
           a["total_slots"], a["kv_blocks"]]
          for name, a in summary["allocations"].items()]
  lines.append(reports.text_table(
      ["method", "tokens/s", "x oracle", "slots", "KV blocks"], rows))
  lines.append(f"wrote {summary['split_path']}")
  return "\n".join(lines)


def write_split(path, split) -> pathlib.Path:
  """Writes `split.json` (`slots_per_layer`, `kv_blocks`), which
  `serve` (`engine.split_file`) and `generate(split=...)` read."""
  path = pathlib.Path(path)
  common.write_json(path, {"slots_per_layer": list(split.slots_per_layer),
                           "kv_blocks": int(split.kv_blocks)})
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> reports.Report:
  """Allocates one budget for one workload; writes summary.json and
  split.json; returns the summary (prints as the split and the table)."""
  reports.start_logging()
  out = common.start(workdir, config)
  workload = build_workload(config, config.workload, name=config.name)
  budget = budget_of(config, config.budget_gib, workload)
  budget.check(workload)  # refuse before any work
  results = allocate_all(workload, budget)
  oracle_rate = results["oracle"].tokens_per_s
  for name, allocation in results.items():
    logging.info("%-22s %10.2f tok/s (%.3f of oracle) slots=%d kv=%d n=%d",
                 name, allocation.tokens_per_s,
                 allocation.tokens_per_s / oracle_rate,
                 allocation.split.total_slots, allocation.split.kv_blocks,
                 allocation.prediction.concurrency)
  chosen = results["mv-wsa-uniform" if config.uniform else "mv-wsa"]
  split_path = write_split(out / SPLIT_FILE, chosen.split)
  summary = {
      "workload": workload.summary(),
      "budget": {"total_bytes": budget.total_bytes,
                 "total_label": reports.format_bytes(budget.total_bytes),
                 "workspace_bytes": budget.workspace_bytes,
                 "pageable_bytes": budget.pageable_bytes(workload)},
      "split": chosen.split.to_dict(),
      "split_path": str(split_path),
      "predicted_tokens_per_s": chosen.tokens_per_s,
      "relative_to_oracle": {name: a.tokens_per_s / oracle_rate
                             for name, a in results.items()},
      "allocations": {name: a.to_dict() for name, a in results.items()}}
  common.finish(out, summary)
  return reports.Report(summary, split_table(summary))
