"""`edgeenc embed|classify --engine ray`: the same commands over an archive, on a local or existing Ray cluster.

Only `--engine ray` imports ray. The run strategy is one option group (`RunStrategy`), so that `embed` and
`classify` (cli_run) each name it in one parameter.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from edgeenc.cli_common import (
    AudioProgress,
    EncoderChoice,
    ExitStatus,
    Scoring,
    WindowsProgress,
    fail,
    failing_on,
    flag_type,
    note,
    register_group,
)
from edgeenc.runtime.resume import DEFAULT_RANGE_SECONDS
from edgeenc.runtime.windows import WindowOptions

STRATEGIES = ("single", "ray")


@dataclass(frozen=True)
class RunStrategy:
    """Where embed and classify run their files (`--engine`): this process, or Ray Data workers."""

    strategy: str = "single"
    address: str | None = None  # Ray: join this cluster (default $RAY_ADDRESS, else a new local one)
    workers: int = 1
    threads_per_worker: int = 1
    range_seconds: float = DEFAULT_RANGE_SECONDS

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown engine {self.strategy!r}; choose {' or '.join(STRATEGIES)}")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError("--workers and --threads-per-worker must be at least 1")
        if not self.range_seconds > 0:
            raise ValueError(f"--range-seconds must be positive, got {self.range_seconds:g}")


register_group(RunStrategy, {
    "engine": ("strategy", flag_type(str, "single (this process) or ray (Parquet shards into the -o folder)")),
    "address": ("address", flag_type(str | None, "--engine ray: join this Ray cluster (default: $RAY_ADDRESS, else "
                                               "a new local one)")),
    "workers": ("workers", flag_type(int, "--engine ray: encoder actors, each with its own model session")),
    "threads_per_worker": ("threads_per_worker", flag_type(int, "--engine ray: CPU threads (Ray CPUs) per actor")),
    "range_seconds": ("range_seconds", flag_type(float, "seconds of audio per work item of a long file: what a "
                                                      "killed run redoes at most, and a Ray worker's share")),
})


def on_ray(run: RunStrategy, bundle: Path, audio: list[str], out: Path, window: WindowOptions,
           choice: EncoderChoice, scoring: Scoring | None = None) -> bool:
    """Run the command on Ray when --engine ray asks for it; False for the single-process strategy."""
    from edgeenc.runtime.archive import is_url

    urls = [a for a in audio if is_url(a)]
    if run.strategy != "ray" and urls:
        fail(f"{urls[0]}: URLs are read by --engine ray only; mount the storage to give a local path")
    if run.strategy == "ray":
        run_ray_command(bundle, audio, out, run, window, choice, scoring)
    return run.strategy == "ray"


def run_ray_command(bundle: Path, audio: list[str], out: Path, run: RunStrategy, window: WindowOptions,
                    choice: EncoderChoice, scoring: Scoring | None = None) -> None:
    """Embed (or, with `scoring`, classify) AUDIO into the folder OUT on Ray."""
    if out.suffix.lower() in (".npz", ".csv", ".parquet", ".txt"):
        fail(f"{out}: --engine ray writes a folder of Parquet shards; pass -o FOLDER")
    try:
        from edgeenc.runtime.archive import RayOptions, ray_session, run_on_ray
    except ImportError as exc:
        fail(f'--engine ray needs Ray Data ({exc}): pip install "edgeenc[ray]"')
    from edgeenc.runtime.archive import ArchiveError, ArchiveOutput, list_recordings, plan_archive
    from edgeenc.runtime.audio import AudioError
    from edgeenc.runtime.bundle import bundle_identity

    # On the driver only to check the bundle, variant and head before any worker starts: one CPU thread is enough.
    encoder = replace(choice, device="cpu", threads=1).open(bundle)
    options = None
    if scoring is not None:
        with failing_on(ValueError):
            encoder.require_classifier()
        options = scoring.options(encoder)
    with failing_on(AudioError):
        recordings = list_recordings(audio)
    if not recordings:
        fail("no audio files found in " + ", ".join(map(str, audio)))
    cut = window.with_window(encoder.window_seconds)
    run_options = {"window_seconds": cut.window_seconds, "hop_seconds": cut.hop_seconds, "last": cut.last,
                   "channel": cut.channel}
    if options is not None:
        run_options.update(top_k=options.top_k, threshold=options.threshold, activation=options.activation)
        if encoder.head is not None and encoder.head.name == "probe":  # kept out otherwise: older shards resume
            run_options.update(head="probe")
        if options.thresholds or options.include or options.exclude:  # kept out when unused: older shards resume
            run_options.update(thresholds=sorted(options.thresholds), include=sorted(options.include),
                               exclude=sorted(options.exclude))
    metadata = {**encoder.metadata, "backend": f"ray, device {choice.device}", "engine": "ray",
                "bundle_sha256": bundle_identity(encoder.bundle, encoder.manifest)[1],
                "run_options": json.dumps(run_options, sort_keys=True)}
    started = time.time()
    with failing_on(ArchiveError, ValueError):
        output = ArchiveOutput(out, metadata, options, encoder.labels)
        plan = plan_archive(recordings, output.done(), encoder.sample_rate, cut, run.range_seconds)
    if plan.skipped:
        note(f"resuming: {len(plan.skipped)} file(s) already done in {output.shards}")
    note(f"{plan.todo} file(s) to do, {plan.audio_seconds / 3600:.3f} h of audio in {len(plan.ranges)} range(s); "
         f"{run.workers} worker(s) x {run.threads_per_worker} thread(s) on {run.address or 'Ray'}")
    ray_options = RayOptions(run.address, run.workers, run.threads_per_worker, choice.device, choice.variant,
                             choice.cpu_engine, head=choice.head)
    progress = AudioProgress(plan.audio_seconds, plan.todo + len(plan.failures), started)
    try:
        with failing_on(ConnectionError), ray_session(run.address, run.workers * run.threads_per_worker):
            for outcome in run_on_ray(plan, output, str(bundle), ray_options):
                progress.update(outcome)
    finally:
        progress.close()
    wall = time.time() - started
    note(f"{progress.done} file(s) done, {progress.failed} failed, {len(plan.skipped)} already done; "
         f"{progress.seconds / 3600:.3f} h of audio in {wall:.1f} s ({progress.seconds / max(wall, 1e-9):.1f}x real "
         f"time); wrote {output.shards}")
    index_written_archive(out)
    if progress.failed:
        note(f"failures are listed in {output.failures_path}: fix or remove those files and run again to resume")
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)


def index_written_archive(out: Path) -> None:
    """The archive's nearest-neighbour index, brought up to date with the shards just written (edgeenc[search])."""
    from edgeenc.runtime.archive import ArchiveError, index_archive
    from edgeenc.runtime.neighbours import INDEX_EXTRA, IndexProblem, have_index_library

    if not have_index_library():
        note(f"note: `edgeenc search {out}` scores every window (no index): {INDEX_EXTRA} for the index")
        return
    progress = WindowsProgress("indexing")
    try:
        added, count = index_archive(out, on_note=note, on_progress=progress)
    except (ArchiveError, IndexProblem, OSError) as exc:  # the shards are written; the index can be made later
        note(f"warning: the index of {out} was not updated ({exc}); `edgeenc index {out}` makes it")
        return
    finally:
        progress.close()
    note(f"indexed {added} new window(s) for `edgeenc search`: {count} in {out}/index")
