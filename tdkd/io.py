"""Atomic writes: every file and folder reaches its final path through a temp sibling.

A writer fills a temp file (or folder) in the destination's own folder and ``os.replace``s it
onto the destination, so a reader sees the old content or the new one, never a torn write; on
any error the temp is removed and the destination is left as it was.

- ``atomic_path(path)``: a context manager yielding the temp file path to fill.
- ``write_atomic(path, data)``: bytes or text, fsynced.
- ``write_json_atomic(path, data)``: JSON (indent 1, sorted keys).
- ``atomic_directory(path)``: a context manager yielding the temp folder to fill.
- ``replace_directory(tmp, path)``: move a filled folder into place (an old one is moved
  aside first, then deleted).
- ``file_sha256(path)``: the hex SHA-256 of a file's bytes, read in chunks (what every
  manifest here records and validates on read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "atomic_path",
    "file_sha256",
    "replace_directory",
    "write_atomic",
    "write_json_atomic",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file next to ``path``; on a clean exit it replaces ``path``, else it is removed.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("hi")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('hi', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically, fsynced before the rename."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(
    path: str | os.PathLike,
    data: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """``json.dump(data)`` to ``path`` atomically (arguments as ``json.dumps``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=indent, sort_keys=sort_keys, default=default)


def replace_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the filled folder ``tmp`` to ``path``; an existing ``path`` is moved aside first."""
    path = Path(path)
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=path.parent))
        os.replace(path, trash / path.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; on a clean exit it replaces ``path``, else it is
    removed (the temp is named ``.tmp-<name>-*``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (streamed, so any size reads in constant memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
