"""`edgeenc embed`, `edgeenc classify` and `edgeenc info`: recordings through a bundle (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgeenc.cli_common import (
    AudioProgress,
    EncoderChoice,
    ExitStatus,
    OverwriteOpt,
    Scoring,
    audio_files,
    err,
    fail,
    failing_on,
    grouped_options,
    note,
)
from edgeenc.cli_ray import RunStrategy, on_ray
from edgeenc.runtime.windows import WindowOptions


def info(bundle: Path = typer.Argument(..., help="a bundle folder")) -> None:
    """Print a bundle's manifest and verify the hash of every file."""
    from edgeenc.runtime.backends import bf16_variant_problem, int8_variant_problem
    from edgeenc.runtime.bundle import (
        BundleError,
        choose_head,
        gated,
        has_classifier,
        head_activation,
        heads,
        read_manifest,
        variants,
        verify_bundle,
    )

    with failing_on(BundleError):
        manifest = read_manifest(bundle)
        problems = verify_bundle(bundle, manifest)
    keys = ("model_id", "architecture", "sample_rate", "embedding_dim", "window_seconds", "num_classes", "opset",
            "licence", "checkpoint", "checkpoint_sha256", "random_init", "status")
    for key in keys:
        typer.echo(f"{key:18} {manifest.get(key)}")
    if has_classifier(manifest) or manifest.get("probe"):
        activation, why = head_activation(manifest)
        typer.echo(f"{'activation':18} {activation} ({why})")
    if manifest.get("probe"):
        default = choose_head(manifest)
        for head in heads(manifest).values():
            mark = ", the default (classify, watch, listen)" if default and head.name == default.name else ""
            typer.echo(f"{'head ' + head.name:18} {head.num_classes} classes from output {head.output} "
                       f"({head.labels_file}), {head.activation}{mark}")
        probe = manifest["probe"]
        typer.echo(f"{'probe':18} trained on {probe.get('parent_model_id')} (model.onnx sha256 "
                   f"{probe.get('parent_bundle_sha256')}), data fingerprint {probe.get('data', {}).get('fingerprint')}")
    typer.echo(f"{'versions':18} {json.dumps(manifest.get('versions', {}))}")
    for variant, summary in manifest.get("parity", {}).items():
        typer.echo(f"{'parity ' + variant:18} {'pass' if summary.get('passed') else 'FAIL'} "
                   f"({summary.get('comparisons')} comparisons, {summary.get('failed')} failed)")
    for name, entry in variants(manifest).items():
        state = "gate passed" if gated(entry) else "gate FAILED, not offered"
        if entry.get("written") is False:
            state = "not written: " + str(entry.get("why") or entry.get("reason") or "unsupported here")[:100]
        weights = f", {entry['weights']} weights" if entry.get("weights") else ""
        if gated(entry) and int8_variant_problem(name, entry):
            state += " - NOT usable on this CPU (s8 weights saturate without VNNI: re-run `edgeenc optimize` here)"
        if gated(entry) and bf16_variant_problem(name, entry):
            state += " - NOT usable on this CPU (no bf16 instructions: re-run `edgeenc optimize` here)"
        typer.echo(f"{'variant':18} {name} ({entry.get('precision')}{weights}): {state}")
    choice = manifest.get("cpu_default")
    if choice:
        typer.echo(f"{'cpu default':18} {choice['variant']} ({choice['engine']} {choice['precision']}, "
                   f"{choice['p50_ms']:.1f} ms per window on {(choice.get('timed_on') or {}).get('cpu_model')}, "
                   f"{choice.get('threads')} threads; ranking: {', '.join(r['variant'] for r in choice['ranking'])})")
        sweep = choice.get("throughput")
        if sweep:
            rates = ", ".join(f"{b}: {r['windows_per_s']:.2f}/s ({r['peak_rss_mb']:.0f} MB)"
                              for b, r in sweep["batches"].items())
            typer.echo(f"{'best batch':18} {sweep['best_batch']} (windows/s by batch, peak memory: {rates})")
    engines = sorted((bundle / "engines").glob("*.json")) if (bundle / "engines").is_dir() else []
    for sidecar in engines:
        try:
            data = json.loads(sidecar.read_text())
            typer.echo(f"{'engine':18} {sidecar.stem}: TensorRT {data.get('tensorrt_version')}, "
                       f"{data.get('gpu', {}).get('name', data.get('gpu_name'))}, {data.get('precision')}")
        except (OSError, json.JSONDecodeError, AttributeError):
            typer.echo(f"{'engine':18} {sidecar.name}: unreadable sidecar")
    typer.echo("files:")
    for name, entry in manifest.get("files", {}).items():
        typer.echo(f"  {name:28} {entry['bytes']:>12,d}  {entry['sha256'][:16]}")
    if manifest.get("random_init"):
        note("warning: this bundle holds RANDOM weights (--random-init)")
    if problems:
        for problem in problems:
            err(problem)
        fail(f"{bundle} is not the bundle that was exported: re-export it (the other commands refuse it too)")
    typer.echo("all file hashes match the manifest")


