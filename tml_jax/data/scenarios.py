"""Scenario generators: a `Scene` (one audio track per speaker plus annotations) and one
function per behaviour that fills it (DESIGN §6). `conversation.generate` picks the scenario,
mixes the tracks and applies the microphone augmentation.

Every scenario annotates what the model should do with `Event`s (kinds listed in the
conversation module docstring) and draws all randomness from the scene's generator. Text
comes from `templates`; `Scene.pick` keeps the held-out templates for the test split.

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tml_jax.data import speech
from tml_jax.data import templates as T
from tml_jax.data.conversation import (CHUNK_S, HOLDOUT_EVERY, SAMPLE_RATE, SPEAKERS, Event,
                                       Word)


@dataclasses.dataclass(frozen=True)
class _Voice:
  name: str
  rate_wpm: int
  pitch: int


class Scene:
  """A conversation under construction: one float32 track per speaker and the annotations."""

  def __init__(self, rng: np.random.Generator, split: str, duration_s: float):
    self.rng, self.split = rng, split
    self.n = int(round(duration_s / CHUNK_S)) * int(CHUNK_S * SAMPLE_RATE)
    self.duration_s = self.n / SAMPLE_RATE
    self.tracks = {s: np.zeros(self.n, np.float32) for s in SPEAKERS}
    self.words: list[Word] = []
    self.events: list[Event] = []
    self.text_in: list[tuple[float, str]] = []
    self.video_events: list[dict] = []
    self.templates: list[str] = []
    self.slots: dict[str, str] = {}
    pool = speech.voices(split)
    user, other = rng.choice(len(pool), size=2, replace=False)
    self.voices = {
        "user": _Voice(pool[user], int(rng.integers(140, 200)), int(rng.integers(25, 75))),
        "other": _Voice(pool[other], int(rng.integers(140, 200)), int(rng.integers(25, 75))),
        "model": _Voice(speech.MODEL_VOICES[rng.integers(len(speech.MODEL_VOICES))],
                        int(rng.integers(160, 186)), int(rng.integers(45, 56))),
    }
    self.gain = {"user": 1.0, "model": 1.0, "other": 1.0}
    self.t = float(rng.uniform(0.3, 1.2))  # cursor: where the next thing may start

  # ---- random helpers ----
  def uniform(self, lo: float, hi: float) -> float:
    return round(float(self.rng.uniform(lo, hi)), 3)

  def choice(self, seq):
    return seq[int(self.rng.integers(len(seq)))]

  def pick(self, bank: tuple, name: str):
    """A template of `bank`, from the held-out part on the test split only; each template
    is used once per conversation until the bank's part is exhausted."""
    test = self.split == "test"
    idx = [i for i in range(len(bank)) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == test]
    fresh = [i for i in idx if f"{name}:{i}" not in self.templates]
    idx = fresh or idx  # no repeats inside one conversation until the bank runs out
    i = idx[int(self.rng.integers(len(idx)))]
    self.templates.append(f"{name}:{i}")
    return bank[i]

  def fill(self, text: str, **fixed) -> str:
    """Fill {slots} of a template from the shared slot lists (same draw per conversation)."""
    self.slots.update(fixed)
    return text.format_map(_SlotFiller(self))

  def latency(self) -> float:
    return self.uniform(0.2, 0.6)

  def left(self, t: float | None = None) -> float:
    return self.duration_s - (self.t if t is None else t)

  # ---- audio ----
  def synth(self, speaker: str, text: str, voice: str | None = None) -> speech.Utterance:
    v = self.voices[speaker]
    return speech.synth(text, voice or v.name, rate_wpm=v.rate_wpm, pitch=v.pitch)

  def place(self, speaker: str, utt: speech.Utterance, start_s: float,
            stop_s: float | None = None) -> float | None:
    """Mix `utt` into the speaker's track at start_s, cut (with a 20 ms fade) at stop_s or at
    the end of the conversation; returns the time the speech ends, None if nothing fits."""
    a = int(round(start_s * SAMPLE_RATE))
    b = min(self.n, a + len(utt.wav))
    if stop_s is not None:
      b = min(b, int(round(stop_s * SAMPLE_RATE)))
    if b - a < SAMPLE_RATE // 20:
      return None
    seg = utt.wav[:b - a] * np.float32(self.gain[speaker])
    if b - a < len(utt.wav):  # cut mid-speech: fade instead of a click
      fade = min(320, b - a)
      seg[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    self.tracks[speaker][a:b] += seg
    end_s = b / SAMPLE_RATE
    last = None
    for text, w0, w1 in utt.words:
      if start_s + w0 >= end_s - 0.02:  # a word cut within its first 20 ms was not said
        break
      last = round(min(start_s + w1, end_s), 4)
      self.words.append(Word(text, round(start_s + w0, 4), last, speaker))
    return last if last is not None else end_s

  def say(self, speaker: str, text: str, start_s: float, **kw) -> tuple[float, float] | None:
    """Synthesise and place; returns (start_s, end_s) or None if it does not fit."""
    end = self.place(speaker, self.synth(speaker, text), start_s, **kw)
    return None if end is None else (round(start_s, 4), round(end, 4))

  def event(self, kind: str, start_s: float, end_s: float, **data) -> Event:
    ev = Event(kind, round(float(start_s), 4), round(float(end_s), 4), data)
    self.events.append(ev)
    return ev

  # ---- common blocks ----
  def exchange(self, until: float | None = None) -> bool:
    """User asks, model answers after the turn-taking latency; False if it did not start.

    until: the whole exchange must end by then (or it is not said at all); by default it
    may run past the end of the conversation, where it is cut.
    """
    if self.left() < 2.0:
      return False
    q, a = self.pick(T.TURN_PAIRS, "turn_pairs")
    q, a = self.fill(q), self.fill(a)
    q_utt, a_utt, lat = self.synth("user", q), self.synth("model", a), self.latency()
    if until is not None and self.t + q_utt.duration_s + lat + a_utt.duration_s > until:
      return False
    end = self.place("user", q_utt, self.t)
    if end is None:
      return False
    self.event("user_turn", self.t, end, text=q)
    model = self.place("model", a_utt, end + lat)
    if model is not None:
      self.event("model_turn", end + lat, model, text=a, latency_s=lat)
    self.t = (model or end) + self.uniform(0.6, 1.5)
    return True

  def fill_exchanges(self, until: float | None = None):
    """Plain exchanges until the conversation (or `until`) is over."""
    while self.left() > 3.0 and self.exchange(until):
      pass


class _SlotFiller(dict):
  """format_map source: each slot name draws once per conversation, so Q and A agree."""

  def __init__(self, scene: Scene):
    super().__init__()
    self.scene = scene

  def __missing__(self, key):
    if key not in self.scene.slots:
      self.scene.slots[key] = self.scene.choice(T.SLOTS[key])
    return self.scene.slots[key]


# ----------------------------------------------------------------------------------------
# Scenarios: each fills a Scene and annotates what the model should do.


def turn_taking(s: Scene):
  """Question, answer after 0.2-0.6 s, again: the model takes the turn when the user ends."""
  s.fill_exchanges()


def pause_handling(s: Scene):
  """A user turn broken by 0.6-2 s pauses after unfinished syntax and fillers: the model
  waits for the end of the turn."""
  fragments, answer = s.pick(T.PAUSED_TURNS, "paused_turns")
  fragments, answer = [s.fill(f) for f in fragments], s.fill(answer)
  t, first, text = s.t, None, []
  for i, frag in enumerate(fragments):
    if i < len(fragments) - 1 and s.rng.random() < 0.7:
      frag = f"{frag}, {s.choice(T.FILLERS)}"
    span = s.say("user", frag, t)
    if span is None:
      break
    first = first or span[0]
    text.append(frag)
    if i < len(fragments) - 1:
      pause = s.uniform(0.6, 2.0)
      s.event("pause", span[1], span[1] + pause, model_silent=True)
      t = span[1] + pause
    else:
      t = span[1]
  s.event("user_turn", first, t, text=" ".join(text))
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


def reminder(s: Scene):
  """"Remind me in 12 seconds to stretch": the model acknowledges, chats, and speaks the
  reminder exactly when it is due (time awareness)."""
  ask, ack, due_text = s.pick(T.REMINDERS, "reminders")
  max_delay = int(min(20, s.left() - 6.0))
  if max_delay < 4:
    return turn_taking(s)
  delay = int(s.rng.integers(4, max_delay + 1))
  task = s.choice(T.SLOTS["task"])
  ask, ack, due_text = (x.format(n=delay, task=task) for x in (ask, ack, due_text))
  user = s.say("user", ask, s.t)
  if user is None:
    return
  due = user[1] + delay
  s.event("user_turn", *user, text=ask)
  s.event("reminder_set", user[1], user[1], task=task, delay_s=delay, due_s=due)
  lat = s.latency()
  model = s.say("model", ack, user[1] + lat)
  if model:
    s.event("model_turn", *model, text=ack, latency_s=lat)
  # Small talk that ends before the reminder is due; the reminder never waits for it.
  s.t = (model or user)[1] + s.uniform(0.6, 1.2)
  s.fill_exchanges(until=due - 0.5)
  span = s.say("model", due_text, due)
  if span:
    s.event("reminder_due", *span, task=task)
    s.event("model_turn", *span, text=due_text, latency_s=0.0)
  s.t = (span[1] if span else due) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def delegation(s: Scene):
  """A question for the background model (calculator, clock, knowledge): the model emits
  DELEGATE as it acknowledges, the result arrives as TEXT_IN 1-4 s later, the model says it."""
  tool, question, answer, result = T.background_question(s)
  user = s.say("user", question, s.t)
  if user is None:
    return
  s.event("user_turn", *user, text=question)
  lat = s.latency()
  ack = s.choice(T.ACKS)
  deleg = user[1] + lat
  ack_span = s.say("model", ack, deleg)
  arrival = round(deleg + s.uniform(1.0, 4.0), 3)
  s.text_in.append((arrival, result))
  s.event("delegation", deleg, arrival, question=question, answer=answer, tool=tool,
          result_text=result, arrival_s=arrival)
  if ack_span:
    s.event("model_turn", *ack_span, text=ack, latency_s=lat)
  lat2 = s.latency()
  start = max(arrival + lat2, (ack_span[1] if ack_span else deleg) + 0.2)
  model = s.say("model", answer, start)
  if model:
    s.event("model_turn", *model, text=answer, latency_s=round(start - arrival, 3),
            responds_to="text_in")
  s.t = (model[1] if model else start) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def typed_text(s: Scene):
  """The user types a question (TEXT_IN): the model answers it aloud."""
  q, a = s.pick(T.TURN_PAIRS, "turn_pairs")
  q, a = s.fill(q), s.fill(a)
  s.text_in.append((round(s.t, 3), q))
  s.event("typed_text", s.t, s.t, text=q)
  lat = s.uniform(0.3, 0.8)
  model = s.say("model", a, s.t + lat)
  if model:
    s.event("model_turn", *model, text=a, latency_s=lat, responds_to="text_in")
  s.t = (model[1] if model else s.t) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


# Names that tml_jax.vision.synthetic.make_video renders (its COLORS / SHAPES / CLOTHES).
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "star", "diamond")
_CLOTHES = ("brown", "black", "navy")


