"""`edgeenc listen`: a live source (stdin PCM, a sound device, an ffmpeg stream) into the results database."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgeenc.cli_common import err, note, open_encoder, open_results_store, recorder_logging

EXIT_SOURCE_FAILED = 6


def listen(
    bundle: Path = typer.Option(..., "--bundle", help="a bundle folder"),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results file (created if missing)"),
    source: str = typer.Option(..., "--source", help="- (raw PCM on stdin), default, alsa:NAME or ffmpeg:URL"),
    pcm_format: str = typer.Option("s16le", "--format", help="stdin PCM: s16le, s32le or f32le"),
    rate: int | None = typer.Option(None, help="stdin / device sample rate (stdin default: the model's rate)"),
    channels: int = typer.Option(1, help="channels of the stdin PCM or to capture (averaged to mono)"),
    window: float | None = typer.Option(None, help="window seconds (default: the model's native length)"),
    hop: float | None = typer.Option(None, help="hop seconds (default: = window)"),
    last: str = typer.Option("short", help="when the source ends, its partial window: short, pad or drop"),
    top_k: int = typer.Option(5, "--top-k", help="labels stored per window (models with a classifier)"),
    threshold: float | None = typer.Option(None, help="store only labels with softmax score >= this"),
    save_clips: Path | None = typer.Option(None, "--save-clips", help="FLAC clip of each window with a "
                                           "detection >= --threshold into this folder"),
    batch: int = typer.Option(8, help="most windows per inference batch when behind"),
    buffer: float = typer.Option(60.0, help="seconds of audio held while the encoder is behind; then the "
                                 "oldest is dropped"),
    resync_after: float = typer.Option(5.0, "--resync-after", help="re-anchor the wall clock when audio "
                                       "arrives this many seconds later than its sample count says"),
    ffmpeg: str = typer.Option("ffmpeg", "--ffmpeg", help="the ffmpeg program for ffmpeg:URL"),
    device: str = typer.Option("auto", help="auto, trt, cuda or cpu"),
    threads: int | None = typer.Option(None, help="CPU threads for ONNX Runtime"),
    quiet: bool = typer.Option(False, "--quiet", help="log only drops, restarts and failures"),
) -> None:
    """Embed (and classify) a live source window by window into a crash-safe SQLite file."""
    from edgeenc.runtime.listen import listen as run_listen
    from edgeenc.runtime.live_store import LiveStore
    from edgeenc.runtime.sources import SourceError, open_source
    from edgeenc.runtime.store import bundle_identity
    from edgeenc.runtime.windows import LAST_POLICIES

    if last not in LAST_POLICIES:
        err(f"--last must be one of {', '.join(LAST_POLICIES)}; got {last!r}")
        raise typer.Exit(2)
    if save_clips is not None and threshold is None:
        err("--save-clips needs --threshold: the score from which a window counts as a detection")
        raise typer.Exit(2)
    encoder = open_encoder(bundle, device, threads)
    if save_clips is not None and "logits" not in encoder.output_names:
        err(f"--save-clips needs a model with a classifier; {encoder.manifest.get('model_id')} has none")
        raise typer.Exit(2)
    recorder_logging(quiet, "edgeenc.runtime.listen")
    try:
        live = open_source(source, model_rate=encoder.sample_rate, stdin=sys.stdin.buffer, fmt=pcm_format,
                           rate=rate, channels=channels, ffmpeg=ffmpeg)
    except SourceError as exc:
        err(str(exc))
        raise typer.Exit(2) from None

    def open_live_store() -> LiveStore:
        model_id, bundle_hash = bundle_identity(encoder.bundle, encoder.manifest)
        return LiveStore.open(db, model_id=model_id, bundle_hash=bundle_hash, embedding_dim=encoder.embedding_dim)

    store = open_results_store(open_live_store)

    def on_event(kind: str, detail: str) -> None:
        if kind == "dropped":
            err(f"dropped {detail}")
        elif not quiet:
            note(f"{kind:7} {detail}")

    note(f"listening to {live.description} into {db}")
    with store:
        try:
            summary = run_listen(encoder, store, live, source_name=source, window_seconds=window, hop_seconds=hop,
                                 last=last, batch_size=batch, top_k=top_k, threshold=threshold,
                                 clips_dir=save_clips, buffer_seconds=buffer, resync_seconds=resync_after,
                                 on_event=on_event)
        except SourceError as exc:
            err(f"{source}: {exc} (the windows so far are stored)")
            raise typer.Exit(EXIT_SOURCE_FAILED) from None
    note(f"{summary.ended}: {summary.audio_seconds:.1f} s of audio, {summary.windows} window(s) in "
         f"{summary.batches} batch(es), {summary.dropped_seconds:.1f} s dropped, {summary.clips} clip(s), "
         f"{summary.restarts} restart(s); encoder at {summary.speed:.2f}x real time, "
         f"CPU {summary.cpu_seconds:.2f} s over {summary.elapsed_seconds:.2f} s")
