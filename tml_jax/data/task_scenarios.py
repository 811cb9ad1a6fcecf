"""Task scenarios: the model keeps time, delegates, reads, watches and translates.

Each function fills a `Scene` and annotates what the model should do (event kinds in the
`conversation` module docstring): speak a reminder when it is due, hand a question to the
background model (DELEGATE, the result arriving as TEXT_IN), answer typed text, remark on
what appears in the video, count bounces, translate while the user speaks. The registry is
`scenarios.SCENARIOS`.

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

import numpy as np

from tml_jax.data import speech
from tml_jax.data import templates as T
from tml_jax.data.conversation import CHUNK_S
from tml_jax.data.scene import Scene
from tml_jax.data.turn_scenarios import turn_taking
from tml_jax.tools import ToolBox, ToolContext
from tml_jax.tools.clock import due_text


def run_tool(tool: str, args: str, at_s: float) -> tuple[str, ToolContext]:
  """What a real tool answers when the background model calls it at conversation time at_s
  (files are not written: a chart's path is enough), and the context it left (reminders)."""
  ctx = ToolContext(now_s=lambda: at_s, dry_run=True)
  return ToolBox(ctx=ctx).call(tool, args), ctx


def fired_reminders(ctx: ToolContext, until_s: float) -> list[tuple[float, str]]:
  """(time, TEXT_IN text) of every reminder in `ctx` that fires before until_s, polled as
  the engine polls them: at the start of every micro-turn (tml_jax.serve.session)."""
  out = []
  for k in range(int(np.ceil(until_s / CHUNK_S))):
    now = round(k * CHUNK_S, 4)
    out += [(now, due_text(r.text)) for r in ctx.reminders.due(now)]
  return out


def reminder(s: Scene):
  """"Remind me in 12 seconds to stretch" / "every 6 seconds" / "set a timer": the model
  acknowledges and emits DELEGATE; the background model calls `remind` or `timer`; the tool's
  confirmation arrives as TEXT_IN; when the reminder fires, the engine feeds it in as TEXT_IN
  and the model says it in the next micro-turn or two, whatever else is going on."""
  ask, ack, due_say, tool, args = s.pick(T.REMINDERS, "reminders")
  repeat = args.startswith("every")
  # A one-off is due 4-20 s after the request, a repeating one fires two or three times.
  max_delay = int(min(8, (s.left() - 7.0) / 2) if repeat else min(20, s.left() - 7.0))
  if max_delay < 4:
    return turn_taking(s)
  delay = int(s.rng.integers(4, max_delay + 1))
  task = s.choice(T.SLOTS["task"])
  ask, ack, due_say, args = (x.format(n=delay, task=task) for x in (ask, ack, due_say, args))
  task = task if tool == "remind" else "timer"  # what the spoken reminder is about
  user = s.say("user", ask, s.t)
  if user is None:
    return
  s.event("user_turn", *user, text=ask)
  lat = s.latency()
  deleg = user[1] + lat
  ack_span = s.say("model", ack, deleg)
  # The background model writes the call within a second; its confirmation comes back as
  # TEXT_IN (the model already said the acknowledgement, so it stays quiet).
  call_s = round(deleg + s.uniform(0.3, 1.0), 3)
  result, ctx = run_tool(tool, args, call_s)
  arrival = round(call_s + s.uniform(0.1, 0.4), 3)
  s.text_in.append((arrival, result))
  s.event("delegation", deleg, arrival, question=ask, answer="", tool=tool, args=args,
          result_text=result, arrival_s=arrival, purpose="reminder")
  (first,) = ctx.reminders.pending()
  s.event("reminder_set", deleg, call_s, task=task,
          delay_s=delay, due_s=round(first.due_s, 3), period_s=first.period_s)
  if ack_span:
    s.event("model_turn", *ack_span, text=ack, latency_s=lat)
  s.t = (ack_span or user)[1] + s.uniform(0.6, 1.2)
  for fire_s, text in fired_reminders(ctx, s.duration_s - 1.5):
    s.text_in.append((fire_s, text))
    # Small talk that ends before the reminder fires; the reminder never waits for it.
    s.fill_exchanges(until=fire_s - 0.5)
    start = round(fire_s + CHUNK_S + s.uniform(0.0, 0.15), 3)  # the next micro-turn plays it
    span = s.say("model", due_say, start)  # the small talk ended 0.5 s before the firing
    if span:
      s.event("reminder_due", *span, task=task, due_s=round(fire_s, 3),
              latency_s=round(span[0] - fire_s, 3))
      s.event("model_turn", *span, text=due_say, latency_s=round(span[0] - fire_s, 3),
              responds_to="text_in")
    s.t = (span[1] if span else fire_s) + s.uniform(0.6, 1.5)
  s.fill_exchanges()


def delegation(s: Scene):
  """A question for the background model (calculator, clock, knowledge, chart), spoken or
  (TYPED_SHARE) typed: the model emits DELEGATE as it acknowledges; the background model calls the tool (its output is the
  real tool's, at the call's time) and its answer arrives as TEXT_IN 1-4 s later; the model
  says it."""
  q = T.background_question(s)
  tool, question, answer = q["tool"], q["question"], q["answer"]
  typed = s.rng.random() < TYPED_SHARE
  held = not typed and s.rng.random() < HELD_SHARE and s.left() > 16.0
  if typed:
    user = _typed_question(s, question)
    question_end = user[1]
  elif held:
    user, question_end = _held_question(s, question)
  else:
    user = s.say("user", question, s.t)
    question_end = user[1] if user else None
  if user is None:
    return
  if not typed:
    s.event("user_turn", *user, text=question)
  lat = s.latency()
  ack = s.choice(T.ACKS)
  deleg = user[1] + lat
  ack_span = s.say("model", ack, deleg)
  arrival = round(deleg + s.uniform(1.0, 4.0), 3)
  call_s = round(deleg + 0.5, 3)  # the background model writes the call half a second in
  result, _ = run_tool(tool, q["args"], call_s)
  if tool == "clock" and q["args"] == "now":
    answer = answer.format(s=int(call_s))
  s.text_in.append((arrival, result))
  s.event("delegation", deleg, arrival, question=question, answer=answer, tool=tool,
          args=q["args"], result_text=result, arrival_s=arrival, held=held, typed=typed,
          question_end_s=round(question_end, 3))
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


# Share of delegations whose question is typed (TEXT_IN) rather than spoken. A spoken
# question reaches the background model only through what the interaction model's hidden
# states keep of the user's audio, which a small model trained for minutes does not learn
# (validation's background vs background_other: no gap); a typed one arrives as bytes, so the
# call's args are a copy the background model can learn (scenarios.CORPUS_VERSION 1.4.0).
TYPED_SHARE = 0.5
# How fast typed text reaches the model: the layout's TEXT_IN slots per chunk over the chunk
# (4 per 200 ms in every shipped config). A typed question is read once all its bytes are in.
TYPED_BYTES_PER_S = 20.0


def _typed_question(s: Scene, question: str) -> tuple[float, float]:
  """The user types `question` now (TEXT_IN, a `typed_text` event, which the evaluation
  feeds to a system); returns (typed, fully read) times."""
  at = round(s.t, 3)
  s.text_in.append((at, question))
  s.event("typed_text", at, at, text=question, delegation=True)
  read = len(question.encode("utf-8")) / TYPED_BYTES_PER_S
  return at, round(at + read, 3)


# Share of delegations whose user holds the answer back: the question, then "wait, let me
# find a pen", a long pause and "okay, go ahead". The DELEGATE then comes 5.2-6.8 s after
# the question's end, beyond a 5 s window: only the background model's history (model.
# background.pool_history) still holds the question.
HELD_SHARE = 0.35  # "a third" in scenarios.CORPUS_VERSION 1.3.0
HELD_GAP_S = (5.6, 6.8)


def _held_question(s: Scene, question: str):
  """The user's question, a hold and, after a pause, the release; returns ((start, end) of
  the whole turn, the question's end), or (None, None) when it does not fit."""
  hold, release = s.pick(T.HOLDS, "holds")
  spans = s.say_paused("user", [question, hold], [s.uniform(0.3, 0.6)], s.t)
  if len(spans) < 2:
    return (spans[0] if spans else None), (spans[0][1] if spans else None)
  q_end, hold_end = spans[0][1], spans[1][1]
  utt = s.synth("user", release)
  # The release's last word ends where a DELEGATE after the longest reply latency (0.6 s)
  # lands HELD_GAP_S after the question's end; a shorter latency lands it up to 0.4 s sooner.
  said = utt.words[-1][2] if utt.words else utt.duration_s
  start = max(hold_end + 0.8, q_end + s.uniform(*HELD_GAP_S) - 0.6 - said)
  end = s.place("user", utt, round(start, 3))
  if end is None:
    return (spans[0][0], hold_end), q_end
  s.event("pause", hold_end, round(start, 3), model_silent=True)
  return (spans[0][0], end), q_end


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
