"""The exactness matrix (wisp_jax/serving/exactness.py): every source and
policy `np.array_equal` to resident, here and under other CPUs' code
generation (`XLA_FLAGS=--xla_cpu_max_isa=...` subprocesses).

The tiny preset's full matrix, with hand-checked counters, is in
tests/paging/sources_test.py.
"""

import collections

import pytest

from wisp_jax.serving import exactness


# Decode tokens per run: enough for every capacity to evict and reload
# (the hit rates below), fewer than the CLI's 128 (compiles are most of
# the cost; the decode loop is the rest).
NEW_TOKENS = 48


def _assert_all_exact(runs):
  bad = [r for r in runs if not (r.exact and r.counts_ok)]
  assert not bad, bad
  assert runs


# Every policy in float32; in bfloat16 (same programs but for the dtype)
# the gate-weighted history policy (the tiny preset runs every policy in
# bfloat16, tests/paging/sources_test.py).
@pytest.mark.long
@pytest.mark.parametrize("dtype,policies", [
    ("float32", exactness.POLICIES), ("bfloat16", ("lrfu_gate",))])
def test_default_model_every_source_and_policy(dtype, policies):
  offload = dtype == "float32"  # bf16 offload sources: the tiny preset's
  runs = exactness.check_model("default", dtype, NEW_TOKENS,
                               policies=policies, offload=offload)
  _assert_all_exact(runs)
  # 3 offload sources + the policies x 3 capacities.
  assert len(runs) == 3 * offload + len(policies) * 3
  hit = {(r.policy, r.capacity): r.hit_rate for r in runs
         if r.experts == "paged"}
  # Real routing has reuse: the pager hits, and more slots hit more.
  assert all(rate > 0.5 for (_, slots), rate in hit.items() if slots >= 4), hit
  assert all(rate > 0.85 for (_, slots), rate in hit.items() if slots == 7)
  if "lru" in policies:  # a stack policy: more slots never hit less
    lru = [hit[("lru", s)] for s in (2, 4, 7)]
    assert lru == sorted(lru) and lru[0] < lru[-1]


@pytest.mark.long
@pytest.mark.parametrize("model", ["mixtral-8x7b-small", "qwen3-30b-a3b-small",
                                   "olmoe-1b-7b-small"])
def test_real_geometry_presets(model):
  # The pager at real E and depth; the offload sources run on the default
  # model (above) and on the tiny one (in process and under other ISAs).
  runs = exactness.check_model(model, "float32", NEW_TOKENS,
                               policies=("lru",), offload=False)
  _assert_all_exact(runs)
  assert len({r.capacity for r in runs if r.policy == "lru"}) == 3
  assert len(runs) == 3


@pytest.mark.long
def test_exact_under_every_isa():
  """The tiny preset's matrix (both dtypes; every source, LRU at every
  capacity) again in one subprocess per instruction set: SSE4_2 (128-bit,
  no FMA) and AVX2 (256-bit with FMA contraction), the two code
  generations furthest from each other and from an AVX512 host's own,
  under which the in-process tests (tests/paging/sources_test.py) run the
  whole matrix.

  `python -m wisp_jax.serving.exactness --isas=all` runs every model and
  policy under every ISA (AVX too; about 20 min of 2 cores).
  """
  supported = exactness.supported_isas()
  assert {"SSE4_2", "AVX", "AVX2"} <= set(supported)
  isas = ("SSE4_2", "AVX2")
  results = exactness.check_isas(isas, models=("tiny",), policies=("lru",))
  assert set(results) == set(isas)
  for isa, (runs, error, _) in results.items():
    assert not error, (isa, error)
    _assert_all_exact(runs)
    kinds = collections.Counter((r.dtype, r.experts) for r in runs)
    assert kinds == {(d, e): n for d in exactness.DTYPES
                     for e, n in (("static_offload", 1), ("transient", 1),
                                  ("layer_offload", 1), ("paged", 3))}, (
                                      isa, kinds)
