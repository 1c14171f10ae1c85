"""Tests of wisp_jax/models/checkpoint.py."""

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.models import checkpoint
from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from tests.mutations import mutate

CONFIG = get_config("tiny")


def _leaves(model):
  return {path: np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(model))}


def _tokens():
  return jax.random.randint(jax.random.key(1), (2, 11), 0, CONFIG.vocab_size)


@jax.jit
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _logits(model):
  """`model(_tokens())`, through one compiled function for every model."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, _tokens()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = MoEModel(CONFIG, rngs=nnx.Rngs(5))
  path = tmp_path_factory.mktemp("ckpt") / "model"
  checkpoint.save(model, path)
  return model, path


def test_round_trip_is_bit_exact(saved):
  model, path = saved
  restored = checkpoint.restore(path)
  assert restored.config == CONFIG
  assert restored.dtype == jnp.float32
  expected, got = _leaves(model), _leaves(restored)
  assert expected.keys() == got.keys()
  # 3 experts; embed, final norm, lm head; 7 layer tensors stacked [L, ...].
  assert len(expected) == 3 + 3 + 7
  assert expected[("decoder", "layers", "attn", "q_proj")].shape[0] == (
      CONFIG.num_layers)
  for name in expected:
    assert got[name].dtype == expected[name].dtype, name
    assert np.array_equal(got[name], expected[name]), name
  assert np.array_equal(_logits(restored), _logits(model))


def test_layout_and_config_json(saved):
  _, path = saved
  meta = json.loads((path / "config.json").read_text())
  assert meta["format"] == checkpoint.FORMAT
  assert meta["dtype"] == "float32"
  assert meta["config"] == dataclasses.asdict(CONFIG)
  assert (path / "decoder").is_dir() and (path / "experts").is_dir()
  assert checkpoint.load_config(path) == CONFIG


def test_experts_restore_into_pinned_host(saved):
  model, path = saved
  experts = checkpoint.restore_experts(path, "pinned_host")
  for name in ("gate", "up", "down"):
    array = getattr(experts, name)
    assert array.sharding.memory_kind == "pinned_host"
    assert np.array_equal(np.asarray(array),
                          np.asarray(getattr(model.experts, name)[...]))
  assert experts.gate.shape == (CONFIG.num_layers, CONFIG.num_experts,
                                CONFIG.d_model, CONFIG.expert_ffn)
  assert experts.down.shape == (CONFIG.num_layers, CONFIG.num_experts,
                                CONFIG.expert_ffn, CONFIG.d_model)
  restored = checkpoint.restore(path, expert_memory_kind="pinned_host")
  assert restored.experts.gate[...].sharding.memory_kind == "pinned_host"
  assert restored.decoder.embed[...].sharding.memory_kind == "device"


def test_dtype_conversion_on_restore(saved, tmp_path):
  model, path = saved
  bf16 = checkpoint.restore(path, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  for name, value in _leaves(bf16).items():
    assert value.dtype == jnp.bfloat16, name
    expected = _leaves(model)[name].astype(jnp.bfloat16)
    assert np.array_equal(value, expected), name
  experts = checkpoint.restore_experts(path, "pinned_host", jnp.bfloat16)
  assert experts.up.dtype == jnp.bfloat16
  assert experts.up.sharding.memory_kind == "pinned_host"
  # Stored as bf16, restored as float32: the exact upcast of the rounding.
  checkpoint.save(model, tmp_path / "bf16", dtype=jnp.bfloat16)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())[
      "dtype"] == "bfloat16"
  assert checkpoint.restore(tmp_path / "bf16").dtype == jnp.bfloat16
  up = checkpoint.restore(tmp_path / "bf16", dtype=jnp.float32)
  assert up.dtype == jnp.float32
  for name, value in _leaves(up).items():
    expected = _leaves(model)[name].astype(jnp.bfloat16).astype(np.float32)
    assert np.array_equal(value, expected), name


def test_save_overwrites_a_checkpoint_only(saved, tmp_path):
  model, _ = saved
  other = MoEModel(CONFIG, rngs=nnx.Rngs(6))
  checkpoint.save(model, tmp_path / "c")
  checkpoint.save(other, tmp_path / "c")
  assert np.array_equal(_logits(checkpoint.restore(tmp_path / "c")),
                        _logits(other))
  (tmp_path / "not_ckpt").mkdir()
  (tmp_path / "not_ckpt" / "notes.txt").write_text("keep me")
  with pytest.raises(checkpoint.CheckpointError, match="refusing"):
    checkpoint.save(model, tmp_path / "not_ckpt")
  assert (tmp_path / "not_ckpt" / "notes.txt").read_text() == "keep me"


def test_missing_directory(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore(tmp_path / "nowhere")
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore_experts(tmp_path / "nowhere", "pinned_host")


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
    checkpoint.restore(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
  with pytest.raises(checkpoint.CheckpointError,
                     match="not a wisp_jax checkpoint"):
    checkpoint.restore(tmp_path)
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
    checkpoint.restore(tmp_path)


def test_incomplete_checkpoint(saved, tmp_path):
  _, path = saved
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(checkpoint.CheckpointError, match="lacks its 'decoder'"):
    checkpoint.restore(tmp_path)


def test_config_mismatch(saved, tmp_path):
  _, path = saved
  with pytest.raises(checkpoint.CheckpointError,
                     match="config mismatch.*expert_ffn: checkpoint 20 vs "
                     "expected 24"):
    checkpoint.restore(path, config=CONFIG.replace(expert_ffn=24))
  with pytest.raises(checkpoint.CheckpointError, match="config mismatch"):
    checkpoint.restore_experts(path, "pinned_host",
                               config=CONFIG.replace(num_experts=8))
  # A config.json that disagrees with the stored tensors.
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  checkpoint.save(model, tmp_path / "c")
  meta = json.loads((tmp_path / "c" / "config.json").read_text())
  meta["config"]["expert_ffn"] = 24
  (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"experts/gate has shape \(2, 6, 24, 20\), but its "
                     r"config gives \(2, 6, 24, 24\)"):
    checkpoint.restore_experts(tmp_path / "c", None)
  meta["config"]["expert_ffn"] = 20
  meta["config"]["tie_embeddings"] = True  # drops lm_head from the model
  (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"unexpected tensors \['lm_head'\]"):
    checkpoint.restore(tmp_path / "c")


def test_unknown_memory_kind_and_integer_dtype(saved):
  _, path = saved
  with pytest.raises(checkpoint.CheckpointError, match="memory kind"):
    checkpoint.restore_experts(path, "hbm_far_away")
  # uint16 would convert values, not reinterpret bf16 bits: refused.
  with pytest.raises(checkpoint.CheckpointError, match="bitcast"):
    checkpoint.restore_experts(path, "pinned_host", jnp.uint16)


def _save_version_1(model, path):
  """Writes `model` in the version-1 layout (one entry per layer)."""
  import orbax.checkpoint as ocp
  flat = checkpoint._decoder_flat(model.decoder)
  per_layer = {}
  for name, value in flat.items():
    if name.startswith("layers."):
      for layer in range(model.config.num_layers):
        per_layer[f"layers.{layer}.{name[7:]}"] = value[layer]
    else:
      per_layer[name] = value
  experts = {n: getattr(model.experts, n)[...] for n in checkpoint.EXPERT_NAMES}
  path.mkdir(parents=True)
  saver = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  saver.save(path / "decoder", args=ocp.args.StandardSave(per_layer))
  saver.save(path / "experts", args=ocp.args.StandardSave(experts))
  meta = {"format": checkpoint.FORMAT, "version": 1, "dtype": "float32",
          "config": {k: v for k, v in dataclasses.asdict(model.config).items()
                     if k != "unroll_layers"}}
  (path / "config.json").write_text(json.dumps(meta))


def test_version_1_layout_is_stacked_on_restore(tmp_path):
  model = MoEModel(CONFIG, rngs=nnx.Rngs(7))
  _save_version_1(model, tmp_path / "v1")
  restored = checkpoint.restore(tmp_path / "v1")
  expected, got = _leaves(model), _leaves(restored)
  assert expected.keys() == got.keys()
  for name in expected:
    assert np.array_equal(got[name], expected[name]), name
  # Saving again writes the current (stacked) layout.
  checkpoint.save(restored, tmp_path / "v2")
  meta = json.loads((tmp_path / "v2" / "config.json").read_text())
  assert meta["version"] == checkpoint.VERSION == 2
  assert np.array_equal(_logits(checkpoint.restore(tmp_path / "v2")),
                        _logits(model))


# ------------------------------------------------- malformed and corrupt input


def _copy(path, tmp_path):
  return pathlib.Path(shutil.copytree(path, tmp_path / "copy"))


def test_missing_metadata_names_the_file(saved, tmp_path):
  # Before: AttributeError: 'NoneType' object has no attribute 'items'.
  path = _copy(saved[1], tmp_path)
  (path / "experts" / "_METADATA").unlink()
  with pytest.raises(checkpoint.CheckpointError,
                     match="item 'experts' has no readable tensor metadata"
                     ) as e:
    checkpoint.restore(path)
  assert e.value.file == str(path / "experts" / "_METADATA")
  assert str(path / "experts" / "_METADATA") in str(e.value)


@pytest.mark.parametrize("item, name", [("experts", "gate"),
                                        ("decoder", "layers.attn.k_proj")])
def test_non_finite_weights_are_refused(tmp_path, item, name):
  # What a bit flip in an orbax chunk typically leaves: NaN or inf.
  model = MoEModel(CONFIG, rngs=nnx.Rngs(5))
  variable = (model.experts.gate if item == "experts"
              else model.decoder.layers.attn.k_proj)
  variable.set_value(variable[...].at[1, 2, 3].set(jnp.inf))
  checkpoint.save(model, tmp_path / "c")
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"tensor {item}/{re.escape(name)} holds NaN or "
                     "infinite values") as e:
    checkpoint.restore(tmp_path / "c")
  assert e.value.field == f"{item}/{name}"
  assert str(tmp_path / "c" / item) in str(e.value)
  if item == "experts":
    with pytest.raises(checkpoint.CheckpointError, match="experts/gate"):
      checkpoint.restore_experts(tmp_path / "c", "pinned_host")


@pytest.mark.parametrize("change, message", [
    (dict(config={**dataclasses.asdict(CONFIG), "d_model": "24"}),
     "config field d_model='24' is not of type int"),
    (dict(config={**dataclasses.asdict(CONFIG), "tie_embeddings": "false"}),
     "config field tie_embeddings='false' is not of type bool"),
    (dict(config={k: v for k, v in dataclasses.asdict(CONFIG).items()
                  if k != "top_k"}), r"lacks config fields \['top_k'\]"),
    (dict(config={**dataclasses.asdict(CONFIG), "top_k": 9}),
     "top_k=9 exceeds num_experts=6"),
    (dict(config=[1, 2]), "not an object of MoEConfig fields"),
    (dict(dtype="float99"), "dtype 'float99', not the name of a float"),
    (dict(dtype=None), "dtype None"),
])
def test_config_json_fields_are_checked(saved, tmp_path, change, message):
  # Before: TypeError / KeyError naming no file.
  path = _copy(saved[1], tmp_path)
  meta = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**meta, **change}))
  with pytest.raises(checkpoint.CheckpointError, match=message) as e:
    checkpoint.restore(path)
  assert str(path / "config.json") in str(e.value)


def test_undecodable_config_json(saved, tmp_path):
  # Before: UnicodeDecodeError, also out of is_checkpoint.
  path = _copy(saved[1], tmp_path)
  (path / "config.json").write_bytes(b'{"format": "\xff"}')
  assert not checkpoint.is_checkpoint(path)
  with pytest.raises(checkpoint.CheckpointError, match="not UTF-8"):
    checkpoint.restore(path)


# orbax leaves un-awaited coroutines behind when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("file", ["array_metadatas/process_0", "d/"])
def test_truncated_orbax_files_name_the_checkpoint(saved, tmp_path, file):
  # Before: JSONDecodeError, or tensorstore's bare Exception.
  path = _copy(saved[1], tmp_path)
  target = (path / "experts" / file if not file.endswith("/") else max(
      (path / "experts" / "ocdbt.process_0" / "d").iterdir(),
      key=lambda f: f.stat().st_size))
  target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
  with pytest.raises(checkpoint.CheckpointError,
                     match="cannot (restore|read the metadata of) item "
                     "'experts'") as e:
    checkpoint.restore(path)
  assert str(path / "experts") in str(e.value)


# orbax leaves un-awaited coroutines behind when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fuzz_orbax_checkpoint(saved, tmp_path):
  """Every mutated checkpoint file restores the original model or is
  refused with a CheckpointError naming the checkpoint. The format has no
  checksum of chunk data: a flip there may restore other finite weights
  (never NaN), so chunk files only have to give finite weights."""
  model, path = saved
  want = _leaves(model)
  files = sorted(f.relative_to(path) for f in path.rglob("*") if f.is_file())
  rng = np.random.default_rng(3)
  outcomes = {"same": 0, "refused": 0, "other finite chunk data": 0}
  for trial in range(40):
    copy = pathlib.Path(shutil.copytree(path, tmp_path / f"c{trial}"))
    name = files[trial % len(files)]
    kind = ("truncate", "flip", "bad_utf8")[rng.integers(3)]
    (copy / name).write_bytes(mutate((copy / name).read_bytes(), kind, rng))
    try:
      got = _leaves(checkpoint.restore(copy))
    except checkpoint.CheckpointError as e:
      assert str(copy) in str(e), (name, kind, str(e))
      outcomes["refused"] += 1
      continue
    assert got.keys() == want.keys()
    if all(np.array_equal(got[k], want[k]) for k in want):
      outcomes["same"] += 1
      continue
    is_chunk = name.parent.name == "d"  # ocdbt data, shape-checked
    assert is_chunk, (name, kind)
    assert all(np.isfinite(v).all() for v in got.values()), (name, kind)
    outcomes["other finite chunk data"] += 1
  assert outcomes["refused"] >= 8 and outcomes["same"] >= 8, outcomes
