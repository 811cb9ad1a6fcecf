"""The speak-decision probe: labels from the corpus annotations, summaries by condition."""

import json

import numpy as np
import pytest

from tml_jax import probe
from tml_jax.data import speak_labels


def _record(words, events):
  return dict(word_text=[w[0] for w in words], word_start_s=[w[1] for w in words],
              word_end_s=[w[2] for w in words], word_speaker=[w[3] for w in words],
              events_json=json.dumps(events))


def test_conditions_follow_the_annotations(rng):
  """Hand-placed words and events at a random offset land on the chunks whose decision time
  (t+1)*chunk_s falls inside them, with barge-in and backchannel winning over user speech."""
  c = 0.2
  off = float(rng.integers(0, 5)) * c
  words = [("hello", off + 0.1, off + 0.9, "user"), ("stop", off + 3.0, off + 3.5, "user"),
           ("mm", off + 5.0, off + 5.3, "user")]
  events = [dict(kind="user_turn", start_s=off + 0.1, end_s=off + 1.5),
            dict(kind="pause", start_s=off + 0.9, end_s=off + 1.3),
            dict(kind="interruption", start_s=off + 3.0, end_s=off + 3.5),
            dict(kind="user_backchannel", start_s=off + 5.0, end_s=off + 5.3)]
  total = 40
  cond = speak_labels.chunk_conditions(_record(words, events), total, c)
  tau = (np.arange(total) + 1) * c
  name = lambda t: probe.CONDITIONS[cond[int(round(t / c)) - 1]]
  assert name(off + 0.6) == "user_speaking"
  assert name(off + 1.0) == "pause"
  assert name(off + 2.0) == "after_turn_end"
  assert name(off + 3.2) == "barge_in"
  assert name(off + 5.2) == "user_backchannel" and name(off + 5.6) == "user_backchannel"
  assert name(off + 7.0) == "other"
  assert len(cond) == len(tau)


def test_voiced_chunks_reads_speech_from_the_mel():
  mel = np.full((5, 8, 80), -7.0, np.float32)
  mel[1, :2, 10] = -1.0   # 2 of 8 frames: speech
  mel[2, :1, 10] = -1.0   # 1 frame: not enough
  mel[3, :, 3] = -4.5     # quiet everywhere: below the speech level
  np.testing.assert_array_equal(speak_labels.voiced_chunks(mel),
                                [False, True, False, False, False])


def test_summary_by_condition(rng):
  n = 200
  cond = rng.integers(0, len(probe.CONDITIONS), n)
  truth = rng.random(n) < 0.4
  p = np.where(truth, 0.9, 0.1)
  p[cond == 2] = 1 - p[cond == 2]  # always wrong on pauses
  out = probe.summarize(p, truth, cond)
  assert out["pause"]["accuracy"] == 0.0
  assert out["user_speaking"]["accuracy"] == 1.0
  assert out["all"]["chunks"] == n
  md = probe.table_md({"teacher-forced": out})
  assert "| pause | silent |" in md
  now = rng.random(n) < 0.5
  quiet = probe.summarize(p, truth, cond, now_N=now)
  for i, name in enumerate(probe.CONDITIONS):
    m = (cond == i) & ~now
    if m.any():
      assert quiet[name]["p_silent_now"] == pytest.approx(p[m].mean())
  assert "when silent now" in probe.table_md({"teacher-forced": quiet})


def test_calibrated_threshold_bounds_false_onsets(rng):
  """The threshold lets at most 1 % of the should-stay-silent chunks start speech, and
  recalls the onsets a separable gate scores above them; chunks where the model already
  speaks do not count."""
  n = 4000
  now = rng.random(n) < 0.4
  truth = np.where(now, rng.random(n) < 0.9, rng.random(n) < 0.08)
  p = np.where(~now & truth, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.35, n))
  p[now] = rng.uniform(0.9, 1.0, now.sum())  # would wreck the quantile if it were counted
  c = probe.calibrate_threshold(p, truth, now, np.ones(n, bool))
  stay = ~now & ~truth
  assert (p[stay] >= c["threshold"]).mean() <= 0.0101
  assert c["false_onset_rate"] <= 0.0101 and c["onset_recall"] > 0.8
  assert 0.3 < c["threshold"] < 0.36


