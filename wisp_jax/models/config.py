"""Model hyperparameters: a frozen `MoEConfig` and its named presets.

Real-model presets carry the numbers of the public `config.json` of each
model; they are meant for `jax.eval_shape` and the simulator, never for
allocation on a laptop.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

QKNorm = Literal["none", "per_head", "full"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Hyperparameters of a decoder-only MoE transformer.

  Attributes:
    name: preset or model name, for logs and traces.
    vocab_size: V, number of token ids.
    d_model: D, residual width.
    num_layers: L, decoder layers (every layer is an MoE layer).
    num_heads: H, query heads.
    num_kv_heads: key/value heads (grouped-query attention), divides H.
    head_dim: per-head width; need not equal D / H.
    num_experts: E, routed experts per layer.
    top_k: K, experts per token.
    expert_ffn: F, hidden width of one routed SwiGLU expert.
    shared_ffn: hidden width of the shared expert (0: none).
    shared_expert_gate: scale the shared expert by sigmoid(x @ w) (Qwen2-MoE).
    norm_topk_prob: renormalise the top-k softmax weights to sum to one.
    qk_norm: RMSNorm on queries and keys: per head (Qwen3), over the whole
      projection (OLMoE) or none.
    qkv_bias: biases on the q/k/v projections (Qwen2-MoE).
    rope_theta: RoPE base.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: LM head shares the embedding matrix.
    max_seq_len: longest sequence (prompt + generation) the model accepts.
    unroll_layers: debugging only: unroll the layer loop in Python instead
      of `jax.lax.fori_loop` over the stacked layers (same results; the
      step's program and compile time then grow with depth).
  """

  name: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  expert_ffn: int
  shared_ffn: int = 0
  shared_expert_gate: bool = False
  norm_topk_prob: bool = True
  qk_norm: QKNorm = "none"
  qkv_bias: bool = False
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  unroll_layers: bool = False

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "num_experts", "top_k",
                "expert_ffn", "max_seq_len")
    for field in positive:
      if getattr(self, field) <= 0:
        raise ValueError(f"MoEConfig.{field} must be positive, got "
                         f"{getattr(self, field)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs "
          "each kv head to serve the same number of query heads.")
    if self.top_k > self.num_experts:
      raise ValueError(f"top_k={self.top_k} exceeds num_experts="
                       f"{self.num_experts}.")
    if self.shared_ffn < 0:
      raise ValueError(f"shared_ffn must be >= 0, got {self.shared_ffn}.")
    if self.qk_norm not in ("none", "per_head", "full"):
      raise ValueError(f"qk_norm must be 'none', 'per_head' or 'full', got "
                       f"{self.qk_norm!r}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")

  @property
  def expert_params(self) -> int:
    """Parameters of one routed expert (gate, up and down projections)."""
    return 3 * self.d_model * self.expert_ffn

  def expert_bytes(self, bytes_per_param: float = 2) -> int:
    """Bytes of one routed expert at the given width (bf16 by default;
    int4 is 0.5, rounded up to whole bytes)."""
    return -(-int(self.expert_params * 2 * bytes_per_param) // 2)

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, MoEConfig] = {
    # Odd sizes on purpose: head_dim != d_model / heads, E not a power of
    # two, so that layout bugs cannot hide in the tests.
    "tiny": MoEConfig(
        name="tiny", vocab_size=61, d_model=24, num_layers=2, num_heads=3,
        num_kv_heads=1, head_dim=10, num_experts=6, top_k=2, expert_ffn=20,
        max_seq_len=256),
    # The byte-level model trained by experiments/train.py.
    "default": MoEConfig(
        name="default", vocab_size=256, d_model=128, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8, top_k=2,
        expert_ffn=192, norm_topk_prob=True, rope_theta=10000.0,
        rms_eps=1e-6, tie_embeddings=True, max_seq_len=512),
    # mistralai/Mixtral-8x7B-v0.1 config.json.
    "mixtral-8x7b": MoEConfig(
        name="mixtral-8x7b", vocab_size=32000, d_model=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
        expert_ffn=14336, norm_topk_prob=True, rope_theta=1e6, rms_eps=1e-5,
        max_seq_len=32768),
    # Qwen/Qwen3-30B-A3B config.json.
    "qwen3-30b-a3b": MoEConfig(
        name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8,
        expert_ffn=768, norm_topk_prob=True, qk_norm="per_head",
        rope_theta=1e6, rms_eps=1e-6, max_seq_len=40960),
    # allenai/OLMoE-1B-7B-0924 config.json.
    "olmoe-1b-7b": MoEConfig(
        name="olmoe-1b-7b", vocab_size=50304, d_model=2048, num_layers=16,
        num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
        expert_ffn=1024, norm_topk_prob=False, qk_norm="full",
        rope_theta=10000.0, rms_eps=1e-5, max_seq_len=4096),
    # Qwen/Qwen1.5-MoE-A2.7B config.json: 4 shared experts fused into one
    # of width 5632, scaled by a sigmoid gate.
    "qwen1.5-moe-a2.7b": MoEConfig(
        name="qwen1.5-moe-a2.7b", vocab_size=151936, d_model=2048,
        num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128,
        num_experts=60, top_k=4, expert_ffn=1408, shared_ffn=5632,
        shared_expert_gate=True, norm_topk_prob=False, qkv_bias=True,
        rope_theta=1e6, rms_eps=1e-6, max_seq_len=8192),
}


def _small_width(preset: str, **changes) -> MoEConfig:
  """`preset`'s depth, expert count, top-k and block features at a width
  a laptop runs: the pager meets real E and L in tests."""
  real = PRESETS[preset]
  small = dict(vocab_size=97, d_model=32, num_heads=4,
               num_kv_heads=2 if real.num_kv_heads < real.num_heads else 4,
               head_dim=8, expert_ffn=24, max_seq_len=512)
  small.update(changes)
  return real.replace(name=f"{preset}-small", **small)


# Real geometry (L, E, K, norms, routing renormalisation), small width.
PRESETS.update({
    "mixtral-8x7b-small": _small_width("mixtral-8x7b"),
    "qwen3-30b-a3b-small": _small_width("qwen3-30b-a3b"),
    "olmoe-1b-7b-small": _small_width("olmoe-1b-7b"),
})


def get_config(name: str) -> MoEConfig:
  """Returns the preset `name`; raises with the list of known presets."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"Unknown model preset {name!r}; known presets: "
                     f"{', '.join(sorted(PRESETS))}.") from None