def _appearances(s: Scene, t0: float) -> list[tuple[dict, float, str]]:
  """One or two things appear after t0: [(video event, time, spoken description)].

  The time is snapped to the start of a 200 ms chunk: make_video shows an event from the
  frame of the chunk that contains it, so the annotation is when it becomes visible.
  """
  out, t = [], t0 + s.uniform(0.5, 2.0)
  colors = list(_COLORS)
  for _ in range(int(s.rng.integers(1, 3))):
    t = round(np.floor(t / CHUNK_S) * CHUNK_S, 4)
    if s.left(t) < 3.0:
      break
    if s.rng.random() < 0.25:
      clothes, side = s.choice(_CLOTHES), s.choice(("left", "right"))
      ev = dict(kind="person_enters", start_s=t, clothes=clothes, side=side)
      desc = f"person in {clothes}" if clothes != "navy" else "person in blue"
    else:
      color = colors.pop(int(s.rng.integers(len(colors))))  # make_video wants distinct colours
      shape = s.choice(_SHAPES)
      ev = dict(kind="object_appears", start_s=t, shape=shape, color=color)
      desc = f"{color} {shape}"
    s.video_events.append(ev)
    out.append((ev, t, desc))
    t += s.uniform(3.0, 5.0)
  return out


def _bounces(s: Scene, t0: float) -> tuple[int, float, str]:
  """A ball bounces 2..6 times from t0 (bounces on chunk starts, >= 3 chunks apart, as
  make_video draws one frame per chunk); returns (count, time of the last bounce, object)."""
  start = int(np.ceil(t0 / CHUNK_S))
  chunks = list(start + np.cumsum(s.rng.integers(3, 7, size=int(s.rng.integers(2, 7)))))
  while len(chunks) > 1 and s.left(chunks[-1] * CHUNK_S) < 2.5:
    chunks.pop()
  times = [round(int(c) * CHUNK_S, 4) for c in chunks]
  s.video_events.append(dict(kind="bouncing", start_s=round(start * CHUNK_S, 4),
                             bounce_times_s=times, color=s.choice(_COLORS)))
  return len(times), times[-1], "ball"


