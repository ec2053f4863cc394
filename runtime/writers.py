"""Outputs that open in numpy, pandas and Raven Pro, written so a crash never leaves half a file.

Embeddings (:func:`write_embeddings`), chosen by suffix:

* ``.npz``: arrays ``embeddings`` float32 [n, d], ``file`` (unicode), ``start`` and ``end`` float64
  seconds, and ``metadata_json`` (0-d string holding the metadata as JSON). Loads with
  ``np.load(path)``, no pickle needed.
* ``.csv``: columns ``file,start,end,e0..e{d-1}``; floats round-trip exactly. Metadata goes to a
  sidecar ``<path>.json`` because comment lines break ``pandas.read_csv`` by default.
* ``.parquet`` (needs ``pip install "edgeenc[parquet]"``): columns ``file``, ``start``, ``end`` and
  ``embedding`` (fixed-size list of float32); metadata in the schema metadata.

Classifications (:func:`write_classifications`):

* ``csv``: columns ``file,start,end,rank,label,score``; metadata in a sidecar ``<path>.json``.
* ``raven``: a Raven Pro selection table (tab-separated ``.txt``) with BirdNET-style columns.
  ``File Offset (s)`` is the time within the row's own file (``Begin Path``). ``Begin Time (s)`` is
  the time on the timeline Raven builds when it opens the files as one sequence: for a single-file
  table (or when ``file_durations`` is not given) it equals the file offset; with
  ``file_durations`` it adds the durations of the files listed before, in order of first
  appearance, as BirdNET's combined tables do.

Search results (:func:`write_hits`): ``rank,file,start,end,cosine,stored_labels,label`` as CSV or Parquet,
with an empty ``label`` column to fill in for `edgeenc probe train`.

Every file is written to a temporary name in the same folder, flushed to disk and moved into
place with ``os.replace``; an interrupted run (or a full disk) leaves either the old file or the new
one. :func:`check_output` refuses an output before any work: an unknown suffix, a folder, a place that
cannot be written, Parquet without pyarrow.

Spreadsheet safety: in CSV and Raven (tab-separated) tables a text cell (file name, label) that starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a leading ``'`` (OWASP's rule
against formula injection), so that Excel or LibreOffice show it as text instead of running it. Numbers
are written as they are; NPZ, Parquet and the SQLite results keep the raw text.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .atomic import atomic_path, atomic_text
from .neighbours import Hit

__all__ = [
    "WriterError",
    "ParquetUnavailableError",
    "ClassRow",
    "EMBEDDING_SUFFIXES",
    "CLASSIFICATION_FORMATS",
    "RAVEN_COLUMNS",
    "write_embeddings",
    "write_classifications",
]

EMBEDDING_SUFFIXES = (".npz", ".csv", ".parquet")
CLASSIFICATION_FORMATS = {".csv": "csv", ".txt": "raven"}
TABLE_SUFFIXES = (".csv", ".parquet")  # write_window_table (export-db)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
RAVEN_COLUMNS = (
    "Selection",
    "View",
    "Channel",
    "Begin Path",
    "File Offset (s)",
    "Begin Time (s)",
    "End Time (s)",
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Species",
    "Score",
    "Rank",
)


class WriterError(Exception):
    """An output that cannot be written as asked."""


class OutputWriteError(WriterError, OSError):
    """The system refused to write an output (a full disk, a folder that went away); the old file is kept."""


class ParquetUnavailableError(WriterError, ImportError):
    """Parquet output was asked for but pyarrow is not installed."""


@dataclass(frozen=True)
class ClassRow:
    file: str
    start: float
    end: float
    rank: int  # 1-based within its window
    label: str
    score: float


def check_output(path: str | os.PathLike[str], suffixes: Iterable[str]) -> None:
    """Raise WriterError unless `path` can take an output: a known suffix, not a folder, Parquet's pyarrow
    installed, and a folder that exists (or can be made) and can be written. Meant to run before any work."""
    p = os.fspath(path)
    suffixes = tuple(suffixes)
    suffix = os.path.splitext(p)[1].lower()
    if os.path.isdir(p):
        raise WriterError(f"{p} is a folder; pass a file name ending in {' or '.join(suffixes)}")
    if suffix not in suffixes:
        raise WriterError(f"{p}: unsupported output format {suffix or '(no suffix)'!r}; use one of "
                          f"{', '.join(suffixes)}")
    if suffix == ".parquet":
        _pyarrow(p, [s for s in suffixes if s != ".parquet"])
    folder = os.path.dirname(os.path.abspath(p))
    probe = os.path.join(folder, f".{os.path.basename(p)}.{uuid.uuid4().hex[:12]}.check")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as exc:
        raise WriterError(f"{p}: cannot write in {folder} ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class EventRow:
    """One event (scores.Event) of one file or live stream, as tables write it."""

    file: str
    label: str
    start: float
    end: float
    max_score: float
    mean_score: float
    windows: int
    utc_start: str | None = None  # live streams: the wall-clock time of its first window


EVENT_SUFFIXES = (".csv", ".parquet", ".txt")
EVENT_COLUMNS = ("file", "label", "start", "end", "max_score", "mean_score", "windows", "utc_start")


def write_events(path: str | os.PathLike[str], rows: Sequence[EventRow], *, metadata: Mapping[str, Any] | None = None,
                 sample_rate: int | None = None, file_durations: Mapping[str, float] | None = None) -> None:
    """Events as CSV (EVENT_COLUMNS), Parquet (the same columns) or a Raven selection table (.txt: one
    selection per event, Score its max score; see write_classifications for the timeline)."""
    p = os.fspath(path)
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in EVENT_SUFFIXES:
        raise WriterError(f"{p}: unsupported events format {suffix or '(no suffix)'!r}; use .csv, .parquet or .txt")
    if suffix == ".txt":
        write_classifications(p, [ClassRow(r.file, r.start, r.end, 1, r.label, r.max_score) for r in rows],
                              format="raven", metadata=metadata, sample_rate=sample_rate, file_durations=file_durations)
        return
    with _writing(p):
        if suffix == ".csv":
            with atomic_text(p) as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(EVENT_COLUMNS)
                for r in rows:
                    w.writerow([spreadsheet_safe(r.file), spreadsheet_safe(r.label), _float(r.start), _float(r.end),
                                _float(r.max_score), _float(r.mean_score), r.windows, r.utc_start or ""])
            _write_sidecar(p, metadata)
            return
        pa, pq = _pyarrow(p, [".csv", ".txt"])
        columns = {name: [getattr(r, name) for r in rows] for name in EVENT_COLUMNS}
        types = {"file": pa.string(), "label": pa.string(), "start": pa.float64(), "end": pa.float64(),
                 "max_score": pa.float64(), "mean_score": pa.float64(), "windows": pa.int64(), "utc_start": pa.string()}
        table = pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in dict(metadata or {}).items()}
        with atomic_path(p) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp)


HIT_COLUMNS = ("rank", "file", "start", "end", "cosine", "stored_labels", "label")


def write_hits(path: str | os.PathLike[str], hits: Sequence[Hit], *, metadata: Mapping[str, Any] | None = None) -> None:
    """Search results as CSV or Parquet (HIT_COLUMNS): `stored_labels` are the labels stored with the window
    (`;`-joined in CSV, a list in Parquet); `label` is empty, for a person to fill in: the table is then
    labelled data for `edgeenc probe train` (runtime/probes/data.py reads it; a row left empty is not used)."""
    p = os.fspath(path)
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise WriterError(f"{p}: unsupported format {suffix or '(no suffix)'!r}; use .csv or .parquet")
    with _writing(p):
        if suffix == ".csv":
            with atomic_text(p) as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(HIT_COLUMNS)
                for rank, h in enumerate(hits, 1):
                    w.writerow([rank, spreadsheet_safe(h.file), _float(h.start), _float(h.end), f"{h.cosine:.6f}",
                                spreadsheet_safe(";".join(h.labels)), ""])
            _write_sidecar(p, metadata)
            return
        pa, pq = _pyarrow(p, [".csv"])
        table = pa.table({
            "rank": pa.array(range(1, len(hits) + 1), pa.int64()),
            "file": pa.array([h.file for h in hits], pa.string()),
            "start": pa.array([h.start for h in hits], pa.float64()),
            "end": pa.array([h.end for h in hits], pa.float64()),
            "cosine": pa.array([h.cosine for h in hits], pa.float64()),
            "stored_labels": pa.array([list(h.labels) for h in hits], pa.list_(pa.string())),
            "label": pa.array([""] * len(hits), pa.string()),
        })
        meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in dict(metadata or {}).items()}
        with atomic_path(p) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp)


@contextlib.contextmanager
def _writing(p: str) -> Iterator[None]:
    """OSError while writing (a full disk, a folder that went away) as WriterError; the old file is kept."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(f"{p}: cannot be written ({exc.strerror or exc}); any earlier file of that name "
                               "is unchanged") from None


