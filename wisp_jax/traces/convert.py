"""Routing logs -> `RoutingTrace` `.npz`: the library behind
`experiments/convert_trace.py`.

`convert` reads vLLM-style route logs (`importers.import_vllm_routes`) or
per-token logs (`importers.import_per_token`), saves the trace as a
compressed `.npz` (`RoutingTrace.save`) and returns it with the import
report, which says what was read, kept and dropped, and why.
"""

from __future__ import annotations

import os
import pathlib

from wisp_jax.traces import importers
from wisp_jax.traces.trace import RoutingTrace

FORMATS = ("vllm", "per_token")


def convert(paths: importers.Paths, output: str | os.PathLike,
            log_format: str = "vllm", *, num_experts: int | None = None,
            top_k: int | None = None, layout: str = "auto",
            drop_warmup: bool = False, min_warmup_rows: int = 64,
            skip_malformed: bool = False, model: str | None = None
            ) -> tuple[RoutingTrace, importers.ImportReport, pathlib.Path]:
  """Imports routing logs and writes them as a `.npz` trace.

  Args:
    paths: log file(s), a directory or a glob.
    output: the `.npz` to write (the suffix is added if missing).
    log_format: "vllm" (route rows: req_id, token_idx, layer, topk_ids,
      topk_weights) or "per_token" (problem_id/request_id, token_idx,
      layer, experts, gating_probs).
    num_experts: E (else from a meta line, else max id + 1).
    top_k: K (else from a meta line, else the first row's length).
    layout: vLLM logs only: "auto", "batched" or "per_request".
    drop_warmup: vLLM logs only: drop the leading warm-up run.
    min_warmup_rows: vLLM logs only: shortest run taken for a warm-up.
    skip_malformed: skip and count malformed rows instead of raising.
    model: model name stored in the trace (else from a meta line).

  Returns:
    (trace, import report, path written).
  """
  if log_format not in FORMATS:
    raise ValueError(f"log_format={log_format!r}; use one of "
                     f"{', '.join(FORMATS)}.")
  common = dict(num_experts=num_experts, top_k=top_k,
                skip_malformed=skip_malformed, model=model)
  if log_format == "vllm":
    trace, report = importers.import_vllm_routes(
        paths, layout=layout, drop_warmup=drop_warmup,
        min_warmup_rows=min_warmup_rows, **common)
  else:
    if layout != "auto" or drop_warmup:
      raise ValueError("layout and drop_warmup apply to vLLM route logs "
                       "(log_format='vllm'), not per-token logs.")
    trace, report = importers.import_per_token(paths, **common)
  path = pathlib.Path(output)
  if path.suffix != ".npz":
    path = path.with_name(path.name + ".npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  trace.save(path)
  return trace, report, path


def describe(trace: RoutingTrace) -> str:
  """One line of a trace's shape: events, steps, requests, L, E, K."""
  return (f"{trace.num_tokens} events x {trace.num_layers} layers "
          f"({trace.num_events} routing decisions), {trace.num_steps} "
          f"steps, {len(set(trace.request.tolist()))} requests, "
          f"E={trace.num_experts}, K={trace.top_k}, model "
          f"{trace.model or '(unnamed)'}")
