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
           *(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
             if f.endswith(".md"))]
  for p in paths:
    text = open(p).read()
    # Spelled in pieces so that this file does not match its own search.
    for needle in ("DESIGN" + " §", "DESIGN" + ".md", "STYLE" + ".md", ".." + "/shared"):
      if needle in text:
        bad.append((os.path.relpath(p, ROOT), needle))
  assert not bad, bad


def _fake_setup(tmp_path, pip_rc: int):
  """scripts/setup.sh copied beside a fake .venv/bin/python whose `pip install` exits pip_rc."""
  (tmp_path / "scripts").mkdir()
  (tmp_path / "scripts" / "setup.sh").write_text(open(os.path.join(ROOT, "scripts",
                                                                   "setup.sh")).read())
  fake = tmp_path / ".venv" / "bin" / "python"
  fake.parent.mkdir(parents=True)
  fake.write_text("#!/usr/bin/env bash\n"
                  'if [ "$2" = pip ]; then echo "ERROR: No matching distribution for '
                  f'jax==99 (fake)" >&2; exit {pip_rc}; fi\n'
                  'echo "fake python $*"\n')
  fake.chmod(0o755)
  return subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True,
                        text=True)


def test_setup_stops_on_a_failed_pip_install_with_pips_message(tmp_path):
  p = _fake_setup(tmp_path, pip_rc=1)
  assert p.returncode != 0
  assert "No matching distribution for jax==99" in p.stderr
  assert "pip install failed" in p.stderr
  assert "fake python -c" not in p.stdout  # nothing after the failed install ran


def test_setup_goes_on_after_a_good_install(tmp_path):
  p = _fake_setup(tmp_path, pip_rc=0)
  assert p.returncode == 0, p.stderr
  assert "fake python -c" in p.stdout
