"""Compression ratio, exponent entropy and decode speed of the codec.

Three weight sources, each as `[L, E, ...]` expert stacks of gate, up and
down projections: the shipped default model (trained), synthetic Gaussian
weights (std `fan_in ** -0.5`, bf16) and a tiny Hugging Face Mixtral built
in memory by `transformers` (its own random init, std 0.02). Every encoded
stack is decoded and compared bit for bit before it is reported.

  .venv/bin/python -m wisp_jax.compress.measure

prints the tables as markdown (several seconds on two CPU cores). The
traffic of the compressed tiers in the pager: `wisp_jax.serving.tier_traffic`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from wisp_jax.compress import codec
from wisp_jax.models.default import load_default

PROJECTIONS = ("gate", "up", "down")


def stack_stats(bits: np.ndarray, batch_dims: int = 2) -> dict[str, Any]:
  """Codec numbers of one stack of tensors, checked exact.

  Args:
    bits: `[..., *shape]` uint16 bf16 bits, `batch_dims` leading stack dims.
    batch_dims: 2 for `[L, E, D, F]`.

  Returns:
    shape, code_bits, escape_capacity, is_raw, ratio (raw / compressed
    bytes), bits_per_value (compressed), entropy_bits (mean per-tensor
    exponent entropy) and entropy_ratio (`16 / (8 + entropy)`, the best any
    exponent code can do with sign and mantissa raw).
  """
  c = codec.encode(bits, batch_dims=batch_dims)
  decoded = np.asarray(jax.jit(codec.decode)(jax.device_put(c)))
  if not np.array_equal(decoded, np.asarray(bits)):
    raise AssertionError(f"decode is not exact on a stack of {bits.shape}")
  entropy = codec.exponent_entropy(bits, batch_dims)
  size = codec.compressed_bytes(c)
  return {"shape": tuple(bits.shape), "code_bits": c.code_bits,
          "escape_capacity": c.escape_capacity, "is_raw": c.is_raw,
          "ratio": codec.raw_bytes(c) / size,
          "bits_per_value": 8 * size / bits.size,
          "entropy_bits": entropy, "entropy_ratio": 16 / (8 + entropy)}


def _bits(w) -> np.ndarray:
  return np.asarray(jax.lax.bitcast_convert_type(
      jnp.asarray(w, jnp.bfloat16), jnp.uint16))


def default_model_experts() -> dict[str, np.ndarray]:
  """The default model's `[L, E, ...]` expert bits per projection."""
  experts = load_default(dtype=jnp.bfloat16).experts
  return {name: _bits(getattr(experts, name)[...]) for name in PROJECTIONS}


def gaussian_experts(num_layers: int = 2, num_experts: int = 4,
                     d_model: int = 2048, expert_ffn: int = 768,
                     seed: int = 0) -> dict[str, np.ndarray]:
  """Gaussian `[L, E, ...]` expert bits, std `fan_in ** -0.5` (Qwen3-30B
  expert sizes by default)."""
  rng = np.random.default_rng(seed)
  shapes = {"gate": (d_model, expert_ffn), "up": (d_model, expert_ffn),
            "down": (expert_ffn, d_model)}
  out = {}
  for name, (fan_in, fan_out) in shapes.items():
    w = rng.standard_normal((num_layers, num_experts, fan_in, fan_out),
                            np.float32) * fan_in ** -0.5
    out[name] = w.astype(ml_dtypes.bfloat16).view(np.uint16)
  return out


