"""Paths and files. Every path the package reads or writes goes through `etils.epath`, so a
workdir, an export or a data_dir may be a local directory or a cloud path (gs://, s3://...).

Local files are written so that a crash never leaves half of one: a temporary file beside it,
then a rename over the target (atomic on POSIX). Objects in a cloud store appear whole when their
upload ends, so there they are written directly (a rename there would be a copy)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import tempfile
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """An epath.Path; 'file://' URIs name local paths; '~' is expanded."""
  if isinstance(p, str):
    if p.startswith('file://'):
      p = p[len('file://'):]
    if not is_local(p):
      return epath.Path(p)
    return epath.Path(os.path.expanduser(p))
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  s = os.fspath(p)
  return '://' not in s or s.startswith('file://')


def local(p: PathLike) -> str:
  """The path as the local filesystem names it (for libraries that take only local files), or
  a ValueError naming what needs a local path."""
  p = path(p)
  if not is_local(p):
    raise ValueError(f'{p} is not a local path')
  return os.fspath(p)


def write_bytes(target: PathLike, data: bytes) -> None:
  target = path(target)
  if not is_local(target):
    target.write_bytes(data)
    return
  # A name of this process's own: several processes may write the same file (the last wins).
  tmp = epath.Path(f'{os.fspath(target)}.{socket.gethostname()}.{os.getpid()}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(target: PathLike, text: str) -> None:
  write_bytes(target, text.encode('utf-8'))


def write_json(target: PathLike, obj: Any, indent: int | None = 2) -> None:
  write_text(target, json.dumps(obj, indent=indent))


def read_json(source: PathLike) -> Any:
  return json.loads(path(source).read_text())


def copy(source: PathLike, target: PathLike) -> None:
  write_bytes(target, path(source).read_bytes())


# The hosts a cloud path's store answers on: probed once per process before its first use, so
# that a machine without a network, or a firewall, is named in seconds (TensorFlow's gfile
# retries for minutes and ends in a traceback).
ENDPOINTS = {'gs': 'storage.googleapis.com', 's3': 's3.amazonaws.com'}


@functools.cache
def unreachable(host: str, timeout_s: float = 5.0) -> str | None:
  """Why `host` does not accept a connection on port 443 within `timeout_s` ('gaierror: ...'),
  or None; asked once per process."""
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
  except OSError as e:
    return f'{type(e).__name__}: {e}'
  return None


def check_reachable(p: PathLike, timeout_s: float = 5.0) -> None:
  """A cloud path's store answers and the path can be looked up (credentials, bucket): else one
  OSError naming the path and the cause. Local paths pass at once."""
  if is_local(p):
    return
  text = os.fspath(p)
  host = ENDPOINTS.get(text.split('://', 1)[0])
  problem = host and unreachable(host, timeout_s)
  if problem:
    raise OSError(f'{text}: {host} cannot be reached ({problem}); check the network, or use a '
                  'local path.')
  try:
    path(p).exists()
  except Exception as e:  # pylint: disable=broad-except  (TensorFlow's and fsspec's own errors)
    cause = (str(e).strip().splitlines() or [''])[0]
    raise OSError(f'{text}: cannot be looked up ({type(e).__name__}: {cause}).') from None


# os.path-style helpers over epath, for the package's own checks.
def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def listdir(p: PathLike) -> list[str]:
  return [child.name for child in path(p).iterdir()]


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def remove(p: PathLike) -> None:
  path(p).unlink()


def rmtree(p: PathLike) -> None:
  path(p).rmtree()


def getsize(p: PathLike) -> int:
  return path(p).stat().length


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def absolute(p: PathLike) -> str:
  """An absolute local path, or the URI unchanged."""
  return os.path.abspath(os.fspath(path(p))) if is_local(p) else os.fspath(path(p))


@contextlib.contextmanager
def local_copies(*paths: PathLike):
  """Local file names for `paths` (for libraries that open only local files): the paths
  themselves when local, else copies in a temporary directory for the `with` block."""
  if all(is_local(p) for p in paths):
    yield [os.fspath(path(p)) for p in paths]
    return
  with tempfile.TemporaryDirectory() as tmp:
    out = []
    for i, p in enumerate(paths):
      out.append(os.path.join(tmp, f'{i}_{path(p).name}'))
      if path(p).exists():
        write_bytes(out[-1], path(p).read_bytes())
    yield out


@contextlib.contextmanager
def local_dir(directory: PathLike):
  """A local directory to write into whose files land in `directory` when the block ends (the
  directory itself when local)."""
  if is_local(directory):
    makedirs(directory)
    yield os.fspath(path(directory))
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    for name in os.listdir(tmp):
      write_bytes(path(directory) / name, epath.Path(tmp, name).read_bytes())
