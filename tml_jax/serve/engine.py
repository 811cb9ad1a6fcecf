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
Steps 2-5 are `session.Session.step`, the one micro-turn every driver shares: the offline and
live loops here (which differ only in the clock and the input source) and the web server's
sessions (`tml_jax.serve.web`, live microphone input over a WebSocket).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from tml_jax import paths
from tml_jax.audio import dmel, io, vocoder
from tml_jax.microturn import ChunkLayout
from tml_jax.serve import outputs
from tml_jax.serve.inputs import (LiveClock, OfflineClock, RecordedInput, WavFile, load_input,
                                  sample_typed_text)
from tml_jax.serve.session import ChunkRecord, Session
from tml_jax.serve.stream import StreamingModel, serving_config
from tml_jax.serve.worker import ModelGenerator
from tml_jax.text import tokenizer as tok
from tml_jax.vision import patches as patch_lib

__all__ = ["ChunkRecord", "DEFAULT_CONFIG", "Engine", "Session", "calibrated_threshold",
           "load_config"]

DEFAULT_CONFIG = "configs/interaction.py:tiny"


# ----------------------------------------------------------------------------- engine

class Engine:
  """Loads a model once; `run_file` / `run_wav` run a whole conversation through it."""

  def __init__(self, model, config, *, temperature: float | None = None,
               griffin_lim_iters: int | None = None, tools: dict | None = None,
               generate=None, warmup: bool = True, speak_threshold: float | None = None,
               keep_threshold: float | None = None, delegate_threshold: float | None = None):
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
    # Hysteresis, as voice-activity detectors do it: the calibrated threshold starts speech
    # (a false start is a taken turn), a lower one keeps it going (`keep_threshold`).
    if keep_threshold is None:
      keep = serve.get("speak_keep_threshold", "auto")
      keep_threshold = min(0.5, speak_threshold) if keep == "auto" else float(keep)
    self.keep_threshold = float(keep_threshold)
    if delegate_threshold is None:
      delegate_threshold = serve.get("delegate_threshold", "auto")
      delegate_threshold = 1.0 if delegate_threshold == "auto" else float(delegate_threshold)
    if not 0.0 < float(delegate_threshold) <= 1.0:
      raise ValueError(f"serve.delegate_threshold={delegate_threshold!r}: a probability in "
                       "(0, 1] (1: DELEGATE only where it wins the argmax), or 'auto'")
    self.delegate_threshold = float(delegate_threshold)
    self.stream = StreamingModel(model, flow_steps=config.model.flow_steps,
                                 speak_threshold=speak_threshold,
                                 delegate_threshold=self.delegate_threshold)
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
               self_speaking=np.zeros((1, 1), bool),
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
    if config.get("serve", {}).get("delegate_threshold", "auto") == "auto":
      kw.setdefault("delegate_threshold", calibrated_threshold(workdir, "delegate"))
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
    source = RecordedInput(wav_N, self.chunk_samples, chunk_s=self.chunk_s, jitter_s=jitter_s,
                           drop=drop, seed=self.seed if seed is None else seed, frames=frames,
                           jitter_buffer_s=self.jitter_buffer_s)
    clock = LiveClock(self.chunk_s, speed) if live else OfflineClock(self.chunk_s)
    session = Session(self, clock, out_dir=out_dir, num_samples=source.num_samples, seed=seed,
                      text_at=text_at_s)
    # The vocoder's small float64 matmuls slow down ~50x when BLAS threads fight the XLA
    # threads (and other jobs) for cores; one BLAS thread is fastest at these sizes.
    try:
      with _blas_threads(1):
        self._loop(session, source, clock, sorted(delegate_at_s))
    finally:
      res = session.close()
    res.update(live=live, num_samples=source.num_samples)
    if out_dir:
      res["files"] = outputs.write_all(out_dir, res, self.chunk_s)
    return res

  def run_file(self, input_path: str, out_dir: str, **kw) -> dict:
    """`run_wav` on a wav or a sample folder; a folder's typed text (annotations.json
    `typed_text` events) goes into TEXT_IN unless `text_at_s` is given."""
    if "text_at_s" not in kw and os.path.isdir(input_path):
      kw["text_at_s"] = sample_typed_text(input_path)
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

  def _loop(self, session: Session, source, clock, delegate_at: list):
    """A recorded conversation, chunk by chunk: wait for the clock and the input, step."""
    clock.start()
    for t in range(source.num_chunks):
      clock.wait_for_chunk(t)
      lag_ms = max(0.0, clock.now_s() - (t + 1) * self.chunk_s) * 1e3 if clock.live else 0.0
      audio, waited_s = source.get(t, clock)
      if source.video_ends_at(t):
        session.events.append(dict(kind="video_ended", time_s=round(t * self.chunk_s, 3),
                                   chunk=t))
      forced = bool(delegate_at) and delegate_at[0] <= t * self.chunk_s + 1e-9
      if forced:
        delegate_at.pop(0)
      session.step(audio, frame=source.frame(t), lag_ms=lag_ms, waited_s=waited_s,
                   delegate=forced)


def _blas_threads(n: int):
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # optional dependency: without it the vocoder is slower, not wrong
    import contextlib
    return contextlib.nullcontext()
  return threadpool_limits(limits=n, user_api="blas")


def calibrated_threshold(workdir: str, kind: str = "speak") -> float:
  """A threshold the trainer calibrated on validation: W/speak_threshold.json (the speak
  gate's; 0.5 when the run has none: no gate, or no final report yet) or
  W/delegate_threshold.json (DELEGATE's; 1.0, plain decoding, when the run has none)."""
  if kind not in ("speak", "delegate"):
    raise ValueError(f"kind={kind!r}: 'speak' or 'delegate'")
  path = paths.join(workdir, f"{kind}_threshold.json")
  if not paths.exists(path):
    return 0.5 if kind == "speak" else 1.0
  return float(paths.read_json(path)["threshold"])


def load_config(workdir: str | None, config=None):
  """W/config.json (written by the trainer) wins; else `config`; else the tiny default."""
  import ml_collections as mlc
  path = paths.join(workdir, "config.json") if workdir else None
  if path and paths.exists(path):
    return mlc.ConfigDict(paths.read_json(path))
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