def visual_event(s: Scene):
  """The user asks the model to watch; objects or a person appear in the video and the model
  remarks on each after 0.3-0.9 s."""
  ask, ack = s.pick(T.WATCH_REQUESTS, "watch_requests")
  user = s.say("user", ask, s.t)
  if user is None:
    return
  s.event("user_turn", *user, text=ask)
  lat = s.latency()
  model = s.say("model", ack, user[1] + lat)
  if model:
    s.event("model_turn", *model, text=ack, latency_s=lat)
  t0 = (model or user)[1] + 0.8
  for ev, when, desc in _appearances(s, t0):
    remark = s.fill(s.pick(T.VISUAL_REMARKS, "visual_remarks")).format(thing=desc)
    lat = s.uniform(0.3, 0.9)
    span = s.say("model", remark, when + lat)
    s.event("visual_event", when, span[1] if span else when, description=desc, video_event=ev)
    if span:
      s.event("model_turn", *span, text=remark, latency_s=lat, responds_to="video")
      s.t = span[1] + s.uniform(0.5, 1.0)
  s.fill_exchanges()


def counting(s: Scene):
  """The user asks to count a ball's bounces; the model says the count after the last one."""
  ask, ack, result = s.pick(T.COUNT_REQUESTS, "count_requests")
  ask = ask.format(object="ball")
  user = s.say("user", ask, s.t)
  if user is None:
    return
  s.event("user_turn", *user, text=ask)
  lat = s.latency()
  model = s.say("model", ack, user[1] + lat)
  if model:
    s.event("model_turn", *model, text=ack, latency_s=lat)
  t0 = (model or user)[1] + 0.5
  count, t_end, obj = _bounces(s, t0)
  s.event("count_request", user[0], t_end, object=obj)
  lat = s.uniform(0.5, 1.0)
  text = result.format(count=count, object=obj)
  span = s.say("model", text, t_end + lat)
  if span:
    s.event("count_answer", *span, count=count, object=obj)
    s.event("model_turn", *span, text=text, latency_s=lat, responds_to="video")
    s.t = span[1] + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def translation(s: Scene):
  """The user speaks Spanish, French or German sentences; the model speaks the English
  translation of each, lagging ~1 s behind and overlapping the user (simultaneous speech)."""
  lang = s.choice(tuple(speech.FOREIGN_VOICES))
  ask, ack = s.pick(T.TRANSLATE_REQUESTS, "translate_requests")
  ask, ack = ask.format(lang=T.LANG_NAMES[lang]), ack.format(lang=T.LANG_NAMES[lang])
  user = s.say("user", ask, s.t)
  if user is None:
    return
  s.event("user_turn", *user, text=ask)
  lat = s.latency()
  model = s.say("model", ack, user[1] + lat)
  if model:
    s.event("model_turn", *model, text=ack, latency_s=lat)
  t, model_free = (model or user)[1] + s.uniform(0.5, 1.0), 0.0
  foreign = f"{speech.FOREIGN_VOICES[lang]}+{s.voices['user'].name.split('+')[1]}"
  while s.left(t) > 2.5:
    phrase = s.pick(T.PHRASES, "phrases")
    src = s.place("user", s.synth("user", phrase[lang], voice=foreign), t)
    if src is None:
      break
    # Simultaneous: the translation starts while the user is still speaking, lagging by
    # about a second, and never overlaps the model's previous translation.
    lag = s.uniform(0.8, 1.6)
    start = max(t + lag, model_free + 0.15)
    span = s.say("model", phrase["en"], start)
    s.event("translation", t, span[1] if span else src, lang=lang, source=phrase[lang],
            target=phrase["en"], lag_s=round(start - t, 3))
    if span is None:
      break
    model_free = span[1]
    t = src + s.uniform(0.3, 0.9)
  s.t = max(t, model_free) + 0.5


SCENARIOS: dict[str, Callable[[Scene], None]] = {
    f.__name__: f for f in (
        turn_taking, pause_handling, user_backchannel, model_backchannel, interruption,
        background_speech, talking_to_other, reminder, delegation, typed_text, visual_event,
        counting, translation)
}
