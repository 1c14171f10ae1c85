r"""The throughput model against executed engine runs.

Full run (the `tiny` and `olmoe-1b-7b-small` presets with random weights,
float32, on CPU; 16 min on a 2-core x86-64 CPU VM, a test suite running
alongside for the first half):

  .venv/bin/python experiments/model_check.py \
      --config=configs/model_check.py --workdir=workdirs/model_check

Quick run (two `tiny` workloads, one split each; well under a minute):

  .venv/bin/python experiments/model_check.py \
      --config=configs/model_check.py:tiny --workdir=workdirs/model_check_tiny

Each workload: a preset, C (closed loop and max batch), prompt and output
length ranges, `num_requests` served, `profile_requests` other requests
recorded for the routing curves, and the splits: every combination of
`slots` (uniform slots per layer) and `kv_blocks` (comma-separated), and
the decoding `temperature` (0: greedy) of both request sets. KV
sizes are shared between workloads of a preset, so steps compile once.
`set` is `fit` (used while fixing the model) or `held` (not). The cost
model prices both sides' counts on `hardware` with `bytes_per_param`
(bf16 sizes, whatever the CPU dtype). Override single fields, e.g.
`--config.hardware=a40`, `--config.warmup_steps=60` or
`--config.half_samples=0` (no request-sampling standard errors: each half
sample builds the model's tables again, about 5 s for a `tiny` workload
and 17 s for an `olmoe` one on this CPU).
"""

import ml_collections

from wisp_jax import configs


def _workload(preset, tag, concurrency, prompt, output, num_requests, slots,
              kv_blocks, seed, profile_requests=384, block_size=16,
              temperature=0.0):
  return ml_collections.ConfigDict({
      "preset": preset, "set": tag, "concurrency": concurrency,
      "prompt_len_min": prompt[0], "prompt_len_max": prompt[1],
      "output_len_min": output[0], "output_len_max": output[1],
      "num_requests": num_requests, "profile_requests": profile_requests,
      "block_size": block_size, "seed": seed, "temperature": temperature,
      "slots": slots,
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
  # Random halves of each profile's requests, for the request-sampling
  # standard error of each prediction (0: none).
  config.half_samples = 4
  w = _workload
  config.workloads = ml_collections.ConfigDict({
      "tiny-a": w("tiny", "fit", 8, (16, 64), (8, 32), 300, "2,4", "20,64",
                  1),
      "tiny-b": w("tiny", "held", 6, (32, 96), (16, 48), 240, "2,4",
                  "20,64", 2),
      "tiny-c": w("tiny", "held", 10, (8, 32), (16, 40), 300, "3", "20,64",
                  3),
      "olmoe-a": w("olmoe-1b-7b-small", "fit", 8, (32, 96), (16, 48), 150,
                   "16,40", "32,96", 4, profile_requests=240),
      "olmoe-b": w("olmoe-1b-7b-small", "held", 12, (16, 64), (24, 64), 150,
                   "16,40", "32,96", 5, profile_requests=240),
      "olmoe-c": w("olmoe-1b-7b-small", "held", 6, (64, 160), (16, 40), 120,
                   "24", "32,96", 6, profile_requests=240),
  })
  if arg == configs.TINY:
    config.warmup_steps = 20
    config.workloads = ml_collections.ConfigDict({
        "tiny-a": w("tiny", "fit", 8, (16, 64), (8, 32), 120, "3", "20", 1,
                    profile_requests=96),
        "tiny-b": w("tiny", "held", 6, (32, 96), (16, 48), 100, "3", "20", 2,
                    profile_requests=96),
    })
  return config
