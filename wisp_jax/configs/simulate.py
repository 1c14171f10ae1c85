r"""What-if study: hit rate per policy and predicted decode tokens/s per mode.

Full run (OLMoE-1B-7B sizes, a synthetic sticky trace drawn with its
L=16/E=64/K=8, on an RTX 3090 profile, device budgets 2..16 GiB):

  .venv/bin/python experiments/simulate.py --config=configs/simulate.py \
      --workdir=workdirs/simulate

Quick run (a CI-speed run: the shipped `default` model's sizes, E=8, so
the same budgets also replay its recorded trace; a small synthetic trace,
budgets of a few MiB):

  .venv/bin/python experiments/simulate.py --config=configs/simulate.py:tiny \
      --workdir=workdirs/simulate_tiny

The shipped default model recorded on real-text prompts:

  .venv/bin/python experiments/simulate.py --config=configs/simulate.py:record \
      --workdir=workdirs/simulate_record

Another preset's sizes (synthetic trace with its L/E/K), e.g.
`--config=configs/simulate.py:mixtral-8x7b` (bf16 Mixtral cannot run
paged on a 24 GiB card: add `--config.expert_bytes_per_param=0.5` for int4
experts) or `:qwen3-30b-a3b` (the
`tiny` preset's sizes: `--config.model=tiny`). Replay a
saved trace with `--config.trace=workdirs/record/trace.npz` (the preset must
have the trace's E). Override fields as usual, e.g.
`--config.hardware=h100-pcie`, `--config.batching=single`,
`--config.budget_bytes=4294967296,8589934592` or
`--config.policies="('lru', 'min')"`.
"""

import ml_collections

from wisp_jax import configs
from wisp_jax.models.config import PRESETS

GIB = 2**30
MIB = 2**20


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Simulation config; `arg`: '', 'tiny', 'record' or a model preset name."""
  if arg not in PRESETS or arg == configs.TINY:
    arg = configs.check_arg("simulate", arg, ("record",),
                            more=f"a model preset name ({', '.join(PRESETS)})")
  config = ml_collections.ConfigDict()
  # A .npz RoutingTrace path, "synthetic" / "synthetic:<kind>" (kinds:
  # uniform, zipf, sticky, cross_layer; drawn with the preset's L/E/K) or
  # "record:default" (the shipped model on real-text prompts).
  config.trace = "synthetic"
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.kind = "sticky"
  config.synthetic.num_requests = 8
  config.synthetic.tokens_per_request = 512
  config.synthetic.batch = 4  # requests decoded together
  config.synthetic.seed = 0
  config.synthetic.options = ml_collections.ConfigDict(
      {"p_keep": 0.8, "alpha": 0.8})
  config.record = ml_collections.ConfigDict()  # for trace="record:default"
  config.record.num_prompts = 16
  config.record.max_prompt_bytes = 160
  config.record.max_new_tokens = 64
  config.record.batch_size = 4

  config.model = "olmoe-1b-7b"  # preset whose byte sizes are used
  config.hardware = "rtx3090"  # wisp_jax.sim.hardware.PROFILES
  config.budget_bytes = tuple(b * GIB for b in (2, 3, 4, 6, 8, 12, 16))
  config.workspace_bytes = 512 * MIB  # activations, scratch
  config.context_len = 1024  # KV tokens per row, for cost and KV reserve
  # Stored widths: experts at 2 (bf16), 1 (int8) or 0.5 (int4) bytes per
  # parameter (dense weights stay bf16); KV values at 2 (bf16) or 1 (fp8).
  config.expert_bytes_per_param = 2.0
  config.kv_bytes_per_value = 2.0
  # A budget above the profile's memory is refused unless this is set
  # (what-if studies of a bigger card).
  config.allow_oversize = False
  # `pinned` keeps the experts most used in this first fraction of the
  # trace (a profiling run) and streams its misses.
  config.pinned_profile_fraction = 0.25
  # Compressed experts (wisp_jax.compress): ratio > 1 adds the modes
  # paged_compressed_bank (misses cross PCIe compressed, decoded on
  # arrival) and paged_compressed_tier (the slots' bytes hold ratio x as
  # many compressed experts; every computed expert is decoded). The device's
  # decode rate is an input: measure it (`python -m
  # wisp_jax.compress.measure` on this machine's CPU) or assume one.
  config.compression = ml_collections.ConfigDict(
      {"ratio": 1.0, "decode_bytes_per_s": 0.0})

  config.policies = ("lru", "lfu", "fifo", "ws", "min")
  config.policy_options = ml_collections.ConfigDict(
      {"lfu": {"age_every": 64}, "ws": {"tau": 8}})
  config.paged_policy = "lru"  # the policy behind the "paged" mode
  config.capacities = ()  # slots per layer; () = 8 values from K to E
  config.batching = "trace"  # or "single": one token per step

  if arg == "tiny" or arg == "record":
    config.model = "default"
    config.synthetic.num_requests = 8
    config.synthetic.tokens_per_request = 16
    config.synthetic.batch = 4
    config.budget_bytes = tuple(int(b * MIB) for b in (2, 3, 4, 6.5))
    config.workspace_bytes = 0
    config.context_len = 256
    config.capacities = (2, 4, 6, 8)
    config.policy_options = ml_collections.ConfigDict({"lfu": {"age_every": 8}})
    config.policies = ("lru", "lfu", "min")
    if arg == "record":
      config.trace = "record:default"
      config.policies = ("lru", "lfu", "fifo", "ws", "min")
      config.policy_options.ws = {"tau": 8}
      config.capacities = tuple(range(2, 9))
  elif arg:
    config.model = arg  # a preset name
  return config
