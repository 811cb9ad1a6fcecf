"""Turn-taking scenarios: when the model speaks, keeps quiet, yields or keeps the floor.

Each function fills a `Scene` and annotates what the model should do (event kinds in the
`conversation` module docstring): take the turn when the user ends, wait through pauses,
keep talking through the user's backchannels, backchannel itself, stop when interrupted,
ignore speech not addressed to it. These are the behaviours Full-Duplex-Bench scores
(`export_fdb` cuts its samples from them). The registry is `scenarios.SCENARIOS`.

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

from tml_jax.data import speech
from tml_jax.data import templates as T
from tml_jax.data.scene import Scene


def turn_taking(s: Scene):
  """Question, answer after 0.2-0.6 s, again: the model takes the turn when the user ends."""
  s.fill_exchanges()


def pause_handling(s: Scene):
  """A user turn broken by 0.6-2 s pauses after unfinished syntax and fillers: the model
  waits for the end of the turn. The turn is one synthesis cut at the pauses, so what comes
  before a pause keeps its unfinished intonation (`Scene.say_paused`)."""
  fragments, answer = s.pick(T.PAUSED_TURNS, "paused_turns")
  fragments, answer = [s.fill(f) for f in fragments], s.fill(answer)
  pieces = [f"{frag}, {s.choice(T.FILLERS)}," if i < len(fragments) - 1
            and s.rng.random() < 0.7 else frag for i, frag in enumerate(fragments)]
  pauses = [s.uniform(0.6, 2.0) for _ in pieces[:-1]]
  spans = s.say_paused("user", pieces, pauses, s.t)
  if not spans:
    return
  t = spans[-1][1]
  s.event("user_turn", spans[0][0], t, text=" ".join(pieces[:len(spans)]))
  lat = s.latency()
  model = s.say("model", answer, t + lat)
  if model is not None:
    s.event("model_turn", *model, text=answer, latency_s=lat)
  s.t = (model[1] if model else t) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def _long_answer(s: Scene) -> tuple[tuple[float, float], str, speech.Utterance, float] | None:
  """User asks for an explanation; returns the model's (planned) long answer, not yet placed."""
  q, a = s.pick(T.LONG_ANSWERS, "long_answers")
  q, a = s.fill(q), s.fill(a)
  user = s.say("user", q, s.t)
  if user is None:
    return None
  s.event("user_turn", *user, text=q)
  return user, a, s.synth("model", a), s.latency()


def _explaining(s: Scene) -> tuple[float, float, speech.Utterance] | None:
  """The user asks for an explanation and the model gives it in full: (start, end, audio)."""
  planned = _long_answer(s)
  if planned is None:
    return None
  user, text, utt, lat = planned
  start = user[1] + lat
  end = s.place("model", utt, start)
  if end is None:
    return None
  s.event("model_turn", start, end, text=text, latency_s=lat)
  return start, end, utt


