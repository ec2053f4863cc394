"""Files that are either all there or not there: write to a temporary name, fsync, rename.

Every output of edgeenc goes through here (tables, the bundle's manifest, resume parts, Parquet shards,
clips, TensorRT engines), so a crash or a power cut leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside `path`; on success it is fsynced and renamed over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # Created through os.open so the final file gets the usual umask permissions, not mkstemp's 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself survive a power cut; not possible on every OS, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator[TextIO]:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    with atomic_text(path) as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")
