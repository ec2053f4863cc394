"""Cutting a stream of audio blocks into model windows, and grouping windows into batches.

Window policy
-------------
With ``W = round(window_seconds * sample_rate)`` and ``H = round(hop_seconds * sample_rate)``
(``H`` defaults to ``W``; ``H < W`` overlaps windows, ``H > W`` leaves gaps), windows start at
samples ``0, H, 2H, ...``. Every window that fits entirely inside the audio is emitted at length
``W``.

After the last full window, the audio that remains is the *final partial window*: it starts at the
next hop position and runs to the end of the audio. It exists only when it holds samples that no
earlier window covered (so a file whose length is an exact multiple of the hop, with ``H == W``,
has none). What happens to it is the ``last`` policy:

* ``"auto"`` (default): emitted at its true length, like ``"short"``, unless it is shorter than
  half the window or shorter than ``AUTO_MIN_SECONDS`` (1 s) and an earlier window exists: then it is
  dropped. A 0.13 s tail of a 10.13 s recording is noise that a classifier would still rank like a
  detection (recorder tools such as BirdNET drop such remainders); a file shorter than one window
  still gives its one window.
* ``"short"``: emitted at its true length whatever it holds. The model runs on exactly that clip,
  which is what avex returns for a clip of that length.
* ``"pad"``: zero-padded to ``W`` samples.
* ``"drop"``: never emitted.

With ``"auto"``, ``"short"`` and ``"pad"`` a partial window with fewer than ``min_samples`` real
samples is dropped. A whole file shorter than ``W`` is therefore one short window (or one padded
window, or nothing with ``"drop"``). Only the final partial window is ever dropped by ``"auto"``:
with ``--window`` under 1 s the full windows are what was asked for.

``start_seconds`` is the first sample's index over the rate; ``end_seconds`` is always the time just
after the last *real* sample (start + true length / rate), also for padded windows.

Windowing is streaming: at most about one window plus one input block is buffered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Window", "WindowOptions", "iter_windows", "Batch", "WindowBatcher", "LAST_POLICIES", "AUTO_MIN_SECONDS"]

LAST_POLICIES = ("auto", "short", "pad", "drop")
AUTO_MIN_SECONDS = 1.0


@dataclass(frozen=True)
class WindowOptions:
    """How recordings are cut and batched: one value made once (by the CLI or the caller) and passed whole to
    embed, classify, watch, listen, search and the Ray workers, so that every path cuts the same windows."""

    window_seconds: float | None = None  # None: the model's native window
    hop_seconds: float | None = None  # None: the window (no overlap, no gap)
    last: str = "auto"  # the final partial window: see LAST_POLICIES and the module docstring
    batch_size: int | None = None  # windows per inference call; None: the bundle's best (Encoder.batch_size)
    channel: int | None = None  # 0-based channel instead of the mean of all channels

    def __post_init__(self) -> None:
        if self.last not in LAST_POLICIES:
            raise ValueError(f"last must be one of {', '.join(LAST_POLICIES)}; got {self.last!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}")
        for name in ("window_seconds", "hop_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.channel is not None and self.channel < 0:
            raise ValueError(f"channel is 0-based and cannot be negative, got {self.channel!r}")

    def with_window(self, native_seconds: float) -> WindowOptions:
        """These options with the model's native window filled in where none was asked for."""
        return self if self.window_seconds else replace(self, window_seconds=float(native_seconds))

    def updated(self, **fields: Any) -> WindowOptions:
        """A copy with `fields` changed (keyword arguments of the Python API, e.g. last="short")."""
        return replace(self, **fields) if fields else self


@dataclass(frozen=True)
class Window:
    start_seconds: float
    end_seconds: float
    samples: np.ndarray


def _samples(seconds: float, sample_rate: int, what: str) -> int:
    n = int(round(seconds * sample_rate))
    if n <= 0:
        raise ValueError(
            f"{what} of {seconds!r} s is {n} samples at {sample_rate} Hz; it must be at least one sample"
        )
    return n


