"""Evaluation: the benchmark's rules on hand-made timelines, the Silero VAD, the ASR on
eSpeak speech, the harness (output.json comes from output.wav for every system), its
refusals and the report's shape."""

import difflib
import json
import os
import shutil

import numpy as np
import pytest
from conftest import built_once

from configs import interaction
from tml_jax import evaluate as ev
from tml_jax.audio import io as audio_io
from tml_jax.data import export_fdb, speech
from tml_jax.eval import asr, baselines, metrics, report, systems, vad

SR = 16000


# ---- v1 rules (FDB eval_smooth_turn_taking.py / eval_pause_handling.py) ---------------

def test_takes_turn_thresholds():
  w = lambda n, span: [(f"w{i}", 2.0 + i * span / n, 2.0 + (i + 1) * span / n)
                       for i in range(n)]
  assert not metrics.takes_turn([])
  assert not metrics.takes_turn(w(3, 0.9))   # 3 words in 0.9 s: a backchannel
  assert metrics.takes_turn(w(4, 0.5))       # more than 3 words, however fast
  assert metrics.takes_turn(w(1, 1.0))       # 1 s or longer, however few words
  assert not metrics.takes_turn(w(2, 0.99))


def test_turn_taking_latency_from_the_first_word():
  bc = [("mm-hmm", 2.2, 2.6)]
  assert metrics.turn_taking(bc, 2.0) == {"takeover": False, "latency_s": None}
  answer = [("the", 3.5, 3.6), ("capital", 3.6, 4.0), ("is", 4.0, 4.1), ("Paris", 4.1, 4.5)]
  # The whole transcript is one turn: latency runs to its first word, the backchannel.
  assert metrics.turn_taking(bc + answer, 2.0) == {"takeover": True, "latency_s": 0.2}
  # Speech that began before the turn end counts with latency 0 (FDB L76-80).
  early = [("so", 1.0, 1.2), ("anyway", 1.2, 1.8), ("here", 1.8, 2.1)]
  assert metrics.turn_taking(early, 2.0) == {"takeover": True, "latency_s": 0.0}
  assert metrics.pause_handling(early) == {"takeover": True}
  assert metrics.pause_handling([("okay", 2.76, 3.07)]) == {"takeover": False}


def test_interruption_uses_words_after_the_barge_in_and_stop_s():
  words = [("sorry", 4.3, 4.6), ("go", 4.6, 4.8), ("ahead", 4.8, 5.2), ("now", 5.2, 5.5)]
  segs = [(1.0, 2.1), (2.5, 2.6), (4.3, 5.5)]  # 0.4 s gap: merged with 1.0-2.1 (0.5 s rule)
  out = metrics.interruption(words, segs, 2.0, 3.5, 9.0)
  assert out["takeover"] and out["latency_s"] == pytest.approx(0.8)
  assert out["speaking"] and out["stop_s"] == pytest.approx(0.6) and not out["censored"]
  assert metrics.stop_time([(1.0, 9.0)], 2.0, 9.0)["censored"]
  assert not metrics.stop_time([(1.0, 2.0)], 2.0, 9.0)["speaking"]


def test_interruption_goal_share_counts_a_quick_stop_and_an_answer():
  from tml_jax.eval import report
  ms = [dict(takeover=True, speaking=False),                                # silent already
        dict(takeover=True, speaking=True, stop_s=0.3, censored=False),     # yields, answers
        dict(takeover=True, speaking=True, stop_s=0.7, censored=False),     # too slow
        dict(takeover=False, speaking=True, stop_s=0.2, censored=False),    # yields, no answer
        dict(takeover=True, speaking=True, stop_s=0.4, censored=True)]      # never stops
  out = report.summarise("user_interruption", ms)
  assert out["yield_then_answer_rate"] == pytest.approx(2 / 5)
  assert out["stop_s"] == pytest.approx((0.3 + 0.7 + 0.2 + 0.4) / 4)


