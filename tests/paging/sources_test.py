"""Every expert source and policy against the resident reference, bit for bit.

All generate calls here run under `jax.transfer_guard("disallow")`: every
host/device move in the pager must be explicit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api, bank as bank_lib
from wisp_jax.serving import generate as generate_lib
from wisp_jax.serving import step as step_lib
from tests.paging import reference

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]
NEW_TOKENS = 128
CONFIG = get_config("tiny")  # E=6, K=2 -> S in {top_k, E/2, E-1} = {2, 3, 5}
CAPACITIES = (CONFIG.top_k, CONFIG.num_experts // 2, CONFIG.num_experts - 1)


def generate(*args, **kwargs):
  with jax.transfer_guard("disallow"):
    return generate_lib.generate(*args, **kwargs)


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def setup(request):
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0), dtype=request.param)
  bank = bank_lib.make_bank(model.experts.weights())
  ref = generate(model, PROMPTS, NEW_TOKENS, return_logits=True,
                 record_routing=True)
  return model, bank, ref


@pytest.fixture(scope="module")
def tiny_f32():
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  return model, bank_lib.make_bank(model.experts.weights())


def needed_sets(routing_ids, layer):
  return [set(np.unique(ids[layer]).tolist()) for ids in routing_ids]


def test_bank_is_on_host_as_stored_bits(setup):
  model, bank, _ = setup
  assert bank.gate.sharding.memory_kind == "pinned_host"
  if model.dtype == jnp.bfloat16:
    assert bank.gate.dtype == np.uint16
    assert np.array_equal(
        np.asarray(bank.gate).view(jnp.bfloat16),
        np.asarray(model.experts.gate[...]))


@pytest.mark.parametrize("source", ["layer_offload", "static_offload",
                                    "transient"])
def test_offload_sources_equal_resident(setup, source):
  model, bank, ref = setup
  out = generate(model, PROMPTS, NEW_TOKENS, experts=source, bank=bank,
                 return_logits=True)
  assert np.array_equal(out.logits, ref.logits)
  assert np.array_equal(out.tokens, ref.tokens)
  passes = NEW_TOKENS
  if source in ("layer_offload", "static_offload"):
    # Every expert of every layer crosses on every forward pass.
    assert out.stats.loads.tolist() == [passes * CONFIG.num_experts] * 2
  else:
    assert np.array_equal(out.stats.loads, out.stats.misses)
  assert out.stats.hits.sum() == 0
  assert out.stats.bytes_moved == out.stats.loads.sum() * (
      3 * CONFIG.d_model * CONFIG.expert_ffn * model.dtype.itemsize)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "ws", "pinned"])
def test_paged_equals_resident_and_reference_counts(setup, policy):
  model, bank, ref = setup
  options = {"tau": 4} if policy == "ws" else (
      {"age_every": 16} if policy == "lfu" else {})
  for capacity in CAPACITIES:
    hot = (api.hot_set_from_routing(ref.routing_ids, CONFIG.num_experts,
                                    capacity) if policy == "pinned" else None)
    out = generate(model, PROMPTS, NEW_TOKENS, experts="paged",
                   slots_per_layer=capacity, policy=policy,
                   policy_options=options, hot_set=hot, bank=bank,
                   num_slots=max(CAPACITIES),
                   return_logits=True)
    assert np.array_equal(out.logits, ref.logits), (policy, capacity)
    assert np.array_equal(out.tokens, ref.tokens)
    for layer in range(CONFIG.num_layers):
      steps = needed_sets(ref.routing_ids, layer)
      want = reference.replay(policy, steps, capacity,
                              hot_set=() if hot is None else hot[layer],
                              **options)
      assert out.stats.per_pass_hits[:, layer].tolist() == [h for h, _ in want]
      assert out.stats.per_pass_misses[:, layer].tolist() == [
          m for _, m in want]
    assert np.all(out.stats.loads >= out.stats.misses)
    if capacity == max(CAPACITIES) and policy != "pinned":
      assert out.stats.hit_rate > 0.5


@pytest.mark.parametrize("kept", [3, [6, 1]])
def test_static_offload_at_a_budget_streams_what_is_not_kept(setup, kept):
  model, bank, ref = setup
  out = generate(model, PROMPTS, NEW_TOKENS, experts="static_offload",
                 slots_per_layer=kept, bank=bank, return_logits=True)
  assert np.array_equal(out.logits, ref.logits)
  kept = np.broadcast_to(kept, (CONFIG.num_layers,))
  per_expert = 3 * CONFIG.d_model * CONFIG.expert_ffn * model.dtype.itemsize
  # Per pass: the model's expert bytes minus the resident expert bytes.
  per_pass = (CONFIG.num_layers * CONFIG.num_experts - kept.sum()) * per_expert
  assert out.stats.bytes_moved == NEW_TOKENS * per_pass
  assert np.array_equal(out.stats.per_pass_loads,
                        np.broadcast_to(CONFIG.num_experts - kept,
                                        (NEW_TOKENS, CONFIG.num_layers)))
  # Needs of kept experts are hits, the others misses.
  needed = [[np.unique(ids[l]) for l in range(CONFIG.num_layers)]
            for ids in ref.routing_ids]
  hits = [[int((n < kept[l]).sum()) for l, n in enumerate(step)]
          for step in needed]
  assert out.stats.per_pass_hits.tolist() == hits


def test_static_offload_refuses_bad_counts(tiny_f32):
  model, bank = tiny_f32
  with pytest.raises(ValueError, match="more than its 6 experts"):
    generate(model, PROMPTS, 2, experts="static_offload", slots_per_layer=7,
             bank=bank)
  with pytest.raises(ValueError, match="keeps no expert resident"):
    generate(model, PROMPTS, 2, experts="layer_offload", slots_per_layer=2,
             bank=bank)


def test_paged_bytes_far_below_static_offload(tiny_f32):
  model, bank = tiny_f32
  static = generate(model, PROMPTS, NEW_TOKENS, experts="static_offload",
                    bank=bank)
  paged = generate(model, PROMPTS, NEW_TOKENS, experts="paged",
                   slots_per_layer=CONFIG.num_experts // 2, bank=bank)
  assert paged.stats.bytes_moved < 0.5 * static.stats.bytes_moved


@pytest.mark.parametrize("experts", ["resident", "paged"])
def test_decode_step_does_not_retrace(tiny_f32, monkeypatch, experts):
  model, bank = tiny_f32
  chex.clear_trace_counter()
  counted = step_lib.jit_step(chex.assert_max_traces(step_lib.step_impl, n=1))
  monkeypatch.setattr(generate_lib, "decode_step", counted)
  out = generate(model, PROMPTS, 51, experts=experts,
                 slots_per_layer=3 if experts == "paged" else None, bank=bank)
  assert out.tokens.shape == (len(PROMPTS), 51)


def test_compiled_step_holds_no_bank_sized_buffer():
  # A bank much larger than the activations, so a bank-sized temp shows.
  config = CONFIG.replace(num_layers=4, num_experts=32, expert_ffn=128)
  model = MoEModel(config, rngs=nnx.Rngs(0))
  bank = bank_lib.make_bank(model.experts.weights())
  spec, arrays, carry = api.make_source(config, bank, "paged", 4)
  graphdef, state = nnx.split(model.decoder)
  kv = generate_lib.KVCache.create(config.num_layers, 2, 64,
                                   config.num_kv_heads, config.head_dim,
                                   model.dtype, jnp.zeros((2,), jnp.int32))
  sampling = generate_lib._sampling(2, 0, 0, np.zeros(2), 0.0)
  lowered = generate_lib.decode_step.lower(
      graphdef, state, spec, arrays, carry, kv, jnp.zeros((2, 1), jnp.int32),
      sampling)
  memory = lowered.compile().memory_analysis()
  bank_bytes = sum(w.nbytes for w in jax.tree.leaves(bank))
  assert memory.temp_size_in_bytes < bank_bytes / 8
  # Slots, pager state and cache are donated: outputs alias the inputs.
  fresh_outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  assert fresh_outputs < bank_bytes / 8
  # The bank is an argument (host), not an output.
  assert memory.output_size_in_bytes < memory.argument_size_in_bytes - bank_bytes


def test_bad_input_is_refused_before_work(tiny_f32):
  model, bank = tiny_f32
  with pytest.raises(ValueError, match="fewer than top_k=2"):
    generate(model, PROMPTS, 4, experts="paged", slots_per_layer=1, bank=bank)
  with pytest.raises(ValueError, match="more than its 6 experts"):
    generate(model, PROMPTS, 4, experts="paged", slots_per_layer=7, bank=bank)
  with pytest.raises(ValueError, match="Unknown paging policy 'mru'"):
    generate(model, PROMPTS, 4, experts="paged", slots_per_layer=3,
             policy="mru", bank=bank)
  with pytest.raises(ValueError, match="Unknown expert source 'paged_lru'"):
    generate(model, PROMPTS, 4, experts="paged_lru", bank=bank)
  with pytest.raises(ValueError, match="needs slots_per_layer"):
    generate(model, PROMPTS, 4, experts="paged", bank=bank)
  with pytest.raises(ValueError, match="only runs in trace replay"):
    generate(model, PROMPTS, 4, experts="paged", slots_per_layer=3,
             policy="min", bank=bank)
  other = MoEModel(CONFIG.replace(expert_ffn=16), rngs=nnx.Rngs(1))
  wrong_bank = bank_lib.make_bank(other.experts.weights())
  with pytest.raises(ValueError, match="expert bank 'gate' has shape"):
    generate(model, PROMPTS, 4, experts="paged", slots_per_layer=3,
             bank=wrong_bank)
