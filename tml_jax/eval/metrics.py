r"""Full-Duplex-Bench's scoring rules, as its own scripts implement them, plus ours.

Sources: github.com/DanielLin94144/Full-Duplex-Bench at commit d7336bd, folder
v1_v1.5/evaluation/ (cited below as "FDB <script> L<line>"), and get_transcript/asr.py.
Every rule reads plain timelines, so each can be checked by hand:
- `words`: what a system said, [(text, start_s, end_s)] in time order: output.json's
  "chunks" (the benchmark's ASR of output.wav; here `tml_jax.eval.asr`). For user
  interruption the benchmark transcribes only the audio after the barge-in ends
  (get_transcript/asr.py L33-45), so `words` start there.
- `segs`: when a system sounds, [(start_s, end_s)] from the Silero VAD on its output.wav
  (`tml_jax.eval.vad.segments`, get_speech_timestamps with its defaults).

v1 (arXiv 2503.04721):
- A turn is taken when the transcript, first word start to last word end, lasts 1 s or
  more, or has more than 3 words (FDB eval_smooth_turn_taking.py L7-8, L59-73; the same in
  eval_pause_handling.py L42-60 and eval_user_interruption.py L96-112). The whole
  transcript counts, not one utterance: a backchannel early and an answer later is one
  turn from the first word. TOR is the share of samples that take the turn.
- Latency: first word start minus the user's turn end (turn_taking.json timestamp[0],
  eval_smooth_turn_taking.py L48, L63; interrupt.json timestamp[1] for interruption,
  eval_user_interruption.py L88, L100), 0 when negative, averaged over the samples that
  take the turn (eval_smooth_turn_taking.py L76-80, L92).
- Backchannel (FDB eval_backchannel.py): VAD segments of output.wav (seconds, rounded to
  0.1 s); a segment over 3 s takes the turn and ends the scan (L59-61); a shorter one is a
  backchannel candidate and sets the sample's TOR from the transcript words that overlap
  it: a turn when it holds more than 2 of them or lasts 1 s or more (L95-107; the last
  segment scanned decides, see `backchannel`). Every shorter segment counts toward the
  frequency (L109, L115) and the timing histogram; JSD is scipy's Jensen-Shannon
  *distance* (natural log) between that histogram and the reference, resized by linear
  interpolation (L117-153), and 1 for a sample without any (L117-118).
- Interruption relevance (an LLM judge, eval_user_interruption.py L116-142) is not
  computed.

v1.5 (arXiv 2507.23159), timing (FDB get_timing.py): the user's VAD segments of input.wav
merged over gaps up to 0.6 s, the system's of output.wav over gaps up to 0.5 s (L23-24,
L60-75); stop latencies are the durations of the overlaps of the two (L81-103), response
latencies the gaps from a user segment's end to the next system onset (L106-118). The
script stops at these per-sample lists; the aggregation (mean per sample, then over
samples) is ours. Behaviour categories come from an LLM judge (eval_behavior.py) and are
not computed; `timing_behaviour_ok` is our timing-only check of the behaviour our
annotations expect.

Ours: `stop_s` for v1 interruptions (how long the system keeps sounding after the barge-in
starts), and background-answer, reminder, visual-interjection and counting metrics from
annotations.json events.
"""

from __future__ import annotations

import math
import re

import numpy as np

Word = tuple[str, float, float]
Seg = tuple[float, float]

TURN_DURATION_S = 1.0      # FDB eval_smooth_turn_taking.py L7 (turn_duration_threshold)
TURN_NUM_WORDS = 3         # FDB eval_smooth_turn_taking.py L8 (turn_num_words_threshold)
BC_SEGMENT_MAX_S = 3.0     # FDB eval_backchannel.py L14 (time_threshold)
BC_WINDOW_S = 0.2          # FDB eval_backchannel.py L12 (window_size)
BC_EPSILON = 1e-10         # FDB eval_backchannel.py L13
USER_MERGE_GAP_S = 0.6     # FDB get_timing.py L23
MODEL_MERGE_GAP_S = 0.5    # FDB get_timing.py L24
EPS_S = 1e-6


def words_from_output(output: dict) -> list[Word]:
  """output.json ({"text", "chunks": [{"text", "timestamp": [s, e]}]}) -> sorted words.
  A chunk without a start is skipped; one without an end ends where it starts (FDB
  eval_pause_handling.py L46-53 and eval_backchannel.py L76-83 handle a null end so)."""
  words = []
  for c in output.get("chunks") or []:
    ts = c.get("timestamp") or [None, None]
    if ts[0] is None or not str(c.get("text", "")).strip():
      continue
    end = ts[1] if ts[1] is not None else ts[0]
    words.append((str(c["text"]).strip(), float(ts[0]), float(end)))
  return sorted(words, key=lambda w: w[1])


