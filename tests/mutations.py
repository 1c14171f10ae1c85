"""Byte mutations shared by the loaders' seeded fuzz tests."""

import numpy as np


def mutate(data: bytes, kind: str, rng: np.random.Generator,
           region: int | None = None, bad_byte: int = 0xFF) -> bytes:
  """`data` mutated by `kind`: "truncate" (at a random offset), "flip" (one
  bit), "bad_utf8" (one byte set to `bad_byte`), "append" (1-8 random
  bytes), "repeat_line" or "swap_lines" (two random lines). Flips and bad
  bytes fall in the first `region` bytes if given."""
  region = region or len(data)
  out = bytearray(data)
  if kind == "truncate":
    return bytes(out[:rng.integers(len(data))])
  if kind == "flip":
    out[rng.integers(region)] ^= 1 << rng.integers(8)
  elif kind == "bad_utf8":
    out[rng.integers(region)] = bad_byte
  elif kind == "append":
    out += bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8))
  elif kind in ("repeat_line", "swap_lines"):
    lines = data.split(b"\n")
    i, j = sorted(rng.choice(len(lines) - 1, 2, replace=False))
    changed = list(lines)
    if kind == "repeat_line":
      changed.insert(j, lines[i])
    else:
      changed[i], changed[j] = lines[j], lines[i]
    return b"\n".join(changed)
  else:
    raise ValueError(f"unknown mutation {kind!r}")
  return bytes(out)
