r"""What prefetching is worth: policies x predictors x presets x hardware.

Full study (Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B sizes; T4 on PCIe
3, RTX 3090 on PCIe 4, H100 PCIe on PCIe 5; decode at batch 1, 8 and 32
and prefill; synthetic traces and the shipped default model recorded live
with its gate lookahead):

  .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py \
      --workdir=workdirs/prefetch

The README's numbers come from this study reduced (about 17 minutes on a
2-core CPU machine; the tuning below, about 25 minutes on the same CPU):

  .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py \
      --workdir=workdirs/prefetch --config.batches="(1, 32)" \
      --config.capacity_fractions="(0.25, 0.5)" --config.prefill.prompts=0

Tuning of the policies' half-lives, on traces the study never reports
(synthetic seed 0, the default model's first prompts):

  .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py:tune \
      --workdir=workdirs/prefetch_tune

Quick run (one preset, one profile, short traces; well under a minute):

  .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py:tiny \
      --workdir=workdirs/prefetch_tiny

Override single fields as usual, e.g. `--config.profiles="('rtx3090', 't4')"`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Study config; `arg`: "", "tiny" or "tune"."""
  arg = configs.check_arg("prefetch", arg, ('tune',))
  config = ml_collections.ConfigDict()
  config.mode = "study"  # or "tune"
  config.presets = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b")
  # PCIe 3 (t4), 4 (rtx3090) and 5 (h100-pcie); wisp_jax.sim.hardware.
  config.profiles = ("t4", "rtx3090", "h100-pcie")
  config.batches = (1, 8, 32)
  # Synthetic kinds: wisp_jax.traces.synthetic's, and "shift" (sticky with
  # its popularity re-drawn every shift_every tokens).
  config.kinds = ("sticky", "cross_layer", "shift")
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.waves = 1  # requests = batch x waves
  config.synthetic.tokens_per_request = 256
  config.synthetic.shift_every = 64
  config.synthetic.options = ml_collections.ConfigDict({
      "sticky": {"p_keep": 0.8, "alpha": 0.8},
      "cross_layer": {"p_follow": 0.8, "alpha": 0.8},
      "zipf": {"alpha": 1.0}})
  config.prefill = ml_collections.ConfigDict({"prompts": 4,
                                              "prompt_len": 256})
  config.record = ml_collections.ConfigDict()
  config.record.enabled = True
  config.record.preset = "mixtral-8x7b"  # same E=8 and K=2 as the model
  config.record.tune_prompts = 8  # prompts 0..7 tune, the next ones report
  config.record.eval_prompts = 32
  config.record.max_prompt_bytes = 160
  config.record.max_new_tokens = 64
  config.eval_seed = 1
  config.tune_seed = 0
  config.capacity_fractions = (0.25, 0.5, 0.75)  # of E, in [K, E - 1]
  config.context_len = 1024
  # LRU and the history policies, each alone and under every predictor.
  config.policies = ("lru", "lrfu", "lrfu_gate")
  config.policy_options = ml_collections.ConfigDict()
  config.predictors = ("cooccur", "temporal", "gate", "oracle")
  config.oracle_accuracies = (0.25, 0.5, 0.75, 1.0)
  config.tune = ml_collections.ConfigDict()
  config.tune.half_lives = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  config.tune.other_policies = ("lfu", "fifo", "ws")

  if arg == "tune":
    config.mode = "tune"
    config.kinds = ("sticky", "cross_layer", "zipf", "shift")
    config.batches = (1, 8)
    config.synthetic.tokens_per_request = 192
  elif arg == "tiny":
    config.presets = ("mixtral-8x7b",)
    config.profiles = ("rtx3090",)
    config.batches = (1, 8)
    config.kinds = ("sticky",)
    config.synthetic.tokens_per_request = 24
    config.prefill = ml_collections.ConfigDict({"prompts": 2,
                                                "prompt_len": 16})
    config.record.enabled = False
    config.capacity_fractions = (0.5,)
    config.policies = ("lru", "lrfu")
    config.predictors = ("cooccur", "temporal", "oracle")
    config.oracle_accuracies = (0.5, 1.0)
  return config
