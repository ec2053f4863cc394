"""The recorder commands: `watch` (a folder), `listen` (a live source), and `export-db`, `clips` and `serve` over
their SQLite results file (`search` and `index` are in cli_search.py: they take archives too)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgeenc.cli_common import (
    EncoderChoice,
    ExitStatus,
    OverwriteOpt,
    Scoring,
    err,
    fail,
    failing_on,
    grouped_options,
    keep_results_index,
    note,
    open_results_store,
    recorder_logging,
    require,
)
from edgeenc.runtime.windows import WindowOptions


@grouped_options
def watch(
    inbox: Path = typer.Argument(..., help="folder where recordings land (walked recursively)"),
    bundle: Path = typer.Option(..., "--bundle", help="a bundle folder"),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results file (created if missing)"),
    once: bool = typer.Option(False, "--once", help="process what is there, then exit"),
    poll: float = typer.Option(5.0, "--poll", help="seconds between scans of INBOX"),
    settle: float = typer.Option(10.0, "--settle", help="a file is taken once unchanged for this many seconds"),
    quiet: bool = typer.Option(False, "--quiet", help="log only failures"),
    index: bool = typer.Option(True, "--index/--no-index", help="keep the nearest-neighbour index of the stored "
                               "windows beside the results file (<db>.index/, needs edgeenc[search]) for fast "
                               "`edgeenc search`"),
    scoring: Scoring = Scoring(),
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
) -> None:
    """Process every recording that lands in INBOX exactly once, into a crash-safe SQLite file."""
    from edgeenc.runtime.recorder import Store, StoreError
    from edgeenc.runtime.recorder import watch as run_watch

    if not inbox.is_dir():
        fail(f"{inbox}: inbox is not a folder")
    encoder = choice.open(bundle)
    options = scoring.options(encoder)
    recorder_logging(quiet, "edgeenc.runtime.recorder.watch.events")
    store = open_results_store(lambda: Store.for_encoder(db, encoder))
    with failing_on(StoreError):
        keep_results_index(store, index)

    def on_event(kind: str, path: str, detail: str) -> None:
        if kind == "failed":
            err(f"{path}: {detail}")
        elif not quiet:
            note(f"{kind:9} {path}  {detail}")

    other = [v for v in store.variants() if v != encoder.backend.variant]
    if other:
        note(f"note: {db} holds rows of {'; '.join(other)}; the rows of this run are marked "
             f"{encoder.backend.variant} (the variant column of `edgeenc export-db`)")
    note(f"watching {inbox} into {db} ({'once' if once else f'poll {poll:g} s, settle {settle:g} s'})")
    with store, failing_on(StoreError, ValueError):
        summary = run_watch(inbox, encoder, store, once=once, scoring=options, options=windows, poll_seconds=poll,
                            settle_seconds=settle, on_event=on_event)
        totals = store.counts()
    note(f"{summary.done} done, {summary.failed} failed, {summary.aliases} duplicate(s) this run; "
         f"{db} holds {totals['done']} done, {totals['failed']} failed, {totals['windows']} windows"
         + (" (stopped by signal)" if summary.interrupted else ""))
    if once and summary.failed:
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)


def export_db(
    db: Path = typer.Argument(..., help="a results file written by `edgeenc watch`"),
    out: Path = typer.Option(..., "-o", "--out", help="output .csv or .parquet (with --events also a .txt Raven "
                             "selection table)"),
    overwrite: OverwriteOpt = False,
    events: bool = typer.Option(False, "--events", help="one row per event (a label's consecutive windows merged) "
                                "instead of per window"),
    min_windows: int | None = typer.Option(None, "--min-windows", help="with --events: at least this many "
                                           "consecutive windows (default: what watch/listen were given)"),
) -> None:
    """One row per window: file, start, end, top label and score (if any), variant, embedding; or the events."""
    from edgeenc.runtime.recorder import Store, StoreError, export_events, export_table
    from edgeenc.runtime.writers import EVENT_SUFFIXES, TABLE_SUFFIXES, WriterError, check_output

    if min_windows is not None and min_windows < 1:
        fail(f"--min-windows must be at least 1, got {min_windows}")
    with failing_on(WriterError):
        check_output(out, EVENT_SUFFIXES if events else TABLE_SUFFIXES)
    if out.exists() and not overwrite:
        fail(f"{out} exists: pass --overwrite to replace it, or -o another file")
    with failing_on(StoreError, WriterError), Store.open_reader(db) as store:
        rows = export_events(store, out, min_windows) if events else export_table(store, out)
        say_what_it_holds(db, store)
    note(f"{rows} {'event' if events else 'window'}(s) written to {out}")


def clips(
    db: Path = typer.Argument(..., help="a results file written by `edgeenc watch` or `edgeenc listen`"),
    out: Path = typer.Option(..., "-o", "--out", help="folder for the FLAC clips and their index.csv"),
    margin: float = typer.Option(1.0, "--margin", help="seconds of audio kept before and after each event "
                                 "(recordings; a live event has the audio of its windows)"),
    min_windows: int | None = typer.Option(None, "--min-windows", help="events of at least this many consecutive "
                                           "windows (default: what watch/listen were given)"),
    label: list[str] | None = typer.Option(None, "--label", help="only events of this label (repeatable)"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Each event's audio as a FLAC clip to listen to, and index.csv with an empty verdict column to fill in."""
    from edgeenc.runtime.clips import INDEX, write_index
    from edgeenc.runtime.recorder import Store, StoreError, event_clips

    if margin < 0 or (min_windows is not None and min_windows < 1):
        fail("--margin cannot be negative and --min-windows must be at least 1")
    if (out / INDEX).exists() and not overwrite:
        fail(f"{out / INDEX} exists: pass --overwrite to cut the clips again into {out}, or -o another folder")
    made, failed = [], 0
    with failing_on(StoreError, OSError), Store.open_reader(db) as store:
        for clip in event_clips(store, out, margin=margin, min_windows=min_windows, labels=frozenset(label or ())):
            if isinstance(clip, Exception):
                failed += 1
                err(str(clip))
            else:
                made.append(clip)
        index = write_index(out, made)
    note(f"{len(made)} clip(s) in {out}, listed in {index} (fill in its verdict column: yes, no or the right "
         f"label); {failed} event(s) without audio")
    if failed:
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)


