#!/usr/bin/env bash
# Create (once) and update the project's virtual environment in .venv with Python 3.12,
# pinned to constraints.txt (the JAX version of the project's GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 \
              /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$cand" ] || continue
    if "$cand" -c 'import sys; assert sys.version_info[:2] >= (3, 12)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  # pyenv installs 3.12 but may not put it on PATH as the global version.
  if command -v pyenv >/dev/null; then
    local v; v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3"; return 0; fi
  fi
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found; install it or set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup.sh: creating .venv with $PY ($("$PY" --version))"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
# Idempotent: a no-op apart from the resolver check when everything is installed.
# pip's log is filtered for one harmless notice, but its exit status is kept: a failed
# install stops the set-up here, with pip's whole message.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,tf]" >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup.sh: pip install failed (its output is above); fix the cause and rerun" >&2
  exit 1
fi
grep -v -e "is ignored: it is neither" -e "^$" "$log" || true
.venv/bin/python -c 'import jax, flax, tml_jax; print(f"setup.sh: jax {jax.__version__}, flax {flax.__version__}, {jax.devices()[0].platform}")'
