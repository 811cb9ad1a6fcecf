"""Background model (loss, gradients, targets, decoding loop) and its tools."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.interaction import get_config
from tml_jax.batch import random_batch
from tml_jax.data.background_targets import target_sequence
from tml_jax.data.pipeline import MicroTurnExample
from tml_jax.data.templates import FACTS
from tml_jax.microturn import ChunkLayout
from tml_jax.microturn import context_mask
from tml_jax.model.transformer import InteractionModel, ModelConfig
from tml_jax.serve.worker import BackgroundWorker, Job, solve
from tml_jax.text import tokenizer as tok
from tml_jax.tools import (CalculatorError, Reminders, ToolBox, ToolContext, ToolError,
                           evaluate)
from tml_jax.train.losses import compute_losses

WEIGHTS = dict(text=1.0, audio=1.0, balance=0.01, z=1e-3, background=1.0)


def _bg_batch(lay, rng, B=2, C=4, N=2, T=96):
  b = random_batch(lay, batch=B, num_chunks=C, seed=int(rng.integers(1 << 30)))
  items = [target_sequence("calculator", "What is 3 times 4?", "3 * 4 = 12", T),
           target_sequence("knowledge", "What is the capital of Peru?", "Lima", T)]
  b["bg_chunk"] = np.array([[int(rng.integers(C)), -1], [1, int(rng.integers(C))]], np.int32)
  for k, i in (("bg_in", 0), ("bg_target", 1), ("bg_mask", 2)):
    b[k] = np.stack([np.stack([items[n % 2][i] for n in range(N)])] * B)
  return b


def test_background_loss_finite_and_trains_both_models(rng):
  config = get_config("tiny,smoke")
  # One dense layer and no video: the property is the same, the compile 3x shorter.
  config.model.update(dict(num_layers=1, ffn="dense", dense_hidden=64))
  config.layout.video_slots = 0
  cfg = ModelConfig.from_config(config)
  model = InteractionModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  b = _bg_batch(cfg.layout, rng, T=config.background.max_len)
  graphdef, params = nnx.split(model, nnx.Param)

  def bg_loss(params, batch):
    _, metrics = compute_losses(nnx.merge(graphdef, params), batch, jax.random.key(0), WEIGHTS)
    return metrics["background"], metrics

  grad_fn = jax.jit(jax.value_and_grad(bg_loss, has_aux=True))
  (loss, metrics), grads = grad_fn(params, b)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(metrics["background_tokens"]) == (b["bg_mask"] & (b["bg_chunk"] >= 0)[..., None]
                                                 ).sum()
  norm = lambda tree: float(optax_norm(tree))
  g = nnx.to_pure_dict(grads)
  assert norm(g["background"]) > 0
  # The background loss alone reaches the interaction model (no stop-gradient on its context).
  assert norm(g["blocks"]) > 0 and norm(g["embed"]) > 0
  # No delegation in the batch: the term is exactly zero.
  b["bg_chunk"][:] = -1
  (loss, _), grads = grad_fn(params, b)
  assert float(loss) == 0.0 and norm(nnx.to_pure_dict(grads)["background"]) == 0.0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_context_mask_is_the_delegating_chunks_view():
  lay = ChunkLayout(user_audio=1, self_audio=1, video=0, text_in=1, model_text=1,
                    model_audio=1, prefix=2)
  meta = lay.meta(6)
  m = np.asarray(context_mask(meta, np.array([[4, -1]]), window=2))
  chunk, seg = meta.chunk[0], meta.segment[0]
  expect = (seg == 6) | ((chunk <= 4) & (chunk > 2))
  np.testing.assert_array_equal(m[0, 0], expect)
  assert not m[0, 1].any()


@pytest.mark.parametrize("history", [0, 5])
def test_background_reads_pooled_history_beyond_the_window(rng, history):
  """The background loss depends on the row's hidden states of chunks in the window (and
  the prefix) and, with history_chunks=H, on the observation tokens of chunks
  c-H < k <= c-W through their pooled vectors, and on nothing older."""
  from tml_jax.microturn import Segment, TokenMeta, pooled_tokens
  from tml_jax.train.losses import background_loss
  config = get_config("tiny,smoke")
  config.model.update(dict(num_layers=1, ffn="dense", dense_hidden=64))
  config.layout.update(dict(video_slots=0, window=3, prefix_slots=2))
  config.background.history_chunks = history
  cfg = ModelConfig.from_config(config)
  model = InteractionModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  C, c = 10, 9
  b = _bg_batch(cfg.layout, rng, B=1, C=C, N=2, T=config.background.max_len)
  b["bg_chunk"] = np.array([[c, -1]], np.int32)
  meta = TokenMeta(*(jnp.asarray(f) for f in b["meta"]))
  hidden = model(b).hidden
  grad = jax.grad(lambda h: background_loss(model.background, h, meta, b, cfg.window, C)[0])(
      hidden)
  touched = np.abs(np.asarray(grad[0])).sum(-1) > 0
  chunk, seg = np.asarray(meta.chunk[0]), np.asarray(meta.segment[0])
  prefix = seg == int(Segment.PREFIX)
  window = (chunk <= c) & (c - chunk < cfg.window) & ~prefix
  beyond = np.asarray(pooled_tokens(meta)[0]) & (c - chunk >= cfg.window) & (c - chunk < history)
  np.testing.assert_array_equal(touched, prefix | window | beyond)
  assert beyond.any() == (history > 0)


def test_target_sequence_learns_call_and_answer_not_the_result():
  inp, target, mask = target_sequence("calculator", "What is 3 times 4?", "3 * 4 = 12", 64)
  dec = tok.ByteTokenizer().decode
  assert dec(target, show_special=True).startswith(
      "<tool>calculator:3 * 4<sep><result>3 * 4 = 12<sep>3 * 4 = 12<eot>")
  assert inp[0] == tok.BOS and (inp[1:] == target[:-1]).all()
  r = int(np.flatnonzero(target == tok.RESULT)[0])
  seps = np.flatnonzero(target == tok.SEP)
  assert not mask[r:seps[1] + 1].any() and mask[:r].all() and mask[seps[1] + 1]
  assert target[mask].tolist()[-1] == tok.EOT


def test_pipeline_background_fields_follow_the_delegate_token():
  lay = ChunkLayout(user_audio=8, self_audio=8, video=0, text_in=4, model_text=8,
                    model_audio=4)
  ex = MicroTurnExample(lay, 10, bg_delegations=2, bg_len=64)
  target = np.full((30, 8), tok.PAD, np.int32)
  target[7, 2], target[21, 0] = tok.DELEGATE, tok.DELEGATE
  events = [dict(kind="delegation", start_s=4.4, end_s=6.0,
                 data=dict(tool="knowledge", question="What is the capital of Peru?",
                           result_text="Lima", answer="Lima.")),
            dict(kind="delegation", start_s=1.6, end_s=3.0,
                 data=dict(tool="calculator", question="q", result_text="2 + 2 = 4", answer="4"))]
  items = ex._background(events, target)
  assert [c for c, *_ in items] == [7, 21]
  crop = ex._crop_background(items, start=3, n=10)
  assert crop["bg_chunk"].tolist() == [4, -1]
  assert tok.ByteTokenizer().decode(crop["bg_target"][0]).startswith("calculator:2 + 2")


def test_heard_targets_are_the_users_words_in_the_last_chunks_window(rng):
  """With bg_heard, the first free slot of a row holds the user's words that start inside
  the window of the row's last chunk and end by it, prompted with HEARD (input only);
  delegations keep their slots; a row with no such words, or no free slot, has none."""
  from tml_jax.data.background_targets import heard_sequence
  W, C = 4, 10
  lay = ChunkLayout(user_audio=8, self_audio=8, video=0, text_in=4, model_text=8,
                    model_audio=4, window=W)
  ex = MicroTurnExample(lay, C, bg_delegations=2, bg_len=64, bg_heard=True)
  start = int(rng.integers(0, 20))
  last = start + C - 1
  heard = [(last - W, last - W, "early"), (last - W + 1, last - W + 2, "what"),
           (last - 1, last - 1, "is"), (last, last, "up"), (last, last + 1, "late"),
           (last - 20, last - 19, "old")]
  order = rng.permutation(len(heard))
  crop = ex._crop_background([], start, C, [heard[i] for i in order])
  dec = tok.ByteTokenizer().decode
  i = 0
  assert crop["bg_kind"].tolist() == [1, 0] and crop["bg_chunk"].tolist() == [C - 1, -1]
  words = dec(crop["bg_target"][i][crop["bg_mask"][i]].tolist())
  assert sorted(words.split()) == sorted(["what", "is", "up"]), words
  assert crop["bg_target"][i][0] == tok.HEARD and not crop["bg_mask"][i][0]
  assert crop["bg_in"][i][0] == tok.BOS and crop["bg_in"][i][1] == tok.HEARD
  # A delegation in the row keeps slot 0; the heard target takes the next.
  item = (start + 3, *target_sequence("knowledge", "q", "Lima", 64))
  both = ex._crop_background([item], start, C, heard)
  assert both["bg_kind"].tolist() == [0, 1] and both["bg_chunk"].tolist() == [3, C - 1]
  full = ex._crop_background([item, (start + 5, *item[1:])], start, C, heard)
  assert full["bg_kind"].tolist() == [0, 0]
  none = ex._crop_background([], start, C, [(last - 20, last - 19, "old")])
  assert none["bg_chunk"].tolist() == [-1, -1]
  # Too long for the sequence: the last words are kept, whole.
  inp, tgt, mask = heard_sequence("alpha beta gamma delta", 14)
  assert dec(tgt[mask].tolist()) == "gamma delta" and tgt[mask][-1] == tok.EOT


def test_heard_and_delegation_losses_are_separate_terms(rng):
  """One decoder pass, two terms: `background` over the delegations' slots, `heard` over
  the heard slots, each a mean over its own target tokens."""
  from tml_jax.data.background_targets import heard_sequence
  from tml_jax.train.losses import losses_from_output
  config = get_config("tiny,smoke")
  config.model.update(dict(num_layers=1, ffn="dense", dense_hidden=64))
  config.layout.video_slots = 0
  cfg = ModelConfig.from_config(config)
  model = InteractionModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  b = _bg_batch(cfg.layout, rng, T=config.background.max_len)
  T = config.background.max_len
  h = heard_sequence("can you make a chart of four and five", T)
  b["bg_in"][1, 1], b["bg_target"][1, 1], b["bg_mask"][1, 1] = h
  b["bg_chunk"][1, 1] = 3
  b["bg_kind"] = np.array([[0, 0], [0, 1]], np.int32)
  out = model(b)
  _, m = losses_from_output(model, out, b, jax.random.key(0), WEIGHTS, other_conversation=True)
  assert float(m["heard_tokens"]) == h[2].sum()
  assert float(m["background_tokens"]) == (b["bg_mask"] & (b["bg_chunk"] >= 0)[..., None]
                                           ).sum() - h[2].sum()
  # The delegations' term equals the batch without the heard slot.
  alone = dict(b, bg_chunk=b["bg_chunk"].copy())
  alone["bg_chunk"][1, 1] = -1
  _, m0 = losses_from_output(model, out, alone, jax.random.key(0), WEIGHTS)
  np.testing.assert_allclose(float(m["background"]), float(m0["background"]), rtol=1e-5)
  assert float(m0["heard"]) == 0.0 and float(m["heard"]) > 0
  assert "heard_other" in m and abs(float(m["heard_other"]) - float(m["heard"])) > 1e-5


def test_worker_solve_with_tool_and_timeout():
  enc = tok.ByteTokenizer().encode
  seen = []

  def generate(context, prompt, stops, chunk):
    seen.append(list(prompt))
    if tok.RESULT not in prompt:
      return [tok.TOOL] + enc("calculator:6 * 7") + [tok.SEP]
    return enc("6 * 7 = 42") + [tok.EOT]

  job = Job(0, 3, 0.8, context=None)
  assert solve(generate, ToolBox(), job) == "6 * 7 = 42"
  assert enc("6 * 7 = 42") == seen[1][-len(enc("6 * 7 = 42")) - 1:-1]  # result fed back
  hang = threading.Event()
  slow = ToolBox({"calculator": lambda a, c: hang.wait(10)}, timeout_s=0.2)
  job = Job(1, 3, 0.8, context=None)
  assert solve(generate, slow, job).startswith("the tool failed")
  assert any("timed out" in e.get("error", "") for e in job.events)
  hang.set()
  # A call that never ends (max_len reached, or EOT before SEP) runs nothing, and its text
  # is not taken for an answer.
  for end in ([], [tok.EOT]):
    job = Job(2, 3, 0.8, context=None)
    ran = []
    box = ToolBox({"calculator": lambda a, c: ran.append(a) or "x"})
    answer = solve(lambda *a: [tok.TOOL] + enc("calculator:11 1 111 * 111") + end, box, job)
    assert answer.startswith("the tool failed: the call did not end") and not ran
    (err,) = job.events
    assert err["kind"] == "tool_error" and err["tool"] == "calculator" and not err["ended"]
  # A worker without a background model reports it instead of failing.
  w = BackgroundWorker(None, ToolBox())
  j, outcome = w.submit(0, 0.2, None)
  assert outcome == "submitted"
  j.done.wait(5)
  assert w.poll(10.0, offline=True)[0].answer == "background model unavailable"


# ----------------------------------------------------------------------------- tools

def test_calculator_matches_python(rng):
  for _ in range(50):
    a, b = (int(x) for x in rng.integers(-999, 999, 2))
    op = rng.choice(["+", "-", "*", "//", "%"])
    if op in ("//", "%") and b == 0:
      b = 7
    assert evaluate(f"{a} {op} ({b})") == eval(f"{a} {op} ({b})")  # noqa: S307 (reference)
  assert evaluate("7 times 8") == 56 and evaluate("(2 + 3) * 4 - 1") == 19
  assert evaluate("1 / 4") == 0.25 and evaluate("2 ** 10") == 1024
  assert ToolBox().call("calculator", "27 - 26") == "27 - 26 = 1"


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "x + 1", "[1, 2]",
                                  "(1).real", "2 ** 100000", "1 / 0", "lambda: 1", "'a' * 3"])
def test_calculator_refuses_non_arithmetic(expr):
  with pytest.raises(CalculatorError):
    evaluate(expr)
  with pytest.raises(ToolError):
    ToolBox().call("calculator", expr)


def test_reminders_fire_at_conversation_time():
  r = Reminders()
  r.add(2.0, "later", now_s=1.0)
  r.add(0.5, "soon", now_s=1.0)
  assert r.due(1.4) == []
  assert [x.text for x in r.due(1.5)] == ["soon"]
  assert r.due(2.9) == [] and [x.text for x in r.due(3.0)] == ["later"] and not r.pending()
  ctx = ToolContext(now_s=lambda: 10.0)
  box = ToolBox(ctx=ctx)
  assert "120" in box.call("timer", "2 minutes")
  assert ctx.reminders.pending()[0].due_s == 130.0
  box.call("remind", "1 minute 30 s; call mum")
  assert [x.text for x in ctx.reminders.due(100.0)] == ["call mum"]
  assert box.call("clock", "weekday(Saturday + 2)").endswith("= Monday")


def test_repeating_reminders_stay_on_their_period(rng, tmp_path):
  """'every N seconds' fires at the first poll at or after each due time, once per poll even
  when polls are late, and stays on the grid of the first due time."""
  set_at, period = float(rng.uniform(0, 5)), int(rng.integers(2, 9))
  ctx = ToolContext(now_s=lambda: set_at)
  out = ToolBox(ctx=ctx).call("remind", f"every {period} seconds; check the oven")
  assert out == f"reminder set every {period} s: check the oven"
  polls = np.round(np.arange(0, 60, 0.2), 4)
  fired = [t for t in polls for _ in ctx.reminders.due(float(t))]
  want = [np.ceil((set_at + k * period) / 0.2 - 1e-6) * 0.2 for k in range(1, 60)]
  want = [t for t in want if t <= polls[-1] + 1e-6]
  assert len(fired) == len(want) >= 5
  np.testing.assert_allclose(fired, want, atol=1e-6)
  r = Reminders()
  r.add(1.0, "x", 0.0, period_s=2.0)
  assert len(r.due(10.0)) == 1  # four periods missed: it fires once
  assert r.pending()[0].due_s == 11.0
  with pytest.raises(ValueError, match="period"):
    r.add(1.0, "too often", 0.0, period_s=0.5)
  # A dry run (how the corpus asks the tools) answers with the path and writes nothing.
  dry = ToolBox(ctx=ToolContext(out_dir=str(tmp_path), dry_run=True))
  assert dry.call("chart", "sales; 3, 5").startswith(f"chart saved: {tmp_path}")
  assert not any(tmp_path.iterdir())


def test_knowledge_answers_every_fact():
  box = ToolBox()
  for q, _, r in FACTS:
    assert box.call("knowledge", q) == r
  with pytest.raises(ToolError):
    box.call("knowledge", "Who won the match yesterday?")


def test_chart_png_written(tmp_path):
  box = ToolBox(ctx=ToolContext(out_dir=str(tmp_path)))
  out = box.call("chart", "sales; mon=3, tue=5, wed=2")
  path = out.split(": ", 1)[1]
  assert os.path.exists(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ToolError):
    box.call("chart", "no numbers here")


@pytest.mark.parametrize("history", [0, 4])
def test_other_conversation_reads_the_previous_rows_context(rng, history):
  """Validation's `background_other` rolls the context (hidden states, token metadata and
  pooled history) by one row and keeps the targets; rolling the targets (calls and their
  delegating chunks) the other way instead pairs the same targets with the same contexts,
  so the two losses agree. On a random model they differ from the rows' own loss."""
  from tml_jax.train.losses import losses_from_output
  config = get_config("tiny,smoke")
  config.model.update(dict(num_layers=1, ffn="dense", dense_hidden=64))
  config.layout.update(dict(video_slots=0, window=3))
  config.background.history_chunks = history
  cfg = ModelConfig.from_config(config)
  model = InteractionModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  B, C, N, T = 3, 8, 2, config.background.max_len
  b = random_batch(cfg.layout, batch=B, num_chunks=C, seed=int(rng.integers(1 << 30)))
  items = [target_sequence("calculator", "What is 3 times 4?", "3 * 4 = 12", T),
           target_sequence("knowledge", "What is the capital of Peru?", "Lima", T),
           target_sequence("clock", "What day is it in 3 days?", "Friday", T)]
  pick = rng.permutation(len(items))
  for k, i in (("bg_in", 0), ("bg_target", 1), ("bg_mask", 2)):
    b[k] = np.stack([np.stack([items[pick[(r + n) % len(items)]][i] for n in range(N)])
                     for r in range(B)])
  b["bg_chunk"] = rng.integers(0, C, (B, N)).astype(np.int32)
  b["bg_chunk"][int(rng.integers(B)), 1] = -1  # a row with one delegation fewer
  out = model(b)
  _, own = losses_from_output(model, out, b, jax.random.key(0), WEIGHTS,
                              other_conversation=True)
  rolled = dict(b, **{k: np.roll(b[k], -1, axis=0)
                      for k in ("bg_in", "bg_target", "bg_mask", "bg_chunk")})
  _, moved = losses_from_output(model, out, rolled, jax.random.key(0), WEIGHTS)
  np.testing.assert_allclose(float(own["background_other"]), float(moved["background"]),
                             rtol=1e-5)
  assert abs(float(own["background_other"]) - float(own["background"])) > 1e-5
  _, plain = losses_from_output(model, out, b, jax.random.key(0), WEIGHTS)
  assert "background_other" not in plain  # training pays nothing for it


