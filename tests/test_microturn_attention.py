"""kernels_pallas.microturn_attention against its plain-jnp reference (forward and backward).

`MicroturnAttentionTest` runs the compiled kernels (GPU / TPU only); the
`MicroturnAttentionInterpretTest` subclass runs the same tests in interpret mode on CPU.
Every test draws fresh random inputs; the seed is in every failure message and
`MICROTURN_SEED=<seed>` replays it.
"""

import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kernels_pallas import microturn_attention as mta
from kernels_pallas.microturn_attention import api as mta_api
from tml_jax.microturn import ChunkLayout, TokenMeta, microturn_mask

jax.config.update("jax_numpy_rank_promotion", "raise")

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference magnitude


def _fresh_rng():
  seed = int(os.environ.get("MICROTURN_SEED", np.random.SeedSequence().entropy % 2**32))
  return np.random.default_rng(seed), seed


def random_meta(rng, batch: int, *, max_chunks: int = 6, dropout: bool = True,
                prefix: bool | None = None):
  """A packed row: random slot counts, optional prefix, random docs and invalid chunks."""
  counts = [int(rng.integers(lo, hi + 1)) for lo, hi in
            ((0, 4), (0, 3), (0, 2), (0, 3), (1, 4), (0, 3))]
  use_prefix = rng.random() < 0.6 if prefix is None else prefix
  layout = ChunkLayout(*counts, prefix=int(rng.integers(1, 5)) if use_prefix else 0)
  chunks = int(rng.integers(2, max_chunks + 1))
  doc_BC = np.cumsum(rng.random((batch, chunks)) < 0.3, axis=1).astype(np.int32)
  valid_BC = rng.random((batch, chunks)) > 0.2
  valid_BL = rng.random((batch, layout.seq_len(chunks))) > 0.1 if dropout else None
  return layout.meta(chunks, batch, doc_BC=doc_BC, valid_BC=valid_BC, valid_BL=valid_BL)


