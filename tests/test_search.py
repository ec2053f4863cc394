"""Find similar windows (issue 28): the nearest-neighbour index beside a results file agrees with the exact search,
follows the committed rows (kill -9 included), is rebuilt when missing, stale or corrupt, and its hits become
labelled data for `edgeenc probe train`. The archive side is in test_ray.py (archives written by --engine ray)."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from clirun import cli
from stall import STALLING_INDEX_SAVE_CLI, kill_when_stalled

pytest.importorskip("usearch")

from edgeenc.cli_common import ExitStatus  # noqa: E402
from edgeenc.runtime.neighbours import IndexProblem, Nearest, VectorIndex  # noqa: E402
from edgeenc.runtime.recorder import Store, index_folder, keep_index, search_store  # noqa: E402
from edgeenc.runtime.recorder.store import FileInfo  # noqa: E402
from edgeenc.runtime.recorder.store_index import StoreIndex, load_store_index  # noqa: E402

DIM = 32
RATE = 16000


def clustered(n: int, seed: int, centres: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = np.random.default_rng(99).standard_normal((centres, DIM))
    return (middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, DIM))).astype(np.float32)


def fill(store: Store, files: int, per_file: int, seed: int = 0, prefix: str = "/data/rec") -> None:
    vectors = clustered(files * per_file, seed)
    for f in range(files):
        rows = vectors[f * per_file:(f + 1) * per_file]
        starts = np.arange(per_file, dtype=np.float64) * 5.0
        store.record_done(FileInfo(f"{prefix}{f:03d}.wav", 1, 1, f"{prefix}-{seed}-{f}"), starts, starts + 5.0,
                          rows, detections=[(0, "owl", 1, 0.9)], audio_seconds=per_file * 5.0)


def new_store(path: Path) -> Store:
    return Store.open(path, model_id="m", bundle_hash="b" * 64, embedding_dim=DIM)


def hits_of(store: Store, queries: np.ndarray, top: int = 10, exact: bool = False):
    return [(h.file, h.start, round(h.cosine, 6)) for h in search_store(store, queries, top, exact=exact)]


def test_the_index_gives_the_exact_search_top_10_on_a_small_file(tmp_path, monkeypatch):
    monkeypatch.setattr(VectorIndex, "exact_below", 0)  # through the index, small as this file is
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        keep_index(store)
        fill(store, files=60, per_file=50)  # 3000 windows
    assert (Path(index_folder(store)) / "current.json").is_file()
    with Store.open_reader(db) as store:
        index = load_store_index(store)
        assert len(index) == 3000 and index.source["rows"] == 3000
        found = wanted = 0
        for seed in range(40):  # 40 queries of 1 to 4 windows each
            queries = clustered(1 + seed % 4, 1000 + seed)
            got, want = hits_of(store, queries), hits_of(store, queries, exact=True)
            assert len(got) == 10 and [c for *_, c in got] == sorted((c for *_, c in got), reverse=True)
            exact_cosine = {(f, s): c for f, s, c in want}
            for f, s, c in got:  # re-scored from the stored float32 rows: the exact figure, not float16's
                assert c == exact_cosine.get((f, s), c)
            found += len(set(got) & set(want))
            wanted += len(want)
        # HNSW is approximate even at 3000 windows (a graph of clustered windows can leave a node unreachable);
        # measured over repeated runs: 0 to 2 misses of these 400.
        assert found / wanted >= 0.98


def test_a_small_file_is_scored_exactly_while_its_index_is_kept(tmp_path):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        keep_index(store)
        fill(store, files=10, per_file=30)
    with Store.open_reader(db) as store:
        assert len(load_store_index(store)) == 300 < VectorIndex.exact_below
        for seed in range(30):
            queries = clustered(1, 2000 + seed)
            assert hits_of(store, queries) == hits_of(store, queries, exact=True)


def test_nearest_takes_the_best_query_window_and_keeps_ties_in_order():
    queries = np.eye(3)[:2]  # two query windows
    nearest = Nearest(queries, top=2)
    nearest.feed(np.array([7, 8, 9]), np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]]))
    assert nearest.best() == [(8, 1.0), (9, 1.0)]
    nearest.offer(np.array([8, 5]), np.array([0.5, 0.99]))  # 8 keeps its higher score
    assert nearest.best() == [(8, 1.0), (9, 1.0)]


def test_rows_committed_after_the_last_save_are_searched_exactly(tmp_path, monkeypatch):
    db = tmp_path / "r.sqlite"
    monkeypatch.setattr(StoreIndex, "save_every", 10**9)
    store = new_store(db)
    keep_index(store)  # empty file: saved at once, holding nothing
    fill(store, files=4, per_file=25)
    # Still open: the saved index holds none of the 100 rows; search sees them all through the tail.
    with Store.open_reader(db) as reader:
        assert len(load_store_index(reader)) == 0
        queries = clustered(2, 7)
        assert hits_of(reader, queries) == hits_of(reader, queries, exact=True)
    store.close()  # saves
    with Store.open_reader(db) as reader:
        assert len(load_store_index(reader)) == 100


def test_a_replaced_recording_makes_a_saved_index_stale_and_it_is_rebuilt(tmp_path, monkeypatch):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        keep_index(store)
        fill(store, files=5, per_file=20)
    monkeypatch.setattr(StoreIndex, "save_every", 10**9)
    store = new_store(db)
    keep_index(store)
    # The last file again with new content: its 20 windows go, 20 new ones may take the same ids.
    starts = np.arange(20) * 5.0
    store.record_done(FileInfo("/data/rec004.wav", 2, 2, "new content"), starts, starts + 5, clustered(20, 5))
    with Store.open_reader(db) as reader:
        with pytest.raises(IndexProblem, match="windows were replaced"):
            load_store_index(reader)
        notes: list[str] = []
        queries = clustered(3, 11)
        got = [(h.file, h.start, round(h.cosine, 6)) for h in search_store(reader, queries, 10, on_note=notes.append)]
        assert got == hits_of(reader, queries, exact=True)
        assert any("stale (windows were replaced" in n for n in notes)
        assert any("a watcher holds" in n for n in notes)  # the writer is still open: rebuilt for this search only
    store.close()
    with Store.open_reader(db) as reader:
        assert len(load_store_index(reader)) == 100


@pytest.mark.parametrize("damage", ["deleted", "flipped bytes", "truncated", "other file's index"])
def test_a_deleted_or_corrupt_index_is_rebuilt_with_a_message(tmp_path, damage):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        keep_index(store)
        fill(store, files=10, per_file=30)
    folder = Path(index_folder(store))
    vectors = next(folder.glob("vectors-*.usearch"))
    if damage == "deleted":
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    elif damage == "flipped bytes":  # usearch itself would trust this file (and may crash on it)
        data = bytearray(vectors.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
        vectors.write_bytes(bytes(data))
    elif damage == "truncated":
        vectors.write_bytes(vectors.read_bytes()[:1000])
    else:
        other = tmp_path / "other.sqlite"
        with new_store(other) as store:
            keep_index(store)
            fill(store, files=10, per_file=30, seed=3)
        for f in folder.iterdir():
            f.unlink()
        for f in Path(index_folder(store)).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    want = {"deleted": "is missing", "flipped bytes": "is corrupt", "truncated": "is corrupt",
            "other file's index": "is stale (it was built for another results file)"}[damage]
    result = cli("search", db, "--like", "/data/rec003.wav@10", "--top", 5)
    assert result.exit_code == 0, result.output
    assert f"index {folder} {want}" in result.stderr and "rebuilding it from the stored windows" in result.stderr
    exact = cli("search", db, "--like", "/data/rec003.wav@10", "--top", 5, "--exact")
    assert result.stdout == exact.stdout
    assert result.stdout.splitlines()[2].split()[1:5] == ["/data/rec003.wav", "10.000", "15.000", "1.000000"]
    with Store.open_reader(db) as reader:  # saved again: the next search opens it as it is
        assert len(load_store_index(reader)) == 300
    again = cli("search", db, "--like", "/data/rec003.wav@10", "--top", 5)
    assert "rebuilding" not in again.stderr and again.stdout == exact.stdout


def wav(path: Path, seconds: float, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32), RATE, subtype="PCM_16")
    return path


def test_kill9_while_watch_saves_the_index_leaves_it_consistent_with_the_committed_rows(tiny_eat_bundle, tmp_path):
    inbox, db, marker = tmp_path / "inbox", tmp_path / "r.sqlite", tmp_path / "stalled"
    for i in range(6):
        wav(inbox / f"rec{i}.wav", 5.0 + i, seed=i)
    args = ("watch", str(inbox), "--bundle", str(tiny_eat_bundle[0]), "--db", str(db), "--once", "--settle", "0",
            "--poll", "0.05", "--device", "cpu", "--window", "2", "--hop", "1")
    kill_when_stalled([*STALLING_INDEX_SAVE_CLI, *args], 4, marker, timeout=120)
    conn = sqlite3.connect(db)
    committed = conn.execute("SELECT count(*) FROM windows").fetchone()[0]
    conn.close()
    folder = Path(str(db) + ".index")
    assert len(list(folder.glob("vectors-*.usearch"))) == 2  # the one current.json names, and the unfinished one
    with Store.open_reader(db) as reader:
        index = load_store_index(reader)  # the previous save: whole, and never ahead of the committed rows
        assert len(index) < int(marker.read_text()) <= committed
        assert index.source["max_id"] <= reader.conn.execute("SELECT max(id) FROM windows").fetchone()[0]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    with Store.open_reader(db) as reader:
        total = reader.conn.execute("SELECT count(*) FROM windows").fetchone()[0]
        index = load_store_index(reader)
        assert len(index) == total == index.source["rows"] and total > committed
        assert len(list(folder.glob("vectors-*.usearch"))) == 1
        for i in range(6):
            query = reader.conn.execute(
                "SELECT w.embedding FROM windows w JOIN files f ON f.id = w.file_id WHERE f.path LIKE ? LIMIT 1",
                (f"%rec{i}.wav",)).fetchone()[0]
            q = np.frombuffer(query, "<f4")[None, :]
            assert hits_of(reader, q) == hits_of(reader, q, exact=True)


def test_search_by_a_time_range_and_the_hits_table_trains_a_probe(tiny_eat_bundle, tmp_path):
    pytest.importorskip("sklearn")
    bundle = tiny_eat_bundle[0]
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    for i in range(4):
        wav(inbox / f"rec{i}.wav", 6.0, seed=20 + i)
    assert cli("watch", inbox, "--bundle", bundle, "--db", db, "--once", "--settle", 0, "--device", "cpu",
               "--window", 2, "--hop", 2).exit_code == 0
    target = inbox / "rec2.wav"
    out = tmp_path / "hits.csv"
    result = cli("search", db, target, "--bundle", bundle, "--start", 2, "--end", 4, "--window", 2, "--hop", 2,
                 "--top", 12, "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[2].split()
    assert first[1:5] == [str(target.resolve()), "2.000", "4.000", "1.000000"]  # the part itself
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["rank", "file", "start", "end", "cosine", "stored_labels", "label"]
    assert len(table) == 12 and all(r["label"] == "" for r in table)
    assert json.loads(Path(str(out) + ".json").read_text())["query"] == f"{target} [2, 4]"
    # A person fills in the label column: two recordings each way, the others left empty (not used).
    for row in table:
        name = Path(row["file"]).name
        row["label"] = "call" if name in ("rec0.wav", "rec2.wav") and row["start"] == "2.0" else (
            "no" if name in ("rec1.wav", "rec3.wav") and row["start"] == "0.0" else "")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    from edgeenc.runtime.probes import load_labelled

    recordings = {Path(r.path).name: r for r in load_labelled(out)}
    assert sorted(recordings) == ["rec0.wav", "rec1.wav", "rec2.wav", "rec3.wav"]
    assert not recordings["rec0.wav"].complete  # only the rows a person labelled are used
    assert [(s.start, s.end, s.label) for s in recordings["rec2.wav"].spans] == [(2.0, 4.0, "call")]
    assert [(s.start, s.end, s.label) for s in recordings["rec1.wav"].spans] == [(0.0, 2.0, None)]
    probe = tmp_path / "probe"
    trained = cli("probe", "train", bundle, out, "-o", probe, "--window", 2, "--hop", 2, "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    card = json.loads((probe / "probe.json").read_text())
    assert card["classes"] == ["call"] and card["data"]["windows"] == 4  # 2 labelled + 2 negative windows, no more
    refused = cli("search", db, target, "--bundle", bundle, "-o", out, "--device", "cpu")
    assert refused.exit_code == ExitStatus.USAGE and "--overwrite" in refused.stderr


def test_search_refuses_unclear_queries(tmp_path):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        fill(store, files=2, per_file=3)
    for args, message in [((), "one of the two"), (("--like", "nowhere"), "expected FILE@SECONDS"),
                          (("--like", "/data/rec000.wav@12.6"), "no window of /data/rec000.wav starts near 12.6 s"),
                          (("--like", "/data/other.wav@0"), "holds no windows of '/data/other.wav'"),
                          (("--like", "/data/rec000.wav@0", "--top", 0), "--top must be at least 1"),
                          ((str(tmp_path / "a.wav"),), "pass --bundle")]:
        result = cli("search", db, *args)
        assert result.exit_code == ExitStatus.USAGE and message in result.stderr, (args, result.output)
        assert "Traceback" not in result.output
    folder = tmp_path / "plain"
    folder.mkdir()
    result = cli("search", folder, "--like", "x@0")
    assert result.exit_code == ExitStatus.USAGE and "without shards/" in result.stderr
    table = tmp_path / "embeddings.parquet"
    table.write_bytes(b"PAR1")
    for command in (("search", table, "--like", "x@0"), ("index", table)):
        result = cli(*command)
        assert result.exit_code == ExitStatus.USAGE and "a table of embeddings" in result.stderr


def test_index_command_builds_the_index_of_an_older_results_file_and_refuses_a_running_watcher(tmp_path):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:  # no index kept: a file written before the index existed
        fill(store, files=3, per_file=10)
    result = cli("index", db)
    assert result.exit_code == 0, result.output
    assert "30 window(s) indexed, 30 added" in result.stderr
    assert "0 added" in cli("index", db).stderr
    assert "30 window(s) indexed, 30 added" in cli("index", db, "--rebuild").stderr
    with new_store(db):
        busy = cli("index", db)
    assert busy.exit_code == ExitStatus.LOCKED and "keeps the index up to date" in busy.stderr


def test_without_usearch_search_is_exact_and_says_how_to_get_the_index(tmp_path):
    db = tmp_path / "r.sqlite"
    with new_store(db) as store:
        fill(store, files=3, per_file=10)
    blocked = tmp_path / "blocked"
    (blocked / "usearch").mkdir(parents=True)
    (blocked / "usearch" / "__init__.py").write_text("raise ImportError('usearch is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    edgeenc = [sys.executable, "-c", "from edgeenc.cli import main; main()"]
    run = subprocess.run([*edgeenc, "search", str(db), "--like", "/data/rec001.wav@5"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "searching exactly" in run.stderr and "pip install 'edgeenc[search]'" in run.stderr
    assert run.stdout.splitlines()[2].split()[1:5] == ["/data/rec001.wav", "5.000", "10.000", "1.000000"]
    assert not Path(str(db) + ".index").exists()
    index = subprocess.run([*edgeenc, "index", str(db)], capture_output=True, text=True,
                           env=env, timeout=120)
    assert index.returncode == ExitStatus.USAGE and "pip install 'edgeenc[search]'" in index.stderr


def test_vector_index_refuses_a_current_json_naming_a_file_outside_its_folder(tmp_path):
    index = VectorIndex.new(DIM)
    index.add(np.arange(5), clustered(5, 0))
    index.save(tmp_path / "ix")
    state = json.loads((tmp_path / "ix" / "current.json").read_text())
    state["file"] = "../elsewhere.usearch"
    (tmp_path / "ix" / "current.json").write_text(json.dumps(state))
    with pytest.raises(IndexProblem, match="not a vectors file of the folder"):
        VectorIndex.load(tmp_path / "ix")


def test_usearch_and_onnxruntime_load_in_either_order():
    """usearch 2.26.2-2.26.6 crash the process when onnxruntime is imported after them (pyproject pins below)."""
    for first, second in (("usearch.index", "onnxruntime"), ("onnxruntime", "usearch.index")):
        run = subprocess.run([sys.executable, "-c", f"import {first}, {second}"], capture_output=True, timeout=120)
        assert run.returncode == 0, (first, second, run.returncode)


def test_a_parquet_hits_table_with_labels_filled_in_is_labelled_data(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from edgeenc.runtime.neighbours import Hit
    from edgeenc.runtime.probes import LabelledDataError, load_labelled
    from edgeenc.runtime.writers import write_hits

    out = tmp_path / "hits.parquet"
    write_hits(out, [Hit("/data/a.wav", 0.0, 5.0, 0.99, ("owl",)), Hit("/data/b.wav", 5.0, 10.0, 0.9),
                     Hit("/data/c.wav", 0.0, 5.0, 0.8)], metadata={"query": "x"})
    table = pq.read_table(out)
    assert table.column_names == ["rank", "file", "start", "end", "cosine", "stored_labels", "label"]
    assert table.schema.metadata[b"query"] == b"x" and table.column("stored_labels").to_pylist()[0] == ["owl"]
    with pytest.raises(LabelledDataError, match="no row has a label yet"):
        load_labelled(out)
    labelled = table.set_column(6, "label", pa.array(["owl", "no", ""]))
    pq.write_table(labelled, out)
    recordings = {r.path: r for r in load_labelled(out)}
    assert sorted(recordings) == ["/data/a.wav", "/data/b.wav"]  # c left empty: not used
    assert [(s.start, s.end, s.label) for s in recordings["/data/a.wav"].spans] == [(0.0, 5.0, "owl")]
    assert [(s.start, s.end, s.label) for s in recordings["/data/b.wav"].spans] == [(5.0, 10.0, None)]
    a = recordings["/data/a.wav"]
    assert not a.complete and a.used(0.0, 5.0) and a.used(2.0, 7.0) and not a.used(3.0, 8.0)


def test_listen_store_batches_follow_the_index_and_watch_no_index_keeps_none(tiny_eat_bundle, tmp_path):
    from edgeenc.runtime.recorder import LiveStore

    db = tmp_path / "live.sqlite"
    with LiveStore.open(db, model_id="m", bundle_hash="b" * 64, embedding_dim=DIM) as store:
        keep_index(store)
        stream = store.open_stream("-", 16000)
        for batch in range(3):
            starts = np.arange(4, dtype=float) + 4 * batch
            store.record_batch(stream, starts, starts + 1, starts + 1e9, clustered(4, batch),
                               audio_seconds=4.0 * (batch + 1), dropped_seconds=0.0)
    with Store.open_reader(db) as reader:
        index = load_store_index(reader)
        assert len(index) == 12 and index.source["max_id"] == 12
    inbox = tmp_path / "inbox"
    wav(inbox / "a.wav", 3.0, seed=1)
    plain = tmp_path / "plain.sqlite"
    result = cli("watch", inbox, "--bundle", tiny_eat_bundle[0], "--db", plain, "--once", "--settle", 0,
                 "--device", "cpu", "--no-index")
    assert result.exit_code == 0, result.output
    assert not Path(str(plain) + ".index").exists()