def test_delegate_threshold_bounds_false_delegations(rng):
  """A chunk counts by its most likely scored slot: the threshold lets at most max_false of
  the chunks away from a DELEGATE target emit one and is the lowest that does; a target is
  recalled when a chunk within `tolerance` of it reaches the threshold, and those chunks
  are no negatives; PAD slots (unscored) never count however likely they make DELEGATE."""
  from tml_jax.text import tokenizer as tok
  B, C, T, tol = 20, 40, 8, 2
  target = rng.integers(0, 256, (B, C, T))
  mask = rng.random((B, C, T)) < 0.6
  p = rng.uniform(0.0, 0.05, (B, C, T))
  p[~mask] = 0.99  # unscored slots: must not count
  dchunks = np.zeros((B, C), bool)
  dchunks[:, 5::12] = rng.random((B, len(range(5, C, 12)))) < 0.5  # targets 12 chunks apart
  b, c = np.nonzero(dchunks)
  j = rng.integers(0, T, b.size)
  target[b, c, j], mask[b, c, j] = tok.DELEGATE, True
  early = rng.random(b.size) < 0.5  # half the targets' mass sits one chunk early
  p[b, c, j] = np.where(early, 0.001, rng.uniform(0.06, 0.4, b.size))
  p[b[early], c[early] - 1, :] = np.where(mask[b[early], c[early] - 1], 0.3, 0.99)
  out = probe.calibrate_delegate_threshold(p, target, mask, max_false=0.01, tolerance=tol)
  score = np.where(mask, p, 0).max(-1)
  near = np.zeros_like(dchunks)
  for dc in range(-tol, tol + 1):
    near[b, np.clip(c + dc, 0, C - 1)] = True
  neg = mask.any(-1) & ~near
  assert out["targets"] == dchunks.sum() and out["negative_chunks"] == neg.sum()
  thr = out["threshold"]
  assert (score[neg] >= thr).mean() <= 0.01 + 1e-12 and out["false_rate"] <= 0.01
  lower = np.nextafter(np.max(score[neg][score[neg] < thr]), -np.inf)
  assert (score[neg] >= lower).mean() > 0.01  # any lower threshold breaks the bound
  assert 0.03 < thr < 0.05 and out["recall"] == 1.0  # the early ones are recalled too
  strict = probe.calibrate_delegate_threshold(p, target, mask, max_false=0.01, tolerance=0)
  assert strict["recall"] < 0.8  # without the tolerance they are not
  none = probe.calibrate_delegate_threshold(p, np.zeros_like(target), mask)
  assert none["threshold"] == 1.0 and none["recall"] is None


def test_free_running_delegate_calibration_scores_gate_open_chunks(rng):
  """Running free, a chunk counts only when the gate let it speak (the engine emits
  DELEGATE nowhere else), scored by slot 0's P(DELEGATE); its target is the micro-turn
  before each corpus delegation's start, within 3 chunks."""
  import json
  from types import SimpleNamespace
  chunk_s, C = 0.2, 60
  records, runs = [], []
  for _ in range(3):
    start = float(rng.integers(10, 50)) * chunk_s + 0.05
    records.append(dict(user_wav=np.zeros(C * 3200, np.int16),
                        events_json=json.dumps([dict(kind="delegation", start_s=start),
                                                dict(kind="user_turn", start_s=0.1)])))
    spoke = rng.random(C) < 0.4
    p = rng.uniform(0.0, 0.05, C)
    p[~spoke] = 0.9  # the gate was shut: must not count
    c = int(np.floor(start / chunk_s)) - 1
    spoke[c + 2], p[c + 2] = True, 0.2  # the model delegates 2 chunks late
    runs.append([SimpleNamespace(spoke=bool(a), p_delegate=float(b)) for a, b in zip(spoke, p)])
  it = iter(runs)
  engine = SimpleNamespace(run_wav=lambda wav, text_at_s=(): dict(records=next(it)))
  out = probe.calibrate_delegate_free_running(engine, records, chunk_s=chunk_s, max_false=0.0)
  assert out["targets"] == 3 and out["recall"] == 1.0 and out["false_rate"] == 0.0
  assert 0.04 < out["threshold"] <= 0.05 + 1e-9 and out["conversations"] == 3


