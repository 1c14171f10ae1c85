r"""Converts routing logs to a `RoutingTrace` `.npz` and prints the report.

vLLM-style route logs (one JSON line per token and layer, optionally one
file per layer; drop the warm-up passes):

  .venv/bin/python experiments/convert_trace.py --format=vllm \
      --input='logs/routes_layer*.jsonl' --drop_warmup \
      --output=workdirs/traces/run.npz

Per-token logs (any row order):

  .venv/bin/python experiments/convert_trace.py --format=per_token \
      --input=logs/per_token.jsonl --num_experts=64 \
      --output=workdirs/traces/run.npz

The `.npz` replays with `experiments/simulate.py --config.trace=...` and
allocates with `experiments/allocate.py --config.workload.trace.path=...`.
The library function is `wisp_jax.traces.convert.convert`.
"""

from absl import app
from absl import flags

from wisp_jax.traces import convert

_INPUT = flags.DEFINE_list("input", None, "Log file(s), directories or "
                           "globs, comma-separated.")
_OUTPUT = flags.DEFINE_string("output", None, "The .npz to write.")
_FORMAT = flags.DEFINE_enum("format", "vllm", list(convert.FORMATS),
                            "vllm route logs or per_token logs.")
_EXPERTS = flags.DEFINE_integer("num_experts", None, "E (default: from a "
                                "meta line, else max id + 1).")
_TOP_K = flags.DEFINE_integer("top_k", None, "K (default: from a meta line, "
                              "else the first row).")
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", "batched",
                                               "per_request"],
                            "vLLM logs: how steps are recovered.")
_WARMUP = flags.DEFINE_bool("drop_warmup", False, "vLLM logs: drop the "
                            "leading warm-up run.")
_MIN_WARMUP = flags.DEFINE_integer("min_warmup_rows", 64, "vLLM logs: the "
                                   "shortest run taken for a warm-up.")
_SKIP = flags.DEFINE_bool("skip_malformed", False, "Skip and count malformed "
                          "rows instead of failing.")
_MODEL = flags.DEFINE_string("model", None, "Model name stored in the trace.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  trace, report, path = convert.convert(
      _INPUT.value, _OUTPUT.value, _FORMAT.value,
      num_experts=_EXPERTS.value, top_k=_TOP_K.value, layout=_LAYOUT.value,
      drop_warmup=_WARMUP.value, min_warmup_rows=_MIN_WARMUP.value,
      skip_malformed=_SKIP.value, model=_MODEL.value)
  print(report.summary())
  print(f"wrote {path}: {convert.describe(trace)}")


if __name__ == "__main__":
  app.run(main)