def prepare_output(out: Path, suffixes, overwrite: bool) -> None:
    """Before any model loads: the output can be written, and an existing one is replaced only when asked
    (--overwrite) or when this run resumes it (its OUT.parts folder is there)."""
    from edgeenc.runtime.writers import WriterError, check_output

    with failing_on(WriterError):
        check_output(out, suffixes)
    if out.exists() and not overwrite and not out.with_name(out.name + ".parts").is_dir():
        fail(f"{out} exists: pass --overwrite to replace it, or -o another file")


def resumable_results(encoder, files: list[Path], options: WindowOptions, out: Path, overwrite: bool,
                      range_seconds: float, errors: dict[str, str] | None = None):
    """Outcomes of every readable file in order, resuming from `OUT.parts/`; returns (outcomes, failed, parts).
    `errors`, when given, collects {path: reason} of the failed files."""
    from edgeenc.runtime.resume import PartFolder, ResumeMismatch, plan_files, resumable_run, run_identity

    parts = PartFolder(out, run_identity(encoder, options))
    if overwrite:
        parts.remove()
    with failing_on(ResumeMismatch):
        parts.check()
    planned, total = plan_files(encoder, [str(f) for f in files], options, range_seconds)
    progress = AudioProgress(total, len(files))
    results, failed = {}, 0
    try:
        for step in failing_steps(resumable_run(encoder, planned, options, parts)):
            if step.resumed_files or step.resumed_ranges:
                progress.write(f"resuming: {step.resumed_files} file(s) already done in {parts.folder}"
                               + (f", and {step.resumed_ranges} range(s) of others" if step.resumed_ranges else ""))
            progress.advance(step.audio_seconds)
            if step.outcome is not None:
                progress.count(step.outcome)
                if step.outcome.error:
                    failed += 1
                    if errors is not None:
                        errors[step.outcome.path] = step.outcome.error
                else:
                    results[step.outcome.path] = step.outcome
    finally:
        progress.close()
    return [results[str(f)] for f in files if str(f) in results], failed, parts


def failing_steps(steps):
    """The steps of a resumable run; a part that cannot be kept (a full disk) ends the command with its message."""
    from edgeenc.runtime.writers import WriterError

    with failing_on(WriterError):
        yield from steps


def finish_summary(done: int, failed: int, out: Path, parts) -> None:
    """The summary line, the exit code, and the parts folder: kept while files failed, removed when all are done."""
    if done:
        note(f"{done} file(s) done, {failed} failed; wrote {out}")
    if failed:
        if parts.exists():
            note(f"finished files are kept in {parts.folder}: fix or remove the failed ones and run again to "
                 "resume")
        raise typer.Exit(ExitStatus.SOME_FILES_FAILED)
    parts.remove()


def write_or_keep(out: Path, results: list, failed: int, write) -> None:
    """Write the output unless no file produced results and an output is already there: then it is kept."""
    if not results and out.exists():
        note(f"0 file(s) done, {failed} failed: {out} is kept as it was")
        return
    from edgeenc.runtime.writers import WriterError

    with failing_on(WriterError):
        write()
    if not results:
        note(f"0 file(s) done, {failed} failed; wrote {out} with no rows")


AudioArgument = typer.Argument(..., help="audio files or folders (walked recursively); --engine ray also takes URLs "
                                         "such as s3://bucket/prefix")


