"""Suite-wide settings and test ordering.

XLA:CPU compiles at backend optimization level 0 in the test processes
(and the subprocesses and notebook kernels they start), unless `XLA_FLAGS`
is set already: most of the suite's time is compiling small jitted steps,
and level 0 compiles them faster. Exactness is a property of every code
generation, so the in-process tests check it at level 0 on this CPU's own
instruction set, and `tests/serving/exactness_test.py::
test_exact_under_every_isa` checks it again at XLA's default level under
SSE4_2 and AVX2 (its subprocesses set `XLA_FLAGS` themselves). To run the
suite at the default level: `XLA_FLAGS= make test`; under one ISA:
`XLA_FLAGS=--xla_cpu_max_isa=AVX2 make test`.

Tests marked `long` (minutes of CPU, such as the exactness matrix in
subprocesses) are collected first, so that with `pytest -n` they start at
once and the short tests fill the other workers around them.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "long: runs for a long time; scheduled first.")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
