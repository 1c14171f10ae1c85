"""Tests of wisp_jax/serving/generate.py: buckets, stop tokens, text, splits."""

import json
import logging

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from wisp_jax import data
from wisp_jax.alloc.split import Split
from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving import generate as generate_lib
from wisp_jax.serving import step as step_lib
from wisp_jax.serving.generate import generate

PROMPTS = [[5, 9, 1], [7, 3, 3, 8, 2, 11], [4]]
# Every test generates with these shapes (prompt width 8, cache 16) where it
# can, so that they share compiled steps.
NEW = 8
PAGED = dict(experts="paged", num_slots=4)


@pytest.fixture(scope="module")
def bank(tiny_model):
  return bank_lib.make_bank(tiny_model.experts.weights())


def test_bucket_length():
  assert [generate_lib.bucket_length(n) for n in (1, 2, 3, 16, 17)] == [
      1, 2, 4, 16, 32]
  assert generate_lib.bucket_length(3, 8) == 8


def test_bucketed_tokens_and_traffic_equal_unbucketed(tiny_model, bank):
  kwargs = dict(PAGED, slots_per_layer=3, bank=bank, record_routing=True)
  exact = generate(tiny_model, PROMPTS, NEW, bucket=False, **kwargs)
  bucketed = generate(tiny_model, PROMPTS, NEW, **kwargs)
  assert (exact.prompt_width, exact.cache_length) == (6, 14)
  assert (bucketed.prompt_width, bucketed.cache_length) == (8, 16)
  np.testing.assert_array_equal(bucketed.tokens, exact.tokens)
  # Pads copy each row's first token and attend to themselves alone, so
  # they route like it: the pager sees the same demand.
  first = bucketed.routing_ids[0]  # [L, B, P, K]
  for row, prompt in enumerate(PROMPTS):
    start = bucketed.prompt_width - len(prompt)
    for pad in range(start):
      np.testing.assert_array_equal(first[:, row, pad], first[:, row, start])
  np.testing.assert_array_equal(bucketed.stats.per_pass_hits,
                                exact.stats.per_pass_hits)
  np.testing.assert_array_equal(bucketed.stats.per_pass_loads,
                                exact.stats.per_pass_loads)


def test_paged_equals_resident_bit_for_bit_when_bucketed(tiny_model, bank):
  ref = generate(tiny_model, PROMPTS, NEW, return_logits=True)
  paged = generate(tiny_model, PROMPTS, NEW, **PAGED, slots_per_layer=2,
                   bank=bank, return_logits=True)
  assert ref.prompt_width == 8 and ref.logits.shape == (3, NEW, 61)
  assert np.array_equal(paged.logits, ref.logits)
  assert np.array_equal(paged.tokens, ref.tokens)
  # Batch-major like model(tokens): row b, step t.
  assert ref.logits.shape[:2] == ref.tokens.shape
  np.testing.assert_array_equal(ref.tokens, ref.logits.argmax(-1))


def _prefill_impl(*args):
  return step_lib.step_impl(*args)


def _decode_impl(*args):
  return step_lib.step_impl(*args)


def test_one_bucket_compiles_each_step_once_and_says_so(
    tiny_model, monkeypatch, caplog):
  # Steps with their own compile caches, each traced at most once.
  chex.clear_trace_counter()
  prefill = step_lib.jit_step(chex.assert_max_traces(_prefill_impl, n=1))
  decode = step_lib.jit_step(chex.assert_max_traces(_decode_impl, n=1))
  monkeypatch.setattr(generate_lib, "prefill_step", prefill)
  monkeypatch.setattr(generate_lib, "decode_step", decode)
  # Widths 3 and 5 both pad to 8; 8 + 3 and 8 + 7 tokens both cache 16.
  # The "absl" logger's own level too: another test may have set absl's
  # verbosity (flags parsed by a run) above INFO.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO,
                                                      logger="absl"):
    for prompt, new in (([1, 2, 3], 3), ([1, 2, 3, 4, 5], 7), ([6], 5)):
      out = generate(tiny_model, [prompt] * 3, new)
      assert out.tokens.shape == (3, new) and out.cache_length == 16
  assert prefill._cache_size() == 1
  assert decode._cache_size() == 1
  lines = [r.getMessage() for r in caplog.records
           if "decode step" in r.getMessage()]
  assert lines[0] == ("compiling decode step for batch 3, cache 16 "
                      "(resident) ...")
  assert lines[1].startswith("compiled decode step for batch 3, cache 16 "
                             "(resident) in ")
  assert len(lines) == 2  # the later calls compile nothing


