"""The package's layers import downward only (DESIGN.md's layer picture)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "wisp_jax"
# Bottom to top; a module may import its own layer and those below it.
LAYERS = ["errors", "data", "models", "compress", "traces", "paging", "sim",
          "alloc", "serving", "runs", "configs", "launch"]


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      yield node.lineno, names
    elif isinstance(node, ast.Import):
      yield node.lineno, [a.name for a in node.names]


def test_every_layer_is_known():
  found = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or
           (p.suffix == ".py" and p.stem != "__init__")}
  assert found <= set(LAYERS), found - set(LAYERS)


def test_imports_point_downward():
  upward = []
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = _layer(".".join(rel.parts))
    if here not in LAYERS:
      continue
    for line, names in _imports(path):
      for name in names:
        if not name.startswith("wisp_jax."):
          continue
        there = _layer(name)
        if there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
          upward.append(f"{rel}:{line} imports {name}")
  assert not upward, "\n".join(sorted(set(upward)))
