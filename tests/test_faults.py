"""Nothing lost under faults: bounded delegation and TEXT_IN queues, a worker that closes,
revoked tools, a jitter buffer, clear input errors, reported vocoder faults, flat memory over
a long session and exact RoPE positions however long it runs."""

import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.interaction import get_config
from tml_jax.audio import io
from tml_jax.microturn import TextFifo
from tml_jax.model.layers import rope
from tml_jax.serve import Engine, StreamingModel, check_frames
from tml_jax.serve.worker import BackgroundWorker
from tml_jax.text import tokenizer as tok
from tml_jax.tools import ToolBox, ToolContext, ToolError


@pytest.fixture(scope="module")
def engine():
  c = get_config("tiny,smoke")
  c.background.update(dict(max_pending=2))
  c.serve.update(dict(text_in_capacity=24, jitter_buffer_ms=100))
  return Engine.from_config(c, seed=5)


def _speech(rng, seconds):
  n = int(16000 * seconds) + int(rng.integers(1, 3000))
  t = np.arange(n) / 16000
  return (0.3 * np.sin(2 * np.pi * 200 * t) * (rng.random(n) > 0.3)).astype(np.float32)


class _Context:
  """Stands for the device copy of the context a delegation holds; counted while alive."""
  alive: weakref.WeakSet = weakref.WeakSet()

  def __init__(self):
    _Context.alive.add(self)


def test_delegate_every_chunk_keeps_queue_and_memory_bounded(engine, rng, tmp_path):
  """A model that emits DELEGATE in every chunk, a slow background model: at most
  max_pending jobs (and contexts) exist at any time; the rest is coalesced or dropped, and
  every delegation is accounted for in the events."""
  sm, real_step, real_ctx, real_gen = engine.stream, engine.stream.step, engine.stream.context, \
      engine.generate
  peak = {"contexts": 0, "pending": 0}

  def step(obs, **kw):
    out = dict(real_step(obs, **kw))
    out["tokens"] = np.asarray(out["tokens"]).copy()
    out["tokens"][0] = tok.DELEGATE
    peak["contexts"] = max(peak["contexts"], len(_Context.alive))
    return out

  def generate(context, prompt, stops, chunk):
    time.sleep(0.5)  # 2.5 micro-turns: delegations pile up
    return tok.ByteTokenizer().encode("ok") + [tok.EOT]

  sm.step, sm.context, engine.generate = step, _Context, generate
  try:
    res = engine.run_wav(_speech(rng, 4.0), str(tmp_path))
  finally:
    sm.step, sm.context, engine.generate = real_step, real_ctx, real_gen
  kinds = [e["kind"] for e in res["events"]]
  n = res["num_chunks"]
  assert kinds.count("delegation") + kinds.count("delegation_coalesced") + \
      kinds.count("delegation_dropped") == n
  assert kinds.count("delegation_coalesced") > 0 and kinds.count("delegation") < n // 2
  assert all(e["outstanding"] <= 2 for e in res["events"] if e["kind"] == "delegation_dropped")
  assert peak["contexts"] <= 2, peak
  end = res["events"][-1]
  assert end["kind"] == "end" and not end["abandoned_background_job"]
  assert len(_Context.alive) == 0  # nothing of the conversation is held after it


def test_text_in_is_bounded_and_overflow_reported(engine, rng, tmp_path):
  fifo = TextFifo(4, capacity=10)
  assert fifo.push(range(6)) == 0 and fifo.push(range(100, 108)) == 4
  assert fifo.queue == [4, 5] + list(range(100, 108)) and fifo.dropped == 4  # oldest first
  long = "x" * 60
  res = engine.run_wav(_speech(rng, 1.0), str(tmp_path), text_at_s=[(0.0, long), (0.2, long)])
  over = [e for e in res["events"] if e["kind"] == "text_in_overflow"]
  assert over and all(e["capacity"] == 24 for e in over)
  assert res["events"][-1]["text_in_dropped_tokens"] == sum(e["dropped_tokens"] for e in over)


