"""gmm / tgmm against their plain-jnp references, forward and backward, every backend.

The 'triton' and 'mosaic' kernels run in Pallas interpret mode on CPU (GmmInterpretTest);
'xla' is the CPU default. Shapes are small and not block-aligned on purpose: groups
start mid-tile, one group is empty, rows past sum(group_sizes) must come out zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import gmm as gmm_lib



TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference entry
# Small tiles so the few rows below span several tiles, k-steps and n-tiles.
BLOCKS = {"triton": gmm_lib.BlockSizes(block_m=16, block_k=16, block_n=16),
          "mosaic": gmm_lib.BlockSizes(block_m=16, block_k=16, block_n=32),
          "xla": gmm_lib.BlockSizes(block_m=16), "ragged_dot": None}


def _close(actual, expected, dtype, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(float(np.abs(expected).max()), 1.0)
  err = float(np.abs(actual - expected).max())
  assert err <= TOL[dtype] * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def _inputs(seed, m, k, n, group_sizes, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(keys[1], (len(group_sizes), k, n), jnp.float32).astype(dtype)
  cot = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), cot


def _check_fwd_bwd(backend, dtype, m, k, n, group_sizes, seed):
  lhs, rhs, gs, cot = _inputs(seed, m, k, n, group_sizes, dtype)
  fn = lambda a, b: gmm_lib.gmm(a, b, gs, backend=backend, interpret=True,
                                block_sizes=BLOCKS[backend])
  out, vjp = jax.vjp(fn, lhs, rhs)
  ref, ref_vjp = jax.vjp(lambda a, b: gmm_lib.gmm_reference(a, b, gs), lhs, rhs)
  assert out.shape == (m, n) and out.dtype == dtype
  _close(out, ref, dtype, f"{backend} gmm forward")
  total = int(np.sum(group_sizes))
  assert not np.any(np.asarray(out[total:], np.float32)), "rows past sum(group_sizes) not zero"
  for got, want, name in zip(vjp(cot), ref_vjp(cot), ("d lhs", "d rhs")):
    assert got.dtype == want.dtype
    _close(got, want, dtype, f"{backend} gmm {name}")


class GmmTest:
  backend = "xla"

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_forward_backward_unaligned_empty_tail(self, dtype):
    # 67 rows: groups of 13, 0, 30, 1, 19 (sum 63) and 4 tail rows; k=40, n=44 are not
    # multiples of 16/32, so edge windows are clamped and masked.
    _check_fwd_bwd(self.backend, dtype, 67, 40, 44, [13, 0, 30, 1, 19], seed=0)

  def test_extreme_group_sizes(self):
    # Everything in the last expert; then nothing routed at all (output all zeros).
    for seed, sizes in enumerate(([0, 0, 0, 37], [0, 0, 0, 0])):
      lhs, rhs, gs, _ = _inputs(seed + 1, 37, 24, 20, sizes, jnp.float32)
      out = gmm_lib.gmm(lhs, rhs, gs, backend=self.backend, interpret=True,
                        block_sizes=BLOCKS[self.backend])
      _close(out, gmm_lib.gmm_reference(lhs, rhs, gs), jnp.float32, f"sizes {sizes}")

  def test_tgmm_matches_reference_and_empty_groups_are_zero(self):
    lhs, _, gs, grad = _inputs(3, 50, 24, 40, [0, 21, 0, 17, 0], jnp.float32)
    out = gmm_lib.tgmm(lhs, grad, gs, backend=self.backend, interpret=True,
                       block_sizes=BLOCKS[self.backend])
    assert out.shape == (5, 24, 40)
    _close(out, gmm_lib.tgmm_reference(lhs, grad, gs), jnp.float32, "tgmm")
    assert not np.any(np.asarray(out)[[0, 2, 4]])


class TestGmmXla(GmmTest):
  backend = "xla"

  def test_reference_is_ragged_dot(self):
    lhs, rhs, gs, _ = _inputs(4, 30, 8, 12, [5, 0, 20], jnp.float32)
    _close(gmm_lib.gmm_reference(lhs, rhs, gs), jax.lax.ragged_dot(lhs, rhs, gs),
           jnp.float32, "reference vs ragged_dot")

  def test_cpu_default_jits_and_equals_ragged_dot(self):
    lhs, rhs, gs, _ = _inputs(5, 300, 8, 12, [50, 0, 200], jnp.float32)
    out = jax.jit(gmm_lib.gmm)(lhs, rhs, gs)  # 'xla' with its default 256-row tiles
    _close(out, jax.lax.ragged_dot(lhs, rhs, gs), jnp.float32, "default vs ragged_dot")

  def test_bad_shapes_fail_clearly(self):
    with pytest.raises(ValueError, match="disagree"):
      gmm_lib.gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.array([2, 2]))


class TestGmmRaggedDot(GmmTest):
  backend = "ragged_dot"


class TestGmmTritonInterpret(GmmTest):
  backend = "triton"


class TestGmmMosaicInterpret(GmmTest):
  backend = "mosaic"


def test_schedule_covers_every_row_once():
  """The Triton schedule: each row of [0, m) lies in exactly one live tile, of its group."""
  sizes = jnp.array([5, 0, 16, 1, 0, 33], jnp.int32)
  m, tm = 64, 16
  grp, start, end = gmm_lib.row_tile_schedule(sizes, m, tm)
  grp, start, end = map(np.asarray, (grp, start, end))
  assert len(grp) == m // tm + len(sizes)
  owner = np.full(m, -1)
  for g_, s, e in zip(grp, start, end):
    if g_ > len(sizes):
      continue
    assert 0 < e - s <= tm
    assert np.all(owner[s:e] == -1), "row covered twice"
    owner[s:e] = g_
  expected = np.searchsorted(np.cumsum(sizes), np.arange(m), side="right")
  np.testing.assert_array_equal(owner, expected)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(platform):
  """Forward and backward lower to Triton / Mosaic IR here (no device: nothing runs)."""
  from jax._src import mesh as mesh_lib  # AbstractDevice: the documented AOT-target hook
  kind, backend = {"cuda": ("NVIDIA H100 80GB HBM3", "triton"),
                   "tpu": ("TPU v5 lite", "mosaic")}[platform]
  device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=1,
                                   platform="gpu" if platform == "cuda" else "tpu")
  mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
  sds = jax.ShapeDtypeStruct
  args = (sds((1000, 256), jnp.bfloat16), sds((4, 256, 384), jnp.bfloat16),
          sds((4,), jnp.int32))
  loss = lambda a, b, s: jnp.sum(gmm_lib.gmm(a, b, s, backend=backend).astype(jnp.float32))
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
  assert text.count("stablehlo.custom_call") == 3  # gmm, gmm(transposed), tgmm