def clip(words: list[Word], duration_s: float, start_s: float = 0.0) -> list[Word]:
  """Words inside [start_s, duration_s): nothing is said past the clip end."""
  return [(w, s, min(e, duration_s)) for w, s, e in words
          if start_s - EPS_S <= s < duration_s]


# ---- v1: turn taking, pause handling, interruption -------------------------------------

def takes_turn(words: list[Word]) -> bool:
  """FDB eval_smooth_turn_taking.py L59-73: no words -> no turn; else a turn when the
  transcript lasts >= 1 s (first start to last end) or has more than 3 words."""
  if not words:
    return False
  duration = words[-1][2] - words[0][1]
  return duration >= TURN_DURATION_S or len(words) > TURN_NUM_WORDS


def turn_taking(words: list[Word], turn_end_s: float) -> dict:
  """TOR and latency of one sample (FDB eval_smooth_turn_taking.py L48-80): latency from
  the user's turn end to the first word, 0 when the system started earlier."""
  took = takes_turn(words)
  latency = round(max(0.0, words[0][1] - turn_end_s), 4) if took else None
  return {"takeover": took, "latency_s": latency}


def pause_handling(words: list[Word]) -> dict:
  """FDB eval_pause_handling.py L42-60: the turn-taking test on the whole clip."""
  return {"takeover": takes_turn(words)}


def stop_time(segs: list[Seg], t: float, clip_end_s: float, *, tol_s: float = 0.02) -> dict:
  """How long sound that is on at time t goes on: {"speaking", "stop_s", "censored"}
  (ours). A segment ending within tol_s of the clip end never stopped inside the clip."""
  seg = next(((a, b) for a, b in segs if a <= t + EPS_S and b > t), None)
  if seg is None:
    return {"speaking": False, "stop_s": None, "censored": False}
  return {"speaking": True, "stop_s": round(seg[1] - t, 4),
          "censored": bool(seg[1] >= clip_end_s - tol_s)}


def stopped_within(stop: dict, limit_s: float) -> bool:
  """A stop_time result: silent within limit_s of t, or not sounding at t at all."""
  return not stop.get("speaking") or (
      stop.get("stop_s") is not None and stop["stop_s"] <= limit_s and not stop.get("censored"))


def interruption(words_after: list[Word], segs: list[Seg], start_s: float, end_s: float,
                 clip_end_s: float) -> dict:
  """FDB eval_user_interruption.py L91-112 on the words after the barge-in end (the
  transcript is cropped there, get_transcript/asr.py L33-45), plus our stop_s on the
  system's merged VAD segments."""
  out = turn_taking(words_after, end_s)
  return {**out, **stop_time(merge(segs, MODEL_MERGE_GAP_S), start_s, clip_end_s)}


# ---- v1: backchannel -----------------------------------------------------------------

def words_in(words: list[Word], a: float, b: float) -> list[str]:
  """Words overlapping segment [a, b], by FDB eval_backchannel.py L86-91's three tests."""
  out = []
  for w, s, e in words:
    if (s >= a and e <= b) or (s <= b and e > b) or (s <= a and e > a):
      out.append(w)
  return out


def segment_takes_turn(n_words: int, duration_s: float) -> bool:
  """FDB eval_backchannel.py L97-107: > 3 words, or >= 1 s, or > 2 words."""
  if n_words > TURN_NUM_WORDS:
    return True
  return duration_s >= 1 or n_words > 2


def bc_histogram(spans: list[Seg], duration_s: float) -> np.ndarray:
  """FDB eval_backchannel.py L120-134: one count per 0.2 s window a span touches (the
  window index of its start through that of its end), + 1e-10, normalised."""
  hist = np.zeros(int(duration_s / BC_WINDOW_S) + 1)
  for a, b in spans:
    hist[int(a / BC_WINDOW_S):int(b / BC_WINDOW_S) + 1] += 1
  hist += BC_EPSILON
  return hist / hist.sum()


def js_distance(pred, gt) -> float:
  """FDB eval_backchannel.py L139-153: the reference resized to the prediction's length by
  linear interpolation, then scipy's jensenshannon (natural log: a distance in [0, 0.833])."""
  from scipy.spatial.distance import jensenshannon
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if pred.ndim != 1 or gt.ndim != 1 or not len(pred) or not len(gt):
    raise ValueError(f"js_distance wants two non-empty 1-D histograms, got shapes "
                     f"{pred.shape}, {gt.shape}")
  resized = np.interp(np.linspace(0, 1, len(pred)), np.linspace(0, 1, len(gt)), gt)
  return round(float(jensenshannon(pred, resized)), 6)


