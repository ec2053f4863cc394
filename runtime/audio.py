"""Audio as it comes from recorders: decode, check, downmix and resample, one block at a time.

Everything goes through libsndfile (via soundfile), so any format it reads works: WAV, FLAC,
OGG/Vorbis, MP3 (libsndfile >= 1.1), AIFF, ... at any sample rate, integer or float samples,
mono or multichannel. Integer samples are scaled to [-1, 1] by soundfile.

Files are read in blocks of ``block_seconds`` so that a 24 h recording never sits in memory whole;
blocks are resampled with one ``soxr.ResampleStream`` so the output is identical to resampling the
whole file at once.

Problems with a file raise :class:`AudioError`, which names the file and says what is wrong:
missing, not decodable, empty, truncated (the header promises more audio than the file holds),
or containing NaN/inf samples. OGG/Vorbis files store no length in a header, so a cut OGG file
cannot be told from a shorter one; it decodes to the audio that is there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AUDIO_SUFFIXES", "AudioError", "AudioInfo", "probe", "iter_blocks", "load", "walk_audio", "audio_files"]

# What folder walks (embed, classify, watch, Ray) pick up: the container formats libsndfile reads.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".w64", ".rf64", ".caf", ".opus")

# libsndfile logs "data : <declared> (should be <available>)" when a chunk runs past the end of file.
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers that never finalise the header leave this placeholder: the length is unknown,
# not wrong, so the file is read as far as it goes.
_UNKNOWN_SIZE = 0xFFFFFFFF
# Without a Xing/LAME tag the MP3 frame count is libmpg123's estimate from the file size.
MP3_LENGTH_TOLERANCE = 0.02
# soxr HQ's filters span well under 0.1 s: one second of audio before a range settles them.
_RANGE_MARGIN_SECONDS = 1


class AudioError(Exception):
    """A file that cannot be used as audio; ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int
    duration_seconds: float
    format: str
    subtype: str


def _open(path: str, file: BinaryIO | None = None) -> sf.SoundFile:
    if file is None:
        if not os.path.exists(path):
            if os.path.islink(path):
                raise AudioError(path, f"is a symbolic link to {os.readlink(path)!r}, which does not exist or loops")
            raise AudioError(path, "file does not exist")
        if os.path.isdir(path):
            raise AudioError(path, "is a directory, not an audio file")
        try:
            open(path, "rb").close()  # libsndfile says only "System error" when it may not read the file
        except OSError as exc:
            raise AudioError(path, f"cannot be read: {(exc.strerror or str(exc)).lower()}") from None
        empty = os.path.getsize(path) == 0
    else:
        empty = file.seek(0, os.SEEK_END) == 0
        file.seek(0)
    if empty:
        raise AudioError(path, "file is empty (0 bytes); it contains no audio samples")
    try:
        f = sf.SoundFile(path if file is None else file)
    except sf.LibsndfileError as e:
        raise AudioError(path, f"libsndfile cannot read it: {e.error_string}") from e
    except OSError as e:
        raise AudioError(path, f"cannot be opened: {e}") from e
    if f.frames <= 0:
        f.close()
        raise AudioError(path, "contains no audio samples (the header declares 0 frames)")
    truncated = _header_says_truncated(f)
    if truncated:
        seconds = f.frames / f.samplerate
        f.close()
        raise AudioError(path, f"file is truncated or corrupt after {seconds:.3f} s ({truncated})")
    return f


def _header_says_truncated(f: sf.SoundFile) -> str:
    # libsndfile silently shortens WAV/AIFF files whose data chunk runs past the end of the file;
    # only its log tells, and a recorder that lost power mid-write looks exactly like that.
    try:
        log = f.extra_info
    except Exception:  # the log is only a diagnostic: never fail a good file on it
        return ""
    for m in _SHORT_CHUNK.finditer(log):
        declared, available = int(m.group(2)), int(m.group(3))
        if declared != _UNKNOWN_SIZE and available < declared:
            return f"header declares {declared} bytes of audio, the file holds {available}"
    return ""


def probe(path: str | os.PathLike[str], *, file: BinaryIO | None = None) -> AudioInfo:
    """Describe an audio file without decoding it; raise :class:`AudioError` if it is unusable.

    ``file``: an open seekable binary file to read instead of opening ``path``, which then only names
    it (e.g. a URL opened through pyarrow's filesystems, runtime/urls.py).
    """
    p = os.fspath(path)
    with _open(p, file) as f:
        return AudioInfo(
            path=p,
            sample_rate=int(f.samplerate),
            channels=int(f.channels),
            frames=int(f.frames),
            duration_seconds=f.frames / f.samplerate,
            format=str(f.format),
            subtype=str(f.subtype),
        )


def _to_mono(block: np.ndarray, channel: int | None) -> np.ndarray:
    if block.shape[1] == 1:
        mono = block[:, 0]
    elif channel is None:
        mono = block.mean(axis=1, dtype=np.float32)
    else:
        mono = block[:, channel]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_finite(path: str, mono: np.ndarray, frames_before: int, rate: int) -> None:
    finite = np.isfinite(mono)
    if not finite.all():
        first = frames_before + int(np.argmin(finite))
        raise AudioError(path, f"contains NaN or infinite samples, the first at {first / rate:.3f} s")


