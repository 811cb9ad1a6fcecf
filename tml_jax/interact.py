r"""Talk to a trained interaction model: a recording (offline) or paced by the wall clock (live).

  python -m tml_jax.interact --workdir=runs/tiny --input=sample.wav --out=out/sample
  python -m tml_jax.interact --workdir=runs/tiny --input=fdb/turn_taking/1 --out=out/1 --live

--input is a 16 kHz wav or a Full-Duplex-Bench sample folder (input.wav, optional video.npy or
frames/). Writes OUT/output.wav (exactly the input's length, the audio made in chunk t at
[(t+1)*200 ms, (t+2)*200 ms)), OUT/monologue.json (the model's own text stream, {"text",
"chunks": [{"text", "timestamp"}]}), OUT/output.json (the same shape: what an offline ASR,
pocketsphinx, hears in output.wav, i.e. what Full-Duplex-Bench's scripts score; skipped with
a note when pocketsphinx is not installed, or with --notranscribe), OUT/events.jsonl,
OUT/timeline.png and OUT/latency.json. The config comes from W/config.json
(the trainer writes it), else --config (default configs/interaction.py:tiny).

From Python (the evaluation harness; load once, run many):
  from tml_jax.interact import run
  from tml_jax.serve import Engine
  engine = Engine.from_workdir(W)
  for sample in samples: engine.run_file(sample, out_dir)
"""

from __future__ import annotations

import json

from absl import app, flags

from tml_jax.serve.engine import Engine


def run(workdir: str, input_path: str, out_dir: str, *, config=None, live: bool = False,
        engine: Engine | None = None, **kw) -> dict:
  """One sample end to end; returns latency figures, words and the written files. Pass an
  `engine` (Engine.from_workdir) to reuse a loaded model across samples."""
  engine_kw = {k: kw.pop(k) for k in ("temperature", "griffin_lim_iters", "speak_threshold",
                                      "delegate_threshold") if k in kw}
  engine = engine or Engine.from_workdir(workdir, config, **engine_kw)
  res = engine.run_file(input_path, out_dir, live=live, **kw)
  return dict(latency=res["latency"], words=res["words"], files=res["files"],
              events=[e for e in res["events"] if e["kind"] != "input_missing"],
              num_chunks=res["num_chunks"])


def main(argv):
  del argv
  if not (_WORKDIR.value and _INPUT.value and _OUT.value):
    raise app.UsageError("--workdir, --input and --out are required")
  kw = {}
  for name, flag in (("temperature", _TEMPERATURE), ("delegate_threshold", _DELEGATE_THRESHOLD)):
    if flag.value is not None:
      kw[name] = flag.value
  out = run(_WORKDIR.value, _INPUT.value, _OUT.value, config=_CONFIG.value, live=_LIVE.value,
            delegate_at_s=[float(x) for x in _DELEGATE_AT.value], **kw)
  heard = None
  if _TRANSCRIBE.value:
    try:
      from tml_jax.eval import asr
    except ImportError as e:  # serving images may not carry the recogniser
      print(f"output.json not written ({e}); pip install pocketsphinx to transcribe output.wav")
    else:
      heard = asr.write_transcript(_OUT.value)["text"]
  print(json.dumps(dict(latency=out["latency"], text=" ".join(w["text"] for w in out["words"]),
                        heard=heard, files=out["files"]), indent=1))


if __name__ == "__main__":
  # Flags live here so that importing run() (e.g. from the evaluation harness) defines none.
  _WORKDIR = flags.DEFINE_string("workdir", None, "Trainer workdir (checkpoints/, config.json).")
  _INPUT = flags.DEFINE_string("input", None, "16 kHz wav or Full-Duplex-Bench sample folder.")
  _OUT = flags.DEFINE_string("out", None, "Output folder.")
  _CONFIG = flags.DEFINE_string("config", None, "path:variant when W/config.json is missing "
                                "(default configs/interaction.py:tiny).")
  _LIVE = flags.DEFINE_bool("live", False, "Pace by the wall clock (late input = silence).")
  _TEMPERATURE = flags.DEFINE_float("temperature", None, "Text sampling temperature (0 = greedy).")
  _DELEGATE_AT = flags.DEFINE_list("delegate_at_s", [], "Force delegations at these times (demo).")
  _DELEGATE_THRESHOLD = flags.DEFINE_float(
      "delegate_threshold", None, "P(DELEGATE) at which a micro-turn the gate lets speak "
      "delegates (default: W/delegate_threshold.json, the trainer's calibration; 1 = argmax).")
  _TRANSCRIBE = flags.DEFINE_bool("transcribe", True, "Write OUT/output.json: the ASR of "
                                  "output.wav (pocketsphinx).")
  app.run(main)
