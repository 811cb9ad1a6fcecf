"""attention.per_shard (how Pallas attention runs on a GPU/TPU mesh) equals the unsharded
attention, outputs and gradients, on meshes of 8 simulated CPU devices. The kernel inside
is the dense reference, so the check is of the shard_map's specs, not of a kernel.

XLA_FLAGS must be set before jax is imported: the check runs this file as a subprocess.
"""

import json
import os
import subprocess
import sys

MESHES = [(2, 2, 2, 1), (1, 2, 1, 4), (8, 1, 1, 1), (1, 1, 2, 4)]
EXPLICIT = (1, 1, 2, 4)  # this one with Explicit axis types (sharding in types), others Auto


def _main():
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tml_jax.batch import random_batch
  from tml_jax.microturn import ChunkLayout, TokenMeta
  from tml_jax.model.attention import dense_attention, per_shard

  lay = ChunkLayout(user_audio=2, self_audio=2, video=0, text_in=1, model_text=2, model_audio=1,
                    prefix=0, window=3)
  rng = np.random.default_rng(int(sys.argv[1]))
  B, C, H, K, D = 8, 6, 8, 4, 16
  meta = TokenMeta(*map(jnp.asarray, random_batch(lay, batch=B, num_chunks=C, num_docs=2,
                                                  seed=int(rng.integers(1 << 30)))["meta"]))
  L = meta.segment.shape[1]
  q, k, v, cot = (jnp.asarray(rng.normal(size=s), jnp.float32)
                  for s in ((B, L, H, D), (B, L, K, D), (B, L, K, D), (B, L, H, D)))
  attend = functools.partial(dense_attention, window=lay.window)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, meta, meta) * cot)
  ref = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
  ref_y = attend(q, k, v, meta, meta)
  for shape in MESHES:
    kind = jax.sharding.AxisType.Explicit if shape == EXPLICIT else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh(shape, ("data", "fsdp", "expert", "tensor"), axis_types=(kind,) * 4)
    sharded = lambda q, k, v, qm, km: per_shard(dense_attention, q, k, v, qm, km,
                                                 window=lay.window, force=True)
    with jax.set_mesh(mesh):
      y = jax.jit(sharded)(q, k, v, meta, meta)
      g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    diffs = [float(jnp.max(jnp.abs(y - ref_y)))] + [float(jnp.max(jnp.abs(a - b)))
                                                     for a, b in zip(g, ref)]
    print(json.dumps({"mesh": shape, "diffs": diffs}), flush=True)


def test_per_shard_attention_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")  # tests/conftest.py's
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  seed = int.from_bytes(os.urandom(4), "little")
  p = subprocess.run([sys.executable, os.path.abspath(__file__), str(seed)], env=env, cwd=root,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
  assert [tuple(r["mesh"]) for r in rows] == MESHES
  for r in rows:
    assert max(r["diffs"]) < 1e-4, (seed, r)


if __name__ == "__main__":
  _main()
