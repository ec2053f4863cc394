"""Recorder mode: `edgeenc watch` into SQLite, crash safety, duplicates, changes, export and search."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from stall import STALLING_CLI, kill_when_stalled

from edgeenc.runtime import ScoreOptions
from edgeenc.runtime.encoder import Encoder
from edgeenc.runtime.recorder import Store, watch
from edgeenc.runtime.recorder.store import StoreLocked

RATE = 16000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from edgeenc.export.pipeline import export_bundle
    from edgeenc.models.checkpoints import load_model

    loaded = load_model("esp_aves2_sl_eat_all_ssl_all", random_init=True, embed_dim=64, depth=2, heads=4,
                        max_length=64)
    target = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(loaded, target)
    return target


@pytest.fixture(scope="module")
def encoder(bundle) -> Encoder:
    return Encoder.load(bundle, "cpu", threads=1)


def wav_bytes(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32), RATE, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def write_wav(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(seconds, seed))
    return path


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgeenc.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, **kw)


def rows(db: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def run_once(inbox: Path, encoder: Encoder, db: Path, **kw):
    events: list[tuple[str, str, str]] = []
    with Store.for_encoder(db, encoder) as store:
        summary = watch(inbox, encoder, store, once=True, settle_seconds=0, poll_seconds=0.05,
                        on_event=lambda *e: events.append(e), **kw)
    return summary, events


def test_kill9_inside_a_file_transaction_loses_and_duplicates_nothing(bundle, tmp_path):
    inbox = tmp_path / "inbox"
    files = [write_wav(inbox / f"rec{i}.wav", 1.0 + 0.5 * (i % 3), seed=i) for i in range(5)]
    db, marker = tmp_path / "results.sqlite", tmp_path / "stalled"
    args = ("watch", str(inbox), "--bundle", str(bundle), "--db", str(db), "--once", "--settle", "0",
            "--poll", "0.05", "--device", "cpu")
    kill_when_stalled([*STALLING_CLI, *args], 3, marker)
    killed = marker.read_text()
    # Before the restart: the killed file has no rows at all, the two committed before it are whole.
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    done = [p for (p,) in rows(db, "SELECT path FROM files ORDER BY path")]
    assert killed not in done and done == [str(f.resolve()) for f in files[:2]]
    assert rows(db, "SELECT count(*) FROM windows w JOIN files f ON f.id = w.file_id WHERE f.path = ?",
                killed) == [(0,)]
    assert rows(db, "SELECT count(*) FROM windows WHERE file_id NOT IN (SELECT id FROM files)") == [(0,)]
    # Restart (the kernel dropped the dead watcher's lock): everything once, exactly.
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    per_file = dict(rows(db, "SELECT f.path, count(w.id) FROM files f LEFT JOIN windows w ON w.file_id = f.id "
                             "WHERE f.status = 'done' GROUP BY f.path"))
    assert per_file == {str(f.resolve()): 1 for f in files}
    assert rows(db, "SELECT count(*) FROM windows") == [(5,)]
    assert rows(db, "SELECT count(*) FROM detections") == [(25,)]  # top-5 of the tiny head per window
    again = cli(*args)
    assert again.returncode == 0 and rows(db, "SELECT count(*) FROM windows") == [(5,)]


def test_a_growing_file_is_not_read_before_it_settles(encoder, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    inbox.mkdir()
    data = wav_bytes(2.0, seed=7)
    target = inbox / "growing.wav"
    events: list[tuple[str, str, str]] = []
    stop = threading.Event()

    def writer() -> None:
        with open(target, "wb") as f:
            for i in range(0, len(data), len(data) // 12):
                f.write(data[i:i + len(data) // 12])
                f.flush()
                time.sleep(0.12)

    def watcher() -> None:
        with Store.for_encoder(db, encoder) as store:
            watch(inbox, encoder, store, settle_seconds=0.8, poll_seconds=0.05, stop=stop,
                  on_event=lambda *e: events.append(e))

    t_watch = threading.Thread(target=watcher)
    t_watch.start()
    writer()
    written = time.time()
    deadline = written + 15
    while not events and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    t_watch.join(10)
    assert [e[0] for e in events] == ["done"], events
    (size, seconds, status), = rows(db, "SELECT size, audio_seconds, status FROM files")
    assert (size, status) == (len(data), "done") and seconds == pytest.approx(2.0)


def test_corrupt_files_are_recorded_as_failed_and_not_retried(encoder, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    write_wav(inbox / "good.wav", seed=1)
    (inbox / "junk.wav").write_bytes(b"not audio at all" * 10)
    (inbox / "empty.flac").write_bytes(b"")
    whole = wav_bytes(2.0, seed=2)
    (inbox / "cut.wav").write_bytes(whole[: len(whole) // 2])
    summary, events = run_once(inbox, encoder, db)
    assert (summary.done, summary.failed) == (1, 3)
    failed = dict(rows(db, "SELECT path, error FROM files WHERE status = 'failed'"))
    by_name = {Path(p).name: e for p, e in failed.items()}
    assert "libsndfile cannot read it" in by_name["junk.wav"]
    assert "empty" in by_name["empty.flac"]
    assert "truncated" in by_name["cut.wav"]
    summary, events = run_once(inbox, encoder, db)
    assert events == [] and (summary.done, summary.failed) == (0, 0)
    (inbox / "cut.wav").write_bytes(whole)  # repaired: changed, so taken again
    summary, events = run_once(inbox, encoder, db)
    assert [(k, Path(p).name) for k, p, _ in events] == [("done", "cut.wav")]
    assert rows(db, "SELECT status FROM files WHERE path LIKE '%cut.wav'") == [("done",)]


def test_a_renamed_duplicate_is_skipped_and_a_changed_file_is_reprocessed(encoder, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    a = write_wav(inbox / "a.wav", 1.0, seed=3)
    run_once(inbox, encoder, db)
    (old_embedding,), = rows(db, "SELECT embedding FROM windows")
    a.rename(inbox / "renamed.wav")
    summary, events = run_once(inbox, encoder, db)
    assert [e[0] for e in events] == ["alias"] and summary.done == 0
    assert rows(db, "SELECT count(*) FROM windows") == [(1,)]
    assert rows(db, "SELECT count(*) FROM aliases") == [(1,)]
    write_wav(inbox / "renamed.wav", 3.0, seed=4)  # same name, new content
    summary, events = run_once(inbox, encoder, db)
    assert [e[0] for e in events] == ["done"]
    # The alias now holds new content of its own; a.wav's results stay (a recording moved away keeps them).
    (seconds,), = rows(db, "SELECT audio_seconds FROM files WHERE path LIKE '%renamed.wav'")
    assert seconds == pytest.approx(3.0)
    assert rows(db, "SELECT count(*) FROM files") == [(2,)] and rows(db, "SELECT count(*) FROM aliases") == [(0,)]
    (new_embedding,), = rows(db, "SELECT w.embedding FROM windows w JOIN files f ON f.id = w.file_id "
                                 "WHERE f.path LIKE '%renamed.wav'")
    assert new_embedding != old_embedding
    write_wav(inbox / "renamed.wav", 2.0, seed=5)  # changed again in place: its rows are replaced
    assert [e[0] for e in run_once(inbox, encoder, db)[1]] == ["done"]
    assert rows(db, "SELECT count(*) FROM windows") == [(2,)]
    (seconds,), = rows(db, "SELECT audio_seconds FROM files WHERE path LIKE '%renamed.wav'")
    assert seconds == pytest.approx(2.0)
    os.utime(inbox / "renamed.wav", (time.time() - 100, time.time() - 100))  # touched only: not reprocessed
    summary, events = run_once(inbox, encoder, db)
    assert [e[0] for e in events] == ["unchanged"]
    assert run_once(inbox, encoder, db)[1] == []


def test_a_second_watcher_on_the_same_database_is_refused(encoder, bundle, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    write_wav(inbox / "a.wav")
    with Store.for_encoder(db, encoder):
        with pytest.raises(StoreLocked, match="in use by another watcher"):
            Store.for_encoder(db, encoder)
        result = cli("watch", str(inbox), "--bundle", str(bundle), "--db", str(db), "--once", "--device", "cpu")
    assert result.returncode == 5
    assert "in use by another watcher" in result.stderr and str(os.getpid()) in result.stderr
    assert rows(db, "SELECT count(*) FROM files") == [(0,)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read RSS")
def test_memory_stays_flat_over_hundreds_of_files(encoder, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    n = 300
    for i in range(n):
        write_wav(inbox / f"d{i // 100}" / f"r{i:04d}.wav", 0.5, seed=1000 + i)
    rss: list[int] = []
    start = time.time()
    with Store.for_encoder(db, encoder) as store:
        summary = watch(inbox, encoder, store, once=True, settle_seconds=0, poll_seconds=0.05,
                        on_event=lambda *e: rss.append(_rss_bytes()))
    elapsed = time.time() - start
    assert summary.done == n and rows(db, "SELECT count(*) FROM windows") == [(n,)]
    early, late = np.median(rss[40:50]), np.median(rss[-10:])
    assert late - early < 16 * 2**20, f"RSS grew {(late - early) / 2**20:.1f} MiB from file 50 to file {n}"
    assert elapsed < 60


def test_export_db_csv_and_search_finds_the_file_itself(bundle, encoder, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    for i in range(4):
        write_wav(inbox / f"r{i}.wav", 1.0 + i * 0.5, seed=50 + i)
    run_once(inbox, encoder, db, scoring=ScoreOptions(top_k=1))
    out = tmp_path / "table.csv"
    result = cli("export-db", str(db), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert list(table[0])[:5] == ["file", "start", "end", "label", "score"] and "e63" in table[0]
    assert {Path(r["file"]).name for r in table} == {f"r{i}.wav" for i in range(4)}
    assert all(r["label"] and 0 < float(r["score"]) <= 1 for r in table)
    assert (tmp_path / "table.csv.json").is_file()
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "table.parquet"
    assert cli("export-db", str(db), "-o", str(parquet)).returncode == 0
    frame = pq.read_table(parquet).to_pandas()
    assert len(frame) == 4 and {"file", "start", "end", "label", "score"} <= set(frame.columns)
    embeddings = frame["embedding"].tolist()
    assert len(embeddings[0]) == 64
    assert sorted(Path(f).name for f in frame["file"]) == sorted(Path(r["file"]).name for r in table)

    result = cli("search", str(db), str(inbox / "r2.wav"), "--bundle", str(bundle), "--top", "3",
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "file", "start", "end", "cosine", "labels"] and len(lines) == 5
    first = lines[2].split()
    assert Path(first[1]).name == "r2.wav" and float(first[4]) > 0.99999

    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE meta SET value = 'other' WHERE key = 'bundle_hash'")
    conn.close()
    refused = cli("search", str(db), str(inbox / "r2.wav"), "--bundle", str(bundle), "--device", "cpu")
    assert refused.returncode == 2 and "cannot be compared" in refused.stderr


def test_a_database_of_another_bundle_is_refused_for_writing(encoder, tmp_path):
    db = tmp_path / "r.sqlite"
    Store.open(db, model_id="x", bundle_hash="0" * 64, embedding_dim=3).close()
    with pytest.raises(Exception, match="use another --db"):
        Store.for_encoder(db, encoder)
