"""Labelled audio in the forms people have, as recordings with labelled time spans.

- **A folder per label** (BirdNET-Analyzer's layout): `DATA/<label>/*.wav|flac|...`; every window of a
  recording takes its folder's label. A folder named `A,B` gives both labels; folders named like
  `NEGATIVE_NAMES` (or `--negatives`) hold negatives: windows with no label.
- **A CSV of annotations**: columns `file,start,end,label` (a header row), several rows per file; file
  paths are relative to the CSV's folder.
- **Raven selection tables** (`.txt`, tab-separated): `Begin Time (s)`, `End Time (s)`, a label column
  (`Species` unless named), and the recording from `Begin File` / `Begin Path`, else the table's own
  recording (the file beside it whose name the table's starts with: `rec.Table.1.selections.txt` -> rec.wav).
- **A review index** from `edgeenc clips` (`clip,file,start,end,clip_start,label,...,verdict`): `yes` keeps the
  label, `no` makes a negative, another label replaces it, an empty verdict is not used.
- **A search table** from `edgeenc search -o` (`.csv` or `.parquet`: `rank,file,start,end,cosine,...,label`): a
  filled-in `label` labels that window, `no` (or a negative name) makes it a negative, an empty one is not used.
  Only the rows so labelled are used: the rest of their recordings is not annotated (`Recording.complete`).

Other annotated recordings are assumed annotated completely: a window that overlaps no annotation is a negative.
A window takes an annotation's label when they overlap by at least `min_overlap` seconds, or when the
annotation lies inside the window whole (a call shorter than `min_overlap`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import AUDIO_SUFFIXES, probe, walk_audio

NEGATIVE_NAMES = ("negative", "negatives", "background", "noise", "other")
MIN_OVERLAP = 0.5  # seconds a window must share with an annotation to take its label


class LabelledDataError(ValueError):
    """Labelled data that cannot be used as given; the message names the file (and row) and the fix."""


@dataclass(frozen=True)
class Span:
    start: float
    end: float | None  # None: to the end of the recording (a whole-file label)
    label: str | None  # None: a negative


@dataclass
class Recording:
    path: str
    spans: list[Span] = field(default_factory=list)
    complete: bool = True  # False: only windows lying mostly (>= half) inside a span are labelled data

    def used(self, start: float, end: float) -> bool:
        """Whether the window [start, end) is labelled data: always in a completely annotated recording."""
        if self.complete:
            return True
        return any(min(end, end if s.end is None else s.end) - max(start, s.start) >= (end - start) / 2
                   for s in self.spans)

    def labels_of(self, start: float, end: float, min_overlap: float = MIN_OVERLAP) -> frozenset[str]:
        """The labels a window [start, end) takes from this recording's spans."""
        found = set()
        for span in self.spans:
            if span.label is None:
                continue
            span_end = end if span.end is None else span.end
            overlap = min(end, span_end) - max(start, span.start)
            inside = span.end is not None and span.start >= start and span.end <= end
            if overlap >= min(min_overlap, end - start) or (inside and overlap > 0):
                found.add(span.label)
        return frozenset(found)


def normalise(label: str) -> str:
    return " ".join(label.strip().split())


def load_labelled(source: str | os.PathLike, *, label_column: str | None = None,
                  negatives: Sequence[str] = NEGATIVE_NAMES) -> list[Recording]:
    """The recordings and labelled spans of `source`: a folder per label, a CSV, a Raven table, or a review
    index. Raises LabelledDataError naming the file and row of what cannot be used."""
    source = Path(source)
    if source.is_dir():
        tables = sorted(p for p in source.glob("*.txt") if "selections" in p.name.lower())
        recordings = _from_raven_tables(tables, label_column) if tables else _from_folders(source, negatives)
    elif source.suffix.lower() == ".csv":
        recordings = _from_csv(source, negatives)
    elif source.suffix.lower() == ".parquet":
        recordings = _from_hits(source, _parquet_rows(source), negatives)
    elif source.suffix.lower() == ".txt":
        recordings = _from_raven_tables([source], label_column)
    else:
        raise LabelledDataError(f"{source}: not labelled data: give a folder with a folder per label (or Raven "
                                "selection tables), a CSV of file,start,end,label rows, a Raven .txt table, or a "
                                "search table (.csv or .parquet) from `edgeenc search -o`")
    if not recordings:
        raise LabelledDataError(f"{source}: no labelled recording found")
    _check_collisions(source, recordings)
    return recordings


