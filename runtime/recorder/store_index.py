"""The nearest-neighbour index of a results file's windows (`<db>.index/`, see runtime/neighbours.py).

What the index covers is written in its current.json as ``source``::

    store_id   the results file's random id (meta): another file's index is never taken for this one
    bundle     the bundle hash the file is bound to
    epoch      the file's windows_epoch (moves on when windows are deleted, as a replaced recording's are)
    max_id     the highest window id committed when it was saved
    rows       how many windows with id <= max_id it holds

So the index is never ahead of the committed rows: the writer adds a transaction's windows only after its
COMMIT, and saves what it holds. Rows committed after the last save (id > max_id) are searched exactly beside
it. It is stale when the file's id, bundle or epoch differ, or when the count of windows up to max_id is not
`rows`; then (and when it is missing or corrupt) it is rebuilt from the rows, with a note saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from edgeenc.progress import Counted, Progress

from ..neighbours import IndexProblem, IndexSettings, VectorIndex

if TYPE_CHECKING:
    from .store import Store

__all__ = ["StoreIndex", "index_fits", "index_folder", "keep_index", "load_store_index", "rebuild_store_index",
           "tail_floor", "windows_after"]

_BATCH = 8192


def index_folder(store: Store) -> str:
    return os.fspath(store.path) + ".index"


def _expected(store: Store) -> dict[str, str]:
    meta = store.meta()
    return {"store_id": str(meta.get("store_id", "")), "bundle": str(meta.get("bundle_hash", "")),
            "epoch": str(meta.get("windows_epoch", "0"))}


def _check(store: Store) -> Callable[[dict], str | None]:
    expected = _expected(store)

    def check(source: dict) -> str | None:
        for key, value in expected.items():
            if str(source.get(key)) != value:
                what = {"store_id": "it was built for another results file",
                        "bundle": "it was built from another bundle's embeddings",
                        "epoch": "windows were replaced since it was saved"}[key]
                return what
        try:
            max_id, rows = int(source["max_id"]), int(source["rows"])
        except (KeyError, TypeError, ValueError):
            return "it does not say which windows it holds"
        have = store.conn.execute("SELECT count(*) FROM windows WHERE id <= ?", (max_id,)).fetchone()[0]
        if have != rows:
            return f"the results file holds {have} windows up to id {max_id}, the index {rows}"
        return None

    return check


def _source(store: Store, max_id: int, rows: int) -> dict:
    return {**_expected(store), "max_id": int(max_id), "rows": int(rows)}


def index_fits(store: Store, index: VectorIndex) -> bool:
    """Whether an opened index still covers what it says of `store` (the database may have changed since)."""
    return _check(store)(index.source) is None


def load_store_index(store: Store, view: bool = True) -> VectorIndex:
    """The saved index of `store` if it still fits it; raises IndexProblem (missing, stale, corrupt)."""
    return VectorIndex.load(index_folder(store), _check(store), view=view)


def windows_after(store: Store, floor: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (ids, embeddings [n, dim]) of the committed windows with an id above `floor`, in id order."""
    cur = store.conn.execute("SELECT id, embedding FROM windows WHERE id > ? ORDER BY id", (floor,))
    while rows := cur.fetchmany(_BATCH):
        yield (np.array([r[0] for r in rows], np.int64),
               np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1))


def _add_rows(store: Store, index: VectorIndex, after: int, on_progress: Counted | None) -> tuple[int, int]:
    """Add every committed window with id > `after`; returns (highest id seen, rows added)."""
    total = store.conn.execute("SELECT count(*) FROM windows WHERE id > ?", (after,)).fetchone()[0]
    highest, added = after, 0
    for ids, embeddings in windows_after(store, after):
        index.add(ids, embeddings)
        highest, added = int(ids[-1]), added + len(ids)
        if on_progress:
            on_progress(added, total)
    return highest, added


def rebuild_store_index(store: Store, on_progress: Counted | None = None,
                        settings: IndexSettings | None = None) -> VectorIndex:
    """A new index of every committed window of `store` (not saved)."""
    dim = int(store.meta().get("embedding_dim") or 0)
    if dim < 1:
        raise IndexProblem(index_folder(store), "the results file does not record its embedding width")
    index = VectorIndex.new(dim, settings)
    highest, rows = _add_rows(store, index, 0, on_progress)
    index.source = _source(store, highest, rows)
    return index


def tail_floor(index: VectorIndex | None) -> int:
    """Windows with an id above this are not in `index` (all of them when there is none)."""
    return int(index.source.get("max_id", 0)) if index is not None else 0


class StoreIndex:
    """The writer's index: in memory, following every commit, saved when it has grown by `save_every` windows
    (or a tenth of its size, whichever is more) and when the writer closes."""

    save_every = 20000

    def __init__(self, store: Store, index: VectorIndex, max_id: int) -> None:
        self.store, self.index, self.max_id = store, index, max_id  # it holds every window up to max_id
        self.unsaved = 0
        self.loaded = len(index)  # windows it held when opened (0 when it was rebuilt)

    @classmethod
    def for_writer(cls, store: Store, on_note: Progress | None = None, on_progress: Counted | None = None
                   ) -> StoreIndex:
        folder = index_folder(store)
        try:
            index = load_store_index(store, view=False)
        except IndexProblem as problem:
            if on_note and (problem.reason != "missing" or store.counts()["windows"]):
                on_note(f"index {folder} is {problem.reason}: rebuilding it from the stored windows")
            index = rebuild_store_index(store, on_progress)
            keeper = cls(store, index, int(index.source["max_id"]))
            keeper.loaded = 0
            keeper.save()
            return keeper
        keeper = cls(store, index, int(index.source["max_id"]))
        highest, added = _add_rows(store, index, keeper.max_id, on_progress)  # committed after its last save
        if added:
            keeper.max_id, keeper.unsaved = highest, added
            keeper.save()
        return keeper

    def committed(self, ids: Sequence[int], embeddings: np.ndarray | None, removed: Sequence[int] = ()) -> None:
        if removed:
            self.index.remove(removed)
            self.unsaved += len(removed)
        if len(ids) and embeddings is not None:
            self.index.add(np.asarray(ids, np.int64), embeddings)
            self.max_id = max(self.max_id, int(max(ids)))
            self.unsaved += len(ids)
        if self.unsaved >= max(self.save_every, len(self.index) // 10):
            self.save()

    def save(self) -> None:
        self.index.source = _source(self.store, self.max_id, len(self.index))
        self.index.save(index_folder(self.store))
        self.unsaved = 0

    def close(self) -> None:
        if self.unsaved:
            self.save()


def keep_index(store: Store, on_note: Progress | None = None, on_progress: Counted | None = None) -> StoreIndex:
    """Make the writer of `store` keep the index beside it (`<db>.index/`) up to date as rows commit: loaded, or
    rebuilt from the rows when missing, stale or corrupt (`on_note` says which), saved as it grows and on close.
    Raises IndexUnavailable without usearch."""
    keeper = StoreIndex.for_writer(store, on_note, on_progress)
    store.index = keeper
    return keeper
