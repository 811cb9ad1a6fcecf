"""Target topologies for ahead-of-time plans: names, chip figures and compile-only devices.

Names:
  v5p-512, v4-128        TPU slices named by TensorCores (2 per chip: v5p-512 is 256 chips)
  v5e-256, v5litepod-64,
  v6e-256                TPU slices named by chips
  v5p:4x8x8              a libtpu topology string, passed through
  cpu-8                  8 simulated CPU devices (no libtpu; what CI plans with)

TPU devices come from `jax.experimental.topologies` with the TPU compiler in the `libtpu`
package (`pip install "libtpu==0.0.48.*"`, the build jax 0.11.2's `jax[tpu]` pins): they are
compile-only, nothing is allocated and no TPU is needed.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str
  hbm_bytes: int         # per chip, what the compiler may use
  peak_flops: float      # dense bf16 FLOP/s per chip
  hbm_bandwidth: float   # bytes/s per chip
  cores_per_chip: int    # how the slice name counts (TensorCores or chips)
  dims: int              # 3D torus (v4, v5p) or 2D (v5e, v6e)


GiB = 2 ** 30
# Public per-chip figures (Cloud TPU system architecture pages). v5p's HBM is the limit its
# compiler reports ("available HBM (95.73G)"), a little under the 96 GiB fitted.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9, 2, 3),
    "v5p": Chip("TPU v5p", int(95.73 * GiB), 459e12, 2765e9, 2, 3),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, 1, 2),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str              # as given
  platform: str          # "tpu" | "cpu"
  generation: str        # "v5p", ... or "cpu"
  shape: tuple[int, ...]  # chips per slice along each torus axis ((N,) for CPU)
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for d in self.shape:
      n *= d
    return n

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chip(self) -> Chip | None:
    return CHIPS.get(self.generation)


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape GCP uses for `chips` chips: start at 2x2x1 (3D) or 1x1 (2D) and double
  the last of the smallest axes (v5p-512: 4x8x8; v5e-256: 16x16)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < (4 if dims == 3 else 1) or chips & (chips - 1):
    raise ValueError(f"{chips} chips: slices come in powers of two "
                     f"(at least {4 if dims == 3 else 1} chips)")
  while _prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, d in enumerate(shape) if d == smallest)
    shape[i] *= 2
  return tuple(sorted(shape))


def _prod(xs) -> int:
  n = 1
  for x in xs:
    n *= x
  return n


def parse(name: str, num_slices: int = 1) -> Target:
  """A `Target` from a topology name (module docstring); errors name the forms accepted."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: use 1 or more")
  s = name.strip().lower()
  if m := re.fullmatch(r"cpu-(\d+)", s):
    if num_slices != 1:
      raise ValueError(f"--num_slices={num_slices} with {name}: CPU plans have one 'slice'; "
                       "ask for cpu-N with N = all devices")
    n = int(m.group(1))
    if n < 1:
      raise ValueError(f"--topology={name}: need at least one CPU device")
    return Target(name, "cpu", "cpu", (n,))
  if re.match(r"(gpu|cuda|[ahb]\d{2,3})\b", s):
    raise ValueError(f"--topology={name}: jax 0.11.2 has no offline GPU topology "
                     "(jax.experimental.topologies says 'topology not implemented for cuda'), "
                     "so GPUs cannot be planned without one. Fix: run the plan on the GPU "
                     "machine with --topology=local")
  if m := re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", s):
    gen = ALIASES.get(m.group(1), m.group(1))
    return Target(name, "tpu", gen, tuple(int(d) for d in m.group(2).split("x")), num_slices)
  if m := re.fullmatch(r"(v\d+[a-z]*)-(\d+)", s):
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise ValueError(f"--topology={name}: unknown TPU generation {gen!r}; known are "
                       f"{sorted(CHIPS)} (or pass a libtpu name such as v5p:4x8x8)")
    chip, count = CHIPS[gen], int(m.group(2))
    if count % chip.cores_per_chip:
      raise ValueError(f"--topology={name}: {gen} slices are named by TensorCores "
                       f"({chip.cores_per_chip} per chip), so the count must be even")
    return Target(name, "tpu", gen, torus_shape(count // chip.cores_per_chip, chip.dims),
                  num_slices)
  raise ValueError(f"--topology={name!r}: use a slice name (v5p-512, v5e-256, v6e-64, "
                   "v4-128), a libtpu shape (v5p:4x8x8) or cpu-N (N simulated CPU devices)")


def devices(target: Target):
  """The target's devices: compile-only TPU devices from libtpu, or local CPU devices (the
  process must not have started a CPU backend with fewer devices)."""
  import jax
  if target.platform == "cpu":
    jax.config.update("jax_num_cpu_devices", target.num_devices)
    devs = jax.devices("cpu")
    if len(devs) != target.num_devices:
      raise RuntimeError(f"--topology={target.name}: this process already has {len(devs)} CPU "
                         "devices (jax was initialised earlier). Fix: run the plan in a fresh "
                         "process (python -m tml_jax.plan ...)")
    return devs
  from jax.experimental import topologies
  # libtpu looks for a TPU VM's metadata; on a host without one it only needs to be told
  # which accelerator it compiles for (and no workers).
  cores = target.chip.cores_per_chip if target.chip else 1
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{target.generation}-{target.chips_per_slice * cores}")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only: no TPU is opened, so two plans may run at once (libtpu otherwise takes
  # /tmp/libtpu_lockfile and a second process fails with "ABORTED ... lockfile").
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
  try:
    topo = topologies.get_topology_desc(target.libtpu_name, "tpu", **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError(f"--topology={target.name} needs the TPU compiler from the libtpu "
                         "package. Fix: pip install 'libtpu==0.0.48.*' (the build jax 0.11.2 "
                         "pins; no TPU is needed)") from e
    raise
  if len(topo.devices) != target.num_devices:
    raise RuntimeError(f"libtpu made {len(topo.devices)} devices for {target.libtpu_name} x "
                       f"{target.num_slices} slice(s), expected {target.num_devices}")
  return topo.devices
