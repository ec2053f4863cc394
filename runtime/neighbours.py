"""Nearest stored windows by cosine: the exact search, and an approximate index beside the stored rows.

The index is a usearch HNSW graph (the ``search`` extra: ``pip install 'edgeenc[search]'``): one small
dependency with wheels for x86_64 and aarch64 (Jetson), float16 storage (half the memory of the float32 rows,
recall unchanged at this width), one file that can be memory-mapped, and keys of our choosing (the results
file's window ids, an archive's row numbers). It is what Perch's hoplite uses for the same job.

An index lives in a folder beside what it indexes::

    <folder>/current.json          which file is the index and what it covers (the commit point)
    <folder>/vectors-<ns>.usearch  the index; older ones are removed once current.json names a newer one

Saving writes a new vectors file (fsynced), then replaces current.json atomically, so a kill or a power cut
at any moment leaves the previous complete index or the new one. current.json holds the file's size and
sha256, checked before the file is opened: usearch trusts its input (a damaged file can crash the process),
so a file that does not match is never opened; it is "corrupt" and rebuilt from the rows.

What an index covers (`source` in current.json) is the caller's: a results file's identity and the highest
window id it holds, or the archive shards it holds. The caller decides whether that is still true
(:meth:`VectorIndex.load` takes a check) and what to search exactly beside it (rows added since).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeenc.hashing import sha256_file

from .atomic import atomic_path, write_json_atomic

__all__ = ["INDEX_EXTRA", "Hit", "IndexProblem", "IndexSettings", "IndexUnavailable", "Nearest", "VectorIndex",
           "have_index_library", "normalised"]

INDEX_EXTRA = "pip install 'edgeenc[search]'"
FORMAT = 1
CURRENT = "current.json"


class IndexUnavailable(ImportError):
    """usearch is not installed: searches are exact."""

    def __init__(self) -> None:
        super().__init__(f"the nearest-neighbour index needs usearch: {INDEX_EXTRA}")


class IndexProblem(Exception):
    """An index that cannot be used as it is (missing, stale or corrupt); `reason` says which and why."""

    def __init__(self, folder: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = str(folder), reason


def have_index_library() -> bool:
    try:
        _usearch()
    except IndexUnavailable:
        return False
    return True


def _usearch():
    # usearch 2.26.2-2.26.6 crash the process when onnxruntime is loaded after them; loaded before, both work.
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    try:
        import usearch
        from usearch.index import Index
    except ImportError:
        raise IndexUnavailable() from None
    return usearch, Index


@dataclass(frozen=True)
class IndexSettings:
    """HNSW's knobs. connectivity (M) and expansion_add (efConstruction) are fixed when the graph is built;
    expansion_search (ef) is per search and at least the number of neighbours asked for. Clustered embeddings
    (many near neighbours at similar distances) need a denser graph and a wider search than usearch's defaults
    (16, 128, 64): measured in benchmarks/search/ (recall@10 and latency at 1 M windows)."""

    connectivity: int = 32
    expansion_add: int = 200
    expansion_search: int = 1024
    dtype: str = "f16"


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (a zero row stays zero: cosine 0 with everything)."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class Nearest:
    """The `top` stored windows with the highest cosine to ANY of the query windows, fed in batches.

    Keys are whatever names a stored window (a window id, an archive row); ties keep the first fed."""

    def __init__(self, queries: np.ndarray, top: int) -> None:
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        self.queries = normalised(queries)
        self.top = top
        self.keys = np.zeros(0, np.int64)
        self.cosines = np.zeros(0, np.float64)

    @property
    def dim(self) -> int:
        return int(self.queries.shape[1])

    def feed(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Score stored rows exactly (max cosine over the query windows) and keep the best."""
        if not len(keys):
            return
        if vectors.shape[1] != self.dim:
            raise ValueError(f"stored embeddings have {vectors.shape[1]} dims, the query {self.dim}")
        cos = (normalised(vectors) @ self.queries.T).max(axis=1)
        self.offer(np.asarray(keys, np.int64), cos)

    def offer(self, keys: np.ndarray, cosines: np.ndarray) -> None:
        """Candidates already scored; a key offered twice keeps its higher score."""
        keys = np.concatenate([self.keys, np.asarray(keys, np.int64)])
        cos = np.concatenate([self.cosines, np.asarray(cosines, np.float64)])
        order = np.lexsort((np.arange(len(keys)), -cos))  # by cosine, then first offered
        keys, cos = keys[order], cos[order]
        _, first = np.unique(keys, return_index=True)
        keep = np.sort(first)[: self.top]
        self.keys, self.cosines = keys[keep], cos[keep]

    def best(self) -> list[tuple[int, float]]:
        return [(int(k), float(c)) for k, c in zip(self.keys, self.cosines)]