def _pyarrow(p: str, alternatives: Sequence[str]):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ParquetUnavailableError(
            f'{p}: writing .parquet needs pyarrow, which is not installed; run pip install "edgeenc[parquet]" '
            f"or choose {' or '.join(alternatives)}"
        ) from e
    return pa, pq


def spreadsheet_safe(text: str) -> str:
    """`text` for a CSV/TSV cell: prefixed with ' when a spreadsheet would read it as a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _write_sidecar(path: str, metadata: Mapping[str, Any] | None) -> None:
    if metadata is None:
        return
    with atomic_text(path + ".json") as f:
        json.dump(dict(metadata), f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def _float(x: float) -> str:
    return repr(float(x))


def write_embeddings(
    path: str | os.PathLike[str],
    files: Sequence[str],
    starts: Sequence[float] | np.ndarray,
    ends: Sequence[float] | np.ndarray,
    embeddings: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write one row per window: file, start and end seconds, embedding; format by suffix."""
    p = os.fspath(path)
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise WriterError(
            f"{p}: unsupported embeddings format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(EMBEDDING_SUFFIXES)}"
        )
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise WriterError(f"{p}: embeddings must be a 2-D array [windows, dim], got shape {emb.shape}")
    starts_a = np.asarray(starts, dtype=np.float64).reshape(-1)
    ends_a = np.asarray(ends, dtype=np.float64).reshape(-1)
    files_l = [os.fspath(f) for f in files]
    n = emb.shape[0]
    if not len(files_l) == len(starts_a) == len(ends_a) == n:
        raise WriterError(
            f"{p}: got {n} embeddings but {len(files_l)} files, {len(starts_a)} starts and "
            f"{len(ends_a)} ends; there must be one of each per embedding"
        )
    meta = dict(metadata or {})

    with _writing(p):
        if suffix == ".npz":
            _write_npz(p, files_l, starts_a, ends_a, emb, meta)
        elif suffix == ".csv":
            _write_embeddings_csv(p, files_l, starts_a, ends_a, emb)
            _write_sidecar(p, meta)
        else:
            _write_parquet(p, files_l, starts_a, ends_a, emb, meta)


