"""Run and data folders that may be remote: `gs://bucket/run` stays a bucket path.

`os.path.abspath("gs://b/x")` is `./gs:/b/x` and `open`/`os.makedirs` would then write the
run to the local disk without a word. Every place that touches a workdir or data dir goes
through here instead, which uses `etils.epath` (tf.io.gfile or fsspec underneath, as orbax
and TFDS do) for remote URIs (gs://, s3://, az://, ...) and plain paths for local folders.
`file:///abs/path` is a local path written as a URL.

Remote files have no append: `append_line` rewrites the file (metrics logs stay small).
"""

from __future__ import annotations

import json
import os
import re

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


def is_remote(path) -> bool:
  """A URI other than file:// (gs://, s3://, ...)."""
  m = _URI.match(str(path))
  return bool(m) and m.group(1).lower() != "file"


def resolve(path) -> str:
  """The canonical spelling of a folder: remote URIs unchanged, file:// URLs and relative
  local paths as absolute local paths."""
  path = os.fspath(path) if not isinstance(path, str) else path
  if is_remote(path):
    return path.rstrip("/")
  if path.lower().startswith("file://"):
    path = path[len("file://"):]
    if not path.startswith("/"):
      raise ValueError(f"{path!r}: a file:// URL needs an absolute path (file:///abs/dir)")
  return os.path.abspath(path)


def join(base, *parts) -> str:
  base = resolve(base)
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(str(p).strip("/") for p in parts)])
  return os.path.join(base, *map(str, parts))


def parent(path) -> str:
  path = resolve(path)
  if is_remote(path):
    head, _, tail = path.rstrip("/").rpartition("/")
    if _URI.fullmatch(head + "/"):  # gs://bucket has no parent folder in the bucket
      raise ValueError(f"{path!r} is a bucket root; use a folder inside it (gs://b/runs/x)")
    return head
  return os.path.dirname(path)


def _epath(path):
  from etils import epath
  return epath.Path(path)


def exists(path) -> bool:
  path = resolve(path)
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  path = resolve(path)
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path) -> str:
  path = resolve(path)
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)
  return path


def listdir(path) -> list[str]:
  path = resolve(path)
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def open_file(path, mode: str = "r"):
  """A file object (text unless mode has 'b'); parent folders are made when writing."""
  path = resolve(path)
  if any(m in mode for m in "wa"):
    makedirs(parent(path))
  return _epath(path).open(mode) if is_remote(path) else open(path, mode)


def read_text(path) -> str:
  with open_file(path) as f:
    return f.read()


def write_text(path, text: str):
  with open_file(path, "w") as f:
    f.write(text)


def write_bytes(path, data: bytes):
  with open_file(path, "wb") as f:
    f.write(data)


def read_json(path):
  return json.loads(read_text(path))


def write_json(path, obj, indent: int = 1):
  write_text(path, json.dumps(obj, indent=indent))


def append_line(path, line: str):
  """Appends one line; a remote file, which cannot be appended to, is rewritten."""
  path = resolve(path)
  if not is_remote(path):
    with open_file(path, "a") as f:
      f.write(line + "\n")
    return
  old = read_text(path) if exists(path) else ""
  write_text(path, old + line + "\n")


def replace(src, dst):
  """Renames src to dst (a copy then a delete on stores without rename)."""
  src, dst = resolve(src), resolve(dst)
  if is_remote(src) or is_remote(dst):
    _epath(src).rename(dst)
  else:
    os.replace(src, dst)


def save_figure(fig, path) -> str:
  """A matplotlib Figure as PNG at `path` (local or remote); returns the path."""
  path = resolve(path)
  if not is_remote(path):
    makedirs(parent(path))
    fig.savefig(path)
    return path
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  write_bytes(path, buf.getvalue())
  return path


def local_folder(path, root: str = "runs/remote") -> str:
  """`path` itself when local; for a remote one, a local folder that mirrors its name under
  `root` (for tools that can only write local files, such as audio writers)."""
  path = resolve(path)
  if not is_remote(path):
    return path
  return os.path.abspath(os.path.join(root, _URI.sub(lambda m: m.group(1) + "/", path)))
