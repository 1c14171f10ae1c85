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
  half = c.num_experts // 2
  runs = [dict(experts="static_offload"), dict(experts="transient")]
  # float32: every policy at E/2 and LRU at every capacity (one compiled
  # step serves all capacities); bfloat16: LRU only, to keep the suite's
  # compile time in bounds. The tiny preset sweeps every policy x capacity
  # in both dtypes.
  sweep = {"lru": (c.top_k, half, c.num_experts - 1)}
  policies = ("lru", "lfu", "fifo", "ws", "pinned")
  if model.dtype != jnp.float32:
    policies = ("lru",)
  for policy in policies:
    for capacity in sweep.get(policy, (half,)):
      hot = (api.hot_set_from_routing(ref.routing_ids, c.num_experts, capacity)
             if policy == "pinned" else None)
      runs.append(dict(experts="paged", slots_per_layer=capacity,
                       policy=policy, hot_set=hot, num_slots=c.num_experts - 1))
  hit_rates = {}
  for kwargs in runs:
    with jax.transfer_guard("disallow"):
      out = generate(model, prompts, NEW_TOKENS, bank=bank, return_logits=True,
                     **kwargs)
    assert np.array_equal(out.logits, ref.logits), kwargs
    assert np.array_equal(out.tokens, ref.tokens), kwargs
    if kwargs["experts"] == "paged":
      hit_rates[(kwargs["policy"], kwargs["slots_per_layer"])] = (
          out.stats.hit_rate)
  # Real routing has reuse: the pager hits, and more slots hit more.
  assert all(rate > 0.6 for (_, slots), rate in hit_rates.items()
             if slots >= half), hit_rates
  lru = [hit_rates[("lru", s)] for s in sweep.get("lru", ())]
  assert lru == sorted(lru)
