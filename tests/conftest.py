"""Suite-wide test ordering.

Tests marked `long` (minutes of CPU, such as the exactness matrix in
subprocesses) are collected first, so that with `pytest -n` they start at
once and the short tests fill the other workers around them.
"""


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "long: runs for a long time; scheduled first.")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