def iter_windows(
    blocks: Iterable[np.ndarray],
    sample_rate: int,
    window_seconds: float,
    hop_seconds: float | None = None,
    *,
    min_samples: int = 1,
    last: str = "auto",
) -> Iterator[Window]:
    """Cut contiguous mono blocks into windows (see the module docstring for the policy)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
    if last not in LAST_POLICIES:
        raise ValueError(f"last must be one of {', '.join(LAST_POLICIES)}; got {last!r}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, got {min_samples!r}")
    w = _samples(window_seconds, sample_rate, "window")
    h = w if hop_seconds is None else _samples(hop_seconds, sample_rate, "hop")

    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # absolute index of buf[0]
    total = 0  # samples seen so far
    next_start = 0  # absolute start of the next window
    last_full_end = 0

    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"audio blocks must be 1-D mono arrays, got shape {block.shape}")
        block_start = total
        total += len(block)
        if total <= next_start:
            continue  # entirely inside a gap between windows
        if block_start < next_start:
            block = block[next_start - block_start :]
            block_start = next_start
        if len(buf) == 0:
            buf, buf_start = block, block_start
        else:
            buf = np.concatenate([buf, block])

        while buf_start + len(buf) >= next_start + w:
            off = next_start - buf_start
            yield Window(next_start / sample_rate, (next_start + w) / sample_rate, buf[off : off + w].copy())
            last_full_end = next_start + w
            next_start += h
            drop = min(next_start - buf_start, len(buf))
            buf = buf[drop:]
            buf_start += drop

    if last == "drop" or total <= max(next_start, last_full_end):
        return
    real = buf[next_start - buf_start :]
    if len(real) < min_samples:
        return
    too_short = 2 * len(real) < w or len(real) < AUTO_MIN_SECONDS * sample_rate
    if last == "auto" and last_full_end > 0 and too_short:
        return  # a tail after real windows; a file's only window is kept however short
    pad = last == "pad"
    samples = np.concatenate([real, np.zeros(w - len(real), np.float32)]) if pad else real.copy()
    yield Window(next_start / sample_rate, total / sample_rate, samples)


@dataclass
class Batch:
    """Windows of one length stacked for the model; ``keys[i]`` belongs to ``windows[i]``."""

    keys: list[Any]
    windows: list[Window]
    samples: np.ndarray = field(repr=False)  # float32 [n, length]


class WindowBatcher:
    """Group windows from any number of files into rectangular batches of up to ``batch_size``.

    ONNX needs every row of a batch to have the same length, so windows of different lengths
    (full windows and each file's short last window) never share a batch.
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self._groups: dict[int, tuple[list[Any], list[Window]]] = {}

    def __len__(self) -> int:
        """Number of windows waiting for their batch to fill."""
        return sum(len(ws) for _, ws in self._groups.values())

    def add(self, key: Any, window: Window) -> list[Batch]:
        """Queue one window; return the batch it completed, if any."""
        if window.samples.ndim != 1:
            raise ValueError(f"window samples must be 1-D, got shape {window.samples.shape}")
        n = int(window.samples.shape[0])
        keys, windows = self._groups.setdefault(n, ([], []))
        keys.append(key)
        windows.append(window)
        if len(windows) < self.batch_size:
            return []
        del self._groups[n]
        return [_make_batch(keys, windows)]

    def flush(self) -> list[Batch]:
        """Every queued window, in batches (by length, in the order lengths first appeared)."""
        batches = [_make_batch(keys, windows) for keys, windows in self._groups.values()]
        self._groups = {}
        return batches


def _make_batch(keys: list[Any], windows: list[Window]) -> Batch:
    samples = np.stack([w.samples for w in windows]).astype(np.float32, copy=False)
    return Batch(keys=keys, windows=windows, samples=samples)