def test_words_past_the_clip_end_are_dropped():
  out = {"chunks": [{"text": "b", "timestamp": [2.0, 2.5]}, {"text": " ", "timestamp": [0, 1]},
                    {"text": "x", "timestamp": [None, None]},
                    {"text": "a", "timestamp": [1.0, None]},
                    {"text": "late", "timestamp": [9.9, 10.4]},
                    {"text": "gone", "timestamp": [10.0, 10.2]}]}
  words = metrics.words_from_output(out)
  assert words[:2] == [("a", 1.0, 1.0), ("b", 2.0, 2.5)]
  assert metrics.clip(words, 10.0) == [("a", 1.0, 1.0), ("b", 2.0, 2.5), ("late", 9.9, 10.0)]
  assert metrics.clip(words, 10.0, start_s=1.5) == [("b", 2.0, 2.5), ("late", 9.9, 10.0)]


# ---- backchannel (FDB eval_backchannel.py) --------------------------------------------

def test_backchannel_rules_by_hand():
  words = [("yeah", 1.0, 1.3), ("right", 4.0, 4.2), ("so", 6.0, 6.2), ("what", 6.2, 6.5),
           ("happened", 6.5, 6.8)]
  # Three short segments: the last (3 words) decides TOR; all three count toward freq.
  out = metrics.backchannel(words, [(0.9, 1.4), (3.9, 4.3), (5.9, 6.9)], 10.0)
  assert out == {"takeover": True, "n_bc": 3, "freq": 0.3}
  # The same without the last segment: the last one scanned is a backchannel.
  assert not metrics.backchannel(words, [(0.9, 1.4), (3.9, 4.3)], 10.0)["takeover"]
  # A segment over 3 s takes the turn and ends the scan (later ones are not counted).
  out = metrics.backchannel(words, [(0.9, 1.4), (2.0, 5.5), (5.9, 6.9)], 10.0)
  assert out == {"takeover": True, "n_bc": 1, "freq": 0.1}
  # A 1 s segment with one word is a turn (duration >= 1), 0.9 s is not.
  assert metrics.backchannel([("mm", 1.0, 1.3)], [(1.0, 2.0)], 5.0)["takeover"]
  assert not metrics.backchannel([("mm", 1.0, 1.3)], [(1.0, 1.9)], 5.0)["takeover"]
  assert metrics.words_in(words, 4.1, 6.1) == ["right", "so"]  # overlaps at either edge