def test_stop_tokens_finish_rows_one_by_one(tiny_model):
  free = generate(tiny_model, PROMPTS, NEW)
  row0 = free.tokens[0].tolist()
  stop = row0[3]
  first = row0.index(stop)
  out = generate(tiny_model, PROMPTS, NEW, stop_tokens=[stop])
  assert out.lengths[0] == first + 1 and out.finish_reason[0] == "stop"
  np.testing.assert_array_equal(out.tokens[0, :first + 1],
                                free.tokens[0, :first + 1])
  assert np.all(out.tokens[0, first + 1:] == stop)  # keeps emitting it
  for row in range(1, len(PROMPTS)):
    hits = [i for i, t in enumerate(free.tokens[row].tolist()) if t == stop]
    if hits:
      assert out.lengths[row] == hits[0] + 1
    else:
      assert out.finish_reason[row] == "length" and out.lengths[row] == NEW
      np.testing.assert_array_equal(out.tokens[row], free.tokens[row])
  # Each row's second token stops it: generation ends once all stopped.
  stops = free.tokens[:, 1].tolist()
  padded = generate(tiny_model, PROMPTS, NEW, stop_tokens=stops,
                    pad_token_id=0)
  lengths = [row.tolist().index(next(t for t in row.tolist() if t in stops))
             + 1 for row in free.tokens]
  assert padded.lengths.tolist() == lengths
  assert padded.tokens.shape == (3, max(lengths))
  assert padded.finish_reason == ["stop"] * 3
  for row, n in enumerate(lengths):
    assert np.all(padded.tokens[row, n:] == 0)


def test_text_in_text_out_for_the_byte_level_family():
  model = MoEModel(get_config("tiny").replace(vocab_size=256),
                   rngs=nnx.Rngs(1))
  out = generate(model, ["def f(x):", "import os\n", "x"], NEW)
  assert len(out.text) == 3
  assert out.text[0] == data.decode(out.tokens[0])
  assert out.prompt_lengths.tolist() == [9, 10, 1]
  ids = generate(model, [data.encode(t) for t in ("def f(x):", "x", "y")],
                 NEW)
  np.testing.assert_array_equal(ids.tokens[0], out.tokens[0])
  np.testing.assert_array_equal(ids.tokens[1], out.tokens[2])
  assert ids.text is None


def test_misleading_inputs_get_clear_errors(tiny_model, tmp_path):
  with pytest.raises(ValueError, match="prompts are text, but model 'tiny' "
                     r"\(vocab_size=61\) has no tokenizer"):
    generate(tiny_model, "hello", 2)
  with pytest.raises(ValueError, match="slots_per_layer has 3 values "
                     r"\[3, 3, 3\], but model 'tiny' has 2 layers"):
    generate(tiny_model, PROMPTS, 2, experts="paged",
             slots_per_layer=[3, 3, 3])
  with pytest.raises(ValueError, match="split= sets the slots of "
                     "experts='paged'"):
    generate(tiny_model, PROMPTS, 2, split={"slots_per_layer": [2, 2]})
  with pytest.raises(FileNotFoundError, match="allocate.py writes"):
    generate(tiny_model, PROMPTS, 2, experts="paged",
             split=tmp_path / "none.json")
  with pytest.raises(ValueError, match="outside \\[0, 61\\)"):
    generate(tiny_model, PROMPTS, 2, stop_tokens=[61])
  with pytest.raises(ValueError, match="no eos_token_id"):
    generate(tiny_model, PROMPTS, 2, stop_at_eos=True)


def test_split_from_allocate_sets_the_slots(tiny_model, bank, tmp_path):
  path = tmp_path / "split.json"
  path.write_text(json.dumps({"slots_per_layer": [2, 4], "kv_blocks": 9}))
  want = generate(tiny_model, PROMPTS, NEW, **PAGED, slots_per_layer=[2, 4],
                  bank=bank)
  for split in (path, str(path), {"slots_per_layer": [2, 4]},
                Split((2, 4), 9)):
    out = generate(tiny_model, PROMPTS, NEW, **PAGED, split=split, bank=bank)
    np.testing.assert_array_equal(out.stats.per_pass_misses,
                                  want.stats.per_pass_misses)
  two = generate(tiny_model, PROMPTS, NEW, **PAGED, slots_per_layer=2,
                 bank=bank)
  assert not np.array_equal(want.stats.misses, two.stats.misses)


def test_runs_under_the_disallow_transfer_guard(tiny_model, bank):
  with jax.transfer_guard("disallow"):
    out = generate(tiny_model, PROMPTS, NEW, **PAGED, slots_per_layer=3,
                   bank=bank, stop_tokens=[1, 2])
  assert out.tokens.shape[0] == 3
