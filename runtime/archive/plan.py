"""Archive runs spread over many workers: the plan (files cut into window ranges) and the output folder.

Nothing here imports Ray: ray_run.py runs a plan on Ray Data; this module decides what is to run and keeps
the output exactly-once at the file level.

Output folder
-------------
``OUT_DIR/shards/part-*.parquet``: whole files only. Columns ``file``, ``start``, ``end`` and
``embedding`` (fixed-size list of float32), and for classify ``labels`` and ``scores`` (the top-k of
each window). Schema metadata: the encoder's metadata (model_id, checkpoint_sha256, ...), the
``bundle_sha256``, the run's window options, and ``edgeenc_files``, a JSON list of
``[path, size, mtime_ns]`` of the files the shard holds. ``pandas.read_parquet(OUT_DIR / "shards")``
reads them all (the temporaries of an interrupted write start with a dot, which readers skip).

``OUT_DIR/failures.parquet``: ``path``, ``error`` of every file that failed in the latest run.

A shard is written (atomically) only once every range of each of its files is embedded, so a killed
run leaves complete files only; a rerun reads the shards' footers, skips every file whose path, size
and mtime are listed there, and redoes the others.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..audio import AudioError, AudioInfo, walk_audio
from ..encoder import EmbeddingResult
from ..ranges import Range, plan_ranges
from ..scores import NoClassifierHead, ScoreOptions, confirmed, detections
from ..windows import WindowOptions, iter_windows
from .urls import is_url, list_url, probe_source

# Metadata a shard must share with the run that resumes it; anything else may differ (e.g. the backend).
_RUN_KEYS = ("model_id", "checkpoint_sha256", "bundle_sha256", "run_options")
# Headers are read concurrently: on network storage each probe is a round trip.
_PROBE_THREADS = 16


class ArchiveError(Exception):
    """An output folder that cannot take this run's results."""


@dataclass(frozen=True)
class Recording:
    path: str  # absolute (or the URL): what workers read and what resuming matches
    name: str  # as given (or found in a given folder): the output's `file` column, as single-process embed writes
    size: int  # -1 when the file cannot be stat'ed (it then fails when probed)
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass
class ArchivePlan:
    recordings: list[Recording]
    skipped: list[Recording]  # complete in the output folder already
    ranges: list[Range]
    failures: dict[str, str]  # path -> error, found while planning
    audio_seconds: float  # of the files to do
    sample_rate: int
    options: WindowOptions = field(default_factory=WindowOptions)  # window filled in: what workers cut with

    @property
    def todo(self) -> int:
        return len(self.recordings) - len(self.skipped) - len(self.failures)