class VectorIndex:
    """A usearch index with what it covers (`source`), saved and loaded as described in the module's text."""

    # Below this many windows a search scores every row exactly (tens of milliseconds): HNSW graphs of a few
    # hundred clustered windows can leave a node unreachable (measured: 1 in 60 searches of 300 windows missed one
    # of the top 10), and exact is what a small file deserves.
    exact_below = 20000

    def __init__(self, index, dim: int, settings: IndexSettings, source: dict | None = None) -> None:
        self.index = index
        self.dim = dim
        self.settings = settings
        self.source: dict = dict(source or {})

    def pays(self) -> bool:
        """Whether searching through the index beats scoring every row."""
        return len(self.index) >= self.exact_below

    @classmethod
    def new(cls, dim: int, settings: IndexSettings | None = None) -> VectorIndex:
        _, Index = _usearch()
        settings = settings or IndexSettings()
        index = Index(ndim=dim, metric="cos", dtype=settings.dtype, connectivity=settings.connectivity,
                      expansion_add=settings.expansion_add, expansion_search=settings.expansion_search)
        return cls(index, dim, settings)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, keys: np.ndarray, vectors: np.ndarray, threads: int = 0) -> None:
        if not len(keys):
            return
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.shape[1] != self.dim:
            raise ValueError(f"vectors of {v.shape[1]} dims for an index of {self.dim}")
        self.index.add(np.asarray(keys, np.uint64), v, threads=threads)

    def remove(self, keys: Iterable[int]) -> None:
        present = [k for k in keys if k in self.index]
        if present:
            self.index.remove(np.asarray(present, np.uint64))

    def candidates(self, queries: np.ndarray, count: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(keys, cosines) of the `count` nearest indexed rows of each query window, flattened."""
        if not len(self.index):
            return np.zeros(0, np.int64), np.zeros(0)
        q = np.ascontiguousarray(normalised(queries), dtype=np.float32)
        self.index.expansion_search = max(self.settings.expansion_search, count)
        found = self.index.search(q, count, threads=threads)
        if not hasattr(found, "counts"):  # one query: usearch answers with its found rows only
            return np.asarray(found.keys, np.int64), 1.0 - np.asarray(found.distances, np.float64)
        keys, distances, counts = np.atleast_2d(found.keys), np.atleast_2d(found.distances), found.counts
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        return keys[valid].astype(np.int64), 1.0 - distances[valid].astype(np.float64)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored (float16) copies of indexed rows, as float32 [n, dim]."""
        got = self.index.get(np.asarray(keys, np.uint64))
        rows = got if isinstance(got, tuple) else list(got)
        return np.stack([np.asarray(r, np.float32).reshape(self.dim) for r in rows]) if len(rows) else \
            np.zeros((0, self.dim), np.float32)

    # -- files -------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write a new vectors file, then make it current (atomically); older vectors files are removed."""
        usearch, _ = _usearch()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"vectors-{time.time_ns():020d}.usearch"
        with atomic_path(folder / name) as tmp:
            self.index.save(tmp)
            digest = sha256_file(tmp)
            size = os.path.getsize(tmp)
        write_json_atomic(folder / CURRENT, {
            "format": FORMAT, "file": name, "bytes": size, "sha256": digest, "count": len(self.index),
            "dim": self.dim, "metric": "cos", "settings": vars(self.settings), "usearch": usearch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": self.source,
        })
        for old in folder.glob("vectors-*.usearch"):
            if old.name != name:
                with contextlib.suppress(OSError):
                    old.unlink()
        return folder / name

    @classmethod
    def load(cls, folder: str | os.PathLike, check: Callable[[dict], str | None] | None = None,
             view: bool = True) -> VectorIndex:
        """The current index of `folder`. Raises IndexProblem when it is missing, damaged, or `check(source)`
        names a reason it no longer fits; IndexUnavailable without usearch. `view`: memory-mapped, read-only."""
        _, Index = _usearch()
        folder = Path(folder)
        current = folder / CURRENT
        try:
            state = json.loads(current.read_text())
        except FileNotFoundError:
            raise IndexProblem(folder, "missing") from None
        except (OSError, ValueError) as exc:
            raise IndexProblem(folder, f"corrupt ({CURRENT} cannot be read: {exc})") from None
        try:
            if state["format"] != FORMAT:
                raise IndexProblem(folder, f"written in index format {state['format']}, this edgeenc reads {FORMAT}")
            name, size, digest = str(state["file"]), int(state["bytes"]), str(state["sha256"])
            dim, count = int(state["dim"]), int(state["count"])
            settings = IndexSettings(**state["settings"])
            source = dict(state["source"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexProblem(folder, f"corrupt ({CURRENT} lacks or mistypes {exc})") from None
        if os.path.basename(name) != name or not name.endswith(".usearch"):
            raise IndexProblem(folder, f"corrupt ({CURRENT} names {name!r}, not a vectors file of the folder)")
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            raise IndexProblem(folder, f"corrupt ({name} is missing)") from None
        if actual != size or sha256_file(path) != digest:
            raise IndexProblem(folder, f"corrupt ({name} is not the file that was saved: size or sha256 differ)")
        reason = check(source) if check else None
        if reason:
            raise IndexProblem(folder, f"stale ({reason})")
        try:
            index = Index.restore(str(path), view=view)
        except (RuntimeError, ValueError) as exc:
            raise IndexProblem(folder, f"corrupt ({name}: {exc})") from None
        if index is None or index.ndim != dim or len(index) != count:
            raise IndexProblem(folder, f"corrupt ({name} does not hold {count} vectors of {dim} dims)")
        index.expansion_search = settings.expansion_search
        return cls(index, dim, settings, source)


@dataclass(frozen=True)
class Hit:
    """One stored window found by a search: where it is, how close, and the labels stored with it (if any)."""

    file: str
    start: float
    end: float
    cosine: float
    labels: tuple[str, ...] = ()