def _write_npz(
    p: str, files: list[str], starts: np.ndarray, ends: np.ndarray, emb: np.ndarray, meta: dict[str, Any]
) -> None:
    arrays = {
        "embeddings": emb,
        "file": np.array(files, dtype=str),
        "start": starts,
        "end": ends,
        "metadata_json": np.array(json.dumps(meta, sort_keys=True, default=str)),
    }
    # Written as np.savez does (a zip of .npy members), by hand because np.savez's own first
    # parameter is called "file" and so cannot take an array of that name.
    with atomic_path(p) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _write_embeddings_csv(p: str, files: list[str], starts: np.ndarray, ends: np.ndarray, emb: np.ndarray) -> None:
    with atomic_text(p) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "start", "end", *(f"e{i}" for i in range(emb.shape[1]))])
        for name, s, e, row in zip(files, starts.tolist(), ends.tolist(), emb, strict=True):
            # Nine significant digits round-trip any float32.
            w.writerow([spreadsheet_safe(name), _float(s), _float(e), *(format(v, ".9g") for v in row.tolist())])


def _write_parquet(
    p: str, files: list[str], starts: np.ndarray, ends: np.ndarray, emb: np.ndarray, meta: dict[str, Any]
) -> None:
    pa, pq = _pyarrow(p, [".npz", ".csv"])
    d = emb.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), d)
    table = pa.table(
        {
            "file": pa.array(files, type=pa.string()),
            "start": pa.array(starts, type=pa.float64()),
            "end": pa.array(ends, type=pa.float64()),
            "embedding": embedding,
        }
    )
    schema_meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}
    table = table.replace_schema_metadata(schema_meta)
    with atomic_path(p) as tmp:
        pq.write_table(table, tmp)


def write_classifications(
    path: str | os.PathLike[str],
    rows: Sequence[ClassRow],
    *,
    format: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    sample_rate: int | None = None,
    file_durations: Mapping[str, float] | None = None,
) -> None:
    """Write class scores as CSV or as a Raven Pro selection table (see the module docstring).

    ``format`` defaults from the suffix (.csv -> csv, .txt -> raven). Raven tables need
    ``sample_rate`` (the model's, for ``High Freq (Hz)`` = sample_rate / 2).
    """
    p = os.fspath(path)
    suffix = os.path.splitext(p)[1].lower()
    fmt = format if format is not None else CLASSIFICATION_FORMATS.get(suffix)
    if fmt not in ("csv", "raven"):
        known = ", ".join(f"{s} -> {f}" for s, f in CLASSIFICATION_FORMATS.items())
        what = f"format {format!r}" if format is not None else f"suffix {suffix or '(no suffix)'!r}"
        raise WriterError(f"{p}: unsupported classification {what}; formats are csv and raven ({known})")
    if fmt == "raven" and (sample_rate is None or sample_rate <= 0):
        raise WriterError(
            f"{p}: a Raven selection table needs the model's sample_rate (for High Freq = sample_rate / 2)"
        )
    with _writing(p):
        if fmt == "csv":
            _write_classes_csv(p, rows)
        else:
            _write_raven(p, rows, sample_rate, file_durations)
        _write_sidecar(p, metadata)