def _torch_bits(t) -> np.ndarray:
  """uint16 bits of a bf16 torch tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  return t.detach().view(torch.int16).numpy().view(np.uint16)


def hf_mixtral_experts(num_layers: int = 2, num_experts: int = 4,
                       hidden_size: int = 256, intermediate_size: int = 512,
                       seed: int = 0) -> dict[str, np.ndarray]:
  """Expert bits of a tiny `MixtralForCausalLM` built in memory.

  Needs `torch` and `transformers` (the test extra). transformers 5 holds
  experts fused per layer: `gate_up_proj` `[E, 2F, D]`, `down_proj`
  `[E, D, F]`; they are returned as `[L, E, D, F]` / `[L, E, F, D]`.
  """
  # Test extras, not dependencies of the package: imported only here.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.MixtralConfig(
      vocab_size=64, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
      num_local_experts=num_experts, num_attention_heads=4,
      num_key_value_heads=2, num_experts_per_tok=2)
  torch.manual_seed(seed)
  model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
  f = intermediate_size
  stacks = {name: [] for name in PROJECTIONS}
  for layer in model.model.layers:
    experts = layer.mlp.experts
    gate_up = _torch_bits(experts.gate_up_proj)  # [E, 2F, D]
    down = _torch_bits(experts.down_proj)  # [E, D, F]
    stacks["gate"].append(gate_up[:, :f].swapaxes(1, 2))
    stacks["up"].append(gate_up[:, f:].swapaxes(1, 2))
    stacks["down"].append(down.swapaxes(1, 2))
  return {name: np.ascontiguousarray(np.stack(s)) for name, s in stacks.items()}


def ratio_table(sources: dict[str, dict[str, np.ndarray]]
                ) -> dict[str, dict[str, dict[str, Any]]]:
  """`stack_stats` of every projection of every source (`{source: {proj:
  stats}}`), plus an "all" entry per source pooling the bytes."""
  out = {}
  for source, stacks in sources.items():
    rows = {name: stack_stats(bits) for name, bits in stacks.items()}
    values = sum(bits.size for bits in stacks.values())
    stored = sum(r["bits_per_value"] * stacks[n].size for n, r in rows.items())
    entropy = sum(r["entropy_bits"] * stacks[n].size
                  for n, r in rows.items()) / values
    rows["all"] = {"ratio": 16 * values / stored,
                   "bits_per_value": stored / values, "entropy_bits": entropy,
                   "entropy_ratio": 16 / (8 + entropy)}
    out[source] = rows
  return out


def decode_throughput(bits: np.ndarray, batch_dims: int = 0,
                      repeats: int = 20) -> dict[str, Any]:
  """GB/s of decoded bf16 output of jitted `decode`, after a warm-up.

  Args:
    bits: the tensor or stack to encode and decode.
    batch_dims: leading stack dims of `bits` (all decoded in one call).
    repeats: timed calls; each is one decode of everything.

  Returns:
    decoded_bytes, repeats, and gbps_median / gbps_min / gbps_max over the
    timed calls.
  """
  c = jax.device_put(codec.encode(bits, batch_dims=batch_dims))
  decode = jax.jit(codec.decode)
  out = decode(c).block_until_ready()  # compile and warm up
  if not np.array_equal(np.asarray(out), bits):
    raise AssertionError(f"decode is not exact on {bits.shape}")
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    decode(c).block_until_ready()
    seconds.append(time.perf_counter() - start)
  rates = [bits.nbytes / s / 1e9 for s in seconds]
  return {"decoded_bytes": bits.nbytes, "repeats": repeats,
          "code_bits": c.code_bits, "gbps_median": statistics.median(rates),
          "gbps_min": min(rates), "gbps_max": max(rates)}


def throughput_table(repeats: int = 20) -> dict[str, dict[str, Any]]:
  """Decode speed of a default-model stack, of one of its experts, and of
  one Qwen3-30B-sized Gaussian expert."""
  default = default_model_experts()["gate"]
  qwen = gaussian_experts(1, 1)["gate"][0, 0]
  return {
      "default gate stack [4, 8, 128, 192]": decode_throughput(
          default, 2, repeats),
      "default gate expert [128, 192]": decode_throughput(
          default[0, 0], 0, repeats),
      "gaussian expert [2048, 768]": decode_throughput(qwen, 0, repeats),
  }


def markdown(ratios: dict, speeds: dict) -> str:
  """The two tables as markdown."""
  lines = ["| source | tensor | shape [L, E, ...] | b | escape cap | ratio "
           "| bits/value | exponent entropy (bits) | entropy bound ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for source, rows in ratios.items():
    for name, r in rows.items():
      shape = r.get("shape", "")
      b = r.get("code_bits", "")
      cap = r.get("escape_capacity", "")
      if r.get("is_raw"):
        b = "raw"
      lines.append(
          f"| {source} | {name} | {shape} | {b} | {cap} | {r['ratio']:.3f} "
          f"| {r['bits_per_value']:.2f} | {r['entropy_bits']:.3f} "
          f"| {r['entropy_ratio']:.3f} |")
  lines += ["", f"decode on {jax.devices()[0].platform} "
            f"({jax.devices()[0].device_kind}), jitted, after warm-up:", "",
            "| tensor | b | decoded MB | repeats | GB/s median | min | max |",
            "|---|---|---|---|---|---|---|"]
  for name, s in speeds.items():
    lines.append(f"| {name} | {s['code_bits']} | {s['decoded_bytes'] / 1e6:.3f}"
                 f" | {s['repeats']} | {s['gbps_median']:.2f} "
                 f"| {s['gbps_min']:.2f} | {s['gbps_max']:.2f} |")
  return "\n".join(lines)


def main() -> None:
  sources = {"default model": default_model_experts(),
             "gaussian": gaussian_experts(),
             "hf mixtral (tiny)": hf_mixtral_experts()}
  print(markdown(ratio_table(sources), throughput_table()))


if __name__ == "__main__":
  main()
