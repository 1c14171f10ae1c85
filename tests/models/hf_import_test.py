"""Tests for wisp_jax/models/hf_import.py against transformers' PyTorch models.

Each architecture gets one tiny random model with odd sizes (head_dim !=
D / H where the architecture allows it, E=5, K=3, V=97), saved with
`save_pretrained` and imported with `load_hf`; logits and greedy decoding
must match the PyTorch reference in float32.
"""

import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from wisp_jax.errors import LoadError
from wisp_jax.models import hf_import
from wisp_jax.models.hf_import import config_from_hf, load_hf
from wisp_jax.models.safetensors_io import read_header
from wisp_jax.serving.generate import generate
from tests.mutations import mutate

ATOL = 1e-4
COMMON = dict(vocab_size=97, hidden_size=48, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=3,
              attn_implementation="eager")
# name: (config class, model class, config fields, expected MoEConfig fields)
ARCHS = {
    "mixtral": (
        transformers.MixtralConfig, transformers.MixtralForCausalLM,
        dict(num_hidden_layers=2, num_local_experts=5, intermediate_size=40,
             head_dim=16),
        dict(head_dim=16, norm_topk_prob=True, qk_norm="none", shared_ffn=0)),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
        dict(num_hidden_layers=2, num_experts=5, moe_intermediate_size=40,
             shared_expert_intermediate_size=56, intermediate_size=64,
             head_dim=16, norm_topk_prob=False),
        dict(head_dim=16, norm_topk_prob=False, qkv_bias=True, shared_ffn=56,
             shared_expert_gate=True)),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
        dict(num_hidden_layers=3, num_experts=5, moe_intermediate_size=40,
             intermediate_size=64, head_dim=16, norm_topk_prob=True,
             tie_word_embeddings=True),
        dict(head_dim=16, norm_topk_prob=True, qk_norm="per_head",
             tie_embeddings=True)),
    # OLMoE's q_norm spans hidden_size, so head_dim is D / H = 12.
    "olmoe": (
        transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
        dict(num_hidden_layers=2, num_experts=5, intermediate_size=40,
             norm_topk_prob=False),
        dict(head_dim=12, norm_topk_prob=False, qk_norm="full")),
}


