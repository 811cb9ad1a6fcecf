"""The repository's shape: no import cycles, files a reader can hold, docs users have."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles():
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "import_graph.py")],
                     capture_output=True, text=True)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "cycles: 0" in p.stdout


def _sources():
  for top in ("tml_jax", "kernels_pallas", "configs", "benchmarks", "tests", "scripts"):
    for d, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          yield os.path.join(d, f)


def test_no_source_file_over_600_lines():
  long = {os.path.relpath(p, ROOT): n for p in _sources()
          if (n := sum(1 for _ in open(p))) > 600}
  assert not long, long


def test_code_and_docs_cite_only_what_users_have():
  """Users get this repository, not the design notes it was planned from."""
  bad = []
  paths = [*_sources(), os.path.join(ROOT, "README.md"),
           *(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")))]
  for p in paths:
    text = open(p).read()
    # Spelled in pieces so that this file does not match its own search.
    for needle in ("DESIGN" + " §", "DESIGN" + ".md", "STYLE" + ".md", ".." + "/shared"):
      if needle in text:
        bad.append((os.path.relpath(p, ROOT), needle))
  assert not bad, bad
