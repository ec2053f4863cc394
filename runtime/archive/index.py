"""Search over an archive written by `--engine ray` (OUT_DIR/shards/part-*.parquet), with its index in
OUT_DIR/index/ (runtime/neighbours.py).

Shards are written once and never changed, so the index covers a list of shards: each one's name, size, mtime
and row count, and the key of its first row (keys are handed out in the order shards are indexed). A covered
shard that is gone or changed makes the index stale (it is rebuilt); a shard written after the index is searched
exactly beside it until `edgeenc index` (or the next `--engine ray` run) adds it.

Cosines of indexed rows come from the index's float16 copy of the embedding (within 1e-3 of the float32 value);
`exact=True` reads every shard's float32 embeddings.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeenc.progress import Counted, Progress

from ..neighbours import Hit, IndexProblem, IndexSettings, Nearest, VectorIndex, have_index_library
from .plan import ArchiveError

__all__ = ["Shard", "archive_index_folder", "archive_window", "index_archive", "is_archive", "search_archive",
           "shard_list"]

_BATCH = 65536


@dataclass(frozen=True)
class Shard:
    path: Path
    size: int
    mtime_ns: int
    rows: int
    bundle: str  # bundle_sha256 of its metadata
    files: tuple[str, ...]  # the recordings it holds, as resumed (absolute paths or URLs)

    @property
    def name(self) -> str:
        return self.path.name


def is_archive(path: str | os.PathLike) -> bool:
    return (Path(path) / "shards").is_dir()


def archive_index_folder(folder: str | os.PathLike) -> Path:
    return Path(folder) / "index"


def shard_list(folder: str | os.PathLike) -> list[Shard]:
    """Every shard of the archive, in name (= written) order; raises ArchiveError for one that cannot be read."""
    import pyarrow.parquet as pq

    shards_dir = Path(folder) / "shards"
    if not shards_dir.is_dir():
        raise ArchiveError(f"{folder}: not an archive of `--engine ray` (no shards/ folder in it)")
    found = []
    for path in sorted(shards_dir.glob("part-*.parquet")):
        try:
            st = path.stat()
            footer = pq.read_metadata(path)
            meta = {k.decode(): v.decode() for k, v in (footer.metadata or {}).items()}
            files = tuple(str(p) for p, _, _ in json.loads(meta.get("edgeenc_files", "[]")))
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"{path}: not a readable edgeenc shard ({exc}); move it out of {shards_dir}") from None
        found.append(Shard(path, st.st_size, st.st_mtime_ns, footer.num_rows, meta.get("bundle_sha256", ""), files))
    return found


def _bundle_of(shards: list[Shard], folder) -> str:
    bundles = {s.bundle for s in shards}
    if len(bundles) > 1:
        raise ArchiveError(f"{folder}: its shards come from {len(bundles)} bundles; search them apart")
    return bundles.pop() if bundles else ""


def _embeddings(shard: Shard) -> Iterator[np.ndarray]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=_BATCH, columns=["embedding"]):
        column = batch.column(0)
        dim = column.type.list_size
        yield column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def _covered(index: VectorIndex) -> list[dict]:
    return list(index.source.get("shards", []))


def _check(shards: list[Shard], bundle: str) -> Callable[[dict], str | None]:
    now = {s.name: s for s in shards}

    def check(source: dict) -> str | None:
        if source.get("bundle") != bundle:
            return "it was built from another bundle's shards"
        for entry in source.get("shards", []):
            shard = now.get(entry.get("name"))
            if shard is None:
                return f"shard {entry.get('name')} is gone"
            recorded = (entry.get("bytes"), entry.get("mtime_ns"), entry.get("rows"))
            if (shard.size, shard.mtime_ns, shard.rows) != recorded:
                return f"shard {shard.name} changed since it was indexed"
        return None

    return check


def index_archive(folder: str | os.PathLike, *, rebuild: bool = False, on_note: Progress | None = None,
                  on_progress: Counted | None = None, settings: IndexSettings | None = None) -> tuple[int, int]:
    """Build or extend the archive's index with the shards it lacks, and save it. Returns (rows added, rows in
    the index). Raises IndexUnavailable without usearch, ArchiveError for an archive that cannot be read."""
    shards = shard_list(folder)
    bundle = _bundle_of(shards, folder)
    index = None
    if not rebuild:
        try:
            index = VectorIndex.load(archive_index_folder(folder), _check(shards, bundle), view=False)
        except IndexProblem as problem:
            if on_note and problem.reason != "missing":
                on_note(f"index {problem.folder} is {problem.reason}: rebuilding it from the shards")
    covered = {entry["name"] for entry in _covered(index)} if index is not None else set()
    todo = [s for s in shards if s.name not in covered]
    if index is not None and not todo:
        return 0, len(index)
    total = sum(s.rows for s in todo)
    added = 0
    for shard in todo:
        key = int(index.source["next_key"]) if index is not None else 0
        for embeddings in _embeddings(shard):
            if index is None:
                index = VectorIndex.new(embeddings.shape[1], settings)
                index.source = {"bundle": bundle, "shards": [], "next_key": 0}
            index.add(np.arange(key, key + len(embeddings), dtype=np.int64), embeddings)
            key += len(embeddings)
            added += len(embeddings)
            if on_progress:
                on_progress(added, total)
        if index is None:  # an empty first shard
            continue
        index.source["shards"].append({"name": shard.name, "bytes": shard.size, "mtime_ns": shard.mtime_ns,
                                       "rows": shard.rows, "first_key": int(index.source["next_key"])})
        index.source["next_key"] = key
    if index is None:
        return 0, 0
    index.save(archive_index_folder(folder))
    return added, len(index)


def search_archive(folder: str | os.PathLike, queries: np.ndarray, top: int = 10, *, exact: bool = False,
                   bundle: str | None = None, on_note: Progress | None = None) -> list[Hit]:
    """The `top` windows of the archive with the highest cosine to any query window, best first. `bundle` (the
    query's bundle hash) must be the shards' own."""
    shards = shard_list(folder)
    made_by = _bundle_of(shards, folder)
    if bundle is not None and made_by and bundle != made_by:
        raise ArchiveError(f"{folder} was made with bundle {made_by[:12]}, the query with {bundle[:12]}: embeddings "
                           "of different bundles cannot be compared")
    nearest = Nearest(queries, top)
    index = None
    if not exact and have_index_library():
        try:
            index = VectorIndex.load(archive_index_folder(folder), _check(shards, made_by))
        except IndexProblem as problem:
            if on_note:
                on_note(f"index {problem.folder} is {problem.reason}: searching exactly (`edgeenc index {folder}` "
                        "builds it)")
    placed: list[tuple[int, Shard]] = []  # (first key, shard), in key order
    by_name = {s.name: s for s in shards}
    if index is not None and index.pays():
        placed = sorted((int(e["first_key"]), by_name[e["name"]]) for e in _covered(index))
        keys, _ = index.candidates(nearest.queries, max(2 * top, top + 16))
        keys = np.unique(keys)
        nearest.feed(keys, index.vectors(keys))
    elif index is not None:
        index = None  # a small archive is scored exactly
    key = int(index.source["next_key"]) if index is not None else 0
    indexed = {shard for _, shard in placed}
    unindexed = [s for s in shards if s not in indexed]
    if index is not None and unindexed and on_note:
        on_note(f"{len(unindexed)} shard(s) written after the index are searched exactly (`edgeenc index {folder}` "
                "adds them)")
    for shard in unindexed:  # keys beyond the index's own, for this search only
        placed.append((key, shard))
        for embeddings in _embeddings(shard):
            nearest.feed(np.arange(key, key + len(embeddings)), embeddings)
            key += len(embeddings)
    return _hits(placed, nearest.best())


def _hits(placed: list[tuple[int, Shard]], best: list[tuple[int, float]]) -> list[Hit]:
    import pyarrow.parquet as pq

    firsts = [first for first, _ in placed]
    wanted: dict[int, list[tuple[int, int]]] = {}  # placed index -> [(row, position in best)]
    for position, (key, _) in enumerate(best):
        at = bisect.bisect_right(firsts, key) - 1
        wanted.setdefault(at, []).append((key - firsts[at], position))
    hits: list[Hit | None] = [None] * len(best)
    for at, rows in wanted.items():
        shard = placed[at][1]
        names = pq.read_schema(shard.path).names
        table = pq.read_table(shard.path, columns=[c for c in ("file", "start", "end", "labels") if c in names])
        taken = table.take([row for row, _ in rows]).to_pylist()
        for (_, position), record in zip(rows, taken):
            hits[position] = Hit(_full_path(record["file"], shard.files), float(record["start"]),
                                 float(record["end"]), best[position][1], tuple(record.get("labels") or ()))
    return [h for h in hits if h is not None]


def _full_path(name: str, files: tuple[str, ...]) -> str:
    """The recording's absolute path (or URL) as the shard's metadata lists it; the name as written otherwise."""
    if name in files:
        return name
    tail = os.sep + os.path.normpath(name).lstrip(os.sep)
    matches = [f for f in files if f.endswith(tail)]
    return matches[0] if len(matches) == 1 else name


def archive_window(folder: str | os.PathLike, file: str, start: float) -> np.ndarray:
    """The stored embedding [1, dim] of FILE's window that starts at START (within half a window)."""
    import pyarrow.parquet as pq

    wanted = {file, os.path.abspath(file)}
    best: tuple[float, Shard, int, float, float] | None = None
    for shard in shard_list(folder):
        table = pq.read_table(shard.path, columns=["file", "start", "end"])
        names = table.column("file").to_pylist()
        starts = table.column("start").to_numpy()
        ends = table.column("end").to_numpy()
        rows = [i for i, name in enumerate(names) if name in wanted or _full_path(name, shard.files) in wanted]
        for i in rows:
            if best is None or abs(starts[i] - start) < best[0]:
                best = (abs(starts[i] - start), shard, i, float(starts[i]), float(ends[i]))
    if best is None:
        raise ArchiveError(f"{folder} holds no windows of {file!r} (its shards' file column names them)")
    _, shard, row, found, end = best
    if abs(found - start) > (end - found) / 2:
        raise ArchiveError(f"{folder}: no window of {file} starts near {start:g} s (nearest: {found:g} s)")
    column = pq.read_table(shard.path, columns=["embedding"]).column("embedding").slice(row, 1).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(1, -1).astype(np.float32)
