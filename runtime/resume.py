"""Resumable runs over many recordings, or one very long one: each finished range is saved at once.

`edgeenc embed` and `edgeenc classify` over an archive, or over one 3-hour recording, take hours. Files are
cut into ranges of whole windows (ranges.py: about ``range_seconds`` of audio each; a short file is one
range), and every finished range is written atomically to `<OUT>.parts/` as soon as it is done, so a
crash or a power cut loses at most the ranges in flight. The next run with the same output skips every
range whose part is there.

A part belongs to one file and one run: the file is found by path, size and mtime and confirmed by its
sha256 (kept in the part); the run's identity (bundle, the variant that computed the numbers, and every
window option that changes a row) is kept in `<OUT>.parts/run.json`, and a rerun with another one is
refused (:class:`ResumeMismatch` names the option) instead of mixing rows of both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeenc.hashing import sha256_file

from .atomic import atomic_path, write_json_atomic
from .audio import AudioError, AudioInfo, iter_blocks, probe
from .bundle import bundle_identity
from .encoder import EmbeddingResult, Encoder, FileOutcome, Stream
from .ranges import Range, join_ranges, plan_ranges
from .windows import WindowOptions
from .writers import OutputWriteError

RUN_FILE = "run.json"
DEFAULT_RANGE_SECONDS = 600.0  # a killed run loses at most about this much audio of a long file


# What a run.json written before a field was recorded meant by its absence.
OLDER_RUNS = {"head": "model"}


class ResumeMismatch(ValueError):
    """The parts folder holds results of a run with other options; the message names the first one."""


def run_identity(encoder: Encoder, options: WindowOptions) -> dict[str, str]:
    """What decides the rows of a run: the bundle, the variant that runs it, and the window options."""
    options = options.with_window(encoder.window_seconds)
    return {"model_id": str(encoder.manifest.get("model_id")),
            "checkpoint_sha256": str(encoder.manifest.get("checkpoint_sha256")),
            "bundle_sha256": bundle_identity(encoder.bundle, encoder.manifest)[1],
            "variant": encoder.backend.variant,
            "head": "probe" if encoder.head is not None and encoder.head.name == "probe" else "model",
            **{name: json.dumps(getattr(options, name))
               for name in ("window_seconds", "hop_seconds", "last", "channel")}}


class PartFolder:
    """One `.npz` per finished range of an input file, beside the output OUT, in `OUT.parts/`."""

    def __init__(self, out: str | os.PathLike, run: dict[str, str]) -> None:
        out = Path(out)
        self.folder = out.with_name(out.name + ".parts")
        self.run = dict(run)

    def check(self) -> None:
        """Raise :class:`ResumeMismatch` when the folder holds parts of a run with other options."""
        try:
            saved = json.loads((self.folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            return  # no parts yet (or none that say what made them: those are never loaded)
        for name, value in self.run.items():
            if saved.get(name, OLDER_RUNS.get(name)) != value:
                raise ResumeMismatch(
                    f"{self.folder} holds the finished files of a run with {name} {saved.get(name)}, this run has "
                    f"{value}: run again with the options of that run to resume it, or pass --overwrite to start "
                    "over (its parts are then removed)")

    def _path(self, audio: str | os.PathLike, piece: Range) -> Path:
        stat = Path(audio).stat()
        key = f"{Path(audio).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{piece.index}/{piece.count}@{piece.start}"
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")

    def exists(self) -> bool:
        return self.folder.is_dir()

    def load(self, audio: str | os.PathLike, piece: Range, sha256: str) -> EmbeddingResult | None:
        """The saved result of one range of `audio`, or None when it has none (or the file changed since)."""
        try:
            path = self._path(audio, piece)
            with np.load(path, allow_pickle=False) as part:
                if str(part["sha256"]) != sha256:
                    return None  # same name, size and mtime, other content
                logits = part["logits"] if part["logits"].size else None
                return EmbeddingResult(str(audio), part["starts"], part["ends"], part["embeddings"], logits)
        except (OSError, ValueError, KeyError):
            return None  # no part, or one cut short by a crash: redo that range

    def save(self, audio: str | os.PathLike, piece: Range, result: EmbeddingResult, sha256: str) -> None:
        """Keep one finished range; OutputWriteError (a full disk) stops the run, the parts so far are kept."""
        logits = result.logits if result.logits is not None else np.zeros((0, 0), np.float32)
        try:
            if not (self.folder / RUN_FILE).is_file():
                write_json_atomic(self.folder / RUN_FILE, self.run)
            with atomic_path(self._path(audio, piece)) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, starts=result.starts, ends=result.ends, embeddings=result.embeddings, logits=logits,
                         sha256=np.array(sha256))
        except OSError as exc:
            raise OutputWriteError(f"{self.folder}: cannot keep a finished part ({exc.strerror or exc}); the parts "
                                   "so far are kept: make room and run again to resume") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Step:
    """What a resumable run did next: audio seconds newly done, and a whole file's outcome once it has one."""

    audio_seconds: float = 0.0
    outcome: FileOutcome | None = None
    resumed_files: int = 0  # the first step: files found whole in the parts folder
    resumed_ranges: int = 0  # ... and ranges of files found there in part


