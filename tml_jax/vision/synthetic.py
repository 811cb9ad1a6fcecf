"""Synthetic video for the visual scenarios (docs/design.md §6): one frame per micro-turn chunk, with
exact annotations of what happens when, so that data can ask "tell me when something appears"
or "count the bounces" and check the answer.

Events:
  object_appears  a flat-coloured shape (named colour and shape) appears and stays.
  bouncing        a ball moves back and forth between two walls and then vanishes; every bounce
                  lands exactly on a frame, so a bounce is a visible reversal between frames and
                  the annotated count equals the direction changes in the pixels.
  person_enters   a simple figure (skin-coloured head, clothed body) walks in from one side.
The background is a noisy two-tone gradient whose brightness drifts slowly. Object and person
colours lie outside the background's value range, so an exact colour match finds them.

Time: frame t is the picture of chunk t, as of its end, so something that happens at time s is
first visible in the frame of the chunk that contains s (floor(s / chunk_s)), just as the audio
of that moment is in that chunk's dMel frames.

Event dicts may give times in chunks ("chunk", "bounce_chunks") or in seconds ("start_s",
"bounce_times_s"); the conversation generator's names ("appear", "bounce", "times", "object")
are accepted too (`_ALIASES`).

Shape legend: N chunks (= frames), H, W frame size.
"""

from __future__ import annotations

import numpy as np

from tml_jax.vision.patches import _check_size

KINDS = ("object_appears", "bouncing", "person_enters")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "magenta": (200, 50, 200), "cyan": (40, 200, 210),
    "orange": (245, 140, 30), "white": (250, 250, 250), "purple": (120, 40, 170),
}
SHAPES = ("square", "circle", "triangle", "diamond", "star")
SKIN = (225, 175, 140)
CLOTHES = {"brown": (90, 55, 30), "black": (25, 25, 25), "navy": (20, 30, 90)}
# Background values stay inside [70, 185] per channel (base colours +-10% lighting +-4 sigma
# noise, clipped), and every colour above has a channel outside that range.
_BG_TOP, _BG_BOTTOM = np.array([140.0, 135.0, 125.0]), np.array([110.0, 100.0, 90.0])
_BG_RANGE = (70, 185)
_WALK_CHUNKS = 3  # a person takes 3 chunks (600 ms) to walk in
_ALIASES = {"appear": "object_appears", "bounce": "bouncing", "person": "person_enters"}


def _shape_mask(shape: str, cy: float, cx: float, r: float, size) -> np.ndarray:
  yy, xx = np.mgrid[:size[0], :size[1]]
  dy, dx = yy - cy, xx - cx
  if shape == "square":
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  if shape == "circle":
    return dy**2 + dx**2 <= r**2
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= r
  if shape == "triangle":  # apex up
    return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
  if shape == "star":  # five points, one up: the edge radius zig-zags between r and 0.45 r
    turn = (np.arctan2(dx, -dy) / (2 * np.pi) * 5) % 1.0
    return np.hypot(dy, dx) <= r * (0.45 + 0.55 * np.abs(2 * turn - 1))
  raise ValueError(f"unknown shape {shape!r}; pick one of {SHAPES}.")


def _person_mask(cx: float, size) -> tuple[np.ndarray, np.ndarray]:
  """(head, body) boolean masks [H, W] of a figure centred on column cx."""
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  head_r, body_w = 0.09 * h, 0.13 * w
  head = (yy - 0.3 * h)**2 + (xx - cx)**2 <= head_r**2
  body = (yy >= 0.3 * h + head_r) & (yy <= 0.95 * h) & (np.abs(xx - cx) <= body_w)
  return head, body


