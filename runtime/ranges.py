"""Long recordings cut into ranges of whole windows, so that a range is a unit of work that can be done,
saved and resumed on its own (single-process embed and classify) or handed to a worker (the archive engine).

A file's ranges joined end to end give the windows and times of the whole file cut at once: interior
ranges hold whole windows only (cut with last="drop"), the final range starts on a window of the whole
file's grid and runs to the end, so the run's last-window policy applies there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import MP3_LENGTH_TOLERANCE, AudioInfo
from .encoder import EmbeddingResult
from .windows import WindowOptions


@dataclass(frozen=True)
class Range:
    """Samples [start, stop) of a file at the model's rate; the final range (stop None) runs to the end."""

    path: str
    index: int
    count: int
    start: int
    stop: int | None

    def options(self, run: WindowOptions) -> WindowOptions:
        """How this range is cut: whole windows only inside the file, the run's policy at its end."""
        return run if self.stop is None else run.updated(last="drop")


def plan_ranges(path: str, info: AudioInfo, sample_rate: int, options: WindowOptions,
                range_seconds: float) -> list[Range]:
    """Cut a file into ranges of about `range_seconds` of whole windows each, so that workers share it.

    Interior ranges hold whole windows only (they are cut with last="drop"); the final range starts on a
    window of the whole file's grid and runs to the end, so the run's last-window policy applies there
    exactly as when the whole file is cut at once. Lengths come from the header, which can be a little off
    (MP3), so the interior ranges stop short of the estimated end by a guard.
    """
    # The rounding iter_windows uses, so the ranges fall on its grid.
    window = int(round(options.window_seconds * sample_rate))
    hop = window if options.hop_seconds is None else int(round(options.hop_seconds * sample_rate))
    length = info.frames * sample_rate // info.sample_rate
    guard = sample_rate + (int(MP3_LENGTH_TOLERANCE * length) if info.format == "MP3" else 0)
    full_windows = (length - guard - window) // hop + 1 if length - guard >= window else 0
    per_range = max(1, int(round(range_seconds * sample_rate / hop)))
    interior = max(0, (full_windows - 1) // per_range)
    count = interior + 1
    ranges = [Range(path, j, count, j * per_range * hop, (j * per_range + per_range - 1) * hop + window)
              for j in range(interior)]
    ranges.append(Range(path, interior, count, interior * per_range * hop, None))
    return ranges


def join_ranges(path: str, parts: list[EmbeddingResult], starts: list[int], sample_rate: int) -> EmbeddingResult:
    """One file's result from its ranges' (times relative to each range's first sample `starts[i]`)."""
    def absolute(seconds: np.ndarray, offset: int) -> np.ndarray:
        # Whole samples, then one division, as iter_windows computes the times of the whole file.
        return (np.round(seconds * sample_rate).astype(np.int64) + offset) / sample_rate

    logits = [p.logits for p in parts if p.logits is not None]
    return EmbeddingResult(
        path,
        np.concatenate([absolute(p.starts, s) for p, s in zip(parts, starts)]),
        np.concatenate([absolute(p.ends, s) for p, s in zip(parts, starts)]),
        np.concatenate([p.embeddings for p in parts]).astype(np.float32),
        np.concatenate(logits) if len(logits) == len(parts) and logits else None,
    )
