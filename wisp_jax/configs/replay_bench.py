r"""Replay speed per policy and Mattson-curve time on a synthetic trace.

Single-stream (one token per step), OLMoE-like shape, 64K tokens = 1M
routing events (token x layer):

  .venv/bin/python experiments/replay_bench.py \
      --config=configs/replay_bench.py --workdir=workdirs/replay_bench

Batched decoding (8 requests per step, the trace's own steps):

  .venv/bin/python experiments/replay_bench.py \
      --config=configs/replay_bench.py --config.batch=8 \
      --workdir=workdirs/replay_bench_b8

Quick run (a small trace, one repeat): `--config=configs/replay_bench.py:tiny`.
Each policy is compiled and warmed up on the trace's first chunk of steps
(same compiled shapes), then timed `repeats` times on the whole trace; the
median is reported. Override fields, e.g. `--config.policies=lru,min`
(a comma-separated list).
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Replay benchmark config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("replay_bench", arg)
  config = ml_collections.ConfigDict()
  config.num_layers = 16  # L
  config.num_experts = 64  # E
  config.top_k = 8  # K
  config.num_tokens = 65536  # tokens in the trace
  # Requests per step: 1 replays single-stream ("single" batching), more
  # replays the trace's steps ("trace" batching).
  config.batch = 1
  config.num_requests = 64
  config.capacity = 16  # slots per layer
  config.policies = "lru,lfu,fifo,ws,min"  # comma-separated
  config.policy_options = ml_collections.ConfigDict(
      {"lfu": {"age_every": 64}, "ws": {"tau": 8}})
  config.repeats = 3  # timed runs per measurement
  config.p_keep = 0.8  # sticky trace: keep probability
  # LRU replay vs a plain-Python LRU, interleaved (single-stream or any
  # batch whose steps need at most `capacity` experts per layer).
  config.vs_python = True
  config.many_capacities = "8,12,16,20,24,32,40,48"  # for replay_many
  config.max_spread = 3.0
  config.seed = 0
  if arg == configs.TINY:
    config.num_layers, config.num_experts, config.top_k = 2, 8, 2
    config.num_tokens, config.num_requests = 256, 4
    config.capacity = 4
    config.repeats = 1
    config.many_capacities = "2,4,6"
  return config
