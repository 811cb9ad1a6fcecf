"""The scenario registry and `generate`: one synthetic conversation from (split, index, seed).

`generate` picks a scenario, lets it fill a `Scene` (`scene`), mixes the speakers' tracks and
applies the microphone augmentation (`augment`). The scenarios themselves live in two
families: `turn_scenarios` (turn-taking: when to speak, wait, yield or keep the floor) and
`task_scenarios` (reminders, delegation to the background model, typed text, video,
translation). Their names below are re-exported so `scenarios.delegation` etc. keep working.

`generate(split, index, seed, duration_s)` is a pure function of its arguments: every random
choice comes from one generator seeded with (seed, split, index), and eSpeak NG is
deterministic, so the same arguments give identical bytes in any process. Do not reorder
SCENARIOS or the draws inside a scenario: either changes every conversation of a corpus.

Held-out material: every template bank is split by position, entry i is held out for the test
split iff i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1; the test split draws only held-out entries
and only held-out voices (`speech.voices('test')`), train and validation only the others.

Shape legend: N samples at 16 kHz.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tml_jax.audio.constants import SAMPLE_RATE
from tml_jax.data import augment, speech
from tml_jax.data import templates as T
from tml_jax.data.conversation import SPEAKERS, SPLITS, Conversation
from tml_jax.data.scene import Scene
from tml_jax.data.task_scenarios import (counting, delegation, reminder, translation, typed_text,
                                         visual_event)
from tml_jax.data.turn_scenarios import (background_speech, interruption, model_backchannel,
                                         pause_handling, talking_to_other, turn_taking,
                                         user_backchannel)

# What the corpus' bytes depend on beyond the arguments of `generate`: bump it with any
# change to a scenario, a template or a voice (the TFDS build and the export cache key on it).
# 1.1.0: paused turns are one synthesis cut at the pauses; plain questions pause too.
# 1.2.0: reminders and timers go through the background model and the clock tools, and
#   fire as TEXT_IN; every tool is a delegation target (clock "now", chart); calls carry args.
# 1.3.0: a third of the delegations are held ("wait, let me find a pen ... go ahead"): their
#   question lies 5.2-6.8 s before the DELEGATE, beyond the 5 s window.
# 1.4.0: half of the delegations are typed: the question arrives as TEXT_IN (a
#   `typed_text` event with delegation=True), the answer is still spoken.
CORPUS_VERSION = "1.4.0"

# The order is part of the corpus: scenario = SCENARIOS[index % 13] when none is forced.
SCENARIOS: dict[str, Callable[[Scene], None]] = {
    f.__name__: f for f in (
        turn_taking, pause_handling, user_backchannel, model_backchannel, interruption,
        background_speech, talking_to_other, reminder, delegation, typed_text, visual_event,
        counting, translation)
}

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def generate(split: str, index: int, seed: int = 0, duration_s: float = 24.0,
             scenario: str | None = None, *, clean_mic: bool = False) -> Conversation:
  """Conversation `index` of `split`: a pure function of its arguments.

  scenario: None cycles through SCENARIOS by index (the corpus: every split of at least 13
    conversations covers them all); a name forces that scenario, drawn from a separate
    random stream and with its own id (`<split>-<scenario>-<index>`).
  clean_mic: skip the microphone augmentation (noise, gain, echo): user_wav is then exactly
    the sum of the people in the room (evaluation exports want the user's voice alone).
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if duration_s < 6.0:
    raise ValueError(f"duration_s={duration_s}: conversations need at least 6 s to hold one "
                     "exchange; set config.data.conversation_s >= 6.")
  names = tuple(SCENARIOS)
  if scenario is not None and scenario not in names:
    raise ValueError(f"scenario={scenario!r}: expected one of {sorted(names)}")
  name = scenario or names[index % len(names)]
  key = [seed, _SPLIT_IDS[split], index] + ([] if scenario is None else [names.index(name) + 1])
  conv_id = f"{split}-{index:06d}" if scenario is None else f"{split}-{name}-{index:06d}"
  rng = np.random.default_rng(key)
  s = Scene(rng, split, duration_s)
  SCENARIOS[name](s)
  video_seed = int(rng.integers(2**31))  # drawn before the mic, so clean_mic keeps the video
  mic, user_N = _microphone(s, rng, clean_mic)
  s.words.sort(key=lambda w: (w.start_s, SPEAKERS.index(w.speaker)))
  s.events.sort(key=lambda e: (e.start_s, e.kind))
  s.text_in.sort()
  meta = dict(seed=seed, index=index, video_seed=video_seed,
              voices={k: dataclasses.asdict(v) for k, v in s.voices.items()},
              augment=dataclasses.asdict(mic), templates=s.templates)
  return Conversation(id=conv_id, scenario=name, split=split,
                      sample_rate=SAMPLE_RATE, user_wav=user_N,
                      model_wav=np.clip(s.tracks["model"], -1.0, 1.0),
                      words=s.words, text_in=s.text_in, video_events=s.video_events,
                      events=s.events, meta=meta)


def _microphone(s: Scene, rng: np.random.Generator,
                clean_mic: bool) -> tuple[augment.MicParams, np.ndarray]:
  """(augmentation, microphone channel [N]) of a filled scene; draws come last in generate."""
  room_N = s.tracks["user"] + s.tracks["other"]
  if clean_mic:
    return augment.MicParams(), np.clip(room_N, -1.0, 1.0)
  mic = augment.sample_params(rng)
  pool = ([s.synth("other", s.fill(s.choice(T.BACKGROUND)),
                   voice=s.choice(speech.voices(s.split))).wav for _ in range(3)]
          if mic.noise == "babble" else None)
  return mic, augment.apply(mic, rng, room_N, s.tracks["model"], SAMPLE_RATE, pool)
