"""Evaluation: metric functions on hand-made timelines, the VAD on corpus speech, the VAD
cascade's latency bound, the harness's refusals and the report's shape."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import interaction
from tml_jax.audio import io as audio_io
from tml_jax.data import export_fdb
from tml_jax.eval import baselines, metrics, report, vad
from tml_jax import evaluate as ev

SR = 16000


# ---- metrics on hand-made timelines ---------------------------------------------------

def test_takeover_no_speech_at_all():
  assert metrics.takeover([], 0.0) == (False, None)
  assert metrics.turn_taking([], 2.0) == {"takeover": False, "latency_s": None}
  assert metrics.pause_handling([], 3.0) == {"takeover": False}


def test_takeover_speech_from_t0_counts_in_pause_handling():
  words = [("well", 0.0, 0.3), ("I", 0.35, 0.4), ("think", 0.45, 0.8)]
  assert metrics.pause_handling(words, 5.0) == {"takeover": True}


def test_backchannel_is_not_a_takeover_but_an_answer_is():
  bc = [("mm-hmm", 2.2, 2.6)]
  assert metrics.turn_taking(bc, 2.0, 8.0) == {"takeover": False, "latency_s": None}
  # Two backchannels far apart are two utterances, each a backchannel.
  assert not metrics.takeover(bc + [("yeah", 5.0, 5.3)], 2.0, 8.0)[0]
  # A backchannel, then the answer: latency runs to the answer, not to the "mm-hmm".
  answer = [("the", 3.5, 3.6), ("capital", 3.6, 4.0), ("is", 4.0, 4.1), ("Paris", 4.1, 4.5)]
  out = metrics.turn_taking(bc + answer, 2.0, 8.0)
  assert out == {"takeover": True, "latency_s": 1.5}
  # Three words is more than a backchannel even when fast.
  assert metrics.takeover([("oh", 2.1, 2.2), ("I", 2.2, 2.3), ("see", 2.3, 2.4)], 2.0)[0]


def test_utterance_cut_by_the_clip_end_is_a_takeover():
  cut = [("Okay", 2.76, 3.07)]
  assert metrics.pause_handling(cut, 3.074)["takeover"]
  assert not metrics.pause_handling(cut, 5.0)["takeover"]  # ended well before: backchannel


def test_turn_taking_boundary_and_overlap():
  # A word starting exactly at the turn end counts, with latency 0.
  assert metrics.turn_taking([("yes", 2.0, 2.3), ("sure", 2.3, 2.8), ("thing", 2.8, 3.2)],
                             2.0) == {"takeover": True, "latency_s": 0.0}
  # Speech that started before the turn end (talking over the user) is not the response.
  early = [("so", 1.0, 1.2), ("anyway", 1.2, 1.8), ("here", 1.8, 2.1)]
  assert metrics.turn_taking(early, 2.0) == {"takeover": False, "latency_s": None}
  late = early + [("it", 2.9, 3.0), ("is", 3.0, 3.1), ("done", 3.1, 3.5)]
  assert metrics.turn_taking(late, 2.0)["latency_s"] == pytest.approx(0.9)


def test_stop_time_edges():
  segs = [(1.0, 3.0), (4.0, 10.0)]
  assert metrics.stop_time(segs, 2.0, 10.0) == {"speaking": True, "stop_s": 1.0,
                                                "censored": False}
  assert metrics.stop_time(segs, 1.0, 10.0)["stop_s"] == 2.0      # onset exactly at start
  assert not metrics.stop_time(segs, 3.0, 10.0)["speaking"]      # exactly at its end: silent
  assert metrics.stop_time(segs, 3.5, 10.0) == {"speaking": False, "stop_s": None,
                                                "censored": False}
  assert metrics.stop_time(segs, 5.0, 10.0)["censored"]          # never stopped in the clip
  assert not metrics.stop_time([], 0.0, 10.0)["speaking"]


def test_interruption_latency_and_stop():
  words = [("let", 1.0, 1.2), ("me", 1.2, 1.3), ("explain", 1.3, 1.8),
           ("sorry", 4.3, 4.6), ("go", 4.6, 4.8), ("ahead", 4.8, 5.2)]
  out = metrics.interruption(words, [(1.0, 2.4), (4.3, 5.2)], 2.0, 3.5, 9.0)
  assert out["takeover"] and out["latency_s"] == pytest.approx(0.8)
  assert out["speaking"] and out["stop_s"] == pytest.approx(0.4)


def test_v15_timing_and_behaviour():
  segs = [(0.5, 3.3), (5.0, 6.0)]
  out = metrics.v15_timing(segs, (3.0, 4.0), 9.0, "stop_then_respond")
  assert out == {"speaking_at_onset": True, "stop_latency_s": pytest.approx(0.3),
                 "censored": False, "response_latency_s": 1.0, "timing_behaviour_ok": True}
  assert metrics.timing_behaviour_ok([], (3.0, 4.0), 9.0, "stay_silent")
  assert not metrics.timing_behaviour_ok([(8.0, 8.5)], (3.0, 4.0), 9.0, "stay_silent")
  assert metrics.timing_behaviour_ok([(0.0, 9.0)], (3.0, 4.0), 9.0, "keep_talking")
  assert not metrics.timing_behaviour_ok([(0.0, 3.2)], (3.0, 4.0), 9.0, "keep_talking")
  assert not metrics.timing_behaviour_ok([(0.0, 9.0)], (3.0, 4.0), 9.0, "stop_then_respond")


def test_backchannel_freq_and_jsd():
  words = [("mm-hmm", 1.0, 1.3), ("yeah", 4.0, 4.2), ("so", 6.0, 6.2), ("what", 6.2, 6.5),
           ("happened", 6.5, 7.0)]
  gt = export_fdb.bc_distribution([[1.0, 1.3], [4.0, 4.2]], 10.0)
  out = metrics.backchannel(words, 10.0, gt, monologue_end_s=8.0)
  assert out["n_bc"] == 2 and out["freq"] == pytest.approx(0.2)
  assert out["takeover"]
  # Our histogram is the exporter's; the same timing has JSD 0, disjoint timing JSD 1.
  np.testing.assert_allclose(metrics.bc_histogram([(1.0, 1.3), (4.0, 4.2)], 10.0), gt,
                             atol=1e-7)
  assert metrics.backchannel(words[:2], 10.0, gt)["jsd"] == pytest.approx(0.0, abs=1e-6)
  far = metrics.backchannel([("mm", 8.0, 8.1)], 10.0, gt)
  assert far["jsd"] > 0.99 and not far["takeover"]
  # What starts after the monologue is a reply, not a takeover.
  assert not metrics.backchannel(words, 10.0, gt, monologue_end_s=5.0)["takeover"]
  assert metrics.jsd_bits([0.5, 0.5], [0.5, 0.5, 0.0]) == 0.0  # padded to the same length


def test_extra_metrics():
  deleg = {"kind": "delegation", "start_s": 2.0, "end_s": 4.0,
           "data": {"answer": "It is 42.", "arrival_s": 4.0}}
  said = [("okay", 2.1, 2.4), ("it", 4.5, 4.6), ("is", 4.6, 4.7), ("42", 4.7, 5.2)]
  assert metrics.background_answer(said, deleg) == {"correct": True, "latency_s": 0.5}
  assert not metrics.background_answer(said[:3], deleg)["correct"]
  rem = {"kind": "reminder_set", "start_s": 3.0, "end_s": 3.0,
         "data": {"task": "stretch", "due_s": 10.0, "delay_s": 7}}
  said = [("I'll", 3.3, 3.5), ("remind", 3.5, 3.8), ("you", 3.8, 3.9), ("to", 3.9, 4.0),
          ("stretch", 4.0, 4.4), ("time", 10.5, 10.8), ("to", 10.8, 10.9),
          ("stretch", 10.9, 11.3)]
  assert metrics.reminder_error(said, rem) == {"said": True, "error_s": 0.9}
  assert metrics.reminder_error(said[:5], rem) == {"said": False, "error_s": None}
  assert metrics.reminder_error(said[5:], rem) == {"said": True, "error_s": 0.9}  # no ack
  early = [("stretch", 8.0, 8.4)]
  assert metrics.reminder_error(early, rem) == {"said": True, "error_s": -2.0}
  vis = {"kind": "visual_event", "start_s": 5.0, "end_s": 6.0,
         "data": {"description": "red circle"}}
  out = metrics.visual_interjection([("a", 5.6, 5.7), ("red", 5.7, 5.9), ("circle", 5.9, 6.2)],
                                    vis)
  assert out == {"latency_s": pytest.approx(0.6), "mentions": True}
  req = {"kind": "count_request", "start_s": 1.0, "end_s": 6.0, "data": {}}
  events = [req, {"kind": "count_answer", "start_s": 6.5, "end_s": 7.0, "data": {"count": 3}}]
  assert metrics.extra_metrics([("three", 6.6, 6.9)], events)["counting"] == [
      {"said": 3, "correct": True}]
  assert metrics.extra_metrics([("4", 6.6, 6.9)], events)["counting"][0]["correct"] is False


def test_words_from_output_skips_empty_and_untimed():
  out = {"text": "a b", "chunks": [{"text": "b", "timestamp": [2.0, 2.5]},
                                   {"text": " ", "timestamp": [0.0, 0.1]},
                                   {"text": "x", "timestamp": [None, None]},
                                   {"text": "a", "timestamp": [1.0, None]}]}
  assert metrics.words_from_output(out) == [("a", 1.0, 1.0), ("b", 2.0, 2.5)]
  assert metrics.words_from_output({}) == []


# ---- the VAD --------------------------------------------------------------------------

def test_vad_silence_and_steady_noise(rng):
  cfg = vad.VadConfig()
  assert vad.segments(np.zeros(3 * SR, np.float32)) == []
  noise = (0.01 * rng.standard_normal(6 * SR)).astype(np.float32)
  # Noise from t = 0 is only speech while the quiet-room prior lasts.
  assert all(b <= cfg.floor_prior_s + 0.05 for _, b in vad.segments(noise, cfg))
  # Noise after digital silence becomes the floor once the silence leaves the window.
  late = np.concatenate([np.zeros(2 * SR, np.float32), noise])
  assert all(b <= 2.0 + cfg.floor_window_s + 0.05 for _, b in vad.segments(late, cfg))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fdb"))
  cfg = interaction.get_config("tiny,smoke").data
  export_fdb.export(out, "test", cfg, per_task=2)
  return out


def _user_words(folder):
  """The user's words up to the sample's reference time (later ones may be silenced)."""
  with open(os.path.join(folder, "annotations.json")) as f:
    ann = json.load(f)
  end = ann["expected"].get("user_turn_end_s") or ann["expected"].get("pause_start_s")
  if end is None:
    with open(os.path.join(folder, "interrupt.json")) as f:
      end = json.load(f)[0]["timestamp"][1]
  return [(w["start_s"], w["end_s"]) for w in ann["words"]
          if w["speaker"] == "user" and w["end_s"] <= end + 1e-3], ann


@pytest.mark.parametrize("snr_db", [None, 20.0])
def test_vad_finds_corpus_speech(export_dir, snr_db, rng):
  recall = []
  for task in ("turn_taking", "user_interruption", "pause_handling"):
    for n in ("0", "1"):
      folder = os.path.join(export_dir, task, n)
      wav, _ = audio_io.load_wav(os.path.join(folder, "input.wav"))
      words, _ = _user_words(folder)
      end = words[-1][1]
      if snr_db is not None:
        rms = np.sqrt(np.mean(np.square(wav[wav != 0])))
        wav = wav + (rng.standard_normal(len(wav)) * rms * 10**(-snr_db / 20)).astype(
            np.float32)
      segs = [(a, min(b, end)) for a, b in vad.segments(wav) if a < end]
      covered = sum(metrics._sounding(segs, a, b) for a, b in words)
      total = sum(b - a for a, b in words)
      recall.append(covered / total)
      # Little speech where nobody speaks (a frame of slack around each word).
      assert sum(b - a for a, b in segs) - covered <= 0.05 * len(words) + 0.6, (task, segs)
  assert min(recall) >= (0.97 if snr_db is None else 0.6), recall
  assert np.mean(recall) >= (0.99 if snr_db is None else 0.8), recall


def test_vad_speech_from_t0(export_dir):
  wav, _ = audio_io.load_wav(os.path.join(export_dir, "turn_taking", "0", "input.wav"))
  words, _ = _user_words(os.path.join(export_dir, "turn_taking", "0"))
  start = int(words[0][0] * SR)
  segs = vad.segments(wav[start:])
  assert segs and segs[0][0] <= 0.05


# ---- the baselines and the harness ----------------------------------------------------

@pytest.fixture(scope="module")
def baseline_run(export_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("report"))
  result = ev.evaluate(export_dir, out, ["model", "vad_0.5s", "vad_0.8s", "silent",
                                         "always_talking"], plots=True, log=lambda *a: None)
  with open(os.path.join(out, "samples.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return out, result, rows


def test_cascade_latency_never_below_its_endpoint(baseline_run):
  _, _, rows = baseline_run
  checked = 0
  for r in rows:
    if r["system"].startswith("vad_") and r["kind"] in ("turn_taking", "user_interruption"):
      endpoint = float(r["system"][4:-1])
      assert "error" not in r, r
      lat = r["metrics"]["latency_s"]
      assert lat is not None and lat >= endpoint - 1e-6, (r["system"], r["task"], lat)
      checked += 1
  assert checked == 8


def test_baselines_behave_as_designed(baseline_run):
  out, result, _ = baseline_run
  s = result["systems"]
  assert s["silent"]["turn_taking"]["tor"] == 0.0 and s["silent"]["pause_handling"]["tor"] == 0
  assert s["always_talking"]["pause_handling"]["tor"] == 1.0
  assert s["always_talking"]["user_interruption"]["n_never_stopped"] == 2
  # The cascade yields to a barge-in within its 0.2 s barge-in window plus VAD frames.
  assert s["vad_0.8s"]["user_interruption"]["stop_s"] < 0.5
  # Outputs are time-aligned with the input and never written into the data folder.
  wav, _ = audio_io.load_wav(os.path.join(out, "vad_0.5s", "turn_taking", "0", "output.wav"))
  inp, _ = audio_io.load_wav(os.path.join(result["data"], "turn_taking", "0", "input.wav"))
  assert len(wav) == len(inp)
  assert not os.path.exists(os.path.join(result["data"], "turn_taking", "0", "output.wav"))


def test_report_shape(baseline_run):
  out, result, _ = baseline_run
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert set(rep) >= {"systems", "substitutes", "notes", "refused", "reference"}
  assert "unavailable" in rep["systems"]["model"]  # no workdir: baselines still ran
  assert any("model" in n for n in rep["notes"])
  for name in ("vad_0.5s", "vad_0.8s", "silent", "always_talking"):
    sys = rep["systems"][name]
    assert set(sys["turn_taking"]) >= {"tor", "latency_s", "n"}
    assert set(sys["pause_handling"]) >= {"tor", "n"}
    assert set(sys["user_interruption"]) >= {"tor", "latency_s", "stop_s", "n"}
    assert set(sys["backchannel"]) >= {"tor", "freq", "jsd", "n"}
    assert set(sys["v1.5/user_interruption"]) >= {"stop_latency_s", "response_latency_s", "n"}
    assert sys["turn_taking"]["n"] == 2 and sys["failed"] == 0
  for name in ("report.md", "latency_hist.png", "task_tor.png", "timeline_turn_taking.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  table = report.print_table(os.path.join(out, "report.json"), echo=False)
  assert "vad_0.8s" in table and "0.400" in table and "77.800" in table


def test_harness_refuses_broken_folders_and_goes_on(export_dir, tmp_path):
  data = str(tmp_path / "data")
  shutil.copytree(export_dir, data)
  os.remove(os.path.join(data, "turn_taking", "1", "input.wav"))
  with open(os.path.join(data, "user_interruption", "0", "interrupt.json"), "w") as f:
    f.write("{not json")
  logged = []
  result = ev.evaluate(data, str(tmp_path / "rep"), ["silent"], plots=False,
                       log=logged.append)
  reasons = {r["folder"]: r["reason"] for r in result["refused"]}
  missing = os.path.join(data, "turn_taking", "1")
  broken = os.path.join(data, "user_interruption", "0")
  assert set(reasons) == {missing, broken}
  assert missing in reasons[missing] and "input.wav" in reasons[missing]
  assert broken in reasons[broken] and "interrupt.json" in reasons[broken]
  assert len(logged) == 3  # two refusals and the system's summary line
  s = result["systems"]["silent"]
  assert s["turn_taking"]["n"] == 1 and s["user_interruption"]["n"] == 1
  assert s["pause_handling"]["n"] == 2


def test_harness_never_writes_into_the_data(export_dir):
  with pytest.raises(ValueError, match="inside --data"):
    ev.evaluate(export_dir, os.path.join(export_dir, "report"), ["silent"])


class _Oracle:
  """Says the delegated answer 0.5 s after the result arrives."""
  name = "oracle"

  def run_sample(self, sample, out_dir):
    ann = sample.files["annotations.json"]
    d = next(e for e in ann["events"] if e["kind"] == "delegation")
    t = d["data"]["arrival_s"] + 0.5
    words = [(w, t + 0.3 * i, t + 0.3 * i + 0.25) for i, w in
             enumerate(d["data"]["answer"].split())]
    baselines.write_output(out_dir, np.zeros(int(sample.duration_s * SR), np.float32), words)


def test_extra_metrics_through_the_harness(tmp_path):
  folder = tmp_path / "data" / "delegation" / "0"
  folder.mkdir(parents=True)
  audio_io.save_wav(str(folder / "input.wav"), np.zeros(8 * SR, np.float32))
  ann = {"events": [{"kind": "delegation", "start_s": 1.0, "end_s": 3.0,
                     "data": {"answer": "It is twelve degrees.", "arrival_s": 3.0}}]}
  (folder / "annotations.json").write_text(json.dumps(ann))
  result = ev.evaluate(str(tmp_path / "data"), str(tmp_path / "rep"), [_Oracle(), "silent"],
                       plots=False, log=lambda *a: None)
  assert result["systems"]["oracle"]["extra"]["background_answer"] == {
      "acc": 1.0, "latency_s": 0.5, "n": 1}
  assert result["systems"]["silent"]["extra"]["background_answer"]["acc"] == 0.0


class _FakeEngine:
  """The tml_jax.interact contract: from_workdir(workdir, config), run_file(input, out_dir)."""
  loaded = []

  @classmethod
  def from_workdir(cls, workdir, config):
    if workdir == "broken":
      raise RuntimeError("no checkpoint in broken/")
    cls.loaded.append((workdir, config))
    return cls()

  def run_file(self, input_path, out_dir):
    if input_path.endswith(os.path.join("turn_taking", "1")):
      raise RuntimeError("engine crashed on this one")
    wav, _ = audio_io.load_wav(os.path.join(input_path, "input.wav"))
    t = 1.0
    baselines.write_output(out_dir, np.zeros(len(wav), np.float32),
                           [("hello", t, t + 0.4), ("there", t + 0.4, t + 0.8),
                            ("friend", t + 0.8, t + 1.2)])


def test_model_system_through_the_engine_contract(export_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(ev, "engine_class", lambda: _FakeEngine)
  result = ev.evaluate(export_dir, str(tmp_path / "rep"), ["model"], workdir="wd",
                       config={"x": 1}, plots=False, log=lambda *a: None)
  assert _FakeEngine.loaded == [("wd", {"x": 1})]  # loaded once, with the config
  model = result["systems"]["model"]
  assert model["failed"] == 1 and model["turn_taking"]["n"] == 1
  assert [f["sample"] for f in result["failures"]] == ["1"]
  assert model["pause_handling"]["tor"] == 1.0
  assert os.path.exists(tmp_path / "rep" / "model" / "v1.5" / "talking_to_other" / "0" /
                        "output.json")
  result = ev.evaluate(export_dir, str(tmp_path / "rep2"), ["model", "silent"],
                       workdir="broken", plots=False, log=lambda *a: None)
  assert "no checkpoint" in result["systems"]["model"]["unavailable"]
  assert result["systems"]["silent"]["turn_taking"]["n"] == 2


def test_cli(export_dir, tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "rep")
  proc = subprocess.run(
      [sys.executable, "-m", "tml_jax.evaluate", f"--data={export_dir}", f"--out={out}",
       "--systems=model,silent", "--max_per_task=1"], cwd=root, capture_output=True,
      text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| metric | better | model | silent |" in proc.stdout
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert rep["n_samples"]["turn_taking"] == 1
  assert "unavailable" in rep["systems"]["model"]