def _write_classes_csv(p: str, rows: Sequence[ClassRow]) -> None:
    with atomic_text(p) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "start", "end", "rank", "label", "score"])
        for r in rows:
            w.writerow([spreadsheet_safe(r.file), _float(r.start), _float(r.end), int(r.rank),
                        spreadsheet_safe(r.label), _float(r.score)])


def _raven_field(p: str, value: str, what: str) -> str:
    # Raven's tab-separated tables have no quoting, so a tab or newline would shift every column.
    if any(c in value for c in "\t\r\n"):
        raise WriterError(f"{p}: {what} {value!r} contains a tab or newline, which a Raven table cannot hold")
    return spreadsheet_safe(value)


def _raven_offsets(p: str, rows: Sequence[ClassRow], durations: Mapping[str, float] | None) -> dict[str, float]:
    order = list(dict.fromkeys(r.file for r in rows))
    if durations is None:
        return dict.fromkeys(order, 0.0)
    missing = [f for f in order if f not in durations]
    if missing:
        raise WriterError(f"{p}: file_durations has no duration for {missing[0]!r}")
    offsets, t = {}, 0.0
    for name in order:
        offsets[name] = t
        t += float(durations[name])
    return offsets


def _write_raven(
    p: str, rows: Sequence[ClassRow], sample_rate: int, durations: Mapping[str, float] | None
) -> None:
    offsets = _raven_offsets(p, rows, durations)
    high = _float(sample_rate / 2)
    with atomic_text(p) as f:
        f.write("\t".join(RAVEN_COLUMNS) + "\n")
        for i, r in enumerate(rows, start=1):
            off = offsets[r.file]
            fields = [
                str(i),
                "Spectrogram 1",
                "1",
                _raven_field(p, r.file, "file path"),
                _float(r.start),
                _float(r.start + off),
                _float(r.end + off),
                "0",
                high,
                _raven_field(p, r.label, "label"),
                _float(r.score),
                str(int(r.rank)),
            ]
            f.write("\t".join(fields) + "\n")


def write_window_table(out: str | os.PathLike, batches: Iterable, dim: int, metadata: Mapping[str, str]) -> int:
    """Write windows with their top label to OUT (.csv or .parquet) batch by batch; returns the row count.

    `batches` yields (files, starts, ends, embeddings [n, dim], labels (None for no label), scores, variants).

    Columns as :func:`write_embeddings` writes them, with the top label and its score (empty when none) and
    the variant that computed the row after ``end``: csv ``file,start,end,label,score,variant,e0..``;
    parquet ``file``, ``start``, ``end``, ``label``, ``score``, ``variant``, ``embedding`` (fixed-size list
    of float32). Streamed in
    batches (the database may hold more windows than memory), written atomically like every output.
    Metadata (model_id, bundle_hash) goes to the csv's ``<out>.json`` sidecar or the parquet schema.
    """
    p = os.fspath(out)
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise WriterError(f"{p}: unsupported export format {suffix or '(no suffix)'!r}; use .csv or .parquet")
    with _writing(p):
        return (_window_table_csv if suffix == ".csv" else _window_table_parquet)(p, batches, dim, dict(metadata))


def _window_table_csv(p: str, batches: Iterable, dim: int, meta: dict) -> int:
    n = 0
    with atomic_text(p) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "start", "end", "label", "score", "variant", *(f"e{i}" for i in range(dim))])
        for files, starts, ends, emb, labels, top, variants in batches:
            for name, s, e, label, score, variant, row in zip(files, starts.tolist(), ends.tolist(), labels,
                                                              top.tolist(), variants, emb):
                w.writerow([spreadsheet_safe(name), _float(s), _float(e), spreadsheet_safe(label or ""),
                            "" if label is None else _float(score), variant or "",
                            *(format(v, ".9g") for v in row.tolist())])
                n += 1
    _write_sidecar(p, meta)
    return n


def _window_table_parquet(p: str, batches: Iterable, dim: int, meta: dict) -> int:
    pa, pq = _pyarrow(p, [".csv"])
    schema = pa.schema([("file", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                        ("label", pa.string()), ("score", pa.float64()), ("variant", pa.string()),
                        ("embedding", pa.list_(pa.float32(), dim))], metadata=meta)
    n = 0
    with atomic_path(p) as tmp, pq.ParquetWriter(tmp, schema) as pw:
        for files, starts, ends, emb, labels, top, variants in batches:
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
            score = pa.array([None if label is None else s for label, s in zip(labels, top.tolist())],
                             type=pa.float64())
            pw.write_table(pa.table([pa.array(files, pa.string()), pa.array(starts), pa.array(ends),
                                     pa.array(labels, pa.string()), score, pa.array(variants, pa.string()),
                                     embedding], schema=schema))
            n += len(files)
    return n
