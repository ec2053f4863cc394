"""Live mode: windows of a never-ending source, embedded (and classified) as they arrive, into a store.

The capture thread runs the source into a bounded :class:`~.ring.AudioRing`; this thread takes
chunks, cuts windows with :func:`edgeenc.runtime.windows.iter_windows` (the same
policy and the same numbers as `edgeenc embed` of the audio as a file) and runs them through the
encoder. While it keeps up, each window runs as soon as it is complete (batch of one, lowest
latency); when it falls behind, the windows that are ready go together, up to ``batch_size``.
When it cannot keep up at all, the ring drops the oldest audio; drops are counted, stored with the
stream, and logged at most once per ``report_seconds`` (saying so when the audio arrives faster than
real time: a file piped in, not a live source). With ``no_drop`` the source waits instead (files and
pipes only: a sound card cannot wait).

Segments and the last window. Audio is cut into windows per *segment*: contiguous audio between
the start, a drop, a source restart and the end of the source. A new segment starts its own window
grid at its first sample. Audio before a drop or a restart that does not fill a window is dropped
(under overload that audio is exactly what there is no time for). At the END of the source (a pipe
that closes) the final partial window follows ``last`` as for files: "short" (the default here,
whatever the file commands' default), "pad" or "drop". On a signal the partial window is dropped.

Signals (stopping.py): the first SIGTERM/SIGINT stops capture, runs the windows already cut (the current batch),
closes the stream and returns; a second one abandons the batch (its transaction rolls back).
Nothing here prints: progress goes to ``logging`` and to ``on_event(kind, detail)``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..encoder import Encoder
from ..scores import ScoreOptions, detections
from ..windows import Batch, Window, WindowBatcher, WindowOptions, iter_windows
from .live_store import LiveStore, utc_iso
from .ring import END, AudioRing, Chunk, Stamper
from .sources import Source
from .stopping import StopRequest

__all__ = ["ListenSummary", "listen"]

log = logging.getLogger(__name__)
events_log = logging.getLogger(__name__ + ".events")  # what on_event also receives: a CLI silences this one

Event = Callable[[str, str], None]  # (kind, detail); kinds: batch, dropped, clip, restart
# Audio arriving this much faster than the clock is not a live source (a file piped in, a fast pipe).
FASTER_THAN_LIVE = 1.5


@dataclass
class ListenSummary:
    audio_seconds: float = 0.0  # received from the source (model-rate samples / rate), drops included
    dropped_seconds: float = 0.0
    windows: int = 0
    batches: int = 0
    skipped_windows: int = 0  # windows with NaN / inf samples (f32le input) or non-finite outputs, not stored
    clips: int = 0
    restarts: int = 0
    resyncs: int = 0  # times the wall clock was re-anchored after a stall
    max_buffered_seconds: float = 0.0
    inference_seconds: float = 0.0  # wall time inside the backend
    cpu_seconds: float = 0.0  # process CPU time (every thread) while listening
    elapsed_seconds: float = 0.0
    ended: str = ""  # "end of source", "signal" or "stopped"

    @property
    def speed(self) -> float:
        """Audio seconds encoded per second of inference (x real time, as `edgeenc bench` reports rtf)."""
        return (self.audio_seconds - self.dropped_seconds) / self.inference_seconds if self.inference_seconds else 0.0


class _Segment:
    """Contiguous audio from the ring, as blocks for iter_windows, with the wall clock of each sample."""

    def __init__(self, first: Chunk, ring: AudioRing, stop: StopRequest, idle: Callable[[], None]) -> None:
        self.start, self.segment = first.index, first.segment
        self.ring, self.stop, self.idle = ring, stop, idle
        self.rate = ring.sample_rate
        self.ended = ""  # "eof", "gap" or "stop" once blocks() is exhausted
        self.carry: Chunk | None = None  # the first chunk of the next segment
        self._first: Chunk | None = first
        self._anchors: deque[tuple[int, float]] = deque()  # (index, wall time) of each chunk taken

    def blocks(self) -> Iterator[np.ndarray]:
        expected = self.start
        while True:
            chunk, self._first = self._first or self._next(), None
            if chunk is None:
                return
            if chunk.index != expected or chunk.segment != self.segment:
                self.carry, self.ended = chunk, "gap"
                return
            self._anchors.append((chunk.index, chunk.wall_start))
            expected += len(chunk.samples)
            yield chunk.samples

    def _next(self) -> Chunk | None:
        chunk = self.ring.take(0.0)
        if chunk is None:
            self.idle()
        while chunk is None and not self.stop.requested:
            chunk = self.ring.take(0.2)
        if chunk is END or self.stop.requested:
            self.ended = "eof" if chunk is END else "stop"
            return None
        return chunk

    def wall(self, index: int) -> float:
        while len(self._anchors) > 1 and self._anchors[1][0] <= index:
            self._anchors.popleft()  # windows come in order: earlier chunks are never asked for again
        first_index, first_wall = self._anchors[0]
        return first_wall + (index - first_index) / self.rate


def listen(
    encoder: Encoder,
    store: LiveStore,
    source: Source,
    *,
    source_name: str,
    options: WindowOptions = WindowOptions(last="short"),
    scoring: ScoreOptions = ScoreOptions(),
    clips_dir: str | Path | None = None,
    buffer_seconds: float = 60.0,
    no_drop: bool = False,
    resync_seconds: float = 5.0,
    report_seconds: float = 60.0,
    stop: threading.Event | None = None,
    handle_signals: bool = True,
    on_event: Event | None = None,
) -> ListenSummary:
    """Listen to SOURCE until it ends, ``stop`` is set or a signal comes; every window goes into STORE.

    ``options`` cut the windows as for files (``last`` applies where the source ends, ``channel`` picks one
    channel of the source instead of the mean); ``scoring`` chooses the labels stored per window.
    """
    for name, value in (("buffer", buffer_seconds), ("resync", resync_seconds), ("report", report_seconds)):
        if not value > 0:
            raise ValueError(f"{name} seconds must be positive, got {value:g}")
    scoring = encoder.scoring(scoring)
    store.set_meta("min_windows", str(scoring.min_windows))  # what its events are derived with
    rate = encoder.sample_rate
    window = options.window_seconds or encoder.window_seconds
    w = int(round(window * rate))
    if clips_dir is not None and ((scoring.threshold is None and not scoring.thresholds)
                                  or "logits" not in encoder.output_names):
        raise ValueError("saving clips needs a model with a classifier and a --threshold to call a detection")
    channels = getattr(source, "channels", 1)  # ffmpeg sources deliver mono
    if options.channel is not None and options.channel >= channels:
        raise ValueError(f"channel {options.channel} requested but {source.description} has {channels} "
                         f"channel(s) (0-based: 0..{channels - 1})")
    hop = int(round((options.hop_seconds or window) * rate))
    # Room for at least two windows and a hop, whatever was asked: less could never hold a whole window.
    ring = AudioRing(max(int(buffer_seconds * rate), 2 * w + hop), drop_samples=w, sample_rate=rate, wait=no_drop)
    stamper = Stamper(ring, source.sample_rate, rate, resync_seconds=resync_seconds, channel=options.channel)
    state, halt = StopRequest(stop, "the current batch"), threading.Event()
    summary = ListenSummary()
    file_id = store.open_stream(source_name, source.sample_rate)
    failure: list[BaseException] = []
    batcher = WindowBatcher(encoder.batch_size(options))
    reported = {"at": time.monotonic(), "dropped": 0, "received": 0}
    t0, cpu0 = time.monotonic(), time.process_time()

    def event(kind: str, detail: str) -> None:
        events_log.log(logging.WARNING if kind == "dropped" else logging.INFO, "%s %s", kind, detail)
        if on_event is not None:
            on_event(kind, detail)

    def totals() -> dict:
        summary.audio_seconds = stamper.index / rate
        summary.dropped_seconds = ring.dropped / rate
        summary.restarts = source.restarts
        return {"audio_seconds": summary.audio_seconds, "dropped_seconds": summary.dropped_seconds,
                "restarts": summary.restarts}

    def run(batches: list[Batch]) -> None:
        for batch in batches:
            _record(batch, encoder, store, file_id, summary, scoring, clips_dir, event, totals)
        _report_drops(ring, stamper, reported, report_seconds, event, summary)

    def capture() -> None:
        try:
            source.run(stamper, halt)
            stamper.flush()
        except BaseException as exc:  # handed to the main thread, which raises it after closing the stream
            failure.append(exc)
        finally:
            ring.close()

    def idle() -> None:  # caught up with the source: run what is waiting instead of batching it
        run(batcher.flush())

    capture_thread = threading.Thread(target=capture, name="edgeenc-capture", daemon=True)
    with state.signals_handled(handle_signals):
        capture_thread.start()
        try:
            for key, win in _live_windows(ring, state, idle, options, window, encoder.min_samples):
                run(batcher.add(key, win))
            run(batcher.flush())
            summary.ended = "signal" if state.signals else ("stopped" if state.requested else "end of source")
        finally:
            halt.set()
            ring.close()  # a source waiting for room (--no-drop) goes on and sees the halt
            source.close()
            summary.resyncs = stamper.resyncs
            summary.max_buffered_seconds = ring.high_water / rate
            summary.elapsed_seconds = time.monotonic() - t0
            summary.cpu_seconds = time.process_time() - cpu0
            store.close_stream(file_id, **totals())
    capture_thread.join(1.0)
    if failure:
        raise failure[0]
    return summary


def _live_windows(ring: AudioRing, state: StopRequest, idle: Callable[[], None], options: WindowOptions,
                  window: float, min_samples: int) -> Iterator[tuple[tuple[float, float, float], Window]]:
    """((start, end, wall-clock start), window) of every window cut from the ring, segment by segment."""
    rate = ring.sample_rate
    w = int(round(window * rate))
    chunk = _first_chunk(ring, state)
    while chunk is not None:
        segment = _Segment(chunk, ring, state, idle)
        for win in iter_windows(segment.blocks(), rate, window, options.hop_seconds, min_samples=min_samples,
                                last="short"):
            samples = win.samples
            if len(samples) < w:  # the segment's final partial window
                if segment.ended != "eof" or options.last == "drop":
                    continue
                if options.last == "pad":
                    samples = np.concatenate([samples, np.zeros(w - len(samples), np.float32)])
            start = segment.start + int(round(win.start_seconds * rate))
            key = (start / rate, segment.start / rate + win.end_seconds, segment.wall(start))
            yield key, Window(win.start_seconds, win.end_seconds, samples)
        chunk = segment.carry


def _first_chunk(ring: AudioRing, state: StopRequest) -> Chunk | None:
    while not state.requested:
        chunk = ring.take(0.2)
        if chunk is END:
            return None
        if chunk is not None:
            return chunk
    return None


def _record(batch: Batch, encoder: Encoder, store: LiveStore, file_id: int, summary: ListenSummary,
            scoring: ScoreOptions, clips_dir, event: Event, totals: Callable[[], dict]) -> None:
    began = time.perf_counter()
    done = encoder.run_batch(batch.samples)
    summary.inference_seconds += time.perf_counter() - began
    rows, outputs = done.rows, done.outputs
    for refused, what in ((done.nonfinite_input, "NaN or infinite samples"),
                          (done.nonfinite_output, "outputs that are not finite (samples far outside [-1, 1]?)")):
        if len(refused):
            summary.skipped_windows += len(refused)
            log.warning("%d window(s) with %s skipped, the first at %s", len(refused), what,
                        utc_iso(batch.keys[refused[0]][2]))
    if not len(rows):
        return
    keys = [batch.keys[i] for i in rows]
    found = detections(outputs.get("logits"), encoder.labels, scoring)
    clips = []
    if clips_dir is not None:
        clips = [(d.window, _save_clip(Path(clips_dir), batch.windows[rows[d.window]], keys[d.window][2], d.label,
                                       d.score, encoder.sample_rate), d.label, d.score)
                 for d in found if d.rank == 1]
    store.record_batch(file_id, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                       outputs["embedding"], found, clips, **totals())
    summary.windows += len(rows)
    summary.batches += 1
    summary.clips += len(clips)
    for _, path, label, score in clips:
        event("clip", f"{label} {score:.3f} {path}")
    tops = [f"{d.label} {d.score:.2f}" for d in found if d.rank == 1]
    event("batch", f"{len(rows)} window(s) from {utc_iso(keys[0][2])}" + (f": {', '.join(tops)}" if tops else ""))


def _save_clip(folder: Path, window: Window, wall: float, label: str, score: float, rate: int) -> str:
    import soundfile as sf

    real = int(round((window.end_seconds - window.start_seconds) * rate))  # padding is not audio
    stamp = utc_iso(wall).replace("+00:00", "Z").replace(":", "").replace("-", "")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:80] or "label"
    path = folder / f"{stamp}_{safe}_{score:.3f}.flac"
    # Written (and fsynced) before the batch's transaction: a crash can leave a clip without its row,
    # never a row without its clip.
    with atomic_path(path) as tmp:
        sf.write(tmp, window.samples[:real], rate, format="FLAC")
    return str(path)


def _report_drops(ring: AudioRing, stamper: Stamper, reported: dict, every: float, event: Event,
                  summary: ListenSummary) -> None:
    dropped, now = ring.dropped, time.monotonic()
    fresh = dropped - reported["dropped"]
    if not fresh or (reported["dropped"] and now - reported["at"] < every):
        return
    received = stamper.index - reported["received"]
    rate = ring.sample_rate
    lost = (f"{fresh / rate:.1f} s of audio in the last {now - reported['at']:.1f} s "
            f"({100 * fresh / max(received, 1):.0f} % of what arrived)")
    speed = f"{summary.speed:.2f}x" if summary.inference_seconds else "?"
    arriving = received / rate / max(now - reported["at"], 1e-9)
    if arriving > FASTER_THAN_LIVE:
        event("dropped", f"{lost}: the encoder cannot keep up (it runs at {speed} real time) with audio that "
                         f"arrives at {arriving:.0f}x real time, faster than a live source can. A recording? Use "
                         "`edgeenc embed` or `watch` for files, or pass --no-drop to make the source wait for the "
                         "encoder")
    else:
        event("dropped", f"{lost}: the encoder cannot keep up (it runs at {speed} real time; try --threads, a "
                         "faster variant or a longer --hop)")
    reported.update(at=now, dropped=dropped, received=stamper.index)
