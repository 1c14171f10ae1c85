"""Named accelerator profiles for the step-latency model.

Numbers come from public datasheets (sources next to each profile). Two of
them are assumptions, flagged on every profile:

  * Host-to-device bandwidth: the nominal per-direction PCIe x16 rate
    (lanes x GT/s x 128/130 encoding / 8) times 0.8, because pinned-memory
    copies typically reach ~80% of nominal. Replace it with a measured
    value (`h2d_source="measured"`) whenever one exists.
  * Per-step overhead: a fixed 50 us per forward pass for kernel launches
    and host work of a jitted step; not a datasheet number.

FLOP/s are dense bf16 tensor-core rates (datasheets often print the 2:4
sparse figure, twice as large). Memory is the marketed size in GiB; the
usable amount nvidia-smi reports is slightly lower.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

GB = 1e9
GIB = 2**30
TFLOPS = 1e12
PCIE_EFFICIENCY = 0.8  # achievable / nominal, assumed unless measured
DEFAULT_STEP_OVERHEAD_S = 50e-6  # assumed kernel-launch cost per step


def pcie_x16_bytes_per_s(generation: int) -> float:
  """Nominal per-direction bandwidth of a PCIe x16 link (gen 3, 4 or 5)."""
  gt_per_s = {3: 8.0, 4: 16.0, 5: 32.0}
  if generation not in gt_per_s:
    raise ValueError(f"PCIe generation {generation} unknown; use 3, 4 or 5.")
  return gt_per_s[generation] * 1e9 * 16 * (128 / 130) / 8


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """One accelerator and its host link, as the cost model sees it.

  Attributes:
    name: profile name.
    h2d_bytes_per_s: effective host-to-device bandwidth used by the model.
    h2d_nominal_bytes_per_s: the link's nominal per-direction bandwidth.
    h2d_source: how `h2d_bytes_per_s` was obtained, e.g. "assumed 80% of
      nominal" or "measured".
    hbm_bytes_per_s: device memory bandwidth (HBM or GDDR).
    bf16_flops: dense bf16 (or nearest 16-bit) tensor FLOP/s.
    memory_bytes: device memory.
    step_overhead_s: fixed time per forward step (kernel launches).
  """
  name: str
  h2d_bytes_per_s: float
  h2d_nominal_bytes_per_s: float
  h2d_source: str
  hbm_bytes_per_s: float
  bf16_flops: float
  memory_bytes: int
  step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S

  def __post_init__(self):
    for field in ("h2d_bytes_per_s", "h2d_nominal_bytes_per_s",
                  "hbm_bytes_per_s", "bf16_flops", "memory_bytes"):
      if not getattr(self, field) > 0:
        raise ValueError(f"HardwareProfile {self.name!r}: {field} must be "
                         f"positive, got {getattr(self, field)!r}.")
    if self.step_overhead_s < 0:
      raise ValueError(f"HardwareProfile {self.name!r}: step_overhead_s "
                       f"must be >= 0, got {self.step_overhead_s!r}.")


def _pcie_profile(name: str, generation: int, **fields: Any
                  ) -> HardwareProfile:
  nominal = pcie_x16_bytes_per_s(generation)
  return HardwareProfile(
      name=name, h2d_bytes_per_s=PCIE_EFFICIENCY * nominal,
      h2d_nominal_bytes_per_s=nominal,
      h2d_source=f"assumed {PCIE_EFFICIENCY:.0%} of nominal PCIe {generation}"
                 " x16", **fields)


PROFILES: dict[str, HardwareProfile] = {
    # GeForce RTX 3090: NVIDIA Ampere GA102 whitepaper (v2.0), table 9:
    # 936 GB/s GDDR6X, 24 GB, peak BF16 tensor 71 TFLOPS dense (FP32
    # accumulate); PCIe 4.0 x16.
    "rtx3090": _pcie_profile("rtx3090", 4, hbm_bytes_per_s=936 * GB,
                             bf16_flops=71 * TFLOPS, memory_bytes=24 * GIB),
    # NVIDIA A40 datasheet: 48 GB GDDR6, 696 GB/s, BF16 tensor 149.7 TFLOPS
    # (299.4 sparse); PCIe 4.0 x16.
    "a40": _pcie_profile("a40", 4, hbm_bytes_per_s=696 * GB,
                         bf16_flops=149.7 * TFLOPS, memory_bytes=48 * GIB),
    # NVIDIA L40 datasheet: 48 GB GDDR6, 864 GB/s, BF16 tensor 181.05
    # TFLOPS (362.1 sparse); PCIe 4.0 x16.
    "l40": _pcie_profile("l40", 4, hbm_bytes_per_s=864 * GB,
                         bf16_flops=181.05 * TFLOPS, memory_bytes=48 * GIB),
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, mixed-precision FP16
    # tensor 65 TFLOPS; PCIe 3.0 x16. Turing has no bf16: the FP16 rate
    # stands in for it.
    "t4": _pcie_profile("t4", 3, hbm_bytes_per_s=320 * GB,
                        bf16_flops=65 * TFLOPS, memory_bytes=16 * GIB),
    # NVIDIA H100 datasheet, PCIe form factor: 80 GB HBM2e, 2.0 TB/s, BF16
    # tensor 1,513 TFLOPS with sparsity (756 dense); PCIe 5.0 x16.
    "h100-pcie": _pcie_profile("h100-pcie", 5, hbm_bytes_per_s=2.0e12,
                               bf16_flops=756 * TFLOPS,
                               memory_bytes=80 * GIB),
    # NVIDIA H100 datasheet, H100 NVL: 94 GB HBM3, 3.9 TB/s, BF16 tensor
    # 1,671 TFLOPS with sparsity (835.5 dense); PCIe 5.0 x16.
    "h100-nvl": _pcie_profile("h100-nvl", 5, hbm_bytes_per_s=3.9e12,
                              bf16_flops=835.5 * TFLOPS,
                              memory_bytes=94 * GIB),
}


def profile_from_dict(spec: Mapping[str, Any]) -> HardwareProfile:
  """A user-defined profile from a dict of `HardwareProfile` fields.

  `name`, `h2d_bytes_per_s`, `hbm_bytes_per_s`, `bf16_flops` and
  `memory_bytes` are required. A missing `h2d_nominal_bytes_per_s` is set to
  `h2d_bytes_per_s`; a missing `h2d_source` reads "user-defined".

  Raises:
    ValueError: on missing or unknown keys, or non-positive values.
  """
  fields = {f.name for f in dataclasses.fields(HardwareProfile)}
  unknown = sorted(set(spec) - fields)
  if unknown:
    raise ValueError(f"unknown HardwareProfile keys {unknown}; valid keys: "
                     f"{sorted(fields)}.")
  required = ("name", "h2d_bytes_per_s", "hbm_bytes_per_s", "bf16_flops",
              "memory_bytes")
  missing = [key for key in required if key not in spec]
  if missing:
    raise ValueError(f"hardware profile dict is missing {missing}; required "
                     f"keys: {list(required)}.")
  values = dict(spec)
  values.setdefault("h2d_nominal_bytes_per_s", values["h2d_bytes_per_s"])
  values.setdefault("h2d_source", "user-defined")
  return HardwareProfile(**values)


def get_profile(name: str | Mapping[str, Any] | HardwareProfile
                ) -> HardwareProfile:
  """A named profile, a dict of fields, the path of a JSON file of fields
  (e.g. the `hardware.json` that `runs.gpu_bench` writes), or a profile
  passed through."""
  if isinstance(name, HardwareProfile):
    return name
  if isinstance(name, Mapping):
    return profile_from_dict(name)
  if isinstance(name, str) and name.endswith(".json"):
    path = pathlib.Path(name)
    if not path.is_file():
      raise ValueError(f"hardware profile file {name!r} does not exist.")
    try:
      fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"hardware profile file {name}: not valid JSON "
                       f"({e}).") from None
    if not isinstance(fields, dict):
      raise ValueError(f"hardware profile file {name}: expected an object "
                       "of HardwareProfile fields.")
    return profile_from_dict(fields)
  try:
    return PROFILES[name]
  except KeyError:
    raise ValueError(f"unknown hardware profile {name!r}; known profiles: "
                     f"{', '.join(sorted(PROFILES))} (or pass a dict of "
                     "HardwareProfile fields).") from None
