"""`edgeenc search` and `edgeenc index`: find stored windows like a query, in a results file (watch, listen) or an
archive folder (`embed|classify --engine ray`), with the nearest-neighbour index beside them."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeenc.cli_common import (
    EncoderChoice,
    ExitStatus,
    OverwriteOpt,
    WindowsProgress,
    fail,
    failing_on,
    grouped_options,
    note,
    require,
)
from edgeenc.runtime.windows import WindowOptions

RESULTS_HELP = "a results file (`edgeenc watch`/`listen`) or an archive folder (`embed|classify --engine ray -o DIR`)"


def _refuse_tables(results: Path) -> None:
    """An `embed -o` table is not something search or index can take: say what is."""
    if results.suffix.lower() in (".parquet", ".csv", ".npz") and results.is_file():
        fail(f"{results}: a table of embeddings; search and index take a results file of `edgeenc watch`/`listen` "
             "or an archive folder of `edgeenc embed|classify --engine ray -o DIR`")


def _parse_like(like: str) -> tuple[str, float]:
    file, sep, seconds = like.rpartition("@")
    try:
        if not sep or not file:
            raise ValueError
        return file, float(seconds)
    except ValueError:
        fail(f"--like {like!r}: expected FILE@SECONDS, the file and start of a stored window as `edgeenc export-db` "
             "lists them (e.g. /data/rec1.wav@120)")


def _query_embeddings(audio: Path, start: float | None, end: float | None, encoder, windows: WindowOptions):
    """The query's window embeddings: AUDIO whole, or its [start, end) seconds."""
    from edgeenc.runtime.audio import AudioError, load

    with failing_on(AudioError):
        if start is None and end is None:
            return encoder.embed_file(audio, windows).embeddings
        samples = load(audio, encoder.sample_rate, channel=windows.channel)
    length = len(samples) / encoder.sample_rate
    first, last = start or 0.0, length if end is None else end
    if not 0 <= first < last <= length + 1e-6:
        fail(f"{audio}: --start {first:g} / --end {last:g} is not a range inside its {length:g} s")
    part = samples[int(round(first * encoder.sample_rate)): int(round(last * encoder.sample_rate))]
    with failing_on(ValueError):
        return encoder.embed(part, encoder.sample_rate, windows).embeddings


def _print_hits(hits) -> None:
    rows = [("rank", "file", "start", "end", "cosine", "labels")] + [
        (str(i), h.file, f"{h.start:.3f}", f"{h.end:.3f}", f"{h.cosine:.6f}", ";".join(h.labels))
        for i, h in enumerate(hits, 1)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        typer.echo("  ".join(cell.ljust(w) if j in (1, 5) else cell.rjust(w) for j, (cell, w) in
                             enumerate(zip(row, widths))).rstrip())
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))


