r"""Continues real Python source with the shipped default MoE model.

  .venv/bin/python experiments/demo.py
  .venv/bin/python experiments/demo.py --temperature=0 --max_new_tokens=64

Loads `wisp_jax/assets/default/` (never downloads anything), takes the
opening of a function from held-out stdlib files as prompts, prints each
prompt and its continuation, and the decode speed measured after a warm-up
run that compiles the prefill and decode steps.
"""

import time

from absl import app
from absl import flags

from wisp_jax import data
from wisp_jax.models.default import load_default
from wisp_jax.serving.generate import generate

_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 2, "Prompts in the batch.")
_FIRST_PROMPT = flags.DEFINE_integer(
    "first_prompt", 2, "Index of the first prompt in data.sample_prompts.")
_PROMPT_BYTES = flags.DEFINE_integer("prompt_bytes", 160,
                                     "Longest prompt in bytes.")
# Prompt + continuation stay within the 256-byte training context.
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 96,
                                       "Bytes to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6,
                                  "Sampling temperature (0: greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _timed_generate(model, prompts, max_new_tokens):
  start = time.perf_counter()
  out = generate(model, prompts, max_new_tokens,
                 temperature=_TEMPERATURE.value, seed=_SEED.value)
  return out, time.perf_counter() - start


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model = load_default()
  c = model.config
  print(f"model {c.name}: L={c.num_layers} E={c.num_experts} K={c.top_k} "
        f"D={c.d_model} F={c.expert_ffn}, byte-level (V={c.vocab_size})")
  first = _FIRST_PROMPT.value
  texts = data.sample_prompts(first + _NUM_PROMPTS.value,
                              _PROMPT_BYTES.value)[first:]
  prompts = [data.encode(t) for t in texts]
  n = _MAX_NEW_TOKENS.value

  # Warm-up: compiles prefill and decode for these shapes (and for a
  # one-token run, used to take the prefill out of the decode timing).
  _timed_generate(model, prompts, n)
  _timed_generate(model, prompts, 1)
  out, full_s = _timed_generate(model, prompts, n)
  _, prefill_s = _timed_generate(model, prompts, 1)

  for i, (text, row) in enumerate(zip(texts, out.tokens)):
    print(f"\n=== prompt {i} ===\n{text}", end="")
    print(f"=== continuation {i} (temperature {_TEMPERATURE.value}) ===")
    print(data.decode(row))
  batch = len(prompts)
  decode_s = max(full_s - prefill_s, 1e-9)
  print(f"\ndecode: {batch} x {n - 1} tokens in {decode_s:.3f} s = "
        f"{batch * (n - 1) / decode_s:.0f} tokens/s "
        f"({(n - 1) / decode_s:.0f} steps/s), measured after a warm-up run "
        f"that compiled the steps; prefill of {batch} x "
        f"{max(len(p) for p in prompts)} bytes: {prefill_s * 1e3:.0f} ms "
        f"(resident experts, {model.dtype}).")


if __name__ == "__main__":
  app.run(main)