def iter_blocks(
    path: str | os.PathLike[str],
    target_rate: int,
    *,
    channel: int | None = None,
    block_seconds: float = 30.0,
    quality: str = "HQ",
    start: int = 0,
    stop: int | None = None,
    file: BinaryIO | None = None,
) -> Iterator[np.ndarray]:
    """Yield contiguous float32 mono blocks of the file at ``target_rate`` Hz.

    Multichannel audio is averaged over channels unless ``channel`` (0-based) picks one. The
    blocks joined end to end equal ``soxr.resample`` of the whole file. Memory is bounded by
    ``block_seconds`` of audio, whatever the length of the file.

    ``start`` and ``stop`` (output samples at ``target_rate``) limit the blocks to that range, so
    that workers can share one long file. Decoding seeks instead of reading from the beginning;
    when the file must be resampled it starts on a whole second at least ``_RANGE_MARGIN_SECONDS``
    before ``start``, so the resampler has the whole file's phase and a settled filter there: the
    samples equal the whole file's to float rounding (~1e-7). The end-of-file checks (truncation)
    apply when the range runs to the end.

    ``file``: an open seekable binary file to decode instead of opening ``path``, which then only
    names it in errors, as in :func:`probe`.
    """
    p = os.fspath(path)
    if int(target_rate) != target_rate or target_rate <= 0:
        raise ValueError(f"target_rate must be a positive integer number of Hz, got {target_rate!r}")
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds!r}")
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"sample range [{start}, {stop}) is not a range")
    target_rate = int(target_rate)

    with _open(p, file) as f:
        in_rate, channels, expected = int(f.samplerate), int(f.channels), int(f.frames)
        if channel is not None and not 0 <= channel < channels:
            raise AudioError(
                p,
                f"channel {channel} requested but the file has {channels} channel(s) "
                f"(0-based: 0..{channels - 1})",
            )
        block_frames = max(1, int(round(block_seconds * in_rate)))
        stream = None
        if in_rate != target_rate:
            stream = soxr.ResampleStream(in_rate, target_rate, 1, dtype="float32", quality=quality)
            second = max(0, start // target_rate - _RANGE_MARGIN_SECONDS)
            read, origin = second * in_rate, second * target_rate
        else:
            read, origin = start, start
        if read:
            if read >= expected:
                raise AudioError(p, f"sample {start} at {target_rate} Hz is past the end of the file")
            f.seek(read)
        clip = _RangeClip(origin, start, stop)

        while not clip.finished:
            try:
                block = f.read(block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioError(
                    p, f"file is truncated or corrupt after {read / in_rate:.3f} s (libsndfile: {e})"
                ) from e
            if len(block) == 0:  # a short read is not the end: some decoders return partial blocks
                break
            mono = _to_mono(block, channel)
            _check_finite(p, mono, read, in_rate)
            read += len(mono)
            out = mono if stream is None else stream.resample_chunk(mono, last=False)
            out = clip(out)
            if len(out):
                yield out
        if clip.finished:
            return

        tolerance = MP3_LENGTH_TOLERANCE * expected if str(f.format) == "MP3" else 0
        if read < expected - tolerance:
            raise AudioError(
                p,
                f"file is truncated or corrupt after {read / in_rate:.3f} s "
                f"(the header promises {expected / in_rate:.3f} s)",
            )
        if stream is not None:
            tail = clip(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            if len(tail):
                yield np.ascontiguousarray(tail, dtype=np.float32)


class _RangeClip:
    """Cuts consecutive output blocks, the first at sample ``origin``, to ``[start, stop)``."""

    def __init__(self, origin: int, start: int, stop: int | None) -> None:
        self.position, self.start, self.stop = origin, start, stop

    @property
    def finished(self) -> bool:
        return self.stop is not None and self.position >= self.stop

    def __call__(self, block: np.ndarray) -> np.ndarray:
        first = self.position
        self.position += len(block)
        low = max(self.start - first, 0)
        high = len(block) if self.stop is None else min(len(block), self.stop - first)
        return block[low:high] if high > low else block[:0]


def load(
    path: str | os.PathLike[str], target_rate: int, *, channel: int | None = None, quality: str = "HQ"
) -> np.ndarray:
    """The whole file as one float32 mono array at ``target_rate`` (for short files and tests)."""
    blocks = list(iter_blocks(path, target_rate, channel=channel, quality=quality))
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(blocks)


def walk_audio(folder: str | os.PathLike[str], on_error: Callable[[str, OSError], None] | None = None
               ) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of every audio file under ``folder``, recursively, in sorted path order.

    Names starting with "." are skipped, files and folders alike: recorders' temporaries, macOS "._"
    resource forks and ``.Trashes`` on exFAT cards. Links to files are followed, links to folders are not
    (no loops). A folder that cannot be listed is passed to ``on_error`` and skipped; a file that vanishes
    between listing and stat is skipped.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        if on_error is not None:
            on_error(os.fspath(folder), exc)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from walk_audio(entry.path, on_error)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in AUDIO_SUFFIXES:
                yield entry.path, entry.stat()
        except OSError:
            continue  # vanished between listing and stat


def audio_files(sources: Iterable[str | os.PathLike[str]],
                on_error: Callable[[str, OSError], None] | None = None) -> list[str]:
    """Files as given, and every audio file under the given folders (see :func:`walk_audio`; a folder that
    cannot be listed goes to ``on_error``)."""
    found: list[str] = []
    for source in map(Path, sources):  # names as pathlib writes them ("./a//b.wav" -> "a/b.wav")
        if source.is_dir():
            found.extend(path for path, _ in walk_audio(source, on_error))
        else:
            found.append(str(source))
    return found