@grouped_options
def embed(
    bundle: Path = typer.Argument(..., help="a bundle folder"),
    audio: list[str] = AudioArgument,
    out: Path = typer.Option(Path("embeddings.npz"), "-o", "--out", help="output .npz, .csv or .parquet"),
    overwrite: OverwriteOpt = False,
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
    run: RunStrategy = RunStrategy(),
) -> None:
    """Embed recordings: one row per window with file, start, end and the embedding."""
    import numpy as np

    from edgeenc.runtime.writers import EMBEDDING_SUFFIXES, write_embeddings

    if on_ray(run, bundle, audio, out, windows, choice):
        return
    files, unlisted = audio_files(audio)
    prepare_output(out, EMBEDDING_SUFFIXES, overwrite)
    encoder = choice.open(bundle)
    done, failed, parts = resumable_results(encoder, files, windows, out, overwrite, run.range_seconds)
    failed += unlisted
    results = [outcome.result for outcome in done]
    dim = encoder.embedding_dim
    write_or_keep(out, results, failed, lambda: write_embeddings(
        out,
        [r.file for r in results for _ in range(len(r))],
        np.concatenate([r.starts for r in results]) if results else np.zeros(0),
        np.concatenate([r.ends for r in results]) if results else np.zeros(0),
        np.concatenate([r.embeddings for r in results]) if results else np.zeros((0, dim), np.float32),
        {**encoder.metadata, "files_failed": str(failed)},
    ))
    finish_summary(len(results), failed, out, parts)


@grouped_options
def classify(
    bundle: Path = typer.Argument(..., help="a bundle folder of a model with a classifier"),
    audio: list[str] = AudioArgument,
    out: Path = typer.Option(Path("detections.csv"), "-o", "--out", help=".csv table, .txt Raven selection table "
                             "(or, with --events, also .parquet)"),
    overwrite: OverwriteOpt = False,
    events: bool = typer.Option(False, "--events", help="one row per event (a label's consecutive windows over its "
                                "threshold merged: start, end, max and mean score) instead of per window"),
    clips: Path | None = typer.Option(None, "--clips", help="also cut each event's audio into FLAC clips in this "
                                      "folder, with index.csv to review them"),
    clip_margin: float = typer.Option(1.0, "--clip-margin", help="seconds kept before and after each event clip"),
    scoring: Scoring = Scoring(),
    windows: WindowOptions = WindowOptions(),
    choice: EncoderChoice = EncoderChoice(),
    run: RunStrategy = RunStrategy(),
) -> None:
    """Classify recordings: the top-k labels with scores for every window, or their events."""
    from edgeenc.runtime.encoder import file_events, top_k_rows
    from edgeenc.runtime.writers import (
        CLASSIFICATION_FORMATS,
        EVENT_SUFFIXES,
        EventRow,
        write_classifications,
        write_events,
    )

    if clip_margin < 0:
        fail("--clip-margin cannot be negative")
    if events and run.strategy == "ray":
        fail("--events is written by single-process classify (--engine single); the Ray shards keep every "
             "window's labels")
    if on_ray(run, bundle, audio, out, windows, choice, scoring):
        return
    files, unlisted = audio_files(audio)
    prepare_output(out, EVENT_SUFFIXES if events else CLASSIFICATION_FORMATS, overwrite)
    encoder = choice.open(bundle)
    with failing_on(ValueError):
        encoder.require_classifier()
    options = scoring.options(encoder)
    done, failed, parts = resumable_results(encoder, files, windows, out, overwrite, run.range_seconds)
    failed += unlisted
    results = [outcome.result for outcome in done]
    durations = {outcome.path: outcome.audio_seconds for outcome in done}  # Raven's timeline: true lengths
    metadata = {**encoder.metadata, "activation": options.activation, "min_windows": str(options.min_windows)}
    found = ([EventRow(r.file, *e[:6]) for r in results for e in file_events(r, encoder.labels, options)]
             if events or clips else [])
    if events:
        write_or_keep(out, results, failed, lambda: write_events(out, found, metadata=metadata,
                                                                  sample_rate=encoder.sample_rate,
                                                                  file_durations=durations))
    else:
        rows = [row for r in results for row in top_k_rows(r, encoder.labels, options)]
        write_or_keep(out, results, failed, lambda: write_classifications(
            out, rows, metadata=metadata, sample_rate=encoder.sample_rate, file_durations=durations))
    if clips is not None:
        cut_event_clips(clips, found, clip_margin)
    finish_summary(len(results), failed, out, parts)


def cut_event_clips(folder: Path, events: list, margin: float) -> None:
    """Clips of `events` from their recordings into `folder`, with its review index."""
    from edgeenc.runtime.clips import cut_clips, write_index

    made = []
    for clip in cut_clips(events, folder, margin):
        if isinstance(clip, Exception):
            err(str(clip))
        else:
            made.append(clip)
    note(f"{len(made)} clip(s) of events in {folder}, listed in {write_index(folder, made)}")
