"""Streaming engine: incremental == full forward, constant memory, the background worker never
blocks a micro-turn, failures are reported, live mode keeps the output aligned, bad audio fails.

Fast on 2 CPU cores: two tiny models, each compiled once per module.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.interaction import get_config
from tml_jax.audio import io
from tml_jax.batch import random_batch
from tml_jax.microturn import TokenMeta
from tml_jax.model.background import pool_history
from tml_jax.model.transformer import InteractionModel, ModelConfig
from tml_jax.serve import Engine, StreamingModel, load_input, serving_config
from tml_jax.text import tokenizer as tok


@pytest.fixture(scope="module")
def ring_model():
  """A model whose window (3 chunks) is much shorter than the test sequences, with a prefix."""
  c = serving_config(get_config("tiny,smoke"))
  c.layout.update(dict(window=3, prefix_slots=2))
  c.background.enabled = False
  model = InteractionModel(ModelConfig.from_config(c), rngs=nnx.Rngs(7))
  # Zero-initialised inputs of the gate and of the speaking flag: random, so the
  # step-vs-forward checks see them.
  for name in ("speaking", "speak_w", "speak_wa"):
    v = getattr(model, name)
    v[...] = jax.random.normal(jax.random.key(len(name)), v.shape, v.dtype) * 0.5
  return model, StreamingModel(model, flow_steps=2)


@pytest.fixture(scope="module")
def workdir(random_workdir):
  return random_workdir


@pytest.fixture(scope="module")
def engine(workdir):
  # The workdir's config.json wins over the argument (here a deliberately different variant).
  return Engine.from_workdir(workdir, "configs/interaction.py:small")


def _obs(b, t):
  return dict(user_dmel=b["user_dmel"][:, t:t + 1], self_dmel=b["self_dmel"][:, t:t + 1],
              self_speaking=b["self_speaking"][:, t:t + 1],
              video=b["video"][:, t:t + 1], video_valid=np.bool_(True),
              text_in=b["text_in"][:, t:t + 1], prefix=b["prefix"])


def test_incremental_matches_full_forward(ring_model, rng):
  """Teacher-forced engine steps reproduce InteractionModel(batch): text logits, the
  MODEL_AUDIO hidden states and the background model's pooled history vectors, on a sequence of 8 chunks through a 3-chunk ring (it wraps)."""
  model, sm = ring_model
  lay, C = model.cfg.layout, 8
  b = random_batch(lay, batch=1, num_chunks=C, seed=int(rng.integers(1 << 30)))
  b["model_text_in"][0, :, 1:] = rng.integers(0, tok.VOCAB_SIZE, (C, lay.model_text - 1))
  full = jax.jit(lambda batch: model(batch))(b)
  pooled, _ = pool_history(full.hidden, TokenMeta(*(jnp.asarray(f) for f in b["meta"])), C)
  sm.reset()
  for t in range(C):
    out = sm.step(_obs(b, t), forced_T=b["model_text_in"][0, t])
    np.testing.assert_allclose(out["logits"], full.text_logits[0, t], atol=2e-4, rtol=1e-4,
                               err_msg=f"text logits of chunk {t}")
    np.testing.assert_allclose(out["audio_cond"], full.audio_cond[0, t], atol=2e-4, rtol=1e-4,
                               err_msg=f"audio conditioning of chunk {t}")
    np.testing.assert_allclose(out["p_speak"], jax.nn.sigmoid(full.speak_logits[0, t]),
                               atol=2e-5, err_msg=f"speak gate of chunk {t}")
    np.testing.assert_allclose(out["pooled"], pooled[0, t], atol=2e-4, rtol=1e-4,
                               err_msg=f"background history vector of chunk {t}")
  # The check can fail: a wrong window (stale ring entries visible) breaks it.
  assert C > model.cfg.window + 2


