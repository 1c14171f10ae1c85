"""Imports local Hugging Face MoE checkpoints into an `MoEModel`.

Supports the four architectures the model family can compute exactly:
Mixtral, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE and OLMoE, stored as
`config.json` plus `model.safetensors` or sharded safetensors with a
`model.safetensors.index.json`. Routed experts may be saved one tensor per
expert (what `save_pretrained` writes and what the hub holds) or fused per
layer (`experts.gate_up_proj` `[E, 2F, D]`, `experts.down_proj` `[E, D, F]`,
the in-memory layout of transformers 5).

Everything is checked before any weight is read: the config must describe a
model `MoEConfig` can represent (every value type-checked: sizes positive
ints, epsilons positive numbers, flags JSON booleans; a 0 is refused, never
defaulted), and every tensor must exist with the expected shape, with no
tensor left over. Weights are then read one tensor at a time, straight into
the stacked arrays of the model, so peak host memory is about the model
plus its largest stacked parameter; a tensor holding NaN or infinity is
refused. Every refusal is a `LoadError` naming the file and the key or
tensor.

The safetensors files are read by `safetensors_io`, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.errors import LoadError, MissingFileError, read_json
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.safetensors_io import SafetensorsCheckpoint
from wisp_jax.models.transformer import MoEModel


@dataclasses.dataclass(frozen=True)
class _Arch:
  """How one Hugging Face architecture names and configures its parts.

  `rope_theta`, `rms_eps` and `max_seq_len` are the defaults of the
  transformers config class, used when an old config.json lacks the key.
  """
  ffn_key: str  # config key of the routed expert width F.
  qk_norm: str
  rope_theta: float
  rms_eps: float
  max_seq_len: int
  # MoE block name in checkpoints, canonical first.
  moe_blocks: tuple[str, ...] = ("mlp",)
  # Per-expert tensor names of the gate, up and down projections.
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


ARCHITECTURES: dict[str, _Arch] = {
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in memory.
    "MixtralForCausalLM": _Arch(
        "intermediate_size", "none", rope_theta=1e6, rms_eps=1e-5,
        max_seq_len=131072, moe_blocks=("block_sparse_moe", "mlp"),
        expert_names=("w1", "w3", "w2")),
    "Qwen2MoeForCausalLM": _Arch(
        "moe_intermediate_size", "none", rope_theta=10000.0, rms_eps=1e-6,
        max_seq_len=32768),
    "Qwen3MoeForCausalLM": _Arch(
        "moe_intermediate_size", "per_head", rope_theta=10000.0,
        rms_eps=1e-6, max_seq_len=32768),
    "OlmoeForCausalLM": _Arch(
        "intermediate_size", "full", rope_theta=10000.0, rms_eps=1e-5,
        max_seq_len=4096),
}
_MODEL_TYPES = {"mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM",
                "olmoe": "OlmoeForCausalLM"}


class _Required:
  """Marks a config key without a default."""


_REQUIRED = _Required()


def _bad(key: str, value: Any, want: str) -> LoadError:
  hint = (f"; write {value.strip().lower()} without quotes"
          if isinstance(value, str) and value.strip().lower() in (
              "true", "false") else "")
  return LoadError(f"config.json {key}={value!r} is not {want}{hint}; fix "
                   "the file.", field=key)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(hf: dict[str, Any], key: str, arch: str,
                  default: Any = _REQUIRED) -> Any:
  """`hf[key]`, an int > 0; `default` if absent or null (a 0 is refused,
  never replaced by the default)."""
  value = hf.get(key)
  if value is None:
    if default is _REQUIRED:
      raise LoadError(f"config.json of a {arch} lacks {key!r}, which sets "
                      "the model's shape; add it from the model card.",
                      field=key)
    return default
  if not _is_int(value) or value <= 0:
    raise _bad(key, value, "a positive int")
  return value


def _positive_float(hf: dict[str, Any], key: str, default: float) -> float:
  """`hf[key]`, a finite number > 0; `default` if absent or null."""
  value = hf.get(key)
  if value is None:
    return float(default)
  if (not isinstance(value, (int, float)) or isinstance(value, bool)
      or (isinstance(value, float) and not math.isfinite(value))
      or value <= 0):
    raise _bad(key, value, "a finite number > 0")
  return float(value)


def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
  """`hf[key]`, a JSON boolean; `default` if absent or null."""
  value = hf.get(key)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise _bad(key, value, "a JSON boolean (true or false)")
  return value


def _text(hf: dict[str, Any], key: str) -> str | None:
  value = hf.get(key)
  if value is not None and not isinstance(value, str):
    raise _bad(key, value, "a string")
  return value


def architecture_of(hf: dict[str, Any]) -> str:
  """The supported architecture named by a `config.json` dict."""
  if not isinstance(hf, dict):
    raise LoadError(f"config.json holds {type(hf).__name__} {hf!r:.60}, not "
                    "a JSON object of settings.")
  names = hf.get("architectures") or []
  if not isinstance(names, list) or not all(isinstance(n, str)
                                            for n in names):
    raise _bad("architectures", names, "a list of class names")
  model_type = _text(hf, "model_type")
  if not names and model_type in _MODEL_TYPES:
    names = [_MODEL_TYPES[model_type]]
  known = [name for name in names if name in ARCHITECTURES]
  if len(known) != 1:
    raise LoadError(
        f"config.json names architectures={names!r}; load_hf imports exactly "
        f"one of {', '.join(ARCHITECTURES)}.", field="architectures")
  return known[0]


def _rope_theta(hf: dict[str, Any], default: float) -> float:
  """RoPE base, refusing any rope scaling the model does not implement."""
  theta = _positive_float(hf, "rope_theta", default)
  for key in ("rope_parameters", "rope_scaling"):
    params = hf.get(key)
    if not params:
      continue
    if not isinstance(params, dict) or any(isinstance(v, dict)
                                           for v in params.values()):
      raise LoadError(f"config.json {key}={params!r} is not one flat dict; "
                      "load_hf supports a single default RoPE.", field=key)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
      raise LoadError(
          f"config.json {key} has rope_type={rope_type!r}; the model "
          "implements only the default (unscaled) RoPE.", field=key)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
      raise LoadError(f"config.json {key} rotates a part of each head "
                      f"(partial_rotary_factor="
                      f"{params['partial_rotary_factor']!r}); unsupported.",
                      field=key)
    theta = _positive_float(params, "rope_theta", theta)
  return theta


def _sliding_window(hf: dict[str, Any], arch: str) -> int | None:
  """The attention window transformers would apply, or None for full."""
  window = hf.get("sliding_window")
  if window is not None and (not _is_int(window) or window < 0):
    raise _bad("sliding_window", window, "null or an int >= 0")
  window = window or None
  if arch == "MixtralForCausalLM":
    return window
  if arch == "Qwen2MoeForCausalLM":
    layer_types = hf.get("layer_types") or ["sliding_attention"]
    if not isinstance(layer_types, list):
      raise _bad("layer_types", layer_types, "a list of layer types")
    uses = (_flag(hf, "use_sliding_window", False)
            and "sliding_attention" in layer_types)
    return window if uses else None
  if arch == "Qwen3MoeForCausalLM":
    return window if _flag(hf, "use_sliding_window", False) else None
  return None  # OLMoE always attends causally over the full sequence.


def config_from_hf(hf: dict[str, Any], name: str | None = None) -> MoEConfig:
  """Translates a Hugging Face `config.json` dict into an `MoEConfig`.

  Every key is type-checked: sizes must be positive ints, `rms_norm_eps`,
  `rope_theta` finite numbers > 0, flags JSON booleans (the string "false"
  is refused, not read as true). A key that is absent or null takes the
  transformers default; a present 0 is refused, never defaulted.

  Args:
    hf: the parsed `config.json` of a supported architecture.
    name: model name for the config; the `model_type` if None.

  Returns:
    the matching `MoEConfig`.

  Raises:
    LoadError (a ValueError) naming the key: if the architecture is
      unsupported, a value has the wrong type or range, or the config
      describes a model `MoEModel` cannot compute exactly (dense layers,
      sliding window, scaled RoPE, qkv clipping, an activation other than
      SiLU).
  """
  arch = architecture_of(hf)
  spec = ARCHITECTURES[arch]
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise LoadError(f"config.json hidden_act={act!r}; the experts are "
                    "SwiGLU and need 'silu'.", field="hidden_act")
  dense = hf.get("mlp_only_layers")
  if hf.get("decoder_sparse_step", 1) != 1 or dense:
    raise LoadError(
        f"config.json decoder_sparse_step={hf.get('decoder_sparse_step')}, "
        f"mlp_only_layers={dense}: some layers are dense MLPs, but every "
        "layer of MoEModel is an MoE layer. Needs decoder_sparse_step=1 and "
        "mlp_only_layers=[].", field="decoder_sparse_step")
  if hf.get("clip_qkv") is not None:
    raise LoadError(f"config.json clip_qkv={hf['clip_qkv']}: clamping q/k/v "
                    "is not implemented; needs clip_qkv=null.",
                    field="clip_qkv")
  if arch in ("Qwen3MoeForCausalLM", "OlmoeForCausalLM") and _flag(
      hf, "attention_bias", False):
    raise LoadError(f"config.json attention_bias=true: a {arch} then has an "
                    "o_proj bias, which MoEModel lacks.",
                    field="attention_bias")
  max_seq_len = _positive_int(hf, "max_position_embeddings", arch,
                              spec.max_seq_len)
  window = _sliding_window(hf, arch)
  if window is not None and window < max_seq_len:
    raise LoadError(
        f"config.json uses sliding-window attention (sliding_window={window} "
        f"< max_position_embeddings={max_seq_len}); MoEModel attends over "
        "the full sequence. Needs use_sliding_window=false or "
        "sliding_window=null.", field="sliding_window")

  experts = {key: _positive_int(hf, key, arch, None)
             for key in ("num_local_experts", "num_experts")}
  given = {v for v in experts.values() if v is not None}
  if len(given) != 1:
    raise LoadError(
        f"config.json must give the number of experts once as "
        f"num_local_experts or num_experts; found {sorted(given)}.",
        field="num_experts")
  d_model = _positive_int(hf, "hidden_size", arch)
  num_heads = _positive_int(hf, "num_attention_heads", arch)
  shared_ffn = (_positive_int(hf, "shared_expert_intermediate_size", arch)
                if arch == "Qwen2MoeForCausalLM" else 0)
  return MoEConfig(
      name=name or _text(hf, "model_type") or arch,
      vocab_size=_positive_int(hf, "vocab_size", arch),
      d_model=d_model,
      num_layers=_positive_int(hf, "num_hidden_layers", arch),
      num_heads=num_heads,
      num_kv_heads=_positive_int(hf, "num_key_value_heads", arch, num_heads),
      head_dim=_positive_int(hf, "head_dim", arch, d_model // num_heads),
      num_experts=given.pop(),
      top_k=_positive_int(hf, "num_experts_per_tok", arch),
      expert_ffn=_positive_int(hf, spec.ffn_key, arch),
      shared_ffn=shared_ffn,
      shared_expert_gate=shared_ffn > 0,
      # Mixtral always renormalises; the others default to not.
      norm_topk_prob=(arch == "MixtralForCausalLM" or
                      _flag(hf, "norm_topk_prob", False)),
      qk_norm=spec.qk_norm,
      qkv_bias=(arch == "Qwen2MoeForCausalLM" and
                _flag(hf, "qkv_bias", True)),
      rope_theta=_rope_theta(hf, spec.rope_theta),
      rms_eps=_positive_float(hf, "rms_norm_eps", spec.rms_eps),
      tie_embeddings=_flag(hf, "tie_word_embeddings", False),
      max_seq_len=max_seq_len)


def _read_config(directory: pathlib.Path) -> tuple[dict[str, Any],
                                                   MoEConfig]:
  """The parsed `config.json` of `directory` and its `MoEConfig`."""
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise MissingFileError(f"{directory} has no config.json; pass the "
                           "directory written by save_pretrained.",
                           file=directory)
  hf = read_json(config_file)
  try:
    return hf, config_from_hf(hf, name=directory.name)
  except ValueError as e:  # LoadError, or MoEConfig's own checks
    raise LoadError(f"{config_file}: {e}", file=config_file,
                    field=getattr(e, "field", None)) from None


def config_from_file(path: str | pathlib.Path) -> MoEConfig:
  """The `MoEConfig` of a local Hugging Face directory's `config.json`.

  Args:
    path: the directory (or its `config.json`).

  Returns:
    the config, checked as `config_from_hf` checks it.

  Raises:
    MissingFileError: if there is no config.json.
    LoadError: naming the file and key, if it is not valid JSON or
      `config_from_hf` refuses it.
  """
  path = pathlib.Path(path)
  return _read_config(path.parent if path.name == "config.json"
                      and path.is_file() else path)[1]


# ---------------------------------------------------------------- mapping


def _swap_last(t: np.ndarray) -> np.ndarray:
  """torch `[out, in]` (or `[E, out, in]`) to our `[in, out]` layout."""
  return np.swapaxes(t, -1, -2)


@dataclasses.dataclass(frozen=True)
class _Copy:
  """One checkpoint tensor and where it lands in a model parameter."""
  source: str
  shape: tuple[int, ...]  # expected shape in the checkpoint
  index: tuple[int, ...] = ()  # position in the destination parameter
  transform: Callable[[np.ndarray], np.ndarray] | None = None


Plan = list[tuple[nnx.Variable, list[_Copy]]]


def _expert_copies(c: MoEConfig, arch: _Arch, prefix: str,
                   layer: int, names: set[str]) -> tuple[list, list, list]:
  """Copies into the stacked gate, up and down experts of one layer."""
  d, e, f = c.d_model, c.num_experts, c.expert_ffn
  fused = prefix + "experts.gate_up_proj"
  if fused in names:
    return ([_Copy(fused, (e, 2 * f, d), (layer,),
                   lambda t: _swap_last(t[:, :f]))],
            [_Copy(fused, (e, 2 * f, d), (layer,),
                   lambda t: _swap_last(t[:, f:]))],
            [_Copy(prefix + "experts.down_proj", (e, d, f), (layer,),
                   _swap_last)])

  def per_expert(weight: str, shape: tuple[int, int]) -> list[_Copy]:
    return [_Copy(f"{prefix}experts.{i}.{weight}.weight", shape, (layer, i),
                  _swap_last) for i in range(e)]

  gate, up, down = arch.expert_names
  return (per_expert(gate, (f, d)), per_expert(up, (f, d)),
          per_expert(down, (d, f)))


def _plan(model: MoEModel, arch: _Arch, names: set[str]) -> Plan:
  """Every parameter of `model` with the checkpoint tensors that fill it."""
  c = model.config
  d, v = c.d_model, c.vocab_size
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  dec = model.decoder
  plan: Plan = [(dec.embed, [_Copy("model.embed_tokens.weight", (v, d))]),
                (dec.final_norm, [_Copy("model.norm.weight", (d,))])]
  if not c.tie_embeddings:
    plan.append((dec.lm_head, [_Copy("lm_head.weight", (v, d), (),
                                     _swap_last)]))
  # The decoder layers' parameters are stacked [L, ...]: each layer's
  # tensor lands at index (l,) of its stacked parameter.
  layers = dec.layers
  attn = layers.attn
  stacked: dict[str, tuple[nnx.Variable, list[_Copy]]] = {}

  def add(name: str, variable: nnx.Variable, source: str,
          shape: tuple[int, ...], layer: int, transform=None) -> None:
    stacked.setdefault(name, (variable, []))[1].append(
        _Copy(source, shape, (layer,), transform))

  gate, up, down = [], [], []
  for l in range(c.num_layers):
    p = f"model.layers.{l}."
    block = next((b for b in arch.moe_blocks if f"{p}{b}.gate.weight" in names),
                 arch.moe_blocks[0])
    moe = f"{p}{block}."

    def linear(name: str, variable, source: str, shape: tuple[int, int],
               p=p, l=l) -> None:
      add(name, variable, p + source, shape, l, _swap_last)

    add("input_norm", layers.input_norm, p + "input_layernorm.weight", (d,), l)
    add("post_attn_norm", layers.post_attn_norm,
        p + "post_attention_layernorm.weight", (d,), l)
    linear("q_proj", attn.q_proj, "self_attn.q_proj.weight", (q_out, d))
    linear("k_proj", attn.k_proj, "self_attn.k_proj.weight", (kv_out, d))
    linear("v_proj", attn.v_proj, "self_attn.v_proj.weight", (kv_out, d))
    linear("o_proj", attn.o_proj, "self_attn.o_proj.weight", (d, q_out))
    add("router", layers.router, moe + "gate.weight", (c.num_experts, d), l,
        _swap_last)
    if c.qkv_bias:
      add("q_bias", attn.q_bias, p + "self_attn.q_proj.bias", (q_out,), l)
      add("k_bias", attn.k_bias, p + "self_attn.k_proj.bias", (kv_out,), l)
      add("v_bias", attn.v_bias, p + "self_attn.v_proj.bias", (kv_out,), l)
    if c.qk_norm != "none":
      per_head = c.qk_norm == "per_head"
      add("q_norm", attn.q_norm, p + "self_attn.q_norm.weight",
          (c.head_dim,) if per_head else (q_out,), l)
      add("k_norm", attn.k_norm, p + "self_attn.k_norm.weight",
          (c.head_dim,) if per_head else (kv_out,), l)
    if c.shared_ffn:
      s = c.shared_ffn
      linear("shared_gate", layers.shared_gate_proj,
             "mlp.shared_expert.gate_proj.weight", (s, d))
      linear("shared_up", layers.shared_up_proj,
             "mlp.shared_expert.up_proj.weight", (s, d))
      linear("shared_down", layers.shared_down_proj,
             "mlp.shared_expert.down_proj.weight", (d, s))
      if c.shared_expert_gate:
        linear("shared_expert_gate", layers.shared_expert_gate,
               "mlp.shared_expert_gate.weight", (1, d))
    layer_gate, layer_up, layer_down = _expert_copies(c, arch, moe, l, names)
    gate += layer_gate
    up += layer_up
    down += layer_down
  plan += list(stacked.values())
  plan += [(model.experts.gate, gate), (model.experts.up, up),
           (model.experts.down, down)]
  return plan


def _check(plan: Plan, ckpt: SafetensorsCheckpoint, c: MoEConfig) -> None:
  """Raises listing every missing, mis-shaped or unused tensor."""
  problems, used = [], set()
  for _, copies in plan:
    for cp in copies:
      used.add(cp.source)
      info = ckpt.tensors.get(cp.source)
      if info is None:
        problems.append(f"tensor {cp.source!r} is missing (expected shape "
                        f"{cp.shape})")
      elif info.shape != cp.shape:
        problems.append(f"tensor {cp.source!r} has shape {info.shape}, "
                        f"expected {cp.shape}")
  ignored = {"lm_head.weight"} if c.tie_embeddings else set()
  unused = sorted(n for n in ckpt.tensors if n not in used and n not in ignored
                  and not n.endswith("rotary_emb.inv_freq"))
  if unused:
    problems.append(
        f"{len(unused)} tensor(s) have no place in the model, e.g. "
        f"{', '.join(map(repr, unused[:3]))}; the checkpoint holds weights "
        "its config does not describe, which MoEModel cannot compute")
  if problems:
    shown = "; ".join(problems[:8])
    more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
    raise LoadError(f"Checkpoint {ckpt.source} does not match its "
                    f"config.json: {shown}{more}.", file=ckpt.source)


def _check_finite(ckpt: SafetensorsCheckpoint, name: str,
                  tensor: np.ndarray) -> None:
  """Refuses NaN or infinite weights: what a bit flip in the data leaves."""
  finite = np.isfinite(tensor)
  if not finite.all():
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise LoadError(
        f"{ckpt.tensors[name].file}: tensor {name!r} holds "
        f"{int((~finite).sum())} NaN or infinite value(s) (the first at "
        f"index {first}); the file is corrupt. Re-download or re-save it.",
        file=ckpt.tensors[name].file, field=name)


def load_hf(path: str | pathlib.Path, dtype=jnp.float32) -> MoEModel:
  """Loads a local Hugging Face MoE checkpoint as an `MoEModel`.

  Args:
    path: directory with `config.json` and `model.safetensors` (or shards
      and `model.safetensors.index.json`).
    dtype: parameter dtype of the model (e.g. `jnp.float32`, `jnp.bfloat16`);
      stored weights are cast to it.

  Returns:
    the model, routed experts stacked `[L, E, ...]` in `model.experts`.

  Raises:
    MissingFileError (a FileNotFoundError): if the directory, its config or
      its weights are missing.
    LoadError (a ValueError) naming the file and the key or tensor: if the
      config is unsupported or malformed, a safetensors file or the index
      is corrupt, or a tensor is missing, mis-shaped, left over or holds
      NaN or infinity.
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise MissingFileError(f"Checkpoint directory {directory} does not "
                           "exist; pass a local save_pretrained directory.",
                           file=directory)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype} is not a floating-point dtype.")
  hf, config = _read_config(directory)
  arch = ARCHITECTURES[architecture_of(hf)]
  ckpt = SafetensorsCheckpoint(directory)

  # Shapes only: no random weights are drawn for a model about to be filled.
  model = nnx.eval_shape(lambda: MoEModel(config, dtype=dtype))
  plan = _plan(model, arch, set(ckpt.tensors))
  _check(plan, ckpt, config)
  np_dtype = np.dtype(dtype)
  checked = set()
  for variable, copies in plan:
    buffer = np.empty(variable.get_value().shape, np_dtype)
    for cp in copies:
      tensor = ckpt.read(cp.source)
      if cp.source not in checked:
        _check_finite(ckpt, cp.source, tensor)
        checked.add(cp.source)
      buffer[cp.index] = cp.transform(tensor) if cp.transform else tensor
    variable.set_value(jnp.asarray(buffer))

  for path_, variable in nnx.iter_graph(model):
    if (isinstance(variable, nnx.Variable) and
        isinstance(variable.get_value(), jax.ShapeDtypeStruct)):
      raise RuntimeError(f"load_hf does not fill parameter "
                         f"{'.'.join(map(str, path_))}; update its plan.")
  return model
