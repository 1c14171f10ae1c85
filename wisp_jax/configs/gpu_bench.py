r"""Host-to-device paging measured on the machine's accelerator.

On a machine with a CUDA device (a few minutes):

  .venv/bin/python experiments/gpu_bench.py --config=configs/gpu_bench.py \
      --workdir=workdirs/gpu_bench

It also runs on CPU (then it measures RAM copies and says so). Quick run:
`--config=configs/gpu_bench.py:tiny`. The measured profile it writes loads
with `wisp_jax.sim.hardware.get_profile("workdirs/gpu_bench/hardware.json")`.
Override a field, e.g. `--config.policies="('lru', 'lfu')"`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.check_arg("gpu_bench", arg)
  config = ml_collections.ConfigDict()
  config.copy_sizes_mib = (1, 4, 16, 64, 256, 1024)
  config.copy_repeats = 10
  # Mixtral-like layer shape at reduced depth: 22 MiB bf16 experts, 32
  # layers x 8 experts = 5.5 GiB of experts.
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=32000, d_model=1024, num_layers=32, num_heads=16,
      num_kv_heads=4, head_dim=64, num_experts=8, top_k=2, expert_ffn=3584,
      max_seq_len=1024))
  config.expert_budget_fraction = 0.4  # of all expert bytes
  config.policies = ("lru", "lfu")
  config.batch = 1
  config.prompt_len = 32
  config.short_tokens = 8
  config.long_tokens = 40
  config.repeats = 5
  config.max_spread = 2.0
  if arg == "tiny":
    config.copy_sizes_mib = (1, 4, 16)
    config.copy_repeats = 3
    config.model.update(dict(vocab_size=97, d_model=32, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=8,
                             num_experts=8, expert_ffn=48, max_seq_len=128))
    config.short_tokens, config.long_tokens, config.repeats = 2, 8, 2
    config.max_spread = 100.0
  return config