def sample_video_events(rng: np.random.Generator, duration_s: float, kinds=KINDS, *,
                        chunk_ms: int = 200) -> list[dict]:
  """One event per entry of `kinds` (repeat a kind to get several), each fitting the video.

  Returns partially specified events ({"kind", "chunk", ...}); `make_video` fills in the rest.
  """
  n = int(round(duration_s * 1000 / chunk_ms))
  events = []
  for kind in kinds:
    if kind == "object_appears":
      if n < 2:
        raise ValueError(f"duration_s={duration_s} is {n} chunks; object_appears needs >= 2.")
      events.append({"kind": kind, "chunk": int(rng.integers(1, n))})
    elif kind == "bouncing":
      period = int(rng.integers(2, 5))  # 400-800 ms per traversal
      max_count = (n - 2) // period - 1  # start >= 1 and the last wall frame inside the video
      if max_count < 1:
        raise ValueError(f"duration_s={duration_s} is {n} chunks, too short for a bouncing "
                         f"event ({2 * period + 2} chunks at least); make the video longer.")
      count = int(rng.integers(1, min(max_count, 6) + 1))
      start = int(rng.integers(1, n - period * (count + 1)))
      events.append({"kind": kind, "chunk": start, "period_chunks": period, "count": count})
    elif kind == "person_enters":
      if n < _WALK_CHUNKS + 2:
        raise ValueError(f"duration_s={duration_s} is {n} chunks; person_enters needs "
                         f">= {_WALK_CHUNKS + 2}.")
      events.append({"kind": kind, "chunk": int(rng.integers(1, n - _WALK_CHUNKS))})
    else:
      raise ValueError(f"unknown event kind {kind!r}; pick from {KINDS}.")
  return sorted(events, key=lambda e: e["chunk"])


class _Placer:
  """Rejection sampling of boxes that avoid each other, so no event hides another."""

  def __init__(self, rng, size):
    self.rng, self.size, self.boxes = rng, size, []

  def free(self, box) -> bool:
    y0, x0, y1, x1 = box
    return all(y1 < b[0] or b[2] < y0 or x1 < b[1] or b[3] < x0 for b in self.boxes)

  def take(self, box):
    self.boxes.append(box)

  def place(self, half_h: float, half_w: float, *, tries: int = 200):
    """Centre (cy, cx) of a free box with these half sizes, reserved; None if none was found."""
    h, w = self.size
    if 2 * half_h + 3 > h or 2 * half_w + 3 > w:
      return None
    for _ in range(tries):
      cy = self.rng.uniform(half_h + 1, h - half_h - 2)
      cx = self.rng.uniform(half_w + 1, w - half_w - 2)
      box = (cy - half_h, cx - half_w, cy + half_h, cx + half_w)
      if self.free(box):
        self.take(box)
        return cy, cx
    return None

  def place_anyway(self, half_h: float, half_w: float) -> tuple[float, float]:
    """A random centre that may overlap earlier boxes (crowded small frames)."""
    h, w = self.size
    return (self.rng.uniform(half_h + 1, h - half_h - 2), self.rng.uniform(half_w + 1,
                                                                           w - half_w - 2))


def _color(event, rng, used: set) -> str:
  """The event's colour name (given or drawn), never one another event of the video uses."""
  name = event.get("color")
  if name is not None and name not in COLORS:
    raise ValueError(f"event {event}: unknown color {name!r}; pick from {sorted(COLORS)}.")
  if name is None:
    free = [c for c in COLORS if c not in used]
    if not free:
      raise ValueError(f"more coloured events than colours ({len(COLORS)}); use fewer events.")
    name = free[int(rng.integers(len(free)))]
  used.add(name)
  return name


def _chunk_of(seconds: float, chunk_s: float) -> int:
  return int(np.floor(seconds / chunk_s + 1e-9))  # the epsilon keeps 0.6 / 0.2 at chunk 3


