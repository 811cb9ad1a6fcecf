"""The behaviour samples beyond turn-taking (tml_jax.data.export_tasks) and their scores
(tml_jax.eval.behaviours): by hand on random timings, and end to end through the harness with
an oracle that plays the corpus' own model voice and logs the events the engine would."""

import json
import os

import numpy as np
import pytest

from configs import interaction
from tml_jax.audio import io as audio_io
from tml_jax.data import export_fdb, scenarios
from tml_jax.data.export_tasks import BEHAVIOUR_TASKS
from tml_jax.eval import baselines, behaviours as B, harness, report


def _words(text: str, t0: float, step: float = 0.3):
  return [(w, t0 + i * step, t0 + i * step + 0.25) for i, w in enumerate(text.split())]


def test_numbers_are_compared_as_spoken_words(rng):
  n = int(rng.integers(0, 10_000))
  words = B.number_words(n)
  assert B._spoken_numbers([str(n)]) == words
  assert B.first_number(["i", "see"] + B.number_words(int(rng.integers(0, 100)))) is not None
  k = int(rng.integers(21, 100))
  assert B.first_number(B.number_words(k)) == k
  assert B.key_tokens(f"{k} plus 1 is {k + 1}.", f"{k} + 1 = {k + 1}") == list(
      dict.fromkeys(B.number_words(k) + ["one"] + B.number_words(k + 1)))


def test_delegation_score_needs_the_chain_and_the_words_after_the_result(rng):
  q_end = float(rng.uniform(1, 5))
  d_at, r_at = q_end + float(rng.uniform(0.2, 0.6)), q_end + float(rng.uniform(1.5, 3.5))
  expected = dict(behaviour="delegate_and_answer", question_end_s=q_end, tool="calculator",
                  args="12 * 3", answer="12 times 3 is 36.")
  ann = [dict(kind="delegation", start_s=d_at, end_s=r_at,
              data=dict(result_text="12 * 3 = 36", answer=expected["answer"]))]
  events = [dict(kind="delegation", time_s=d_at), dict(kind="tool_call", tool="calculator",
                                                      time_s=d_at + 0.1),
            dict(kind="background_result", time_s=r_at)]
  spoken = _words("twelve times three is thirty six", r_at + 0.4)
  (m,) = B.score(expected, ann, spoken, events)["delegation"]
  assert m["delegated"] and m["tool_called"] and m["result"] and m["correct"]
  assert not m["args_right"] and not m["typed"]  # the call logged no args
  events[1]["args"] = " 12 * 3"
  (m,) = B.score(dict(expected, typed=True), ann, spoken, events)["delegation"]
  assert m["args_right"] and m["typed"]
  events[1]["args"] = "12 * 4"
  assert not B.score(expected, ann, spoken, events)["delegation"][0]["args_right"]
  events[1]["args"] = "12 * 3"
  assert m["compute_s"] == pytest.approx(r_at - d_at, abs=1e-3)
  assert m["weave_s"] == pytest.approx(0.4, abs=1e-3)
  assert m["latency_s"] == pytest.approx(r_at + 0.4 - q_end, abs=1e-3)
  wrong = _words("twelve times three is thirty five", r_at + 0.4)
  assert not B.score(expected, ann, wrong, events)["delegation"][0]["correct"]
  # A guess before the result, or a system that cannot delegate: not a delegated answer.
  early = _words("twelve times three is thirty six", d_at - 1.0)
  assert not B.score(expected, ann, early, events)["delegation"][0]["correct"]
  (base,) = B.score(expected, ann, spoken, None)["delegation"]
  assert not base["delegated"] and not base["tool_called"] and base["compute_s"] is None


def test_reminder_visual_count_translation_typed_by_hand(rng):
  due, period = float(rng.uniform(6, 9)), float(rng.integers(4, 7))
  fires = [np.ceil((due + k * period) / 0.2) * 0.2 for k in range(2)]
  ann = [dict(kind="reminder_set", start_s=1.0, end_s=1.5,
              data=dict(due_s=due, task="stretch", period_s=period))]
  for f in fires:
    ann += [dict(kind="reminder_due", start_s=f + 0.25, end_s=f + 1.5, data=dict(due_s=f)),
            dict(kind="model_turn", start_s=f + 0.25, end_s=f + 1.5,
                 data=dict(text="Time to stretch again."))]
  expected = dict(behaviour="remind_when_due", task="stretch", period_s=period,
                  due_s=[round(f, 3) for f in fires])
  lag = float(rng.uniform(0.1, 0.9))
  words = _words("okay I will remind you to stretch", 1.0) + _words("time to stretch", due + lag)
  events = [dict(kind="reminder", time_s=fires[0], due_s=due)]
  first, second = B.score(expected, ann, words, events)["reminder_timing"]
  assert first["said"] and first["error_s"] == pytest.approx(lag, abs=1e-3) and first["fired"]
  assert not second["said"] and not second["fired"]  # the second firing was never said

  t = float(rng.uniform(2, 6))
  exp = dict(behaviour="remark_on_what_appears", appear_s=[t], descriptions=["red star"])
  (v,) = B.score(exp, [], _words("oh a red star", t + 0.6), None)["visual"]
  assert v["latency_s"] == pytest.approx(0.6, abs=1e-3) and v["mentions"]

  n = int(rng.integers(2, 7))
  exp = dict(behaviour="say_the_count", count=n, last_bounce_s=5.0)
  ann = [dict(kind="count_request", start_s=1.0, end_s=5.0, data={})]
  assert B.score(exp, ann, _words(f"it bounced {' '.join(B.number_words(n))} times", 5.5),
                 None)["count"][0]["correct"]
  assert not B.score(exp, ann, _words("it bounced nine times", 5.5), None)["count"][0]["correct"]

  seg = dict(source="Merci beaucoup.", target="Thank you very much.", start_s=3.0, end_s=4.0)
  exp = dict(behaviour="translate_while_listening", segments=[seg])
  (tr,) = B.score(exp, [], _words("thank you very much", 4.1), None)["translation"]
  assert tr["recall"] == 1.0 and tr["lag_s"] == pytest.approx(1.1, abs=1e-3)
  exp = dict(behaviour="answer_typed_text", typed_s=1.0, answer="Take a walk in the park.")
  assert B.score(exp, [], _words("take a walk in the park", 1.8), None)["typed_text"][0][
      "correct"]


