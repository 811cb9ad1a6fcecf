"""grain pipeline: layout through the foundation code, targets, determinism, resume."""

import numpy as np

from configs.interaction import get_config
from tml_jax.data import pipeline, tml_duplex
from tml_jax.microturn import ChunkLayout, Segment
from tml_jax.text import tokenizer as tok


def _loader(config, **kw):
  src = tml_duplex.load_split(config.data.dir, "train", config.data)
  return pipeline.make_loader(src, config, split="train", seed=3, **kw)


def _equal(a, b):
  for k in a:
    if k == "meta":
      for x, y in zip(a[k], b[k]):
        np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_reproduces_next_batches(smoke_corpus):
  config, _ = smoke_corpus
  it = iter(_loader(config))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(_loader(config))
  it2.set_state(state)
  for e in expected:
    _equal(e, next(it2))


def test_same_seed_same_batches(smoke_corpus):
  config, _ = smoke_corpus
  a, b = iter(_loader(config)), iter(_loader(config))
  for _ in range(2):
    _equal(next(a), next(b))


def test_examples_follow_the_layout(smoke_corpus):
  config, _ = smoke_corpus
  layout = ChunkLayout.from_config(config.layout)
  C = config.layout.num_chunks
  src = tml_duplex.load_split(config.data.dir, "train", config.data)
  tf = pipeline.MicroTurnExample(layout, C, random_crop=False)
  for i in range(len(src)):
    record = src[i]
    ex = tf.random_map(record, np.random.default_rng(0))
    ref = layout.meta(C)
    np.testing.assert_array_equal(ex["meta"].segment, ref.segment[0])
    np.testing.assert_array_equal(ex["meta"].chunk, ref.chunk[0])
    total = record["user_dmel"].shape[0] // layout.user_audio
    n = min(C, total)
    # Audio observations are the cached dMel frames of the chunk; targets the next chunk's mel.
    np.testing.assert_array_equal(ex["user_dmel"][:n].reshape(-1, 80),
                                  record["user_dmel"][:n * layout.user_audio])
    mel = np.asarray(record["model_mel"], np.float32)
    for c in range(min(n, total - 1)):
      np.testing.assert_array_equal(
          ex["audio_target"][c].reshape(-1, 80),
          mel[(c + 1) * layout.user_audio:(c + 2) * layout.user_audio])
    assert not ex["audio_mask"][total - 1] if total - 1 < C else True
    # Text: each valid chunk's target is bytes/control tokens then EOT then PAD; the input is
    # the target shifted right behind BOS.
    for c in range(n):
      t = ex["model_text_target"][c]
      eot = np.flatnonzero(t == tok.EOT)
      assert len(eot) == 1 and np.all(t[eot[0] + 1:] == tok.PAD), t
      np.testing.assert_array_equal(ex["model_text_in"][c, 1:], t[:-1])
      assert ex["model_text_in"][c, 0] == tok.BOS
    # Video tokens are valid only when the conversation has video.
    video = ex["meta"].segment == Segment.VIDEO
    has_video = bool(np.asarray(ex["video"]).any())
    assert np.all(ex["meta"].valid[video][:n * layout.video] == has_video) or not has_video


def test_model_words_reach_the_text_targets(smoke_corpus):
  """Every word the model says appears in the text stream, in order, one chunk early."""
  config, _ = smoke_corpus
  layout = ChunkLayout.from_config(config.layout)
  src = tml_duplex.load_split(config.data.dir, "train", config.data)
  tf = pipeline.MicroTurnExample(layout, 10_000, random_crop=False)
  t = tok.ByteTokenizer()
  checked = 0
  for i in range(len(src)):
    record = src[i]
    s = tf.streams(record)
    stream = t.decode(s["model_text_target"].reshape(-1))
    words = [w.decode() if isinstance(w, bytes) else w
             for w, sp in zip(record["word_text"], record["word_speaker"])
             if (sp.decode() if isinstance(sp, bytes) else sp) == "model"]
    pos = 0
    for w in words:
      j = stream.find(w, pos)
      if j < 0:
        break  # words after the last chunk fall outside the recording
      pos = j + len(w)
      checked += 1
  assert checked > 0


def test_other_chunk_lengths_keep_video_on_the_conversation_clock(smoke_corpus, monkeypatch):
  """At 100 and 400 ms micro-turns the frames are rendered on the layout's chunk clock: a
  visual event at 2.0 s is drawn from chunk 20 / 10 / 5 on (at 400 ms the stream used to
  raise "outside the video", at 100 ms to show events at twice their time)."""
  import json
  from tml_jax.vision import synthetic
  config, _ = smoke_corpus
  src = tml_duplex.load_split(config.data.dir, "train", config.data)
  record = dict(src[0])  # a person enters at 2.0 s (the smoke corpus is too short for one)
  record["video_events_json"] = json.dumps([dict(kind="person_enters", side="left",
                                                 clothes="black", start_s=2.0)]).encode()
  seen = []
  real = synthetic.make_video

  def spy(*args, **kw):
    frames, notes = real(*args, **kw)
    seen.append(notes)
    return frames, notes
  monkeypatch.setattr(pipeline.synthetic, "make_video", spy)
  for chunk_ms in (100, 200, 400):
    layout_cfg = config.layout.copy_and_resolve_references()
    layout_cfg.chunk_ms = chunk_ms
    layout_cfg.model_audio_slots = {100: 2, 200: 4, 400: 8}[chunk_ms]
    tf = pipeline.MicroTurnExample(ChunkLayout.from_config(layout_cfg), 10_000,
                                   chunk_ms=chunk_ms, random_crop=False)
    s = tf.streams(record)
    assert s["video"].shape[0] == s["user_dmel"].shape[0]
    (note,) = seen[-1]
    assert note["chunk"] == round(2.0 * 1000 / chunk_ms) and note["time_s"] == 2.0, note


