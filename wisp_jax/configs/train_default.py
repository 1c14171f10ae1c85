r"""Trains the shipped byte-level default MoE model on the stdlib corpus.

Full run (about 4 minutes on a 2-core x86-64 CPU VM), then ship the
checkpoint:

  .venv/bin/python experiments/train.py --config=configs/train_default.py \
      --workdir=workdirs/train_default
  rm -rf wisp_jax/assets/default && mkdir -p wisp_jax/assets && \
      cp -r workdirs/train_default/checkpoint wisp_jax/assets/default && \
      cp workdirs/train_default/summary.json wisp_jax/assets/default/

CI-size run (a few seconds on the same machine; a 2-layer byte-level
model, since the corpus needs the 256-byte vocabulary):

  .venv/bin/python experiments/train.py --config=configs/train_default.py:tiny \
      --workdir=workdirs/train_tiny

Override single fields, e.g. `--config.num_steps=100`. Writes
`loss.png` (training loss per logged step) next to `metrics.jsonl`.
"""

import ml_collections

from wisp_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config; `arg` is '' or 'tiny' (model, data, steps for CI)."""
  arg = configs.check_arg("train_default", arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "default"
  # MoEConfig fields replacing the preset's (empty: the preset as is).
  config.model.overrides = ml_collections.ConfigDict()

  # Data: stdlib .py files, split by a hash of each file's path.
  config.val_fraction = 0.1
  # Caps on the bytes read (None: every file of the split).
  config.max_train_bytes = ml_collections.config_dict.placeholder(int)
  config.max_val_bytes = ml_collections.config_dict.placeholder(int)

  config.batch_size = 16
  config.seq_len = 256
  config.num_steps = 400
  config.learning_rate = 3e-3
  config.final_lr_fraction = 0.1
  config.warmup_steps = 40
  config.weight_decay = 0.1
  config.grad_clip = 1.0
  # Switch-style load-balancing loss weight (1.0 when perfectly balanced).
  config.aux_loss_weight = 0.01

  config.log_every = 20
  config.checkpoint_every = 0  # 0: only at the end
  config.checkpoint_dtype = "bfloat16"

  # Validation: evenly spaced non-overlapping windows of held-out files.
  config.eval_windows = 256
  config.eval_batch_size = 16

  if arg == configs.TINY:
    config.model.overrides = ml_collections.ConfigDict(dict(
        name="default-tiny", d_model=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=16, expert_ffn=32, max_seq_len=64))
    config.max_train_bytes = 200_000
    config.max_val_bytes = 50_000
    config.batch_size = 8
    config.seq_len = 32
    config.num_steps = 30
    config.warmup_steps = 5
    config.log_every = 10
    config.eval_windows = 16
    config.eval_batch_size = 8
    config.checkpoint_dtype = "float32"
  return config
