"""Paging is exact on the trained default model (real routing structure)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wisp_jax import data
from wisp_jax.models.default import load_default
from wisp_jax.paging import api, bank as bank_lib
from wisp_jax.serving.generate import generate

NEW_TOKENS = 128


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def setup(request):
  model = load_default(dtype=request.param)
  prompts = [data.encode(p)[:48] for p in data.sample_prompts(3, 64)]
  bank = bank_lib.make_bank(model.experts.weights())
  with jax.transfer_guard("disallow"):
    ref = generate(model, prompts, NEW_TOKENS, return_logits=True,
                   record_routing=True)
  return model, prompts, bank, ref


def test_every_source_and_policy_is_bit_exact(setup):
  model, prompts, bank, ref = setup
  c = model.config
  # The full capacity sweep in float32; bfloat16 (slow matmuls on CPU) runs
  # every source and policy at E/2. The tiny preset sweeps both dtypes.
  capacities = ((c.top_k, c.num_experts // 2, c.num_experts - 1)
                if model.dtype == jnp.float32 else (c.num_experts // 2,))
  runs = [dict(experts="static_offload"), dict(experts="transient")]
  for policy in ("lru", "lfu", "fifo", "ws", "pinned"):
    for capacity in capacities:
      hot = (api.hot_set_from_routing(ref.routing_ids, c.num_experts, capacity)
             if policy == "pinned" else None)
      runs.append(dict(experts="paged", slots_per_layer=capacity,
                       policy=policy, hot_set=hot, num_slots=max(capacities)))
  hit_rates = {}
  for kwargs in runs:
    with jax.transfer_guard("disallow"):
      out = generate(model, prompts, NEW_TOKENS, bank=bank, return_logits=True,
                     **kwargs)
    assert np.array_equal(out.logits, ref.logits), kwargs
    assert np.array_equal(out.tokens, ref.tokens), kwargs
    hit_rates[(kwargs.get("policy"), kwargs.get("slots_per_layer"))] = (
        out.stats.hit_rate)
  # Real routing has reuse: more slots, more hits, for every policy.
  for policy in ("lru", "lfu", "fifo", "ws", "pinned"):
    rates = [hit_rates[(policy, s)] for s in capacities]
    assert rates == sorted(rates), (policy, rates)
    assert rates[-1] > 0.4, (policy, rates)
