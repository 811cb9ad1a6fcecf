"""A benchmark sample cut from a conversation: what export_fdb and export_tasks plan."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Sample:
  """One benchmark sample cut from a conversation (times in seconds from its start)."""
  end_s: float                       # input.wav length
  json_files: dict[str, object]      # file name -> content
  expected: dict
  silence_from: float | None = None  # zero the input from here on (other people's later turns)
  overlaps: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # v1.5
  extra_wavs: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  video: bool = False  # write video.npy: what the camera shows (behaviour samples)


def next_speech(conv, after: float) -> float:
  """Start of the next user/other word after `after` (the end of what a sample may keep)."""
  starts = [w.start_s for w in conv.words if w.speaker != "model" and w.start_s > after + 0.01]
  return min(starts, default=conv.duration_s)
