r"""How many delegations does the background model need to learn to read its context?

  python benchmarks/background_data_curve.py --workdir=runs/tiny [--sizes=25,100,400]
      [--steps=800] [--held=48] [--init=checkpoint|fresh] [--json=F] [--plot=F.png]

The main job's corpus holds ~23 delegations, and its background model writes the same call
whatever was asked (benchmarks/RESULTS.md, eleventh and twelfth sessions). This measures
the data side of that on its own. The interaction model of the run's newest checkpoint is
frozen; `max(--sizes)` fresh training delegations (the `delegation` scenario forced, train
split, the run's corpus seed and length) and `--held` fresh validation ones are featurised,
cropped the way the trainer crops a delegation (tml_jax.data.pipeline.MicroTurnExample,
delegation_crop_share 1) and run through it once, teacher-forced. Then, for each size K,
the background model alone (from the checkpoint's, or fresh) is trained for `--steps`
steps on the first K with the trainer's loss (tml_jax.train.losses.background_terms), and
scored on the held-out ones and on its own K:

  ce / ce_other   teacher-forced cross-entropy (nats per target token) reading the own
                  row's context / the next row's (the gap: how much it reads)
  ended, tool, args   greedy calls (tml_jax.serve.worker.ModelGenerator, as served): ended
                  with SEP, named the corpus' tool, and wrote its args exactly

(own-K: the first OWN_SCORED of the K)

split by typed and spoken questions. The contexts are teacher-forced (the corpus' own model
audio as SELF_AUDIO), so this is an upper bound on what the served chain gets.

Needs the training dependencies (grain, optax) and a trained workdir; CPU or GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GROUPS = ("all", "typed", "spoken")
OWN_SCORED = 400  # the own-K scores use the first this many (greedy decoding is the cost)


def examples(config, split: str, num: int, seed: int, log=print) -> list[dict]:
  """`num` cropped examples of forced delegation conversations of `split`, each holding at
  least one DELEGATE (a crop placed at the result's arrival may not: it is redrawn), with
  `_typed` (the question was typed) and `_call` (the corpus' name:args) attached."""
  from tml_jax.data import scenarios
  from tml_jax.data.conversation import featurise
  from tml_jax.data.pipeline import micro_turn_example
  # Every crop at a delegation (none at a reminder), delegation slots only.
  crop = micro_turn_example(config, delegation_crop_share=1.0, reminder_crop_share=0.0,
                            bg_heard=False)
  out, t0, i = [], time.perf_counter(), 0
  while len(out) < num:
    conv = scenarios.generate(split, i, seed=int(config.data.seed),
                              duration_s=float(config.data.conversation_s),
                              scenario="delegation")
    i += 1
    deleg = conv.events_of("delegation")
    if len(deleg) != 1:  # one call per conversation: the crop's slot is that one
      continue
    record = featurise(conv)
    rng = np.random.default_rng([seed, i])
    for _ in range(8):
      ex = crop.random_map(record, rng)
      if (ex["bg_chunk"] >= 0).any():
        break
    else:
      continue
    first = int(np.argmax(ex["bg_chunk"] >= 0))
    d = deleg[0].data
    ex["_typed"] = bool(d.get("typed"))
    ex["_call"] = f"{d['tool']}:{d['args']}"
    ex["_slot"] = first
    out.append(ex)
    if len(out) % 25 == 0 or len(out) == num:
      el = time.perf_counter() - t0
      log(f"  {split}: {len(out)}/{num} examples, {el:.0f} s, "
          f"ETA {el / len(out) * (num - len(out)):.0f} s")
  return out


def stack(exs: list[dict]) -> dict:
  import jax
  keep = [{k: v for k, v in e.items() if not k.startswith("_")} for e in exs]
  return jax.tree.map(lambda *x: np.stack(x), *keep)


def text_features(model, b: dict):
  """[B, L, D] oracle context: the interaction model's input embedding of each TEXT_IN and
  MODEL_TEXT token where it sits, zero everywhere else (no audio, no hidden states)."""
  import jax.numpy as jnp
  from tml_jax.microturn import CHUNK_SEGMENTS, Segment
  from tml_jax.text import tokenizer as tok
  lay = model.cfg.layout
  B, C = b["text_in"].shape[:2]
  streams = {s: jnp.full((B, C, lay.slots(s)), tok.PAD, jnp.int32) for s in CHUNK_SEGMENTS
             if lay.slots(s)}
  streams[Segment.TEXT_IN] = jnp.asarray(b["text_in"], jnp.int32)
  streams[Segment.MODEL_TEXT] = jnp.asarray(b["model_text_in"], jnp.int32)
  if lay.prefix:
    streams[Segment.PREFIX] = jnp.full((B, lay.prefix), tok.PAD, jnp.int32)
  ids = lay.pack(streams)
  emb = model.embed.tokens(ids, jnp.float32)
  return jnp.where((ids != tok.PAD)[..., None], emb, 0.0)


def contexts(model, exs: list[dict], batch: int = 8, kind: str = "hidden") -> list[np.ndarray]:
  """Per example [L, D]: the frozen interaction model's final hidden states (`hidden`), or
  the `text_features` oracle (`text`)."""
  import jax
  from flax import nnx
  gd, st = nnx.split(model)
  fwd = jax.jit(lambda st, b: (nnx.merge(gd, st)(b).hidden if kind == "hidden"
                               else text_features(nnx.merge(gd, st), b)))
  out = []
  for j in range(0, len(exs), batch):
    part = exs[j:j + batch]
    pad = part + [part[-1]] * (batch - len(part))  # one compiled shape
    h = np.asarray(fwd(st, stack(pad)))
    out += [h[k] for k in range(len(part))]
  return out


class Data:
  """Examples with their frozen contexts, as the background loss's batch fields."""

  def __init__(self, exs, hidden):
    b = stack(exs)
    self.hidden = np.stack(hidden).astype(np.float32)
    self.meta = b["meta"]
    self.bg = {k: b[k] for k in ("bg_chunk", "bg_in", "bg_target", "bg_mask")}
    self.typed = np.array([e["_typed"] for e in exs])
    self.calls = [e["_call"] for e in exs]
    self.slot = np.array([e["_slot"] for e in exs])

  def __len__(self):
    return len(self.calls)

  def first(self, K: int) -> "Data":
    """The first K examples (what a point of the curve trains on)."""
    sub = Data.__new__(Data)
    idx = np.arange(K)
    sub.hidden, sub.meta, sub.bg = self.take(idx)
    sub.typed, sub.calls, sub.slot = self.typed[idx], self.calls[:K], self.slot[idx]
    return sub

  def take(self, idx):
    import jax
    from tml_jax.microturn import TokenMeta
    meta = TokenMeta(*(np.asarray(f)[idx] for f in self.meta))
    return self.hidden[idx], meta, jax.tree.map(lambda x: x[idx], self.bg)


def train_background(bg0, data: Data, K: int, steps: int, batch: int, lr: float, window: int,
                     num_chunks: int, seed: int, log=print):
  """The background model trained on data's first K examples alone; returns it."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from tml_jax.train.losses import background_loss
  gd, st = nnx.split(bg0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10), steps, lr * 0.1),
      b2=0.98, weight_decay=0.05))

  @jax.jit
  def step(st, opt, hidden, meta, bgb):
    def loss(st):
      return background_loss(nnx.merge(gd, st), hidden, meta, bgb, window, num_chunks)[0]
    val, g = jax.value_and_grad(loss)(st)
    up, opt = tx.update(g, opt, st)
    return optax.apply_updates(st, up), opt, val

  opt = tx.init(st)
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  for s in range(steps):
    idx = rng.choice(K, size=batch, replace=K < batch)
    hidden, meta, bgb = data.take(idx)
    st, opt, val = step(st, opt, jnp.asarray(hidden), meta, bgb)
    if (s + 1) % max(1, steps // 4) == 0:
      el = time.perf_counter() - t0
      log(f"    K={K} step {s + 1}/{steps} loss {float(val):.3f} "
          f"({(s + 1) / el:.1f} steps/s, ETA {el / (s + 1) * (steps - s - 1):.0f} s)")
  return nnx.merge(gd, st)


def score(bg, data: Data, window: int, num_chunks: int, batch: int = 16) -> dict:
  """Teacher-forced CE (own and next row's context) and the greedy calls' links, per group."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tml_jax.model.background import pool_history
  from tml_jax.serve.worker import ModelGenerator
  from tml_jax.text import tokenizer as tok
  from tml_jax.train.losses import background_loss, background_other_conversation
  gd, st = nnx.split(bg)

  @jax.jit
  def ce(st, hidden, meta, bgb):
    b = nnx.merge(gd, st)
    own = background_loss(b, hidden, meta, bgb, window, num_chunks)
    other = background_other_conversation(b, hidden, meta, bgb, window, num_chunks)
    return own[0] * own[1], other["background"][0] * own[1], own[1]

  sums = np.zeros(3)
  n = len(data)
  for j in range(0, n - 1, batch):
    idx = np.arange(j, min(j + batch, n))
    if len(idx) < 2:
      break
    hidden, meta, bgb = data.take(idx)
    sums += np.array([float(x) for x in ce(st, jnp.asarray(hidden), meta, bgb)])
  gen = ModelGenerator(bg, window)
  dec = tok.ByteTokenizer().decode
  links = {g: dict(n=0, ended=0, tool=0, args=0) for g in GROUPS}
  written = []
  for i in range(n):
    hidden, meta, bgb = data.take(np.array([i]))
    hist, hist_chunk = pool_history(jnp.asarray(hidden), meta, num_chunks)
    chunk = int(bgb["bg_chunk"][0, data.slot[i]])
    seq = gen((jnp.asarray(hidden), meta, hist, hist_chunk), [tok.BOS], (tok.SEP, tok.EOT),
              chunk)
    ended = bool(seq) and seq[0] == tok.TOOL and seq[-1] == tok.SEP
    text = dec([t for t in seq[1:-1] if t < 256]) if ended else ""
    name, want_name = text.partition(":")[0], data.calls[i].partition(":")[0]
    for g in ("all", "typed" if data.typed[i] else "spoken"):
      links[g]["n"] += 1
      links[g]["ended"] += ended
      links[g]["tool"] += ended and name == want_name
      links[g]["args"] += ended and text.strip() == data.calls[i].strip()
    if len(written) < 6:
      written.append((data.calls[i], text if ended else dec([t for t in seq if t < 256])))
  return dict(ce=sums[0] / max(sums[2], 1), ce_other=sums[1] / max(sums[2], 1),
              tokens=int(sums[2]), links=links, written=written)


def plot(rows: list[dict], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  K = [r["K"] for r in rows]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  for key, style, label in (("ce", "-o", "held-out, own context"),
                            ("ce_other", "--o", "held-out, another row's")):
    a.plot(K, [r["held"][key] for r in rows], style, label=label)
  a.plot(K, [r["train"]["ce"] for r in rows], ":o", label="its own K, own context")
  a.set(xscale="log", xlabel="training delegations K", ylabel="CE (nats / target token)",
        title="background loss (call and answer)")
  a.legend(fontsize=8)
  for g, c in (("typed", "C0"), ("spoken", "C1")):
    for link, style in (("tool", "-o"), ("args", "--s")):
      share = [r["held"]["links"][g][link] / max(r["held"]["links"][g]["n"], 1) for r in rows]
      b.plot(K, share, style, color=c, label=f"{g}: {link} right")
  b.set(xscale="log", ylim=(-0.03, 1.03), xlabel="training delegations K",
        ylabel="share of held-out calls", title="greedy calls (held-out)")
  b.legend(fontsize=8)
  for ax in (a, b):
    ax.set_xticks(K, [str(k) for k in K])
    ax.minorticks_off()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a trainer workdir (config.json, checkpoints)")
  p.add_argument("--sizes", default="25,100,400", help="training delegations per point")
  p.add_argument("--steps", type=int, default=800, help="background steps per point")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--held", type=int, default=48, help="held-out validation delegations")
  p.add_argument("--init", default="checkpoint", choices=("checkpoint", "fresh"),
                 help="start from the run's background model or a freshly initialised one")
  p.add_argument("--context", default="hidden", choices=("hidden", "text"),
                 help="what the background model reads: the interaction model's hidden "
                 "states (as trained and served), or an oracle of the typed and model text "
                 "alone, embedded (does the data teach reading when the bytes are plain?)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  p.add_argument("--plot", default=None, help="write the curves here (PNG)")
  a = p.parse_args(argv)
  sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
  if not sizes or sizes[0] < 1:
    p.error(f"--sizes={a.sizes!r}: need positive integers, e.g. 25,100,400")
  if a.held < 2 or a.steps < 1:
    p.error(f"--held={a.held} --steps={a.steps}: need --held >= 2 and --steps >= 1")

  from flax import nnx
  from tml_jax.model.background import BackgroundConfig, BackgroundModel
  from tml_jax.serve.engine import load_config
  from tml_jax.train.checkpoint import restore_params
  from tml_jax.train.state import model_from_params, params_abstract
  config = load_config(a.workdir, None)
  if BackgroundConfig.from_config(config) is None:
    raise SystemExit(f"{a.workdir}: its config has no background model "
                     "(config.background.enabled is False); nothing to measure")
  graphdef, abstract = params_abstract(config)
  params, step = restore_params(a.workdir, nnx.to_pure_dict(abstract))
  model = model_from_params(graphdef, abstract, params)
  window, C = int(config.layout.window or config.layout.num_chunks), config.layout.num_chunks
  t0 = time.perf_counter()
  print(f"{a.workdir}: step {step}; building {sizes[-1]} training and {a.held} held-out "
        "delegation examples", flush=True)
  log = lambda s: print(s, flush=True)
  train_ex = examples(config, "train", sizes[-1], a.seed, log)
  held_ex = examples(config, "validation", a.held, a.seed + 1, log)
  train = Data(train_ex, contexts(model, train_ex, kind=a.context))
  held = Data(held_ex, contexts(model, held_ex, kind=a.context))
  del train_ex, held_ex
  print(f"  contexts: {train.hidden.shape[1]} tokens x {train.hidden.shape[2]} per example; "
        f"typed {int(train.typed.sum())}/{len(train)} train, {int(held.typed.sum())}/"
        f"{len(held)} held-out ({time.perf_counter() - t0:.0f} s)", flush=True)
  cfg = model.background.cfg
  rows = []
  base = score(model.background, held, window, C) if a.context == "hidden" else None
  if base:
    print(f"  the run's own background model, held-out: ce {base['ce']:.3f} other "
          f"{base['ce_other']:.3f}, " + ", ".join(
              f"{g} {base['links'][g]['tool']}/{base['links'][g]['args']} of "
              f"{base['links'][g]['n']}" for g in ("typed", "spoken")), flush=True)
  for K in sizes:
    bg0 = (model.background if a.init == "checkpoint"
           else BackgroundModel(cfg, rngs=nnx.Rngs(a.seed)))
    bg = train_background(bg0, train, K, a.steps, a.batch, a.lr, window, C, a.seed, log)
    rows.append(dict(K=K, held=score(bg, held, window, C),
                     train=score(bg, train.first(min(K, OWN_SCORED)), window, C)))
    r = rows[-1]
    print(f"  K={K}: held-out ce {r['held']['ce']:.3f} other {r['held']['ce_other']:.3f}; "
          f"own-K ce {r['train']['ce']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

  print(f"\n{a.workdir} (step {step}), context {a.context}, background init {a.init}, "
        f"{a.steps} steps x batch "
        f"{a.batch}, lr {a.lr}, {platform.machine()} {os.cpu_count()} cores, "
        f"{time.perf_counter() - t0:.0f} s")
  print("| K | held-out ce / other | own-K ce | held-out typed: n, ended, tool, args | "
        "spoken: n, ended, tool, args | own-K typed: tool, args of n |")
  print("|---|---|---|---|---|---|")
  fmt = lambda L: f"{L['n']}, {L['ended']}, {L['tool']}, {L['args']}"
  if base:
    print(f"| run's own | {base['ce']:.3f} / {base['ce_other']:.3f} | | "
          f"{fmt(base['links']['typed'])} | {fmt(base['links']['spoken'])} | |")
  for r in rows:
    h, o = r["held"], r["train"]
    print(f"| {r['K']} | {h['ce']:.3f} / {h['ce_other']:.3f} | {o['ce']:.3f} | "
          f"{fmt(h['links']['typed'])} | {fmt(h['links']['spoken'])} | "
          f"{o['links']['typed']['tool']}, {o['links']['typed']['args']} of "
          f"{o['links']['typed']['n']} |")
  print("\nheld-out calls at the largest K (expected -> written):")
  for want, got in rows[-1]["held"]["written"]:
    print(f"  {want!r} -> {got!r}")
  if a.plot:
    plot(rows, a.plot)
    print(f"wrote {a.plot}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(workdir=a.workdir, step=step, context=a.context, init=a.init,
                     steps=a.steps, batch=a.batch, lr=a.lr, base=base, rows=rows), f,
                indent=1, default=str)


if __name__ == "__main__":
  main()