def user_backchannel(s: Scene):
  """The user says "mm-hmm" while the model explains: the model keeps talking."""
  explained = _explaining(s)
  if explained is None:
    return
  start, end, utt = explained
  # Backchannels land in the model's between-word gaps, at least 1.2 s apart.
  gaps = [start + a[2] for a, b in zip(utt.words, utt.words[1:]) if b[1] > a[2]]
  last = start + 0.8
  for g in gaps:
    if g - last >= 1.2 and g + 0.6 < end and s.rng.random() < 0.5:
      bc = s.choice(T.USER_BACKCHANNELS)
      span = s.say("user", bc, g + s.uniform(0.0, 0.15))
      if span:
        s.event("user_backchannel", *span, text=bc)
        last = span[1]
  s.t = end + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def model_backchannel(s: Scene):
  """A long multi-sentence user turn: the model backchannels in the short gaps, answers at
  the end."""
  sentences, answer = s.pick(T.USER_STORIES, "user_stories")
  sentences, answer = [s.fill(x) for x in sentences], s.fill(answer)
  t, first = s.t, None
  for i, sent in enumerate(sentences):
    span = s.say("user", sent, t)
    if span is None:
      break
    first = first or span[0]
    t = span[1]
    if i < len(sentences) - 1:
      gap = s.uniform(0.35, 0.7)
      if s.rng.random() < 0.75:
        bc = s.choice(T.MODEL_BACKCHANNELS)
        # Between sentences, a backchannel overlaps the gap, never runs into the next sentence.
        bc_span = s.say("model", bc, t + s.uniform(0.05, 0.2))
        if bc_span:
          s.event("model_backchannel", *bc_span, text=bc)
          gap = max(gap, bc_span[1] - t + 0.1)
      t += gap
  s.event("user_turn", first, t, text=" ".join(sentences))
  lat = s.latency()
  model = s.say("model", answer, t + lat)
  if model:
    s.event("model_turn", *model, text=answer, latency_s=lat)
  s.t = (model[1] if model else t) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def interruption(s: Scene):
  """The user barges in on the model's explanation: the model stops within 0.2-0.4 s and
  answers the interruption."""
  planned = _long_answer(s)
  if planned is None:
    return
  user, text, utt, lat = planned
  start = user[1] + lat
  # The user barges in somewhere after the first second of the answer.
  barge = start + s.uniform(1.0, max(1.1, min(utt.duration_s - 0.5, 4.0)))
  stop_latency = s.uniform(0.2, 0.4)
  stop = round(barge + stop_latency, 4)  # the model's audio ends here (20 ms fade-out)
  end = s.place("model", utt, start, stop_s=stop)
  said = " ".join(w.text for w in s.words if w.speaker == "model" and w.start_s >= start)
  s.event("model_turn", start, end, text=said, latency_s=lat, interrupted=True)
  cut, reply = s.pick(T.INTERRUPTIONS, "interruptions")
  cut, reply = s.fill(cut), s.fill(reply)
  span = s.say("user", cut, barge)
  if span is None:
    return
  s.event("interruption", *span, text=cut, model_stop_s=stop,
          stop_latency_s=stop_latency)
  lat = s.latency()
  model = s.say("model", reply, span[1] + lat)
  if model:
    s.event("model_turn", *model, text=reply, latency_s=lat)
  s.t = (model[1] if model else span[1]) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def background_speech(s: Scene):
  """Another talker (a TV, someone further away) speaks, not to the model. Half of the time
  while the model is silent (it stays silent), half while it explains (it keeps talking)."""
  s.gain["other"] = float(10 ** (s.uniform(-14.0, -4.0) / 20))
  during = None
  if s.rng.random() < 0.5:
    during = _explaining(s)
  t = during[0] + s.uniform(1.0, 2.5) if during else s.t
  for _ in range(int(s.rng.integers(1, 3))):
    text = s.fill(s.pick(T.BACKGROUND, "background"))
    span = s.say("other", text, t)
    if span is None:
      break
    overlap = during is not None and span[0] < during[1]
    s.event("background_speech", *span, text=text, model_silent=not overlap,
            during_model=overlap)
    t = span[1] + s.uniform(0.3, 1.0)
  s.t = max(t, during[1] if during else 0.0) + s.uniform(0.4, 1.0)
  s.fill_exchanges()


def talking_to_other(s: Scene):
  """The user speaks to someone else in the room, who answers. Half of the time while the
  model is silent (it stays silent), half while it explains (it keeps talking)."""
  to_other, reply = s.pick(T.TO_OTHER, "to_other")
  addressee = s.choice(T.SLOTS["name"])
  to_other, reply = s.fill(to_other, name=addressee), s.fill(reply)
  during = _explaining(s) if s.rng.random() < 0.5 else None
  t = during[0] + s.uniform(1.0, 2.5) if during else s.t
  span = s.say("user", to_other, t)
  if span is None:
    return
  overlap = during is not None and span[0] < during[1]
  s.event("talking_to_other", *span, text=to_other, addressee=addressee,
          model_silent=not overlap, during_model=overlap)
  other = s.say("other", reply, span[1] + s.uniform(0.2, 0.6))
  if other:
    overlap = during is not None and other[0] < during[1]
    s.event("background_speech", *other, text=reply, model_silent=not overlap,
            during_model=overlap)
  s.t = max((other or span)[1], during[1] if during else 0.0) + s.uniform(0.5, 1.2)
  s.fill_exchanges()
