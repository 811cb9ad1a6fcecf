"""The synthetic conversation corpus: timestamps, scenario invariants, determinism, splits,
the TFDS build and the Full-Duplex-Bench export. Fast: short conversations, a 3/1/1 build."""

import functools
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.io.wavfile

from tml_jax.audio.constants import HOP, N_MELS
from tml_jax.audio.constants import SAMPLE_RATE as SR
from tml_jax.data import conversation as C
from tml_jax.data import scenarios, speech, templates

DUR = 14.0


@functools.cache
def conv(scenario: str, split: str = "train", index: int = 0) -> C.Conversation:
  return scenarios.generate(split, index, seed=3, duration_s=DUR, scenario=scenario)


def rms(x: np.ndarray, a: float, b: float) -> float:
  seg = x[int(a * SR):int(b * SR)]
  return float(np.sqrt(np.mean(np.square(seg, dtype=np.float64)))) if seg.size else 0.0


def span_mask(words, n: int) -> np.ndarray:
  m = np.zeros(n, bool)
  for w in words:
    m[int(w.start_s * SR):int(np.ceil(w.end_s * SR))] = True
  return m


def test_word_timestamps_follow_the_audio_energy():
  utt = speech.synth("Well, I think so. Maybe tomorrow, if it does not rain.", "en-us+m3",
                     rate_wpm=170)
  words = [C.Word(t, a, b, "user") for t, a, b in utt.words]
  assert [w.text for w in words] == ["Well", "I", "think", "so", "Maybe", "tomorrow", "if",
                                     "it", "does", "not", "rain"]
  inside = span_mask(words, len(utt.wav))
  e = np.square(utt.wav.astype(np.float64))
  assert inside[:10].all() and inside[-10:].all()  # silence is trimmed at both ends
  gaps = ~inside
  assert gaps.sum() > 0.1 * SR  # the clause pauses are gaps, not parts of words
  assert e[inside].mean() > 100 * e[gaps].mean()
  # Every word carries energy of its own (no empty spans after merging espeak's sub-words).
  for w in words:
    assert rms(utt.wav, w.start_s, w.end_s) > 0.02, w


def test_every_voice_in_the_pools_is_installed():
  have = speech.installed_voices()
  names = speech.voices("train") + speech.voices("test") + speech.MODEL_VOICES
  for name in names + tuple(speech.FOREIGN_VOICES.values()):
    lang, _, variant = name.partition("+")
    assert lang in have["languages"], name
    assert not variant or variant in have["variants"], name
  assert len(speech.voices("train")) >= 80 and len(speech.voices("test")) >= 20
  assert not set(speech.MODEL_VOICES) & set(speech.voices("train") + speech.voices("test"))


def test_numbers_and_hyphenated_words_keep_their_written_form():
  utt = speech.synth("It is 391, mm-hmm.", "en-gb-x-rp+f2")
  assert [w for w, _, _ in utt.words] == ["It", "is", "391", "mm-hmm"]
  starts = [a for _, a, _ in utt.words]
  assert starts == sorted(starts)


def test_model_channel_energy_lies_inside_model_words():
  c = conv("turn_taking")
  model = c.words_of("model")
  assert model
  inside = span_mask(model, len(c.model_wav))
  turns = span_mask(c.events_of("model_turn"), len(c.model_wav))
  e = np.square(c.model_wav.astype(np.float64))
  assert e[~turns].max() < 1e-5  # nothing outside the model's turns (but rounding)
  gaps = turns & ~inside
  assert gaps.sum() > 0.05 * SR  # pauses between clauses exist and are not word time
  assert e[inside].mean() > 100 * e[gaps].mean()


