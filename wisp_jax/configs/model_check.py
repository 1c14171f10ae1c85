r"""The throughput model against executed engine runs.

Full run (the `tiny` and `olmoe-1b-7b-small` presets with random weights,
float32, on CPU; about 12 min on a busy 2-core x86-64 CPU VM):

  .venv/bin/python experiments/model_check.py \
      --config=configs/model_check.py --workdir=workdirs/model_check

Quick run (two `tiny` workloads, one split each; well under a minute):

  .venv/bin/python experiments/model_check.py \
      --config=configs/model_check.py:tiny --workdir=workdirs/model_check_tiny

Each workload: a preset, C (closed loop and max batch), prompt and output
length ranges, `num_requests` served, `profile_requests` other requests
recorded for the routing curves, and the splits: every combination of
`slots` (uniform slots per layer) and `kv_blocks` (comma-separated). KV
sizes are shared between workloads of a preset, so steps compile once.
`set` is `fit` (used while fixing the model) or `held` (not). The cost
model prices both sides' counts on `hardware` with `bytes_per_param`
(bf16 sizes, whatever the CPU dtype). Override single fields, e.g.
`--config.hardware=a40` or `--config.warmup_steps=60`.
"""

import ml_collections

from wisp_jax import configs


def _workload(preset, tag, concurrency, prompt, output, num_requests, slots,
              kv_blocks, seed, profile_requests=48, block_size=16):
  return ml_collections.ConfigDict({
      "preset": preset, "set": tag, "concurrency": concurrency,
      "prompt_len_min": prompt[0], "prompt_len_max": prompt[1],
      "output_len_min": output[0], "output_len_max": output[1],
      "num_requests": num_requests, "profile_requests": profile_requests,
      "block_size": block_size, "seed": seed, "slots": slots,
      "kv_blocks": kv_blocks})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Model check config; `arg` is '' or 'tiny'."""
  arg = configs.check_arg("model_check", arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"
  config.hardware = "rtx3090"
  config.bytes_per_param = 2
  config.warmup_steps = 40  # steps of a run not counted (cold caches)
  w = _workload
  config.workloads = ml_collections.ConfigDict({
      "tiny-a": w("tiny", "fit", 8, (16, 64), (8, 32), 300, "2,4", "20,64",
                  1),
      "tiny-b": w("tiny", "held", 6, (32, 96), (16, 48), 240, "2,4",
                  "20,64", 2),
      "tiny-c": w("tiny", "held", 10, (8, 32), (16, 40), 300, "3", "20,64",
                  3),
      "olmoe-a": w("olmoe-1b-7b-small", "fit", 8, (32, 96), (16, 48), 150,
                   "16,40", "32,96", 4),
      "olmoe-b": w("olmoe-1b-7b-small", "held", 12, (16, 64), (24, 64), 150,
                   "16,40", "32,96", 5),
      "olmoe-c": w("olmoe-1b-7b-small", "held", 6, (64, 160), (16, 40), 120,
                   "24", "32,96", 6),
  })
  if arg == configs.TINY:
    config.warmup_steps = 20
    config.workloads = ml_collections.ConfigDict({
        "tiny-a": w("tiny", "fit", 8, (16, 64), (8, 32), 120, "3", "20", 1,
                    profile_requests=24),
        "tiny-b": w("tiny", "held", 6, (32, 96), (16, 48), 100, "3", "20", 2,
                    profile_requests=24),
    })
  return config
