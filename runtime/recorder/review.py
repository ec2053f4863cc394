"""Clips of a results file's events: cut from the original recording (watch), or put together from the
window clips `listen --save-clips` kept (a live stream has no recording to cut from)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import AudioError
from ..clips import Clip, clip_name, cut_clip, write_clip
from .store import Store, StoredEvent


def event_clips(store: Store, folder: str | os.PathLike, *, margin: float = 1.0, min_windows: int | None = None,
                labels: frozenset[str] = frozenset()) -> Iterator[Clip | AudioError]:
    """A clip of every event of `store` (of `labels` only, when given), or the error of one that has none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for event in store.events(min_windows):
        if labels and event.label not in labels:
            continue
        try:
            if event.path.startswith("live:"):
                yield live_clip(store, event, folder)
            else:
                yield cut_clip(event.row(), folder, margin)
        except AudioError as exc:
            yield exc


def live_clip(store: Store, event: StoredEvent, folder: Path) -> Clip:
    """A live event's audio from the window clips of its windows, each up to where the next one begins."""
    rows = store.conn.execute(
        'SELECT w.start, w."end", c.path FROM windows w LEFT JOIN clips c ON c.window_id = w.id '
        "WHERE w.file_id = ? AND w.start >= ? AND w.start < ? ORDER BY w.start", (event.file_id, event.start, event.end)
    ).fetchall() if _has_clips(store) else []
    missing = [start for start, _, path in rows if path is None or not os.path.isfile(path)]
    if not rows or missing:
        raise AudioError(event.path, f"no saved audio for the {event.label} event at {event.start:.1f} s: run listen "
                                     "with --save-clips DIR (and a --threshold) to keep the audio of its detections")
    pieces, rate = [], None
    for i, (start, _end, path) in enumerate(rows):
        samples, rate = sf.read(path, dtype="float32")
        if i + 1 < len(rows):
            samples = samples[: int(round((rows[i + 1][0] - start) * rate))]
        pieces.append(samples)
    stamp = (event.utc_start or "").replace("+00:00", "Z").replace(":", "").replace("-", "")
    path = folder / clip_name(event.row(), stamp or f"{event.file_id}-{event.start:.1f}s")
    write_clip(path, np.concatenate(pieces), rate)
    return Clip(path, event.row(), event.start, event.end)


def _has_clips(store: Store) -> bool:
    return bool(store.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'clips'").fetchone())

