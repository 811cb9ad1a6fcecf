r"""Full-Duplex-Bench metrics, implemented here from the published definitions, plus ours.

Every function takes plain timelines, so each can be checked on a hand-made example:
`words` is what the system said, [(text, start_s, end_s)] (the benchmark transcribes
output.wav with an ASR; we read the system's own output.json word timestamps instead),
`segs` is when it made sound, [(start_s, end_s)] from `tml_jax.eval.vad` on output.wav.

Full-Duplex-Bench v1 (Lin et al., arXiv 2503.04721), as we read it:
- Takeover (TOR). A system takes the turn when it says something that is not a backchannel.
  Words are grouped into utterances (a gap of more than `UTTERANCE_GAP_S` starts a new one); an
  utterance of at most `BACKCHANNEL_MAX_WORDS` words lasting under `BACKCHANNEL_MAX_S` is a
  backchannel ("mm-hmm", "I see"), anything longer a takeover. An utterance still going at
  the clip end (its last word ends within `OPEN_TOL_S` of it) is a takeover whatever its
  length so far: a backchannel is short and over, and our pause-handling clips end 0.5-1 s
  into the pause, which cuts any reply to a word or two. TOR is the fraction of samples
  with a takeover. Pause handling: anywhere in the clip (the user only pauses; lower is
  better). Smooth turn-taking: after the user's turn end (turn_taking.json timestamp[0];
  higher is better). User interruption: after the barge-in ends (interrupt.json timestamp[1];
  higher is better). Backchannel: utterances that start during the user's monologue (lower
  is better); the benchmark's clips are the monologue, ours run 1 s past its end, so the
  harness passes the end of the user's turn (annotations.json, else the end of the last
  speech the VAD finds in input.wav).
- Latency. Turn-taking: start of the first takeover utterance minus the turn end, over the
  samples with a takeover. Interruption: the same from the end of the barge-in.
- Backchannel frequency: backchannel utterances per second of clip. JSD: the system's
  backchannels as a histogram over 0.2 s windows (every window an utterance touches counts
  one), normalised after adding 1e-10 to every bin, against the reference distribution of the
  sample (the export's gt_distribution.json); Jensen-Shannon divergence in bits (0 = same
  timing, 1 = disjoint), averaged over samples. A system without backchannels gets the flat
  histogram (as the epsilon makes it).
- Judge scores (interruption relevance by GPT-4o) are not computed: no LLM judge runs here.

Full-Duplex-Bench v1.5 (Lin et al., arXiv 2507.23159), timing part: with a VAD on the
system's audio, the stop latency is how long the system keeps sounding after the overlapping
speech starts (only when it was speaking then; a segment still open at the clip end is
censored there and flagged), and the response latency is the first onset after the
overlapping speech ends minus that end. Its behaviour categories (respond / resume /
uncertain ...) come from an LLM judge on transcripts and are not computed; instead
`timing_behaviour_ok` checks the behaviour our annotations expect by timing alone.

Ours: `stop_s` for v1 interruptions (the v1.5 stop latency applied to the v1 task);
background-answer accuracy and latency, reminder timing error, visual-interjection latency
and repetition-count accuracy from annotations.json events (`delegation`, `reminder_set`,
`visual_event`, `count_request`/`count_answer`).

Not sure of (from memory of the papers, no code read): the exact backchannel rule (word
count and 1 s thresholds), the utterance gap, whether v1 latency starts at the first word or
the first non-backchannel utterance (we use the latter), and whether JSD is in bits.
"""

from __future__ import annotations

import math
import re

import numpy as np

Word = tuple[str, float, float]
Seg = tuple[float, float]

UTTERANCE_GAP_S = 0.5
BACKCHANNEL_MAX_WORDS = 2
BACKCHANNEL_MAX_S = 1.0
BC_WINDOW_S = 0.2
OPEN_TOL_S = 0.1
EPS_S = 1e-6  # "at the boundary" counts as after it: a word starting at the turn end is in


def words_from_output(output: dict) -> list[Word]:
  """output.json ({"text", "chunks": [{"text", "timestamp": [s, e]}]}) -> sorted words."""
  words = []
  for c in output.get("chunks") or []:
    ts = c.get("timestamp") or [None, None]
    if ts[0] is None or not str(c.get("text", "")).strip():
      continue
    end = ts[1] if ts[1] is not None else ts[0]
    words.append((str(c["text"]).strip(), float(ts[0]), float(end)))
  return sorted(words, key=lambda w: w[1])


def utterances(words: list[Word], gap_s: float = UTTERANCE_GAP_S) -> list[list[Word]]:
  out: list[list[Word]] = []
  for w in sorted(words, key=lambda w: w[1]):
    if out and w[1] - max(x[2] for x in out[-1]) <= gap_s:
      out[-1].append(w)
    else:
      out.append([w])
  return out


def is_backchannel(utt: list[Word], clip_end_s: float | None = None) -> bool:
  if clip_end_s is not None and max(w[2] for w in utt) >= clip_end_s - OPEN_TOL_S:
    return False  # cut by the clip end: we cannot tell how long it would have gone on
  n = sum(len(w[0].split()) for w in utt)
  return n <= BACKCHANNEL_MAX_WORDS and utt[-1][2] - utt[0][1] < BACKCHANNEL_MAX_S


def after(words: list[Word], t: float) -> list[Word]:
  return [w for w in words if w[1] >= t - EPS_S]


