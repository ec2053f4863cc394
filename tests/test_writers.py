"""Embedding and classification outputs: round trips, atomic writes, Raven tables, clear errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgeenc.runtime import writers
from edgeenc.runtime.writers import (
    RAVEN_COLUMNS,
    ClassRow,
    ParquetUnavailableError,
    WriterError,
    write_classifications,
    write_embeddings,
)

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None
FILES = ["site A/rec,1.wav", "site A/rec,1.wav", "b.flac"]  # a comma and a space on purpose
STARTS = [0.0, 10.0, 0.0]
ENDS = [10.0, 12.345678901234, 3.3]
META = {"model_id": "esp_aves2_naturelm_audio_v1_beats", "bundle_sha256": "ab" * 32, "random_init": True}


def embeddings(n: int = 3, d: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    # Values across magnitudes so a short float format would lose digits.
    return (rng.standard_normal((n, d)) * np.logspace(-6, 3, d)).astype(np.float32)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_npz_round_trip(tmp_path: Path) -> None:
    emb = embeddings()
    out = tmp_path / "emb.npz"
    write_embeddings(out, FILES, STARTS, ENDS, emb, META)
    with np.load(out) as z:  # allow_pickle=False: everything is a plain array
        assert set(z.files) == {"embeddings", "file", "start", "end", "metadata_json"}
        assert z["embeddings"].dtype == np.float32
        np.testing.assert_array_equal(z["embeddings"], emb)
        assert z["file"].dtype.kind == "U" and z["file"].tolist() == FILES
        assert z["start"].dtype == np.float64 and z["start"].tolist() == STARTS
        assert z["end"].tolist() == ENDS
        assert z["metadata_json"].shape == ()
        assert json.loads(str(z["metadata_json"])) == META
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]


def test_npz_with_no_rows(tmp_path: Path) -> None:
    write_embeddings(tmp_path / "none.npz", [], [], [], np.zeros((0, 4), np.float32), {})
    with np.load(tmp_path / "none.npz") as z:
        assert z["embeddings"].shape == (0, 4) and z["file"].shape == (0,)


def test_csv_round_trip_is_exact_and_metadata_goes_to_a_sidecar(tmp_path: Path) -> None:
    emb = embeddings()
    out = tmp_path / "emb.csv"
    write_embeddings(out, FILES, STARTS, ENDS, emb, META)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "start", "end", "e0", "e1", "e2", "e3", "e4"]
    assert len(rows) == 4
    assert [r[0] for r in rows[1:]] == FILES
    assert [float(r[1]) for r in rows[1:]] == STARTS
    assert [float(r[2]) for r in rows[1:]] == ENDS
    back = np.array([[float(v) for v in r[3:]] for r in rows[1:]], dtype=np.float32)
    np.testing.assert_array_equal(back, emb)
    assert not out.read_text(encoding="utf-8").startswith("#")
    assert json.loads((tmp_path / "emb.csv.json").read_text(encoding="utf-8")) == META
    assert leftovers(tmp_path) == []


def test_csv_opens_in_pandas(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    emb = embeddings()
    write_embeddings(tmp_path / "emb.csv", FILES, STARTS, ENDS, emb, META)
    df = pd.read_csv(tmp_path / "emb.csv")
    assert list(df["file"]) == FILES
    np.testing.assert_array_equal(df[[f"e{i}" for i in range(5)]].to_numpy(np.float32), emb)


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow not installed (pip install 'edgeenc[parquet]')")
def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = embeddings()
    write_embeddings(tmp_path / "emb.parquet", FILES, STARTS, ENDS, emb, META)
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.column_names == ["file", "start", "end", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 5)
    np.testing.assert_array_equal(np.array(table["embedding"].to_pylist(), np.float32), emb)
    assert table["file"].to_pylist() == FILES
    meta = table.schema.metadata
    assert meta[b"model_id"] == META["model_id"].encode()
    assert json.loads(meta[b"random_init"]) is True
    assert leftovers(tmp_path) == []


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name: str, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ParquetUnavailableError, match=r'pip install "edgeenc\[parquet\]"') as e:
        write_embeddings(tmp_path / "emb.parquet", FILES, STARTS, ENDS, embeddings(), META)
    assert isinstance(e.value, ImportError) and isinstance(e.value, WriterError)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_embedding_suffix_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match=r"\.npz, \.csv, \.parquet"):
        write_embeddings(tmp_path / "emb.h5", FILES, STARTS, ENDS, embeddings(), META)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_lengths_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="got 2 embeddings but 3 files"):
        write_embeddings(tmp_path / "emb.npz", FILES, STARTS, ENDS, embeddings(n=2), META)
    with pytest.raises(WriterError, match="2-D"):
        write_embeddings(tmp_path / "emb.npz", FILES, STARTS, ENDS, np.zeros(3, np.float32), META)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "emb.csv"
    write_embeddings(out, FILES, STARTS, ENDS, embeddings(), META)
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(out, FILES[:1], STARTS[:1], ENDS[:1], embeddings(n=1), META)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_output_folder_is_created_and_permissions_follow_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "emb.npz"
    write_embeddings(out, FILES, STARTS, ENDS, embeddings(), META)
    assert out.exists()
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask


ROWS = [
    ClassRow("a.wav", 0.0, 10.0, 1, "Turdus merula", 0.91),
    ClassRow("a.wav", 0.0, 10.0, 2, "Erithacus rubecula", 0.05),
    ClassRow("a.wav", 10.0, 12.5, 1, "Turdus merula", 0.7),
    ClassRow("dir/b.wav", 0.0, 3.3, 1, "Parus major", 0.42),
]


def test_classifications_csv(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    write_classifications(out, ROWS, metadata=META)
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "start", "end", "rank", "label", "score"]
    assert len(rows) == len(ROWS)
    assert [(r["file"], float(r["start"]), float(r["end"]), int(r["rank"]), r["label"], float(r["score"]))
            for r in rows] == [(r.file, r.start, r.end, r.rank, r.label, r.score) for r in ROWS]
    assert json.loads((tmp_path / "scores.csv.json").read_text(encoding="utf-8")) == META
    assert leftovers(tmp_path) == []


def read_raven(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def test_raven_table_header_and_rows(tmp_path: Path) -> None:
    out = tmp_path / "scores.selections.txt"
    write_classifications(out, ROWS, sample_rate=16000)
    header, rows = read_raven(out)
    assert header == list(RAVEN_COLUMNS)
    assert header == [
        "Selection", "View", "Channel", "Begin Path", "File Offset (s)", "Begin Time (s)",
        "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)", "Species", "Score", "Rank",
    ]  # fmt: skip
    assert len(rows) == len(ROWS)
    assert [r["Selection"] for r in rows] == ["1", "2", "3", "4"]
    assert {r["View"] for r in rows} == {"Spectrogram 1"} and {r["Channel"] for r in rows} == {"1"}
    assert {float(r["Low Freq (Hz)"]) for r in rows} == {0.0}
    assert {float(r["High Freq (Hz)"]) for r in rows} == {8000.0}
    # Without file durations every row is timed within its own file.
    assert [float(r["Begin Time (s)"]) for r in rows] == [r.start for r in ROWS]
    assert [float(r["File Offset (s)"]) for r in rows] == [r.start for r in ROWS]
    assert [r["Species"] for r in rows] == [r.label for r in ROWS]
    assert [int(r["Rank"]) for r in rows] == [1, 2, 1, 1]
    assert not (tmp_path / "scores.selections.txt.json").exists()


def test_raven_multi_file_table_accumulates_offsets(tmp_path: Path) -> None:
    out = tmp_path / "combined.txt"
    write_classifications(out, ROWS, sample_rate=32000, file_durations={"a.wav": 12.5, "dir/b.wav": 3.3})
    _, rows = read_raven(out)
    assert [float(r["Begin Time (s)"]) for r in rows] == [0.0, 0.0, 10.0, 12.5]
    assert [float(r["End Time (s)"]) for r in rows] == [10.0, 10.0, 12.5, 12.5 + 3.3]
    assert [float(r["File Offset (s)"]) for r in rows] == [0.0, 0.0, 10.0, 0.0]
    assert [r["Begin Path"] for r in rows] == [r.file for r in ROWS]
    assert {float(r["High Freq (Hz)"]) for r in rows} == {16000.0}


def test_raven_errors(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="sample_rate"):
        write_classifications(tmp_path / "t.txt", ROWS)
    with pytest.raises(WriterError, match="no duration for 'dir/b.wav'"):
        write_classifications(tmp_path / "t.txt", ROWS, sample_rate=16000, file_durations={"a.wav": 12.5})
    bad = [ClassRow("a.wav", 0.0, 1.0, 1, "tab\there", 0.5)]
    with pytest.raises(WriterError, match="tab or newline"):
        write_classifications(tmp_path / "t.txt", bad, sample_rate=16000)
    assert list(tmp_path.iterdir()) == []


def test_classification_format_by_suffix_or_argument(tmp_path: Path) -> None:
    write_classifications(tmp_path / "r.tsv", ROWS, format="raven", sample_rate=16000)
    assert (tmp_path / "r.tsv").read_text(encoding="utf-8").startswith("Selection\t")
    with pytest.raises(WriterError, match=r"unsupported classification suffix '\.json'.*\.csv -> csv"):
        write_classifications(tmp_path / "r.json", ROWS)
    with pytest.raises(WriterError, match="unsupported classification format 'xlsx'"):
        write_classifications(tmp_path / "r.csv", ROWS, format="xlsx")
