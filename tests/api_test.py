"""The public surface: from_pretrained dispatch and generate."""

import numpy as np
import pytest
from flax import nnx

import wisp_jax
from wisp_jax.models import checkpoint


def test_from_pretrained_native_checkpoint_round_trip(tmp_path):
  model = wisp_jax.MoEModel(wisp_jax.get_config("tiny"), rngs=nnx.Rngs(3))
  checkpoint.save(model, tmp_path / "ckpt")
  restored = wisp_jax.from_pretrained(tmp_path / "ckpt")
  tokens = np.array([[1, 2, 3, 4, 5]])
  assert np.array_equal(np.asarray(model(tokens)), np.asarray(restored(tokens)))
  host = wisp_jax.from_pretrained(tmp_path / "ckpt",
                                  expert_memory_kind="pinned_host")
  assert host.experts.gate[...].sharding.memory_kind == "pinned_host"


def test_from_pretrained_default_and_errors(tmp_path):
  model = wisp_jax.from_pretrained("default")
  assert model.config == wisp_jax.get_config("default")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wisp_jax.from_pretrained(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(Exception, match="config.json"):
    wisp_jax.from_pretrained(tmp_path / "empty")


def test_generate_greedy_and_sampled_are_deterministic():
  model = wisp_jax.MoEModel(wisp_jax.get_config("tiny"), rngs=nnx.Rngs(0))
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  greedy = wisp_jax.generate(model, prompts, max_new_tokens=8)
  again = wisp_jax.generate(model, prompts, max_new_tokens=8)
  assert np.array_equal(greedy.tokens, again.tokens)
  a = wisp_jax.generate(model, prompts, max_new_tokens=8, temperature=1.0,
                        seed=7)
  b = wisp_jax.generate(model, prompts, max_new_tokens=8, temperature=1.0,
                        seed=7)
  c = wisp_jax.generate(model, prompts, max_new_tokens=8, temperature=1.0,
                        seed=8)
  assert np.array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert a.tokens.shape == (2, 8)


def test_padded_batch_matches_single_prompts():
  model = wisp_jax.MoEModel(wisp_jax.get_config("tiny"), rngs=nnx.Rngs(0))
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
  batch = wisp_jax.generate(model, prompts, max_new_tokens=6,
                            return_logits=True)
  for row, prompt in enumerate(prompts):
    alone = wisp_jax.generate(model, [prompt], max_new_tokens=6,
                              return_logits=True)
    assert np.array_equal(batch.tokens[row], alone.tokens[0])
    np.testing.assert_allclose(batch.logits[row], alone.logits[0],
                               atol=1e-5)


def test_generate_refuses_bad_requests():
  model = wisp_jax.MoEModel(wisp_jax.get_config("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=256"):
    wisp_jax.generate(model, [[1] * 250], max_new_tokens=10)
  with pytest.raises(ValueError, match="outside \\[0, 61\\)"):
    wisp_jax.generate(model, [[1, 99]], max_new_tokens=2)
  with pytest.raises(ValueError, match="empty"):
    wisp_jax.generate(model, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    wisp_jax.generate(model, [[1]], max_new_tokens=0)


def test_from_pretrained_says_what_a_wrong_path_is(tmp_path):
  # A training workdir: config.json of the run, summary, checkpoint/.
  workdir = tmp_path / "train"
  model = wisp_jax.MoEModel(wisp_jax.get_config("tiny"), rngs=nnx.Rngs(0))
  checkpoint.save(model, workdir / "checkpoint")
  (workdir / "config.json").write_text('{"batch_size": 8, "seed": 0}')
  (workdir / "summary.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="is a training workdir .*its "
                     "checkpoint is .*train/checkpoint'"):
    wisp_jax.from_pretrained(workdir)
  loaded = wisp_jax.from_pretrained(workdir / "checkpoint")
  assert loaded.config == model.config
  with pytest.raises(FileNotFoundError, match="is a file, not a model "
                     "directory"):
    wisp_jax.from_pretrained(workdir / "summary.json")
