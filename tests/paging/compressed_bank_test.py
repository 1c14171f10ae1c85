"""Tests of the compressed host bank (`bank.make_compressed_bank`): copies
cross as the `wisp_jax.compress` code and are decoded into raw slots on
the device, so every source that copies from it stays `np.array_equal` to
resident. The generate calls run under `jax.transfer_guard("disallow")`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.compress import codec
from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving.generate import generate

CONFIG = get_config("tiny")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [3, 1]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def setup():
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  with jax.transfer_guard("disallow"):
    ref = generate(model, PROMPTS, NEW_TOKENS, return_logits=True,
                   record_routing=True)
  return model, bank_lib.make_compressed_bank(model.experts.weights()), ref


def test_bank_reports_the_raw_stack_and_the_code_bytes(setup):
  model, packed, _ = setup
  raw = bank_lib.make_bank(model.experts.weights())
  for name in ("gate", "up", "down"):
    p, r = getattr(packed, name), getattr(raw, name)
    assert p.shape == r.shape and p.dtype == r.dtype == np.uint16
    assert p.code.sign_mantissa.sharding.memory_kind == bank_lib.HOST
    # Decoding every expert gives the stored bits exactly.
    code = jax.tree.map(np.asarray, p.code)  # read back from host memory
    assert np.array_equal(np.asarray(codec.decode(code)), np.asarray(r))
  per_expert = sum(codec.compressed_bytes(w.code) for w in (
      packed.gate, packed.up, packed.down)) // (CONFIG.num_layers
                                                * CONFIG.num_experts)
  assert bank_lib.bytes_per_expert(packed) == per_expert
  assert per_expert < bank_lib.bytes_per_expert(raw)
  bank_lib.check_bank(packed, CONFIG)


@pytest.mark.parametrize("experts,policy,prefetch", [
    ("transient", None, None), ("paged", "pinned", None),
    ("paged", "lrfu_gate", "gate")])
def test_compressed_copies_keep_outputs_exact(setup, experts, policy,
                                              prefetch):
  model, packed, ref = setup
  kwargs = {}
  if experts == "paged":
    kwargs = dict(slots_per_layer=3, policy=policy, prefetch=prefetch)
    if policy == "pinned":
      kwargs["hot_set"] = api.hot_set_from_routing(
          ref.routing_ids, CONFIG.num_experts, 3)
  with jax.transfer_guard("disallow"):
    out = generate(model, PROMPTS, NEW_TOKENS, experts=experts, bank=packed,
                   return_logits=True, **kwargs)
  assert np.array_equal(out.logits, ref.logits), (experts, policy)
  assert np.array_equal(out.tokens, ref.tokens)
  s = out.stats
  copies = int(s.loads.sum())
  if prefetch:
    copies += int(s.prefetch_loads.sum())
  assert copies > 0
  # Every copy moved one expert's code, not its raw bytes.
  assert s.bytes_moved == copies * bank_lib.bytes_per_expert(packed)


def test_refusals(setup):
  model, packed, _ = setup
  f32 = MoEModel(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)
  with pytest.raises(ValueError, match="codes bf16 experts"):
    bank_lib.make_compressed_bank(f32.experts.weights())
  with pytest.raises(ValueError, match="holds bf16 experts; this model "
                     "computes in float32"):
    generate(f32, PROMPTS, 2, experts="paged", slots_per_layer=3,
             bank=packed)
  with pytest.raises(ValueError, match="compressed bank serves 'transient' "
                     "and 'paged'"):
    generate(model, PROMPTS, 2, experts="static_offload", slots_per_layer=3,
             bank=packed)


def test_engine_with_compressed_bank_serves_resident_tokens(setup):
  """The serving engine pages from the coded bank (preempting, batched):
  its tokens equal the resident engine's; each copy moves the code."""
  from wisp_jax.serving.engine import Engine, Request  # pylint: disable=g-import-not-at-top
  model, packed, _ = setup
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 61, size=n) for n in (5, 13, 13)]

  def requests():
    return [Request(p, 24 - len(p), request_id=i)
            for i, p in enumerate(prompts)]

  shape = dict(kv_blocks=10, block_size=4, max_batch=2, min_prefill_bucket=32)
  resident = Engine(model, None, experts="resident", **shape)
  want = [r.tokens for r in resident.run(requests())]
  coded = Engine(model, None, slots_per_layer=2, compressed_bank=True,
                 **shape)
  with jax.transfer_guard("disallow"):
    got = coded.run(requests())
  assert coded.num_preemptions >= 1
  assert [r.tokens for r in got] == want
  stats = coded.expert_stats()
  assert stats["misses"] > 0
  assert stats["bytes_moved"] == stats["loads"] * bank_lib.bytes_per_expert(
      packed)
  with pytest.raises(ValueError, match="needs an offload source"):
    Engine(model, None, experts="resident", compressed_bank=True, **shape)