def test_history_ring_keeps_the_last_chunks_at_fixed_memory(ring_model, rng):
  """The engine's pooled history is a ring of `history_chunks` vectors: after more chunks
  than that it holds exactly the latest ones (the vectors the steps returned), and its size
  never changes."""
  model, sm = ring_model
  H, C = 4, 7
  sm.history_chunks = H
  try:
    sm.reset()
    size = sm.history_nbytes()
    b = random_batch(model.cfg.layout, batch=1, num_chunks=C, seed=int(rng.integers(1 << 30)))
    outs = [np.asarray(sm.step(_obs(b, t))["pooled"]) for t in range(C)]
    _, _, hist, hist_chunk = sm.context()
    order = np.argsort(np.asarray(hist_chunk[0]))
    assert np.asarray(hist_chunk[0])[order].tolist() == list(range(C - H, C))
    np.testing.assert_array_equal(np.asarray(hist[0])[order], np.stack(outs[C - H:]))
    assert sm.history_nbytes() == size == H * (model.cfg.d_model * 4 + 4)
  finally:
    sm.history_chunks = 0
    sm.reset()


def test_scan_layers_is_the_same_model(ring_model, rng):
  """model.scan_layers runs the blocks as one lax.scan over stacked parameters (the
  paper-scale config compiles that way); the forward pass and the cached micro-turns equal
  the unrolled model's, with the same parameters."""
  import dataclasses
  model, sm = ring_model
  scanned = InteractionModel(dataclasses.replace(model.cfg, scan_layers=True), rngs=nnx.Rngs(7))
  nnx.update(scanned, nnx.state(model))
  ssm = StreamingModel(scanned, flow_steps=2)
  lay, C = model.cfg.layout, 6
  b = random_batch(lay, batch=1, num_chunks=C, seed=int(rng.integers(1 << 30)))
  want, got = jax.jit(lambda x: model(x))(b), jax.jit(lambda x: scanned(x))(b)
  np.testing.assert_allclose(got.text_logits, want.text_logits, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(got.audio_cond, want.audio_cond, atol=2e-4, rtol=1e-4)
  sm.reset()
  for t in range(C):
    key = jax.random.key(t)
    a, o = sm.step(_obs(b, t), rng=key), ssm.step(_obs(b, t), rng=key)
    np.testing.assert_array_equal(o["tokens"], a["tokens"], err_msg=f"chunk {t}")
    np.testing.assert_allclose(o["logits"], a["logits"], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(o["mel"], a["mel"], atol=2e-3, rtol=1e-3)


def test_pallas_backend_serves_through_the_decode_kernel(ring_model, rng):
  """attention_backend='pallas' serves through microturn_attention_decode (interpreted on
  CPU) and gives the reference model's logits: the same parameters, another attention."""
  model, _ = ring_model
  c = serving_config(get_config("tiny,smoke"))
  c.layout.update(dict(window=3, prefix_slots=2))
  c.background.enabled = False
  c.model.attention_backend = "pallas"
  pallas_model = InteractionModel(ModelConfig.from_config(c), rngs=nnx.Rngs(7))
  nnx.update(pallas_model, nnx.state(model))
  called = []
  import kernels_pallas.microturn_attention as kernel
  real = kernel.microturn_attention_decode

  def spy(*args, **kw):
    called.append(1)
    return real(*args, **kw)

  kernel.microturn_attention_decode = spy
  try:
    sm = StreamingModel(pallas_model, flow_steps=1)
    lay, C = model.cfg.layout, 4
    b = random_batch(lay, batch=1, num_chunks=C, seed=int(rng.integers(1 << 30)))
    full = jax.jit(lambda batch: model(batch))(b)
    for t in range(C):
      out = sm.step(_obs(b, t), forced_T=b["model_text_in"][0, t])
      np.testing.assert_allclose(out["logits"], full.text_logits[0, t], atol=5e-4, rtol=1e-3,
                                 err_msg=f"text logits of chunk {t}")
  finally:
    kernel.microturn_attention_decode = real
  assert called, "the cached step did not reach the decode kernel"


def test_speak_gate_silences_the_micro_turn(ring_model, rng):
  """A closed gate makes the chunk silent (EOT then PAD, the silence floor as mel) without
  changing what the model computes; an open one leaves the decode alone."""
  from tml_jax.audio.constants import LOG_MIN
  model, _ = ring_model
  assert model.cfg.speak_gate
  b = random_batch(model.cfg.layout, batch=1, num_chunks=3, seed=int(rng.integers(1 << 30)))
  bias = model.speak_b[...]
  outs = {}
  try:
    for name, value in (("closed", -40.0), ("open", 40.0)):
      model.speak_b[...] = jnp.full_like(bias, value)
      sm = StreamingModel(model, flow_steps=1)
      outs[name] = [sm.step(_obs(b, t), forced_T=b["model_text_in"][0, t]) for t in range(3)]
  finally:
    model.speak_b[...] = bias
  for closed, opened in zip(outs["closed"], outs["open"]):
    assert float(closed["p_speak"]) < 1e-3 and float(opened["p_speak"]) > 1 - 1e-3
    toks = np.asarray(closed["tokens"])
    assert toks[0] == tok.EOT and np.all(toks[1:] == tok.PAD)
    np.testing.assert_array_equal(np.asarray(closed["mel"]), LOG_MIN)
    assert np.asarray(opened["mel"]).max() > LOG_MIN + 1.0
    np.testing.assert_allclose(closed["logits"], opened["logits"], atol=1e-5)


def test_free_running_decode_feeds_its_own_tokens(ring_model, rng):
  """Without forcing, slot j reads the token predicted at j-1 (PAD after EOT): forcing those
  same tokens gives identical logits."""
  model, sm = ring_model
  b = random_batch(model.cfg.layout, batch=1, num_chunks=2, seed=int(rng.integers(1 << 30)))
  sm.reset()
  free = sm.step(_obs(b, 0))
  toks = np.asarray(free["tokens"])
  sm.reset()
  forced = sm.step(_obs(b, 0), forced_T=np.concatenate([[tok.BOS], toks[:-1]]))
  np.testing.assert_allclose(free["logits"], forced["logits"], atol=1e-5)


def test_ring_cache_memory_constant(ring_model, rng):
  model, sm = ring_model
  b = random_batch(model.cfg.layout, batch=1, num_chunks=1, seed=int(rng.integers(1 << 30)))
  sm.reset()
  shapes0 = [(x.shape, x.dtype) for x in jax.tree.leaves(sm.cache)]
  bytes0 = sm.cache_nbytes()
  for _ in range(5 * model.cfg.window + 1):
    sm.step(_obs(b, 0))
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(sm.cache)] == shapes0
  assert sm.cache_nbytes() == bytes0
  # Only the live window (and the prefix) is visible: everything else was overwritten.
  chunks = np.asarray(sm.cache.meta.chunk)[0, model.cfg.layout.prefix:]
  assert sorted(set(chunks.tolist())) == list(range(sm.t - model.cfg.window, sm.t))


def _speech(rng, seconds):
  n = int(16000 * seconds) + int(rng.integers(1, 3000))  # not a whole number of chunks
  t = np.arange(n) / 16000
  return (0.3 * np.sin(2 * np.pi * 220 * t) * (rng.random(n) > 0.3)).astype(np.float32)


def test_offline_outputs_aligned(engine, rng, tmp_path):
  wav = _speech(rng, 2.0)
  res = engine.run_wav(wav, str(tmp_path))
  out, rate = io.load_wav(tmp_path / "output.wav")
  assert rate == 16000 and out.shape == wav.shape
  assert np.all(out[:3200] == 0)  # nothing is played before the first chunk's output
  transcript = json.load(open(tmp_path / "monologue.json"))
  assert set(transcript) == {"text", "chunks"}
  for w in transcript["chunks"]:
    assert w["timestamp"][0] >= 0.2 and w["timestamp"][1] > w["timestamp"][0]
  lat = json.load(open(tmp_path / "latency.json"))
  assert {"p50_ms", "p90_ms", "p99_ms", "real_time_factor"} <= set(lat)
  assert os.path.getsize(tmp_path / "timeline.png") > 1000
  assert res["num_chunks"] == -(-wav.size // 3200)
  # Warm-up compiled everything: no micro-turn, the first included, pays for a compile
  # (a restored checkpoint's mesh shardings once caused one at chunk 1: ~8 s).
  assert max(r.compute_ms for r in res["records"]) < 1500, [r.compute_ms for r in res["records"]]


def test_delegate_threshold_rule(ring_model, rng):
  """Free-running decode with a DELEGATE threshold: each slot emits DELEGATE when its
  P(DELEGATE) reaches the threshold and none was emitted yet in the chunk, else its argmax;
  a closed gate makes slot 0 EOT, DELEGATE or not; after EOT the slots are PAD. Checked slot by slot against the
  step's own logits, with the gate open and closed."""
  model, sm = ring_model
  lay, C = model.cfg.layout, 6
  b = random_batch(lay, batch=1, num_chunks=C, seed=int(rng.integers(1 << 30)))
  p_del = lambda lg: np.asarray(jax.nn.softmax(jnp.asarray(lg, jnp.float32)))[..., tok.DELEGATE]
  emitted = {}
  try:
    for gate_open in (True, False):
      gate = 0.0 if gate_open else 2.0
      sm.reset()  # P(DELEGATE) of the slots decoded without the rule: the threshold's scale
      first = [p_del(sm.step(_obs(b, t), speak_threshold=gate)["logits"]) for t in range(C)]
      sm.reset()
      # closed: only slot 0 is decoded before EOT, so the threshold is drawn from those
      sm.delegate_threshold = thr = float(np.quantile(
          np.concatenate(first) if gate_open else [f[0] for f in first], 0.5))
      emitted[gate_open] = 0
      for t in range(C):
        out = sm.step(_obs(b, t), speak_threshold=gate)
        tokens, logits = np.asarray(out["tokens"]), np.asarray(out["logits"])
        done = delegated = False
        for j in range(lay.model_text):
          if done:
            assert tokens[j] == tok.PAD
            continue
          pd = p_del(logits[j])
          if abs(pd - thr) < 1e-6 * thr:
            break  # too close to call in float32
          want = tok.DELEGATE if pd >= thr and not delegated else int(np.argmax(logits[j]))
          if j == 0 and not gate_open:
            want = tok.EOT
          assert tokens[j] == want, (gate_open, t, j, pd, thr)
          done, delegated = want == tok.EOT, delegated or want == tok.DELEGATE
        emitted[gate_open] += int((tokens == tok.DELEGATE).sum())
        assert (tokens == tok.DELEGATE).sum() <= 1
  finally:
    sm.delegate_threshold = 1.0
  # the rule did something on these inputs, and a closed gate silences DELEGATE too
  assert emitted[True] > 0 and emitted[False] == 0, emitted


def test_speak_gate_hysteresis(engine, rng, tmp_path):
  """Speech starts when P(speak) reaches the start threshold and, once on, goes on while it
  stays above the lower keep threshold: every chunk's voice follows that rule exactly."""
  wav = _speech(rng, 6.0)
  state = engine.stream.state
  w0 = state["speak_w"].get_value()  # untrained, the gate says the same everywhere
  held = 0

  def run(hi, lo, out_dir=None):
    old = _with(engine, speak_threshold=hi, keep_threshold=lo)
    try:
      return engine.run_wav(wav, out_dir)
    finally:
      _with(engine, **old)

  try:
    # Random gates until one shows the hysteresis: speaking changes P (the speaking flag,
    # the model's own voice), and a gate whose P while speaking never dips below what
    # started it cannot show a chunk held on by the lower threshold.
    for _ in range(6):
      state["speak_w"].set_value(jnp.asarray(rng.normal(0, 0.3, w0.shape), w0.dtype))
      # P as a silent model (never starts) and as a speaking one (starts at once, never
      # stops): thresholds are drawn between them.
      ps = np.array([r.p_speak for hi, lo in ((2.0, 2.0), (0.0, 0.0))
                     for r in run(hi, lo)["records"]])
      for q_lo, q_hi in [(0.3, 0.7), (0.1, 0.5), (0.5, 0.9)] + [
          tuple(sorted(rng.uniform(0.0, 1.0, 2))) for _ in range(3)]:
        lo, hi = (float(x) for x in np.quantile(ps, [q_lo, q_hi]))
        res = run(hi, lo, str(tmp_path))
        out, _ = io.load_wav(tmp_path / "output.wav")
        speaking = False
        for r in res["records"][:-1]:  # chunk t's audio is played during chunk t+1
          speaking = r.p_speak >= (lo if speaking else hi)
          held += speaking and r.p_speak < hi
          loudest = np.abs(out[(r.t + 1) * 3200:(r.t + 2) * 3200]).max(initial=0.0)
          if speaking:  # the flow head's mel, whatever the text says
            assert loudest > 1e-3, (r.t, r.p_speak, lo, hi)
          else:
            assert r.tokens[0] == tok.EOT and set(r.tokens[1:]) <= {tok.PAD}, (r.t, r.p_speak)
            assert loudest < 1e-3, (r.t, r.p_speak, lo, hi)
      if held:
        break
  finally:
    state["speak_w"].set_value(w0)
  assert held, "no chunk was kept on below the start threshold: the test saw no hysteresis"


def _stub_generate(call: str, answer: str):
  """A scripted background model: writes `call` as its tool call, then `answer`."""
  enc = tok.ByteTokenizer().encode

  def generate(context, prompt, stops, chunk):
    del context, stops, chunk
    if tok.RESULT not in prompt:
      return [tok.TOOL] + enc(call) + [tok.SEP]
    return enc(answer) + [tok.EOT]
  return generate


def _with(engine, **attrs):
  old = {k: getattr(engine, k) for k in attrs}
  for k, v in attrs.items():
    setattr(engine, k, v)
  return old


def test_slow_tool_never_delays_a_micro_turn(engine, rng, tmp_path):
  sleep_s = 2.0

  def slow_calculator(args, ctx):
    time.sleep(sleep_s)
    return f"{args} = 2"

  old = _with(engine, generate=_stub_generate("calculator:1 + 1", "1 + 1 = 2"),
              tools={"calculator": slow_calculator})
  try:
    res = engine.run_wav(_speech(rng, 3.4), str(tmp_path), delegate_at_s=[0.2])
  finally:
    _with(engine, **old)
  ms = np.array([r.compute_ms for r in res["records"]])
  # Chunks while the tool sleeps: a blocking engine would spend >= 2000 ms in one of them.
  assert ms[2:].max() < 1000, ms
  result = [e for e in res["events"] if e["kind"] == "background_result"]
  assert len(result) == 1 and result[0]["text"] == "1 + 1 = 2"
  # Delegated at the end of chunk 1 (0.4 s): the answer enters after the tool's 2 s.
  assert result[0]["time_s"] >= 0.4 + sleep_s
  assert any(e["kind"] == "tool_result" for e in res["events"])


def test_crashing_worker_and_failing_tool_are_reported(engine, rng, tmp_path):
  def crash(*_):
    raise RuntimeError("boom")

  old = _with(engine, generate=crash)
  try:
    res = engine.run_wav(_speech(rng, 1.2), str(tmp_path), delegate_at_s=[0.0])
  finally:
    _with(engine, **old)
  assert len(res["records"]) == res["num_chunks"]
  assert any(e["kind"] == "error" and "boom" in e["error"] for e in res["events"])
  assert any(e["kind"] == "background_result" and e["text"] == "background model unavailable"
             for e in res["events"])

  def broken(args, ctx):
    raise ValueError("no network")

  old = _with(engine, generate=_stub_generate("knowledge:capital of Peru", "Lima"),
              tools={"knowledge": broken})
  try:
    res = engine.run_wav(_speech(rng, 1.2), str(tmp_path), delegate_at_s=[0.0])
  finally:
    _with(engine, **old)
  got = [e for e in res["events"] if e["kind"] == "background_result"]
  assert got and got[0]["text"].startswith("the tool failed")
  assert any(e["kind"] == "tool_error" for e in res["events"])


def test_reminder_fires_at_conversation_time(engine, rng, tmp_path):
  old = _with(engine, generate=_stub_generate("remind:1 s; stretch", "ok"))
  try:
    res = engine.run_wav(_speech(rng, 2.4), str(tmp_path), delegate_at_s=[0.0])
  finally:
    _with(engine, **old)
  fired = [e for e in res["events"] if e["kind"] == "reminder"]
  assert len(fired) == 1 and fired[0]["text"] == "stretch"
  # Set at ~0.2 s (end of chunk 0) for 1 s: due ~1.2 s, delivered at the next chunk start.
  assert 1.2 <= fired[0]["due_s"] < 1.4 and fired[0]["due_s"] <= fired[0]["time_s"] < \
      fired[0]["due_s"] + 0.2 + 1e-6


def test_live_mode_jitter_and_drops_keep_alignment(engine, rng, tmp_path):
  wav = _speech(rng, 1.6)
  t0 = time.perf_counter()
  res = engine.run_wav(wav, str(tmp_path), live=True, speed=4.0, jitter_s=0.15, drop=0.25,
                       seed=int(rng.integers(1 << 30)))
  wall = time.perf_counter() - t0
  out, _ = io.load_wav(tmp_path / "output.wav")
  assert out.shape == wav.shape
  assert len(res["records"]) == res["num_chunks"]
  assert any(e["kind"] == "input_missing" for e in res["events"])
  # Paced by the (4x) clock: at least the conversation's duration / 4.
  assert wall >= wav.size / 16000 / 4 * 0.9


def test_bad_audio_rejected(engine, tmp_path):
  wav = np.zeros(16000, np.float32)
  wav[100] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    engine.run_wav(wav, str(tmp_path))
  path = tmp_path / "odd_rate.wav"
  io.save_wav(path, np.zeros(4000, np.float32), sample_rate=44101)
  with pytest.raises(ValueError, match="resample"):
    load_input(str(path))
  with pytest.raises(FileNotFoundError, match="input.wav"):
    load_input(str(tmp_path))


def test_run_reuses_engine_on_an_fdb_folder(engine, workdir, rng, tmp_path):
  from tml_jax.interact import run
  assert engine.step == 4 and engine.config.model.d_model == 64
  sample = tmp_path / "sample"
  sample.mkdir()
  wav = _speech(rng, 1.0)
  io.save_wav(sample / "input.wav", wav)
  np.save(sample / "video.npy", rng.integers(0, 255, (3, 120, 120, 3), dtype=np.uint8))
  out = run(workdir, str(sample), str(tmp_path / "out"), engine=engine)
  assert out["num_chunks"] == -(-wav.size // 3200)
  assert io.load_wav(out["files"]["wav"])[0].shape == wav.shape


def test_model_emitted_delegate_triggers_the_worker(engine, rng, tmp_path):
  """The trigger is the DELEGATE token in the decoded text (here injected into chunk 2's
  output); the job gets the context of that chunk."""
  real_step = engine.stream.step
  calls = []

  def step(obs, **kw):
    out = dict(real_step(obs, **kw))
    calls.append(1)
    if len(calls) == 3:
      out["tokens"] = np.asarray(out["tokens"]).copy()
      out["tokens"][0] = tok.DELEGATE
    return out

  old = _with(engine, generate=_stub_generate("calculator:2 * 3", "2 * 3 = 6"))
  engine.stream.step = step
  try:
    res = engine.run_wav(_speech(rng, 1.6), str(tmp_path))
  finally:
    engine.stream.step = real_step
    _with(engine, **old)
  deleg = [e for e in res["events"] if e["kind"] == "delegation"]
  assert len(deleg) == 1 and deleg[0]["chunk"] == 2 and not deleg[0]["forced"]
  assert [e["text"] for e in res["events"] if e["kind"] == "background_result"] == ["2 * 3 = 6"]


def test_capacity_moe_is_refused_for_streaming():
  c = get_config("tiny,smoke")
  c.model.moe_impl = "capacity"
  model = InteractionModel(ModelConfig.from_config(c), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dropless"):
    StreamingModel(model, flow_steps=1)


def test_a_sample_folders_typed_text_is_fed_as_text_in(tmp_path, rng):
  """run_file on a sample folder types its annotations' typed_text events into TEXT_IN (a
  typed delegation's question), nothing else of them; an explicit text_at_s wins."""
  from types import SimpleNamespace
  t = [round(float(x), 3) for x in np.sort(rng.uniform(0.0, 5.0, 2))]
  events = [dict(kind="typed_text", start_s=t[0], end_s=t[0], data=dict(text="what is 3 + 4")),
            dict(kind="delegation", start_s=t[1], end_s=t[1] + 1,
                 data=dict(result_text="3 + 4 = 7")),
            dict(kind="typed_text", start_s=t[1], end_s=t[1], data=dict(text="and 5 + 6?"))]
  (tmp_path / "annotations.json").write_text(json.dumps(dict(events=events)))
  io.save_wav(str(tmp_path / "input.wav"), np.zeros(3200, np.float32))
  seen = []
  fake = SimpleNamespace(run_wav=lambda wav, out, frames=None, **kw: seen.append(kw) or {})
  Engine.run_file(fake, str(tmp_path), str(tmp_path / "out"))
  assert seen[-1]["text_at_s"] == [(t[0], "what is 3 + 4"), (t[1], "and 5 + 6?")]
  Engine.run_file(fake, str(tmp_path), str(tmp_path / "out"), text_at_s=[(0.0, "hi")])
  assert seen[-1]["text_at_s"] == [(0.0, "hi")]
  Engine.run_file(fake, str(tmp_path / "input.wav"), str(tmp_path / "out"))
  assert "text_at_s" not in seen[-1]  # a bare wav has no annotations