@grouped_options
def search(
    results: Path = typer.Argument(..., help=RESULTS_HELP),
    audio: Path | None = typer.Argument(None, help="the recording to look for (with --bundle); or use --like"),
    bundle: Path | None = typer.Option(None, "--bundle", help="the bundle the results were made with (to embed "
                                       "AUDIO)"),
    top: int = typer.Option(10, "--top", help="how many windows to list"),
    start: float | None = typer.Option(None, "--start", help="look for AUDIO's part from this second"),
    end: float | None = typer.Option(None, "--end", help="look for AUDIO's part up to this second"),
    like: str | None = typer.Option(None, "--like", help="query by a stored window instead: FILE@SECONDS, its file "
                                    "and start as `edgeenc export-db` lists them"),
    exact: bool = typer.Option(False, "--exact", help="score every stored window (no index): the reference the "
                               "index is measured against"),
    out: Path | None = typer.Option(None, "-o", "--out", help="also write the hits to .csv or .parquet; fill in its "
                                    "label column and give it to `edgeenc probe train`"),
    overwrite: OverwriteOpt = False,
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
) -> None:
    """The stored windows nearest to AUDIO (or to a stored window), by cosine over embeddings."""
    from edgeenc.cli_recorder import say_what_it_holds
    from edgeenc.runtime.archive import ArchiveError, archive_window, is_archive, search_archive
    from edgeenc.runtime.bundle import bundle_identity
    from edgeenc.runtime.neighbours import INDEX_EXTRA, IndexProblem, IndexUnavailable, have_index_library
    from edgeenc.runtime.recorder import Store, StoreError, search_store, stored_window
    from edgeenc.runtime.writers import TABLE_SUFFIXES, WriterError, check_output, write_hits

    if top < 1:
        fail(f"--top must be at least 1, got {top}")
    if (audio is None) == (like is None):
        fail("give the recording to look for (AUDIO, with --bundle) or a stored window (--like FILE@SECONDS), "
             "one of the two")
    if audio is not None and bundle is None:
        fail("AUDIO is embedded to search with it: pass --bundle, the bundle the results were made with")
    if like is not None and (start is not None or end is not None):
        fail("--start/--end cut AUDIO; a --like window is one stored window already")
    if out is not None:
        with failing_on(WriterError):
            check_output(out, TABLE_SUFFIXES)
        if out.exists() and not overwrite:
            fail(f"{out} exists: pass --overwrite to replace it, or -o another file")
    if not exact and not have_index_library():
        note(f"searching exactly (every stored window): {INDEX_EXTRA} for the index, which is much faster on "
             "large files")
    _refuse_tables(results)
    archive = results.is_dir() and is_archive(results)
    if results.is_dir() and not archive:
        fail(f"{results}: a folder without shards/; give a results file or an archive folder of --engine ray")

    progress = WindowsProgress("rebuilding the index")
    try:
        if archive:
            require("search", "pyarrow", extra="parquet")
            with failing_on(ArchiveError, IndexProblem, IndexUnavailable, OSError):
                if like is not None:
                    queries, bundle_hash = archive_window(results, *_parse_like(like)), None
                else:
                    encoder = choice.open(bundle)
                    queries = _query_embeddings(audio, start, end, encoder, windows)
                    bundle_hash = bundle_identity(encoder.bundle, encoder.manifest)[1]
                hits = search_archive(results, queries, top, exact=exact, bundle=bundle_hash, on_note=note)
            metadata = {"searched": str(results)}
        else:
            with failing_on(StoreError):
                store = Store.open_reader(results)
            with store:
                say_what_it_holds(results, store)
                meta = store.meta()
                if like is not None:
                    with failing_on(StoreError):
                        queries = stored_window(store, *_parse_like(like))
                else:
                    encoder = choice.open(bundle)
                    model_id, bundle_hash = bundle_identity(encoder.bundle, encoder.manifest)
                    if (meta.get("model_id"), meta.get("bundle_hash")) != (model_id, bundle_hash):
                        fail(f"{results} was made with {meta.get('model_id')} (bundle "
                             f"{meta.get('bundle_hash', '')[:12]}), not {model_id} ({bundle_hash[:12]}): embeddings "
                             "of different bundles cannot be compared")
                    queries = _query_embeddings(audio, start, end, encoder, windows)
                with failing_on(StoreError, IndexProblem, IndexUnavailable, OSError):
                    hits = search_store(store, queries, top, exact=exact, on_note=note, on_progress=progress)
            metadata = {"searched": str(results), "model_id": meta.get("model_id", ""),
                        "bundle_hash": meta.get("bundle_hash", "")}
    finally:
        progress.close()
    _print_hits(hits)
    if not hits:
        note(f"{results} holds no windows yet")
    if out is not None:
        query = f"{like} (stored window)" if like else str(audio)
        if start is not None or end is not None:
            query += f" [{start or 0:g}, {'end' if end is None else f'{end:g}'}]"
        with failing_on(WriterError):
            write_hits(out, hits, metadata={**metadata, "query": query, "top": str(top), "exact": str(exact).lower()})
        note(f"{len(hits)} hit(s) written to {out}: fill in its label column (a label, or no for a negative) and "
             f"give it to `edgeenc probe train BUNDLE {out}`")


def index(
    results: Path = typer.Argument(..., help=RESULTS_HELP),
    rebuild: bool = typer.Option(False, "--rebuild", help="build it again from every stored window"),
) -> None:
    """Build the nearest-neighbour index of a results file or an archive, or bring it up to date (watch, listen
    and `--engine ray` keep theirs; this is for a missing one, older files, or shards added since)."""
    import time

    from edgeenc.runtime.archive import ArchiveError, archive_index_folder, index_archive
    from edgeenc.runtime.neighbours import IndexProblem, IndexUnavailable
    from edgeenc.runtime.recorder import (
        Store,
        StoreError,
        StoreLocked,
        index_folder,
        keep_index,
        rebuild_store_index,
    )

    _refuse_tables(results)
    started = time.perf_counter()
    progress = WindowsProgress("indexing", shown_from=0)
    try:
        if results.is_dir():
            require("index", "pyarrow", extra="parquet")
            with failing_on(ArchiveError, IndexProblem, IndexUnavailable, OSError):
                added, count = index_archive(results, rebuild=rebuild, on_note=note, on_progress=progress)
            where = archive_index_folder(results)
        else:
            with failing_on(StoreError):
                store = Store.open_reader(results)
            with store, failing_on(StoreError, IndexProblem, IndexUnavailable, OSError):
                try:
                    store.take_lock()
                except StoreLocked as exc:
                    fail(f"{exc}: the running watcher keeps the index up to date", ExitStatus.LOCKED)
                if rebuild:
                    built = rebuild_store_index(store, progress)
                    built.save(index_folder(store))
                    added = count = len(built)
                else:
                    keeper = keep_index(store, on_note=note, on_progress=progress)
                    count = len(keeper.index)
                    added = count - keeper.loaded
            where = Path(index_folder(store))
    finally:
        progress.close()
    note(f"{where}: {count} window(s) indexed, {added} added, in {time.perf_counter() - started:.1f} s")