def test_turn_taking_latency_and_silence_before_the_answer():
  c = conv("turn_taking")
  users, models = c.events_of("user_turn"), c.events_of("model_turn")
  assert len(users) >= 2 and len(models) >= 1
  for u, m in zip(users, models):
    lat = m.data["latency_s"]
    assert 0.2 <= lat <= 0.6
    assert m.start_s == pytest.approx(u.end_s + lat, abs=2e-3)
    assert rms(c.model_wav, u.end_s, m.start_s) < 1e-4  # nothing before the sampled latency
    first = min(w.start_s for w in c.words_of("model") if w.start_s >= m.start_s - 1e-3)
    assert first == pytest.approx(m.start_s, abs=2e-3)
    assert rms(c.model_wav, m.start_s, m.end_s) > 0.02


def test_model_stays_silent_during_mid_utterance_pauses():
  for i in range(3):
    c = conv("pause_handling", index=i)
    pauses = c.events_of("pause")
    assert pauses and all(0.6 <= p.end_s - p.start_s <= 2.0 for p in pauses)
    for p in pauses:
      assert rms(c.model_wav, p.start_s, p.end_s) < 1e-4
      # the user is silent too: it is a pause inside their turn
      assert not any(p.start_s + 0.01 < w.start_s < p.end_s - 0.01 for w in c.words_of("user"))
    turn = next(e for e in c.events_of("user_turn") if e.start_s <= pauses[0].start_s)
    answer = next(e for e in c.events_of("model_turn") if e.start_s > turn.end_s)
    assert answer.start_s == pytest.approx(turn.end_s + answer.data["latency_s"], abs=2e-3)


def test_a_paused_turn_is_one_synthesis_cut_at_the_pause():
  """The words before a pause keep the intonation of an unfinished sentence: the turn is
  synthesised once and cut at the word boundary, never spoken as two sentences."""
  from tml_jax.data.scene import Scene
  s = Scene(np.random.default_rng(5), "train", 20.0)
  pieces = ["I would like to book a table for, um,", "four people tomorrow evening."]
  spans = s.say_paused("user", pieces, [1.3], 1.0)
  whole = s.synth("user", " ".join(pieces))
  head, tail = whole.slice(0, 9), whole.slice(9, len(whole.words))
  assert [w for w, _, _ in head.words][-2:] == ["for", "um"]
  assert [w for w, _, _ in tail.words] == ["four", "people", "tomorrow", "evening"]
  for (a, _), part in zip(spans, (head, tail)):
    i = int(round(a * SR))
    np.testing.assert_allclose(s.tracks["user"][i:i + len(part.wav)], part.wav, atol=1e-6)
  assert spans[1][0] == pytest.approx(spans[0][1] + 1.3, abs=1e-3)
  (pause,) = [e for e in s.events if e.kind == "pause"]
  assert (pause.start_s, pause.end_s) == pytest.approx((spans[0][1], spans[1][0]), abs=1e-3)
  # Spoken alone, an unfinished fragment would end as a sentence: its last word lengthened.
  whole = s.synth("user", "I would like to book a table for four people tomorrow evening.")
  alone, cut = s.synth("user", "I would like to book a table for"), whole.slice(0, 8)
  assert cut.words[-1][0] == alone.words[-1][0] == "for"
  assert (alone.words[-1][2] - alone.words[-1][1]) > (cut.words[-1][2] - cut.words[-1][1])
  # the user is silent in the pause, the words' times are the placed audio's
  assert rms(s.tracks["user"], spans[0][1] + 0.01, spans[1][0] - 0.01) == 0.0
  user_words = [w for w in s.words if w.speaker == "user"]
  assert len(user_words) == 13
  assert user_words[9].start_s == pytest.approx(spans[1][0], abs=1e-3)


def test_training_questions_pause_but_the_test_split_keeps_fdb_turns():
  def pauses(split):
    return sum(len(scenarios.generate(split, i, seed=3, duration_s=DUR,
                                      scenario="turn_taking").events_of("pause"))
               for i in range(8))
  assert pauses("train") >= 2 and pauses("validation") >= 1
  assert pauses("test") == 0