def takeover(words: list[Word], t: float = 0.0, clip_end_s: float | None = None
             ) -> tuple[bool, float | None]:
  """(took the turn after time t, start of the first takeover utterance - t)."""
  for utt in utterances(after(words, t)):
    if not is_backchannel(utt, clip_end_s):
      return True, round(max(0.0, utt[0][1] - t), 4)
  return False, None


def pause_handling(words: list[Word], clip_end_s: float | None = None) -> dict:
  return {"takeover": takeover(words, 0.0, clip_end_s)[0]}


def turn_taking(words: list[Word], turn_end_s: float, clip_end_s: float | None = None
                ) -> dict:
  took, latency = takeover(words, turn_end_s, clip_end_s)
  return {"takeover": took, "latency_s": latency}


def interruption(words: list[Word], segs: list[Seg], start_s: float, end_s: float,
                 clip_end_s: float) -> dict:
  took, latency = takeover(words, end_s, clip_end_s)
  return {"takeover": took, "latency_s": latency, **stop_time(segs, start_s, clip_end_s)}


def stop_time(segs: list[Seg], t: float, clip_end_s: float, *, tol_s: float = 0.02) -> dict:
  """How long sound that is on at time t goes on: {"speaking", "stop_s", "censored"}.

  tol_s: a segment ending within one frame of the clip end never stopped inside the clip.
  """
  seg = next(((a, b) for a, b in segs if a <= t + EPS_S and b > t), None)
  if seg is None:
    return {"speaking": False, "stop_s": None, "censored": False}
  return {"speaking": True, "stop_s": round(seg[1] - t, 4),
          "censored": bool(seg[1] >= clip_end_s - tol_s)}


def first_onset(segs: list[Seg], t: float) -> float | None:
  starts = [a for a, _ in segs if a >= t - EPS_S]
  return round(min(starts) - t, 4) if starts else None


def bc_histogram(spans: list[Seg], duration_s: float) -> np.ndarray:
  hist = np.zeros(int(duration_s / BC_WINDOW_S) + 1)
  for a, b in spans:
    hist[int(a / BC_WINDOW_S):int(b / BC_WINDOW_S) + 1] += 1
  hist += 1e-10
  return hist / hist.sum()


def jsd_bits(p, q) -> float:
  """Jensen-Shannon divergence (base 2) of two histograms; the shorter is zero-padded."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  if p.ndim != 1 or q.ndim != 1 or not len(p) or not len(q):
    raise ValueError(f"jsd_bits wants two non-empty 1-D histograms, got shapes {p.shape}, "
                     f"{q.shape}")
  n = max(len(p), len(q))
  p, q = np.pad(p, (0, n - len(p))), np.pad(q, (0, n - len(q)))
  p, q = p / p.sum(), q / q.sum()
  m = 0.5 * (p + q)
  kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))
  return round(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)), 6)


def backchannel(words: list[Word], duration_s: float, gt=None,
                monologue_end_s: float | None = None) -> dict:
  """monologue_end_s: where the user's long turn ends (default: the clip end); what starts
  after it is a reply to a finished turn, neither a takeover nor a backchannel."""
  end = duration_s if monologue_end_s is None else monologue_end_s
  utts = [u for u in utterances(words) if u[0][1] < end]
  bcs = [(u[0][1], u[-1][2]) for u in utts if is_backchannel(u, duration_s)]
  out = {"takeover": len(bcs) < len(utts), "n_bc": len(bcs),
         "freq": round(len(bcs) / duration_s, 4) if duration_s > 0 else None}
  if gt is not None:
    out["jsd"] = jsd_bits(bc_histogram(bcs, duration_s), gt)
  return out


def v15_timing(segs: list[Seg], overlap: Seg, clip_end_s: float,
               expected: str | None = None) -> dict:
  """FD-bench v1.5 stop / response latency around one overlap, and our timing check."""
  stop = stop_time(segs, overlap[0], clip_end_s)
  out = {"speaking_at_onset": stop["speaking"], "stop_latency_s": stop["stop_s"],
         "censored": stop["censored"], "response_latency_s": first_onset(segs, overlap[1])}
  if expected:
    out["timing_behaviour_ok"] = timing_behaviour_ok(segs, overlap, clip_end_s, expected)
  return out


def _sounding(segs: list[Seg], a: float, b: float) -> float:
  return sum(max(0.0, min(e, b) - max(s, a)) for s, e in segs)


def timing_behaviour_ok(segs: list[Seg], overlap: Seg, clip_end_s: float,
                        expected: str) -> bool | None:
  """Does the timing match the expected behaviour? (our check, not the benchmark's judge)

  Timing only: a cascade that answers each of the user's backchannels also "keeps talking"
  by this test; what was said is for the judge we do not run.

  stay_silent: no sound from the overlap start to the clip end. keep_talking: sounding for
  at least half of the overlap. stop_then_respond: silent within 1 s of the barge-in start
  (or not speaking then) and an onset after it ends.
  """
  a, b = overlap
  if expected == "stay_silent":
    return _sounding(segs, a, clip_end_s) == 0.0
  if expected == "keep_talking":
    return _sounding(segs, a, b) >= 0.5 * max(b - a, 1e-6)
  if expected == "stop_then_respond":
    stop = stop_time(segs, a, clip_end_s)
    stopped = not stop["speaking"] or (stop["stop_s"] <= 1.0 and not stop["censored"])
    return stopped and first_onset(segs, b) is not None
  return None


# ---- extra metrics from our annotations.json -------------------------------------------

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()


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
    if kind == "delegation":
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