def test_background_links_at_forced_delegations(rng):
  """The background model's links are counted per corpus delegation, from the events of a
  run with a delegation forced at the micro-turn before each one's start: a call that did
  not end, a wrong tool, wrong args, a tool error and a wrong answer each miss their link."""
  from types import SimpleNamespace
  chunk_s = 0.2
  want = dict(tool="calculator", args="17 * 23", result_text="17 * 23 = 391")
  # (written call or None for one that did not end, tool ran, answer) and the links it makes
  # (ended, tool, args, ran, answer)
  cases = [(("calculator", "17 * 23"), True, "17 * 23 = 391", (1, 1, 1, 1, 1)),
           (("calculator", "17 * 23"), True, "17 * 23 = 392", (1, 1, 1, 1, 0)),
           (("calculator", "11 * 111"), True, "11 * 111 = 1221", (1, 1, 0, 1, 0)),
           (("clock", "17 * 23"), False, "the tool failed: x", (1, 0, 0, 0, 0)),
           (None, False, "the tool failed: the call did not end", (0, 0, 0, 0, 0))]
  order = rng.permutation(len(cases))
  typed = rng.random(len(cases)) < 0.5  # typed questions are also counted apart
  records, runs, starts = [], [], []
  for i in order:
    start = float(rng.integers(10, 50)) * chunk_s + 0.05
    starts.append(start)
    records.append(dict(user_wav=np.zeros(60 * 3200, np.int16), events_json=json.dumps(
        [dict(kind="user_turn", start_s=0.1, end_s=1.0, data={}),
         dict(kind="delegation", start_s=start, end_s=start + 2,
              data=dict(want, typed=bool(typed[i])))]
        + ([dict(kind="typed_text", start_s=start - 1.0, end_s=start - 1.0,
                 data=dict(text="what is 17 times 23?", delegation=True))] if typed[i] else []))))
    call, ran, answer, _ = cases[i]
    ev = [dict(kind="delegation", job=0, forced=True, time_s=start)]
    ev += ([dict(kind="tool_call", job=0, tool=call[0], args=call[1])] if call else
           [dict(kind="tool_error", job=0, tool="calculator", ended=False, error="no SEP")])
    if ran:
      ev.append(dict(kind="tool_result", job=0, tool=call[0], result=answer))
    elif call:
      ev.append(dict(kind="tool_error", job=0, tool=call[0], error="bad args"))
    ev.append(dict(kind="background_result", job=0, text=answer))
    runs.append(ev)
  seen = []
  it = iter(runs)

  fed = []

  def run_wav(wav, delegate_at_s=(), text_at_s=()):
    seen.append(list(delegate_at_s))
    fed.append(list(text_at_s))
    return dict(events=next(it))

  out = probe.background_at_delegations(SimpleNamespace(run_wav=run_wav), records,
                                        chunk_s=chunk_s)
  for at, start in zip(seen, starts):  # forced at the micro-turn before the start
    assert at == [pytest.approx((np.floor(start / chunk_s) - 1) * chunk_s)]
  assert out["n"] == 5
  for k, link in enumerate(("ended", "tool", "args", "ran", "answer")):
    assert out[link] == sum(c[3][k] for c in cases), (link, out)
  assert out["typed_n"] == typed.sum()
  # What the user typed is fed as TEXT_IN (the question a typed delegation reads), and
  # nothing else of the corpus' text (its background results are the engine's to make).
  for start, i, texts in zip(starts, order, fed):
    assert texts == ([(pytest.approx(start - 1.0), "what is 17 times 23?")] if typed[i] else [])
  for k, link in ((1, "tool"), (2, "args")):
    assert out[f"typed_{link}"] == sum(c[3][k] for c, t in zip(cases, typed) if t), out
  assert len(out["calls"]) == 4 and out["calls"][0][0] == "calculator:17 * 23"


def test_reply_window_marks_the_gap_before_a_reply(rng):
  """With a reply `lat` s after the turn end, the chunks whose next chunk starts between
  0.2 s after the end and the reply's start say "speak"; nothing else does."""
  c = 0.2
  end = 2.0 + float(rng.integers(0, 10)) * c
  lat = float(rng.choice([0.4, 0.6]))
  events = [dict(kind="user_turn", start_s=0.5, end_s=end),
            dict(kind="model_turn", start_s=end + lat, end_s=end + lat + 2.0,
                 data=dict(latency_s=lat))]
  w = speak_labels.reply_windows(_record([], events), 40, c)
  nxt = (np.arange(40) + 1) * c
  expect = (nxt >= end + 0.2 - 1e-9) & (nxt < end + lat)
  np.testing.assert_array_equal(w, expect)
  assert w.sum() == round((lat - 0.2) / c)


def test_speak_loss_weighs_transitions_pauses_and_barge_ins(rng):
  """The gate's BCE is a weighted mean: onsets/offsets x transition, silent pause chunks x
  pause, barge-in chunks while the model speaks x barge_in (each once, multiplied), padding
  not at all; checked against the formula on random chunks."""
  import jax.numpy as jnp
  from tml_jax.train.losses import speak_terms
  B, C = 3, 17
  logits = rng.normal(0, 2, (B, C)).astype(np.float32)
  batch = dict(speak_target=rng.random((B, C)) < 0.5, speak_now=rng.random((B, C)) < 0.5,
               audio_mask=rng.random((B, C)) < 0.8,
               speak_condition=rng.integers(0, len(speak_labels.CONDITIONS), (B, C)))
  wt, wp, wb = (float(x) for x in rng.uniform(1.5, 5.0, 3))
  got = float(speak_terms(jnp.asarray(logits), batch, wt, wp, wb)["speak"])
  y, now = batch["speak_target"], batch["speak_now"]
  cond = np.asarray(batch["speak_condition"])
  w = batch["audio_mask"] * np.where(now != y, wt, 1.0)
  w = w * np.where((cond == speak_labels.CONDITIONS.index("pause")) & ~now, wp, 1.0)
  w = w * np.where((cond == speak_labels.CONDITIONS.index("barge_in")) & now, wb, 1.0)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(got, (bce * w).sum() / w.sum(), rtol=1e-5)
  plain = float(speak_terms(jnp.asarray(logits), batch)["speak"])
  np.testing.assert_allclose(plain, (bce * batch["audio_mask"]).sum() / batch["audio_mask"].sum(),
                             rtol=1e-5)
