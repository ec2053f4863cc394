"""Class scores from logits: the one activation, top-k, thresholds and label filters behind classify, watch,
listen and Ray, and events: a label's consecutive windows over threshold merged into one detection.

Every command that turns a window's logits into labels goes through :func:`detections`, so the same window
gets the same labels and scores whichever path ran it; events come from :func:`merge_events` over those.
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

ACTIVATIONS = ("softmax", "sigmoid")


class NoClassifierHead(ValueError):
    """Scores were asked of a bundle whose model has no classifier head."""

    def __init__(self, model_id: str | None) -> None:
        super().__init__(f"{model_id or 'this bundle'} has no classifier head: use `edgeenc embed` for embeddings")


@dataclass(frozen=True)
class ScoreOptions:
    """Which labels of a window are kept, and what makes an event.

    Per window: the labels allowed by `include` / `exclude` are ranked by score after `activation`; of the
    best `top_k`, those at or over their threshold (`thresholds` per label, else `threshold`) are kept.
    Events: a label kept in consecutive windows (each starting before the previous one ends) is one event;
    events of fewer than `min_windows` windows are dropped, and so are their window rows where a command
    applies `min_windows` to rows (classify).
    """

    top_k: int = 5
    threshold: float | None = None
    activation: str | None = None  # None: the head's own (Encoder.scoring fills it in)
    thresholds: tuple[tuple[str, float], ...] = ()  # (label, threshold) pairs over `threshold`
    include: frozenset[str] = frozenset()  # only these labels (empty: every label)
    exclude: frozenset[str] = frozenset()
    min_windows: int = 1
    _by_label: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose {' or '.join(ACTIVATIONS)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.min_windows < 1:
            raise ValueError(f"min_windows must be at least 1, got {self.min_windows}")
        for label, value in ((None, self.threshold), *self.thresholds):
            if value is not None and not 0.0 <= value <= 1.0:
                where = f" for {label!r}" if label is not None else ""
                raise ValueError(f"threshold{where} is a score between 0 and 1, got {value:g}")
        self._by_label.update(self.thresholds)

    def threshold_of(self, label: str) -> float | None:
        return self._by_label.get(label, self.threshold)

    def with_activation(self, activation: str) -> ScoreOptions:
        """These options with the head's activation where none was asked for."""
        return self if self.activation else replace(self, activation=activation)


class Detection(NamedTuple):
    window: int  # index of the window in the logits given
    label: str
    rank: int  # 1-based among the allowed labels of its window
    score: float


class Event(NamedTuple):
    label: str
    start: float  # seconds, the first window's start
    end: float  # seconds, the last window's end
    max_score: float
    mean_score: float
    windows: int
    first: int  # index of its first window
    last: int  # index of its last window


def activate(logits: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """Scores [windows, classes] in float64 from logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if activation == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    raise ValueError(f"unknown activation {activation!r}; choose {' or '.join(ACTIVATIONS)}")


def detections(logits: np.ndarray | None, labels: Sequence[str] | None, options: ScoreOptions) -> list[Detection]:
    """The kept labels of every window, best first; none for a model without a head (`logits` None)."""
    if logits is None or not labels:
        return []
    if options.activation is None:
        raise ValueError("ScoreOptions.activation is unset: Encoder.scoring fills in the head's own")
    scores = activate(logits, options.activation)
    allowed = np.array([(not options.include or label in options.include) and label not in options.exclude
                        for label in labels])
    thresholds = [options.threshold_of(label) for label in labels]
    found = []
    for window, row in enumerate(scores):
        ranked = [c for c in np.argsort(-row, kind="stable") if allowed[c]][:options.top_k]
        for rank, cls in enumerate(ranked, start=1):
            if thresholds[cls] is None or row[cls] >= thresholds[cls]:
                found.append(Detection(window, labels[cls], rank, float(row[cls])))
    return found


def consecutive(starts: Sequence[float], ends: Sequence[float], i: int) -> bool:
    """Whether window i follows window i - 1 with no audio between them (contiguous or overlapping)."""
    return i > 0 and starts[i] <= ends[i - 1] + 1e-6


def merge_events(starts: Sequence[float], ends: Sequence[float], found: Sequence[Detection],
                 min_windows: int = 1) -> list[Event]:
    """A label's detections in consecutive windows merged into events (in order of their start), dropping
    events of fewer than `min_windows` windows. `starts`/`ends` are the windows' times, in order."""
    by_label: dict[str, list[Detection]] = {}
    for detection in sorted(found, key=lambda d: d.window):
        by_label.setdefault(detection.label, []).append(detection)
    events = []
    for label, hits in by_label.items():
        run: list[Detection] = []
        for hit in [*hits, None]:
            if hit is not None and run and hit.window == run[-1].window + 1 and consecutive(starts, ends, hit.window):
                run.append(hit)
                continue
            if len(run) >= min_windows:
                scores = [d.score for d in run]
                events.append(Event(label, float(starts[run[0].window]), float(ends[run[-1].window]), max(scores),
                                    float(np.mean(scores)), len(run), run[0].window, run[-1].window))
            run = [hit] if hit is not None else []
    return sorted(events, key=lambda e: (e.start, e.label))


def confirmed(starts: Sequence[float], ends: Sequence[float], found: Sequence[Detection],
              min_windows: int) -> list[Detection]:
    """The detections that belong to an event of at least `min_windows` windows (BirdNET-Go's repeat
    confirmation), in their order."""
    if min_windows <= 1:
        return list(found)
    keep = {(label, w) for label, _, _, _, _, _, first, last in merge_events(starts, ends, found, min_windows)
            for w in range(first, last + 1)}
    return [d for d in found if (d.label, d.window) in keep]


def check_labels(names: Sequence[str], known: Sequence[str], where: str) -> None:
    """ValueError naming the labels of `names` the model does not know, each with the closest known ones."""
    unknown = [name for name in names if name not in set(known)]
    if unknown:
        hints = []
        for name in unknown[:5]:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hints.append(f"{name!r}" + (f" (closest: {', '.join(close)})" if close else ""))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"{where}: unknown label(s) {'; '.join(hints)}{more}; the model's labels are in its "
                         "bundle's labels.json")


def read_thresholds(path: str | os.PathLike, labels: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """Per-label thresholds from a CSV of `label,threshold` rows (a header row is allowed)."""
    pairs = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for number, row in enumerate(csv.reader(fh), 1):
                if not row or not "".join(row).strip() or (number == 1 and row[-1].strip().lower() == "threshold"):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{number}: expected 'label,threshold', got {','.join(row)!r}")
                try:
                    value = float(row[1])
                except ValueError:
                    raise ValueError(f"{path}:{number}: threshold {row[1]!r} is not a number") from None
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{path}:{number}: threshold {value:g} for {row[0]!r} is not between 0 and 1")
                pairs.append((row[0].strip(), value))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    check_labels([label for label, _ in pairs], labels, str(path))
    return tuple(pairs)


def read_labels(values: Sequence[str], labels: Sequence[str], what: str) -> frozenset[str]:
    """Labels given one by one, or as a text file with one label per line (BirdNET's species lists)."""
    names = []
    for value in values:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as fh:
                names += [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
        else:
            names.append(value)
    check_labels(names, labels, what)
    return frozenset(names)