def _from_folders(root: Path, negatives: Sequence[str]) -> list[Recording]:
    negative = {n.lower() for n in negatives}
    recordings = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        names = [normalise(n) for n in folder.name.split(",") if n.strip()]
        labels = [] if folder.name.lower() in negative else names
        for path, _ in walk_audio(folder):
            spans = [Span(0.0, None, label) for label in labels] or [Span(0.0, None, None)]
            recordings.append(Recording(path, spans))
    return recordings


def _rows(path: Path, delimiter: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelledDataError(f"{path}: cannot be read ({exc})") from None


def _times(path: Path, number: int, start: str, end: str) -> tuple[float, float]:
    try:
        begin, finish = float(start), float(end)
    except (TypeError, ValueError):
        raise LabelledDataError(f"{path}:{number}: start {start!r} / end {end!r} are not seconds") from None
    if not finish > begin >= 0:
        raise LabelledDataError(f"{path}:{number}: end ({finish:g} s) must come after start ({begin:g} s) >= 0")
    return begin, finish


def _add(by_path: dict[str, Recording], file: Path, span: Span) -> None:
    path = os.path.normpath(file)  # one recording however a table names it (`./a.wav`, `x/../a.wav`)
    by_path.setdefault(path, Recording(path)).spans.append(span)


def _from_csv(path: Path, negatives: Sequence[str] = NEGATIVE_NAMES) -> list[Recording]:
    rows = _rows(path, ",")
    columns = set(rows[0]) if rows else set()
    if {"clip", "verdict", "file", "start", "end", "label"} <= columns:
        return _from_review(path, rows)
    if {"rank", "cosine", "file", "start", "end", "label"} <= columns:
        return _from_hits(path, rows, negatives)
    missing = {"file", "start", "end", "label"} - columns
    if missing:
        raise LabelledDataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected a header "
                                "file,start,end,label")
    by_path: dict[str, Recording] = {}
    for number, row in enumerate(rows, 2):
        start, end = _times(path, number, row["start"], row["end"])
        label = normalise(row["label"] or "")
        _add(by_path, path.parent / row["file"], Span(start, end, label or None))
    return list(by_path.values())


def _from_review(path: Path, rows: list[dict[str, str]]) -> list[Recording]:
    by_path: dict[str, Recording] = {}
    for number, row in enumerate(rows, 2):
        verdict = normalise(row.get("verdict") or "")
        if not verdict:
            continue
        start, end = _times(path, number, row["start"], row["end"])
        label = None if verdict.lower() == "no" else normalise(row["label"]) if verdict.lower() == "yes" else verdict
        recorded = (row["file"] or "").lstrip("'")
        if recorded.startswith("live:"):  # a live stream has no recording: the clip is the audio
            shift = float(row.get("clip_start") or 0.0)
            _add(by_path, path.parent / row["clip"], Span(start - shift, end - shift, label))
        else:
            _add(by_path, path.parent / recorded, Span(start, end, label))
    return list(by_path.values())


def _parquet_rows(path: Path) -> list[dict[str, str]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise LabelledDataError(f"{path}: reading .parquet needs pyarrow: pip install 'edgeenc[parquet]', or save "
                                "the table as .csv") from None
    except (OSError, ValueError) as exc:
        raise LabelledDataError(f"{path}: cannot be read as Parquet ({exc})") from None
    missing = {"file", "start", "end", "label"} - set(table.column_names)
    if missing:
        raise LabelledDataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; a search table from "
                                "`edgeenc search -o` has file,start,end,label")
    return [{k: "" if v is None else str(v) for k, v in row.items()}
            for row in table.select(["file", "start", "end", "label"]).to_pylist()]


