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
import wave

import numpy as np

from tml_jax.audio import io
from tml_jax.text import tokenizer as tok


def aligned_audio(out_audio_CxS: np.ndarray, num_samples: int) -> np.ndarray:
  C, S = out_audio_CxS.shape
  wav = np.zeros(max(num_samples, (C + 1) * S), np.float32)
  wav[S:(C + 1) * S] = out_audio_CxS.reshape(-1)
  return wav[:num_samples]


class AudioSink:
  """What the engine plays, chunk by chunk, aligned as the module docstring says.

  With `path`, output.wav (16 kHz mono int16) is written as the conversation runs and only
  per-chunk RMS stays in memory, so an hour costs kilobytes, not the 230 MB of its samples;
  without, the chunks are kept (`chunks`, [C, S]) for callers that want the audio itself.
  `num_samples=None` (a live session of unknown length): the wav ends with the last chunk
  heard, so it is as long as what was heard.
  """

  def __init__(self, num_samples: int | None, chunk_samples: int, path: str | None = None,
               sample_rate: int = 16000):
    self.num_samples, self.S = num_samples, chunk_samples
    self._rms, self._user_rms, self._chunks = [], [], None if path else []
    self._wav, self._written, self._held = None, 0, None
    if path:
      self._wav = wave.open(path, "wb")
      self._wav.setnchannels(1)
      self._wav.setsampwidth(2)
      self._wav.setframerate(sample_rate)
      self._emit(np.zeros(chunk_samples, np.float32))  # chunk t plays during chunk t+1

  @property
  def rms(self) -> np.ndarray:
    return np.asarray(self._rms, np.float32)

  @property
  def user_rms(self) -> np.ndarray:
    return np.asarray(self._user_rms, np.float32)

  @property
  def chunks(self) -> np.ndarray | None:
    if self._chunks is None:
      return None
    return np.asarray(self._chunks, np.float32).reshape(len(self._chunks), self.S)

  def _emit(self, wav: np.ndarray):
    limit = self.num_samples if self.num_samples is not None else np.inf
    n = int(min(wav.size, limit - self._written))
    if n > 0:
      self._wav.writeframes(io.to_pcm16(wav[:n]).astype("<i2").tobytes())
      self._written += n

  def write(self, t: int, played_S: np.ndarray, heard_S: np.ndarray):
    if t != len(self._rms):
      raise ValueError(f"AudioSink got chunk {t} after {len(self._rms)} chunks; chunks must "
                       "come in order, one per micro-turn")
    self._rms.append(np.sqrt(np.mean(np.square(played_S, dtype=np.float64))))
    self._user_rms.append(np.sqrt(np.mean(np.square(heard_S, dtype=np.float64))))
    if self._chunks is not None:
      self._chunks.append(np.asarray(played_S, np.float32))
    if self._wav is not None:  # one chunk held back: the last one plays after the input ends
      if self._held is not None:
        self._emit(self._held)
      self._held = np.array(played_S, np.float32)

  def close(self):
    if self._wav is None:
      return
    if self.num_samples is not None:
      if self._held is not None:
        self._emit(self._held)
      self._emit(np.zeros(max(0, self.num_samples - self._written), np.float32))
    self._wav.close()
    self._wav = None


class WordStream:
  """The model's text stream cut into words as it is decoded (see the module docstring for
  the timestamps): `push(t, tokens)` returns the words chunk t completed."""

  def __init__(self, chunk_s: float):
    self.chunk_s, self._buf, self._start = chunk_s, bytearray(), None

  def _flush(self, end_t: int) -> list[dict]:
    w = self._buf.decode("utf-8", errors="replace").strip()
    out = [dict(text=w, timestamp=[round((self._start + 1) * self.chunk_s, 3),
                                   round((end_t + 2) * self.chunk_s, 3)])] if w else []
    self._buf, self._start = bytearray(), None
    return out

  def push(self, t: int, tokens) -> list[dict]:
    out = []
    for i in tokens:
      if i == tok.EOT:
        break
      if i >= 256:
        continue
      if i in (9, 10, 13, 32):  # ASCII whitespace ends a word
        out += self._flush(t)
        continue
      if self._start is None:
        self._start = t
      self._buf.append(i)
    return out

  def finish(self, last_t: int) -> list[dict]:
    """The word still open when the conversation ends."""
    return self._flush(last_t) if self._buf else []


