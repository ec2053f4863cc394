"""Live audio sources for `edgeenc listen`: raw PCM on a pipe, a sound card, an ffmpeg-read stream.

Each source's ``run(stamper, stop)`` runs in the capture thread and pushes float32 frames into a
:class:`~edgeenc.runtime.ring.Stamper` until the source ends (returns) or ``stop`` is set; ``close()``
unblocks a source waiting for audio. Nothing here touches the model: a slow encoder can never slow
down capture, only make the ring drop audio.

* ``-``: raw interleaved PCM on stdin (``s16le``, ``s32le`` or ``f32le``), what ``arecord -t raw``,
  ``ffmpeg -f s16le -`` and ``sox -t raw -`` write. No extra dependency.
* ``default`` / ``alsa:NAME``: a sound device through PortAudio (the optional ``sounddevice``
  package, ``pip install 'edgeenc[listen]'``). NAME is a device index or a part of its name.
* ``ffmpeg:URL``: edgeenc runs ffmpeg (RTSP, HTTP, Icecast, files) and asks it for mono float PCM at
  the model's rate; when ffmpeg exits (the stream dropped) it is started again after a back-off
  that doubles up to a limit and starts over once a connection has delivered audio for a while.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, Protocol

import numpy as np

from .ring import Stamper

__all__ = ["SourceError", "Source", "PCM_FORMATS", "PcmSource", "SoundDeviceSource", "FfmpegSource", "open_source"]

log = logging.getLogger(__name__)

# format -> (numpy dtype, full scale): integers are scaled to [-1, 1) as soundfile scales WAV samples.
PCM_FORMATS = {"s16le": ("<i2", 32768.0), "s32le": ("<i4", 2147483648.0), "f32le": ("<f4", 1.0)}
MIN_RATE, MAX_RATE = 1000, 768000  # Hz: what sound cards, recorders and PCM pipes deliver
# An ffmpeg connection that delivered this much audio was a working stream: the next back-off starts over.
_HEALTHY_SECONDS = 10.0


class SourceError(Exception):
    """A source that cannot be opened or read; the message names it and the fix."""


class Source(Protocol):
    description: str
    sample_rate: int  # of the frames it pushes
    restarts: int

    def run(self, stamper: Stamper, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


class PcmSource:
    """Interleaved raw PCM from a binary stream (stdin, a pipe, a socket file)."""

    def __init__(self, stream: BinaryIO, fmt: str, sample_rate: int, channels: int, *, name: str = "stdin",
                 block_seconds: float = 0.05) -> None:
        if fmt not in PCM_FORMATS:
            raise SourceError(f"{name}: unknown PCM format {fmt!r}; choose one of {', '.join(PCM_FORMATS)}")
        if sample_rate <= 0 or channels <= 0:
            raise SourceError(f"{name}: rate ({sample_rate}) and channels ({channels}) must be positive")
        self.stream, self.fmt, self.sample_rate, self.channels = stream, fmt, int(sample_rate), int(channels)
        self.name = name
        self.description = f"{name} ({fmt}, {sample_rate} Hz, {channels} channel(s))"
        self.restarts = 0
        self.frames_read = 0
        self._block_frames = max(1, int(round(block_seconds * sample_rate)))

    def run(self, stamper: Stamper, stop: threading.Event) -> None:
        dtype, scale = PCM_FORMATS[self.fmt]
        frame_bytes = np.dtype(dtype).itemsize * self.channels
        read = _reader(self.stream)
        rest = b""
        while not stop.is_set():
            data = read(self._block_frames * frame_bytes)
            if not data:
                break
            data = rest + data if rest else data
            whole = len(data) - len(data) % frame_bytes
            rest = data[whole:]
            if not whole:
                continue
            frames = np.frombuffer(data[:whole], dtype=dtype).reshape(-1, self.channels)
            frames = frames.astype(np.float32) / np.float32(scale) if scale != 1.0 else frames.astype(np.float32)
            self.frames_read += len(frames)
            stamper.push(frames)
        if rest:
            log.warning("%s ended inside a frame: %d trailing byte(s) ignored", self.name, len(rest))

    def close(self) -> None:
        """Nothing to do: a read blocked on the pipe ends with the process (the capture thread is a daemon)."""


def _reader(stream: BinaryIO) -> Callable[[int], bytes]:
    # os.read returns what the pipe holds now (at most n bytes) instead of waiting for a full block, and
    # holds no lock of the buffered reader: a capture thread blocked on a quiet pipe at exit (after a
    # signal) would otherwise make the interpreter abort at shutdown.
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return getattr(stream, "read1", stream.read)
    return lambda n: os.read(fd, n)


def import_sounddevice():
    try:
        import sounddevice
    except ImportError as exc:
        raise SourceError(
            "sound devices need the 'sounddevice' package: pip install 'edgeenc[listen]' "
            "(or feed raw PCM on stdin: arecord -f S16_LE -r 16000 -t raw | edgeenc listen --source - ...)"
        ) from exc
    except OSError as exc:  # the package is there but the PortAudio library is not
        raise SourceError(f"sounddevice cannot load PortAudio ({exc}): apt install libportaudio2") from exc
    return sounddevice


class SoundDeviceSource:
    """A capture device through PortAudio; ``device`` None is the system default."""

    def __init__(self, device: str | int | None, sample_rate: int | None, channels: int, *,
                 block_seconds: float = 0.1) -> None:
        self.sd = import_sounddevice()
        self.device, self.channels, self.restarts, self.overflows = device, int(channels), 0, 0
        try:
            info = self.sd.query_devices(device, "input")
        except (ValueError, self.sd.PortAudioError) as exc:
            raise SourceError(f"sound device {device!r}: {exc} (list them with `python -m sounddevice`)") from exc
        self.sample_rate = int(sample_rate or info["default_samplerate"])
        self.description = f"{info['name']} ({self.sample_rate} Hz, {channels} channel(s))"
        self._block_frames = max(1, int(round(block_seconds * self.sample_rate)))
        self._closed = threading.Event()

    def run(self, stamper: Stamper, stop: threading.Event) -> None:
        blocks: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

        def callback(indata, frames, time_info, status) -> None:
            # PortAudio's thread: hand the block over and return at once.
            if status.input_overflow:
                self.overflows += 1
            blocks.put(indata.copy())

        try:
            stream = self.sd.InputStream(device=self.device, samplerate=self.sample_rate, channels=self.channels,
                                         dtype="float32", blocksize=self._block_frames, callback=callback)
        except (ValueError, self.sd.PortAudioError) as exc:
            raise SourceError(f"sound device {self.device!r} cannot capture at {self.sample_rate} Hz, "
                              f"{self.channels} channel(s): {exc}") from exc
        with stream:
            while not (stop.is_set() or self._closed.is_set()):
                try:
                    stamper.push(blocks.get(timeout=0.2))
                except queue.Empty:
                    if not stream.active:  # unplugged, or the driver gave up: PortAudio stops calling back
                        raise SourceError(f"sound device {self.device!r} stopped delivering audio") from None

    def close(self) -> None:
        self._closed.set()


class FfmpegSource:
    """A stream read by an ffmpeg child process, restarted with back-off whenever it ends."""

    def __init__(self, url: str, sample_rate: int, *, ffmpeg: str = "ffmpeg",
                 backoff: tuple[float, float] = (1.0, 60.0)) -> None:
        found = shutil.which(ffmpeg)
        if found is None:
            raise SourceError(f"ffmpeg:{url} needs the ffmpeg program ({ffmpeg!r} is not on PATH): apt install "
                              "ffmpeg, or pass --ffmpeg PATH, or pipe PCM in yourself with --source -")
        self.url, self.sample_rate, self.ffmpeg, self.backoff = url, int(sample_rate), found, backoff
        self.description = f"ffmpeg {url} (mono f32le, {sample_rate} Hz)"
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def command(self) -> list[str]:
        transport = ["-rtsp_transport", "tcp"] if self.url.startswith("rtsp") else []
        return [self.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *transport, "-i", self.url,
                "-vn", "-ac", "1", "-ar", str(self.sample_rate), "-f", "f32le", "pipe:1"]

    def run(self, stamper: Stamper, stop: threading.Event) -> None:
        delay = self.backoff[0]
        while not stop.is_set():
            with self._lock:
                try:
                    self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE)
                except OSError as exc:  # removed or not executable since it was found
                    raise SourceError(f"cannot run {self.ffmpeg}: {exc}") from exc
            errors: deque[str] = deque(maxlen=3)
            drain = threading.Thread(target=_collect, args=(self._proc.stderr, errors), daemon=True)
            drain.start()
            pcm = PcmSource(self._proc.stdout, "f32le", self.sample_rate, 1, name=f"ffmpeg {self.url}")
            pcm.run(stamper, stop)
            self._end_process()
            drain.join(1.0)
            if stop.is_set():
                return
            if pcm.frames_read >= _HEALTHY_SECONDS * self.sample_rate:
                delay = self.backoff[0]
            reason = "; ".join(errors) or f"exit status {self._proc.returncode}"
            log.warning("ffmpeg %s ended (%s): restarting in %.3g s", self.url, reason, delay)
            self.restarts += 1
            stamper.discontinuity()
            stop.wait(delay)
            delay = min(delay * 2, self.backoff[1])

    def _end_process(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()  # the capture thread's read ends, and run() returns


def _collect(stream: BinaryIO, lines: deque[str]) -> None:
    for raw in stream:
        text = raw.decode(errors="replace").strip()
        if text:
            lines.append(text)
    stream.close()


def open_source(spec: str, *, model_rate: int, stdin: BinaryIO, fmt: str = "s16le", rate: int | None = None,
                channels: int = 1, ffmpeg: str = "ffmpeg", backoff: tuple[float, float] = (1.0, 60.0)) -> Source:
    """SPEC is ``-``, ``default``, ``alsa:NAME`` or ``ffmpeg:URL`` (see the module docstring)."""
    if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
        raise SourceError(f"a sample rate of {rate} Hz is not one audio is recorded at: give the source's rate in "
                          f"Hz, {MIN_RATE}-{MAX_RATE} (e.g. --rate 48000)")
    if spec == "-":
        return PcmSource(stdin, fmt, model_rate if rate is None else rate, channels)
    if spec == "default" or spec.startswith("alsa:"):
        name = None if spec == "default" else spec[len("alsa:"):]
        device: str | int | None = int(name) if name and name.isdigit() else name
        return SoundDeviceSource(device, rate, channels)
    if spec.startswith("ffmpeg:") and len(spec) > len("ffmpeg:"):
        return FfmpegSource(spec[len("ffmpeg:"):], model_rate, ffmpeg=ffmpeg, backoff=backoff)
    raise SourceError(f"unknown source {spec!r}: use - (raw PCM on stdin), default, alsa:NAME or ffmpeg:URL")
