"""Fuzzing of `RoutingTrace.load` (wisp_jax/traces/trace.py): every mutated
file loads the original trace or is refused with a LoadError naming it."""

import numpy as np

from wisp_jax.errors import LoadError
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import RoutingTrace
from tests.mutations import mutate

_COLUMNS = ("step", "request", "phase", "position", "ids", "weights")


def _same(a: RoutingTrace, b: RoutingTrace) -> bool:
  return (all(np.array_equal(getattr(a, c), getattr(b, c)) and
              getattr(a, c).dtype == getattr(b, c).dtype for c in _COLUMNS)
          and (a.num_experts, a.model, a.source) == (b.num_experts, b.model,
                                                     b.source))


def test_fuzz_trace_npz(tmp_path):
  trace = synthetic.sticky(2, 8, 2, 3, 4, 2, seed=4)
  trace.save(tmp_path / "original.npz")
  original = (tmp_path / "original.npz").read_bytes()
  rng = np.random.default_rng(5)
  outcomes = {"same": 0, "refused": 0}
  for trial in range(80):
    kind = ("truncate", "flip", "flip", "bad_utf8")[trial % 4]
    path = tmp_path / f"m{trial}.npz"
    path.write_bytes(mutate(original, kind, rng))
    try:
      got = RoutingTrace.load(path)
    except LoadError as e:
      assert str(path) in str(e), (kind, str(e))
      outcomes["refused"] += 1
      continue
    # The zip CRC guards every member: what loads is the original.
    assert _same(got, trace), kind
    outcomes["same"] += 1
  assert outcomes["refused"] >= 40 and outcomes["same"] >= 3, outcomes
