"""grain pipeline: tml_duplex records -> micro-turn training batches (docs/design.md §4).

A record is one whole conversation with cached dMel features (tml_duplex module docstring).
`MicroTurnExample` turns it into per-chunk streams for the model's input contract
(tml_jax.model.transformer docstring) and crops a random window of `layout.num_chunks`
chunks; shorter conversations are padded with invalid chunks. Text streams are FIFO queues:
what arrives in chunk k enters the first free slots from chunk k on, so a long answer spills
over several chunks instead of being cut.

The model's outputs of chunk t are the text and audio of chunk t+1 (played then). So the
text targets of chunk t are the model's words that start in chunk t+1 (and the DELEGATE
token of a delegation that happens then), followed by EOT; the audio target of chunk t is
the model channel's log-mel of chunk t+1.
"""

from __future__ import annotations

import json
import math

import grain
import numpy as np

from tml_jax.data import speak_labels
from tml_jax.data.background_targets import heard_sequence, target_sequence
from tml_jax.microturn import ChunkLayout, Segment, TextFifo, TokenMeta
from tml_jax.text import tokenizer as tok
from tml_jax.vision import patches as patch_lib
from tml_jax.vision import synthetic


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _delegations(annotated: list[dict]) -> list[dict]:
  """The delegation events of a record by start time: the order their DELEGATEs land in."""
  return sorted((e for e in annotated if e["kind"] == "delegation"),
                key=lambda e: e["start_s"])