def _build_torch(name: str, seed: int = 0, **overrides):
  config_cls, model_cls, fields, _ = ARCHS[name]
  config = config_cls(**COMMON, **{**fields, **overrides})
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  # The default init (std 0.02) gives near-uniform routing, whose near-ties
  # would make the comparison both fragile and weak: use O(1) activations,
  # non-trivial norm scales and biases.
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      if p.ndim == 1 and param_name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
  """(arch name, torch model, saved directory, imported model)."""
  torch_model = _build_torch(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(directory)
  return request.param, torch_model, directory, load_hf(directory)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
  """A saved Mixtral checkpoint and its torch model, for file-level tests."""
  torch_model = _build_torch("mixtral", seed=1)
  directory = tmp_path_factory.mktemp("mixtral_files")
  torch_model.save_pretrained(directory)
  return torch_model, directory


def _params(model) -> dict:
  return {k: np.asarray(v) for k, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for key in pa:
    np.testing.assert_array_equal(pa[key], pb[key], err_msg=str(key))


def test_config_translation(checkpoint):
  name, torch_model, _, model = checkpoint
  hf = torch_model.config
  expected = ARCHS[name][3]
  got = model.config
  assert {k: getattr(got, k) for k in expected} == expected
  assert (got.num_layers, got.num_experts, got.top_k, got.expert_ffn) == (
      hf.num_hidden_layers, 5, 3, 40)
  assert (got.vocab_size, got.d_model, got.num_heads, got.num_kv_heads) == (
      97, 48, 4, 2)
  assert got.rms_eps == hf.rms_norm_eps
  assert got.rope_theta == hf.rope_parameters["rope_theta"]


def test_experts_are_stacked_per_layer(checkpoint):
  name, torch_model, _, model = checkpoint
  c = model.config
  assert model.experts.gate[...].shape == (c.num_layers, 5, 48, 40)
  assert model.experts.down[...].shape == (c.num_layers, 5, 40, 48)
  # In memory, transformers 5 fuses the experts: gate_up [E, 2F, D].
  experts = torch_model.model.layers[1].mlp.experts
  gate_up = experts.gate_up_proj.detach().numpy()
  np.testing.assert_array_equal(model.experts.gate[1, 3],
                                gate_up[3, :40].T)
  np.testing.assert_array_equal(model.experts.up[1, 3], gate_up[3, 40:].T)
  np.testing.assert_array_equal(model.experts.down[1, 3],
                                experts.down_proj[3].detach().numpy().T)


def test_full_sequence_logits_match_transformers(checkpoint):
  _, torch_model, _, model = checkpoint
  tokens = np.random.default_rng(0).integers(0, 97, (2, 13))
  with torch.no_grad():
    want = torch_model(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
  assert np.abs(want).max() > 1.0  # the comparison is not of near-zeros
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def _torch_greedy(model, prompt, steps):
  """Greedy decoding with transformers' KV cache: tokens and logits."""
  ids, past, tokens, logits = torch.tensor([prompt]), None, [], []
  with torch.no_grad():
    for _ in range(steps):
      out = model(ids, past_key_values=past, use_cache=True)
      past = out.past_key_values
      step_logits = out.logits[0, -1]
      ids = step_logits.argmax().reshape(1, 1)
      tokens.append(int(ids))
      logits.append(step_logits.numpy())
  return np.array(tokens), np.stack(logits)


def test_greedy_decode_matches_transformers(checkpoint):
  _, torch_model, _, model = checkpoint
  prompt = [5, 17, 3, 88, 42, 61, 9]
  want_tokens, want_logits = _torch_greedy(torch_model, prompt, 16)
  out = generate(model, [prompt], max_new_tokens=16, return_logits=True)
  np.testing.assert_array_equal(out.tokens[0], want_tokens)
  np.testing.assert_allclose(out.logits[0], want_logits, rtol=0, atol=ATOL)
  assert len(set(want_tokens.tolist())) > 1  # not a degenerate repetition


def test_sharded_checkpoint_loads_like_single_file(mixtral_dir, tmp_path):
  torch_model, single = mixtral_dir
  torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  _assert_same_params(load_hf(tmp_path), load_hf(single))


def test_fused_experts_layout_loads_like_per_expert(mixtral_dir, tmp_path):
  torch_model, single = mixtral_dir
  # The in-memory state dict: mlp.gate, mlp.experts.gate_up_proj/down_proj.
  state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
  assert "model.layers.0.mlp.experts.gate_up_proj" in state
  safetensors.torch.save_file(state, tmp_path / "model.safetensors")
  shutil.copy(single / "config.json", tmp_path)
  _assert_same_params(load_hf(tmp_path), load_hf(single))


def test_bfloat16_checkpoint(tmp_path):
  torch_model = _build_torch("olmoe", seed=2).to(torch.bfloat16)
  torch_model.save_pretrained(tmp_path)
  embed = torch_model.model.embed_tokens.weight.detach()
  model = load_hf(tmp_path, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  # Bit-exact: the bf16 bits are copied, not rounded twice.
  np.testing.assert_array_equal(
      np.asarray(model.decoder.embed[...]).view(np.uint16),
      embed.view(torch.int16).numpy().view(np.uint16))
  model32 = load_hf(tmp_path)
  np.testing.assert_array_equal(np.asarray(model32.decoder.embed[...]),
                                embed.float().numpy())


# ---------------------------------------------------------------- errors


def _copy_checkpoint(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def _edit_tensors(directory: pathlib.Path, edit) -> None:
  file = directory / "model.safetensors"
  tensors = safetensors.torch.load_file(file)
  edit(tensors)
  safetensors.torch.save_file(tensors, file)


def _edit_config(directory: pathlib.Path, **changes) -> None:
  file = directory / "config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf(tmp_path / "nowhere")


def test_missing_config(mixtral_dir, tmp_path):
  shutil.copy(mixtral_dir[1] / "model.safetensors", tmp_path)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf(tmp_path)


def test_missing_weights(mixtral_dir, tmp_path):
  shutil.copy(mixtral_dir[1] / "config.json", tmp_path)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf(tmp_path)


def test_missing_shard(mixtral_dir, tmp_path):
  mixtral_dir[0].save_pretrained(tmp_path, max_shard_size="40KB")
  next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-.* missing"):
    load_hf(tmp_path)


def test_corrupt_weights_file(mixtral_dir, tmp_path):
  shutil.copy(mixtral_dir[1] / "config.json", tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00" + b"x" * 30)
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    load_hf(tmp_path)


def test_unsupported_architecture(mixtral_dir, tmp_path):
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  _edit_config(directory, architectures=["LlamaForCausalLM"])
  with pytest.raises(ValueError, match="LlamaForCausalLM.*MixtralForCausalLM, "
                     "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
                     "OlmoeForCausalLM"):
    load_hf(directory)


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  name = "model.layers.1.block_sparse_moe.experts.4.w3.weight"
  _edit_tensors(directory, lambda t: t.pop(name))
  with pytest.raises(ValueError,
                     match=rf"'{name}' is missing \(expected shape \(40, 48\)"):
    load_hf(directory)


def test_misshaped_tensor_is_named(mixtral_dir, tmp_path):
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  name = "model.layers.0.self_attn.k_proj.weight"
  _edit_tensors(directory, lambda t: t.update({name: torch.zeros(48, 32)}))
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(48, 32\), "
                     r"expected \(32, 48\)"):
    load_hf(directory)


def test_leftover_tensor_is_refused(mixtral_dir, tmp_path):
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  name = "model.layers.0.self_attn.o_proj.bias"
  _edit_tensors(directory, lambda t: t.update({name: torch.zeros(48)}))
  with pytest.raises(ValueError, match=rf"no place in the model.*'{name}'"):
    load_hf(directory)


def _hf_dict(name: str, **overrides) -> dict:
  config_cls, _, fields, _ = ARCHS[name]
  hf = config_cls(**COMMON, **fields).to_dict()
  hf.update(architectures=[config_cls.__name__.replace("Config",
                                                       "ForCausalLM")])
  hf.update(overrides)
  return hf


@pytest.mark.parametrize("name, overrides, message", [
    ("qwen3_moe", dict(mlp_only_layers=[0]), "dense MLPs"),
    ("qwen2_moe", dict(decoder_sparse_step=2), "dense MLPs"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=64),
     "sliding_window=64"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"]),
     "sliding-window"),
    ("mixtral", dict(sliding_window=4096), "sliding-window"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("qwen3_moe", dict(attention_bias=True), "o_proj bias"),
    ("mixtral", dict(rope_parameters=dict(rope_type="yarn", factor=4.0,
                                          rope_theta=1e6)), "'yarn'"),
    ("olmoe", dict(rope_parameters=None,
                   rope_scaling=dict(type="linear", factor=2.0)), "'linear'"),
    ("mixtral", dict(hidden_act="gelu"), "'gelu'"),
    ("olmoe", dict(architectures=["OlmoeForSequenceClassification"]),
     "OlmoeForSequenceClassification"),
    ("qwen3_moe", dict(moe_intermediate_size=None), "moe_intermediate_size"),
])
def test_unsupported_configs_are_refused(name, overrides, message):
  with pytest.raises(ValueError, match=message):
    config_from_hf(_hf_dict(name, **overrides))


def test_config_variants_are_read():
  # Older config.json files: top-level rope_theta, num_experts, null head_dim.
  hf = _hf_dict("mixtral", rope_parameters=None, rope_theta=5e5,
                head_dim=None, num_local_experts=None, num_experts=5,
                sliding_window=1 << 20, max_position_embeddings=1 << 20)
  c = config_from_hf(hf)
  assert (c.rope_theta, c.head_dim, c.num_experts) == (5e5, 12, 5)
  # Qwen2-MoE's Qwen1.5 configs have no qkv_bias key: transformers
  # defaults it to true.
  hf = _hf_dict("qwen2_moe")
  del hf["qkv_bias"]
  assert config_from_hf(hf).qkv_bias
  # Without `architectures`, the model_type decides.
  hf = _hf_dict("olmoe")
  del hf["architectures"]
  assert config_from_hf(hf).qk_norm == "full"
  assert set(hf_import.ARCHITECTURES) == {
      "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
      "OlmoeForCausalLM"}


# ------------------------------------------------- malformed and corrupt input


@pytest.mark.parametrize("key, value", [
    ("tie_word_embeddings", "false"), ("norm_topk_prob", "false"),
    ("use_sliding_window", "true"), ("attention_bias", 0)])
def test_string_booleans_are_refused(key, value):
  # Before, bool("false") read as True: a tied, renormalising model.
  with pytest.raises(LoadError, match=rf"{key}={value!r} is not a JSON "
                     "boolean") as e:
    config_from_hf(_hf_dict("qwen3_moe", **{key: value}))
  assert e.value.field == key
  if isinstance(value, str):
    assert f"write {value} without quotes" in str(e.value)


@pytest.mark.parametrize("key, value, want", [
    ("rms_norm_eps", 0, "a finite number > 0"),
    ("rms_norm_eps", -1e-6, "a finite number > 0"),
    ("rope_theta", 0.0, "a finite number > 0"),
    ("max_position_embeddings", 0, "a positive int"),
    ("head_dim", 0, "a positive int"),
    ("num_key_value_heads", 0, "a positive int"),
    ("hidden_size", 48.0, "a positive int"),
    ("num_experts_per_tok", "3", "a positive int"),
    ("num_local_experts", [5], "a positive int")])
def test_zero_and_mistyped_values_are_refused_not_defaulted(key, value, want):
  # Before, 0 (falsy) was replaced by the architecture's default.
  hf = _hf_dict("mixtral", rope_parameters=None, **{key: value})
  with pytest.raises(LoadError,
                     match=re.escape(f"{key}={value!r} is not {want}")):
    config_from_hf(hf)


def test_absent_or_null_values_take_the_defaults():
  hf = _hf_dict("mixtral", rms_norm_eps=None, max_position_embeddings=None,
                tie_word_embeddings=None)
  c = config_from_hf(hf)
  assert (c.rms_eps, c.max_seq_len, c.tie_embeddings) == (1e-5, 131072,
                                                          False)


@pytest.mark.parametrize("text, message", [
    (b"[1, 2]", "holds list"),
    (b'{"architectures": "MixtralForCausalLM"}', "architectures="),
    (b'{"model_type": ["olmoe"]}', "model_type="),
    (b'{"hidden_size": 48', "not valid JSON"),
    (b'{"hidden_size": 48, "hidden_size": 64}', "given twice"),
    (b'{"hidden_act": "s\xffilu"}', "not UTF-8"),
])
def test_config_json_errors_name_the_file(mixtral_dir, tmp_path, text,
                                          message):
  # Before: AttributeError / TypeError / JSONDecodeError naming no file.
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  (directory / "config.json").write_bytes(text)
  for load in (load_hf, hf_import.config_from_file):
    with pytest.raises(LoadError, match=message) as e:
      load(directory)
    assert str(directory / "config.json") in str(e.value)


def test_string_boolean_in_config_json_names_file_and_key(mixtral_dir,
                                                          tmp_path):
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  _edit_config(directory, tie_word_embeddings="false")
  with pytest.raises(LoadError, match="config.json: config.json "
                     "tie_word_embeddings='false'") as e:
    load_hf(directory)
  assert e.value.field == "tie_word_embeddings"
  assert e.value.file == str(directory / "config.json")


def test_non_finite_weights_are_refused(mixtral_dir, tmp_path):
  # Corrupt bytes in the data (no checksum in safetensors) that read as NaN.
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  file = directory / "model.safetensors"
  name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
  info = read_header(file)[name]
  data = bytearray(file.read_bytes())
  data[info.offset + 4 * 7:info.offset + 4 * 8] = b"\x00\x00\xc0\x7f"  # NaN
  file.write_bytes(bytes(data))
  with pytest.raises(LoadError, match=rf"tensor '{name}' holds 1 NaN or "
                     r"infinite value\(s\) \(the first at index \(0, 7\)\)"
                     ) as e:
    load_hf(directory)
  assert e.value.file == str(file) and e.value.field == name


def test_model_refuses_token_ids_outside_the_vocab(mixtral_dir):
  model = load_hf(mixtral_dir[1])
  # Before, the embedding gather clamped 97 to 96 without a word.
  for tokens, bad in (([[1, 97, 3]], 97), (np.array([[-1, 2]]), -1)):
    with pytest.raises(ValueError, match=rf"outside \[0, 97\), e.g. {bad}"):
      model(tokens)
  with pytest.raises(ValueError, match="int tokens"):
    model(np.array([[1.0, 2.0]]))
  tokens = np.array([[0, 96, 5]])
  jitted = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(model(tokens)),
                                np.asarray(jitted))


def test_sharded_checkpoint_with_two_copies_is_refused(mixtral_dir,
                                                       tmp_path):
  torch_model, _ = mixtral_dir
  torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
  shards = sorted(tmp_path.glob("model-*.safetensors"))
  first = safetensors.torch.load_file(shards[0])
  last = safetensors.torch.load_file(shards[-1])
  name = next(iter(first))
  safetensors.torch.save_file({**last, name: torch.zeros_like(first[name])},
                              shards[-1])
  with pytest.raises(LoadError, match=rf"maps tensor '{re.escape(name)}' "
                     rf"to shard {shards[0].name}"):
    load_hf(tmp_path)


def test_fuzz_config_json(mixtral_dir, tmp_path):
  """A mutated config.json gives the original config, or is refused with a
  LoadError naming it; it gives another config only when its JSON content
  changed (a flipped digit or key is another valid file: no loader can
  tell), and then exactly what that content says."""
  directory = _copy_checkpoint(mixtral_dir[1], tmp_path / "ckpt")
  file = directory / "config.json"
  text = file.read_bytes()
  original, content = hf_import.config_from_file(directory), json.loads(text)
  rng = np.random.default_rng(2)
  refused = changed = 0
  for kind, data in _config_mutations(text, rng, 80):
    file.write_bytes(data)
    try:
      got = hf_import.config_from_file(directory)
    except LoadError as e:
      assert str(file) in str(e), (kind, str(e))
      refused += 1
      continue
    mutated = json.loads(data)  # anything accepted is valid JSON
    if mutated == content:
      assert got == original, kind
    else:
      assert got == config_from_hf(mutated, name=directory.name), kind
      changed += got != original
  assert refused >= 20 and changed < 20, (refused, changed)


def _config_mutations(data: bytes, rng: np.random.Generator, count: int):
  """Truncations, bit flips, bad UTF-8 (a lead byte with no continuation),
  repeated and swapped lines."""
  for trial in range(count):
    kind = ("truncate", "flip", "bad_utf8", "repeat_line",
            "swap_lines")[trial % 5]
    yield kind, mutate(data, kind, rng, bad_byte=0xC3)
