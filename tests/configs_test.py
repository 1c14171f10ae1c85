"""Tests of wisp_jax/configs: by name, by path, `tiny`, overridable fields."""

import importlib
import importlib.util
import pathlib
import re

import ml_collections
import pytest

from wisp_jax import configs

TOP_LEVEL = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = configs.names()


def _by_path(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                TOP_LEVEL / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fields(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_every_top_level_config_is_a_package_config():
  assert {p.stem for p in TOP_LEVEL.glob("*.py")} == set(NAMES)
  for name in NAMES:
    module = _by_path(name)
    package = importlib.import_module(f"wisp_jax.configs.{name}")
    assert module.get_config is package.get_config, name
    # A re-export: no body of its own.
    assert "def " not in (TOP_LEVEL / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", NAMES)
def test_tiny_and_full_load_and_lists_are_overridable(name):
  for arg in ("", "tiny"):
    config = configs.get(name, arg)
    assert config.to_dict() == _by_path(name).get_config(arg).to_dict()
    for field, value in _fields(config):
      # ml_collections cannot override a list from the command line.
      assert not isinstance(value, list), f"{name}:{arg} {field} is a list"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_argument_names_the_valid_ones(name):
  with pytest.raises(ValueError, match=r"unknown argument 'tinyy' for config "
                     rf"'{name}'; valid: '' \(the full run\), 'tiny' \(a "
                     r"CI-speed run\)"):
    configs.get(name, "tinyy")


@pytest.mark.parametrize("name", NAMES)
def test_docstring_shows_an_override_and_the_machine_of_timings(name):
  doc = importlib.import_module(f"wisp_jax.configs.{name}").__doc__
  assert re.search(r"--config\.[a-z_.]+=", doc) or "--slots_per_layer" in doc
  assert f"configs/{name}.py" in doc
  for timing in re.findall(r"(?:about|~) ?\d+ (?:s|min|minutes)\b[^.;)]*",
                           doc):
    assert "CPU" in timing or "machine" in timing, (name, timing)


def test_get_refuses_an_unknown_config():
  with pytest.raises(ValueError, match="unknown config 'simulat'; known "
                     "configs: alloc_eval, alloc_sweep"):
    configs.get("simulat")


def _overrides(doc: str) -> list[str]:
  """The `--config.field=value` examples of a docstring."""
  found = re.findall(r"(--config\.[\w.\-]+)=(\"[^\"]*\"|[^\s`]+)", doc)
  return [f"{flag}={value.strip(chr(34))}" for flag, value in found]


@pytest.mark.parametrize("name", NAMES)
def test_the_docstring_overrides_parse(name, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  doc = importlib.import_module(f"wisp_jax.configs.{name}").__doc__
  own = configs.get(name)
  overrides = [o for o in _overrides(doc)  # not those of other scripts
               if o[len("--config."):].split(".")[0].split("=")[0] in own]
  assert overrides, f"{name}'s docstring shows no override of its fields"
  for override in overrides:
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    argv = ["prog", f"--config={TOP_LEVEL / name}.py", override]
    monkeypatch.setattr("sys.argv", argv)  # overrides are read from argv
    values(argv)
    field, _, text = override[len("--config."):].partition("=")
    value = values.config
    for part in field.split("."):
      value = value[part]
    assert value is not None, override
    if isinstance(value, tuple) and "," in text and "(" not in text:
      assert len(value) == text.count(",") + 1, override


def test_comma_separated_numbers_override_a_tuple(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  argv = ["prog", f"--config={TOP_LEVEL / 'alloc_sweep.py'}:tiny",
          "--config.budgets_gib=8,16"]
  monkeypatch.setattr("sys.argv", argv)
  values(argv)
  assert values.config.budgets_gib == (8, 16)
