"""Tests of wisp_jax/models/tokenizer.py: text in and out of generate.

A tiny Mixtral-layout Hugging Face directory is written here (random
safetensors weights, a `tokenizer.json` built with the `tokenizers`
package), so nothing is downloaded.
"""

import json

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import nnx
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

import wisp_jax
from wisp_jax.models import hf_import
from wisp_jax.models import tokenizer as tokenizer_lib
from wisp_jax.models.transformer import MoEModel

WORDS = ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog",
         "ran", "far", "and", "then", "slept", "here", "now"]
HF_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": len(WORDS), "hidden_size": 24, "intermediate_size": 20,
    "num_hidden_layers": 2, "num_attention_heads": 3,
    "num_key_value_heads": 1, "head_dim": 8, "num_local_experts": 4,
    "num_experts_per_tok": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 0}


def write_hf_dir(directory, hf_config=HF_CONFIG):
  """config.json, random model.safetensors and a word-level tokenizer.json."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf_config))
  config = hf_import.config_from_hf(hf_config)
  model = nnx.eval_shape(lambda: MoEModel(config, rngs=nnx.Rngs(0)))
  arch = hf_import.ARCHITECTURES["MixtralForCausalLM"]
  rng = np.random.default_rng(0)
  tensors = {}
  plan = hf_import._plan(model, arch, set())  # pylint: disable=protected-access
  for _, copies in plan:
    for copy in copies:
      scale = 1.0 if len(copy.shape) == 1 else copy.shape[-1] ** -0.5
      tensors[copy.source] = (1.0 + 0.1 * rng.standard_normal(copy.shape)
                              if len(copy.shape) == 1 else
                              scale * rng.standard_normal(copy.shape)
                              ).astype(np.float32)
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  tok = tokenizers.Tokenizer(tok_models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<eos>"])
  tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf") / "mixtral-words"
  write_hf_dir(directory)
  return directory


def test_hf_tokenizer_round_trip(hf_dir):
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  assert tok.vocab_size == len(WORDS)
  ids = tok.encode("the cat sat on a mat")
  assert ids.dtype == np.int32 and ids.tolist() == [2, 3, 4, 5, 7, 6]
  assert tok.decode(ids) == "the cat sat on a mat"
  assert tok.decode([2, 0, 3]) == "the cat"  # special tokens skipped
  assert tokenizer_lib.load_tokenizer(hf_dir.parent) is None


def test_generate_takes_and_returns_text(hf_dir):
  model = wisp_jax.from_pretrained(hf_dir)
  info = tokenizer_lib.model_info(model)
  assert info.kind == "huggingface" and info.eos_token_id == (0,)
  out = wisp_jax.generate(model, ["the cat sat", "a dog ran far"], 6)
  tok = info.tokenizer
  for text, row, n in zip(out.text, out.tokens, out.lengths):
    assert text == tok.decode(row[:n])
  ids = wisp_jax.generate(model, [tok.encode("the cat sat")], 6)
  np.testing.assert_array_equal(ids.tokens[0], out.tokens[0])


def test_stop_at_eos_uses_the_config_json_eos(hf_dir, tmp_path):
  free = wisp_jax.generate(wisp_jax.from_pretrained(hf_dir), "the cat", 6)
  eos = int(free.tokens[0, 2])
  # The same weights, with that token as the end of sequence.
  other = tmp_path / "eos"
  write_hf_dir(other, {**HF_CONFIG, "eos_token_id": [eos, 1]})
  model = wisp_jax.from_pretrained(other)
  out = wisp_jax.generate(model, "the cat", 6, stop_at_eos=True)
  first = free.tokens[0].tolist().index(eos)
  assert out.lengths.tolist() == [first + 1]
  assert out.finish_reason == ["stop"] and out.tokens.shape == (1, first + 1)
  np.testing.assert_array_equal(out.tokens[0], free.tokens[0, :first + 1])


def test_eos_ids_refuses_a_bad_value():
  assert tokenizer_lib.eos_ids({}) == ()
  assert tokenizer_lib.eos_ids({"eos_token_id": [2, 3]}) == (2, 3)
  with pytest.raises(ValueError, match="eos_token_id='x'"):
    tokenizer_lib.eos_ids({"eos_token_id": "x"})
