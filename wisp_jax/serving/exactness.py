"""The exactness matrix: every expert source and policy against resident.

`check_model` decodes one padded batch of prompts with every source
(`layer_offload`, `static_offload` keeping E/2 experts per layer,
`transient`, `paged` x every live policy x capacities
{top_k, E/2, E-1}, sharing one compiled step per policy through a
`num_slots = E-1` buffer) and compares each run's logits of every step
with the resident reference by `np.array_equal`, never a tolerance. It
also checks each run's counters against the routing: per pass and layer,
hits + misses = the experts the pass needed.

`check_isas` runs the same matrix in subprocesses under
`XLA_FLAGS=--xla_cpu_max_isa=<ISA>` for each ISA: the flag changes XLA:CPU's
instruction selection (vector width, FMA contraction) the way another CPU
would, so a matrix that passes under all of them is exact by construction
(the rule in `wisp_jax.models.moe`), not by one machine's luck.

Command line: the matrix in this process (the host's code generation), or
with `--isas` once per ISA in subprocesses (`all`: every ISA this CPU has):

  python -m wisp_jax.serving.exactness --models=tiny,default --out=m.json
  python -m wisp_jax.serving.exactness --isas=all
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax import data
from wisp_jax.models.config import get_config
from wisp_jax.models.default import load_default
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving.generate import generate

# The matrix's models: the tiny preset, the shipped default model and the
# real-geometry small-width presets.
MODELS = ("tiny", "default", "mixtral-8x7b-small", "qwen3-30b-a3b-small",
          "olmoe-1b-7b-small")
DTYPES = ("float32", "bfloat16")
POLICIES = ("lru", "lfu", "fifo", "ws", "pinned", "lrfu", "lrfu_gate")
POLICY_OPTIONS = {"ws": {"tau": 4}, "lfu": {"age_every": 16}}
# Each value caps XLA:CPU's instruction set as an older CPU would.
ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512")


@dataclasses.dataclass(frozen=True)
class Run:
  """One source configuration checked against resident.

  Attributes:
    model: model name.
    dtype: parameter dtype.
    experts: the source.
    policy: paging policy ("" for non-paged sources).
    capacity: slots per layer (0 for non-paged sources).
    exact: logits and tokens `np.array_equal` to resident at every step.
    max_abs_diff: largest logit difference (0.0 when exact).
    counts_ok: hits + misses = needed experts in every pass and layer, and
      loads >= misses.
    hit_rate: the run's hit rate.
  """
  model: str
  dtype: str
  experts: str
  policy: str
  capacity: int
  exact: bool
  max_abs_diff: float
  counts_ok: bool
  hit_rate: float


def load_model(name: str, dtype: str) -> MoEModel:
  """The shipped default model or a preset with seeded random weights."""
  if name == "default":
    return load_default(dtype=jnp.dtype(dtype))
  return MoEModel(get_config(name), rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))


def prompts_for(model: MoEModel, num_prompts: int = 3) -> list[np.ndarray]:
  """Prompts of different lengths (the batch gets left-padded): real text
  for the byte-level default model, seeded random ids otherwise."""
  c = model.config
  if c.name == "default":
    return [data.encode(p)[:6 + 11 * i]
            for i, p in enumerate(data.sample_prompts(num_prompts, 64))]
  rng = np.random.default_rng(7)
  return [rng.integers(0, c.vocab_size, size=3 + 5 * i)
          for i in range(num_prompts)]


def _counts_ok(stats, routing_ids, num_experts: int) -> bool:
  needed = np.array([[np.unique(ids[layer]).size
                      for layer in range(ids.shape[0])]
                     for ids in routing_ids])  # [passes, L]
  return bool(np.array_equal(stats.per_pass_hits + stats.per_pass_misses,
                             needed) and np.all(stats.loads >= stats.misses))


def check_model(name: str, dtype: str, new_tokens: int = 128,
                policies: Sequence[str] = POLICIES,
                offload: bool = True) -> list[Run]:
  """Runs the matrix for one model and dtype (see the module docstring);
  `offload=False` leaves out the three non-paged sources."""
  model = load_model(name, dtype)
  c = model.config
  prompts = prompts_for(model)
  bank = bank_lib.make_bank(model.experts.weights())
  with jax.transfer_guard("disallow"):
    ref = generate(model, prompts, new_tokens, return_logits=True,
                   record_routing=True)
  capacities = sorted({c.top_k, c.num_experts // 2, c.num_experts - 1})
  configs = [dict(experts="layer_offload"), dict(experts="transient"),
             dict(experts="static_offload",
                  slots_per_layer=c.num_experts // 2)] if offload else []
  for policy in policies:
    for capacity in capacities:
      configs.append(dict(experts="paged", policy=policy,
                          slots_per_layer=capacity,
                          policy_options=POLICY_OPTIONS.get(policy),
                          num_slots=max(capacities)))
  runs = []
  for kwargs in configs:
    if kwargs.get("policy") == "pinned":
      kwargs["hot_set"] = api.hot_set_from_routing(
          ref.routing_ids, c.num_experts, kwargs["slots_per_layer"])
    with jax.transfer_guard("disallow"):
      out = generate(model, prompts, new_tokens, bank=bank, return_logits=True,
                     **kwargs)
    exact = bool(np.array_equal(out.logits, ref.logits) and
                 np.array_equal(out.tokens, ref.tokens))
    diff = float(np.max(np.abs(out.logits.astype(np.float64) -
                               ref.logits.astype(np.float64))))
    runs.append(Run(
        model=c.name, dtype=dtype, experts=kwargs["experts"],
        policy=kwargs.get("policy", ""),
        capacity=int(kwargs.get("slots_per_layer") or 0), exact=exact,
        max_abs_diff=diff,
        counts_ok=_counts_ok(out.stats, ref.routing_ids, c.num_experts),
        hit_rate=out.stats.hit_rate))
  return runs


def check_all(models: Sequence[str] = MODELS, dtypes: Sequence[str] = DTYPES,
              new_tokens: int = 128,
              policies: Sequence[str] = POLICIES) -> list[Run]:
  """`check_model` for every model and dtype, in this process."""
  return [run for name in models for dtype in dtypes
          for run in check_model(name, dtype, new_tokens, policies)]


def supported_isas() -> tuple[str, ...]:
  """`ISAS` this CPU can run (AVX512 only where it has avx512f)."""
  try:
    flags = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    flags = ""
  return tuple(isa for isa in ISAS if isa != "AVX512" or "avx512f" in flags)


def _run_isa(isa: str, models: Sequence[str], policies: Sequence[str],
             new_tokens: int, out_dir: pathlib.Path
             ) -> tuple[str, list[Run], str, float]:
  out = out_dir / f"{isa}.json"
  env = dict(os.environ, XLA_FLAGS=f"--xla_cpu_max_isa={isa}")
  started = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "wisp_jax.serving.exactness",
       f"--models={','.join(models)}", f"--policies={','.join(policies)}",
       f"--new_tokens={new_tokens}",
       f"--out={out}"], env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - started
  if proc.returncode != 0:
    return isa, [], proc.stderr[-4000:], seconds
  runs = [Run(**row) for row in json.loads(out.read_text())]
  return isa, runs, "", seconds


def check_isas(isas: Sequence[str] | None = None,
               models: Sequence[str] = MODELS,
               policies: Sequence[str] = POLICIES, new_tokens: int = 128,
               workers: int | None = None
               ) -> dict[str, tuple[list[Run], str, float]]:
  """The matrix in one subprocess per ISA, `workers` at a time.

  Returns:
    per ISA: its runs, the subprocess's stderr tail if it failed (else
    ""), and its wall seconds.
  """
  isas = tuple(isas or supported_isas())
  workers = workers or max(1, min(len(isas), os.cpu_count() or 1))
  with tempfile.TemporaryDirectory() as tmp, \
      concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(_run_isa, isa, models, policies, new_tokens,
                           pathlib.Path(tmp)) for isa in isas]
    results = [f.result() for f in futures]
  return {isa: (runs, error, seconds)
          for isa, runs, error, seconds in results}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--isas", default="",
                      help="comma-separated ISAs, or 'all'; empty: this "
                      "process only")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  models, policies = args.models.split(","), args.policies.split(",")
  if args.isas:
    isas = None if args.isas == "all" else args.isas.split(",")
    results = check_isas(isas, models, policies, args.new_tokens)
    failed = False
    for isa, (runs, error, seconds) in results.items():
      exact = sum(r.exact and r.counts_ok for r in runs)
      print(f"{isa:<8} {exact}/{len(runs)} runs exact ({seconds:.0f} s)"
            + (f"\n{error}" if error else ""))
      failed |= bool(error) or exact < len(runs)
    return 1 if failed else 0
  runs = check_all(models, args.dtypes.split(","), args.new_tokens, policies)
  rows = [dataclasses.asdict(run) for run in runs]
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
  bad = [r for r in rows if not (r["exact"] and r["counts_ok"])]
  print(f"{len(rows) - len(bad)}/{len(rows)} runs exact "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
  for row in bad:
    print("NOT EXACT:", row)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
