"""Module import graph of tml_jax/ and kernels_pallas/: arrow count, cycles, largest files.

    python scripts/import_graph.py [--dot=graph.dot]

Every `import` / `from ... import` inside the two packages counts, function-level (lazy)
imports included: a lazy import hides a cycle from Python, not from a reader.
"""

import ast
import os
import sys

ROOTS = ("tml_jax", "kernels_pallas")


def modules(repo):
  out = {}
  for root in ROOTS:
    for d, _, files in os.walk(os.path.join(repo, root)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(d, f)
          mod = os.path.relpath(path, repo)[:-3].replace(os.sep, ".")
          out[mod.removesuffix(".__init__")] = path
  return out


def edges(repo):
  mods = modules(repo)
  graph = {m: set() for m in mods}
  for mod, path in mods.items():
    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
      for n in names:
        while n and n not in mods:
          n = n.rpartition(".")[0]
        if n and n != mod and not mod.startswith(n + "."):  # a package's own __init__ is not an edge
          graph[mod].add(n)
  return graph


def cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1
    stack.append(v); on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w); low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop(); on.discard(w); comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in graph:
    if v not in index:
      visit(v)
  return out


def main():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  graph = edges(repo)
  cyc = cycles(graph)
  print(f"modules: {len(graph)}, import arrows: {sum(map(len, graph.values()))}, "
        f"cycles: {len(cyc)}")
  for c in cyc:
    print("  cycle:", " <-> ".join(c))
  sizes = sorted(((sum(1 for _ in open(p)), p) for p in modules(repo).values()), reverse=True)
  print("largest files:", ", ".join(f"{os.path.relpath(p, repo)} ({n})" for n, p in sizes[:5]))
  for arg in sys.argv[1:]:
    if arg.startswith("--dot="):
      with open(arg[6:], "w") as f:
        f.write("digraph imports {\n")
        for a, bs in sorted(graph.items()):
          for b in sorted(bs):
            f.write(f'  "{a}" -> "{b}";\n')
        f.write("}\n")
  return 1 if cyc else 0


if __name__ == "__main__":
  sys.exit(main())
