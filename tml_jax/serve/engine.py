"""The real-time micro-turn engine (docs/design.md §8): audio/video/text in, text + 200 ms audio out.

Every micro-turn t (chunk t covers [t*200 ms, (t+1)*200 ms)):
  1. wait for the clock (live: until chunk t's audio has arrived; offline: no wait);
  2. featurise: USER_AUDIO = dMel of the chunk's input (silence when late or missing),
     SELF_AUDIO = dMel of what the engine played during chunk t (the audio made at t-1),
     VIDEO = patches of the chunk's frame (masked when there is none), TEXT_IN = the next
     slots of the text FIFO (background answers, reminders, typed text);
  3. one jitted step (`serve.stream`): prefill, text decode, audio queries, flow head;
  4. vocode the chunk's mel frames -> 3200 samples, played during chunk t+1;
  5. a DELEGATE in the text hands the context to the background worker (never waited on).
Live and offline runs share this loop; only the clock and the input source differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from tml_jax.audio import dmel, io, vocoder
from tml_jax.microturn import ChunkLayout, TextFifo
from tml_jax.serve import outputs
from tml_jax.serve.stream import StreamingModel, serving_config
from tml_jax.serve.worker import BackgroundWorker, ModelGenerator
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolContext
from tml_jax.vision import patches as patch_lib

DEFAULT_CONFIG = "configs/interaction.py:tiny"


# ----------------------------------------------------------------------------- clocks

class OfflineClock:
  """Conversation time = chunk index * chunk_s; never sleeps."""
  live = False

  def __init__(self, chunk_s: float):
    self.chunk_s, self.t = chunk_s, 0

  def start(self):
    self.t = 0

  def wait_for_chunk(self, t: int):
    self.t = t

  def now_s(self) -> float:
    return self.t * self.chunk_s

  def arrived(self, arrival_s: float) -> bool:
    del arrival_s
    return True


class LiveClock:
  """Wall clock since `start`, `speed` times faster than real time (1.0 = real time; tests
  use more). Chunk t is processed once it has been fully heard, at (t+1)*chunk_s; when the
  engine runs late it starts the next chunk at once: the clock never stalls."""
  live = True

  def __init__(self, chunk_s: float, speed: float = 1.0):
    self.chunk_s, self.speed, self.t0 = chunk_s, speed, None

  def start(self):
    self.t0 = time.perf_counter()

  def now_s(self) -> float:
    return (time.perf_counter() - self.t0) * self.speed

  def wait_for_chunk(self, t: int):
    delay = ((t + 1) * self.chunk_s - self.now_s()) / self.speed
    if delay > 0:
      time.sleep(delay)

  def arrived(self, arrival_s: float) -> bool:
    return arrival_s <= self.now_s()


# ----------------------------------------------------------------------------- inputs

class RecordedInput:
  """A recording played as a stream: chunk t arrives at (t+1)*chunk_s + jitter; `drop`
  loses chunks at random (both simulate a network in live mode; offline ignores arrival)."""

  def __init__(self, wav_N: np.ndarray, chunk_samples: int, *, chunk_s: float,
               jitter_s: float = 0.0, drop: float = 0.0, seed: int = 0, frames=None):
    self.num_samples = wav_N.size
    self.num_chunks = -(-wav_N.size // chunk_samples)
    padded = np.zeros(self.num_chunks * chunk_samples, np.float32)
    padded[:wav_N.size] = wav_N
    self.chunks = padded.reshape(self.num_chunks, chunk_samples)
    rng = np.random.default_rng(seed)
    self.arrival_s = (np.arange(1, self.num_chunks + 1) * chunk_s
                      + rng.uniform(0, jitter_s, self.num_chunks))
    self.dropped = rng.random(self.num_chunks) < drop
    self.frames = frames  # [C, H, W, 3] uint8 or None

  def get(self, t: int, clock) -> np.ndarray | None:
    if self.dropped[t] or not clock.arrived(self.arrival_s[t]):
      return None
    return self.chunks[t]

  def frame(self, t: int):
    if self.frames is None or t >= len(self.frames):
      return None
    return self.frames[t]


def load_input(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """A 16 kHz wav, or a Full-Duplex-Bench sample folder (input.wav, optional video.npy
  [T, H, W, 3] or frames/*.png|jpg, one frame per chunk). NaN/Inf or unusable rates fail."""
  frames = None
  if os.path.isdir(path):
    wav_path = os.path.join(path, "input.wav")
    if not os.path.exists(wav_path):
      raise FileNotFoundError(f"{path!r} is a folder without input.wav; pass a 16 kHz wav or a "
                              "Full-Duplex-Bench sample folder (input.wav + optional frames).")
    if os.path.exists(os.path.join(path, "video.npy")):
      frames = np.load(os.path.join(path, "video.npy"))
    elif os.path.isdir(os.path.join(path, "frames")):
      from PIL import Image
      d = os.path.join(path, "frames")
      names = sorted(n for n in os.listdir(d) if n.lower().endswith((".png", ".jpg", ".jpeg")))
      frames = np.stack([np.asarray(Image.open(os.path.join(d, n)).convert("RGB"))
                         for n in names]) if names else None
  else:
    wav_path = path
  wav, rate = io.load_wav(wav_path)
  return io.check_wav(wav, rate, name=wav_path), frames


# ----------------------------------------------------------------------------- engine

@dataclasses.dataclass
class ChunkRecord:
  t: int
  compute_ms: float
  tokens: list
  user_missing: bool
  p_speak: float = 1.0   # the speak gate's P(speak in chunk t+1); 1 without a gate


class Engine:
  """Loads a model once; `run_file` / `run_wav` run a whole conversation through it."""

  def __init__(self, model, config, *, temperature: float | None = None,
               griffin_lim_iters: int | None = None, tools: dict | None = None,
               generate=None, warmup: bool = True, speak_threshold: float | None = None):
    serve = config.get("serve", {})
    self.config = config
    self.lay = ChunkLayout.from_config(config.layout)
    self.chunk_s = config.layout.chunk_ms / 1000
    self.chunk_samples = config.layout.chunk_ms * config.layout.sample_rate // 1000
    self.temperature = serve.get("temperature", 0.0) if temperature is None else temperature
    self.gl_iters = serve.get("griffin_lim_iters", 4) if griffin_lim_iters is None else \
        griffin_lim_iters
    self.seed = serve.get("seed", 0)
    if speak_threshold is None:
      speak_threshold = serve.get("speak_threshold", "auto")
      speak_threshold = 0.5 if speak_threshold == "auto" else float(speak_threshold)
    self.speak_threshold = speak_threshold
    self.stream = StreamingModel(model, flow_steps=config.model.flow_steps,
                                 speak_threshold=speak_threshold)
    bg = getattr(model, "background", None)
    self.generate = generate or (ModelGenerator(bg, model.cfg.window) if bg is not None
                                 else None)
    self.tools = tools
    self.tool_timeout_s = config.get("background", {}).get("tool_timeout_s", 5.0)
    if warmup:
      self.warmup()

  def warmup(self):
    """Compiles the step (and the background decoder) before the first conversation: a
    compile inside a live session would stall the first micro-turn for seconds."""
    lay, sm = self.lay, self.stream
    obs = dict(user_dmel=np.zeros((1, 1, lay.user_audio, 80), np.int32),
               self_dmel=np.zeros((1, 1, lay.self_audio, 80), np.int32),
               text_in=np.full((1, 1, lay.text_in), tok.PAD, np.int32),
               video=self._video(None)[0], video_valid=np.bool_(False))
    if obs["video"] is None:
      del obs["video"]
    # Two steps: chunk 0 has its own program when prefix > 0, and the second step is the
    # first to read a cache the step itself produced (any layout change recompiles here).
    for _ in range(2):
      jax.block_until_ready(sm.step(obs))
    if isinstance(self.generate, ModelGenerator):
      self.generate(sm.context(), [tok.BOS], (tok.EOT,), 0)
    sm.reset()
    # First calls that would otherwise land in chunk 0: the vocoder's cached filterbank
    # inverse, dMel's filterbank, the key derivation.
    with _blas_threads(1):
      vocoder.vocode(np.full((lay.user_audio, 80), -5.0, np.float32), n_iter=self.gl_iters)
      dmel.DMelStream(lay.user_audio).push_tokens(np.zeros(self.chunk_samples, np.float32))
    jax.random.fold_in(jax.random.key(self.seed), 0)

  # --------------------------------------------------------------- construction
  @classmethod
  def from_config(cls, config, *, seed: int = 0, **kw) -> "Engine":
    """Randomly initialised model (tests, benchmarks)."""
    from flax import nnx
    from tml_jax.model.transformer import InteractionModel, ModelConfig
    config = serving_config(config)
    model = InteractionModel(ModelConfig.from_config(config), rngs=nnx.Rngs(seed))
    return cls(model, config, **kw)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, **kw) -> "Engine":
    """Latest checkpoint of a trainer workdir; config from W/config.json when present, else
    `config` (a ConfigDict or 'path:variant'), else configs/interaction.py:tiny."""
    # The parameters alone (no optimizer or data-iterator state, no grain or optax), on the
    # device serving runs on; the newest checkpoint that restores wins.
    from flax import nnx
    from tml_jax.train.checkpoint import restore_params
    from tml_jax.train.state import model_from_params, params_abstract
    config = serving_config(load_config(workdir, config))
    graphdef, abstract = params_abstract(config)
    params, step = restore_params(workdir, nnx.to_pure_dict(abstract))
    if config.get("serve", {}).get("speak_threshold", "auto") == "auto":
      kw.setdefault("speak_threshold", calibrated_threshold(workdir))
    engine = cls(model_from_params(graphdef, abstract, params), config, **kw)
    engine.step = step
    return engine

  # --------------------------------------------------------------- running
  def run_wav(self, wav_N: np.ndarray, out_dir: str | None = None, *, live: bool = False,
              speed: float = 1.0, jitter_s: float = 0.0, drop: float = 0.0, frames=None,
              delegate_at_s=(), text_at_s=(), seed: int | None = None) -> dict:
    """Runs a whole conversation; writes the outputs to `out_dir` when given.

    delegate_at_s: conversation times at which to delegate as if the model had emitted
    DELEGATE (demos and tests); text_at_s: (time_s, text) typed into TEXT_IN.
    """
    wav_N = io.check_wav(wav_N, self.config.layout.sample_rate, name="input audio")
    seed = self.seed if seed is None else seed
    source = RecordedInput(wav_N, self.chunk_samples, chunk_s=self.chunk_s, jitter_s=jitter_s,
                           drop=drop, seed=seed, frames=frames)
    clock = LiveClock(self.chunk_s, speed) if live else OfflineClock(self.chunk_s)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    ctx = ToolContext(now_s=clock.now_s, out_dir=out_dir)
    worker = BackgroundWorker(self.generate, ToolBox(self.tools, ctx,
                                                     timeout_s=self.tool_timeout_s))
    # The vocoder's small float64 matmuls slow down ~50x when BLAS threads fight the XLA
    # threads (and other jobs) for cores; one BLAS thread is fastest at these sizes.
    try:
      with _blas_threads(1):
        res = self._loop(source, clock, worker, ctx, seed, sorted(delegate_at_s),
                         sorted(text_at_s))
    finally:
      worker.close()
    res["live"] = live
    if out_dir:
      res["files"] = outputs.write_all(out_dir, res, wav_N, self.chunk_s)
    return res

  def run_file(self, input_path: str, out_dir: str, **kw) -> dict:
    wav_N, frames = load_input(input_path)
    return self.run_wav(wav_N, out_dir, frames=frames, **kw)

  def _video(self, frame):
    lay, m = self.lay, self.config.model
    if not lay.video:
      return None, False
    if frame is None:
      return np.zeros((1, 1, lay.video, m.patch_size ** 2 * 3), np.uint8), False
    f = patch_lib.resize_frame(np.asarray(frame, np.uint8), tuple(self.config.layout.video_size))
    return patch_lib.patchify(f, m.patch_size)[None, None], True

  def _loop(self, source, clock, worker, ctx, seed, delegate_at, text_at) -> dict:
    """One conversation: per micro-turn, gather text, observe, step, vocode, delegate."""
    lay, C, sm = self.lay, source.num_chunks, self.stream
    sm.reset()
    user_dm, self_dm = dmel.DMelStream(lay.user_audio), dmel.DMelStream(lay.self_audio)
    fifo = TextFifo(lay.text_in)
    out_audio = np.zeros((C, self.chunk_samples), np.float32)
    played = np.zeros(self.chunk_samples, np.float32)
    events, records = [], []
    key = jax.random.key(seed)
    clock.start()
    for t in range(C):
      clock.wait_for_chunk(t)
      now = t * self.chunk_s  # conversation time at the start of chunk t
      self._gather_text(fifo, events, worker, ctx, text_at, now, offline=not clock.live)
      audio = source.get(t, clock)
      missing = audio is None
      if missing:
        events.append(dict(kind="input_missing", time_s=round(now, 3), chunk=t))
        audio = np.zeros(self.chunk_samples, np.float32)
      t0 = time.perf_counter()
      video, video_valid = self._video(source.frame(t))
      obs = dict(user_dmel=user_dm.push_tokens(audio)[None, None],
                 self_dmel=self_dm.push_tokens(played)[None, None],
                 text_in=fifo.take()[None, None], video_valid=np.bool_(video_valid))
      if video is not None:
        obs["video"] = video
      out = sm.step(obs, rng=jax.random.fold_in(key, t), temperature=self.temperature)
      tokens = np.asarray(out["tokens"]).tolist()
      wav = vocoder.vocode(np.asarray(out["mel"]), n_iter=self.gl_iters)[:self.chunk_samples]
      played = np.clip(np.nan_to_num(wav), -1.0, 1.0)
      out_audio[t] = played
      records.append(ChunkRecord(t, (time.perf_counter() - t0) * 1e3, tokens, missing,
                                 float(out["p_speak"])))
      forced = bool(delegate_at) and delegate_at[0] <= now + 1e-9
      if forced:
        delegate_at.pop(0)
      if forced or tok.DELEGATE in tokens:
        job = worker.submit(t, (t + 1) * self.chunk_s, sm.context())
        events.append(dict(kind="delegation", time_s=round((t + 1) * self.chunk_s, 3),
                           chunk=t, job=job.id, forced=tok.DELEGATE not in tokens))
    events.append(dict(kind="end", time_s=round(C * self.chunk_s, 3),
                       pending_background_jobs=len(worker.pending)))
    return dict(records=records, out_audio=out_audio, events=events, num_chunks=C,
                cache_bytes=sm.cache_nbytes())

  @staticmethod
  def _gather_text(fifo: TextFifo, events: list, worker, ctx, text_at, now: float, *,
                   offline: bool):
    """Background answers, reminders and typed text due by `now` join the TEXT_IN queue.
    (Offline, `poll` may wait for a job, bounded by its real-time budget: not micro-turn
    time.)"""
    enc = tok.ByteTokenizer().encode
    for job in worker.poll(now, offline=offline):
      for e in job.events:  # `at_s`: when it happened on the job's conversation clock
        at = e.pop("at_s", now)
        events.append(dict(e, time_s=round(at, 3), job=job.id))
      events.append(dict(kind="background_result", time_s=round(now, 3), job=job.id,
                         text=job.answer, delegated_at_s=round(job.submit_s, 3),
                         compute_s=round(job.compute_s, 3)))
      fifo.push([tok.RESULT] + enc(job.answer))
    for r in ctx.reminders.due(now):
      events.append(dict(kind="reminder", time_s=round(now, 3), due_s=round(r.due_s, 3),
                         text=r.text))
      fifo.push([tok.RESULT] + enc(f"reminder: {r.text}"))
    while text_at and text_at[0][0] <= now + 1e-9:
      _, text = text_at.pop(0)
      events.append(dict(kind="text_in", time_s=round(now, 3), text=text))
      fifo.push([tok.RESULT] + enc(text))


def _blas_threads(n: int):
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # optional dependency: without it the vocoder is slower, not wrong
    import contextlib
    return contextlib.nullcontext()
  return threadpool_limits(limits=n, user_api="blas")


def calibrated_threshold(workdir: str) -> float:
  """The speak threshold the trainer calibrated on validation (W/speak_threshold.json), or
  0.5 when the run has none (no speak gate, or no final report yet)."""
  path = os.path.join(workdir, "speak_threshold.json")
  if not os.path.exists(path):
    return 0.5
  with open(path) as f:
    return float(json.load(f)["threshold"])


def load_config(workdir: str | None, config=None):
  """W/config.json (written by the trainer) wins; else `config`; else the tiny default."""
  import ml_collections as mlc
  path = os.path.join(workdir, "config.json") if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      return mlc.ConfigDict(json.load(f))
  if config is None:
    config = DEFAULT_CONFIG
  if isinstance(config, str):
    import importlib.util
    path, _, arg = config.partition(":")
    spec = importlib.util.spec_from_file_location("_tml_serve_config", path)
    if spec is None or not os.path.exists(path):
      raise FileNotFoundError(f"config file {path!r} not found; pass e.g. {DEFAULT_CONFIG}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  return config
