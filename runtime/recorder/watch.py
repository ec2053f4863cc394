"""Recorder mode: process every recording that lands in a folder exactly once, into a :class:`Store`.

How a file is taken: the inbox is scanned every ``poll_seconds`` (recursively, audio suffixes, names
starting with "." skipped as temporary). The standard library has no inotify, and polling a folder
of recordings every few seconds costs nothing, so this polls rather than add a dependency. A file is
taken once its size and mtime have not changed for ``settle_seconds`` (judged by its mtime and by
what earlier scans saw), and it is statted again after it is hashed and decoded: if it changed
meanwhile, its results are thrown away and it waits to settle again. So a recording that is still
being written is never read early.

What is skipped: a file whose path, size and mtime are already recorded (done, failed or alias);
then, after hashing, content (sha256) already recorded under another name, which is recorded as
an alias of that file instead of being processed again. A file that failed (corrupt, unreadable,
too short) is recorded as failed with its reason and not retried until it changes. A changed file
(same path, new content) is processed again and its new rows replace the old ones in one transaction.

Memory stays flat: one file at a time, results go to the database and are dropped.

Signals (stopping.py): the first SIGTERM/SIGINT stops the watcher after the current file; a second one
abandons the current file's transaction (it is rolled back, and the file is processed again next time).
Nothing here prints: progress goes to ``logging`` and to the ``on_event`` callback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeenc.hashing import sha256_file

from ..audio import walk_audio
from ..encoder import Encoder
from ..scores import ScoreOptions, detections
from ..windows import WindowOptions
from .stopping import StopRequest
from .store import FileInfo, Store

__all__ = ["WatchSummary", "watch"]

log = logging.getLogger(__name__)
events_log = logging.getLogger(__name__ + ".events")  # what on_event also receives: a CLI silences this one


Event = Callable[[str, str, str], None]  # (kind, path, detail); kinds: done, failed, alias, unchanged


@dataclass
class WatchSummary:
    done: int = 0
    failed: int = 0
    aliases: int = 0
    unchanged: int = 0
    interrupted: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)  # the last 100 (path, reason)


def _unlistable(folder: str, exc: OSError) -> None:
    log.warning("cannot list %s: %s", folder, exc)


def watch(
    inbox: str | os.PathLike,
    encoder: Encoder,
    store: Store,
    *,
    once: bool = False,
    scoring: ScoreOptions = ScoreOptions(),
    options: WindowOptions = WindowOptions(),
    poll_seconds: float = 5.0,
    settle_seconds: float = 10.0,
    stop: threading.Event | None = None,
    on_event: Event | None = None,
    handle_signals: bool = True,
) -> WatchSummary:
    """Process every recording in INBOX once, as it appears; return when ``once`` and nothing is left,
    when ``stop`` is set, or after SIGTERM/SIGINT (handled only when called from the main thread)."""
    if poll_seconds < 0 or settle_seconds < 0:
        raise ValueError(f"poll ({poll_seconds:g} s) and settle ({settle_seconds:g} s) cannot be negative")
    root = os.path.abspath(os.fspath(inbox))  # paths are stored absolute: the same file under any cwd
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: inbox is not a folder")
    scoring = encoder.scoring(scoring)
    store.set_meta("min_windows", str(scoring.min_windows))  # what its events are derived with
    state = StopRequest(stop, "the current file")
    summary = WatchSummary()
    previous: dict[str, tuple[int, int, float]] = {}  # unprocessed path -> (size, mtime_ns, stable since)

    def event(kind: str, path: str, detail: str = "") -> None:
        events_log.info("%s %s %s", kind, path, detail)
        if on_event is not None:
            on_event(kind, path, detail)

    def process(path: str, st: os.stat_result) -> bool:
        return _process(path, st, encoder, store, summary, event, scoring, options)

    try:
        with state.signals_handled(handle_signals):
            while not state.requested:
                waiting = False
                seen: dict[str, tuple[int, int, float]] = {}
                for path, st in walk_audio(root, _unlistable):
                    if state.requested:
                        break
                    if store.lookup(path, st.st_size, st.st_mtime_ns):
                        continue
                    now = time.time()
                    before = previous.get(path)
                    signature = (st.st_size, st.st_mtime_ns)
                    since = before[2] if before and before[:2] == signature else (now if before else st.st_mtime)
                    since = max(since, st.st_mtime)
                    seen[path] = (*signature, since)
                    if now - since < settle_seconds:
                        waiting = True
                        continue
                    if not process(path, st):
                        waiting = True  # changed while being read: it waits to settle again
                        seen[path] = (*signature, time.time())
                    else:
                        seen.pop(path)
                previous = seen
                if once and not waiting:
                    break
                if state.requested:
                    break
                _sleep(poll_seconds, state)
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.interrupted = summary.interrupted or state.signals > 0
    return summary


def _sleep(seconds: float, state: StopRequest) -> None:
    end = time.monotonic() + seconds
    while not state.requested and time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def _process(path, st, encoder, store, summary, event, scoring, options) -> bool:
    """Record one settled file; False when it changed while being read (nothing recorded)."""
    try:
        sha = sha256_file(path)
    except FileNotFoundError:
        return True  # gone; nothing to record
    except OSError as exc:
        sha = f"unreadable:{path}:{st.st_size}:{st.st_mtime_ns}"
        _failed(store, summary, event, FileInfo(path, st.st_size, st.st_mtime_ns, sha), f"cannot be read: {exc}")
        return True
    info = FileInfo(path, st.st_size, st.st_mtime_ns, sha)
    mine = store.by_path(path)
    if mine and mine[1] == sha:
        store.touch(info)
        summary.unchanged += 1
        event("unchanged", path, "same content, new timestamp")
        return True
    other = store.by_sha(sha)
    if other and other[1] != path:
        store.record_alias(info, other[0])
        summary.aliases += 1
        event("alias", path, f"same content as {other[1]} ({other[2]}): not processed again")
        return True
    outcome = next(iter(encoder.embed_files([path], options)))
    try:
        after = os.stat(path)
    except FileNotFoundError:
        return True
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        log.info("%s changed while it was read: waiting for it to settle", path)
        return False
    if outcome.error:
        _failed(store, summary, event, info, outcome.error)
        return True
    result = outcome.result
    found = detections(result.logits, encoder.labels, scoring)
    store.record_done(info, result.starts, result.ends, result.embeddings, found, outcome.audio_seconds)
    summary.done += 1
    event("done", path, f"{len(result)} window(s), {outcome.audio_seconds:.1f} s")
    return True


def _failed(store: Store, summary: WatchSummary, event, info: FileInfo, reason: str) -> None:
    store.record_failed(info, reason)
    summary.failed += 1
    summary.failures = [*summary.failures[-99:], (info.path, reason)]
    event("failed", info.path, reason)