def _normalise(event: dict, num_chunks: int, chunk_s: float) -> dict:
  """Canonical kind and names, times in chunks (bouncing: start, bounce_chunks, end_chunk)."""
  e = dict(event)
  e["kind"] = _ALIASES.get(e.get("kind"), e.get("kind"))
  if e["kind"] not in KINDS:
    raise ValueError(f"event {event}: unknown event kind {event.get('kind')!r}; pick from "
                     f"{KINDS}.")
  if "chunk" not in e:
    if "start_s" not in e:
      raise ValueError(f"event {event} gives no start: add 'chunk' or 'start_s'.")
    e["chunk"] = _chunk_of(e["start_s"], chunk_s)
  start = e["chunk"] = int(e["chunk"])
  if not 0 <= start < num_chunks:
    raise ValueError(f"event {event} starts at chunk {start}, outside the video's "
                     f"{num_chunks} chunks.")
  if e["kind"] == "object_appears" and "shape" not in e and "object" in e:
    e["shape"] = e["object"]
  if e["kind"] != "bouncing":
    return e
  times = e.get("bounce_times_s", e.get("times"))
  if "bounce_chunks" in e:
    bounces = [int(c) for c in e["bounce_chunks"]]
  elif times is not None:
    bounces = [_chunk_of(t, chunk_s) for t in times]
  else:  # regular bouncing: every period_chunks, count times
    period = int(e.get("period_chunks", 3))
    count = int(e.get("count", max(1, (num_chunks - 1 - start) // period - 1)))
    bounces = [start + period * j for j in range(1, count + 1)]
  gaps = np.diff([start] + bounces)
  if not bounces or gaps.min() < 1:
    raise ValueError(f"bouncing event {event}: bounces at chunks {bounces} must be at least one "
                     f"chunk apart and after the start chunk {start} (one frame per chunk "
                     f"cannot show two bounces in one chunk); space them out.")
  # After the last bounce the ball crosses once more (as long as the previous crossing), then
  # vanishes: the reversal at the last bounce needs at least one later frame to be visible.
  end = min(int(e.get("end_chunk", bounces[-1] + gaps[-1])), num_chunks - 1)
  if end <= bounces[-1]:
    raise ValueError(f"bouncing event {event}: its last bounce is at chunk {bounces[-1]} but the "
                     f"video has {num_chunks} chunks; a bounce needs a later frame to be seen. "
                     f"Make the video longer or drop the last bounce.")
  e.update(bounce_chunks=bounces, end_chunk=end)
  return e


def make_video(num_chunks: int, size: tuple[int, int] = (80, 80), events=None, seed: int = 0,
               *, chunk_ms: int = 200) -> tuple[np.ndarray, list[dict]]:
  """Renders frames uint8 [N, H, W, 3] (frame t shows chunk t) and their annotations.

  `events`: a list of {"kind", "chunk", optional details} (see `sample_video_events`), or None to
  sample one event of each kind. Details not given (colour, shape, position, side, bounce
  period and count) are drawn from `seed`; the same arguments always give the same bytes.
  Annotations: one dict per event with kind, chunk (first frame it is visible in), time_s and
  its details; bouncing adds bounce_chunks, bounce_times_s, count and end_chunk (last visible
  frame); person_enters adds side, clothes and settle_chunk. "overlaps" is True only when a
  crowded frame left no free place, so the event may hide or be hidden by another.
  """
  h, w = _check_size(size)
  rng = np.random.default_rng(seed)
  chunk_s = chunk_ms / 1000
  if events is None:
    events = sample_video_events(rng, num_chunks * chunk_s, KINDS, chunk_ms=chunk_ms)
  events = [_normalise(e, num_chunks, chunk_s) for e in events]
  t_N = np.arange(num_chunks)

  # Background: vertical gradient x slow lighting drift + pixel noise.
  ramp_H = np.linspace(0, 1, h)[:, None]
  base_Hx3 = (1 - ramp_H) * _BG_TOP + ramp_H * _BG_BOTTOM  # [H, 3]
  light_N = 1 + 0.08 * np.sin(2 * np.pi * t_N / rng.uniform(20, 60) + rng.uniform(0, 2 * np.pi))
  # float32 and in place: a 5-minute 160x240 video is ~35M values per pass.
  frames = rng.standard_normal((num_chunks, h, w, 3), dtype=np.float32)
  frames *= 3.0
  frames += (light_N[:, None, None] * base_Hx3[None]).astype(np.float32)[:, :, None, :]
  np.clip(np.round(frames, out=frames), *_BG_RANGE, out=frames)
  frames_NxHxWx3 = frames.astype(np.uint8)

  placer, used_colors, annotations = _Placer(rng, (h, w)), set(), []
  # Draw order: people, then static objects, then balls; placement keeps them apart anyway.
  order = {"person_enters": 0, "object_appears": 1, "bouncing": 2}
  for event in sorted(events, key=lambda e: order.get(e["kind"], 3)):
    kind, start = event["kind"], event["chunk"]
    note = {"kind": kind, "chunk": start, "time_s": round(start * chunk_s, 6)}
    if kind == "object_appears":
      r = 0.1 * min(h, w)
      color = _color(event, rng, used_colors)
      shape = event.get("shape") or SHAPES[int(rng.integers(len(SHAPES)))]
      if shape not in SHAPES:
        raise ValueError(f"event {event}: unknown shape {shape!r}; pick from {SHAPES}.")
      spot = placer.place(r, r)
      note["overlaps"] = spot is None
      cy, cx = spot or placer.place_anyway(r, r)
      mask_HxW = _shape_mask(shape, cy, cx, r, (h, w))
      frames_NxHxWx3[start:, mask_HxW] = COLORS[color]
      note.update(color=color, shape=shape, center_yx=(round(cy, 1), round(cx, 1)))
    elif kind == "bouncing":
      note.update(_draw_bouncing(frames_NxHxWx3, event, rng, placer, used_colors, chunk_s))
    else:
      note.update(_draw_person(frames_NxHxWx3, event, rng, placer))
    annotations.append(note)
  annotations.sort(key=lambda a: (a["chunk"], a["kind"]))
  return frames_NxHxWx3, annotations


def _draw_bouncing(frames, event, rng, placer, used_colors, chunk_s) -> dict:
  n, h, w, _ = frames.shape
  start, bounces, end = event["chunk"], event["bounce_chunks"], event["end_chunk"]
  knots_K = np.array([start] + bounces + [end])  # the ball is at a wall on these frames
  longest = int(np.diff(knots_K).max())
  color = _color(event, rng, used_colors)
  axis = event.get("axis") or ("horizontal", "vertical")[int(rng.integers(2))]
  r = 0.06 * min(h, w)
  # The longest free path: try the preferred axis, then the other, with shorter paths; in a
  # crowded frame fall back to overlapping (annotated) rather than failing. A path of at least
  # `longest` pixels moves the ball >= 1 px per frame, so every reversal shows in the pixels.
  axes = (axis,) if "axis" in event else (axis, "vertical" if axis == "horizontal" else
                                          "horizontal")
  spot = None
  for fraction in (rng.uniform(0.6, 1.0), 0.5, 0.35, 0.2, 0.0):
    for axis in axes:
      length = (h if axis == "vertical" else w) - 2 * r - 4
      span = max(longest, int(length * fraction))
      if span > length:
        raise ValueError(f"bouncing event {event}: a crossing of {longest} chunks needs a "
                         f"{longest} px path, more than a {h}x{w} frame has; use a larger frame "
                         f"or bounces closer together.")
      half_hw = (r, span / 2 + r) if axis == "horizontal" else (span / 2 + r, r)
      spot = placer.place(*half_hw)
      if spot:
        break
    if spot:
      break
  overlaps = spot is None  # the bounce annotations stay exact: balls are drawn last, on top
  cy, cx = spot or placer.place_anyway(*half_hw)
  lo = (cx if axis == "horizontal" else cy) - span / 2
  t_T = np.arange(start, end + 1)
  seg_T = np.clip(np.searchsorted(knots_K, t_T, side="right") - 1, 0, len(knots_K) - 2)
  frac_T = (t_T - knots_K[seg_T]) / (knots_K[seg_T + 1] - knots_K[seg_T])
  offset_T = np.round(span * frac_T)  # whole pixels: the ball's shape is the same every frame
  pos_T = lo + np.where(seg_T % 2 == 0, offset_T, span - offset_T)
  for t, pos in zip(t_T, pos_T):
    cyx = (cy, pos) if axis == "horizontal" else (pos, cx)
    frames[t, _shape_mask("circle", *cyx, r, (h, w))] = COLORS[color]
  return {"color": color, "shape": "ball", "axis": axis, "count": len(bounces),
          "bounce_chunks": bounces, "bounce_times_s": [round(c * chunk_s, 6) for c in bounces],
          "end_chunk": end, "overlaps": overlaps}


def _draw_person(frames, event, rng, placer) -> dict:
  n, h, w, _ = frames.shape
  start = event["chunk"]
  side = event.get("side") or ("left", "right")[int(rng.integers(2))]
  clothes = event.get("clothes") or list(CLOTHES)[int(rng.integers(len(CLOTHES)))]
  body_half = 0.13 * w
  final = 0.22 * w if side == "left" else 0.78 * w
  # Reserve the whole walk, from the edge to the standing place, so nothing else sits there.
  x0, x1 = (0, final + body_half + 1) if side == "left" else (final - body_half - 1, w)
  overlaps = not placer.free((0.2 * h, x0, h, x1))
  placer.take((0.2 * h, x0, h, x1))
  # First position: only the body's inner edge is inside the frame.
  first = -body_half + 1 if side == "left" else w - 1 + body_half - 1
  for u in range(min(_WALK_CHUNKS, n - start)):
    frac = u / (_WALK_CHUNKS - 1)
    head, body = _person_mask(first + frac * (final - first), (h, w))
    # The last walking frame is the standing pose: paint it on every remaining frame at once.
    frames_sel = slice(start + u, None) if u == _WALK_CHUNKS - 1 else start + u
    frames[frames_sel, body] = CLOTHES[clothes]
    frames[frames_sel, head] = SKIN
  return {"side": side, "clothes": clothes, "settle_chunk": start + _WALK_CHUNKS - 1,
          "overlaps": overlaps}
