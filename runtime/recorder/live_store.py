"""Rows of `edgeenc listen` in the same results database as `edgeenc watch` (see store.py).

A live stream is stored as ONE virtual file per run of `listen`: a `files` row whose path is
``live:<SOURCE>@<opened, UTC ISO 8601>`` (sha256 ``live:<uuid>``, size 0, status 'done'), so
`export-db` and `search` see live windows exactly like windows of recordings. Its windows' `start`
and `end` are seconds of audio since the stream opened (the sample clock, dropped audio included).
Three tables are added beside the `watch` schema (created when absent, so a database written by
`watch` takes live rows too, and `watch` never reads them):

    streams       file_id (-> files), source, opened_at, closed_at (NULL while running, or after a
                  crash), sample_rate, audio_seconds, dropped_seconds, restarts
    window_times  window_id (-> windows), utc_start: wall-clock start, UTC ISO 8601 in microseconds
    clips         window_id (-> windows), path, label, score: FLAC clips saved for detections

Crash safety is the store's: WAL, ``synchronous=FULL``, and each window batch in ONE transaction
(windows, their wall-clock times, detections, clip rows, and the stream's running totals), so a
kill -9 or a power cut loses at most the batch in flight and never leaves half a batch. A restart
opens a new stream row; windows of the dead run stay, and its `closed_at` stays NULL.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence

import numpy as np

from .store import Store

__all__ = ["LiveStore", "utc_iso"]

_LIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    file_id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    closed_at TEXT,
    sample_rate INTEGER NOT NULL,
    audio_seconds REAL NOT NULL DEFAULT 0,
    dropped_seconds REAL NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS window_times (
    window_id INTEGER PRIMARY KEY REFERENCES windows(id) ON DELETE CASCADE,
    utc_start TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clips (
    window_id INTEGER NOT NULL REFERENCES windows(id) ON DELETE CASCADE,
    path TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    score REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS clips_window ON clips(window_id);
"""


def utc_iso(unix_seconds: float) -> str:
    return _dt.datetime.fromtimestamp(unix_seconds, _dt.timezone.utc).isoformat(timespec="microseconds")


class LiveStore(Store):
    """A :class:`Store` that also records live streams; open with ``LiveStore.open(...)``."""

    def _bind(self, model_id: str, bundle_hash: str, embedding_dim: int, random_init: bool = False) -> None:
        super()._bind(model_id, bundle_hash, embedding_dim, random_init)
        self.conn.executescript(_LIVE_SCHEMA)

    def open_stream(self, source: str, sample_rate: int) -> int:
        """A new stream row (and its virtual file); returns its file id."""
        now = _dt.datetime.now(_dt.timezone.utc)
        opened = now.isoformat(timespec="microseconds")
        meta = self.meta()
        with self._transaction() as c:
            file_id = c.execute(
                "INSERT INTO files (path, size, mtime, mtime_ns, sha256, status, error, model_id, bundle_hash, "
                "processed_at, audio_seconds, variant) VALUES (?, 0, ?, ?, ?, 'done', NULL, ?, ?, ?, 0, ?)",
                (f"live:{source}@{opened}", now.timestamp(), int(now.timestamp() * 1e9), f"live:{uuid.uuid4().hex}",
                 meta.get("model_id"), meta["bundle_hash"], now.isoformat(timespec="seconds"), self.variant),
            ).lastrowid
            c.execute("INSERT INTO streams (file_id, source, opened_at, sample_rate) VALUES (?, ?, ?, ?)",
                      (file_id, source, opened, int(sample_rate)))
        return int(file_id)

    def record_batch(
        self,
        file_id: int,
        starts: Sequence[float],
        ends: Sequence[float],
        wall_starts: Sequence[float],
        embeddings: np.ndarray,
        detections: Sequence[tuple[int, str, int, float]] = (),
        clips: Sequence[tuple[int, str, str, float]] = (),
        *,
        audio_seconds: float,
        dropped_seconds: float,
        restarts: int = 0,
    ) -> None:
        """One batch of windows in one transaction; detections are (window index, label, rank, score),
        clips (window index, path, label, score); the totals are the stream's so far."""
        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        with self._transaction() as c:
            ids = [c.execute('INSERT INTO windows (file_id, start, "end", embedding, dim) VALUES (?, ?, ?, ?, ?)',
                             (file_id, float(s), float(e), row.tobytes(), emb.shape[1])).lastrowid
                   for s, e, row in zip(starts, ends, emb)]
            c.executemany("INSERT INTO window_times (window_id, utc_start) VALUES (?, ?)",
                          [(i, utc_iso(t)) for i, t in zip(ids, wall_starts)])
            c.executemany("INSERT INTO detections (window_id, label, rank, score) VALUES (?, ?, ?, ?)",
                          [(ids[i], label, rank, score) for i, label, rank, score in detections])
            c.executemany("INSERT INTO clips (window_id, path, label, score) VALUES (?, ?, ?, ?)",
                          [(ids[i], path, label, score) for i, path, label, score in clips])
            self._totals(c, file_id, audio_seconds, dropped_seconds, restarts)
        self.committed(ids, emb)

    def close_stream(self, file_id: int, *, audio_seconds: float, dropped_seconds: float, restarts: int = 0) -> None:
        with self._transaction() as c:
            self._totals(c, file_id, audio_seconds, dropped_seconds, restarts)
            c.execute("UPDATE streams SET closed_at = ? WHERE file_id = ?",
                      (_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"), file_id))

    @staticmethod
    def _totals(c, file_id: int, audio_seconds: float, dropped_seconds: float, restarts: int) -> None:
        c.execute("UPDATE files SET audio_seconds = ? WHERE id = ?", (float(audio_seconds), file_id))
        c.execute("UPDATE streams SET audio_seconds = ?, dropped_seconds = ?, restarts = ? WHERE file_id = ?",
                  (float(audio_seconds), float(dropped_seconds), int(restarts), file_id))
