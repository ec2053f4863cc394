"""What every edgeenc command shares: printing, progress, exit codes, opening an encoder, file lists.

Each command module imports these public names; `edgeenc/cli.py` only assembles the typer app.
Library code never imports this (tests/test_architecture.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

EXIT_PARITY_FAILED = 3
EXIT_SOME_FILES_FAILED = 4
EXIT_LOCKED = 5
EXIT_UNAVAILABLE = 2


def err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def note(message: str) -> None:
    typer.echo(message, err=True)


def progress_printer():
    start = time.time()

    def say(message: str) -> None:
        note(f"[{time.time() - start:6.1f}s] {message}")

    return say


def expand_audio(paths: list[Path]) -> list[Path]:
    """Files as given, and every audio file under the given folders (sorted, recursive)."""
    from edgeenc.runtime.audio import AUDIO_SUFFIXES

    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            # Dot files are temporaries or macOS "._" resource forks, common on recorders' exFAT cards.
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                                and not p.name.startswith(".")))
        else:
            found.append(path)
    return found


def open_encoder(bundle: Path, device: str, threads: int | None, variant: str | None = None,
                 verbose: bool = False, engine: str | None = None):
    from edgeenc.runtime.backend_protocol import BackendUnavailable
    from edgeenc.runtime.bundle import BundleError
    from edgeenc.runtime.encoder import Encoder

    try:
        encoder = Encoder.load(bundle, device, threads=threads, variant=variant, engine=engine)
    except (BundleError, BackendUnavailable, ValueError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    for line in encoder.backend_log if verbose else encoder.backend_brief:
        note(line)
    if encoder.manifest.get("random_init"):
        note("warning: this bundle holds RANDOM weights (--random-init): outputs are meaningless")
    return encoder


def run_files(encoder, files: list[Path], options: dict):
    """Yield FileOutcomes with a progress bar over audio hours; errors are reported as they happen."""
    from tqdm import tqdm

    from edgeenc.runtime.audio import AudioError, probe

    total = 0.0
    for path in files:
        try:
            total += probe(path).duration_seconds
        except AudioError:
            pass  # reported when its turn comes
    bar = tqdm(total=round(total / 3600, 4), unit="h", desc="audio", file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}] {postfix}",
               disable=None)
    done = failed = 0
    try:
        for outcome in encoder.embed_files([str(f) for f in files], **options):
            if outcome.error:
                failed += 1
                tqdm.write(f"error: {outcome.path}: {outcome.error}", file=sys.stderr)
            else:
                done += 1
                bar.update(round(outcome.audio_seconds / 3600, 4))
            bar.set_postfix_str(f"{done + failed}/{len(files)} files, {failed} failed")
            yield outcome
    finally:
        bar.close()


def audio_files(audio: list[Path]) -> list[Path]:
    files = expand_audio(audio)
    if not files:
        err("no audio files found in " + ", ".join(map(str, audio)))
        raise typer.Exit(2)
    return files


# Options that every command running recordings through a bundle shares.
WindowOpt = Annotated[float | None, typer.Option(help="window seconds (default: the model's native length)")]
HopOpt = Annotated[float | None, typer.Option(help="hop seconds (default: = window)")]
LastOpt = Annotated[str, typer.Option(help="last partial window: auto (default: its true length, but dropped "
                                            "when shorter than half the window or 1 s, unless it is the file's "
                                            "only window), short (true length, always), pad, or drop")]
DeviceOpt = Annotated[str, typer.Option(help="auto, trt, cuda or cpu")]
BatchOpt = Annotated[int, typer.Option(help="windows per inference batch")]
ChannelOpt = Annotated[int | None, typer.Option(help="use this channel (0-based) instead of the mean")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for ONNX Runtime")]
VariantOpt = Annotated[str | None, typer.Option(help="a gated CPU variant, e.g. int8dyn, or bf16 with --cpu-engine "
                                                    "openvino (see `edgeenc info`; default: the bundle's timed one)")]
CpuEngineOpt = Annotated[str | None, typer.Option(help="CPU engine: onnxruntime or openvino (default: the bundle's "
                                                      "timed CPU default, see `edgeenc info`)")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="say why every other backend was skipped")]


def window_options(window, hop, last, batch, channel) -> dict:
    return {"window_seconds": window, "hop_seconds": hop, "last": last, "batch_size": batch, "channel": channel}




def recorder_logging(quiet: bool, events_logger: str) -> None:
    """Timestamped log lines on stderr for the long-running recorder commands (watch, listen)."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger(events_logger).setLevel(logging.WARNING)  # the command prints these events itself


def open_results_store(opener):
    """The SQLite results store `opener()` returns; a locked one exits EXIT_LOCKED, a bad one 2."""
    from edgeenc.runtime.store import StoreError, StoreLocked

    try:
        return opener()
    except StoreLocked as exc:
        err(str(exc))
        raise typer.Exit(EXIT_LOCKED) from None
    except StoreError as exc:
        err(str(exc))
        raise typer.Exit(2) from None