class _Oracle:
  """Plays the corpus' own model channel of each behaviour sample and logs the events the
  engine would (delegation, tool call, background result, fired reminders)."""
  name = "oracle"

  def __init__(self, data_cfg):
    self.data_cfg = data_cfg

  def run_sample(self, sample, out_dir):
    ann = sample.files["annotations.json"]
    conv = scenarios.generate(ann["split"], ann["meta"]["index"], ann["meta"]["seed"],
                              float(self.data_cfg.conversation_s), ann["scenario"],
                              clean_mic=True)
    n = int(round(sample.duration_s * audio_io.SAMPLE_RATE))
    wav = np.zeros(n, np.float32)
    wav[:min(n, len(conv.model_wav))] = conv.model_wav[:n]
    said = [(w.text, w.start_s, w.end_s) for w in conv.words_of("model")
            if w.start_s < sample.duration_s]
    baselines.write_output(out_dir, wav, said)  # its "text stream": the reference's words
    events = []
    for e in conv.events:
      if e.kind == "delegation":
        events += [dict(kind="delegation", time_s=e.start_s),
                   dict(kind="tool_call", tool=e.data["tool"], args=e.data.get("args", ""),
                        time_s=e.start_s + 0.3),
                   dict(kind="background_result", time_s=e.data["arrival_s"])]
    fired = [t for t, x in conv.text_in if x.startswith("reminder: ")]
    sets = conv.events_of("reminder_set")
    for k, t in enumerate(fired):
      events.append(dict(kind="reminder", time_s=t, due_s=sets[0].data["due_s"]
                         + k * sets[0].data["period_s"]))
    with open(os.path.join(out_dir, "events.jsonl"), "w") as f:
      f.write("".join(json.dumps(e) + "\n" for e in events))


def test_behaviour_samples_export_and_score_from_the_voice(tmp_path):
  data_cfg = interaction.get_config("tiny").data
  out = str(tmp_path / "export")
  counts = export_fdb.export(out, "test", data_cfg, per_task=1, behaviours=True)
  assert all(counts[t] == 1 for t in BEHAVIOUR_TASKS), counts
  for task in ("tasks/visual_event", "tasks/counting"):
    video = np.load(os.path.join(out, task, "0", "video.npy"))
    wav, _ = audio_io.load_wav(os.path.join(out, task, "0", "input.wav"))
    assert video.dtype == np.uint8 and video.shape[0] == int(np.ceil(len(wav) / 3200 - 1e-6))
  result = harness.evaluate(os.path.join(out, "tasks"), str(tmp_path / "rep"), [_Oracle(data_cfg), "silent"],
                            plots=False, log=lambda *a: None)
  oracle, silent = result["systems"]["oracle"]["extra"], result["systems"]["silent"]["extra"]
  # The reference's own words score every behaviour as the corpus meant it.
  text = result["monologue"]["oracle"]["extra"]
  assert text["delegation"]["acc"] == 1.0 and text["delegation"]["links"] == dict(
      delegated=1, tool_called=1, args_right=1, result=1, spoken=1, correct=1), text[
          "delegation"]
  # One sample: it is summarised in exactly one of the typed / spoken groups.
  group, other = (("delegation_typed", "delegation_spoken") if "delegation_typed" in text
                  else ("delegation_spoken", "delegation_typed"))
  assert text[group] == text["delegation"] and other not in text
  rem = text["reminder_timing"]
  assert rem["said_rate"] == 1.0 and rem["fired_rate"] == 1.0, rem
  assert 0.2 - 1e-3 <= rem["error_s"] <= 0.55 + 1e-3, rem  # the next micro-turn, after the poll
  assert text["visual"]["within_1s"] == 1.0 and text["visual"]["mention_rate"] == 1.0
  assert text["count"]["acc"] == 1.0 and text["typed_text"]["acc"] == 1.0
  assert text["translation"]["recall"] > 0.95
  # Its voice through the ASR is heard less well (eSpeak through pocketsphinx), but heard.
  assert oracle["delegation"]["links"]["delegated"] == 1
  assert oracle["reminder_timing"]["said_rate"] > 0 or oracle["typed_text"]["acc"] > 0
  assert oracle["translation"]["recall"] > 0.2, oracle["translation"]
  for group, key in (("delegation", "acc"), ("reminder_timing", "said_rate"),
                     ("visual", "within_1s"), ("count", "acc"), ("typed_text", "acc")):
    assert silent[group][key] == 0.0, (group, silent[group])
  table = report.table(result)
  assert "delegation: spoken answer correct" in table and "reminder: fired by the tool" in table
