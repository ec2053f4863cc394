"""`edgeenc watch`, `edgeenc export-db`, `edgeenc search`: the recorder mode over a SQLite results file."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeenc.cli_common import (
    EXIT_SOME_FILES_FAILED,
    CpuEngineOpt,
    VariantOpt,
    err,
    note,
    open_encoder,
    open_results_store,
    recorder_logging,
)


def watch(
    inbox: Path = typer.Argument(..., help="folder where recordings land (walked recursively)"),
    bundle: Path = typer.Option(..., "--bundle", help="a bundle folder"),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results file (created if missing)"),
    once: bool = typer.Option(False, "--once", help="process what is there, then exit"),
    top_k: int = typer.Option(5, "--top-k", help="labels stored per window (models with a classifier)"),
    threshold: float | None = typer.Option(None, help="store only labels with softmax score >= this"),
    device: str = typer.Option("auto", help="auto, trt, cuda or cpu"),
    poll: float = typer.Option(5.0, "--poll", help="seconds between scans of INBOX"),
    settle: float = typer.Option(10.0, "--settle", help="a file is taken once unchanged for this many seconds"),
    threads: int | None = typer.Option(None, help="CPU threads for ONNX Runtime"),
    quiet: bool = typer.Option(False, "--quiet", help="log only failures"),
    variant: VariantOpt = None,
    cpu_engine: CpuEngineOpt = None,
) -> None:
    """Process every recording that lands in INBOX exactly once, into a crash-safe SQLite file."""
    from edgeenc.runtime.watch import store_for
    from edgeenc.runtime.watch import watch as run_watch

    if not inbox.is_dir():
        err(f"{inbox}: inbox is not a folder")
        raise typer.Exit(2)
    encoder = open_encoder(bundle, device, threads, variant, engine=cpu_engine)
    recorder_logging(quiet, "edgeenc.runtime.watch")
    store = open_results_store(lambda: store_for(db, encoder))

    def on_event(kind: str, path: str, detail: str) -> None:
        if kind == "failed":
            err(f"{path}: {detail}")
        elif not quiet:
            note(f"{kind:9} {path}  {detail}")

    note(f"watching {inbox} into {db} ({'once' if once else f'poll {poll:g} s, settle {settle:g} s'})")
    with store:
        summary = run_watch(inbox, encoder, store, once=once, top_k=top_k, threshold=threshold,
                            poll_seconds=poll, settle_seconds=settle, on_event=on_event)
        totals = store.counts()
    note(f"{summary.done} done, {summary.failed} failed, {summary.aliases} duplicate(s) this run; "
         f"{db} holds {totals['done']} done, {totals['failed']} failed, {totals['windows']} windows"
         + (" (stopped by signal)" if summary.interrupted else ""))
    if once and summary.failed:
        raise typer.Exit(EXIT_SOME_FILES_FAILED)


def export_db(
    db: Path = typer.Argument(..., help="a results file written by `edgeenc watch`"),
    out: Path = typer.Option(..., "-o", "--out", help="output .csv or .parquet"),
) -> None:
    """One row per window: file, start, end, top label and score (if any), embedding."""
    from edgeenc.runtime.store import Store, StoreError, export_table
    from edgeenc.runtime.writers import WriterError

    try:
        with Store.open_reader(db) as store:
            rows = export_table(store, out)
    except (StoreError, WriterError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    note(f"{rows} window(s) written to {out}")


def search(
    db: Path = typer.Argument(..., help="a results file written by `edgeenc watch`"),
    audio: Path = typer.Argument(..., help="the recording to look for"),
    bundle: Path = typer.Option(..., "--bundle", help="the bundle the results were made with"),
    top: int = typer.Option(10, "--top", help="how many windows to list"),
    device: str = typer.Option("auto", help="auto, trt, cuda or cpu"),
    threads: int | None = typer.Option(None, help="CPU threads for ONNX Runtime"),
) -> None:
    """The stored windows nearest to AUDIO (cosine over embeddings)."""
    from edgeenc.runtime.audio import AudioError
    from edgeenc.runtime.store import Store, StoreError, bundle_identity

    try:
        store = Store.open_reader(db)
    except StoreError as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    with store:
        encoder = open_encoder(bundle, device, threads)
        meta = store.meta()
        model_id, bundle_hash = bundle_identity(encoder.bundle, encoder.manifest)
        if (meta.get("model_id"), meta.get("bundle_hash")) != (model_id, bundle_hash):
            err(f"{db} was made with {meta.get('model_id')} (bundle {meta.get('bundle_hash', '')[:12]}), "
                f"not {model_id} ({bundle_hash[:12]}): embeddings of different bundles cannot be compared")
            raise typer.Exit(2)
        try:
            query = encoder.embed_file(audio)
        except AudioError as exc:
            err(str(exc))
            raise typer.Exit(2) from None
        try:
            hits = store.nearest(query.embeddings, top=top)
        except StoreError as exc:
            err(str(exc))
            raise typer.Exit(2) from None
    rows = [("file", "start", "end", "cosine")] + [(f, f"{s:.3f}", f"{e:.3f}", f"{c:.6f}") for f, s, e, c in hits]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        typer.echo("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in
                             enumerate(zip(row, widths))).rstrip())
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))
    if not hits:
        note(f"{db} holds no windows yet")