def test_worker_close_cancels_queued_jobs_and_joins():
  release, ran = threading.Event(), []

  def generate(context, prompt, stops, chunk):
    ran.append(chunk)
    release.wait(5)
    return [tok.EOT]

  w = BackgroundWorker(generate, ToolBox(), max_pending=3)
  first, how = w.submit(0, 0.2, "ctx0")
  while not ran:
    time.sleep(0.01)
  second, how2 = w.submit(1, 0.4, "ctx1")
  third, how3 = w.submit(2, 0.6, "ctx2")
  assert (how, how2, how3) == ("submitted", "submitted", "coalesced") and third is second
  assert second.context == "ctx2" and second.chunk == 2  # the newer request wins
  threading.Timer(0.2, release.set).start()
  closed = w.close(timeout_s=5)
  assert closed == {"cancelled": 1, "abandoned": False}
  assert not w._thread.is_alive() and ran == [0]  # the queued job never ran
  assert first.done.is_set() and first.context is None  # a finished job lets go
  with pytest.raises(RuntimeError, match="closed"):
    w.submit(3, 0.8, "ctx3")


def test_timed_out_tool_cannot_write_reminders_or_files_afterwards(tmp_path):
  go, finished = threading.Event(), threading.Event()
  outcomes = []

  def slow(args, ctx):
    go.wait(5)
    for effect in (lambda: ctx.reminders.add(1.0, "late", 0.0),
                   lambda: ctx.write_file("charts/late.png", b"png")):
      try:
        effect()
        outcomes.append("written")
      except ToolError:
        outcomes.append("refused")
    finished.set()
    return "done"

  ctx = ToolContext(out_dir=str(tmp_path))
  box = ToolBox({"slow": slow}, ctx, timeout_s=0.1)
  with pytest.raises(ToolError, match="timed out"):
    box.call("slow", "")
  go.set()
  assert finished.wait(5)
  assert outcomes == ["refused", "refused"]
  assert not ctx.reminders.pending() and not (tmp_path / "charts").exists()
  # A call within its time still has its effects.
  box = ToolBox(ctx=ctx)
  assert "chart saved" in box.call("chart", "t; 1, 2")
  assert list((tmp_path / "charts").iterdir())


def test_jittered_live_input_within_the_deadline_loses_no_chunk(engine, rng, tmp_path):
  wav = _speech(rng, 1.6)
  res = engine.run_wav(wav, str(tmp_path), live=True, speed=2.0, jitter_s=0.08,
                       seed=int(rng.integers(1 << 30)))
  assert not any(e["kind"] == "input_missing" for e in res["events"])
  assert not any(r.user_missing for r in res["records"])
  lat = res["latency"]
  assert lat["jitter_buffer"]["missing_chunks"] == 0
  assert "no micro-turn is skipped" in lat["catch_up"]["policy"]
  assert {"late_chunks", "max_lag_ms", "episodes"} <= set(lat["catch_up"])
  # Later than the buffer: silence, reported with the buffer it missed.
  res = engine.run_wav(wav, str(tmp_path), live=True, speed=2.0, jitter_s=0.6,
                       seed=int(rng.integers(1 << 30)))
  missing = [e for e in res["events"] if e["kind"] == "input_missing"]
  assert missing and all(e["jitter_buffer_ms"] == 100.0 for e in missing)