def serve(
    db: Path = typer.Argument(..., help="a results file written by `edgeenc watch` or `edgeenc listen`"),
    port: int = typer.Option(8080, "--port", help="TCP port of the page"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface; the "
                             "page has no login)"),
) -> None:
    """A local web page of the results file: latest events with spectrogram and player, hourly chart, health."""
    import socket

    require("serve", "starlette", "uvicorn", "PIL", extra="serve")
    from edgeenc.runtime.recorder import StoreError, open_read_only, page_app

    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, got {port}")
    with failing_on(StoreError):
        open_read_only(db).close()
    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as exc:
        fail(f"port {port} on {host} cannot be used ({exc.strerror or exc}): pass another --port")
    import uvicorn

    note(f"serving {db} at http://{host}:{port}/ (read-only; Ctrl-C stops)")
    uvicorn.run(page_app(str(db)), host=host, port=port, log_level="warning")


def say_what_it_holds(db: Path, store) -> None:
    """Warn when a results file holds random-weight rows or rows of several variants (a CPU default that changed
    after `edgeenc optimize`): the `variant` column of export-db says which row is which."""
    if store.meta().get("random_init") == "true":
        note(f"warning: {db} holds results of RANDOM weights (--random-init): they mean nothing")
    variants = store.variants()
    if len(variants) > 1:
        note(f"note: {db} mixes rows of {len(variants)} variants ({'; '.join(variants)}); the variant column of "
             "`edgeenc export-db` says which made each row")


