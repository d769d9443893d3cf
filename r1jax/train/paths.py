"""Run-directory file access for local paths and object stores (gs://, s3://) alike.

A workdir may be a bucket path on Cloud TPU, where every host writes the same run. Local paths
go through the OS; `scheme://` paths through etils.epath (fsspec: `gcsfs` for gs://, in the `tpu`
and `gcs` extras). Orbax and tensorstore read and write the checkpoints of either kind
themselves. Object stores cannot append, so `append_lines` rewrites the object: callers batch.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """An absolute local path, or the URL unchanged (os.path.abspath would mangle `gs://`)."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  if is_remote(path):
    return "/".join([str(path).rstrip("/"), *parts])
  return os.path.join(path, *parts)


def _p(path: str) -> epath.Path:
  return epath.Path(path)


def exists(path: str) -> bool:
  return _p(path).exists()


def isdir(path: str) -> bool:
  return _p(path).is_dir()


def listdir(path: str) -> list[str]:
  return sorted(p.name for p in _p(path).iterdir())


def makedirs(path: str) -> None:
  _p(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return _p(path).read_text()


def write_text(path: str, text: str) -> None:
  """Writes whole; local files through a temporary name and a rename (never half-written)."""
  if is_remote(path):
    _p(path).write_text(text)  # an object appears whole when its upload completes
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def append_lines(path: str, lines: list[str]) -> None:
  """Appends lines (each ending in a newline); on an object store by rewriting the object."""
  if not lines:
    return
  if not is_remote(path):
    with open(path, "a") as f:
      f.writelines(lines)
    return
  before = read_text(path) if exists(path) else ""
  write_text(path, before + "".join(lines))


def rename(source: str, target: str) -> None:
  _p(source).rename(target)
