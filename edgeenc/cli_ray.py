"""`edgeenc embed|classify --engine ray`: the same commands over an archive, on a local or existing Ray cluster.

Only `--engine ray` imports ray; the options are declared here so that `embed` and `classify` (cli_run)
each name them in one line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from edgeenc.cli_common import EXIT_SOME_FILES_FAILED, err, note, open_encoder

ENGINES = ("single", "ray")

EngineOpt = Annotated[str, typer.Option(help="single (this process) or ray (Parquet shards into the -o folder)")]
AddressOpt = Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster (default: $RAY_ADDRESS, "
                                                     "else a new local one)")]
WorkersOpt = Annotated[int, typer.Option(help="--engine ray: encoder actors, each with its own model session")]
ThreadsPerWorkerOpt = Annotated[int, typer.Option(help="--engine ray: ONNX Runtime threads (Ray CPUs) per actor")]
RangeOpt = Annotated[float, typer.Option(help="--engine ray: seconds of audio per work item of a long file")]


def run_ray_command(bundle: Path, audio: list[str], out: Path, *, window_options: dict, channel: int | None,
                    device: str, variant: str | None, address: str | None, workers: int, threads_per_worker: int,
                    range_seconds: float, verbose: bool = False, classify: dict | None = None) -> None:
    """Embed (or, with `classify` = top_k/threshold/activation, classify) AUDIO into the folder OUT on Ray."""
    if out.suffix.lower() in (".npz", ".csv", ".parquet", ".txt"):
        err(f"{out}: --engine ray writes a folder of Parquet shards; pass -o FOLDER")
        raise typer.Exit(2)
    if workers < 1 or threads_per_worker < 1:
        err("--workers and --threads-per-worker must be at least 1")
        raise typer.Exit(2)
    try:
        from edgeenc.runtime.ray_engine import RayOptions, ray_session, run_on_ray
    except ImportError as exc:
        err(f'--engine ray needs Ray Data ({exc}): pip install "edgeenc[ray]"')
        raise typer.Exit(2) from None
    from edgeenc.runtime.archive import ArchiveError, ArchiveOutput, TopK, list_recordings, plan_archive
    from edgeenc.runtime.audio import AudioError
    from edgeenc.runtime.store import bundle_identity

    # On the driver only to check the bundle, variant and head before any worker starts: CPU is enough.
    encoder = open_encoder(bundle, "cpu", 1, variant, verbose)
    if classify is not None and "logits" not in encoder.output_names:
        err(f"{encoder.manifest.get('model_id')} has no classifier head: use `edgeenc embed` for embeddings")
        raise typer.Exit(2)
    try:
        recordings = list_recordings(audio)
    except AudioError as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    if not recordings:
        err("no audio files found in " + ", ".join(map(str, audio)))
        raise typer.Exit(2)
    window = {"window_seconds": window_options["window_seconds"] or encoder.window_seconds,
              "hop_seconds": window_options["hop_seconds"], "last": window_options["last"]}
    run_options = {**window, "channel": channel, **(classify or {})}
    metadata = {**encoder.metadata, "backend": f"ray, device {device}", "engine": "ray",
                "bundle_sha256": bundle_identity(encoder.bundle, encoder.manifest)[1],
                "run_options": json.dumps(run_options, sort_keys=True)}
    top_k = TopK(encoder.labels or [], **classify) if classify is not None else None
    started = time.time()
    try:
        output = ArchiveOutput(out, metadata, top_k)
        plan = plan_archive(recordings, output.done(), encoder.sample_rate, range_seconds=range_seconds, **window)
    except (ArchiveError, ValueError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    if plan.skipped:
        note(f"resuming: {len(plan.skipped)} file(s) already done in {output.shards}")
    note(f"{plan.todo} file(s) to do, {plan.audio_seconds / 3600:.3f} h of audio in {len(plan.ranges)} range(s); "
         f"{workers} worker(s) x {threads_per_worker} thread(s) on {address or 'Ray'}")
    options = RayOptions(address, workers, threads_per_worker, device, variant, window_options["batch_size"])
    with ray_session(address, workers * threads_per_worker):
        done, failed, seconds = _follow(run_on_ray(plan, output, str(bundle), options, window, channel),
                                        plan.todo + len(plan.failures), plan.audio_seconds, started)
    wall = time.time() - started
    note(f"{done} file(s) done, {failed} failed, {len(plan.skipped)} already done; {seconds / 3600:.3f} h of audio "
         f"in {wall:.1f} s ({seconds / max(wall, 1e-9):.1f}x real time); wrote {output.shards}")
    if failed:
        note(f"failures are listed in {output.failures_path}: fix or remove those files and run again to resume")
        raise typer.Exit(EXIT_SOME_FILES_FAILED)


def _follow(outcomes, files: int, total_seconds: float, started: float) -> tuple[int, int, float]:
    """Progress over audio hours with files and real-time factor; returns (done, failed, audio seconds)."""
    from tqdm import tqdm

    bar = tqdm(total=round(total_seconds / 3600, 4), unit="h", desc="audio", file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}] {postfix}",
               disable=None)
    done = failed = 0
    seconds = 0.0
    try:
        for outcome in outcomes:
            if outcome.error:
                failed += 1
                tqdm.write(f"error: {outcome.path}: {outcome.error}", file=sys.stderr)
            else:
                done += 1
                seconds += outcome.audio_seconds
                bar.update(round(outcome.audio_seconds / 3600, 4))
            rate = seconds / max(time.time() - started, 1e-9)
            bar.set_postfix_str(f"{done + failed}/{files} files, {failed} failed, {rate:.1f}x real time")
    finally:
        bar.close()
    return done, failed, seconds


def on_ray(engine: str, bundle: Path, audio: list[str], out: Path, options: dict, device: str, variant: str | None,
           address: str | None, workers: int, threads_per_worker: int, range_seconds: float, verbose: bool,
           classify: dict | None = None) -> bool:
    """Run the command on Ray when --engine ray asks for it; False for the single-process engine."""
    if engine not in ENGINES:
        err(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
        raise typer.Exit(2)
    from edgeenc.runtime.urls import is_url

    urls = [a for a in audio if is_url(a)]
    if engine != "ray" and urls:
        err(f"{urls[0]}: URLs are read by --engine ray only; mount the storage to give a local path")
        raise typer.Exit(2)
    if engine == "ray":
        options = dict(options)
        channel = options.pop("channel")
        run_ray_command(bundle, audio, out, window_options=options, channel=channel, device=device, variant=variant,
                        address=address, workers=workers, threads_per_worker=threads_per_worker,
                        range_seconds=range_seconds, verbose=verbose, classify=classify)
    return engine == "ray"
