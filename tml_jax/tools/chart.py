"""The generative-UI example: render a small chart PNG from numbers the background model wrote."""

from __future__ import annotations

import io
import os
import re


def chart(args: str, ctx) -> str:
  """'title; 3, 5, 2, 8' (optionally 'label=value' pairs) -> PNG path in ctx.out_dir/charts."""
  title, _, data = str(args).rpartition(";") if ";" in str(args) else ("chart", "", str(args))
  pairs = re.findall(r"([A-Za-z][\w ]*?)\s*=\s*(-?\d+(?:\.\d+)?)", data)
  if pairs:
    labels, values = [p[0].strip() for p in pairs], [float(p[1]) for p in pairs]
  else:
    values = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", data)]
    labels = [str(i + 1) for i in range(len(values))]
  if not values:
    raise ValueError(f"no numbers to chart in {args!r}; write e.g. 'sales; 3, 5, 2'")
  # A Figure of its own (not pyplot): no global backend switch, safe in a worker thread.
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4, 3), dpi=100)
  ax = fig.subplots()
  ax.bar(labels, values, color="#3182bd")
  ax.set_title(title.strip() or "chart")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  # Written through the call's context: a call that has timed out writes nothing.
  path = ctx.write_file(os.path.join("charts", f"chart_{ctx.next_id('chart'):03d}.png"),
                        buf.getvalue())
  return f"chart saved: {path}"