@grouped_options
def listen(
    bundle: Path = typer.Option(..., "--bundle", help="a bundle folder"),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results file (created if missing)"),
    source: str = typer.Option(..., "--source", help="- (raw PCM on stdin), default, alsa:NAME or ffmpeg:URL"),
    pcm_format: str = typer.Option("s16le", "--format", help="stdin PCM: s16le, s32le or f32le"),
    rate: int | None = typer.Option(None, help="stdin / device sample rate (stdin default: the model's rate)"),
    channels: int = typer.Option(1, help="channels of the stdin PCM or to capture (averaged to mono unless "
                                         "--channel picks one)"),
    save_clips: Path | None = typer.Option(None, "--save-clips", help="FLAC clip of each window with a "
                                           "detection >= --threshold into this folder"),
    buffer: float = typer.Option(60.0, help="seconds of audio held while the encoder is behind; then the "
                                 "oldest is dropped"),
    no_drop: bool = typer.Option(False, "--no-drop", help="never drop audio: a full buffer makes the source wait "
                                 "(for files and pipes; a live sound card would overflow instead)"),
    resync_after: float = typer.Option(5.0, "--resync-after", help="re-anchor the wall clock when audio "
                                       "arrives this many seconds later than its sample count says"),
    ffmpeg: str = typer.Option("ffmpeg", "--ffmpeg", help="the ffmpeg program for ffmpeg:URL"),
    quiet: bool = typer.Option(False, "--quiet", help="log only drops, restarts and failures"),
    index: bool = typer.Option(True, "--index/--no-index", help="keep the nearest-neighbour index of the stored "
                               "windows beside the results file (<db>.index/, needs edgeenc[search]) for fast "
                               "`edgeenc search`"),
    scoring: Scoring = Scoring(),
    windows: WindowOptions = WindowOptions(last="short"),
    choice: EncoderChoice = EncoderChoice(),
) -> None:
    """Embed (and classify) a live source window by window into a crash-safe SQLite file."""
    from edgeenc.runtime.recorder import LiveStore, SourceError, StoreError, open_source
    from edgeenc.runtime.recorder import listen as run_listen

    if save_clips is not None and scoring.threshold is None and scoring.thresholds is None:
        fail("--save-clips needs --threshold (or --thresholds): the score from which a window counts as a detection")
    encoder = choice.open(bundle)
    options = scoring.options(encoder)
    if save_clips is not None and "logits" not in encoder.output_names:
        fail(f"--save-clips needs a model with a classifier; {encoder.manifest.get('model_id')} has none")
    recorder_logging(quiet, "edgeenc.runtime.recorder.listen.events")
    with failing_on(SourceError):
        live = open_source(source, model_rate=encoder.sample_rate, stdin=sys.stdin.buffer, fmt=pcm_format,
                           rate=rate, channels=channels, ffmpeg=ffmpeg)

    store = open_results_store(lambda: LiveStore.for_encoder(db, encoder))
    with failing_on(StoreError):
        keep_results_index(store, index)

    def on_event(kind: str, detail: str) -> None:
        if kind == "dropped":
            err(f"dropped {detail}")
        elif not quiet:
            note(f"{kind:7} {detail}")

    note(f"listening to {live.description} into {db}")
    with store:
        try:
            with failing_on(ValueError, StoreError):
                summary = run_listen(encoder, store, live, source_name=source, options=windows, scoring=options,
                                     clips_dir=save_clips, buffer_seconds=buffer, no_drop=no_drop,
                                     resync_seconds=resync_after,
                                     on_event=on_event)
        except SourceError as exc:
            fail(f"{source}: {exc} (the windows so far are stored)", ExitStatus.SOURCE_FAILED)
    note(f"{summary.ended}: {summary.audio_seconds:.1f} s of audio, {summary.windows} window(s) in "
         f"{summary.batches} batch(es), {summary.dropped_seconds:.1f} s dropped, {summary.clips} clip(s), "
         f"{summary.restarts} restart(s); encoder at {summary.speed:.2f}x real time, "
         f"CPU {summary.cpu_seconds:.2f} s over {summary.elapsed_seconds:.2f} s")