def _holds(start, C, chunks, placement) -> bool:
  before, after = placement
  return any(before <= a - start <= C - after for a in chunks)


def _reachable(total, C, chunks, placement) -> bool:
  before, after = placement
  return any(max(0, a - C + after) <= min(total - C, a - before) for a in chunks)


def test_anchored_crops_hold_their_anchor(rng):
  """With reminder_crop_share=1 every crop of a conversation with a reachable firing holds
  one 2 chunks in and 12 before the row's end; with delegation_crop_share=1 one with a
  reachable DELEGATE (a window in) or result holds one of those as `placement` says; shares that sum to 1
  split the crops; without anchors (or shares 0) crops are uniform, drawn exactly as before."""
  C = 32
  lay = ChunkLayout.from_config(get_config("tiny").layout)
  make = lambda **kw: pipeline.MicroTurnExample(lay, C, **kw)
  rem, dele, both, plain = (make(reminder_crop_share=1.0), make(delegation_crop_share=1.0),
                            make(reminder_crop_share=0.5, delegation_crop_share=0.5), make())
  P = {k: rem.placement(k) for k in ("reminder", "delegate", "held", "result")}
  assert P["delegate"] == (lay.window, 4) and P["reminder"] == (2, 12)
  assert P["held"] == (C - 1, 1)  # a held DELEGATE is the row's last chunk
  kinds_seen = {"reminder": 0, "delegation": 0}
  for _ in range(300):
    total = int(rng.integers(C + 1, 400))
    anchors = {k: sorted(int(a) for a in rng.integers(0, total, size=int(rng.integers(0, 3))))
               for k in ("reminder", "delegate", "held", "result")}
    draw = lambda tf, a=anchors: tf.crop_start(total, a,
                                               np.random.default_rng(int(rng.integers(1 << 30))))
    for tf in (rem, dele, both, plain):
      assert 0 <= draw(tf) <= total - C
    if _reachable(total, C, anchors["reminder"], P["reminder"]):
      assert _holds(draw(rem), C, anchors["reminder"], P["reminder"]), (total, anchors)
    deleg = [(anchors[k], P[k]) for k in ("delegate", "held", "result")]
    if any(_reachable(total, C, a, p) for a, p in deleg):
      start = draw(dele)
      assert any(_holds(start, C, a, p) for a, p in deleg), (total, anchors, start)
    if (_reachable(total, C, anchors["reminder"], P["reminder"])
        and any(_reachable(total, C, a, p) for a, p in deleg)):
      start = draw(both)
      r = _holds(start, C, anchors["reminder"], P["reminder"])
      d = any(_holds(start, C, a, p) for a, p in deleg)
      assert r or d, (total, anchors, start)
      kinds_seen["reminder"] += r
      kinds_seen["delegation"] += d
    seed = int(rng.integers(1 << 30))
    uniform = int(np.random.default_rng(seed).integers(0, total - C + 1))
    assert plain.crop_start(total, anchors, np.random.default_rng(seed)) == uniform
    empty = {k: [] for k in anchors}
    assert rem.crop_start(total, empty, np.random.default_rng(seed)) == uniform
  assert min(kinds_seen.values()) > 10, kinds_seen  # both halves of the split are used
  try:
    make(reminder_crop_share=0.7, delegation_crop_share=0.4)
  except ValueError as e:
    assert "delegation_crop_share=0.4" in str(e)
  else:
    raise AssertionError("shares summing past 1 were accepted")


def test_delegation_anchors_are_the_delegate_target_and_the_result():
  """On generated conversations: the `delegate` anchors are the chunks whose text targets
  hold DELEGATE, the `result` anchors the chunks where the results arrive as TEXT_IN."""
  from tml_jax.data.conversation import featurise
  from tml_jax.data.scenarios import generate
  config = get_config("tiny")
  tf = pipeline.MicroTurnExample(ChunkLayout.from_config(config.layout), 10_000,
                                 random_crop=False)
  for scenario, index in (("delegation", 3), ("reminder", 5)):
    record = featurise(generate("train", index, duration_s=16.0, scenario=scenario))
    s = tf.streams(record)
    a = s["_anchors"]
    assert a["delegate"], f"a {scenario} conversation without a DELEGATE target"
    assert sorted(a["delegate"] + a["held"]) == sorted(
        {int(c) for c in np.nonzero(s["model_text_target"] == tok.DELEGATE)[0]})
    arrivals = {int(np.floor(float(t) / 0.2 + 1e-9)) for t in record["text_in_s"]}
    assert a["result"] and set(a["result"]) <= arrivals