def test_context_entries_are_placed_by_their_position_embeddings(rng):
  """The background model reads its context as a set of entries, each with its age, segment
  and slot: permuting the entries together with their positions and mask changes nothing,
  while moving the hidden states alone (so that each sits at another entry's position)
  changes the logits, so the order of what was typed can be read."""
  from tml_jax.model.background import BackgroundConfig, BackgroundModel, read_context
  from tml_jax.microturn import ChunkLayout, TokenMeta
  cfg = BackgroundConfig(d_model=32, num_layers=2, num_heads=2, head_dim=16, hidden=64,
                         context_dim=24, window=4, history_chunks=12)
  bg = BackgroundModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  lay = ChunkLayout(user_audio=2, self_audio=1, video=0, text_in=3, model_text=2,
                    model_audio=1, prefix=2)
  B, C, N, T, Hn = 2, 10, 2, 12, 3
  meta = TokenMeta(*(jnp.asarray(f) for f in lay.meta(C, batch=B)))
  L = meta.chunk.shape[1]
  hidden = jnp.asarray(rng.normal(size=(B, L, 24)), jnp.float32)
  hist = jnp.asarray(rng.normal(size=(B, Hn, 24)), jnp.float32)
  hist_chunk = jnp.asarray(np.tile(np.arange(Hn), (B, 1)), jnp.int32)
  chunk = jnp.asarray(rng.integers(Hn + cfg.window, C, (B, N)), jnp.int32)
  ctx, mask, pos = read_context(cfg, hidden, meta, chunk, cfg.window, hist, hist_chunk)
  assert ctx.shape[1] == mask.shape[-1] == pos.age.shape[-1] == L + Hn
  assert int(pos.age.max()) == cfg.window and bool(mask[..., L:].any())  # history is read
  tokens = jnp.asarray(rng.integers(0, 256, (B, N, T)), jnp.int32)
  ref = bg(tokens, ctx, mask, pos)
  perm = jnp.asarray(rng.permutation(L + Hn))
  moved = type(pos)(pos.age[..., perm], pos.segment[:, perm], pos.slot[:, perm])
  np.testing.assert_allclose(bg(tokens, ctx[:, perm], mask[..., perm], moved), ref,
                             rtol=2e-4, atol=2e-4)
  # The hidden states alone permuted among the visible entries: other positions, new logits.
  seen = np.nonzero(np.asarray(mask[0, 0]))[0]
  shuffled = np.arange(L + Hn)
  shuffled[seen] = seen[rng.permutation(len(seen))]
  out = bg(tokens, ctx[:, jnp.asarray(shuffled)], mask, pos)
  assert float(jnp.max(jnp.abs(out[0, 0] - ref[0, 0]))) > 1e-3


def test_report_rows_show_the_terms_a_run_has_targets_for(rng):
  """The training report's own-vs-other-conversation rows: the delegations' and, when the
  run has heard targets, theirs, each with the gap; none for a term without targets."""
  from tml_jax.train.report import _background_rows
  own, gap = float(rng.uniform(1, 3)), round(float(rng.uniform(-0.1, 0.3)), 3)
  val = dict(background=own, background_other=own + gap, background_tokens=57.5,
             heard=0.0, heard_other=0.0, heard_tokens=0.0)
  (row,) = _background_rows(val)
  assert f"gap {gap:+.3f}" in row and row.startswith("| background cross-entropy")
  val.update(heard=own, heard_other=own + 2 * gap, heard_tokens=157.0)
  rows = _background_rows(val)
  assert len(rows) == 2 and "user's words" in rows[1] and f"gap {2 * gap:+.3f}" in rows[1]
  assert _background_rows(dict(val, background_tokens=0.0, heard_tokens=0.0)) == []
