"""Tests of wisp_jax/serving/request_stream.py and wisp_jax/runs/serve.py."""

import json

import numpy as np
import pytest

from wisp_jax.configs import serve as serve_config
from wisp_jax.runs import serve
from wisp_jax.serving import request_stream


def test_stdlib_prompts_are_real_text_of_the_asked_lengths():
  prompts = request_stream.stdlib_prompts(5, 20, 40, 256, seed=1)
  assert len(prompts) == 5
  assert all(20 <= p.size <= 40 for p in prompts)
  again = request_stream.stdlib_prompts(5, 20, 40, 256, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(prompts, again))
  text = bytes(np.concatenate(prompts).astype(np.uint8).tolist())
  assert np.mean([32 <= b < 127 or b in (9, 10) for b in text]) > 0.95
  small = request_stream.stdlib_prompts(3, 5, 5, 61, seed=1)
  assert all(p.max() < 61 for p in small)


def test_arrivals():
  np.testing.assert_array_equal(request_stream.arrival_steps(3, "all", 0.0), 0)
  steps = request_stream.arrival_steps(400, "poisson", 0.5, seed=0)
  assert steps[0] == 0 and np.all(np.diff(steps) >= 0)
  # About 2 steps between arrivals at 0.5 per step.
  assert 1.7 < steps[-1] / 399 < 2.3
  with pytest.raises(ValueError, match="unknown arrival pattern 'burst'"):
    request_stream.arrival_steps(3, "burst", 1.0)
  with pytest.raises(ValueError, match="rate > 0"):
    request_stream.arrival_steps(3, "poisson", 0.0)


def test_jsonl_workload(tmp_path):
  path = tmp_path / "w.jsonl"
  path.write_text('{"prompt": "ab", "max_new_tokens": 3}\n\n'
                  '{"tokens": [1, 2], "max_new_tokens": 2, "arrival_step": 4,'
                  ' "request_id": "x", "temperature": 0.5}\n')
  first, second = request_stream.load_jsonl(path, 256)
  assert list(first.prompt) == [97, 98] and first.request_id == 0
  assert (second.request_id, second.arrival_step, second.temperature) == (
      "x", 4, 0.5)
  path.write_text('{"prompt": "a"}\n')
  with pytest.raises(ValueError, match="line 1: 'max_new_tokens' is missing"):
    request_stream.load_jsonl(path, 256)
  path.write_text('{"prompt": "a", "max_new_tokens": 1, "top_p": 1}\n')
  with pytest.raises(ValueError, match=r"unknown fields \['top_p'\]"):
    request_stream.load_jsonl(path, 256)


def test_serve_tiny_writes_its_outputs(tiny_model, tmp_path, monkeypatch):
  monkeypatch.setattr(serve, "load_model",
                      lambda config: (tiny_model, "test fixture"))
  config = serve_config.get_config("tiny")
  summary = serve.run(config, tmp_path)
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  n = config.workload.num_requests
  assert summary["completed"] == n and summary["failed"] == 0
  requests = [json.loads(l) for l in
              (tmp_path / "requests.jsonl").read_text().splitlines()]
  assert len(requests) == n
  assert summary["generated_tokens"] == sum(r["num_tokens"] for r in requests)
  assert all(r["ttft_s"] is not None for r in requests)
  steps = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps and all(s["step"] < summary["engine"]["steps"] for s in steps)
  assert sum(s["preemptions"] for s in steps) == summary["engine"][
      "preemptions"]
  assert summary["engine"]["kv_blocks_peak"] == max(
      s["kv_blocks_peak"] for s in steps)
  assert summary["engine"]["pager"]["loads"] == sum(s["pager_loads"]
                                                    for s in steps)
  for key in ("p50", "p90", "p99"):
    assert summary["ttft_s"][key] <= summary["latency_s"][key]
  assert json.loads((tmp_path / "config.json").read_text())["model"] == "tiny"
  # The report prints; the step plot is written.
  assert f"served {n}/{n} requests" in str(summary)
  assert (tmp_path / serve.STEPS_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_serve_takes_the_split_that_allocate_wrote(tiny_model, tmp_path):
  path = tmp_path / "split.json"
  path.write_text(json.dumps({"slots_per_layer": [3, 5], "kv_blocks": 12}))
  config = serve_config.get_config("tiny")
  config.engine.split_file = str(path)
  engine = serve._engine(tiny_model, config, None)  # pylint: disable=protected-access
  assert engine.split.slots_per_layer == (3, 5)
  assert engine.allocator.num_blocks == 12
  path.write_text(json.dumps({"slots_per_layer": [3, 3, 3], "kv_blocks": 12}))
  with pytest.raises(ValueError, match="splits 3 layers, but the model has 2"):
    serve._engine(tiny_model, config, None)  # pylint: disable=protected-access
  config.engine.split_file = str(tmp_path / "absent.json")
  with pytest.raises(FileNotFoundError, match="allocate.py writes"):
    serve._engine(tiny_model, config, None)  # pylint: disable=protected-access