class MicroTurnExample(grain.transforms.RandomMap):
  """One record -> one example of `num_chunks` chunks (numpy, unbatched)."""

  def __init__(self, layout: ChunkLayout, num_chunks: int, *, chunk_ms: int = 200,
               video_size=(80, 80), patch: int = 40, random_crop: bool = True,
               bg_delegations: int = 0, bg_len: int = 96, reply_window_targets: bool = False,
               reminder_crop_share: float = 0.0, delegation_crop_share: float = 0.0,
               bg_heard: bool = False):
    self.layout, self.num_chunks, self.chunk_s = layout, num_chunks, chunk_ms / 1000
    # Background-model targets (tml_jax.data.background_targets): up to `bg_delegations` per
    # crop; with bg_heard, a free slot of every crop holds a "heard" target (`_heard`).
    self.bg_delegations, self.bg_len, self.bg_heard = bg_delegations, bg_len, bool(bg_heard)
    # Speak-gate targets: also "speak" from 0.2 s after a user's turn to the reply's start.
    self.reply_window_targets = reply_window_targets
    # A fired reminder lies seconds after its request, rarely in the same random row: this
    # share of the crops of conversations with one is placed so that a firing (TEXT_IN) and
    # the 2.4 s after it are inside the row; the request usually is not (it was learned, with
    # the background model's call, in other crops).
    self.reminder_crop_share = float(reminder_crop_share)
    # A delegation is rare in uniform crops (about one row in 70 holds a DELEGATE): this
    # share of the crops of conversations with one holds its DELEGATE a window into the row
    # (the question before it), or the result's arrival and the answer after it.
    self.delegation_crop_share = float(delegation_crop_share)
    if not (0 <= self.reminder_crop_share and 0 <= self.delegation_crop_share
            and self.reminder_crop_share + self.delegation_crop_share <= 1):
      raise ValueError(f"train.reminder_crop_share={reminder_crop_share} and "
                       f"train.delegation_crop_share={delegation_crop_share}: each must be "
                       ">= 0 and together <= 1 (they are shares of the crops)")
    self.video_size, self.patch, self.random_crop = tuple(video_size), patch, random_crop
    self.frames = layout.user_audio

  def streams(self, record) -> dict:
    """Every per-chunk stream of the whole conversation (before cropping)."""
    lay, F = self.layout, self.frames
    total = int(record["user_dmel"].shape[0]) // F
    if total == 0:
      raise ValueError(f"record {_text(record['id'])} is shorter than one chunk")
    chunk_of = lambda t: min(max(int(math.floor(t / self.chunk_s + 1e-9)), 0), total - 1)
    per_chunk = lambda x: np.asarray(x[:total * F]).reshape(total, F, -1)
    out = dict(user_dmel=per_chunk(record["user_dmel"]).astype(np.int32),
               self_dmel=per_chunk(record["self_dmel"]).astype(np.int32))

    # Text the model must say: its words by start time, DELEGATE at each delegation, ahead
    # of the acknowledgement that starts with it: a chunk-level decision at the chunk's
    # first slot, where the speak decision is made too (after the ack's first word, a
    # trained model still put its DELEGATE mass on slot 0: 0.03-0.12 there, 0.003 at the
    # target).
    said = [[] for _ in range(total)]
    for text, start, speaker in zip(record["word_text"], record["word_start_s"],
                                    record["word_speaker"]):
      if _text(speaker) == "model":
        said[chunk_of(float(start))].append((float(start), 1, tok.ByteTokenizer().encode(
            _text(text) + " ")))
    annotated = json.loads(_text(record["events_json"]))  # parsed once per record
    for e in annotated:
      if e["kind"] == "delegation":
        said[chunk_of(e["start_s"])].append((float(e["start_s"]), 0, [tok.DELEGATE]))
    said = [[t for *_, ids in sorted(items, key=lambda x: x[:2]) for t in ids]
            for items in said]
    # Chunk t predicts chunk t+1; the last chunk's target would lie outside the recording.
    target = TextFifo.layout(said[1:] + [[]], lay.model_text, reserve_eot=True)
    out["model_text_target"] = target
    out["model_text_in"] = np.concatenate(
        [np.full((total, 1), tok.BOS, np.int32), target[:, :-1]], axis=1)
    if self.bg_delegations:
      out["_bg"] = self._background(annotated, target)
      if self.bg_heard:
        out["_heard"] = [(chunk_of(float(a)), chunk_of(float(b)), _text(w))
                         for w, a, b, who in zip(record["word_text"], record["word_start_s"],
                                                 record["word_end_s"], record["word_speaker"])
                         if _text(who) == "user"]

    arriving = [[] for _ in range(total)]
    for t, text in zip(record["text_in_s"], record["text_in_text"]):
      arriving[chunk_of(float(t))].extend([tok.RESULT] + tok.ByteTokenizer().encode(
          _text(text)))
    out["text_in"] = TextFifo.layout(arriving, lay.text_in)

    mel = per_chunk(record["model_mel"]).astype(np.float32)  # [total, F, 80]
    A = lay.model_audio
    nxt = np.concatenate([mel[1:], np.full_like(mel[:1], -7.0)], axis=0)
    out["audio_target"] = nxt.reshape(total, A, (F // A) * mel.shape[-1])
    out["audio_mask"] = np.arange(total) < total - 1
    # The speak gate's target: does the model's own channel hold speech in chunk t+1?
    voiced = speak_labels.voiced_chunks(mel)
    out["speak_target"] = np.concatenate([voiced[1:], [False]])
    # The chunks the flow head learns under a speak gate (tml_jax.train.losses.audio_weight).
    out["audio_voiced"] = out["speak_target"].copy()
    if self.reply_window_targets:
      out["speak_target"] |= speak_labels.reply_windows(record, total, self.chunk_s)
    out["speak_now"] = voiced  # what the model is doing in chunk t (onsets: now 0, target 1)
    out["self_speaking"] = voiced  # the model input of the same (ModelConfig.self_speaking)
    out["speak_condition"] = speak_labels.chunk_conditions(record, total, self.chunk_s)
    # Chunks that crops may be placed around (crop_start): reminder firings; a delegation's
    # DELEGATE (where it landed in the targets) and its result's arrival.
    landed = [(int(c), bool(e.get("data", e).get("held")))
              for c, e in zip(np.nonzero(target == tok.DELEGATE)[0], _delegations(annotated))]
    out["_anchors"] = dict(
        reminder=[chunk_of(float(e["data"]["due_s"])) for e in annotated
                  if e["kind"] == "reminder_due"],
        delegate=[c for c, held in landed if not held],
        held=[c for c, held in landed if held],
        result=[chunk_of(float(e["data"]["arrival_s"])) for e in annotated
                if e["kind"] == "delegation"])

    events = json.loads(_text(record["video_events_json"]))
    if lay.video:
      if events:
        seed = int(json.loads(_text(record["meta_json"])).get("video_seed", 0))
        frames, _ = synthetic.make_video(total, self.video_size, events, seed,
                                         chunk_ms=int(round(self.chunk_s * 1000)))
        out["video"] = np.stack([patch_lib.patchify(f, self.patch) for f in frames])
      else:
        out["video"] = np.zeros((total, lay.video, self.patch * self.patch * 3), np.uint8)
      out["has_video"] = np.full((total,), bool(events))
    return out

  def _background(self, annotated: list[dict], target) -> list:
    """(chunk, inputs, targets, mask) per delegation: the chunk is where its DELEGATE landed
    in the text targets (FIFO spill included), i.e. the micro-turn that emits it."""
    chunks = [int(c) for c, j in zip(*np.nonzero(target == tok.DELEGATE))]
    out = []
    for c, e in zip(chunks, _delegations(annotated)):
      d = e.get("data", e)
      out.append((c, *target_sequence(d["tool"], d["question"], d["result_text"], self.bg_len,
                                      d.get("args"))))
    return out

  def _crop_background(self, items, start: int, n: int, heard=None) -> dict:
    """The row's background slots: its delegations (bg_kind 0), then, in the first free
    slot, the words the user said in the window of the row's last chunk (bg_kind 1, when
    `heard` holds (start chunk, end chunk, word) of the conversation's user words)."""
    N, T = self.bg_delegations, self.bg_len
    ex = dict(bg_chunk=np.full((N,), -1, np.int32), bg_in=np.full((N, T), tok.PAD, np.int32),
              bg_target=np.full((N, T), tok.PAD, np.int32), bg_mask=np.zeros((N, T), bool),
              bg_kind=np.zeros((N,), np.int32))
    inside = [it for it in items if start <= it[0] < start + n][:N]
    for i, (c, inp, tgt, mask) in enumerate(inside):
      ex["bg_chunk"][i], ex["bg_in"][i], ex["bg_target"][i], ex["bg_mask"][i] = (
          c - start, inp, tgt, mask)
    if heard is not None and len(inside) < N:
      c = start + n - 1
      w = self.layout.window or self.num_chunks
      words = [word for a, b, word in heard if max(start, c - w + 1) <= a and b <= c]
      if words:
        i = len(inside)
        ex["bg_in"][i], ex["bg_target"][i], ex["bg_mask"][i] = heard_sequence(
            " ".join(words), T)
        ex["bg_chunk"][i], ex["bg_kind"][i] = c - start, 1
    return ex

  # Where a crop places each kind of anchor: (chunks before it, chunks from it to the end).
  # A firing or a result is followed by 2.4 s of the model saying it (TEXT_IN is the cue).
  # A DELEGATE has a whole window before it (None: 10 chunks) and the acknowledgement's
  # start after it: placed earlier, the row's start (which looks like a conversation's) lay
  # inside its window at a fixed distance, and a model trained with (10, 10) delegated 2.6 s
  # into 10 of the 88 test clips, none of them a delegation.
  # A held delegation's DELEGATE (its question seconds before, beyond the window) is the
  # row's last chunk ("last"): the chunks before the window, the most the row can hold, are
  # the background model's history of the question.
  PLACEMENT = dict(reminder=(2, 12), result=(2, 12), delegate=(None, 4), held=("last", 1))

  def placement(self, kind: str) -> tuple[int, int]:
    before, after = self.PLACEMENT[kind]
    if before is None:
      before = self.layout.window if self.layout.window is not None else 10
    elif before == "last":
      before = self.num_chunks - 1
    before = min(before, self.num_chunks - 1)
    return before, min(after, self.num_chunks - before)

  def crop_start(self, total: int, anchors: dict, rng: np.random.Generator) -> int:
    """The first chunk of the row: uniform, or placed around an anchor. `anchors` maps a
    kind (PLACEMENT) to chunks of the whole conversation. reminder_crop_share of the crops
    of a conversation with a reachable firing hold one; delegation_crop_share of those of
    a conversation with a reachable DELEGATE or result hold one of those."""
    C = self.num_chunks
    if not (self.random_crop and total > C):
      return 0
    spans = {}
    for kind, chunks in anchors.items():
      before, after = self.placement(kind)
      s = [(max(0, a - C + after), min(total - C, a - before)) for a in chunks]
      spans[kind] = [(lo, hi) for lo, hi in s if lo <= hi]
    groups = [(self.reminder_crop_share, spans.get("reminder", [])),
              (self.delegation_crop_share,
               spans.get("delegate", []) + spans.get("held", []) + spans.get("result", []))]
    groups = [(share, s) for share, s in groups if share > 0 and s]
    if groups:  # no draw otherwise: crops without anchors are drawn exactly as uniform ones
      u, edge = rng.random(), 0.0
      for share, s in groups:
        edge += share
        if u < edge:
          lo, hi = s[int(rng.integers(len(s)))]
          return int(rng.integers(lo, hi + 1))
    return int(rng.integers(0, total - C + 1))

  def random_map(self, record, rng: np.random.Generator) -> dict:
    s = self.streams(record)
    bg, heard = s.pop("_bg", None), s.pop("_heard", None)
    total, C, lay = len(s["text_in"]), self.num_chunks, self.layout
    start = self.crop_start(total, s.pop("_anchors"), rng)
    n = min(C, total - start)
    ex = {} if bg is None else self._crop_background(bg, start, n, heard)
    for k, v in s.items():
      part = v[start:start + n]
      pad = np.zeros((C - n, *part.shape[1:]), part.dtype)
      if k in ("model_text_in", "model_text_target", "text_in"):
        pad[...] = tok.PAD
      ex[k] = np.concatenate([part, pad], axis=0)
    valid_BC = (np.arange(C) < n)[None]
    valid_BL = None
    if lay.video:
      seg = lay.meta(C).segment[0]
      chunk_valid = np.repeat(ex.pop("has_video"), lay.chunk_len)
      video_tok = np.concatenate([np.zeros(lay.prefix, bool), seg[lay.prefix:] == Segment.VIDEO])
      valid_BL = (~video_tok | np.concatenate([np.zeros(lay.prefix, bool), chunk_valid]))[None]
    meta = lay.meta(C, batch=1, valid_BC=valid_BC, valid_BL=valid_BL)
    ex["meta"] = TokenMeta(*(f[0] for f in meta))
    ex["audio_mask"] = ex["audio_mask"] & valid_BC[0]
    return ex


def _bg_delegations(config) -> int:
  b = config.get("background")
  return int(b.max_delegations) if b is not None and b.get("enabled", False) else 0


def micro_turn_example(config, *, random_crop: bool = True, **overrides) -> MicroTurnExample:
  """The trainer's `MicroTurnExample` for `config`; `overrides` replace its keyword
  arguments (e.g. delegation_crop_share=1.0 to crop every row at a delegation)."""
  lay = config.layout
  kw = dict(chunk_ms=lay.chunk_ms, video_size=lay.video_size, patch=config.model.patch_size,
            random_crop=random_crop, bg_delegations=_bg_delegations(config),
            bg_len=config.get("background", {}).get("max_len", 96),
            reply_window_targets=bool(config.train.get("speak_reply_window", False)),
            reminder_crop_share=float(config.train.get("reminder_crop_share", 0.0)),
            delegation_crop_share=float(config.train.get("delegation_crop_share", 0.0)),
            bg_heard=bool(config.get("background", {}).get("heard_targets", False)))
  kw.update(overrides)
  return MicroTurnExample(ChunkLayout.from_config(lay), lay.num_chunks, **kw)


def make_loader(source, config, *, split: str, seed: int, batch_size: int | None = None,
                num_epochs: int | None = None, shuffle: bool = True, random_crop: bool = True,
                worker_count: int = 0) -> grain.DataLoader:
  """A deterministic, checkpointable grain loader, sharded by JAX process.

  The per-process batch is the global batch divided by the number of processes.
  """
  import jax
  batch_size = batch_size or config.train.batch_size
  if batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={batch_size} is not divisible by the "
                     f"{jax.process_count()} processes; use a multiple")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  ops = [micro_turn_example(config, random_crop=random_crop),
         grain.transforms.Batch(batch_size // jax.process_count(), drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count)