def test_interruption_model_stops_within_the_annotated_time():
  for i in range(3):
    c = conv("interruption", index=i)
    (ev,) = c.events_of("interruption")
    stop = ev.data["model_stop_s"]
    assert 0.2 - 1e-3 <= stop - ev.start_s <= 0.4 + 1e-3
    assert rms(c.model_wav, ev.start_s - 0.3, ev.start_s) > 0.01  # it was talking
    reply = next(e for e in c.events_of("model_turn") if e.start_s > stop)
    assert rms(c.model_wav, stop + 0.005, reply.start_s) < 1e-4  # and then it stopped
    assert all(w.end_s <= stop + 1e-3 for w in c.words_of("model") if w.start_s < stop)


def test_user_backchannels_do_not_stop_the_model():
  c = conv("user_backchannel", index=1)
  bcs = c.events_of("user_backchannel")
  assert bcs
  for b in bcs:
    assert rms(c.model_wav, b.start_s, b.end_s + 0.3) > 0.01


def test_model_backchannels_sit_inside_the_user_turn():
  c = conv("model_backchannel")
  turn = c.events_of("user_turn")[0]
  bcs = c.events_of("model_backchannel")
  assert bcs and all(turn.start_s < b.start_s < turn.end_s for b in bcs)


@pytest.mark.parametrize("scenario", ["talking_to_other", "background_speech"])
def test_model_ignores_speech_not_addressed_to_it(scenario):
  modes = set()
  for i in range(6):
    c = conv(scenario, index=i)
    spans = c.events_of(scenario)
    assert spans and c.words_of("other")
    for e in spans:
      modes.add(e.data["during_model"])
      assert e.data["model_silent"] != e.data["during_model"]
      if e.data["model_silent"]:  # nobody spoke to the model: it says nothing
        assert rms(c.model_wav, e.start_s, e.end_s) < 1e-4
      else:  # it was explaining something: it goes on through the overlap
        assert rms(c.model_wav, e.start_s, e.end_s) > 0.01
        turn = next(m for m in c.events_of("model_turn") if m.start_s < e.start_s < m.end_s)
        assert "interrupted" not in turn.data
  assert modes == {True, False}


def test_reminders_go_through_the_clock_tools_and_fire_as_text_in(rng):
  """The whole chain, on conversations of fresh seeds until a one-off reminder, a timer and
  a repeating reminder have all been seen: DELEGATE as the model acknowledges; the real
  tool's confirmation as TEXT_IN; every firing as TEXT_IN at the first micro-turn at or
  after its due time (the engine's poll), on the period's grid; the model says it from the
  next micro-turn on."""
  from tml_jax.tools import ToolBox, ToolContext
  seen, seed = set(), int(rng.integers(1 << 20))
  for i in range(60):
    c = scenarios.generate("train", i, seed=seed, duration_s=24.0, scenario="reminder")
    dels = [e for e in c.events_of("delegation") if e.data.get("purpose") == "reminder"]
    if not dels:
      continue  # too little room for a reminder: the scenario fell back to turn-taking
    (d,), (r,) = dels, c.events_of("reminder_set")
    assert d.data["tool"] in ("remind", "timer") and d.start_s == r.start_s
    ctx = ToolContext(now_s=lambda: r.end_s)
    assert ToolBox(ctx=ctx).call(d.data["tool"], d.data["args"]) == d.data["result_text"]
    assert (d.data["arrival_s"], d.data["result_text"]) in c.text_in
    assert d.data["arrival_s"] > r.end_s  # the confirmation comes after the call
    # The DELEGATE lands where the acknowledgement starts.
    assert any(abs(m.start_s - d.start_s) < 1e-3 for m in c.events_of("model_turn"))
    (pending,) = ctx.reminders.pending()
    due, period = pending.due_s, pending.period_s
    assert due == pytest.approx(r.data["due_s"], abs=2e-3)
    assert due == pytest.approx(r.end_s + r.data["delay_s"], abs=2e-3)
    fired = [(t, x) for t, x in c.text_in if x.startswith("reminder: ")]
    want = [due + k * period for k in range(40 if period else 1)]
    want = [np.ceil(t / 0.2 - 1e-6) * 0.2 for t in want]
    want = [t for t in want if t < c.duration_s - 1.5]
    assert [t for t, _ in fired] == pytest.approx(want, abs=1e-3), (c.id, fired, want)
    assert all(x == f"reminder: {pending.text}" for _, x in fired)
    spoken = c.events_of("reminder_due")
    assert len(spoken) == len(fired)
    for (t, _), e in zip(fired, spoken):
      # the next micro-turn, 0.2-0.35 s on; times are rounded to the millisecond
      assert 0.2 - 1e-3 <= e.start_s - t <= 0.4, (c.id, t, e)
      assert rms(c.model_wav, e.start_s, e.end_s) > 0.02
      words = " ".join(w.text for w in c.words_of("model") if e.start_s - 1e-3 <= w.start_s
                       <= e.end_s).lower()
      if d.data["tool"] == "remind":
        assert r.data["task"].split()[0] in words, (c.id, words)
    seen.add("repeating" if period else d.data["tool"])
    if seen == {"remind", "timer", "repeating"}:
      break
  assert seen == {"remind", "timer", "repeating"}, seen