def _from_hits(path: Path, rows: list[dict[str, str]], negatives: Sequence[str]) -> list[Recording]:
    negative = {"no", *(n.lower() for n in negatives)}
    by_path: dict[str, Recording] = {}
    for number, row in enumerate(rows, 2):
        label = normalise(row.get("label") or "")
        if not label:
            continue
        start, end = _times(path, number, row["start"], row["end"])
        recorded = (row["file"] or "").lstrip("'")
        if recorded.startswith("live:"):
            raise LabelledDataError(f"{path}:{number}: {recorded} is a live stream, which keeps no recording to "
                                    "train on; cut its clips with `edgeenc clips` and label those")
        _add(by_path, path.parent / recorded, Span(start, end, None if label.lower() in negative else label))
    for recording in by_path.values():
        recording.complete = False
    if not by_path:
        raise LabelledDataError(f"{path}: no row has a label yet: fill in the label column (a label, or no for a "
                                "negative) of the windows you have listened to")
    return list(by_path.values())


def _from_raven_tables(tables: list[Path], label_column: str | None) -> list[Recording]:
    by_path: dict[str, Recording] = {}
    for table in tables:
        rows = _rows(table, "\t")
        if not rows:
            continue
        column = label_column or next((c for c in ("Species", "Annotation", "Label", "Class") if c in rows[0]), None)
        needed = {"Begin Time (s)", "End Time (s)", column}
        missing = [c for c in needed if c is None or c not in rows[0]]
        if missing:
            raise LabelledDataError(f"{table}: missing column(s) {', '.join(str(c) for c in missing)}: name the "
                                    "label column with --label-column")
        own = _table_recording(table)
        for number, row in enumerate(rows, 2):
            start, end = _times(table, number, row["Begin Time (s)"], row["End Time (s)"])
            named = (row.get("Begin File") or row.get("Begin Path") or "").strip()
            if named:
                recording = Path(named) if Path(named).is_absolute() else table.parent / named
            elif own is not None:
                recording = own
            else:
                raise LabelledDataError(f"{table}:{number}: no Begin File column and no recording named like the "
                                        "table beside it")
            label = normalise(row[column] or "")
            _add(by_path, recording, Span(start, end, label or None))
    return list(by_path.values())


def _table_recording(table: Path) -> Path | None:
    stem = table.name.split(".")[0]
    return next((p for p in sorted(table.parent.iterdir()) if p.name.split(".")[0] == stem
                 and p.suffix.lower() in AUDIO_SUFFIXES), None)


def _check_collisions(source: Path, recordings: list[Recording]) -> None:
    seen: dict[str, str] = {}
    for recording in recordings:
        for span in recording.spans:
            if span.label is None:
                continue
            key = span.label.casefold()
            if seen.setdefault(key, span.label) != span.label:
                raise LabelledDataError(f"{source}: labels {seen[key]!r} and {span.label!r} differ only in case or "
                                        "spacing: write them one way")


def check_spans(recordings: list[Recording]) -> dict[str, str]:
    """Annotations past the end of their recording, as {path: reason} (the recording then is not used)."""
    problems = {}
    for recording in recordings:
        ends = [s.end for s in recording.spans if s.end is not None]
        if not ends or not os.path.isfile(recording.path):
            continue
        try:
            length = probe(recording.path).duration_seconds
        except Exception:  # noqa: BLE001 - an unreadable recording is reported when it is embedded
            continue
        late = max(ends)
        if late > length + 0.5:
            problems[recording.path] = (f"an annotation ends at {late:g} s, after the end of the recording "
                                        f"({length:.2f} s): fix the table")
    return problems
