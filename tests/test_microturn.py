"""The micro-turn layout and its reference mask (docs/design.md §4)."""

import itertools

import numpy as np
import pytest

from tml_jax.microturn import (ChunkLayout, Segment, TokenMeta, frames_per_chunk, microturn_mask,
                            render_mask_png)

OBS = {0, 1, 2, 3, 6}


def brute_force_mask(q: TokenMeta, k: TokenMeta, window):
  """docs/design.md §4 read literally, one (q, k) pair at a time."""
  B, Lq, Lk = q.chunk.shape[0], q.chunk.shape[1], k.chunk.shape[1]
  out = np.zeros((B, Lq, Lk), bool)
  for b, i, j in itertools.product(range(B), range(Lq), range(Lk)):
    if q.doc[b, i] != k.doc[b, j] or not (q.valid[b, i] and k.valid[b, j]):
      continue
    cq, ck = q.chunk[b, i], k.chunk[b, j]
    sq, sk = q.segment[b, i], k.segment[b, j]
    rule1 = ck < cq and (window is None or cq - ck < window)
    rule2 = ck == cq and sk in OBS
    rule3 = ck == cq and sq not in OBS and sk not in OBS and k.slot[b, j] <= q.slot[b, i]
    rule4 = sk == Segment.PREFIX
    out[b, i, j] = rule1 or rule2 or rule3 or rule4
  return out


def random_layout(rng):
  return ChunkLayout(user_audio=int(rng.integers(0, 3)), self_audio=int(rng.integers(0, 3)),
                     video=int(rng.integers(0, 3)), text_in=int(rng.integers(0, 3)),
                     model_text=int(rng.integers(1, 4)), model_audio=int(rng.integers(1, 3)),
                     prefix=int(rng.integers(0, 3)))


def random_meta(rng, lay, batch, chunks):
  doc = np.cumsum(rng.random((batch, chunks)) < 0.25, axis=1).astype(np.int32)
  valid = rng.random((batch, chunks)) > 0.15
  valid_BL = rng.random((batch, lay.seq_len(chunks))) > 0.05
  return lay.meta(chunks, batch=batch, doc_BC=doc, valid_BC=valid, valid_BL=valid_BL)


@pytest.mark.parametrize("window", [None, 1, 2, 3])
def test_mask_matches_brute_force(rng, window):
  for _ in range(3):
    lay = random_layout(rng)
    meta = random_meta(rng, lay, batch=2, chunks=int(rng.integers(1, 6)))
    np.testing.assert_array_equal(np.asarray(microturn_mask(meta, meta, window)),
                                  brute_force_mask(meta, meta, window))


def test_mask_cross_lengths(rng):
  """Queries of one chunk against a longer key sequence (the decode shape)."""
  lay = random_layout(rng)
  kv = random_meta(rng, lay, batch=1, chunks=5)
  q = kv.slice(lay.seq_len(4), lay.seq_len(5))
  np.testing.assert_array_equal(np.asarray(microturn_mask(q, kv, 2)),
                                brute_force_mask(q, kv, 2))


def test_mask_properties(rng):
  lay = ChunkLayout(prefix=3)
  C, W = 10, 3
  meta = random_meta(rng, lay, batch=3, chunks=C)
  m = np.asarray(microturn_mask(meta, meta, W))
  q = {f: np.asarray(v)[:, :, None] for f, v in meta._asdict().items()}
  k = {f: np.asarray(v)[:, None, :] for f, v in meta._asdict().items()}
  is_obs = lambda s: np.isin(s, list(OBS))
  # Observations never see the same chunk's predictions.
  assert not np.any(m & is_obs(q["segment"]) & ~is_obs(k["segment"]) & (q["chunk"] == k["chunk"]))
  # No key from the future, and none beyond the window except the prefix.
  assert not np.any(m & (k["chunk"] > q["chunk"]))
  far = (q["chunk"] - k["chunk"] >= W) & (k["segment"] != Segment.PREFIX)
  assert not np.any(m & far)
  # Documents are isolated; padding sees nothing and is seen by nothing.
  assert not np.any(m & (q["doc"] != k["doc"]))
  assert not np.any(m & ~(q["valid"] & k["valid"]))
  # Prefix is visible from every valid token of its document whatever the distance.
  pre = (k["segment"] == Segment.PREFIX) & (q["doc"] == k["doc"]) & q["valid"] & k["valid"]
  assert np.all(m[np.broadcast_to(pre, m.shape)])
  # Every valid token sees itself.
  diag = np.diagonal(m, axis1=1, axis2=2)
  np.testing.assert_array_equal(diag, np.asarray(meta.valid))


def test_pack_unpack_roundtrip(rng):
  lay = ChunkLayout(user_audio=2, self_audio=1, video=0, text_in=2, model_text=3,
                    model_audio=2, prefix=2)
  B, C, D = 2, 4, 5
  streams = {s: rng.normal(size=(B, C, lay.slots(s), D)) for s in
             (Segment.USER_AUDIO, Segment.SELF_AUDIO, Segment.TEXT_IN, Segment.MODEL_TEXT,
              Segment.MODEL_AUDIO)}
  streams[Segment.PREFIX] = rng.normal(size=(B, lay.prefix, D))
  flat = np.asarray(lay.pack(streams))
  assert flat.shape == (B, lay.seq_len(C), D)
  meta = lay.meta(C, batch=B)
  for s, x in streams.items():
    np.testing.assert_allclose(np.asarray(lay.unpack(flat, s)), x)
    # The metadata says the same thing as the packing.
    if s != Segment.PREFIX:
      seg = np.asarray(lay.unpack(meta.segment[..., None], s))[..., 0]
      chunk = np.asarray(lay.unpack(meta.chunk[..., None], s))[..., 0]
      assert np.all(seg == int(s))
      np.testing.assert_array_equal(chunk, np.broadcast_to(np.arange(C)[None, :, None],
                                                           chunk.shape))


def test_frames_per_chunk():
  assert frames_per_chunk(200, 16000, 400) == 8
  assert frames_per_chunk(100, 16000, 400) == 4
  assert frames_per_chunk(400, 16000, 400) == 16
  with pytest.raises(ValueError, match="chunk_ms=130"):
    frames_per_chunk(130, 16000, 400)


def test_render_mask(tmp_path):
  lay = ChunkLayout(prefix=2)
  meta = lay.meta(4, doc_BC=np.array([[0, 0, 1, 1]]))
  path = render_mask_png(meta, 2, str(tmp_path / "mask.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
