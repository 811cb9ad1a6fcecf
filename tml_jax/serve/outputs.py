"""What a run leaves on disk: output.wav, monologue.json (the model's own text stream, in
Full-Duplex-Bench's transcript shape {"text", "chunks": [{"text", "timestamp": [s, e]}]}),
events.jsonl, timeline.png and latency.json.

output.json is not written here: the benchmark scores what a system says out loud, so the
evaluation harness writes output.json from the ASR of output.wav (`tml_jax.eval.asr`) for
every system alike, and reports the text stream beside it as a diagnostic.

Time alignment: what the model makes in chunk t (its text and its audio) is played during
chunk t+1, so audio of chunk t lands at samples [(t+1)*S, (t+2)*S) and a word predicted in
chunk t is stamped [(t+1)*chunk_s, (t+2)*chunk_s) (extended to the chunk where it ends when
its bytes span several chunks). The wav has exactly the input's number of samples.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np

from tml_jax.audio import io
from tml_jax.text import tokenizer as tok


def aligned_audio(out_audio_CxS: np.ndarray, num_samples: int) -> np.ndarray:
  C, S = out_audio_CxS.shape
  wav = np.zeros(max(num_samples, (C + 1) * S), np.float32)
  wav[S:(C + 1) * S] = out_audio_CxS.reshape(-1)
  return wav[:num_samples]


def words(records, chunk_s: float) -> list[dict]:
  """The model's text stream as words with [start_s, end_s] (see the module docstring)."""
  out, buf, start = [], bytearray(), None

  def flush(end_t):
    nonlocal buf, start
    w = buf.decode("utf-8", errors="replace").strip()
    if w:
      out.append(dict(text=w, timestamp=[round((start + 1) * chunk_s, 3),
                                         round((end_t + 2) * chunk_s, 3)]))
    buf, start = bytearray(), None

  for r in records:
    for i in r.tokens:
      if i == tok.EOT:
        break
      if i >= 256:
        continue
      if i in (9, 10, 13, 32):  # ASCII whitespace ends a word
        flush(r.t)
        continue
      if start is None:
        start = r.t
      buf.append(i)
  if buf:
    flush(records[-1].t)
  return out


def latency(records, chunk_s: float) -> dict:
  ms = np.array([r.compute_ms for r in records], np.float64)
  # Every micro-turn counts (the engine compiles in its warm-up, not in chunk 0); the first
  # one is also reported apart, since a cold start would show there.
  steady = ms
  pct = lambda q: round(float(np.percentile(steady, q)), 3)
  return dict(num_chunks=int(ms.size), chunk_ms=chunk_s * 1e3, p50_ms=pct(50), p90_ms=pct(90),
              p99_ms=pct(99), max_ms=round(float(steady.max()), 3),
              mean_ms=round(float(steady.mean()), 3), first_chunk_ms=round(float(ms[0]), 3),
              real_time_factor=round(float(steady.mean()) / (chunk_s * 1e3), 4),
              over_budget_chunks=int(np.sum(steady > chunk_s * 1e3)),
              load_average=list(os.getloadavg()), cpu_count=os.cpu_count(),
              machine=platform.machine())


def timeline_png(path: str, wav_in: np.ndarray, wav_out: np.ndarray, word_list, events,
                 chunk_s: float, sample_rate: int = 16000):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  S = int(chunk_s * sample_rate)
  rms = lambda w: np.sqrt(np.mean(np.pad(w, (0, -w.size % S)).reshape(-1, S) ** 2, axis=1))
  u, m = rms(wav_in), rms(wav_out)
  dur = wav_in.size / sample_rate
  fig, axes = plt.subplots(3, 1, figsize=(max(8, min(40, dur / 2)), 5), sharex=True, dpi=100)
  t_u = np.arange(u.size) * chunk_s
  axes[0].fill_between(t_u, u, step="post", color="#3182bd")
  axes[0].set_ylabel("user RMS")
  axes[1].fill_between(np.arange(m.size) * chunk_s, m, step="post", color="#e6550d")
  printable = lambda x: "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(x))
  for w in word_list[:400]:  # labels beyond a few hundred are unreadable anyway
    axes[1].text(w["timestamp"][0], 0.9 * m.max() if m.size else 0, printable(w["text"])[:16],
                 fontsize=6, rotation=60, va="top", clip_on=True)
  axes[1].set_ylabel("model RMS + text")
  ax = axes[2]
  jobs = {}
  for e in events:
    if e["kind"] == "delegation":
      jobs[e["job"]] = e["time_s"]
    elif e["kind"] == "background_result":
      s = jobs.get(e["job"], e["time_s"])
      ax.plot([s, e["time_s"]], [1, 1], color="#31a354", lw=6, solid_capstyle="butt")
      ax.text(e["time_s"], 1.1, printable(e["text"])[:30], fontsize=6)
    elif e["kind"] in ("tool_call", "reminder", "error", "tool_error", "text_in"):
      y = {"tool_call": 0.6, "reminder": 0.3, "text_in": 0.3}.get(e["kind"], 0.0)
      ax.plot([e["time_s"]], [y], "v", color="#d62728" if "error" in e["kind"] else "#756bb1")
      ax.text(e["time_s"], y + 0.1, e["kind"], fontsize=6)
  ax.set_ylim(-0.2, 1.6)
  ax.set_yticks([])
  ax.set_ylabel("background")
  ax.set_xlabel("time (s)")
  ax.set_xlim(0, dur)
  fig.subplots_adjust(left=0.09, right=0.99, bottom=0.1, top=0.95, hspace=0.3)
  fig.savefig(path)
  plt.close(fig)


def write_all(out_dir: str, res: dict, wav_in: np.ndarray, chunk_s: float) -> dict:
  files = {k: os.path.join(out_dir, v) for k, v in dict(
      wav="output.wav", monologue="monologue.json", events="events.jsonl",
      timeline="timeline.png", latency="latency.json").items()}
  wav_out = aligned_audio(res["out_audio"], wav_in.size)
  io.save_wav(files["wav"], wav_out)
  word_list = words(res["records"], chunk_s)
  with open(files["monologue"], "w") as f:
    json.dump(dict(text=" ".join(w["text"] for w in word_list), chunks=word_list), f, indent=1)
  with open(files["events"], "w") as f:
    for e in res["events"]:
      f.write(json.dumps({k: v for k, v in e.items() if k != "trace"} | (
          {"trace": e["trace"]} if "trace" in e else {})) + "\n")
  res["latency"] = latency(res["records"], chunk_s)
  with open(files["latency"], "w") as f:
    json.dump(res["latency"], f, indent=1)
  timeline_png(files["timeline"], wav_in, wav_out, word_list, res["events"], chunk_s)
  res["words"] = word_list
  return files