def test_delegations_use_every_tool_and_its_real_answer(rng):
  """Delegation targets cover calculator, clock (weekday and now), knowledge and chart; the
  result arriving as TEXT_IN is what the real tool answers at the call."""
  from tml_jax.tools import ToolBox, ToolContext
  seen, seed = set(), int(rng.integers(1 << 20))
  for i in range(80):
    c = scenarios.generate("train", i, seed=seed, duration_s=10.0, scenario="delegation")
    for d in c.events_of("delegation"):
      tool, args = d.data["tool"], d.data["args"]
      seen.add(f"{tool} now" if args == "now" else tool)
      ctx = ToolContext(now_s=lambda: d.start_s + 0.5, dry_run=True)
      assert ToolBox(ctx=ctx).call(tool, args) == d.data["result_text"], d.data
      assert (d.data["arrival_s"], d.data["result_text"]) in c.text_in
      if args == "now":  # the spoken answer is the call's time
        assert str(int(d.start_s + 0.5)) in d.data["answer"], d.data
    if len(seen) == 5:
      break
  assert seen == {"calculator", "clock", "clock now", "knowledge", "chart"}, seen


def test_held_delegations_put_the_question_beyond_the_window(rng):
  """A held delegation: the question, a hold and a release in one user turn with a pause
  the model must sit through; its DELEGATE comes more than a 5 s window after the
  question's end. Plain ones delegate right after the question. A typed one (TEXT_IN, a
  typed_text event the evaluation feeds to a system) delegates once its last byte is read,
  with no user speech in between."""
  from tml_jax.data.task_scenarios import TYPED_BYTES_PER_S
  seed, kinds = int(rng.integers(1 << 20)), set()
  for i in range(60):
    c = scenarios.generate("train", i, seed=seed, duration_s=24.0, scenario="delegation")
    for d in c.events_of("delegation"):
      gap = d.start_s - d.data["question_end_s"]
      q_end = d.data["question_end_s"]
      if d.data["typed"]:
        (typed,) = [e for e in c.events_of("typed_text") if e.data.get("delegation")]
        assert (typed.start_s, d.data["question"]) in c.text_in
        assert typed.data["text"] == d.data["question"] and not d.data["held"]
        read = len(d.data["question"].encode()) / TYPED_BYTES_PER_S
        assert abs(q_end - typed.start_s - read) < 2e-3, (c.id, q_end, typed.start_s)
        assert 0.2 - 1e-3 <= gap < 0.7, (c.id, gap)
        assert not [w for w in c.words_of("user") if typed.start_s <= w.start_s < d.start_s]
        assert not [e for e in c.events_of("user_turn") if e.data["text"] == d.data["question"]]
        kinds.add("typed")
        continue
      turn = next(e for e in c.events_of("user_turn")
                  if e.start_s <= q_end <= e.end_s + 1e-3)
      assert turn.end_s < d.start_s
      if d.data["held"]:
        assert 5.0 < gap < 7.0, (c.id, gap)
        assert any(turn.start_s < p.start_s and p.end_s <= turn.end_s and p.end_s - p.start_s
                   > 0.7 for p in c.events_of("pause")), c.id
        words = [w for w in c.words_of("user") if d.data["question_end_s"] < w.start_s
                 < d.start_s]
        assert len(words) >= 4, c.id  # the hold and the release are said
      else:
        assert gap < 0.7, (c.id, gap)
      kinds.add(d.data["held"])
    if kinds == {True, False, "typed"}:
      break
  assert kinds == {True, False, "typed"}, kinds


