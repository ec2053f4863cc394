"""Clips to review: each event's audio cut from its recording into a FLAC file, and an index to fill in.

A clip is the event's [start, end] widened by a margin on both sides (within the recording), at the
recording's own sample rate and channels, named by recording, time, label and score. The index CSV has
one row per clip (the event's file, start, end and label, where the clip begins, its score) and an empty
`verdict` column for the reviewer: `yes` (the label is right), `no` (it is
not), or another label (what it is). That CSV is the review format `edgeenc probe train` takes as
annotations (columns `file`, `start`, `end`, `label`, `verdict`: a row's label is its verdict when that is
a label, its `label` when the verdict is `yes`, and a negative when it is `no`).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .atomic import atomic_path, atomic_text
from .audio import AudioError
from .writers import EventRow, spreadsheet_safe

INDEX = "index.csv"
# start/end: the event in its recording (or stream); clip_start: where the clip file begins in it
INDEX_COLUMNS = ("clip", "file", "start", "end", "clip_start", "label", "score", "windows", "utc_start", "verdict")


@dataclass(frozen=True)
class Clip:
    path: Path  # the FLAC file
    event: EventRow
    start: float  # seconds in the recording where the clip begins (the event's start less the margin)
    end: float


def clip_name(event: EventRow, stamp: str | None = None) -> str:
    """`<recording>_<start>s_<label>_<score>.flac`, or `<UTC stamp>_<label>_<score>.flac` for a live stream."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", event.label).strip("_")[:80] or "label"
    if stamp:
        return f"{stamp}_{safe}_{event.max_score:.3f}.flac"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(event.file).stem)[:80]
    return f"{stem}_{event.start:09.3f}s_{safe}_{event.max_score:.3f}.flac"


def write_clip(path: Path, samples: np.ndarray, rate: int) -> None:
    """A FLAC file written whole (atomically), 16-bit."""
    with atomic_path(path) as tmp:
        sf.write(tmp, samples, rate, format="FLAC", subtype="PCM_16")


def cut_clip(event: EventRow, folder: Path, margin: float = 1.0) -> Clip:
    """The event's audio from its recording, `margin` seconds either side; AudioError when it cannot be read."""
    try:
        with sf.SoundFile(event.file) as f:
            rate, frames = f.samplerate, f.frames
            first = max(0, int(round((event.start - margin) * rate)))
            last = min(frames, int(round((event.end + margin) * rate)))
            f.seek(first)
            samples = f.read(last - first, dtype="float32", always_2d=True)
    except (OSError, sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(event.file, f"cannot cut a clip from it: {exc}") from None
    path = folder / clip_name(event)
    write_clip(path, samples, rate)
    return Clip(path, event, first / rate, last / rate)


def cut_clips(events: Iterable[EventRow], folder: str | os.PathLike, margin: float = 1.0
              ) -> Iterator[Clip | AudioError]:
    """A clip for every event (or the AudioError of one that could not be cut: the others go on)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for event in events:
        try:
            yield cut_clip(event, folder, margin)
        except AudioError as exc:
            yield exc


def write_index(folder: str | os.PathLike, clips: Iterable[Clip]) -> Path:
    """The review index (INDEX_COLUMNS, verdict empty) of `clips`, written whole beside them."""
    path = Path(folder) / INDEX
    with atomic_text(path) as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        for clip in clips:
            e = clip.event
            w.writerow([clip.path.name, spreadsheet_safe(e.file), repr(e.start), repr(e.end), repr(clip.start),
                        spreadsheet_safe(e.label), repr(e.max_score), e.windows, e.utc_start or "", ""])
    return path