def list_recordings(sources: Sequence[str | os.PathLike]) -> list[Recording]:
    """Files as given and every audio file under the given folders (audio.walk_audio: sorted, recursive).

    A source with "://" is a URL that pyarrow's filesystems read (urls.py): it is listed there and its files
    are named by URL; raises :class:`AudioError` naming it when there is nothing at it.
    """
    found = []
    for source in sources:
        if is_url(source):
            found.extend(Recording(url, url, size, mtime) for url, size, mtime in list_url(os.fspath(source)))
            continue
        local = Path(source)
        if local.is_dir():
            found.extend(Recording(str(Path(path).resolve()), path, stat.st_size, stat.st_mtime_ns)
                         for path, stat in walk_audio(local))
            continue
        try:
            stat = local.stat()
            found.append(Recording(str(local.resolve()), str(local), stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append(Recording(str(local.absolute()), str(local), -1, -1))
    return found


def plan_archive(recordings: list[Recording], done: set[tuple[str, int, int]], sample_rate: int,
                 options: WindowOptions, range_seconds: float) -> ArchivePlan:
    """Everything still to do: the files not in `done`, probed and cut into ranges; unreadable ones as failures.

    `options` must name the window (WindowOptions.with_window): ranges are cut on its grid.
    """
    # A window or hop under one sample is the run's error, not every file's.
    list(iter_windows([], sample_rate, options.window_seconds, options.hop_seconds, last=options.last))
    if range_seconds < options.window_seconds:
        raise ValueError(f"range of {range_seconds:g} s is shorter than the {options.window_seconds:g} s window")
    skipped = [r for r in recordings if r.key in done]
    todo = [r for r in recordings if r.key not in done]
    changed = sorted({r.path for r in todo} & {path for path, _, _ in done})
    if changed:
        # Redoing it would leave its old rows in a shard beside the new ones.
        raise ArchiveError(f"{changed[0]}{f' and {len(changed) - 1} more file(s)' if len(changed) > 1 else ''} "
                           "changed (size or mtime) since its rows were written to the shards: restore it, or "
                           "write to another folder (-o)")

    def describe(recording: Recording) -> AudioInfo | str:
        try:
            return probe_source(recording.path)
        except AudioError as exc:
            return exc.reason

    with ThreadPoolExecutor(_PROBE_THREADS) as pool:
        infos = list(pool.map(describe, todo))
    ranges: list[Range] = []
    failures: dict[str, str] = {}
    seconds = 0.0
    for recording, info in zip(todo, infos):
        if isinstance(info, str):
            failures[recording.path] = info
            continue
        seconds += info.duration_seconds
        ranges.extend(plan_ranges(recording.path, info, sample_rate, options, range_seconds))
    return ArchivePlan(recordings, skipped, ranges, failures, seconds, sample_rate, options)


class ArchiveOutput:
    """The output folder: complete files in Parquet shards, failures beside them."""

    def __init__(self, folder: str | os.PathLike, metadata: dict[str, str], scoring: ScoreOptions | None = None,
                 labels: list[str] | None = None) -> None:
        """`scoring` (with the model's `labels`) for classify: each window's kept labels are stored too."""
        self.folder = Path(folder)
        self.shards = self.folder / "shards"
        self.failures_path = self.folder / "failures.parquet"
        self.metadata = dict(metadata)
        self.scoring = scoring
        self.labels = labels
        if self.folder.exists() and not self.folder.is_dir():
            raise ArchiveError(f"{self.folder} is a file; --engine ray writes a folder of Parquet shards")

    def done(self) -> set[tuple[str, int, int]]:
        """Keys of the files complete in the shards; raises when a shard comes from another bundle or options."""
        import pyarrow.parquet as pq

        keys: set[tuple[str, int, int]] = set()
        for shard in sorted(self.shards.glob("part-*.parquet")) if self.shards.is_dir() else []:
            try:
                meta = {k.decode(): v.decode() for k, v in (pq.read_schema(shard).metadata or {}).items()}
                files = json.loads(meta["edgeenc_files"])
            except (OSError, ValueError, KeyError) as exc:
                raise ArchiveError(
                    f"{shard}: not a readable edgeenc shard ({exc}); move it out of {self.shards}") from None
            for name in _RUN_KEYS:
                if meta.get(name) != self.metadata.get(name):
                    raise ArchiveError(
                        f"{shard} was written with {name} {meta.get(name)}, this run has {self.metadata.get(name)}: "
                        f"write to another folder (-o) or remove {self.shards}")
            keys.update((str(p), int(s), int(m)) for p, s, m in files)
        return keys

    def write_shard(self, files: list[tuple[Recording, EmbeddingResult]]) -> Path:
        """Write whole files into one new shard, atomically; returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        results = [r for _, r in files]
        embeddings = np.concatenate([r.embeddings for r in results]).astype(np.float32)
        dim = embeddings.shape[1]
        columns = {
            "file": pa.array([rec.name for rec, r in files for _ in range(len(r))], pa.string()),
            "start": pa.array(np.concatenate([r.starts for r in results]), pa.float64()),
            "end": pa.array(np.concatenate([r.ends for r in results]), pa.float64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
        }
        if self.scoring is not None:
            columns["labels"], columns["scores"] = self._score_columns(results)
        meta = {**self.metadata, "edgeenc_files": json.dumps([list(rec.key) for rec, _ in files])}
        table = pa.table(columns).replace_schema_metadata(meta)
        # Time first so that names sort in the order the shards were written.
        path = self.shards / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def _score_columns(self, results: list[EmbeddingResult]):
        """Per window, the kept labels and their scores (scores.detections, as classify writes them)."""
        import pyarrow as pa

        assert self.scoring is not None
        labels, scores = [], []
        for result in results:
            if result.logits is None:
                raise NoClassifierHead(self.metadata.get("model_id"))
            kept: list[list] = [[] for _ in range(len(result))]
            found = detections(result.logits, self.labels, self.scoring)
            for hit in confirmed(result.starts, result.ends, found, self.scoring.min_windows):
                kept[hit.window].append(hit)
            labels += [[d.label for d in window] for window in kept]
            scores += [np.array([d.score for d in window], np.float32) for window in kept]
        return pa.array(labels, pa.list_(pa.string())), pa.array(scores, pa.list_(pa.float32()))

    def write_failures(self, failures: dict[str, str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": pa.array(list(failures), pa.string()),
                          "error": pa.array(list(failures.values()), pa.string())})
        with atomic_path(self.failures_path) as tmp:
            pq.write_table(table.replace_schema_metadata(self.metadata), tmp)
