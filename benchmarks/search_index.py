"""The nearest-neighbour index of `edgeenc search` at scale (issue 28), in one run on this machine.

    python benchmarks/search_index.py --windows 1000000 --out benchmarks/search/RESULTS.json

1. N synthetic 768-d windows, clustered like real embeddings (a shared mean direction, a few thousand clusters of
   very different sizes and spreads), written to a results file through the recorder's Store in files of 360
   windows (an hour of 10 s windows), as `edgeenc watch` writes them. Or, with --results FILE, a results file
   that `edgeenc watch` wrote (a copy is indexed; queries are its own stored windows, as `--like` takes them).
2. The index built from the stored rows (`edgeenc index RESULTS`): build time, size on disk, peak memory.
3. Queries: Q single windows (each a stored window plus noise, from random files) and Q/10 recordings of 6
   windows. The exact top-10 (cosine, max over a query's windows) is computed in numpy from the same rows;
   the index's answer is `search_store` (candidates from the index, re-scored from the stored float32 rows,
   labels looked up; through the index even below VectorIndex.exact_below, where `edgeenc search` itself scores
   exactly): recall@10 against the exact one, latency p50/p99 in a warm process. The exact search
   that `--exact` runs (every stored row read from SQLite) is timed on a few queries as the reference.

Prints a JSON report with the CPU flags (lscpu) and versions; --out writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeenc.runtime.neighbours import IndexSettings, Nearest, VectorIndex  # noqa: E402
from edgeenc.runtime.recorder import Store, index_folder, rebuild_store_index, search_store  # noqa: E402
from edgeenc.runtime.recorder.store import FileInfo  # noqa: E402

DIM = 768
PER_FILE = 360


def clustered_windows(n: int, seed: int) -> np.ndarray:
    """Clustered like embeddings of recordings: every vector shares a mean direction (real embeddings have high
    average cosine), clusters have Zipf-like sizes and different spreads, and vectors of one file are close."""
    rng = np.random.default_rng(seed)
    clusters = max(50, n // 400)
    mean = rng.standard_normal(DIM).astype(np.float32) * 1.5
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    spread = rng.uniform(0.3, 0.9, clusters).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, PER_FILE):  # one file: a few clusters, as a recording has a few kinds of sound
        size = min(PER_FILE, n - start)
        mine = rng.choice(clusters, size=3, p=weights / weights.sum())
        pick = mine[rng.integers(0, 3, size)]
        out[start:start + size] = (mean + centres[pick]
                                   + spread[pick, None] * rng.standard_normal((size, DIM)).astype(np.float32))
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(stored_unit: np.ndarray, queries: np.ndarray, top: int) -> list[int]:
    """Row numbers (0-based) of the exact top by max cosine over the query windows (float32 scan, float64 refine)."""
    q = unit(queries.astype(np.float64)).astype(np.float32)
    best = np.full(len(stored_unit), -np.inf, np.float32)
    for start in range(0, len(stored_unit), 200_000):
        block = stored_unit[start:start + 200_000] @ q.T
        best[start:start + 200_000] = block.max(axis=1)
    shortlist = np.argpartition(-best, top * 4)[: top * 4]
    refined = (unit(stored_unit[shortlist].astype(np.float64)) @ unit(queries.astype(np.float64)).T).max(axis=1)
    order = np.lexsort((shortlist, -refined))[:top]
    return [int(shortlist[i]) for i in order]


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return f"{model}; {' '.join(keep)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--exact-queries", type=int, default=3)
    ap.add_argument("--expansion-search", type=int, default=IndexSettings().expansion_search)
    ap.add_argument("--sweep", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128, 256, 512, 1024],
                    help="expansion_search values to measure the index alone at")
    ap.add_argument("--work", type=Path, default=None, help="folder for the results file (default: a temporary one)")
    ap.add_argument("--results", type=Path, default=None, help="index and query this results file (a copy of it) "
                    "instead of synthetic windows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import usearch

    VectorIndex.exact_below = 0  # measure the index itself, however small (`search` scores small files exactly)
    work = Path(args.work or tempfile.mkdtemp(prefix="search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "results.sqlite"
    for stale in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(str(db) + ".index", ignore_errors=True)
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_flags(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "usearch": usearch.__version__, "windows": args.windows, "dim": DIM,
                    "settings": vars(IndexSettings(expansion_search=args.expansion_search))}

    if args.results is None:
        started = time.perf_counter()
        vectors = clustered_windows(args.windows, seed=0)
        report["generate_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        with Store.open(db, model_id="synthetic", bundle_hash="s" * 64, embedding_dim=DIM) as store:
            for f, start in enumerate(range(0, args.windows, PER_FILE)):
                rows = vectors[start:start + PER_FILE]
                starts = np.arange(len(rows), dtype=np.float64) * 10.0
                store.record_done(FileInfo(f"/season/rec{f:05d}.wav", 1, 1, f"sha-{f}"), starts, starts + 10.0,
                                  rows, detections=[(0, f"cluster-{f % 7}", 1, 0.9)], audio_seconds=len(rows) * 10.0)
        report["write_results_s"] = round(time.perf_counter() - started, 1)
    else:
        shutil.copyfile(args.results, db)
        report["results"] = str(args.results)
    with Store.open_reader(db) as store:
        rows = store.conn.execute('SELECT w.id, f.path, w.start, w.embedding FROM windows w JOIN files f ON '
                                  "f.id = w.file_id ORDER BY w.id").fetchall()
        ids = np.array([r[0] for r in rows])
        where = [(r[1], float(r[2])) for r in rows]
        if args.results is not None:
            vectors = np.stack([np.frombuffer(r[3], "<f4") for r in rows])
            report["windows"], report["dim"] = len(rows), int(vectors.shape[1])
        del rows
    report["results_file_bytes"] = db.stat().st_size

    started = time.perf_counter()
    with Store.open_reader(db) as store:
        index = rebuild_store_index(store, settings=IndexSettings(expansion_search=args.expansion_search))
        built = time.perf_counter() - started
        index.save(index_folder(store))
    report["index_build_s"] = round(built, 1)
    report["index_build_and_save_s"] = round(time.perf_counter() - started, 1)
    report["index_bytes"] = sum(p.stat().st_size for p in Path(index_folder(store)).glob("vectors-*.usearch"))
    report["index_memory_bytes"] = int(index.index.memory_usage)
    report["peak_rss_bytes_after_build"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del index

    rng = np.random.default_rng(1)
    stored_unit = unit(vectors)
    del vectors
    queries = []
    for i in range(args.queries):
        size = 6 if i % 10 == 9 else 1  # one in ten queries is a recording of 6 windows
        if args.results is None:  # a stored window plus noise: a new call like a stored one
            file = int(rng.integers(0, len(stored_unit) // PER_FILE))
            base = stored_unit[file * PER_FILE + rng.integers(0, PER_FILE, size)]
            queries.append(base + 0.02 * rng.standard_normal(base.shape).astype(np.float32))
        else:  # stored windows themselves (consecutive ones for a recording): what --like asks
            first = int(rng.integers(0, len(stored_unit) - size + 1))
            queries.append(stored_unit[first:first + size].copy())

    truth = [exact_top(stored_unit, q, 10) for q in queries]
    with Store.open_reader(db) as store:
        started = time.perf_counter()
        search_store(store, queries[0], 10)  # opens the index: sha256 of the file, then memory-mapped
        report["open_index_s"] = round(time.perf_counter() - started, 2)
        latencies, found = [], 0
        for q, want in zip(queries, truth):
            t = time.perf_counter()
            hits = search_store(store, q, 10)
            latencies.append(time.perf_counter() - t)
            found += len({(h.file, h.start) for h in hits} & {where[i] for i in want})
        report["recall_at_10"] = round(found / (10 * len(queries)), 4)
        report["search_p50_ms"] = round(1000 * float(np.median(latencies)), 2)
        report["search_p99_ms"] = round(1000 * float(np.quantile(latencies, 0.99)), 2)
        report["rss_bytes_while_searching"] = _rss()
        index = VectorIndex.load(index_folder(store))
        report["sweep"] = []  # the index alone at other widths of search, re-scored from the rows in memory
        for ef in args.sweep:
            index.settings = IndexSettings(**{**vars(index.settings), "expansion_search": ef})
            raw, found = [], 0
            for q, want in zip(queries, truth):
                t = time.perf_counter()
                keys, _ = index.candidates(q, 10)
                raw.append(time.perf_counter() - t)
                rows = np.searchsorted(ids, np.unique(keys))
                nearest = Nearest(q, 10)
                nearest.feed(rows, stored_unit[rows])
                found += len({k for k, _ in nearest.best()} & set(want))
            report["sweep"].append({"expansion_search": ef, "recall_at_10": round(found / (10 * len(queries)), 4),
                                    "index_p50_ms": round(1000 * float(np.median(raw)), 3),
                                    "index_p99_ms": round(1000 * float(np.quantile(raw, 0.99)), 3)})
        exact_times, exact_found = [], 0
        for q, want in list(zip(queries, truth))[: args.exact_queries]:
            t = time.perf_counter()
            hits = search_store(store, q, 10, exact=True)
            exact_times.append(time.perf_counter() - t)
            exact_found += len({(h.file, h.start) for h in hits} & {where[i] for i in want})
        report["exact_search_median_s"] = round(float(np.median(exact_times)), 2)
        report["exact_search_recall_check"] = round(exact_found / (10 * len(exact_times)), 4)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return -1


if __name__ == "__main__":
    main()
