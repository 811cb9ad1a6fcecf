"""Synthetic two-channel conversations: the data types and the record format.

A `Conversation` is what one record of the corpus holds before featurisation: the microphone
channel the model hears (`user_wav`: user + other talkers + noise + echo of the model) and the
clean channel the model should produce (`model_wav`), the words of everybody with exact times
(speaker 'model' words are the targets of the MODEL_TEXT stream, docs/design.md §4), typed
text and background-model results arriving as TEXT_IN (`text_in`), the video events that
`tml_jax.vision.synthetic.make_video(num_chunks, size, video_events, meta["video_seed"])`
renders into one frame per chunk (`video_events`, empty = no video), and annotated `events`.
`scenarios.generate(split, index, seed, duration_s)` makes one (deterministically, held-out
material for the test split: see there); this module imports no generator, so the types and
records can be used without eSpeak.

Event kinds (start_s/end_s in seconds; `data` keys in brackets):
  user_turn [text]                 a user turn addressed to the model
  model_turn [text, latency_s]     a model reply; latency from the end of what it answers
  pause [model_silent]             a mid-utterance pause inside a user turn
  user_backchannel [text]          the user's "mm-hmm" while the model keeps talking
  model_backchannel [text]         the model's "mm-hmm" inside a long user turn
  interruption [text, model_stop_s, stop_latency_s]  user barges in; model stops at model_stop_s
  background_speech [text, model_silent, during_model]  another talker in the room / a TV
  talking_to_other [text, addressee, model_silent, during_model]  the user speaks to someone
                                   else; during_model: it overlaps the model, which goes on
  reminder_set [task, delay_s, due_s, period_s]  from the request's delegation to the tool
    call; period_s > 0 repeats / reminder_due [task, due_s (when the reminder fired as
    TEXT_IN), latency_s]  the model saying it
  delegation [question, answer, tool, args, result_text, arrival_s, purpose?]  model emits
    DELEGATE at start_s; the background model calls tool(args), whose output result_text
    arrives as TEXT_IN at arrival_s; purpose="reminder" for the reminder chain
  visual_event [description, video_event] / count_request [object] / count_answer [count]
  translation [lang, source, target, lag_s] / typed_text [text]

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from tml_jax.audio import dmel
from tml_jax.audio.constants import HOP, SAMPLE_RATE

SPEAKERS = ("user", "model", "other")
SPLITS = ("train", "validation", "test")
HOLDOUT_EVERY = 4  # template entry i is held out for test iff i % 4 == 3 (scenarios docstring)
CHUNK_S = 0.2  # conversations are a whole number of 200 ms micro-turns long (docs/design.md §3)


@dataclasses.dataclass
class Word:
  text: str
  start_s: float
  end_s: float
  speaker: str  # 'user' | 'model' | 'other'


@dataclasses.dataclass
class Event:
  kind: str
  start_s: float
  end_s: float
  data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Conversation:
  id: str
  scenario: str
  split: str
  sample_rate: int
  user_wav: np.ndarray     # float32 [N], the microphone
  model_wav: np.ndarray    # float32 [N], the model's own clean voice
  words: list[Word]
  text_in: list[tuple[float, str]]
  video_events: list[dict]
  events: list[Event]
  meta: dict = dataclasses.field(default_factory=dict)  # voices, augmentation, template ids

  @property
  def duration_s(self) -> float:
    return len(self.user_wav) / self.sample_rate

  def words_of(self, speaker: str) -> list[Word]:
    return [w for w in self.words if w.speaker == speaker]

  def events_of(self, kind: str) -> list[Event]:
    return [e for e in self.events if e.kind == kind]

  def events_json(self) -> str:
    return json.dumps([dataclasses.asdict(e) for e in self.events], sort_keys=True)


# ----------------------------------------------------------------------------------------
# Records: the corpus stores featurised conversations (tml_duplex); both directions here
# are numpy only, so benchmarks and the trainer need no TFDS to use them.


def featurise(conv: Conversation) -> dict:
  """A Conversation -> one corpus record (numpy values; schema in tml_duplex's docstring)."""
  if conv.sample_rate != SAMPLE_RATE:
    raise ValueError(f"conversation {conv.id} is at {conv.sample_rate} Hz; the corpus is "
                     f"{SAMPLE_RATE} Hz (docs/design.md §3): regenerate it.")
  n = len(conv.user_wav)
  frames = n // HOP
  pcm_2xN = np.round(np.clip(np.stack([conv.user_wav, conv.model_wav]), -1.0, 32767 / 32768)
                    * 32768).astype(np.int16)
  # Features of the stored int16 audio, so re-encoding a record reproduces them exactly; one
  # STFT call for both channels, and the model channel's log-mel gives both its dMel bins
  # and the flow targets.
  mel_2xTxM = dmel.log_mel_batch(pcm_2xN.astype(np.float32) / 32768)[:, :frames]
  words = conv.words
  return {
      "id": conv.id, "scenario": conv.scenario, "split": conv.split,
      "sample_rate": np.int32(conv.sample_rate),
      "user_wav": pcm_2xN[0], "model_wav": pcm_2xN[1],
      "user_dmel": dmel.quantize(mel_2xTxM[0]).astype(np.uint8),
      "self_dmel": dmel.quantize(mel_2xTxM[1]).astype(np.uint8),
      "model_mel": mel_2xTxM[1].astype(np.float16),
      "word_text": [w.text for w in words],
      "word_start_s": np.array([w.start_s for w in words], np.float32),
      "word_end_s": np.array([w.end_s for w in words], np.float32),
      "word_speaker": [w.speaker for w in words],
      "text_in_s": np.array([t for t, _ in conv.text_in], np.float32),
      "text_in_text": [x for _, x in conv.text_in],
      "events_json": conv.events_json(),
      "video_events_json": json.dumps(conv.video_events, sort_keys=True),
      "meta_json": json.dumps(conv.meta, sort_keys=True),
  }


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def to_conversation(record: dict) -> Conversation:
  """Decode one record (as `tfds.data_source` returns it) back into a Conversation.

  Waveforms come back as float32 in [-1, 1); word times are the stored float32 values.
  """
  words = [Word(_text(t), float(a), float(b), _text(s)) for t, a, b, s in zip(
      record["word_text"], record["word_start_s"], record["word_end_s"], record["word_speaker"])]
  events = [Event(**e) for e in json.loads(_text(record["events_json"]))]
  return Conversation(
      id=_text(record["id"]), scenario=_text(record["scenario"]), split=_text(record["split"]),
      sample_rate=int(record["sample_rate"]),
      user_wav=np.asarray(record["user_wav"], np.float32) / 32768,
      model_wav=np.asarray(record["model_wav"], np.float32) / 32768,
      words=words,
      text_in=[(float(t), _text(x)) for t, x in zip(record["text_in_s"], record["text_in_text"])],
      video_events=json.loads(_text(record["video_events_json"])), events=events,
      meta=json.loads(_text(record["meta_json"])))
