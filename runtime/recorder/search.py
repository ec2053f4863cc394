"""`edgeenc search` over a results file: the stored windows nearest to query embeddings.

With the index (runtime/neighbours.py, kept by watch/listen in `<db>.index/`): each query window's nearest
indexed windows are the candidates, re-scored exactly from the stored float32 rows; windows committed after the
index was last saved are scored exactly beside them. A missing, stale or corrupt index is rebuilt from the rows
(and saved when no writer holds the file). `exact=True`, or no usearch, scores every stored window.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from edgeenc.progress import Counted, Progress

from ..neighbours import Hit, IndexProblem, Nearest, VectorIndex, have_index_library
from .store import Store, StoreError, StoreLocked
from .store_index import index_fits, index_folder, load_store_index, rebuild_store_index, tail_floor, windows_after

__all__ = ["search_store", "stored_window"]



def stored_window(store: Store, file: str, start: float) -> np.ndarray:
    """The stored embedding [1, dim] of FILE's window that starts at START (within half a window)."""
    names = [file, os.path.abspath(file)]
    row = None
    for name in names:
        row = store.conn.execute(
            'SELECT w.embedding, w.start, w."end" FROM windows w JOIN files f ON f.id = w.file_id '
            "WHERE f.path = ? ORDER BY abs(w.start - ?), w.id LIMIT 1", (name, float(start))).fetchone()
        if row:
            break
    if row is None:
        raise StoreError(f"{store.path} holds no windows of {file!r} (the file column of `edgeenc export-db` "
                         "names them)")
    embedding, found, end = row
    if abs(found - start) > (end - found) / 2:
        raise StoreError(f"{store.path}: no window of {file} starts near {start:g} s (nearest: {found:g} s)")
    return np.frombuffer(embedding, dtype="<f4").reshape(1, -1).astype(np.float32)


def _windows_by_id(store: Store, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    found_ids, rows = [], []
    for chunk in np.array_split(ids, max(1, -(-len(ids) // 500))):
        marks = ",".join("?" * len(chunk))
        for window_id, embedding in store.conn.execute(
                f"SELECT id, embedding FROM windows WHERE id IN ({marks})", [int(i) for i in chunk]):
            found_ids.append(window_id)  # a window deleted since the index was saved is simply not found
            rows.append(embedding)
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.array(found_ids, np.int64), np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), -1)


# Indexes opened by this process, per open results file: reopening means hashing the whole vectors file, so a
# warm process (the page, a notebook) reuses it while current.json is the same file and re-checks what it covers
# whenever the database has changed (PRAGMA data_version moves when another connection commits).
_OPENED: weakref.WeakKeyDictionary[Store, tuple[tuple, int, VectorIndex]] = weakref.WeakKeyDictionary()


def _current_signature(store: Store) -> tuple:
    try:
        st = os.stat(os.path.join(index_folder(store), "current.json"))
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _reader_index(store: Store, on_note: Progress | None, on_progress) -> VectorIndex:
    signature = _current_signature(store)
    version = store.conn.execute("PRAGMA data_version").fetchone()[0]
    cached = _OPENED.get(store)
    if cached and signature and cached[0] == signature and (cached[1] == version or index_fits(store, cached[2])):
        _OPENED[store] = (signature, version, cached[2])
        return cached[2]
    index = _open_or_rebuild(store, on_note, on_progress)
    _OPENED[store] = (_current_signature(store), version, index)
    return index


def _open_or_rebuild(store: Store, on_note: Progress | None, on_progress) -> VectorIndex:
    try:
        return load_store_index(store)
    except IndexProblem as problem:
        folder = index_folder(store)
        if on_note:
            on_note(f"index {folder} is {problem.reason}: rebuilding it from the stored windows")
        index = rebuild_store_index(store, on_progress)
    try:
        taken = store.take_lock()
    except StoreLocked:  # a watcher writes the file: it keeps (and saves) its own index
        if on_note:
            on_note(f"index rebuilt for this search only: a watcher holds {store.path} and saves its own")
        return index
    try:
        index.save(folder)
    except OSError as exc:
        if on_note:
            on_note(f"index rebuilt for this search only: {folder} cannot be written ({exc})")
    finally:
        if taken:
            store.release_lock()
    return index


def search_store(store: Store, queries: np.ndarray, top: int = 10, *, exact: bool = False,
                 on_note: Progress | None = None, on_progress: Counted | None = None) -> list[Hit]:
    """The `top` stored windows with the highest cosine to any query window, best first."""
    nearest = Nearest(queries, top)
    dim = int(store.meta().get("embedding_dim") or nearest.dim)
    if dim != nearest.dim:
        raise StoreError(f"{store.path}: stored embeddings have {dim} dims, the query {nearest.dim}")
    index = None
    if not exact and have_index_library():
        index = _reader_index(store, on_note, on_progress)
    if index is not None and not index.pays():
        index = None  # kept up to date, but a small file is scored exactly
    if index is not None:
        keys, _ = index.candidates(nearest.queries, max(2 * top, top + 16))
        nearest.feed(*_windows_by_id(store, np.unique(keys)))
    for ids, embeddings in windows_after(store, tail_floor(index)):
        nearest.feed(ids, embeddings)
    return _hits(store, nearest.best())


def _hits(store: Store, best: list[tuple[int, float]]) -> list[Hit]:
    if not best:
        return []
    ids = [k for k, _ in best]
    marks = ",".join("?" * len(ids))
    where = {row[0]: row[1:] for row in store.conn.execute(
        f'SELECT w.id, f.path, w.start, w."end" FROM windows w JOIN files f ON f.id = w.file_id '
        f"WHERE w.id IN ({marks})", ids)}
    labels: dict[int, list[str]] = {}
    for window_id, label in store.conn.execute(
            f"SELECT window_id, label FROM detections WHERE window_id IN ({marks}) ORDER BY window_id, rank", ids):
        labels.setdefault(window_id, []).append(label)
    return [Hit(str(where[k][0]), float(where[k][1]), float(where[k][2]), cos, tuple(labels.get(k, ())))
            for k, cos in best if k in where]
