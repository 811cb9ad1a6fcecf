"""What a compiled program says about itself: memory, cost, collectives, big buffers.

Collectives and buffers are read from the optimised HLO text (`compiled.as_text()`).
Collectives are counted per execution: one inside a while body with a known trip count (the
scan over layers) counts that many times. XLA's own cost analysis does not do this: its
FLOPs and bytes count a loop body once.
"""

from __future__ import annotations

import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
# `  %name = TYPE op(...)` or `  ROOT name = TYPE op(...)`; TYPE may be a tuple.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def array_bytes(type_text: str) -> list[int]:
  """Bytes of every array in an HLO type (`bf16[8,128]{1,0}` or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(int(n * DTYPE_BYTES[dtype]))
  return out


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"%?([\w.\-]+)\s*=\s*s(?:32|64)\[\][^=]*?constant\((\d+)\)")
_LESS_THAN = re.compile(r"ROOT .*compare\([^,]+,\s*%?([\w.\-]+)\),\s*direction=LT")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  lines_of, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      lines_of[current] = []
      entry = current if m.group(1) else entry
    elif current is not None:
      lines_of[current].append(line)
  return lines_of, entry


def instructions(hlo_text: str):
  """(computation, name, op, result bytes, op_name metadata) for every instruction."""
  for comp, lines in computations(hlo_text)[0].items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      name, type_text, op = m.groups()
      meta = _OP_NAME.search(line)
      yield comp, name, op, array_bytes(type_text), meta.group(1) if meta else ""


def executions(hlo_text: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while body runs its
  trip count times its caller (a scan over 48 layers: 48), a call or branch once."""
  lines_of, entry = computations(hlo_text)
  runs: dict[str, int] = {}

  def trip_count(line) -> int:
    """known_trip_count (XLA:CPU/GPU annotate it), else the constant bound of the loop
    condition `i < N` (XLA:TPU's HLO: jax's scans and fori_loops count 0, 1, ..., N-1)."""
    trip = _TRIP.search(line)
    if trip:
      return int(trip.group(1))
    cond = _CONDITION.search(line)
    body = lines_of.get(cond.group(1), ()) if cond else ()
    consts = dict(_CONSTANT.findall("\n".join(body)))
    for b in body:
      m = _LESS_THAN.search(b)
      if m and m.group(1) in consts:
        return int(consts[m.group(1)])
    return 1

  def visit(name, times):
    runs[name] = runs.get(name, 0) + times
    for line in lines_of.get(name, ()):
      callees = _CALLEE.findall(line)
      for b in _BRANCHES.findall(line):
        callees += [c.strip().lstrip("%") for c in b.split(",")]
      body = _BODY.search(line)
      for callee in callees:
        if callee in lines_of:
          loop = body is not None and callee == body.group(1)
          visit(callee, times * (trip_count(line) if loop else 1))

  if entry is not None:
    visit(entry, 1)
  return runs


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes", "static_count"}} per device and step: each collective times
  the runs of the computation holding it (`executions`; one reached no other way counts
  once), and `static_count` as written. An async pair (`all-gather-start` / `-done`) counts
  once, at its start, by its largest buffer (the gathered result; the tuple also holds the
  operand)."""
  runs = executions(hlo_text)
  out: dict[str, dict] = {}
  for comp, _, op, sizes, _ in instructions(hlo_text):
    if op.endswith("-done"):
      continue
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES:
      continue
    size = (max(sizes) if op.endswith("-start") else sum(sizes)) if sizes else 0
    times = max(runs.get(comp, 1), 1)
    entry = out.setdefault(kind, {"count": 0, "bytes": 0, "static_count": 0})
    entry["count"] += times
    entry["bytes"] += size * times
    entry["static_count"] += 1
  return dict(sorted(out.items()))


def largest_values(hlo_text: str, n: int = 8) -> list[dict]:
  """The `n` biggest instruction results (bytes per device) with the jax op that made them:
  what to look at first when temporaries do not fit."""
  seen = []
  for _, name, op, sizes, op_name in instructions(hlo_text):
    if op in ("parameter", "tuple", "get-tuple-element", "bitcast") or not sizes:
      continue
    seen.append(dict(bytes=max(sizes), hlo=name, op=op, source=op_name[-160:]))
  seen.sort(key=lambda d: -d["bytes"])
  return seen[:n]


def memory(compiled) -> dict:
  """Per-device bytes from `compiled.memory_analysis()`; `total` is what must fit at once
  (outputs aliased to donated arguments are counted once)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
             aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
             generated_code=int(m.generated_code_size_in_bytes))
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["generated_code"])
  return out


def cost(program) -> dict:
  """FLOPs and bytes accessed from XLA's cost analysis: per device for a compiled program,
  for the whole computation for a lowered one. A loop body counts once whatever its trip
  count, and Pallas kernels (custom calls) count as nothing: the plan's analytic FLOPs
  (tml_jax.flops) are the ones MFU is stated with."""
  c = program.cost_analysis()
  if isinstance(c, (list, tuple)):  # older jax: one dict per program
    c = c[0] if c else {}
  c = c or {}
  return dict(flops=float(c.get("flops", 0.0)),
              bytes_accessed=float(c.get("bytes accessed", 0.0)),
              transcendentals=float(c.get("transcendentals", 0.0)))


_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available "
                  r"HBM \(([\d.]+)([KMGT]?)\)")


def parse_oom(message: str) -> dict | None:
  """The figures in XLA:TPU's RESOURCE_EXHAUSTED compile error, in bytes."""
  m = _OOM.search(message)
  if not m:
    return None
  unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  return dict(temporaries=int(float(m.group(1)) * unit[m.group(2)]),
              hbm=int(float(m.group(3)) * unit[m.group(4)]))