@dataclass
class _File:
    path: str
    ranges: list[Range]
    done: dict[int, EmbeddingResult]
    error: str | None = None
    sha256: str | None = None
    seconds: float = 0.0  # the recording's length, from its header

    def digest(self) -> str:
        if self.sha256 is None:
            self.sha256 = sha256_file(self.path)
        return self.sha256


def plan_files(encoder: Encoder, files: Sequence[str], options: WindowOptions,
               range_seconds: float = DEFAULT_RANGE_SECONDS) -> tuple[list[_File], float]:
    """Every file probed and cut into ranges (a file that cannot be probed fails now); total audio seconds."""
    cut = options.with_window(encoder.window_seconds)
    planned, total = [], 0.0
    for path in files:
        try:
            info: AudioInfo = probe(path)
        except AudioError as exc:
            planned.append(_File(path, [], {}, exc.reason))
            continue
        total += info.duration_seconds
        ranges = plan_ranges(path, info, encoder.sample_rate, cut, range_seconds)
        planned.append(_File(path, ranges, {}, seconds=info.duration_seconds))
    return planned, total


def resumable_run(encoder: Encoder, planned: list[_File], options: WindowOptions, parts: PartFolder
                  ) -> Iterator[Step]:
    """Run the ranges not yet in `parts` (parts.check() first), saving each as it finishes; yields a Step per
    range done (audio seconds, for progress) and one with the outcome of every file, in the given order (its
    `audio_seconds` the recording's whole length, as its header gives it)."""
    for item in planned:
        if item.error is None and parts.exists():
            for piece in item.ranges:
                saved = parts.load(item.path, piece, item.digest())
                if saved is not None:
                    item.done[piece.index] = saved
    whole = [f for f in planned if f.ranges and len(f.done) == len(f.ranges)]
    yield Step(sum(_seconds(r) for f in planned for r in f.done.values()), resumed_files=len(whole),
               resumed_ranges=sum(len(f.done) for f in planned if f.done and f not in whole))
    queue = list(planned)

    def streams():
        for file_index, item in enumerate(planned):
            for piece in item.ranges:
                if item.error is None and piece.index not in item.done:  # a failed file's other ranges are not run
                    blocks = iter_blocks(item.path, encoder.sample_rate, channel=options.channel, start=piece.start,
                                         stop=piece.stop)
                    yield Stream(f"{file_index}:{piece.index}", blocks, piece.options(options),
                                 piece.start / encoder.sample_rate)

    def finished() -> Iterator[Step]:
        while queue and (queue[0].error is not None or len(queue[0].done) == len(queue[0].ranges)):
            item = queue.pop(0)
            if item.error is not None:
                yield Step(outcome=FileOutcome(item.path, error=item.error))
                continue
            ordered = [item.done[i] for i in range(len(item.ranges))]
            result = join_ranges(item.path, ordered, [r.start for r in item.ranges], encoder.sample_rate)
            yield Step(outcome=FileOutcome(item.path, result, audio_seconds=item.seconds))

    yield from finished()
    for outcome in encoder.embed_streams(streams(), options):
        file_index, range_index = (int(x) for x in outcome.path.split(":"))
        item = planned[file_index]
        if outcome.error is not None:
            item.error = item.error or outcome.error
        elif item.error is None:
            parts.save(item.path, item.ranges[range_index], outcome.result, item.digest())
            item.done[range_index] = outcome.result
            yield Step(_seconds(outcome.result))
        yield from finished()
    yield from finished()


def _seconds(result: EmbeddingResult) -> float:
    """The audio a range covers: its times start at the range's first sample."""
    return float(result.ends.max()) if len(result) else 0.0
