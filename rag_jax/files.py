"""Writing a file so that a crash never leaves half of it: write a temporary file beside it, then
rename it over the target (atomic on POSIX). Every file the package writes goes through here."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any


def write_text(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def copy(source: str, target: str) -> None:
  shutil.copyfile(source, target + '.tmp')
  os.replace(target + '.tmp', target)
