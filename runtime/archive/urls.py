"""Recordings named by URL (``s3://bucket/prefix``, ``gs://``, ``file:///abs/path``, ...) through pyarrow's filesystems.

`--engine ray` reads an archive where it lies: the driver lists and probes the files, each worker decodes
its own ranges, all through `pyarrow.fs` (so the credentials and options pyarrow finds for a scheme apply).
A URL names its file everywhere: in errors, in failures.parquet and in the output's `file` column.
pyarrow is imported only when a URL is given (it comes with the ray extra).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np

from ..audio import AUDIO_SUFFIXES, AudioError, AudioInfo, iter_blocks, probe


def is_url(source: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(source)


def _filesystem(url: str):
    from pyarrow.fs import FileSystem

    try:
        return FileSystem.from_uri(url)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise AudioError(url, f"pyarrow cannot open this URL: {exc}") from None


def list_url(url: str) -> list[tuple[str, int, int]]:
    """(url, size, mtime_ns) of the file at `url`, or of every audio file under the folder at `url`.

    A folder is walked as local folders are (sorted, recursive, audio suffixes, no dot files or folders); the
    files' URLs are `url` followed by their path below it. Raises :class:`AudioError` naming `url` when nothing
    is there or it cannot be listed.
    """
    from pyarrow.fs import FileSelector, FileType

    fs, root = _filesystem(url)
    try:
        info = fs.get_file_info(root)
        if info.type == FileType.NotFound:
            raise AudioError(url, "no such file or folder")
        if info.type != FileType.Directory:
            return [(url, info.size, info.mtime_ns or 0)]
        found = fs.get_file_info(FileSelector(root, recursive=True))
    except OSError as exc:
        raise AudioError(url, f"cannot be listed: {exc}") from None
    # Keep a query (e.g. ?region=) on every file's URL: workers open each one with from_uri again.
    base, query = url.split("?", 1) if "?" in url else (url, "")
    prefix = len(root.rstrip("/"))
    # As audio.walk_audio walks local folders: no name below the root that starts with ".", file or folder.
    files = sorted((f for f in found if f.type == FileType.File
                    and not any(part.startswith(".") for part in PurePosixPath(f.path[prefix:]).parts)
                    and PurePosixPath(f.path).suffix.lower() in AUDIO_SUFFIXES), key=lambda f: f.path)
    return [(base.rstrip("/") + f.path[prefix:] + (f"?{query}" if query else ""), f.size, f.mtime_ns or 0)
            for f in files]


@contextmanager
def open_url(url: str) -> Iterator[BinaryIO]:
    """The file at `url`, open for reading (seekable, as libsndfile needs)."""
    fs, path = _filesystem(url)
    try:
        file = fs.open_input_file(path)
    except OSError as exc:
        raise AudioError(url, f"cannot be opened: {exc}") from None
    with file:
        yield file


def probe_source(path: str) -> AudioInfo:
    """:func:`probe` of a local path or a URL."""
    if not is_url(path):
        return probe(path)
    with open_url(path) as file:
        return probe(path, file=file)


def iter_source_blocks(path: str, target_rate: int, **options) -> Iterator[np.ndarray]:
    """:func:`iter_blocks` of a local path or a URL (the file stays open while the blocks are read)."""
    if not is_url(path):
        yield from iter_blocks(path, target_rate, **options)
        return
    with open_url(path) as file:
        yield from iter_blocks(path, target_rate, file=file, **options)