def backchannel(words: list[Word], segs_rounded: list[Seg], duration_s: float,
                gt=None) -> dict:
  """One backchannel sample, FDB eval_backchannel.py L52-118.

  segs_rounded: VAD segments in seconds rounded to 0.1 s, as get_speech_timestamps gives
  them (eval_backchannel.py L37-41; `tml_jax.eval.vad.rounded`). The sample's TOR is the
  verdict of the *last* segment scanned, since each one overwrites it (L95-107), unless
  a segment over 3 s ended the scan with TOR 1 (L59-61); we keep that as written.
  """
  tor, bcs = False, []
  for a, b in segs_rounded:
    dur = b - a
    if dur > BC_SEGMENT_MAX_S:
      tor = True
      break
    tor = segment_takes_turn(len(words_in(words, a, b)), dur)
    bcs.append((a, b))  # L109: every short segment, whatever its verdict
  out = {"takeover": tor, "n_bc": len(bcs),
         "freq": round(len(bcs) / duration_s, 4) if duration_s > 0 else None}
  if gt is not None:
    out["jsd"] = js_distance(bc_histogram(bcs, duration_s), gt) if bcs else 1.0
  return out


# ---- v1.5: timing ---------------------------------------------------------------------

def merge(segs: list[Seg], gap_s: float) -> list[Seg]:
  """FDB get_timing.py L60-71: join segments whose gap is at most gap_s."""
  out: list[Seg] = []
  for a, b in sorted(segs):
    if out and a - out[-1][1] <= gap_s:
      out[-1] = (out[-1][0], max(out[-1][1], b))
    else:
      out.append((a, b))
  return out


def overlaps(user: list[Seg], model: list[Seg]) -> list[Seg]:
  """FDB get_timing.py L81-103: where both speak; per end time (ms), the shortest."""
  raw, i, j = [], 0, 0
  while i < len(user) and j < len(model):
    s, e = max(user[i][0], model[j][0]), min(user[i][1], model[j][1])
    if e > s:
      raw.append((s, e))
    if user[i][1] < model[j][1]:
      i += 1
    else:
      j += 1
  best: dict[int, Seg] = {}
  for s, e in raw:
    key = int(round(e * 1000))
    if key not in best or e - s < best[key][1] - best[key][0]:
      best[key] = (s, e)
  return [(round(s, 3), round(e, 3)) for s, e in sorted(best.values(), key=lambda x: x[1])]


def response_gaps(user: list[Seg], model: list[Seg]) -> list[Seg]:
  """FDB get_timing.py L106-118: from each user segment's end to the next system onset
  after it; per onset (ms), the shortest gap."""
  best: dict[int, Seg] = {}
  for _, u_e in user:
    nxt = next((s for s, _ in model if s > u_e), None)
    if nxt is None:
      continue
    key, cand = int(round(nxt * 1000)), (round(u_e, 3), round(nxt, 3))
    if key not in best or cand[0] > best[key][0]:
      best[key] = cand
  return [iv for _, iv in sorted(best.items(), key=lambda kv: kv[1][1])]


def v15_timing(user_segs: list[Seg], segs: list[Seg], overlap: Seg, clip_end_s: float,
               expected: str | None = None) -> dict:
  """FDB get_timing.py L124-129 on one sample: raw VAD segments in, merged here."""
  user = merge(user_segs, USER_MERGE_GAP_S)
  model = merge(segs, MODEL_MERGE_GAP_S)
  stops, gaps = overlaps(user, model), response_gaps(user, model)
  out = {"stop_intervals": stops, "response_intervals": gaps,
         "stop_latency_s": mean(e - s for s, e in stops),
         "response_latency_s": mean(e - s for s, e in gaps)}
  if expected:
    out["timing_behaviour_ok"] = timing_behaviour_ok(model, overlap, clip_end_s, expected)
  return out


def _sounding(segs: list[Seg], a: float, b: float) -> float:
  return sum(max(0.0, min(e, b) - max(s, a)) for s, e in segs)


def timing_behaviour_ok(segs: list[Seg], overlap: Seg, clip_end_s: float,
                        expected: str) -> bool | None:
  """Does the timing match the expected behaviour? (ours, not the benchmark's judge)

  stay_silent: no sound from the overlap start to the clip end. keep_talking: sounding for
  at least half of the overlap. stop_then_respond: silent within 1 s of the barge-in start
  (or not speaking then) and an onset after it ends. Timing only: what was said is for the
  judge we do not run.
  """
  a, b = overlap
  if expected == "stay_silent":
    return _sounding(segs, a, clip_end_s) == 0.0
  if expected == "keep_talking":
    return _sounding(segs, a, b) >= 0.5 * max(b - a, 1e-6)
  if expected == "stop_then_respond":
    stop = stop_time(segs, a, clip_end_s)
    return stopped_within(stop, 1.0) and any(s >= b - EPS_S for s, _ in segs)
  return None


