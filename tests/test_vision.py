"""Patches and the synthetic video: round trips, errors, and annotations checked on the pixels."""

import numpy as np
import pytest

from tml_jax.vision import patches, synthetic


def test_patchify_layout_and_roundtrip():
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)
  p = patches.patchify(frame)
  assert p.shape == (6, 40 * 40 * 3) and p.dtype == np.uint8
  # Row-major: patch 3 is row 1, column 1; its pixels flatten as (y, x, channel).
  np.testing.assert_array_equal(p[3], frame[40:80, 40:80].reshape(-1))
  np.testing.assert_array_equal(patches.unpatchify(p, (120, 80)), frame)
  batch = rng.random((2, 5, 40, 120, 3)).astype(np.float32)
  pb = patches.patchify(batch)
  assert pb.shape == (2, 5, 3, 4800) and pb.dtype == np.float32
  np.testing.assert_array_equal(patches.unpatchify(pb, (40, 120)), batch)
  assert patches.num_patches((120, 80)) == 6


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match=r"size=\(100, 80\).*multiples of 40.*\(80, 80\)"):
    patches.resize_frame(np.zeros((10, 10, 3), np.uint8), (100, 80))
  with pytest.raises(ValueError, match=r"50x80 px.*resize_frame"):
    patches.patchify(np.zeros((50, 80, 3)))
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
    patches.patchify(np.zeros((80, 80)))
  with pytest.raises(ValueError, match="do not tile"):
    patches.unpatchify(np.zeros((3, 4800)), (80, 80))
  with pytest.raises(ValueError, match="multiples of 40"):
    synthetic.make_video(5, size=(64, 64))


def test_resize_preserves_content():
  # A constant frame stays constant; a horizontal ramp stays a monotone ramp; dtypes preserved.
  flat = np.full((37, 53, 3), 77, np.uint8)
  np.testing.assert_array_equal(patches.resize_frame(flat, (80, 120)), 77)
  np.testing.assert_array_equal(patches.resize_frame(flat, (40, 40)), 77)
  ramp = np.broadcast_to(np.linspace(0, 1, 300, dtype=np.float32)[None, :, None], (200, 300, 3))
  small = patches.resize_frame(ramp, (40, 80))
  assert small.dtype == np.float32 and small.shape == (40, 80, 3)
  assert np.all(np.diff(small[0, :, 0]) > 0)
  # Area averaging: shrinking by an integer factor is the mean of each block.
  x = np.random.default_rng(1).random((80, 160, 3))
  np.testing.assert_allclose(patches.resize_frame(x, (40, 80)),
                             x.reshape(40, 2, 80, 2, 3).mean(axis=(1, 3)), atol=1e-6)
  # Bilinear growth keeps the mean of a smooth image.
  big = patches.resize_frame(x[:40, :40], (80, 80))
  assert abs(big.mean() - x[:40, :40].mean()) < 0.01


def _pixels_of(frames, rgb):
  return np.all(frames == np.array(rgb, np.uint8), axis=-1)  # [N, H, W]


def test_same_seed_same_bytes_and_different_seed_differs():
  a, notes_a = synthetic.make_video(40, seed=7)
  b, notes_b = synthetic.make_video(40, seed=7)
  c, _ = synthetic.make_video(40, seed=8)
  assert a.tobytes() == b.tobytes() and notes_a == notes_b
  assert a.tobytes() != c.tobytes()
  assert a.shape == (40, 80, 80, 3) and a.dtype == np.uint8


def _check_against_pixels(frames, note):
  """Every annotation claim, re-derived from the frames alone."""
  # Placement keeps events apart whenever the frame has room (always, at the sizes and seeds
  # tested); an overlap would be annotated and could hide pixels, so it must not happen here.
  assert not note["overlaps"], note
  assert note["time_s"] == pytest.approx(note["chunk"] * 0.2)
  start = note["chunk"]
  if note["kind"] == "object_appears":
    seen_N = _pixels_of(frames, synthetic.COLORS[note["color"]]).sum(axis=(1, 2))
    assert not seen_N[:start].any() and np.all(seen_N[start:] > 20)
    # It stays put: the same pixels in every frame from its chunk on.
    mask = _pixels_of(frames[start:], synthetic.COLORS[note["color"]])
    assert np.all(mask == mask[0])
  elif note["kind"] == "person_enters":
    body_N = _pixels_of(frames, synthetic.CLOTHES[note["clothes"]]).sum(axis=(1, 2))
    assert not body_N[:start].any() and body_N[start] > 0
    # It walks in (growing) and then stands still from settle_chunk on.
    settle = note["settle_chunk"]
    assert np.all(np.diff(body_N[start:settle + 1]) > 0)
    assert np.all(body_N[settle:] == body_N[settle])
    assert _pixels_of(frames[settle:], synthetic.SKIN).any(axis=(1, 2)).all()
  elif note["kind"] == "bouncing":
    ball_NxHxW = _pixels_of(frames, synthetic.COLORS[note["color"]])
    visible_N = ball_NxHxW.any(axis=(1, 2))
    assert np.flatnonzero(visible_N).tolist() == list(range(start, note["end_chunk"] + 1))
    # Direction changes of the centroid, counted from the pixels alone.
    idx = np.flatnonzero(visible_N)
    along = 1 if note["axis"] == "horizontal" else 0
    coord = np.array([np.nonzero(ball_NxHxW[t])[along].mean() for t in idx])
    step = np.sign(np.diff(coord))
    assert np.all(step != 0)
    reversals = idx[1:-1][step[1:] != step[:-1]]
    assert len(reversals) == note["count"]
    assert reversals.tolist() == note["bounce_chunks"]
    assert note["bounce_times_s"] == pytest.approx([c * 0.2 for c in note["bounce_chunks"]])
  else:
    raise AssertionError(f"unexpected kind in {note}")


