"""Tests of wisp_jax/runs/reports.py."""

import json

from absl import logging

from wisp_jax.runs import reports


def test_format_bytes_picks_a_human_unit():
  assert reports.format_bytes(40_000) == "39.1 KiB"
  assert reports.format_bytes(8 * 2**30) == "8 GiB"
  assert reports.format_bytes(3 * 2**20 + 2**19) == "3.5 MiB"
  assert reports.format_bytes(512) == "512 B"
  assert reports.byte_unit([10, 3 * 2**20]) == ("MiB", 2**20)


def test_a_report_is_its_summary_and_prints_its_text():
  report = reports.Report({"a": 1, "b": [2, 3]}, "a table")
  assert report == {"a": 1, "b": [2, 3]} and report["a"] == 1
  assert json.loads(json.dumps(report)) == {"a": 1, "b": [2, 3]}
  assert str(report) == "a table"


def test_text_table_aligns_columns():
  text = reports.text_table(["name", "value"], [["lru", 0.5], ["min", None]])
  assert text.splitlines() == ["name  value", "lru   0.500", "min       -"]


def test_start_logging_shows_info_outside_app_run():
  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.WARNING)
    reports.start_logging()
    assert logging.get_verbosity() == logging.INFO
  finally:
    logging.set_verbosity(before)


def test_split_names():
  assert reports.split_names("lru, min,") == ("lru", "min")
  assert reports.split_names(("lru",)) == ("lru",)
