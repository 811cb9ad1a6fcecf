"""The mesh, and the one place where logical axis names become mesh axes.

Layers name their parameter axes logically ("embed", "heads", "expert", ...; see
tml_jax.model.layers); the config's single rule table `config.sharding_rules` maps those
names to the mesh axes below, and `logical_to_spec` is the only code that applies it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tml_jax.config import BATCH_AXES, MESH_AXES, mesh_shape  # noqa: F401 (re-exported)
from tml_jax.microturn import TokenMeta



def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config.mesh, len(devices))
  arr = np.asarray(devices).reshape(tuple(shape[a] for a in MESH_AXES))
  return Mesh(arr, MESH_AXES)


def logical_to_spec(axes, rules, shape=None, mesh: Mesh | None = None) -> P:
  """Map logical names to mesh axes; a dimension the mesh axes do not divide is replicated
  (e.g. a 272-entry vocabulary over 8 tensor shards) instead of failing to compile."""
  table = dict(rules)
  out, used = [], set()
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    if mesh is not None and shape is not None:
      size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
      if shape[i] % size:
        targets = ()
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  batch = dict(batch)
  batch["meta"] = TokenMeta(*batch["meta"])
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
