"""Command-line smoke tests of experiments/ scripts (one subprocess each)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from wisp_jax.traces.trace import RoutingTrace

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
  result = subprocess.run([sys.executable, *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_demo_pages_next_to_resident(tmp_path):
  out = _run("experiments/demo.py", "--config=configs/demo.py:tiny",
             f"--workdir={tmp_path}", "--experts=paged",
             "--slots_per_layer=2,3,4,4", "--policy=lfu")
  lines = out.splitlines()
  head = next(i for i, l in enumerate(lines) if l.startswith("source"))
  assert lines[head].split() == ["source", "slots", "hit", "rate",
                                 "bytes/token", "tokens/s"]
  assert lines[head + 1].startswith("paged (lfu)  2,3,4,4")
  assert lines[head + 2].startswith("resident")
  assert "tokens vs resident: equal" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["same_tokens_as_resident"]
  assert summary["results"][0]["slots_per_layer"] == [2, 3, 4, 4]
  assert 0 < summary["results"][0]["decode_hit_rate"] < 1
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["policy"] == "lfu" and config["slots_per_layer"] == "2,3,4,4"


def test_convert_trace_writes_an_npz_and_prints_the_report(tmp_path):
  log = tmp_path / "routes.jsonl"
  rows = [json.dumps({"type": "meta", "num_experts": 4, "top_k": 2,
                      "model": "toy"})]
  rng = np.random.default_rng(0)
  for token in range(6):
    for layer in range(2):
      ids = rng.choice(4, 2, replace=False).tolist()
      rows.append(json.dumps({"type": "route", "req_id": "r0",
                              "token_idx": token, "layer": layer,
                              "topk_ids": ids, "topk_weights": [0.6, 0.4]}))
  rows.append("{not json")
  log.write_text("\n".join(rows) + "\n")
  out = _run("experiments/convert_trace.py", "--format=vllm",
             f"--input={log}", f"--output={tmp_path / 'trace'}",
             "--skip_malformed")
  assert "per_request log, 1 file(s)" in out
  assert "dropped: 1 malformed (skipped)" in out
  trace = RoutingTrace.load(tmp_path / "trace.npz")
  assert (trace.num_tokens, trace.num_layers, trace.top_k) == (6, 2, 2)
  assert trace.num_experts == 4 and trace.model == "toy"
  assert f"wrote {tmp_path / 'trace.npz'}: 6 events x 2 layers" in out
