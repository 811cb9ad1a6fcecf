"""A `Scene`: one conversation under construction, and the blocks every scenario builds on.

A scene holds one float32 audio track per speaker, the words said with exact times, the
annotated `Event`s, TEXT_IN arrivals and video events. Scenarios (`turn_scenarios`,
`task_scenarios`) fill it through `say` / `place` / `event` and draw every random choice from
`scene.rng`, so a conversation is a pure function of the generator's seed
(`scenarios.generate`). Text comes from `templates`; `Scene.pick` keeps the held-out
templates for the test split (docs/design.md §6).

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tml_jax.audio.constants import SAMPLE_RATE
from tml_jax.data import speech
from tml_jax.data import templates as T
from tml_jax.data.conversation import CHUNK_S, HOLDOUT_EVERY, SPEAKERS, Event, Word


# Share of plain exchanges (train and validation) whose question has a mid-utterance pause.
PAUSED_SHARE = 0.3


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

  def say_paused(self, speaker: str, pieces: list[str], pauses: list[float],
                 start_s: float) -> list[tuple[float, float]]:
    """One turn said as a single synthesis and cut at the pieces' word boundaries, with
    `pauses[i]` seconds of silence after piece i; returns the placed pieces' spans (fewer
    when the conversation ends). Each "pause" is annotated (model_silent).

    Synthesising the pieces separately would give every piece a sentence-final fall and
    lengthening: a pause would then sound exactly like the end of a turn, and nothing in
    the audio could tell the model to wait. People pausing mid-sentence do not sound
    finished either; cut from one synthesis, the words before the pause keep the
    intonation and timing of a sentence that goes on.
    """
    counts = [len(p.split()) for p in pieces]
    utt = self.synth(speaker, " ".join(pieces))
    if len(utt.words) == sum(counts):
      bounds = np.cumsum([0] + counts)
      parts = [utt.slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    else:  # espeak merged or dropped a token: the pieces' boundaries are not known
      parts = [self.synth(speaker, p) for p in pieces]
    spans, t = [], start_s
    for i, part in enumerate(parts):
      end = self.place(speaker, part, t)
      if end is None:
        break
      if spans:  # a pause is one only when the turn goes on after it
        self.event("pause", spans[-1][1], t, model_silent=True)
      spans.append((round(t, 4), round(end, 4)))
      t = end + (pauses[i] if i < len(pauses) else 0.0)
    return spans

  def paused_pieces(self, text: str) -> list[str] | None:
    """`text` split for one mid-utterance pause at a word boundary away from its ends,
    half of the time with a filler before the pause; None when too short to pause in."""
    words = text.split()
    if len(words) < 5:
      return None
    k = int(self.rng.integers(2, len(words) - 1))
    head = " ".join(words[:k]).rstrip(",")
    if self.rng.random() < 0.5:
      head = f"{head}, {self.choice(T.FILLERS)},"
    return [head, " ".join(words[k:])]

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
    # Training and validation users also pause inside their questions (PAUSED_SHARE): the
    # pause_handling scenario alone gives too few pauses to learn "wait" from "answer".
    # The test split keeps FDB's turn-taking shape (no pause before the turn end).
    pieces = (self.paused_pieces(q) if self.split != "test"
              and self.rng.random() < PAUSED_SHARE else None)
    pause = [self.uniform(0.6, 2.0)] if pieces else []
    q_utt, a_utt, lat = self.synth("user", q), self.synth("model", a), self.latency()
    if until is not None and (self.t + q_utt.duration_s + sum(pause) + lat
                              + a_utt.duration_s > until):
      return False
    if pieces:
      spans = self.say_paused("user", pieces, pause, self.t)
      end = spans[-1][1] if spans else None
    else:
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
