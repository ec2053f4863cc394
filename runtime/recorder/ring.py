"""The bounded buffer between a live source (capture thread) and the encoder (main thread).

Audio goes in as model-rate mono :class:`Chunk` s, each stamped with its place on the stream's
sample timeline (``index``) and the wall-clock time of its first sample. The buffer never holds
more than ``capacity`` samples: when the encoder falls behind, the OLDEST audio goes, at least
``drop_samples`` at a time, so what is left stays contiguous long enough to cut windows from (dropping
a few samples at every push would leave fragments shorter than a window and no window at all).
Dropped samples keep their place on the timeline, so the windows after a drop still say when they
were heard; the consumer sees the jump in ``index`` as a gap.

:class:`Stamper` (capture side) turns what a source delivers into chunks: downmix, resample to the
model rate with one ``soxr.ResampleStream`` per segment, and the wall clock. The clock is the audio's
own: the first sample is anchored at its arrival time and later samples at ``anchor + n / rate``, so
jitter of pipes and sound cards does not reach the timestamps. When audio arrives more than
``resync_seconds`` later than its sample count predicts (the source stalled and lost time), the
anchor moves forward to the arrival time; it never moves back, so timestamps are monotone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr

__all__ = ["Chunk", "AudioRing", "Stamper", "END"]

END = object()  # what AudioRing.take returns once the source has ended and the buffer is empty


@dataclass
class Chunk:
    index: int  # position of the first sample on the stream timeline, in model-rate samples
    samples: np.ndarray  # float32 mono at the model rate
    wall_start: float  # unix seconds of the first sample
    segment: int  # changes where the audio is discontinuous (a source restarted)


class AudioRing:
    """Thread-safe FIFO of chunks holding at most ``capacity`` samples; drops the oldest when full."""

    def __init__(self, capacity: int, drop_samples: int, sample_rate: int, *, wait: bool = False) -> None:
        if capacity < 1 or drop_samples < 1:
            raise ValueError(f"ring capacity and drop size must be positive, got {capacity} and {drop_samples}")
        self.wait = wait  # a full ring makes push wait for room instead of dropping (files and pipes, not live)
        self.capacity = int(capacity)
        self.drop_samples = int(min(drop_samples, capacity))
        self.sample_rate = int(sample_rate)
        self.dropped = 0  # samples dropped since the start
        self.high_water = 0  # the most samples ever held
        self._chunks: deque[Chunk] = deque()
        self._buffered = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def buffered(self) -> int:
        with self._cond:
            return self._buffered

    def push(self, chunk: Chunk) -> None:
        if not len(chunk.samples):
            return
        with self._cond:
            while self.wait and self._buffered and self._buffered + len(chunk.samples) > self.capacity \
                    and not self._closed:
                self._cond.wait(0.2)
            self._chunks.append(chunk)
            self._buffered += len(chunk.samples)
            if self._buffered > self.capacity:
                self._drop_oldest(max(self._buffered - self.capacity, self.drop_samples))
            self.high_water = max(self.high_water, self._buffered)
            self._cond.notify_all()

    def _drop_oldest(self, n: int) -> None:
        n = min(n, self._buffered)
        self.dropped += n
        self._buffered -= n
        while n:
            head = self._chunks[0]
            if len(head.samples) <= n:
                n -= len(head.samples)
                self._chunks.popleft()
                continue
            self._chunks[0] = Chunk(head.index + n, head.samples[n:], head.wall_start + n / self.sample_rate,
                                    head.segment)
            n = 0

    def close(self) -> None:
        """The source has ended (or the reader stopped): ``take`` returns what is left, then :data:`END`; a push
        waiting for room goes on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float) -> Chunk | object | None:
        """The oldest chunk; None if none came within ``timeout`` s; :data:`END` when the source ended."""
        with self._cond:
            if not self._chunks and not self._closed:
                self._cond.wait(timeout)
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk.samples)
                self._cond.notify_all()  # room for a waiting push
                return chunk
            return END if self._closed else None


class Stamper:
    """Capture side: source frames -> model-rate mono chunks with index and wall clock, into a ring."""

    def __init__(self, ring: AudioRing, source_rate: int, model_rate: int, *, resync_seconds: float = 5.0,
                 clock: Callable[[], float] = time.time, channel: int | None = None) -> None:
        self.ring = ring
        self.channel = channel  # 0-based channel to keep; None averages them
        self.source_rate = int(source_rate)
        self.model_rate = int(model_rate)
        self.resync_seconds = float(resync_seconds)
        self.clock = clock
        self.index = 0  # samples (model rate) delivered so far
        self.segment = 0
        self.resyncs = 0
        self._anchor: tuple[int, float] | None = None  # (index, unix time of that sample)
        self._resampler = self._new_resampler()
        self._restarted = False

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.source_rate == self.model_rate:
            return None
        return soxr.ResampleStream(self.source_rate, self.model_rate, 1, dtype="float32", quality="HQ")

    def push(self, frames: np.ndarray) -> None:
        """``frames``: float32 [n] or [n, channels] at the source rate, in [-1, 1] (averaged, or the channel
        given at construction)."""
        now = self.clock()
        if frames.ndim == 1:
            mono = frames
        else:
            mono = frames.mean(axis=1, dtype=np.float32) if self.channel is None else frames[:, self.channel]
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        out = mono if self._resampler is None else self._resampler.resample_chunk(mono, last=False)
        arrived_start = now - len(mono) / self.source_rate  # when its first sample was heard, by arrival
        if self._anchor is None:
            self._anchor = (self.index, arrived_start)
        elif self._restarted:
            # After a restart the audio is anchored anew, but never before the audio already stamped.
            self._anchor = (self.index, max(arrived_start, self._wall(self.index)))
        elif arrived_start - self._wall(self.index) > self.resync_seconds:
            self._anchor = (self.index, arrived_start)
            self.resyncs += 1
        self._restarted = False
        if len(out):
            self.ring.push(Chunk(self.index, np.ascontiguousarray(out, np.float32), self._wall(self.index),
                                 self.segment))
            self.index += len(out)

    def flush(self) -> None:
        """The source ended (or is about to restart): push the resampler's last samples."""
        if self._resampler is None or self._anchor is None:
            return
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(tail):
            self.ring.push(Chunk(self.index, np.ascontiguousarray(tail, np.float32), self._wall(self.index),
                                 self.segment))
            self.index += len(tail)

    def discontinuity(self) -> None:
        """The source restarted: what follows is not contiguous with what came before."""
        self.flush()
        self.segment += 1
        self._resampler = self._new_resampler()
        self._restarted = True

    def _wall(self, index: int) -> float:
        assert self._anchor is not None
        return self._anchor[1] + (index - self._anchor[0]) / self.model_rate