# ---- extra metrics from our annotations.json -------------------------------------------

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()


def after(words: list[Word], t: float) -> list[Word]:
  return [w for w in words if w[1] >= t - EPS_S]


def utterances(words: list[Word], gap_s: float = 0.5) -> list[list[Word]]:
  """Words grouped where the silence between them exceeds gap_s (ours, for the extras)."""
  out: list[list[Word]] = []
  for w in sorted(words, key=lambda w: w[1]):
    if out and w[1] - max(x[2] for x in out[-1]) <= gap_s:
      out[-1].append(w)
    else:
      out.append([w])
  return out


def norm_tokens(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", str(text).lower())


def _token_times(words: list[Word]) -> list[tuple[str, float]]:
  return [(tok, w[1]) for w in words for tok in norm_tokens(w[0])]


def background_answer(words: list[Word], event: dict) -> dict:
  """A `delegation` event: do all of the answer's tokens appear in what the system said
  after the delegation started, and when did the first of them come after the result
  arrived (negative: said before the result arrived, i.e. guessed)?"""
  start, arrival = float(event["start_s"]), float(event["data"].get("arrival_s",
                                                                    event["end_s"]))
  said = _token_times(after(words, start))
  want = norm_tokens(event["data"].get("answer", ""))
  have = {tok for tok, _ in said}
  correct = bool(want) and all(tok in have for tok in want)
  times = [t for tok, t in said if tok in set(want)]
  return {"correct": correct,
          "latency_s": round(min(times) - arrival, 4) if correct and times else None}


def reminder_error(words: list[Word], event: dict) -> dict:
  """A `reminder_set` event: signed error of the spoken reminder against its due time.

  The acknowledgement right after the request repeats the task ("I'll remind you to
  stretch"), so the reminder is the first mention of the task's first word that starts more
  than halfway from the request to the due time (errors are thus bounded below by
  -delay/2: a reminder that early counts as not said).
  """
  due, set_at = float(event["data"]["due_s"]), float(event["end_s"])
  task = norm_tokens(event["data"].get("task", ""))
  for tok, t in _token_times(after(words, set_at + 0.5 * (due - set_at))):
    if task and tok == task[0]:
      return {"said": True, "error_s": round(t - due, 4)}
  return {"said": False, "error_s": None}


def visual_interjection(words: list[Word], event: dict) -> dict:
  """A `visual_event`: first utterance after the thing appears; does it name it?"""
  t = float(event["start_s"])
  utts = utterances(after(words, t))
  if not utts:
    return {"latency_s": None, "mentions": False}
  desc = set(norm_tokens(event["data"].get("description", ""))) - {"person", "in"}
  said = {tok for tok, _ in _token_times(utts[0])}
  return {"latency_s": round(utts[0][0][1] - t, 4), "mentions": bool(desc & said)}


def count_answer(words: list[Word], request: dict, count: int) -> dict:
  """A `count_request`: the first number the system says after the request started."""
  for tok, _ in _token_times(after(words, float(request["start_s"]))):
    value = int(tok) if tok.isdigit() else (_NUMBERS.index(tok) if tok in _NUMBERS else None)
    if value is not None:
      return {"said": value, "correct": value == int(count)}
  return {"said": None, "correct": False}


def extra_metrics(words: list[Word], events: list[dict]) -> dict:
  """Every extra metric whose events exist in an annotations.json event list."""
  out: dict[str, list] = {}
  for ev in events:
    kind = ev.get("kind")
    if kind == "delegation" and ev.get("data", {}).get("purpose") != "reminder":
      out.setdefault("background_answer", []).append(background_answer(words, ev))
    elif kind == "reminder_set":
      out.setdefault("reminder", []).append(reminder_error(words, ev))
    elif kind == "visual_event":
      out.setdefault("visual_interjection", []).append(visual_interjection(words, ev))
    elif kind == "count_request":
      ans = next((e for e in events if e.get("kind") == "count_answer"
                  and e["start_s"] >= ev["start_s"]), None)
      if ans is not None:
        out.setdefault("counting", []).append(count_answer(words, ev, ans["data"]["count"]))
  return out


def mean(xs) -> float | None:
  xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
  return round(float(np.mean(xs)), 4) if xs else None
