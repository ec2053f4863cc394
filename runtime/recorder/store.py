"""Crash-safe results of the recorder mode (`edgeenc watch`) in one SQLite file. Stdlib only, no torch.

Tables::

    meta        key, value: model_id, bundle_hash, embedding_dim the database is bound to, random_init,
                store_id (a random id the index beside the file is bound to), windows_epoch (moves on
                whenever windows are deleted: an index saved before is stale)
    files       id, path UNIQUE, size, mtime, mtime_ns, sha256, status ('done'|'failed'), error,
                model_id, bundle_hash, processed_at (UTC ISO 8601), audio_seconds, variant (what computed
                its rows, e.g. "model.int8dyn.onnx on onnxruntime CPUExecutionProvider": a bundle's CPU
                default can change after `edgeenc optimize`, and one file never mixes two);
                UNIQUE (sha256, bundle_hash): one content is processed once per bundle
    aliases     path, size, mtime_ns, file_id: other names of content already in `files`
    windows     id, file_id, start, end, embedding (BLOB, float32 little-endian), dim
    detections  window_id, label, rank, score

Crash safety: the database is in WAL mode and every file is written in ONE transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``): its `files` row, all its windows and detections, and the
deletion of the rows it replaces. SQLite's journal makes that all-or-nothing, so a kill -9 or a
power cut leaves either every row of a file or none, and the next run simply processes the file again.

``synchronous=FULL``: in WAL mode NORMAL already keeps the database consistent through a power cut,
but may lose the last few commits; FULL fsyncs the WAL at every commit, so a file reported "done" is
on disk. It costs one fsync per recording (recordings arrive every few minutes), which is nothing.

The file it writes is the file it opened: every write transaction first checks that the path still
names the same file (device and inode). A results file deleted or replaced under a running watcher
stops it with :class:`StoreError`, instead of "done" rows going to a file nobody can open again.
A write SQLite refuses (a read-only file, a full disk) is a StoreError too; the transaction is rolled back.

One writer: :meth:`Store.open` takes an exclusive ``fcntl.flock`` on ``<db>.lock``. The kernel
releases a flock when its process dies (kill -9 included), so a crash never leaves a stale lock, and
a second watcher on the same database is refused with :class:`StoreLocked`.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..bundle import bundle_identity
from ..scores import Detection, merge_events
from ..writers import EventRow, write_events, write_window_table

if TYPE_CHECKING:
    from ..encoder import Encoder

__all__ = ["StoreError", "StoreLocked", "FileInfo", "Store", "StoredEvent", "export_events", "export_table"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
# Test hook: "N:MARKER" makes the N-th recorded file (or live window batch; 1-based) stall inside its
# transaction after its windows are inserted: MARKER is written (holding the file's path) and the process
# sleeps, to be killed.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error TEXT,
    model_id TEXT,
    bundle_hash TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    audio_seconds REAL NOT NULL DEFAULT 0,
    variant TEXT,
    UNIQUE (sha256, bundle_hash)
);
CREATE TABLE IF NOT EXISTS aliases (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    embedding BLOB NOT NULL,
    dim INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_file ON windows(file_id);
CREATE TABLE IF NOT EXISTS detections (
    window_id INTEGER NOT NULL REFERENCES windows(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    rank INTEGER NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (window_id, rank)
);
CREATE INDEX IF NOT EXISTS aliases_file ON aliases(file_id);
"""


@dataclass(frozen=True)
class StoredEvent:
    """An event of a results file: `id` is "<file id>-<first window id>", stable as more rows arrive."""

    id: str
    file_id: int
    path: str  # the recording, or live:<source>@<opened> for a stream
    label: str
    start: float  # seconds in the recording (or since the stream opened)
    end: float
    max_score: float
    mean_score: float
    windows: int
    utc_start: str | None = None  # live streams: the wall clock of its first window

    def row(self) -> EventRow:
        return EventRow(self.path, self.label, self.start, self.end, self.max_score, self.mean_score, self.windows,
                        self.utc_start)


class StoreError(Exception):
    """A results database that cannot be used as asked."""


