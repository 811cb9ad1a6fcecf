r"""How fast and how accurate is the evaluation's ASR, and how long does an evaluation take?

  python benchmarks/asr.py                      # pocketsphinx on eSpeak sentences
  python benchmarks/asr.py --eval_per_task=8 --random_model   # the main job's evaluation

Sentences: 16 everyday sentences in each of the corpus's 4 model voices
(tml_jax.data.speech.MODEL_VOICES) are synthesised and decoded one by one, as the harness
decodes a VAD region (`tml_jax.eval.asr.decode`). Prints the word error rate against the
text, the start-time error of the words the ASR got right (against the synthesiser's word
times), and the real-time factor: decoding CPU seconds per second of audio, one process.

--eval_per_task=N: exports N test samples per task (the tiny config's data section, as
tml_jax.main does with --eval_per_task) and times `tml_jax.eval.harness.evaluate` over
them with the default systems; --workdir=W scores a trained model, --random_model a
randomly initialised engine of the tiny config (same compute, nonsense speech).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SENTENCES = (
    "Okay, let me think about that for a second.",
    "The weather in Paris is sunny and warm today.",
    "Can you tell me what time it is right now?",
    "Yes, I think that is a very good idea.",
    "I would like to book a table for two people tonight.",
    "Sure, the meeting starts at three in the afternoon.",
    "That sounds great, thank you so much for your help.",
    "Please remind me to call my mother tomorrow morning.",
    "The train leaves from platform four in ten minutes.",
    "I am not sure, but I can look it up for you.",
    "We should probably leave before it starts to rain.",
    "Could you say that again a little more slowly?",
    "My favourite colour has always been dark green.",
    "There are seven days in a week and twelve months in a year.",
    "Let me know if you need anything else from me.",
    "He said the answer was forty two.",
)


def sentences():
  from tml_jax.data import speech
  from tml_jax.eval import asr
  edits = ref_n = 0
  audio_s = cpu_s = 0.0
  time_err = []
  for voice in speech.MODEL_VOICES:
    for text in SENTENCES:
      utt = speech.synth(text, voice)
      pcm = asr.to_pcm(utt.wav)
      t0 = time.process_time()
      words = asr.decode(pcm)
      cpu_s += time.process_time() - t0
      audio_s += len(pcm) / asr.SAMPLE_RATE
      ref = [t for w, _, _ in utt.words for t in asr.tokens(w)[:1]]
      hyp = [w for w, _, _ in words]
      edits += asr.edit_distance(asr.tokens(text), hyp)
      ref_n += len(asr.tokens(text))
      for b in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        time_err += [abs(words[b.b + k][1] - utt.words[b.a + k][1]) for k in range(b.size)]
  return {"sentences": len(SENTENCES) * len(speech.MODEL_VOICES), "audio_s": round(audio_s, 1),
          "wer": round(edits / ref_n, 3),
          "start_err_median_s": round(float(np.median(time_err)), 3),
          "start_err_p90_s": round(float(np.percentile(time_err, 90)), 3),
          "rtf_cpu": round(cpu_s / audio_s, 3), "recogniser": asr.recogniser(),
          "load_average": [round(x, 2) for x in os.getloadavg()]}


class RandomModel:
  """The model system with a randomly initialised tiny engine."""
  name = "model"

  def __init__(self, config):
    from tml_jax.eval import systems
    from tml_jax.serve.engine import Engine
    self.engine = Engine.from_config(config)
    self._run = systems.ModelSystem.run_sample

  def run_sample(self, sample, out_dir):
    self._run(self, sample, out_dir)


def evaluation(per_task: int, workdir: str | None, random_model: bool):
  from configs import interaction
  from tml_jax.data import export_fdb
  from tml_jax.eval import harness
  config = interaction.get_config("tiny")
  with tempfile.TemporaryDirectory() as tmp:
    data, out = os.path.join(tmp, "fdb"), os.path.join(tmp, "eval")
    counts = export_fdb.export(data, "test", config.data, per_task=per_task)
    t0 = time.time()
    systems = list(harness.DEFAULT_SYSTEMS)
    if random_model:
      systems[0] = RandomModel(config)
    load_s = round(time.time() - t0, 1)
    result = harness.evaluate(data, out, systems, workdir=workdir, config=None if workdir
                              else config, log=lambda *a: print(*a, flush=True))
    return {"samples": counts, "model_load_s": load_s, "wall_s": round(time.time() - t0, 1),
            "timing": result["timing"], "agreement": result["agreement"],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--eval_per_task", type=int, default=0)
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--random_model", action="store_true")
  ap.add_argument("--dither", type=float, default=None, help="override asr.DITHER")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.dither is not None:
    from tml_jax.eval import asr
    asr.DITHER = args.dither
  if args.eval_per_task:
    print(json.dumps(evaluation(args.eval_per_task, args.workdir, args.random_model), indent=1))
  else:
    print(json.dumps(sentences(), indent=1))


if __name__ == "__main__":
  main()