def test_bad_input_gets_a_clear_error(engine, rng):
  wav = _speech(rng, 1.0)
  with pytest.raises(ValueError, match="integer scale"):
    engine.run_wav(wav * 32767.0)
  C = -(-wav.size // 3200)
  with pytest.raises(ValueError, match="uint8"):
    engine.run_wav(wav, frames=rng.random((C, 64, 64, 3)).astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    engine.run_wav(wav, frames=np.zeros((C, 64, 64), np.uint8))
  with pytest.raises(ValueError, match=f"{C + 25} video frames for {C} chunks"):
    check_frames(np.zeros((C + 25, 8, 8, 3), np.uint8), C)
  io.check_wav(wav * 1.5, 16000)  # a little over full scale is still audio


def test_video_stays_at_5_fps_for_any_micro_turn(rng):
  """Frames come one per 200 ms; a 100 or 400 ms model sees each at its real time."""
  from tml_jax.serve.inputs import RecordedInput
  frames = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  wav = np.zeros(16000, np.float32)  # 1 s: five 200 ms frames at most
  for chunk_ms, want in ((100, [0, 0, 1, 1, 2, 2, None, None]), (200, [0, 1, 2, None, None]),
                         (400, [0, 2, None])):
    S = chunk_ms * 16
    src = RecordedInput(wav, S, chunk_s=chunk_ms / 1000, frames=frames)
    got = [src.frame(t) for t in range(len(want))]
    for g, w in zip(got, want):
      assert (g is None) if w is None else np.array_equal(g, frames[w]), (chunk_ms, want)
    ends = [t for t in range(src.num_chunks) if src.video_ends_at(t)]
    assert ends == [want.index(None)], (chunk_ms, ends)
  with pytest.raises(ValueError, match="6 video frames for 5 chunks"):
    RecordedInput(wav, 1600, chunk_s=0.1, frames=np.zeros((6, 8, 8, 3), np.uint8))


def test_non_finite_vocoder_output_is_reported(engine, rng, tmp_path, monkeypatch):
  from tml_jax.serve import engine as engine_mod
  real, calls = engine_mod.vocoder.vocode, []

  def vocode(mel, **kw):
    calls.append(1)
    out = real(mel, **kw)
    return np.full_like(out, np.nan) if len(calls) == 3 else out

  monkeypatch.setattr(engine_mod.vocoder, "vocode", vocode)
  res = engine.run_wav(_speech(rng, 1.0), str(tmp_path))
  bad = [e for e in res["events"] if e["kind"] == "vocoder_nonfinite"]
  assert [e["chunk"] for e in bad] == [2] and bad[0]["samples"] == 3200
  out, _ = io.load_wav(tmp_path / "output.wav")
  assert np.isfinite(out).all()


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def test_long_session_memory_stays_flat(engine, tmp_path):
  """1500 micro-turns (5 minutes) from a file on disk (read chunk by chunk), output.wav
  streamed to disk: the KV ring wraps every 5 s, the history ring is allocated whole at the
  start. An hour is measured by benchmarks/long_session.py."""
  rng = np.random.default_rng(0)
  n = 16000 * 300
  path = tmp_path / "long.wav"
  io.save_wav(path, (0.05 * rng.standard_normal(n)).astype(np.float32))
  rss, real_step = [], engine.stream.step

  def step(obs, **kw):
    if engine.stream.t % 250 == 0:
      rss.append(_rss_mb())
    return real_step(obs, **kw)

  engine.stream.step = step
  try:
    res = engine.run_file(str(path), str(tmp_path / "out"))
  finally:
    engine.stream.step = real_step
  assert res["num_chunks"] == 1500 and len(rss) == 6
  # After the first 50 s, growth is bookkeeping only (a record per chunk): a few MB.
  assert rss[-1] - rss[1] < 10, rss
  out, _ = io.load_wav(tmp_path / "out" / "output.wav")
  assert out.shape == (n,)


def test_rope_is_exact_at_any_position(rng):
  """q.k depends on the position difference only, as precisely at an hour's worth of
  positions (and past int32's wrap) as at zero."""
  q = jnp.asarray(rng.standard_normal((1, 4, 2, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 4, 2, 32)), jnp.float32)
  base = jnp.asarray(rng.integers(0, 64, (1, 4)), jnp.int32)
  score = lambda s: jnp.einsum("blhd,bmhd->bhlm", rope(q, base + s, 1e4),
                               rope(k, base.T.reshape(1, 4) + s, 1e4))
  ref = score(0)
  for shift in (10**6, 5 * 10**6, 2**31 - 70):
    np.testing.assert_allclose(score(jnp.int32(shift)), ref, atol=2e-4, rtol=1e-4,
                               err_msg=f"shift {shift}")


def test_a_late_start_gives_the_same_micro_turns(engine, rng):
  """The engine's clock after ~an hour (and far beyond) reproduces chunk 0's logits."""
  from tml_jax.batch import random_batch
  model = nnx_model(engine)
  lay = model.cfg.layout
  assert lay.prefix == 0
  b = random_batch(lay, batch=1, num_chunks=3, seed=int(rng.integers(1 << 30)))
  obs = lambda t: dict(user_dmel=b["user_dmel"][:, t:t + 1], self_dmel=b["self_dmel"][:, t:t + 1],
                       self_speaking=b["self_speaking"][:, t:t + 1],
                       video=b["video"][:, t:t + 1], video_valid=np.bool_(True),
                       text_in=b["text_in"][:, t:t + 1])
  outs = {}
  for start in (0, 2_000_000 * model.cfg.window):  # far past an hour (18000 chunks)
    sm = StreamingModel(model, flow_steps=1)
    sm.t = start
    outs[start] = [np.asarray(sm.step(obs(t), forced_T=b["model_text_in"][0, t])["logits"])
                   for t in range(3)]
  for start, logits in outs.items():
    for t in range(3):
      np.testing.assert_allclose(logits[t], outs[0][t], atol=2e-4, rtol=1e-3,
                                 err_msg=f"chunk {t} after starting at {start}")


def nnx_model(engine):
  from flax import nnx
  return nnx.merge(engine.stream.graphdef, engine.stream.state)


def test_engine_warns_and_reports_when_it_falls_back_to_an_older_checkpoint(tmp_path, caplog):
  import logging
  import os

  import orbax.checkpoint as ocp
  from tml_jax.train import sharding as shd
  from tml_jax.train.checkpoint import Checkpointer
  from tml_jax.train.state import Setup
  config = get_config("tiny,smoke")
  w = str(tmp_path)
  with open(os.path.join(w, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))
  setup = Setup(config, shd.make_mesh(config))
  ckpt = Checkpointer(w, keep=3, async_save=False)
  for step in (4, 6):
    ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(setup.init())))
  ckpt.close()
  # A transient read error is retried, not taken for damage.
  from tml_jax.train import checkpoint as ckpt_lib
  real_restore, failures = ocp.CheckpointManager.restore, []

  def flaky(self, *a, **kw):
    if not failures:
      failures.append(1)
      raise OSError(5, "Input/output error (transient)")
    return real_restore(self, *a, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ocp.CheckpointManager, "restore", flaky)
    mp.setattr(ckpt_lib, "RETRY_PAUSES_S", (0.01,))
    eng = Engine.from_workdir(w, warmup=False)
  assert failures and eng.step == 6 and eng.skipped_checkpoints == []
  for root, _, files in os.walk(os.path.join(w, "checkpoints", "6", "state")):
    for name in files:  # the newest is damaged: truncated files
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  with caplog.at_level(logging.WARNING):
    eng = Engine.from_workdir(w, warmup=False)
  assert eng.step == 4 and [k["step"] for k in eng.skipped_checkpoints] == [6]
  assert any("OLDER checkpoint step 4" in r.getMessage() for r in caplog.records)
  from tml_jax.eval import report
  text = report.table({"models": {"model": {"checkpoint_step": 4, "skipped_checkpoints":
                                            eng.skipped_checkpoints}},
                       "systems": {}, "monologue": {}})
  assert "checkpoint step 4 (older" in text