def test_delegation_answer_arrives_as_text_and_is_spoken_after():
  c = conv("delegation")
  (d,) = c.events_of("delegation")
  assert 1.0 <= d.end_s - d.start_s <= 4.0
  assert (d.data["arrival_s"], d.data["result_text"]) in c.text_in
  spoken = next(e for e in c.events_of("model_turn") if e.data.get("responds_to") == "text_in")
  assert spoken.start_s >= d.data["arrival_s"] + 0.2 - 1e-3
  assert spoken.data["text"] == d.data["answer"]


def test_delegated_answers_are_correct():
  seen = set()
  for i in range(12):
    d = conv("delegation", index=i).events_of("delegation")[0].data
    seen.add(d["tool"])
    if d["tool"] == "calculator":
      expr, result = d["result_text"].split(" = ")
      assert eval(expr) == int(result)  # noqa: S307 - our own "a op b" strings
  assert seen == {"calculator", "clock", "knowledge", "chart"}


def test_translation_overlaps_and_lags():
  c = conv("translation")
  tr = c.events_of("translation")
  assert len(tr) >= 2
  assert all(0.8 - 1e-3 <= e.data["lag_s"] for e in tr)
  langs = {e.data["lang"] for e in tr}
  assert len(langs) == 1 and langs <= set(speech.FOREIGN_VOICES)
  # simultaneous: the model speaks while the user is still talking at least once
  user = span_mask(c.words_of("user"), len(c.user_wav))
  model = span_mask(c.words_of("model"), len(c.model_wav))
  assert (user & model).sum() > 0.2 * SR


def test_visual_and_counting_scenarios_have_video_events():
  for name in ("visual_event", "counting"):
    c = conv(name)
    assert c.video_events
    json.dumps(c.video_events)  # stored as json in the records
  count = conv("counting").events_of("count_answer")[0].data["count"]
  assert f"{count}" in " ".join(w.text for w in conv("counting").words_of("model"))