def _assert_close(test, got, want, dtype, seed, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  test.assertFalse(np.isnan(got).any(), f"{what}: NaN (seed={seed})")
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  test.assertLessEqual(err, TOL[dtype] * scale, f"{what}: max error {err:.3g}, scale "
                       f"{scale:.3g}, dtype {jnp.dtype(dtype).name} (seed={seed})")


class MicroturnAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
      self.skipTest("compiled Pallas kernels need a GPU or TPU; see the Interpret subclass")
    self.rng, self.seed = _fresh_rng()

  def _qkv(self, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    draw = lambda *shape: jnp.asarray(self.rng.standard_normal(shape), jnp.float32).astype(dtype)
    return (draw(batch, q_len, heads, head_dim), draw(batch, kv_len, kv_heads, head_dim),
            draw(batch, kv_len, kv_heads, head_dim))

  @parameterized.named_parameters(
      dict(testcase_name="f32_unbounded_mha", window=None, heads=4, kv_heads=4,
           dtype=jnp.float32, blocks=(16, 16, None, None)),
      dict(testcase_name="f32_window_gqa", window=2, heads=4, kv_heads=2,
           dtype=jnp.float32, blocks=(16, 32, 32, 16)),
      dict(testcase_name="f32_window1_mqa", window=1, heads=4, kv_heads=1,
           dtype=jnp.float32, blocks=(32, 16, None, None)),
      dict(testcase_name="bf16_window_gqa", window=3, heads=4, kv_heads=2,
           dtype=jnp.bfloat16, blocks=(16, 16, None, None)),
      dict(testcase_name="bf16_unbounded_mqa", window=None, heads=4, kv_heads=1,
           dtype=jnp.bfloat16, blocks=(32, 32, 16, 16)),
  )
  def test_forward_and_gradients(self, window, heads, kv_heads, dtype, blocks):
    meta = random_meta(self.rng, batch=2)
    length = meta.chunk.shape[1]
    q, k, v = self._qkv(2, length, length, heads, kv_heads, 16, dtype)
    w = jnp.asarray(self.rng.standard_normal(q.shape), jnp.float32)
    bs = mta.BlockSizes(*blocks)
    kernel = functools.partial(mta.microturn_attention, window=window, block_sizes=bs,
                               interpret=self.INTERPRET)
    reference = functools.partial(mta.microturn_attention_reference, window=window)

    def loss(fn, q, k, v):
      o = fn(q, k, v, meta, meta)
      return jnp.sum(o.astype(jnp.float32) * w), o

    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), (0, 1, 2), has_aux=True))
    (dq, dk, dv), o = grad(kernel)(q, k, v)
    # The reference runs in float32 on the same (possibly bf16-rounded) inputs.
    f32 = lambda x: x.astype(jnp.float32)
    (rq, rk, rv), ro = grad(reference)(f32(q), f32(k), f32(v))
    msg = f"L={length} window={window} blocks={blocks}"
    self.assertEqual(o.dtype, dtype)
    _assert_close(self, o, ro, dtype, self.seed, f"output {msg}")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
      self.assertEqual(got.shape, want.shape)
      _assert_close(self, got, want, dtype, self.seed, f"{name} {msg}")

  def test_block_schedule_visits_exactly_the_visible_blocks(self):
    # Rows are padded to one length so each (window, blocks) setting compiles once.
    length = 208
    schedule = jax.jit(mta.block_schedule, static_argnums=(2, 3, 4))
    for trial in range(16):
      meta = mta.pad_meta(random_meta(self.rng, batch=2, max_chunks=10), length)
      window = (None, 1, 2, 4)[trial % 4]
      bq, bk = ((8, 8), (16, 8), (8, 32), (4, 16))[trial % 4]
      sched = schedule(meta, meta, window, bq, bk)
      tq, tk = -(-length // bq) * bq, -(-length // bk) * bk
      dense = np.asarray(microturn_mask(mta.pad_meta(meta, tq), mta.pad_meta(meta, tk),
                                        window)).reshape(2, tq // bq, bq, tk // bk, bk)
      want = np.where(dense.all((2, 4)), mta.FULL,
                      np.where(dense.any((2, 4)), mta.PARTIAL, mta.SKIP))
      msg = f"trial {trial} window={window} blocks={(bq, bk)} seed={self.seed}"
      np.testing.assert_array_equal(sched.block_flag, want, err_msg=msg)
      # The visit lists enumerate exactly the non-skipped blocks, in order, with their flags.
      index, flag, count = map(np.asarray, (sched.kv_index, sched.kv_flag, sched.num_visits))
      for b in range(2):
        for i in range(tq // bq):
          visited = np.flatnonzero(want[b, i])
          self.assertEqual(count[b, i], len(visited), msg)
          np.testing.assert_array_equal(index[b, i, :len(visited)], visited, err_msg=msg)
          np.testing.assert_array_equal(flag[b, i, :len(visited)], want[b, i, visited],
                                        err_msg=msg)
          self.assertTrue((flag[b, i, len(visited):] == mta.SKIP).all(), msg)
          if len(visited):  # padding repeats the last block: no new copy on TPU
            self.assertTrue((index[b, i, len(visited):] == visited[-1]).all(), msg)

  def test_block_schedule_is_sound_on_unsorted_metadata(self):
    # A ring-buffer cache holds chunks in any order: the schedule may visit extra blocks
    # but must never skip a visible one nor call a block full that is not.
    meta = random_meta(self.rng, batch=2, max_chunks=8)
    perm = self.rng.permutation(meta.chunk.shape[1])
    kv_meta = TokenMeta(*(np.asarray(f)[:, perm] for f in meta))
    sched = jax.jit(mta.block_schedule, static_argnums=(2, 3, 4))(meta, kv_meta, 3, 8, 8)
    length = meta.chunk.shape[1]
    tq = -(-length // 8) * 8
    dense = np.asarray(microturn_mask(mta.pad_meta(meta, tq), mta.pad_meta(kv_meta, tq), 3))
    dense = dense.reshape(2, tq // 8, 8, tq // 8, 8)
    flag = np.asarray(sched.block_flag)
    msg = f"seed={self.seed}"
    self.assertTrue((flag[dense.any((2, 4))] > 0).all(), msg)
    self.assertTrue(dense.all((2, 4))[flag == mta.FULL].all(), msg)

  def test_empty_rows_are_zero_without_nan(self):
    meta = random_meta(self.rng, batch=1, dropout=False, prefix=False)
    length = meta.chunk.shape[1]
    q_valid = np.array(meta.valid)
    q_valid[:, ::3] = False  # invalid queries see nothing
    q_doc = np.where(np.arange(length) % 3 == 1, 99, meta.doc)  # a doc with no keys
    q_meta = meta._replace(valid=q_valid, doc=q_doc.astype(np.int32))
    empty = ~np.asarray(microturn_mask(q_meta, meta, 2)).any(-1)[0]
    self.assertTrue(empty.any())
    q, k, v = self._qkv(1, length, length, 2, 1, 16, jnp.float32)
    fn = lambda q, k, v: mta.microturn_attention(
        q, k, v, q_meta, meta, window=2, block_sizes=mta.BlockSizes(16, 16),
        interpret=self.INTERPRET)
    o, (dq, dk, dv) = jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(
        lambda *a: jnp.sum(fn(*a)), (0, 1, 2))(q, k, v)))(q, k, v)
    for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
      self.assertFalse(np.isnan(np.asarray(x)).any(), f"{name} has NaN (seed={self.seed})")
    np.testing.assert_array_equal(np.asarray(o)[0, empty], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[0, empty], 0.0)
    _assert_close(self, o, mta.microturn_attention_reference(q, k, v, q_meta, meta, window=2),
                  jnp.float32, self.seed, "output with empty rows")

  def test_decode_on_shuffled_ring_cache(self):
    window, chunks = 3, 6
    layout = ChunkLayout(2, 2, 1, 2, 3, 2, prefix=2)
    meta = layout.meta(chunks, batch=1)
    length, K, P = meta.chunk.shape[1], layout.chunk_len, layout.prefix
    q, k, v = self._qkv(1, length, length, 4, 2, 16, jnp.float32)
    want = mta.microturn_attention_reference(q, k, v, meta, meta, window=window)[:, -K:]
    # Ring cache: prefix + the last `window` chunks in shuffled chunk order, plus one unused
    # chunk-sized hole whose stale contents must be ignored.
    chunk_rows = [np.arange(P + c * K, P + (c + 1) * K) for c in range(chunks - window, chunks)]
    slots = [np.arange(P)] + [chunk_rows[i] for i in self.rng.permutation(window)]
    rows = np.concatenate(slots + [np.arange(P, P + K)])  # the hole holds stale chunk 0
    cache_meta = TokenMeta(*(np.asarray(f)[:, rows] for f in meta))
    cache_meta = cache_meta._replace(valid=np.concatenate(
        [np.ones((1, rows.size - K), bool), np.zeros((1, K), bool)], axis=1))
    decode = jax.jit(functools.partial(
        mta.microturn_attention_decode, window=window, block_sizes=mta.BlockSizes(16, 16),
        interpret=self.INTERPRET))
    got = decode(q[:, -K:], k[:, rows], v[:, rows], meta.slice(length - K, length), cache_meta)
    _assert_close(self, got, want, jnp.float32, self.seed, "decode")


  def test_max_kv_blocks_bounds_the_visit_lists(self):
    meta = random_meta(self.rng, batch=1, max_chunks=8, prefix=False)
    length = meta.chunk.shape[1]
    q, k, v = self._qkv(1, length, length, 2, 1, 16, jnp.float32)
    widest = int(np.asarray(mta.block_schedule(meta, meta, 2, 16, 16).num_visits).max())
    run = lambda bound: jax.jit(functools.partial(
        mta.microturn_attention, window=2, interpret=self.INTERPRET,
        block_sizes=mta.BlockSizes(16, 16, max_kv_blocks=bound)))(q, k, v, meta, meta)
    want = mta.microturn_attention_reference(q, k, v, meta, meta, window=2)
    _assert_close(self, run(widest), want, jnp.float32, self.seed, f"bound {widest}")
    if widest > 1:  # too small a bound must be loud, not silently wrong
      self.assertTrue(np.isnan(np.asarray(run(widest - 1))).all(), f"seed={self.seed}")


class MicroturnAttentionInterpretTest(MicroturnAttentionTest):
  INTERPRET = True

  def test_tpu_kernels_in_tpu_interpreter(self):
    # The Mosaic kernels (scalar-prefetch schedule, visit axis in the grid) under Pallas'
    # TPU interpreter: same numerics contract as the Triton/interpret kernels.
    meta = random_meta(self.rng, batch=1, max_chunks=10)
    length = meta.chunk.shape[1]
    q, k, v = self._qkv(1, length, length, 2, 1, 32, jnp.float32)
    w = jnp.asarray(self.rng.standard_normal(q.shape), jnp.float32)
    loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v, meta, meta, window=2) * w)
    with mock.patch.object(mta_api, "select_backend", lambda interpret: "mosaic_interpret"):
      got = jax.jit(jax.value_and_grad(functools.partial(loss, mta.microturn_attention),
                                       (0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(functools.partial(loss, mta.microturn_attention_reference),
                              (0, 1, 2))(q, k, v)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got),
                          jax.tree.leaves(want)):
      _assert_close(self, a, b, jnp.float32, self.seed, f"mosaic interpret {name} L={length}")

  @parameterized.named_parameters(("triton_h100", "triton", "cuda", "NVIDIA H100 80GB HBM3"),
                                  ("mosaic_v5e", "mosaic", "tpu", "TPU v5 lite"))
  def test_kernels_lower_for_accelerators(self, backend, platform, device_kind):
    # Lowers forward and backward to Triton / Mosaic IR on this CPU (no accelerator
    # compile): catches block-shape, dtype and primitive-support errors in CI.
    meta = ChunkLayout().meta(12, 1)
    length = meta.chunk.shape[1]
    q = jnp.zeros((1, length, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, length, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(mta.microturn_attention(
        q, k, v, meta, meta, window=5).astype(jnp.float32))
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                         platform="gpu" if platform == "cuda" else "tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with mock.patch.object(mta_api, "select_backend", lambda interpret: backend), \
        jax.sharding.use_abstract_mesh(mesh):
      text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(
          lowering_platforms=(platform,)).as_text()
    target = "xla.gpu.triton" if backend == "triton" else "tpu_custom_call"
    self.assertEqual(text.count(target), 3, "expected forward, dQ and dK/dV kernels")

  def test_cpu_without_interpret_flag_runs_interpreted(self):
    if jax.default_backend() != "cpu":
      self.skipTest("CPU-only fallback")
    meta = random_meta(self.rng, batch=1, max_chunks=3)
    length = meta.chunk.shape[1]
    q, k, v = self._qkv(1, length, length, 2, 2, 16, jnp.float32)
    got = jax.jit(functools.partial(mta.microturn_attention, window=None))(q, k, v, meta, meta)
    want = mta.microturn_attention_reference(q, k, v, meta, meta, window=None)
    _assert_close(self, got, want, jnp.float32, self.seed, "cpu default")


if __name__ == "__main__":
  absltest.main()
