"""Evaluation samples for the behaviours beyond turn-taking, beside Full-Duplex-Bench's tasks.

`python -m tml_jax.data.export_fdb --out=OUT --behaviours` writes them next to the
benchmark's folders (the main job does so too); `tml_jax.eval` scores them from the voice.
Each sample is cut from a held-out conversation of one task scenario, from its start:

  OUT/tasks/<behaviour>/<id>/
      input.wav         the USER channel (16 kHz mono int16), as in the benchmark's folders;
                        user speech after the behaviour's moment is silenced where a later
                        exchange would blur it (the reminder keeps the small talk between
                        the request and the firing: it must fire mid-conversation).
      video.npy         uint8 [chunks, H, W, 3], one frame per 200 ms chunk (visual_event,
                        counting): what the camera shows (tml_jax.vision.synthetic).
      annotations.json  the source conversation's events and words inside the clip, the
                        typed text (`typed_text` events are fed to a system as TEXT_IN; the
                        background results of the corpus are NOT: a system must delegate and
                        compute them itself), and `expected`:

  behaviour     expected
  delegation    behaviour=delegate_and_answer, question_end_s, tool, args, answer (the words
                to be spoken), reference_answer_s, typed (the question is a typed_text
                event, fed as TEXT_IN, instead of speech)
  reminder      behaviour=remind_when_due, tool, args, task, due_s (list: every firing the
                clip holds, a repeating reminder fires more than once), period_s
  visual_event  behaviour=remark_on_what_appears, appear_s (list), descriptions
  counting      behaviour=say_the_count, count, last_bounce_s
  translation   behaviour=translate_while_listening, lang, segments [{source, target,
                start_s, end_s}]
  typed_text    behaviour=answer_typed_text, typed_s, text, answer

A system takes the input as in any sample folder (tml_jax.interact reads video.npy); the
harness scores it with `tml_jax.eval.metrics.extra_metrics` on the ASR of its output.wav.
"""

from __future__ import annotations

from tml_jax.data.clips import Sample, next_speech

# task folder -> scenario its samples are cut from
BEHAVIOUR_TASKS = {"tasks/delegation": "delegation", "tasks/reminder": "reminder",
                   "tasks/visual_event": "visual_event", "tasks/counting": "counting",
                   "tasks/translation": "translation", "tasks/typed_text": "typed_text"}
TAIL_S = 3.0  # time after the reference behaviour's end that a slower system may still use


def _silence_after(conv, t: float, end: float) -> float:
  return min(end, next_speech(conv, t) - 0.05)


def _end(conv, t: float) -> float:
  return min(conv.duration_s, t + TAIL_S)


def _delegation(conv):
  dels = [e for e in conv.events_of("delegation") if e.data.get("purpose") != "reminder"]
  if not dels:
    return None
  d = dels[0]
  # A typed question (corpus 1.4.0) has no user turn: it ends when its last byte is read.
  q_end = d.data.get("question_end_s")
  if q_end is None:  # corpora before 1.3.0 record no question end: the turn before it
    q_end = [e for e in conv.events_of("user_turn") if e.end_s <= d.start_s + 1e-3][-1].end_s
  answer = next((e for e in conv.events_of("model_turn")
                 if e.data.get("responds_to") == "text_in" and e.start_s >= d.end_s), None)
  ref_end = answer.end_s if answer else d.end_s + 2.0
  end = _end(conv, ref_end)
  return Sample(end, {}, dict(
      behaviour="delegate_and_answer", question_end_s=q_end, tool=d.data["tool"],
      args=d.data.get("args"), answer=d.data["answer"], typed=bool(d.data.get("typed")),
      reference_answer_s=answer.start_s if answer else None),
      silence_from=_silence_after(conv, q_end, end))


def _reminder(conv):
  sets = conv.events_of("reminder_set")
  due = conv.events_of("reminder_due")
  if not sets or not due:
    return None
  r, d = sets[0], next(e for e in conv.events_of("delegation")
                       if e.data.get("purpose") == "reminder")
  end = _end(conv, due[-1].end_s)
  return Sample(end, {}, dict(
      behaviour="remind_when_due", tool=d.data["tool"], args=d.data.get("args"),
      task=r.data["task"], due_s=[e.data["due_s"] for e in due],
      period_s=r.data.get("period_s", 0.0)))


def _visual(conv):
  seen = conv.events_of("visual_event")
  if not seen:
    return None
  end = _end(conv, seen[-1].end_s)
  return Sample(end, {}, dict(
      behaviour="remark_on_what_appears", appear_s=[e.start_s for e in seen],
      descriptions=[e.data["description"] for e in seen]),
      silence_from=_silence_after(conv, seen[-1].start_s, end), video=True)


def _counting(conv):
  req, ans = conv.events_of("count_request"), conv.events_of("count_answer")
  if not req or not ans:
    return None
  end = _end(conv, ans[0].end_s)
  return Sample(end, {}, dict(behaviour="say_the_count", count=ans[0].data["count"],
                                  last_bounce_s=req[0].end_s),
                    silence_from=_silence_after(conv, req[0].end_s, end), video=True)


def _translation(conv):
  segs = conv.events_of("translation")
  if not segs:
    return None
  end = _end(conv, max(e.end_s for e in segs))
  return Sample(end, {}, dict(
      behaviour="translate_while_listening", lang=segs[0].data["lang"],
      segments=[dict(source=e.data["source"], target=e.data["target"], start_s=e.start_s,
                     end_s=e.end_s) for e in segs]),
      silence_from=_silence_after(conv, max(e.start_s for e in segs), end))


def _typed(conv):
  typed = conv.events_of("typed_text")
  if not typed:
    return None
  t = typed[0]
  answer = next((e for e in conv.events_of("model_turn")
                 if e.data.get("responds_to") == "text_in" and e.start_s >= t.start_s), None)
  if answer is None:
    return None
  end = _end(conv, answer.end_s)
  return Sample(end, {}, dict(behaviour="answer_typed_text", typed_s=t.start_s,
                                  text=t.data["text"], answer=answer.data["text"]),
                    silence_from=_silence_after(conv, t.start_s, end))


_PLANNERS = {"tasks/delegation": _delegation, "tasks/reminder": _reminder,
             "tasks/visual_event": _visual, "tasks/counting": _counting,
             "tasks/translation": _translation, "tasks/typed_text": _typed}


def plan(task: str, conv) -> "Sample | None":
  """The sample of behaviour `task` cut from `conv`, or None if it has no such moment."""
  if task not in _PLANNERS:
    raise ValueError(f"unknown behaviour task {task!r}; expected one of {sorted(_PLANNERS)}")
  return _PLANNERS[task](conv)