class StoreLocked(StoreError):
    """Another process is writing to this database."""


@dataclass(frozen=True)
class FileInfo:
    """What identifies one version of one file on disk."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


class IndexKeeper(Protocol):
    """What follows the committed rows (store_index.StoreIndex)."""

    def committed(self, ids: Sequence[int], embeddings: np.ndarray | None, removed: Sequence[int] = ()) -> None: ...

    def close(self) -> None: ...


class _Lock:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, say so
            log.warning("fcntl is unavailable: %s is not protected against a second writer", self.path)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            db = self.path[: -len(".lock")]
            raise StoreLocked(
                f"{db} is in use by another watcher (pid {holder}, lock {self.path}); "
                "stop it first or use another --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class Store:
    """The results database. Open with :meth:`open` (the writer) or :meth:`open_reader`."""

    def __init__(self, path: str, conn: sqlite3.Connection, lock: _Lock | None, variant: str | None = None) -> None:
        self.path = path
        self.conn = conn
        self._lock = lock
        self._identity = _file_identity(path)
        self.variant = variant  # recorded with every file this writer stores
        self.index: IndexKeeper | None = None  # the writer's index, when asked for (store_index.keep_index)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model_id: str, bundle_hash: str, embedding_dim: int,
             variant: str | None = None, random_init: bool = False) -> Store:
        """Open (creating) for writing: take the lock, bind the database to this bundle."""
        p = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(folder):
            raise StoreError(f"{p}: folder {folder} does not exist")
        lock = _Lock(p + ".lock")
        lock.acquire()
        try:
            store = cls(p, _connect(p), lock, variant)
            store._bind(model_id, bundle_hash, embedding_dim, random_init)
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def for_encoder(cls, path: str | os.PathLike, encoder: Encoder) -> Store:
        """Open (creating) for writing, bound to the encoder's bundle."""
        model_id, bundle_hash = bundle_identity(encoder.bundle, encoder.manifest)
        store = cls.open(path, model_id=model_id, bundle_hash=bundle_hash, embedding_dim=encoder.embedding_dim,
                         variant=encoder.backend.variant, random_init=bool(encoder.manifest.get("random_init")))
        try:
            store.set_meta("sample_rate", str(encoder.sample_rate))  # what Raven tables of its events need
            head = encoder.head.name if encoder.head else "none"
            saved = store.meta().get("head")
            if saved is not None and saved != head:  # labels of two heads must not mix in one database
                raise StoreError(f"{store.path} holds detections of the bundle's {saved} head, this run scores with "
                                 f"its {head} head: pass --head {saved}, or another --db")
            store.set_meta("head", head)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_reader(cls, path: str | os.PathLike) -> Store:
        """Open an existing database to read (export, search) while a watcher may be writing."""
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise StoreError(f"{p}: no such results database")
        store = cls(p, _connect(p), None)
        if not store.meta().get("bundle_hash"):
            store.close()
            raise StoreError(f"{p}: not an edgeenc results database (written by `edgeenc watch`)")
        return store

    def take_lock(self) -> bool:
        """Become the one writer of a file opened with open_reader; raises StoreLocked when another holds it.
        False when this store holds the lock already (release_lock is then not this caller's to call)."""
        if self._lock is not None:
            return False
        lock = _Lock(self.path + ".lock")
        lock.acquire()
        self._lock = lock
        return True

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        try:
            if self.index is not None:
                self.index.close()
        except OSError as exc:
            log.warning("%s: the index could not be saved (%s); `edgeenc search` rebuilds it from the rows",
                        self.path, exc)
        finally:
            self.conn.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def meta(self) -> dict[str, str]:
        try:
            return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a results database ({exc})") from None

    def _bind(self, model_id: str, bundle_hash: str, embedding_dim: int, random_init: bool = False) -> None:
        meta = self.meta()
        if not meta:
            with self._transaction():
                self.conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("schema", SCHEMA_VERSION), ("model_id", model_id), ("bundle_hash", bundle_hash),
                     ("embedding_dim", str(embedding_dim)), ("random_init", str(bool(random_init)).lower()),
                     ("store_id", uuid.uuid4().hex)],
                )
            return
        if "store_id" not in meta:  # written before the index: the index binds itself to this id
            with self._transaction() as c:
                c.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
        if "random_init" not in meta and meta.get("bundle_hash") == bundle_hash:  # written before it was kept
            with self._transaction() as c:
                c.execute("INSERT INTO meta (key, value) VALUES ('random_init', ?)", (str(bool(random_init)).lower(),))
        if meta.get("bundle_hash") != bundle_hash:
            raise StoreError(
                f"{self.path} holds results of {meta.get('model_id')} (bundle {meta.get('bundle_hash', '')[:12]}); "
                f"this bundle is {model_id} ({bundle_hash[:12]}): use another --db for another bundle"
            )

    # -- transactions --------------------------------------------------------------------------

    class _Txn:
        def __init__(self, store: Store) -> None:
            self.store, self.conn = store, store.conn

        def __enter__(self) -> sqlite3.Connection:
            self.store.check_file()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.store.path}: cannot be written ({exc})") from None
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> bool:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return False
                except sqlite3.DatabaseError as error:
                    exc = error
            if self.conn.in_transaction:  # KeyboardInterrupt included: abandon it, keep the database as it was
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"{self.store.path}: cannot be written ({exc}); this file's rows were not "
                                 "stored") from None
            return False

    def _transaction(self) -> Store._Txn:
        return Store._Txn(self)

    def check_file(self) -> None:
        """Raise StoreError when the path no longer names the file this store opened (deleted or replaced)."""
        now = _file_identity(self.path)
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            raise StoreError(f"{self.path} was {what} while in use: stopped so that no result is written where "
                             "it cannot be read back (start again to write a new results file)")

    # -- what is known -------------------------------------------------------------------------

    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None:
        """'done', 'failed' or 'alias' when this exact version of PATH is already recorded."""
        row = self.conn.execute("SELECT status FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                                (path, size, mtime_ns)).fetchone()
        if row:
            return str(row[0])
        row = self.conn.execute("SELECT 1 FROM aliases WHERE path = ? AND size = ? AND mtime_ns = ?",
                                (path, size, mtime_ns)).fetchone()
        return "alias" if row else None

    def by_sha(self, sha256: str) -> tuple[int, str, str] | None:
        """(file_id, path, status) of the recorded file with this content, if any."""
        bundle_hash = self.meta()["bundle_hash"]
        row = self.conn.execute("SELECT id, path, status FROM files WHERE sha256 = ? AND bundle_hash = ?",
                                (sha256, bundle_hash)).fetchone()
        return (int(row[0]), str(row[1]), str(row[2])) if row else None

    def by_path(self, path: str) -> tuple[int, str] | None:
        """(file_id, sha256) of the file recorded under PATH."""
        row = self.conn.execute("SELECT id, sha256 FROM files WHERE path = ?", (path,)).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    # -- writing -------------------------------------------------------------------------------

    def touch(self, info: FileInfo) -> None:
        """Same content as recorded, new size/mtime stamp (e.g. `touch`): remember the new stamp."""
        with self._transaction() as c:
            c.execute("UPDATE files SET size = ?, mtime = ?, mtime_ns = ? WHERE path = ?",
                      (info.size, info.mtime_ns / 1e9, info.mtime_ns, info.path))

    def record_alias(self, info: FileInfo, file_id: int) -> None:
        with self._transaction() as c:
            removed = self._forget_path(c, info.path)
            c.execute("INSERT INTO aliases (path, size, mtime_ns, file_id) VALUES (?, ?, ?, ?)",
                      (info.path, info.size, info.mtime_ns, file_id))
        self.committed([], None, removed)

    def record_failed(self, info: FileInfo, error: str) -> None:
        self._record(info, "failed", error, 0.0, None, None, None, ())

    def record_done(
        self,
        info: FileInfo,
        starts: np.ndarray,
        ends: np.ndarray,
        embeddings: np.ndarray,
        detections: Sequence[tuple[int, str, int, float]] = (),
        audio_seconds: float = 0.0,
    ) -> None:
        """All rows of one file in one transaction; detections are (window index, label, rank, score)."""
        self._record(info, "done", None, audio_seconds, starts, ends, embeddings, detections)

    def _record(self, info, status, error, audio_seconds, starts, ends, embeddings, detections) -> None:
        meta = self.meta()
        ids: list[int] = []
        with self._transaction() as c:
            removed = self._forget_path(c, info.path)
            cur = c.execute(
                "INSERT INTO files (path, size, mtime, mtime_ns, sha256, status, error, model_id, bundle_hash, "
                "processed_at, audio_seconds, variant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.path, info.size, info.mtime_ns / 1e9, info.mtime_ns, info.sha256, status, error,
                 meta.get("model_id"), meta["bundle_hash"],
                 _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), float(audio_seconds),
                 self.variant),
            )
            file_id = cur.lastrowid
            if embeddings is not None:
                emb = np.ascontiguousarray(embeddings, dtype="<f4")
                for s, e, row in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist(), emb):
                    ids.append(c.execute(
                        'INSERT INTO windows (file_id, start, "end", embedding, dim) VALUES (?, ?, ?, ?, ?)',
                        (file_id, s, e, row.tobytes(), emb.shape[1])).lastrowid)
                c.executemany("INSERT INTO detections (window_id, label, rank, score) VALUES (?, ?, ?, ?)",
                              [(ids[i], label, rank, score) for i, label, rank, score in detections])
        self.committed(ids, embeddings if ids else None, removed)

    @staticmethod
    def _forget_path(c: sqlite3.Connection, path: str) -> list[int]:
        """Replacing a file: its old rows go (windows and detections by cascade) in the same transaction.
        Returns the ids of the windows that went; when there are any the windows' epoch moves on, so that an
        index saved before (which may still hold them, and SQLite may give their ids to new rows) is stale."""
        gone = [int(i) for (i,) in c.execute(
            "SELECT w.id FROM windows w JOIN files f ON f.id = w.file_id WHERE f.path = ?", (path,))]
        if gone:
            c.execute("INSERT INTO meta (key, value) VALUES ('windows_epoch', '1') "
                      "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
        c.execute("DELETE FROM files WHERE path = ?", (path,))
        c.execute("DELETE FROM aliases WHERE path = ?", (path,))
        return gone

    # -- the index of the stored windows -----------------------------------------------------------

    def committed(self, ids: Sequence[int], embeddings: np.ndarray | None, removed: Sequence[int] = ()) -> None:
        """Rows that a transaction has just committed (and those it removed): the index follows, never ahead."""
        if self.index is None:
            return
        try:
            self.index.committed(ids, embeddings, removed)
        except Exception as exc:  # the rows are safe; the index is a convenience that search can rebuild
            log.warning("%s: the index stopped following the stored windows (%s); `edgeenc search` and "
                        "`edgeenc index` rebuild it from the rows", self.path, exc)
            self.index = None

    # -- reading -------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                      "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def events(self, min_windows: int | None = None, recent_windows: int | None = None) -> list[StoredEvent]:
        """Every event of the stored windows, derived from committed rows only (so it is never half-written):
        a label's detections in consecutive windows of one file (or live stream) merged (scores.merge_events).
        `min_windows` defaults to the one the writer recorded; `recent_windows` looks at that many newest only."""
        if min_windows is None:
            min_windows = int(self.meta().get("min_windows") or 1)
        floor = 0
        if recent_windows:
            floor = (self.conn.execute("SELECT max(id) FROM windows").fetchone()[0] or 0) - recent_windows
        timed = bool(self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'window_times'").fetchone())
        walls = "t.utc_start" if timed else "NULL"
        join = "LEFT JOIN window_times t ON t.window_id = w.id" if timed else ""
        windows = self.conn.execute(
            f'SELECT w.id, w.file_id, w.start, w."end", f.path, {walls} FROM windows w '
            f"JOIN files f ON f.id = w.file_id {join} WHERE w.id > ? ORDER BY w.file_id, w.start, w.id",
            (floor,)).fetchall()
        found: dict[int, list[tuple]] = {}
        for window_id, label, rank, score in self.conn.execute(
                "SELECT window_id, label, rank, score FROM detections WHERE window_id > ?", (floor,)):
            found.setdefault(window_id, []).append((label, rank, score))
        events = []
        for file_id, group in itertools.groupby(windows, key=lambda row: row[1]):
            group = list(group)
            starts, ends = [row[2] for row in group], [row[3] for row in group]
            hits = [Detection(i, label, rank, score) for i, row in enumerate(group)
                    for label, rank, score in found.get(row[0], ())]
            for event in merge_events(starts, ends, hits, min_windows):
                first = group[event.first]
                events.append(StoredEvent(f"{file_id}-{first[0]}", file_id, first[4], event.label, event.start,
                                          event.end, event.max_score, event.mean_score, event.windows, first[5]))
        return events

    def counts(self) -> dict[str, int]:
        q = self.conn.execute
        return {
            "done": q("SELECT count(*) FROM files WHERE status = 'done'").fetchone()[0],
            "failed": q("SELECT count(*) FROM files WHERE status = 'failed'").fetchone()[0],
            "aliases": q("SELECT count(*) FROM aliases").fetchone()[0],
            "windows": q("SELECT count(*) FROM windows").fetchone()[0],
        }

    def failures(self) -> list[tuple[str, str]]:
        return [(str(p), str(e)) for p, e in
                self.conn.execute("SELECT path, error FROM files WHERE status = 'failed' ORDER BY path")]

    def variants(self) -> list[str]:
        """The variants that computed the stored rows (more than one: the file mixes them; None: unrecorded)."""
        rows = self.conn.execute("SELECT DISTINCT variant FROM files WHERE status = 'done' ORDER BY variant")
        return [str(v) if v is not None else "(not recorded)" for (v,) in rows]

    def iter_windows(self, batch: int = 4096) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                                                list[str | None], np.ndarray, list[str | None]]]:
        """Batches (files, starts, ends, embeddings [n, dim], top labels, top scores, variants) in file order."""
        cur = self.conn.execute(
            'SELECT f.path, w.start, w."end", w.embedding, w.dim, d.label, d.score, f.variant FROM windows w '
            "JOIN files f ON f.id = w.file_id LEFT JOIN detections d ON d.window_id = w.id AND d.rank = 1 "
            "ORDER BY f.id, w.start, w.id"
        )
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            dim = int(rows[0][4])
            emb = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f4").reshape(len(rows), dim)
            yield ([r[0] for r in rows], np.array([r[1] for r in rows], np.float64),
                   np.array([r[2] for r in rows], np.float64), emb.astype(np.float32),
                   [r[5] for r in rows], np.array([np.nan if r[6] is None else r[6] for r in rows], np.float64),
                   [r[7] for r in rows])


def _connect(path: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)  # explicit BEGIN/COMMIT only
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (got {mode!r}); is it on a network file system?")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript(_SCHEMA)
        if "variant" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:  # a file from before
            conn.execute("ALTER TABLE files ADD COLUMN variant TEXT")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot be opened as a results database ({exc})") from None
    return conn


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def export_table(store: Store, out: str | os.PathLike) -> int:
    """Write every stored window to OUT (.csv or .parquet), streamed; returns the number of rows."""
    meta = {k: v for k, v in store.meta().items() if k != "schema"}
    return write_window_table(out, store.iter_windows(), int(meta.get("embedding_dim", 0)), meta)


def export_events(store: Store, out: str | os.PathLike, min_windows: int | None = None) -> int:
    """Write every event of the stored windows to OUT (.csv, .parquet or a Raven .txt); returns how many."""
    meta = {k: v for k, v in store.meta().items() if k != "schema"}
    events = store.events(min_windows)
    write_events(out, [e.row() for e in events], metadata={**meta, "min_windows": str(min_windows or meta.get(
        "min_windows", 1))}, sample_rate=int(meta.get("sample_rate") or 16000))
    return len(events)