def words(records, chunk_s: float) -> list[dict]:
  """The model's text stream as words with [start_s, end_s] (see the module docstring)."""
  stream, out = WordStream(chunk_s), []
  for r in records:
    out += stream.push(r.t, r.tokens)
  return out + (stream.finish(records[-1].t) if records else [])


def latency(records, chunk_s: float) -> dict:
  """Compute time per micro-turn, and (live) the catch-up policy's record: how late each
  step started after its chunk was due (`inputs.LiveClock`: no micro-turn is skipped; late
  ones run back to back until the engine is on schedule again) and the jitter buffer's
  waits."""
  ms = np.array([r.compute_ms for r in records], np.float64)
  lag = np.array([r.lag_ms for r in records], np.float64)
  wait = np.array([r.input_wait_ms for r in records], np.float64)
  # Every micro-turn counts (the engine compiles in its warm-up, not in chunk 0); the first
  # one is also reported apart, since a cold start would show there.
  pct = lambda x, q: round(float(np.percentile(x, q)), 3)
  late = lag > 1e-6
  # Catch-up episodes: runs of consecutive late chunks; their length is the catch-up time.
  runs, n = [], 0
  for flag in late.tolist() + [False]:
    if flag:
      n += 1
    elif n:
      runs.append(n)
      n = 0
  return dict(num_chunks=int(ms.size), chunk_ms=chunk_s * 1e3, p50_ms=pct(ms, 50),
              p90_ms=pct(ms, 90), p99_ms=pct(ms, 99), max_ms=round(float(ms.max()), 3),
              mean_ms=round(float(ms.mean()), 3), first_chunk_ms=round(float(ms[0]), 3),
              real_time_factor=round(float(ms.mean()) / (chunk_s * 1e3), 4),
              over_budget_chunks=int(np.sum(ms > chunk_s * 1e3)),
              catch_up=dict(
                  policy="no micro-turn is skipped: a step that starts after its chunk was "
                         "due runs at once, back to back, until the engine is on schedule",
                  late_chunks=int(late.sum()), max_lag_ms=round(float(lag.max()), 3),
                  p90_lag_ms=pct(lag, 90), episodes=len(runs),
                  longest_episode_chunks=max(runs, default=0)),
              jitter_buffer=dict(waited_chunks=int(np.sum(wait > 0)),
                                 max_wait_ms=round(float(wait.max()), 3),
                                 missing_chunks=int(sum(r.user_missing for r in records))),
              load_average=list(os.getloadavg()), cpu_count=os.cpu_count(),
              machine=platform.machine())


def timeline_png(path: str, user_rms_C: np.ndarray, model_rms_C: np.ndarray, word_list,
                 events, chunk_s: float, duration_s: float):
  """User and model loudness per chunk (model shifted to when it is heard), the model's
  words, and the background work, on one time axis."""
  from matplotlib.figure import Figure  # no pyplot: no global backend switch
  u, m = user_rms_C, model_rms_C
  dur = duration_s
  fig = Figure(figsize=(max(8, min(40, dur / 2)), 5), dpi=100)
  axes = fig.subplots(3, 1, sharex=True)
  t_u = np.arange(u.size) * chunk_s
  axes[0].fill_between(t_u, u, step="post", color="#3182bd")
  axes[0].set_ylabel("user RMS")
  axes[1].fill_between((np.arange(m.size) + 1) * chunk_s, m, step="post", color="#e6550d")
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


def write_all(out_dir: str, res: dict, chunk_s: float) -> dict:
  """Everything but output.wav (written as the run went, by AudioSink) from the run's
  result: monologue.json, events.jsonl, latency.json, timeline.png."""
  files = {k: os.path.join(out_dir, v) for k, v in dict(
      wav="output.wav", monologue="monologue.json", events="events.jsonl",
      timeline="timeline.png", latency="latency.json").items()}
  if res.get("out_audio") is not None:  # a sink without a file: write the kept chunks
    io.save_wav(files["wav"], aligned_audio(res["out_audio"], res["num_samples"]))
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
  timeline_png(files["timeline"], res["user_rms"], res["model_rms"], word_list, res["events"],
               chunk_s, res["num_samples"] / 16000)
  res["words"] = word_list
  return files