def test_record_types_load_without_the_generator():
  # conversation.py holds the types and records; it must not pull in the scenarios (which
  # import it back) nor eSpeak, so readers of a built corpus need neither.
  code = ("import sys, tml_jax.data.conversation; "
          "print(sorted(m for m in sys.modules if m.startswith('tml_jax.data.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['tml_jax.data.conversation']", out.stdout
  assert scenarios.generate.__module__ == "tml_jax.data.scenarios"
  assert list(scenarios.SCENARIOS)[:2] == ["turn_taking", "pause_handling"]


def _fingerprint(split, index):
  c = scenarios.generate(split, index, seed=11, duration_s=8.0)
  return (c.user_wav.tobytes(), c.model_wav.tobytes(), c.events_json(),
          json.dumps([vars(w) for w in c.words]), json.dumps(c.meta, sort_keys=True))


def test_same_seed_same_bytes_in_any_process():
  a = _fingerprint("train", 4)
  assert a == _fingerprint("train", 4)
  with multiprocessing.get_context("fork").Pool(1) as pool:  # a fresh engine in the child
    assert pool.apply(_fingerprint, ("train", 4)) == a
  assert _fingerprint("train", 5)[0] != a[0]
  assert _fingerprint("validation", 4)[0] != a[0]


def test_test_split_uses_only_held_out_voices_and_templates():
  train_v, test_v = set(speech.voices("train")), set(speech.voices("test"))
  assert not train_v & test_v
  every = C.HOLDOUT_EVERY
  for split in ("train", "test"):
    for i in range(len(scenarios.SCENARIOS)):
      c = scenarios.generate(split, i, seed=0, duration_s=8.0)
      pool = test_v if split == "test" else train_v
      assert c.meta["voices"]["user"]["name"] in pool
      assert c.meta["voices"]["other"]["name"] in pool
      held = [int(t.split(":")[1]) % every == every - 1 for t in c.meta["templates"]]
      assert held and all(held) if split == "test" else not any(held), (c.id, c.meta)
  assert all(len(getattr(templates, b)) >= every for b in
             ("TURN_PAIRS", "PAUSED_TURNS", "LONG_ANSWERS", "INTERRUPTIONS", "USER_STORIES",
              "BACKGROUND", "TO_OTHER", "REMINDERS", "PHRASES", "ARITHMETIC", "CLOCK", "FACTS",
              "CLOCK_NOW", "CHARTS"))


def test_tfds_build_reads_back(tmp_path):
  import ml_collections as mlc
  from tml_jax.data import tml_duplex

  cfg = mlc.ConfigDict(dict(num_train=3, num_validation=1, num_test=1, conversation_s=8.0,
                            seed=5, workers=1))
  tml_duplex.build(str(tmp_path), cfg)
  train = tml_duplex.load_split(str(tmp_path), "train")
  assert len(train) == 3 and len(tml_duplex.load_split(str(tmp_path), "test", cfg)) == 1
  r = train[1]
  n, f = 8 * SR, 8 * SR // HOP
  assert r["user_wav"].dtype == np.int16 and r["user_wav"].shape == (n,)
  assert r["model_wav"].dtype == np.int16 and r["model_wav"].shape == (n,)
  for k in ("user_dmel", "self_dmel"):
    assert r[k].dtype == np.uint8 and r[k].shape == (f, N_MELS) and r[k].max() <= 15
  assert r["model_mel"].dtype == np.float16 and r["model_mel"].shape == (f, N_MELS)
  back = tml_duplex.to_conversation(r)
  ref = scenarios.generate("train", 1, seed=5, duration_s=8.0)
  assert back.id == ref.id and back.scenario == ref.scenario
  assert [w.text for w in back.words] == [w.text for w in ref.words]
  assert np.allclose([w.start_s for w in back.words], [w.start_s for w in ref.words], atol=1e-5)
  assert back.events_json() == ref.events_json()
  assert np.abs(back.model_wav - ref.model_wav).max() < 1e-4
  # the cached features are the dMel of the stored channels
  from tml_jax.audio import dmel
  assert np.array_equal(r["self_dmel"], dmel.encode(r["model_wav"] / 32768)[:f])
  assert np.array_equal(r["user_dmel"], dmel.encode(r["user_wav"] / 32768)[:f])


def test_export_fdb_layout(tmp_path):
  import ml_collections as mlc
  from tml_jax.data import export_fdb

  cfg = mlc.ConfigDict(dict(num_test=1, conversation_s=DUR, seed=0))
  counts = export_fdb.export(str(tmp_path), "test", cfg, per_task=1)
  assert counts == {t: 1 for t in export_fdb.TASKS}
  ls = lambda task: sorted(os.listdir(tmp_path / task / "0"))
  v1 = ["annotations.json", "input.wav", "transcription.json"]
  assert ls("pause_handling") == sorted(v1 + ["pause.json"])
  assert ls("turn_taking") == sorted(v1 + ["turn_taking.json"])
  assert ls("backchannel") == sorted(v1 + ["backchannel.json"])
  assert ls("user_interruption") == sorted(v1 + ["context.wav", "interrupt.json",
                                                 "interrupt.wav"])
  for task in ("user_interruption", "user_backchannel", "talking_to_other",
               "background_speech"):
    assert ls(f"v1.5/{task}") == ["annotations.json", "clean_input.wav", "input.wav",
                                  "metadata.json"]
  gt = json.loads((tmp_path / "backchannel" / "gt_distribution.json").read_text())
  assert list(gt) == ["0"] and sum(gt["0"]) == pytest.approx(1.0)

  for wav in tmp_path.rglob("input.wav"):
    sr, x = scipy.io.wavfile.read(wav)
    ann = json.loads((wav.parent / "annotations.json").read_text())
    assert sr == 16000 and x.ndim == 1 and x.dtype == np.int16
    assert len(x) / sr == pytest.approx(ann["duration_s"], abs=1e-3)
    assert np.abs(x).max() > 1000  # the user speaks
    if (wav.parent / "clean_input.wav").exists():  # v1.5: overlaps silenced, rest equal
      _, clean = scipy.io.wavfile.read(wav.parent / "clean_input.wav")
      meta = json.loads((wav.parent / "metadata.json").read_text())
      a, b = (int(t * sr) for t in meta["timestamps"])
      assert not clean[a + 10:b - 10].any() and x[a:b].any()
      assert np.array_equal(clean[:a - 10], x[:a - 10])

  # A pause clip: the user's words, a silence of 0.6-2 s from pause.json's start, the
  # user's words again, and the clip ends with them (with the turn).
  ann = json.loads((tmp_path / "pause_handling" / "0" / "annotations.json").read_text())
  (pj,) = json.loads((tmp_path / "pause_handling" / "0" / "pause.json").read_text())
  user = [w for w in ann["words"] if w["speaker"] == "user" and w["end_s"] <= ann["duration_s"]
          + 1e-3]
  before = [w for w in user if w["end_s"] <= pj["timestamp"][0] + 1e-3]
  after = [w for w in user if w["start_s"] >= pj["timestamp"][0] + 0.6 - 1e-3]
  assert before and after and len(before) + len(after) == len(user)
  assert max(w["end_s"] for w in user) == pytest.approx(ann["duration_s"], abs=1e-3)
  assert pj["timestamp"][1] == pytest.approx(ann["duration_s"], abs=1e-3)
  # what the evaluators read: turn end = turn_taking.json timestamp[0], interrupt end = [1]
  tt = json.loads((tmp_path / "turn_taking" / "0" / "turn_taking.json").read_text())
  ann = json.loads((tmp_path / "turn_taking" / "0" / "annotations.json").read_text())
  assert tt[0]["timestamp"][0] == pytest.approx(ann["expected"]["user_turn_end_s"], abs=1e-3)
  (it,) = json.loads((tmp_path / "user_interruption" / "0" / "interrupt.json").read_text())
  assert set(it) == {"context", "interrupt", "timestamp"} and it["interrupt"] and it["context"]
  ann = json.loads((tmp_path / "user_interruption" / "0" / "annotations.json").read_text())
  assert it["timestamp"][0] == pytest.approx(ann["expected"]["interrupt_start_s"], abs=1e-3)


def test_video_events_render_and_match_the_annotations():
  from tml_jax.vision import synthetic

  for i in range(3):
    c = conv("counting", index=i)
    n = int(round(c.duration_s / C.CHUNK_S))
    frames, notes = synthetic.make_video(n, (80, 80), c.video_events, c.meta["video_seed"])
    assert frames.shape == (n, 80, 80, 3)
    (bounce,) = [a for a in notes if a["kind"] == "bouncing"]
    assert bounce["count"] == c.events_of("count_answer")[0].data["count"]
    c = conv("visual_event", index=i)
    frames, notes = synthetic.make_video(n, (80, 80), c.video_events, c.meta["video_seed"])
    seen = c.events_of("visual_event")
    assert [a["time_s"] for a in notes] == pytest.approx([e.start_s for e in seen])
    for e, a in zip(seen, notes):
      if a["kind"] == "object_appears":
        assert e.data["description"] == f"{a['color']} {a['shape']}"


@pytest.mark.parametrize("noise", ["white", "pink", "babble"])
def test_augmentation_hits_the_sampled_snr_and_echo(noise):
  from tml_jax.data import augment

  utt = speech.synth("Testing the microphone, one two three.", "en-us+m1")
  user = np.zeros(3 * SR, np.float32)
  user[SR // 2:SR // 2 + len(utt.wav)] = utt.wav
  model = np.roll(user, SR)  # something else for the echo
  params = augment.MicParams(noise=noise, snr_db=12.0, gain_db=-3.0, echo_delay_s=0.1,
                             echo_db=-20.0)
  pool = [utt.wav] * 3
  mic = augment.apply(params, np.random.default_rng(0), user, model, SR, pool)
  again = augment.apply(params, np.random.default_rng(0), user, model, SR, pool)
  assert np.array_equal(mic, again)
  direct = user * np.float32(10 ** (-3 / 20))
  echo = augment.echo(model, 0.1, -20.0, SR)
  noise_part = mic - direct - echo
  snr = 20 * np.log10(augment.rms(direct) / augment.rms(noise_part, active_only=False))
  assert snr == pytest.approx(12.0, abs=0.5)
  lag = np.argmax(np.correlate(echo[SR:2 * SR], model[SR - 3200:2 * SR], "valid"))
  assert abs((3200 - lag) / SR - 0.1) < 2e-3


def test_export_fdb_writes_only_where_it_owns_everything(tmp_path):
  """Never delete what it did not write: a foreign folder is refused and left byte-identical;
  an earlier export of its own is replaced; the cache is keyed by every setting."""
  import ml_collections as mlc
  from tml_jax.data import export_fdb

  def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

  cfg = mlc.ConfigDict(dict(num_test=1, conversation_s=DUR, seed=0))
  # A user's benchmark data (and nothing of ours) is refused before anything is written.
  user = tmp_path / "fdb_data"
  (user / "v1.5" / "user_interruption" / "0").mkdir(parents=True)
  (user / "v1.5" / "user_interruption" / "0" / "input.wav").write_bytes(b"real benchmark")
  before = snapshot(user)
  with pytest.raises(FileExistsError, match="did not write"):
    export_fdb.export(str(user), "test", cfg, per_task=1)
  assert snapshot(user) == before and not (user / export_fdb.MANIFEST).exists()

  out = tmp_path / "export"
  counts = export_fdb.ensure_export(str(out), "test", cfg, per_task=1, log=lambda m: None)
  manifest = json.loads((out / export_fdb.MANIFEST).read_text())
  assert manifest["complete"] and manifest["counts"] == counts
  assert set(manifest["files"]) == {str(p) for p in snapshot(out) if str(p) !=
                                    export_fdb.MANIFEST}
  # Same settings: reused as is. A model's output.wav beside an input is someone else's.
  first = snapshot(out)
  assert export_fdb.ensure_export(str(out), "test", cfg, per_task=1, log=None) == counts
  assert snapshot(out) == first
  (out / "turn_taking" / "0" / "output.wav").write_bytes(b"a model's answer")
  with pytest.raises(FileExistsError, match="output.wav"):
    export_fdb.export(str(out), "test", cfg, per_task=1)
  assert snapshot(out) == {**first, pathlib.Path("turn_taking/0/output.wav"):
                           b"a model's answer"}
  (out / "turn_taking" / "0" / "output.wav").unlink()
  # Another seed is another export: the cache is not keyed by per_task alone.
  cfg.seed = 1
  logged = []
  export_fdb.ensure_export(str(out), "test", cfg, per_task=1, log=logged.append)
  assert logged and json.loads((out / export_fdb.MANIFEST).read_text())["settings"][
      "data"]["seed"] == 1
  assert snapshot(out) != first