@pytest.mark.parametrize("seed", range(6))
def test_annotations_match_the_pixels(seed):
  frames, notes = synthetic.make_video(60, size=(80, 120), seed=seed)
  assert sorted(n["kind"] for n in notes) == sorted(synthetic.KINDS)
  for note in notes:
    _check_against_pixels(frames, note)


def test_conversation_generator_events():
  # The schema tml_jax/data/conversation.py writes: times in seconds, irregular bounces.
  events = [{"kind": "bounce", "start_s": 0.5, "end_s": 3.1, "times": [1.3, 2.1, 3.1],
             "object": "ball", "color": "purple"},
            {"kind": "appear", "start_s": 0.7, "object": "star", "color": "green"}]
  frames, notes = synthetic.make_video(25, size=(80, 120), events=events, seed=3)
  by_kind = {n["kind"]: n for n in notes}
  assert by_kind["bouncing"]["bounce_chunks"] == [6, 10, 15]  # floor(t / 0.2)
  assert by_kind["bouncing"]["chunk"] == 2 and by_kind["bouncing"]["end_chunk"] == 20
  assert by_kind["object_appears"]["chunk"] == 3
  assert by_kind["object_appears"]["shape"] == "star"
  for note in notes:
    _check_against_pixels(frames, note)


def test_explicit_events_and_sampler():
  events = [{"kind": "bouncing", "chunk": 2, "period_chunks": 2, "count": 4, "color": "red",
             "axis": "horizontal"},
            {"kind": "object_appears", "chunk": 5, "color": "blue", "shape": "circle"}]
  frames, notes = synthetic.make_video(20, size=(80, 160), events=events, seed=0)
  by_kind = {n["kind"]: n for n in notes}
  assert by_kind["bouncing"]["bounce_chunks"] == [4, 6, 8, 10]
  assert by_kind["bouncing"]["end_chunk"] == 12
  assert by_kind["object_appears"]["shape"] == "circle"
  with pytest.raises(ValueError, match="last bounce is at chunk 19"):
    synthetic.make_video(20, events=[{"kind": "bouncing", "chunk": 3, "period_chunks": 4,
                                      "count": 4}])
  with pytest.raises(ValueError, match="one chunk apart"):
    synthetic.make_video(20, events=[{"kind": "bounce", "start_s": 0.5, "times": [1.0, 1.1]}])
  with pytest.raises(ValueError, match="unknown color 'chartreuse'"):
    synthetic.make_video(5, events=[{"kind": "object_appears", "chunk": 1, "color": "chartreuse"}])
  # A colour given explicitly is never drawn again for another event.
  given = [{"kind": "object_appears", "chunk": 1, "color": c} for c in list(synthetic.COLORS)[:-1]]
  _, notes = synthetic.make_video(8, size=(200, 200), events=given + [
      {"kind": "object_appears", "chunk": 2}], seed=0)
  assert notes[-1]["color"] == list(synthetic.COLORS)[-1]
  rng = np.random.default_rng(0)
  for _ in range(20):
    evs = synthetic.sample_video_events(rng, 4.0, ("bouncing", "bouncing", "object_appears"))
    assert [e["kind"] for e in evs].count("bouncing") == 2
    for e in evs:
      end = e["chunk"] + (e["period_chunks"] * (e["count"] + 1) if e["kind"] == "bouncing" else 0)
      assert 1 <= e["chunk"] and end < 20
  with pytest.raises(ValueError, match="too short"):
    synthetic.sample_video_events(rng, 0.6, ("bouncing",))
  with pytest.raises(ValueError, match="unknown event kind"):
    synthetic.sample_video_events(rng, 4.0, ("explosion",))