def test_backchannel_jsd_is_scipys_distance():
  gt = export_fdb.bc_distribution([[1.0, 1.3], [4.0, 4.2]], 10.0)
  np.testing.assert_allclose(metrics.bc_histogram([(1.0, 1.3), (4.0, 4.2)], 10.0), gt,
                             atol=1e-7)
  same = metrics.backchannel([], [(1.0, 1.3), (4.0, 4.2)], 10.0, gt)
  assert same["jsd"] == pytest.approx(0.0, abs=1e-3)
  assert metrics.backchannel([], [], 10.0, gt)["jsd"] == 1.0  # none at all (FDB L117-118)
  # Disjoint one-hot histograms: sqrt(ln 2), the natural-log distance's maximum.
  assert metrics.js_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(np.sqrt(np.log(2)),
                                                                      abs=1e-5)
  # The reference is resized to the prediction by linear interpolation.
  assert metrics.js_distance([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0


# ---- v1.5 timing (FDB get_timing.py) --------------------------------------------------

def test_v15_overlaps_and_response_gaps_by_hand():
  user = [(0.0, 2.0), (2.5, 3.0), (6.0, 7.0)]   # 0.5 s gap: merged (<= 0.6 s)
  model = [(2.8, 4.0), (4.4, 5.0), (7.5, 8.0)]  # 0.4 s gap: merged (<= 0.5 s)
  out = metrics.v15_timing(user, model, (6.0, 7.0), 9.0, "stop_then_respond")
  assert out["stop_intervals"] == [(2.8, 3.0)]
  assert out["response_intervals"] == [(7.0, 7.5)]  # the later user end wins the onset
  assert metrics.response_gaps([(0.0, 3.0), (6.0, 7.0)], [(2.8, 5.0), (7.5, 8.0)]) == [
      (7.0, 7.5)]
  assert metrics.response_gaps([(0.0, 1.0), (1.5, 2.0)], [(3.0, 4.0)]) == [(2.0, 3.0)]
  assert out["stop_latency_s"] == pytest.approx(0.2)
  assert out["timing_behaviour_ok"]
  # Shortest overlap per end time (ms): two user segments ending inside one model turn.
  assert metrics.overlaps([(0.0, 1.0), (1.5, 3.0)], [(0.5, 4.0)]) == [(0.5, 1.0), (1.5, 3.0)]
  assert metrics.timing_behaviour_ok([], (3.0, 4.0), 9.0, "stay_silent")
  assert not metrics.timing_behaviour_ok([(8.0, 8.5)], (3.0, 4.0), 9.0, "stay_silent")
  assert metrics.timing_behaviour_ok([(0.0, 9.0)], (3.0, 4.0), 9.0, "keep_talking")


def test_extra_metrics():
  deleg = {"kind": "delegation", "start_s": 2.0, "end_s": 4.0,
           "data": {"answer": "It is 42.", "arrival_s": 4.0}}
  said = [("okay", 2.1, 2.4), ("it", 4.5, 4.6), ("is", 4.6, 4.7), ("42", 4.7, 5.2)]
  assert metrics.background_answer(said, deleg) == {"correct": True, "latency_s": 0.5}
  assert not metrics.background_answer(said[:3], deleg)["correct"]
  rem = {"kind": "reminder_set", "start_s": 3.0, "end_s": 3.0,
         "data": {"task": "stretch", "due_s": 10.0, "delay_s": 7}}
  said = [("stretch", 4.0, 4.4), ("time", 10.5, 10.8), ("stretch", 10.9, 11.3)]
  assert metrics.reminder_error(said, rem) == {"said": True, "error_s": 0.9}
  req = {"kind": "count_request", "start_s": 1.0, "end_s": 6.0, "data": {}}
  events = [req, {"kind": "count_answer", "start_s": 6.5, "end_s": 7.0, "data": {"count": 3}}]
  assert metrics.extra_metrics([("three", 6.6, 6.9)], events)["counting"] == [
      {"said": 3, "correct": True}]


# ---- the Silero VAD -------------------------------------------------------------------

def test_vad_rules_on_probabilities():
  w = vad.WINDOW
  p = np.zeros(40)
  p[5:15] = 0.9   # 10 windows of speech
  p[15:17] = 0.4  # between the thresholds: still speech
  p[25:29] = 0.9  # 4 windows = 128 ms: too short after the 100 ms wait ends it
  pad = int(vad.SPEECH_PAD_S * SR)
  assert vad.speech_samples(p, 40 * w) == [(5 * w - pad, 17 * w + pad)]
  p = np.zeros(40)
  p[5:15] = p[18:22] = 0.9  # 96 ms below 0.35 between them is not yet a 100 ms silence
  assert vad.speech_samples(p, 40 * w) == [(5 * w - pad, 22 * w + pad)]
  p[36:] = 0.9  # still on at the end: runs to the end if over 250 ms, else dropped
  assert vad.speech_samples(p, 40 * w)[1:] == []
  assert vad.speech_samples(p, 48 * w)[1:] == [(36 * w - pad, 48 * w)]
  assert vad.rounded([(0.4666, 1.0333)], 1.0) == [(0.5, 1.0)]


def test_vad_silence_and_speech():
  assert vad.segments(np.zeros(3 * SR, np.float32)) == []
  utt = speech.synth("Hello there, how are you doing today?", speech.MODEL_VOICES[0])
  wav = np.concatenate([np.zeros(SR, np.float32), utt.wav, np.zeros(SR, np.float32)])
  segs = vad.segments(wav)
  assert segs and abs(segs[0][0] - 1.0) < 0.1 and abs(segs[-1][1] - 1.0 - utt.duration_s) < 0.2
  stream, on = vad.StreamingVad(), []
  for i in range(len(wav) // vad.WINDOW):
    stream.push(wav[i * vad.WINDOW:(i + 1) * vad.WINDOW])
    on.append(stream.in_speech)
  t_on = np.flatnonzero(on)[0] * vad.WINDOW_S
  assert 1.0 <= t_on + vad.WINDOW_S <= 1.15 and not on[-1]


# ---- the ASR -------------------------------------------------------------------------

SENTENCE = "That sounds great, thank you so much for your help."


@pytest.fixture(scope="module")
def utterance():
  return speech.synth(SENTENCE, speech.MODEL_VOICES[0])


def test_asr_recovers_an_espeak_sentence(utterance):
  words = asr.transcribe_wav(utterance.wav)
  ref = [asr.tokens(w)[0] for w, _, _ in utterance.words]
  hyp = [w for w, _, _ in words]
  blocks = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks()
  pairs = [(b.a + k, b.b + k) for b in blocks for k in range(b.size)]
  assert len(pairs) > len(ref) / 2, (ref, hyp)
  for i, j in pairs:  # the synthesiser's word times
    assert abs(words[j][1] - utterance.words[i][1]) < 0.3, (ref[i], words[j], utterance.words[i])
    assert abs(words[j][2] - utterance.words[i][2]) < 0.3, (ref[i], words[j], utterance.words[i])


def test_asr_of_vad_regions_maps_times_back(utterance, rng):
  offset = int(rng.integers(SR // 2, 6 * SR))
  wav = np.zeros(offset + len(utterance.wav) + 3 * SR, np.float32)
  wav[offset:offset + len(utterance.wav)] = utterance.wav
  t = asr.Transcriber(processes=1)
  alone, padded = asr.transcribe_wav(utterance.wav, transcriber=t), asr.transcribe_wav(wav)
  assert [w for w, _, _ in padded] == [w for w, _, _ in alone] and alone
  shift = offset / SR
  for (_, s0, e0), (_, s1, e1) in zip(alone, padded):
    assert s1 == pytest.approx(s0 + shift, abs=2e-3) and e1 == pytest.approx(e0 + shift, abs=2e-3)
  # Cropped like the benchmark's user-interruption transcripts: nothing before the crop.
  crop = shift + utterance.words[4][1]
  late = asr.transcribe_wav(wav, crop_s=crop)
  assert late and min(s for _, s, _ in late) >= crop - 1e-3  # times are kept to 1 ms
  assert len(late) < len(padded)


def test_asr_cache_identical_audio_once(utterance, tmp_path):
  pcm = asr.to_pcm(np.concatenate([utterance.wav, np.zeros(SR, np.float32), utterance.wav]))
  segs = vad.segments(pcm / 32768.0)
  asr._MEMO.clear()
  t = asr.Transcriber(processes=1, cache_dir=str(tmp_path))
  first, again = t.run([(pcm, segs, 0.0, len(pcm) / SR), (pcm, segs, 0.0, len(pcm) / SR)])
  assert first == again and first
  # Each half decoded once (a region per half, or per clause where eSpeak pauses in
  # digital silence): the second half and the whole second recording are cache hits.
  assert t.stats["decoded"] * 4 == t.stats["regions"]
  assert t.stats["cache_hits"] == 3 * t.stats["decoded"]
  asr._MEMO.clear()
  fresh = asr.Transcriber(processes=1, cache_dir=str(tmp_path))
  assert fresh.run([(pcm, segs, 0.0, len(pcm) / SR)])[0] == first
  assert fresh.stats["decoded"] == 0  # from the disk cache


# ---- the harness ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return built_once(tmp_path_factory, "fdb", lambda out: export_fdb.export(
      out, "test", interaction.get_config("tiny,smoke").data, per_task=2))


@pytest.fixture(scope="module")
def baseline_run(export_dir, tmp_path_factory):
  """(report folder, evaluate's result, samples.jsonl rows); one evaluation for both xdist
  workers, its result kept beside the report as evaluate returned it."""
  def run(out):
    result = ev.evaluate(export_dir, out, ["model", "vad_0.5s", "vad_0.8s", "silent",
                                           "always_talking"], plots=True, log=lambda *a: None)
    with open(f"{out}.result.json", "w") as f:
      json.dump(result, f)
  out = built_once(tmp_path_factory, "report", run)
  with open(f"{out}.result.json") as f:
    result = json.load(f)
  with open(os.path.join(out, "samples.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return out, result, rows


def _chunks(out, system, task, n="0"):
  with open(os.path.join(out, system, task, n, "output.json")) as f:
    return json.load(f)["chunks"]


def test_output_json_is_the_asr_of_output_wav(baseline_run):
  out, result, rows = baseline_run
  for task in ("turn_taking", "user_interruption", "v1.5/talking_to_other"):
    assert _chunks(out, "silent", task) == []
    assert len(_chunks(out, "always_talking", task)) > 10
  talked = [r for r in rows if r["system"] == "vad_0.5s" and r["kind"] == "turn_taking"]
  for r in talked:
    chunks = _chunks(out, "vad_0.5s", "turn_taking", r["sample"])
    assert chunks and all(any(a - 0.3 <= c["timestamp"][0] < b + 0.3 for a, b in r["segs"])
                          for c in chunks)  # every word where the VAD heard speech
  for r in rows:
    if r["kind"] == "user_interruption" and r["system"] == "always_talking":
      chunks = _chunks(out, r["system"], r["task"], r["sample"])
      assert min(c["timestamp"][0] for c in chunks) >= r["end_s"]  # cropped as FDB does
  assert result["timing"]["asr"]["cache_hits"] > 0  # the repeated utterances


def test_baselines_behave_as_designed(baseline_run):
  out, result, rows = baseline_run
  s = result["systems"]
  assert s["silent"]["turn_taking"]["tor"] == 0.0 and s["silent"]["pause_handling"]["tor"] == 0
  assert s["always_talking"]["pause_handling"]["tor"] == 1.0
  assert s["always_talking"]["user_interruption"]["n_never_stopped"] == 2
  assert s["vad_0.8s"]["user_interruption"]["stop_s"] < 0.6  # yields to a barge-in
  checked = 0
  for r in rows:  # after the user's turn end the cascade waits at least its endpoint
    if r["system"].startswith("vad_") and r["kind"] in ("turn_taking", "user_interruption"):
      end = r.get("turn_end_s", r.get("end_s"))
      starts = [c["timestamp"][0] for c in _chunks(out, r["system"], r["task"], r["sample"])]
      later = [t for t in starts if t >= end]
      if later:
        assert min(later) - end >= float(r["system"][4:-1]) - 0.1, (r, later)
        checked += 1
  assert checked >= 4
  wav, _ = audio_io.load_wav(os.path.join(out, "vad_0.5s", "turn_taking", "0", "output.wav"))
  inp, _ = audio_io.load_wav(os.path.join(result["data"], "turn_taking", "0", "input.wav"))
  assert len(wav) == len(inp)
  assert not os.path.exists(os.path.join(result["data"], "turn_taking", "0", "output.wav"))
  agree = result["agreement"]
  assert agree["always_talking"]["audible_share"] > 0.95
  assert agree["silent"]["monologue_words"] == 0 and agree["silent"]["wer"] is None


def test_report_shape(baseline_run):
  out, result, _ = baseline_run
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert set(rep) >= {"systems", "monologue", "agreement", "substitutes", "notes", "refused",
                      "reference", "models", "timing"}
  assert "unavailable" in rep["systems"]["model"] and any("model" in n for n in rep["notes"])
  for name in ("vad_0.5s", "vad_0.8s", "silent", "always_talking"):
    sys = rep["systems"][name]
    assert set(sys["turn_taking"]) >= {"tor", "latency_s", "n"}
    assert set(sys["user_interruption"]) >= {"tor", "latency_s", "stop_s", "n"}
    assert set(sys["backchannel"]) >= {"tor", "freq", "jsd", "n"}
    assert set(sys["v1.5/user_interruption"]) >= {"stop_latency_s", "response_latency_s", "n"}
    assert sys["turn_taking"]["n"] == 2 and sys["failed"] == 0
  for name in ("report.md", "latency_hist.png", "task_tor.png", "timeline_turn_taking.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  table = report.print_table(os.path.join(out, "report.json"), echo=False)
  assert "vad_0.8s" in table and "0.400" in table and "different ASR" in table
  assert "audio-text: ASR WER vs monologue" in table


def test_harness_refuses_broken_folders_and_goes_on(export_dir, tmp_path):
  data = str(tmp_path / "data")
  shutil.copytree(export_dir, data)
  os.remove(os.path.join(data, "turn_taking", "1", "input.wav"))
  with open(os.path.join(data, "user_interruption", "0", "interrupt.json"), "w") as f:
    f.write("{not json")
  logged = []
  result = ev.evaluate(data, str(tmp_path / "rep"), ["silent"], plots=False, log=logged.append)
  reasons = {r["folder"]: r["reason"] for r in result["refused"]}
  missing = os.path.join(data, "turn_taking", "1")
  broken = os.path.join(data, "user_interruption", "0")
  assert set(reasons) == {missing, broken}
  assert "input.wav" in reasons[missing] and "interrupt.json" in reasons[broken]
  s = result["systems"]["silent"]
  assert s["turn_taking"]["n"] == 1 and s["pause_handling"]["n"] == 2
  with pytest.raises(ValueError, match="inside --data"):
    ev.evaluate(export_dir, os.path.join(export_dir, "report"), ["silent"])


class _FakeEngine:
  """The engine contract: from_workdir(workdir, config) with .step, run_file(folder, out)
  writing output.wav and monologue.json. Its text says words its (silent) audio never does."""
  loaded = []
  step = 7

  @classmethod
  def from_workdir(cls, workdir, config):
    if workdir == "broken":
      raise RuntimeError("no checkpoint in broken/")
    cls.loaded.append((workdir, config))
    return cls()

  def run_file(self, folder, out_dir):
    if folder.endswith(os.path.join("turn_taking", "1")):
      raise RuntimeError("engine crashed on this one")
    wav, _ = audio_io.load_wav(os.path.join(folder, "input.wav"))
    baselines.write_output(out_dir, np.zeros(len(wav), np.float32),
                           [("hello", 0.5, 0.9), ("there", 0.9, 1.3), ("friend", 1.3, 1.7)])


def test_model_is_scored_on_its_voice_not_its_text(export_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(systems, "engine_class", lambda: _FakeEngine)
  result = ev.evaluate(export_dir, str(tmp_path / "rep"), ["model"], workdir="wd",
                       config={"x": 1}, plots=False, log=lambda *a: None)
  assert _FakeEngine.loaded == [("wd", {"x": 1})]  # loaded once, with the config
  assert result["models"] == {"model": {"workdir": "wd", "checkpoint_step": 7,
                                       "skipped_checkpoints": []}}
  model, text = result["systems"]["model"], result["monologue"]["model"]
  assert model["failed"] == 1 and [f["sample"] for f in result["failures"]] == ["1"]
  assert model["pause_handling"]["tor"] == 0.0 and text["pause_handling"]["tor"] == 1.0
  assert result["agreement"]["model"]["audible_share"] == 0.0
  table = report.table(result)
  assert "model (voice)" in table and "model text stream" in table and "step 7" in table
  result = ev.evaluate(export_dir, str(tmp_path / "rep2"), ["model", "silent"],
                       workdir="broken", plots=False, log=lambda *a: None)
  assert "no checkpoint" in result["systems"]["model"]["unavailable"]
  assert result["systems"]["silent"]["turn_taking"]["n"] == 2


def test_cli_fails_when_the_model_cannot_be_scored(export_dir, tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "rep")
  proc = subprocess.run(
      [sys.executable, "-m", "tml_jax.evaluate", f"--data={export_dir}", f"--out={out}",
       "--systems=model,silent", "--max_per_task=1"], cwd=root, capture_output=True,
      text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "| metric | better | model | silent |" in proc.stdout
  assert "baselines-only" in proc.stderr
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert rep["n_samples"]["turn_taking"] == 1 and "unavailable" in rep["systems"]["model"]
