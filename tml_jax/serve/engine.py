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
from tml_jax.serve.inputs import LiveClock, OfflineClock, RecordedInput, WavFile, load_input
from tml_jax.serve.stream import StreamingModel, serving_config
from tml_jax.serve.worker import BackgroundWorker, ModelGenerator
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolContext
from tml_jax.vision import patches as patch_lib

DEFAULT_CONFIG = "configs/interaction.py:tiny"


# ----------------------------------------------------------------------------- engine

@dataclasses.dataclass
class ChunkRecord:
  t: int
  compute_ms: float
  tokens: list
  user_missing: bool
  p_speak: float = 1.0   # the speak gate's P(speak in chunk t+1); 1 without a gate
  lag_ms: float = 0.0    # live: how late the step started after its chunk was due
  input_wait_ms: float = 0.0  # live: time spent in the jitter buffer waiting for the input


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
    bg_cfg = config.get("background", {})
    self.tool_timeout_s = bg_cfg.get("tool_timeout_s", 5.0)
    self.max_pending = int(bg_cfg.get("max_pending", 3))
    self.jitter_buffer_s = float(serve.get("jitter_buffer_ms", 100)) / 1000
    self.text_in_capacity = int(serve.get("text_in_capacity", 512))
    for name, value in (("background.max_pending", self.max_pending),
                        ("serve.text_in_capacity", self.text_in_capacity)):
      if value < 1:
        raise ValueError(f"config.{name}={value}; it must be at least 1")
    if self.jitter_buffer_s < 0:
      raise ValueError(f"config.serve.jitter_buffer_ms={serve.get('jitter_buffer_ms')}; pass "
                       "0 (no buffer) or a positive number of milliseconds")
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
    skipped = []  # newer checkpoints that failed: logged, and kept for the report
    params, step = restore_params(workdir, nnx.to_pure_dict(abstract), skipped=skipped)
    if config.get("serve", {}).get("speak_threshold", "auto") == "auto":
      kw.setdefault("speak_threshold", calibrated_threshold(workdir))
    engine = cls(model_from_params(graphdef, abstract, params), config, **kw)
    engine.step, engine.skipped_checkpoints = step, skipped
    return engine

  # --------------------------------------------------------------- running
  def run_wav(self, wav_N: np.ndarray, out_dir: str | None = None, *, live: bool = False,
              speed: float = 1.0, jitter_s: float = 0.0, drop: float = 0.0, frames=None,
              delegate_at_s=(), text_at_s=(), seed: int | None = None) -> dict:
    """Runs a whole conversation; writes the outputs to `out_dir` when given.

    wav_N: float audio at 16 kHz (checked), or a `WavFile` read as it plays (`open_wav`).
    delegate_at_s: conversation times at which to delegate as if the model had emitted
    DELEGATE (demos and tests); text_at_s: (time_s, text) typed into TEXT_IN.
    """
    if not isinstance(wav_N, WavFile):
      raw = wav_N
      wav_N = io.check_wav(wav_N, self.config.layout.sample_rate, name="input audio")
      io.check_float_scale(raw, wav_N, "input audio")
    seed = self.seed if seed is None else seed
    source = RecordedInput(wav_N, self.chunk_samples, chunk_s=self.chunk_s, jitter_s=jitter_s,
                           drop=drop, seed=seed, frames=frames,
                           jitter_buffer_s=self.jitter_buffer_s)
    clock = LiveClock(self.chunk_s, speed) if live else OfflineClock(self.chunk_s)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    sink = outputs.AudioSink(source.num_samples, self.chunk_samples,
                             os.path.join(out_dir, "output.wav") if out_dir else None)
    ctx = ToolContext(now_s=clock.now_s, out_dir=out_dir)
    worker = BackgroundWorker(self.generate, ToolBox(self.tools, ctx,
                                                     timeout_s=self.tool_timeout_s),
                              max_pending=self.max_pending)
    # The vocoder's small float64 matmuls slow down ~50x when BLAS threads fight the XLA
    # threads (and other jobs) for cores; one BLAS thread is fastest at these sizes.
    try:
      with _blas_threads(1):
        res = self._loop(source, clock, worker, ctx, sink, seed, sorted(delegate_at_s),
                         sorted(text_at_s))
    finally:
      worker.close()
      sink.close()
    res.update(live=live, out_audio=sink.chunks, user_rms=sink.user_rms, model_rms=sink.rms,
               num_samples=source.num_samples)
    if out_dir:
      res["files"] = outputs.write_all(out_dir, res, self.chunk_s)
    return res

  def run_file(self, input_path: str, out_dir: str, **kw) -> dict:
    wav_N, frames = load_input(input_path)
    try:
      return self.run_wav(wav_N, out_dir, frames=frames, **kw)
    finally:
      if isinstance(wav_N, WavFile):
        wav_N.close()

  def _video(self, frame):
    lay, m = self.lay, self.config.model
    if not lay.video:
      return None, False
    if frame is None:
      return np.zeros((1, 1, lay.video, m.patch_size ** 2 * 3), np.uint8), False
    f = patch_lib.resize_frame(np.asarray(frame, np.uint8), tuple(self.config.layout.video_size))
    return patch_lib.patchify(f, m.patch_size)[None, None], True

  def _loop(self, source, clock, worker, ctx, sink, seed, delegate_at, text_at) -> dict:
    """One conversation: per micro-turn, gather text, observe, step, vocode, delegate."""
    lay, C, sm = self.lay, source.num_chunks, self.stream
    sm.reset()
    user_dm, self_dm = dmel.DMelStream(lay.user_audio), dmel.DMelStream(lay.self_audio)
    fifo = TextFifo(lay.text_in, capacity=self.text_in_capacity)
    played = np.zeros(self.chunk_samples, np.float32)
    events, records = [], []
    key = jax.random.key(seed)
    clock.start()
    for t in range(C):
      clock.wait_for_chunk(t)
      now = t * self.chunk_s  # conversation time at the start of chunk t
      lag_ms = max(0.0, clock.now_s() - (t + 1) * self.chunk_s) * 1e3 if clock.live else 0.0
      self._gather_text(fifo, events, worker, ctx, text_at, now, offline=not clock.live)
      audio, waited_s = source.get(t, clock)
      missing = audio is None
      if missing:
        events.append(dict(kind="input_missing", time_s=round(now, 3), chunk=t,
                           jitter_buffer_ms=round(self.jitter_buffer_s * 1e3, 1)))
        audio = np.zeros(self.chunk_samples, np.float32)
      if source.frames is not None and t == len(source.frames) > 0:
        events.append(dict(kind="video_ended", time_s=round(now, 3), chunk=t))
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
      bad = ~np.isfinite(wav)
      if bad.any():  # reported, then played as silence where it is not a number
        events.append(dict(kind="vocoder_nonfinite", time_s=round(now, 3), chunk=t,
                           samples=int(bad.sum()),
                           mel_nonfinite=int((~np.isfinite(np.asarray(out["mel"]))).sum())))
        wav = np.where(bad, 0.0, wav)
      played = np.clip(wav, -1.0, 1.0).astype(np.float32)
      sink.write(t, played, audio)
      records.append(ChunkRecord(t, (time.perf_counter() - t0) * 1e3, tokens, missing,
                                 float(out["p_speak"]), round(lag_ms, 3),
                                 round(waited_s * 1e3, 3)))
      forced = bool(delegate_at) and delegate_at[0] <= now + 1e-9
      if forced:
        delegate_at.pop(0)
      if forced or tok.DELEGATE in tokens:
        self._delegate(worker, events, sm, t, forced=tok.DELEGATE not in tokens)
    closed = worker.close()  # queued jobs cancelled, the running one joined: nothing leaks
    events.append(dict(kind="end", time_s=round(C * self.chunk_s, 3),
                       pending_background_jobs=len(worker.pending),
                       cancelled_background_jobs=closed["cancelled"],
                       abandoned_background_job=closed["abandoned"],
                       text_in_dropped_tokens=fifo.dropped))
    return dict(records=records, events=events, num_chunks=C, cache_bytes=sm.cache_nbytes())

  def _delegate(self, worker, events, sm, t: int, *, forced: bool):
    """Hands chunk t's context to the worker: a new job, or coalesced into one still
    queued, or dropped when `background.max_pending` jobs are outstanding."""
    at = round((t + 1) * self.chunk_s, 3)
    job, outcome = worker.submit(t, (t + 1) * self.chunk_s, sm.context)
    if outcome == "submitted":
      events.append(dict(kind="delegation", time_s=at, chunk=t, job=job.id, forced=forced))
    elif outcome == "coalesced":
      events.append(dict(kind="delegation_coalesced", time_s=at, chunk=t, job=job.id,
                         forced=forced))
    else:
      events.append(dict(kind="delegation_dropped", time_s=at, chunk=t, forced=forced,
                         outstanding=len(worker.pending), max_pending=worker.max_pending))

  @staticmethod
  def _gather_text(fifo: TextFifo, events: list, worker, ctx, text_at, now: float, *,
                   offline: bool):
    """Background answers, reminders and typed text due by `now` join the TEXT_IN queue;
    past its capacity the oldest queued tokens are dropped, and that is reported.
    (Offline, `poll` may wait for a job, bounded by its real-time budget: not micro-turn
    time.)"""
    enc = tok.ByteTokenizer().encode

    def push(tokens, source: str):
      dropped = fifo.push(tokens)
      if dropped:
        events.append(dict(kind="text_in_overflow", time_s=round(now, 3), source=source,
                           dropped_tokens=dropped, capacity=fifo.capacity))

    for job in worker.poll(now, offline=offline):
      for e in job.events:  # `at_s`: when it happened on the job's conversation clock
        at = e.pop("at_s", now)
        events.append(dict(e, time_s=round(at, 3), job=job.id))
      events.append(dict(kind="background_result", time_s=round(now, 3), job=job.id,
                         text=job.answer, delegated_at_s=round(job.submit_s, 3),
                         compute_s=round(job.compute_s, 3)))
      push([tok.RESULT] + enc(job.answer), "background_result")
    for r in ctx.reminders.due(now):
      events.append(dict(kind="reminder", time_s=round(now, 3), due_s=round(r.due_s, 3),
                         text=r.text))
      push([tok.RESULT] + enc(f"reminder: {r.text}"), "reminder")
    while text_at and text_at[0][0] <= now + 1e-9:
      _, text = text_at.pop(0)
      events.append(dict(kind="text_in", time_s=round(now, 3), text=text))
      push([tok.RESULT] + enc(text), "text_in")


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
