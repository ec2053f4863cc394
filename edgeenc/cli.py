"""The `edgeenc` command: parse, call the library, print, choose the exit code.

Commands import their library lazily so that the runtime commands never import torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeenc.cli_ray import AddressOpt, EngineOpt, RangeOpt, ThreadsPerWorkerOpt, WorkersOpt

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

EXIT_PARITY_FAILED = 3
EXIT_SOME_FILES_FAILED = 4


def err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def note(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def models() -> None:
    """List every model id edgeenc knows."""
    from edgeenc.models.registry import MODELS

    rows = [("model id", "arch", "rate", "window", "classifier", "hugging face repository")]
    for spec in MODELS.values():
        rows.append(
            (spec.model_id, spec.arch, f"{spec.sample_rate // 1000} kHz", f"{spec.window_seconds:g} s",
             "yes" if spec.has_classifier else "no", spec.hf_repo)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))
    notes = [(s.model_id, s.note) for s in MODELS.values() if s.note]
    if notes:
        typer.echo("\nwhere edgeenc differs from avex 1.4.0:")
        for model_id, text in notes:
            typer.echo(f"  {model_id}: {text}")
    typer.echo(f"\nlicence of every ESP checkpoint: {next(iter(MODELS.values())).licence}")


@app.command()
def export(
    model_id: str = typer.Argument(..., help="an avex model id, e.g. esp_aves2_sl_eat_all_ssl_all"),
    checkpoint: Path | None = typer.Option(None, help="a .safetensors file or a folder laid out like the HF repo"),
    random_init: bool = typer.Option(False, "--random-init", help="random weights, for testing only (flagged)"),
    out: Path | None = typer.Option(None, "-o", "--out", help="bundle folder (default bundles/MODEL_ID)"),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)"),
    fp16: bool = typer.Option(False, "--fp16", help="also write model.fp16.onnx with its own parity gate"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="accept a pickled .pt/.bin checkpoint"),
    threads: int | None = typer.Option(None, help="torch threads (default: all cores)"),
) -> None:
    """Export MODEL_ID to an ONNX bundle with the front end inside, gated on numerical parity."""
    from edgeenc.models.checkpoints import CheckpointError, CheckpointUnavailable, load_model
    from edgeenc.models.registry import UnknownModelError

    if checkpoint is not None and random_init:
        err("pass either --checkpoint or --random-init, not both")
        raise typer.Exit(2)
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        note(f"loading {model_id} from {checkpoint or 'the Hugging Face hub' if not random_init else 'random init'}")
        loaded = load_model(model_id, checkpoint, random_init=random_init, allow_pickle=allow_pickle)
    except (UnknownModelError, CheckpointError, CheckpointUnavailable, ValueError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    if loaded.random_init:
        note("warning: RANDOM weights (--random-init): outputs are meaningless; the bundle is flagged")
    from edgeenc.export.pipeline import export_bundle

    target = out or Path("bundles") / model_id
    result = export_bundle(loaded, target, opset=opset, fp16=fp16, progress=_progress_printer())
    for report in result.reports:
        worst = report.summary["worst"]
        figures = ", ".join(f"{k} max_abs {v['max_abs']:.2e} min_cos {v['min_cosine']:.7f}" for k, v in worst.items())
        note(f"parity {report.variant}: {'PASS' if report.passed else 'FAIL'} ({figures})")
        for c in report.failures():
            note(f"  FAIL {c.case} {c.output}: max_abs {c.max_abs:.3e} (limit {c.max_abs_limit:.3e}), "
                 f"min_cosine {c.min_cosine:.7f} (limit {c.min_cosine_limit:.7f})")
    ops = result.manifest["tensorrt_op_check"]
    if not ops["all_supported"]:
        note(f"warning: ops outside TensorRT 10's ONNX support: {ops['unsupported'] + ops['unknown']}")
    typer.echo(str(target))
    if not result.passed:
        err(f"parity gate failed; the bundle in {target} is marked failed (see parity.json)")
        raise typer.Exit(EXIT_PARITY_FAILED)
    note(f"next: `edgeenc optimize {target}` on a CPU (model.cpu.onnx, faster fp32, and gated int8 variants), "
         f"`edgeenc build {target}` on a GPU or Jetson")


def _progress_printer():
    import time

    start = time.time()

    def say(message: str) -> None:
        note(f"[{time.time() - start:6.1f}s] {message}")

    return say


@app.command()
def info(bundle: Path = typer.Argument(..., help="a bundle folder")) -> None:
    """Print a bundle's manifest and verify the hash of every file."""
    from edgeenc.export.bundle import BundleError, read_manifest, verify_bundle
    from edgeenc.runtime.isa import int8_variant_problem

    try:
        manifest = read_manifest(bundle)
        problems = verify_bundle(bundle, manifest)
    except BundleError as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    keys = ("model_id", "architecture", "sample_rate", "embedding_dim", "window_seconds", "num_classes", "opset",
            "licence", "checkpoint", "checkpoint_sha256", "random_init", "status")
    for key in keys:
        typer.echo(f"{key:18} {manifest.get(key)}")
    typer.echo(f"{'versions':18} {json.dumps(manifest.get('versions', {}))}")
    for variant, summary in manifest.get("parity", {}).items():
        typer.echo(f"{'parity ' + variant:18} {'pass' if summary.get('passed') else 'FAIL'} "
                   f"({summary.get('comparisons')} comparisons, {summary.get('failed')} failed)")
    for name, entry in (manifest.get("variants") or {}).items():
        state = "gate passed" if entry.get("parity") else "gate FAILED, not offered"
        if entry.get("written") is False:
            state = "not written: " + str(entry.get("why") or entry.get("reason") or "unsupported here")[:100]
        weights = f", {entry['weights']} weights" if entry.get("weights") else ""
        if entry.get("parity") and int8_variant_problem(name, entry):
            state += " - NOT usable on this CPU (s8 weights saturate without VNNI: re-run `edgeenc optimize` here)"
        typer.echo(f"{'variant':18} {name} ({entry.get('precision')}{weights}): {state}")
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
        raise typer.Exit(1)
    typer.echo("all file hashes match the manifest")




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


def _open_encoder(bundle: Path, device: str, threads: int | None, variant: str | None = None):
    from edgeenc.export.bundle import BundleError
    from edgeenc.runtime.backends import BackendUnavailable
    from edgeenc.runtime.encoder import Encoder

    try:
        encoder = Encoder.load(bundle, device, threads=threads, variant=variant)
    except (BundleError, BackendUnavailable, ValueError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    for line in encoder.backend_log:
        note(line)
    if encoder.manifest.get("random_init"):
        note("warning: this bundle holds RANDOM weights (--random-init): outputs are meaningless")
    return encoder


def _run_files(encoder, files: list[Path], options: dict):
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


def _audio_files(audio: list[Path]) -> list[Path]:
    files = expand_audio(audio)
    if not files:
        err("no audio files found in " + ", ".join(map(str, audio)))
        raise typer.Exit(2)
    return files


def _results(encoder, files: list[Path], options: dict, out: Path):
    """Results of every readable file in order, resuming from `OUT.parts/`; returns (results, failed, parts)."""
    from edgeenc.runtime.resume import PartFolder

    parts = PartFolder(out, encoder.metadata)
    saved = {str(f): parts.load(f) for f in files}
    todo = [f for f in files if saved[str(f)] is None]
    if len(todo) < len(files):
        note(f"resuming: {len(files) - len(todo)} file(s) already done in {parts.folder}")
    failed = 0
    for outcome in _run_files(encoder, todo, options):
        if outcome.error:
            failed += 1
            continue
        parts.save(outcome.result)
        saved[outcome.path] = outcome.result
    return [saved[str(f)] for f in files if saved[str(f)] is not None], failed, parts


def _summary(done: int, failed: int, out: Path, parts) -> None:
    note(f"{done} file(s) done, {failed} failed; wrote {out}")
    if failed:
        note(f"finished files are kept in {parts.folder}: fix or remove the failed ones and run again to resume")
        raise typer.Exit(EXIT_SOME_FILES_FAILED)
    parts.remove()


# Options that every command running recordings through a bundle shares.
WindowOpt = Annotated[float | None, typer.Option(help="window seconds (default: the model's native length)")]
HopOpt = Annotated[float | None, typer.Option(help="hop seconds (default: = window)")]
LastOpt = Annotated[str, typer.Option(help="last partial window: short (true length), pad, or drop")]
DeviceOpt = Annotated[str, typer.Option(help="auto, trt, cuda or cpu")]
BatchOpt = Annotated[int, typer.Option(help="windows per inference batch")]
ChannelOpt = Annotated[int | None, typer.Option(help="use this channel (0-based) instead of the mean")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for ONNX Runtime")]
VariantOpt = Annotated[str | None, typer.Option(help="a gated CPU variant, e.g. int8dyn (see `edgeenc info`)")]


def _window_options(window, hop, last, batch, channel) -> dict:
    return {"window_seconds": window, "hop_seconds": hop, "last": last, "batch_size": batch, "channel": channel}


def _on_ray(engine: str, bundle, audio, out, options: dict, device, variant, address, workers, threads_per_worker,
            range_seconds, classify: dict | None = None) -> bool:
    """Run the command on Ray when --engine ray asks for it; False for the single-process engine."""
    from edgeenc.cli_ray import ENGINES, run_ray_command

    if engine not in ENGINES:
        err(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
        raise typer.Exit(2)
    if engine == "ray":
        channel = options.pop("channel")
        run_ray_command(bundle, audio, out, window_options=options, channel=channel, device=device, variant=variant,
                        address=address, workers=workers, threads_per_worker=threads_per_worker,
                        range_seconds=range_seconds, classify=classify)
    return engine == "ray"


@app.command()
def embed(
    bundle: Path = typer.Argument(..., help="a bundle folder"),
    audio: list[Path] = typer.Argument(..., help="audio files or folders (walked recursively)"),
    out: Path = typer.Option(Path("embeddings.npz"), "-o", "--out", help="output .npz, .csv or .parquet"),
    window: WindowOpt = None,
    hop: HopOpt = None,
    last: LastOpt = "short",
    device: DeviceOpt = "auto",
    batch: BatchOpt = 8,
    channel: ChannelOpt = None,
    threads: ThreadsOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "single",
    address: AddressOpt = None,
    workers: WorkersOpt = 1,
    threads_per_worker: ThreadsPerWorkerOpt = 1,
    range_seconds: RangeOpt = 600.0,
) -> None:
    """Embed recordings: one row per window with file, start, end and the embedding."""
    import numpy as np

    if _on_ray(engine, bundle, audio, out, _window_options(window, hop, last, batch, channel), device, variant,
               address, workers, threads_per_worker, range_seconds):
        return

    from edgeenc.runtime.writers import WriterError, write_embeddings

    files = _audio_files(audio)
    encoder = _open_encoder(bundle, device, threads, variant)
    results, failed, parts = _results(encoder, files, _window_options(window, hop, last, batch, channel), out)
    dim = encoder.embedding_dim
    try:
        write_embeddings(
            out,
            [r.file for r in results for _ in range(len(r))],
            np.concatenate([r.starts for r in results]) if results else np.zeros(0),
            np.concatenate([r.ends for r in results]) if results else np.zeros(0),
            np.concatenate([r.embeddings for r in results]) if results else np.zeros((0, dim), np.float32),
            {**encoder.metadata, "files_failed": str(failed)},
        )
    except WriterError as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    _summary(len(results), failed, out, parts)


@app.command()
def classify(
    bundle: Path = typer.Argument(..., help="a bundle folder of a model with a classifier"),
    audio: list[Path] = typer.Argument(..., help="audio files or folders (walked recursively)"),
    out: Path = typer.Option(Path("detections.csv"), "-o", "--out", help=".csv table or .txt Raven selection table"),
    top_k: int = typer.Option(5, "--top-k", help="labels per window"),
    threshold: float | None = typer.Option(None, help="keep only scores >= this"),
    activation: str = typer.Option("softmax", help="softmax (one label per window) or sigmoid (independent)"),
    window: WindowOpt = None,
    hop: HopOpt = None,
    last: LastOpt = "short",
    device: DeviceOpt = "auto",
    batch: BatchOpt = 8,
    channel: ChannelOpt = None,
    threads: ThreadsOpt = None,
    variant: VariantOpt = None,
    engine: EngineOpt = "single",
    address: AddressOpt = None,
    workers: WorkersOpt = 1,
    threads_per_worker: ThreadsPerWorkerOpt = 1,
    range_seconds: RangeOpt = 600.0,
) -> None:
    """Classify recordings: the top-k labels with scores for every window."""
    from edgeenc.runtime.encoder import top_k_rows
    from edgeenc.runtime.writers import WriterError, write_classifications

    if _on_ray(engine, bundle, audio, out, _window_options(window, hop, last, batch, channel), device, variant,
               address, workers, threads_per_worker, range_seconds,
               classify={"top_k": top_k, "threshold": threshold, "activation": activation}):
        return
    files = _audio_files(audio)
    encoder = _open_encoder(bundle, device, threads, variant)
    if "logits" not in encoder.output_names:
        err(f"{encoder.manifest.get('model_id')} has no classifier head: use `edgeenc embed` for embeddings")
        raise typer.Exit(2)
    results, failed, parts = _results(encoder, files, _window_options(window, hop, last, batch, channel), out)
    rows = [row for r in results
            for row in top_k_rows(r, encoder.labels, top_k=top_k, threshold=threshold, activation=activation)]
    durations = {r.file: float(r.ends.max()) for r in results if len(r)}
    try:
        write_classifications(out, rows, metadata={**encoder.metadata, "activation": activation},
                              sample_rate=encoder.sample_rate, file_durations=durations)
    except (WriterError, ValueError) as exc:
        err(str(exc))
        raise typer.Exit(2) from None
    _summary(len(results), failed, out, parts)


DEFAULT_MODEL = "esp_aves2_sl_eat_all_ssl_all"


@app.command()
def demo(
    model_id: str = typer.Argument(DEFAULT_MODEL, help="model to export"),
    out: Path = typer.Option(Path("bundles") / "demo", "-o", "--out", help="bundle folder"),
    random_init_if_offline: bool = typer.Option(
        True, help="when the hub cannot be reached, continue with RANDOM weights (loudly flagged)"
    ),
) -> None:
    """The whole path on built-in defaults: export MODEL_ID, then classify the bundled bird recording."""
    from importlib import resources

    from edgeenc.models.checkpoints import CheckpointUnavailable, load_model

    try:
        loaded = load_model(model_id)
    except CheckpointUnavailable as exc:
        if not random_init_if_offline:
            err(str(exc))
            raise typer.Exit(2) from None
        note(f"warning: {exc}")
        note("warning: continuing the DEMO with RANDOM weights: every number below is meaningless, "
             "and the bundle and outputs are flagged random_init")
        loaded = load_model(model_id, random_init=True)
    from edgeenc.export.pipeline import export_bundle

    result = export_bundle(loaded, out, progress=_progress_printer())
    note(f"bundle: {out} (parity {'passed' if result.passed else 'FAILED'})")
    from edgeenc.runtime.encoder import Encoder, top_k_rows

    encoder = Encoder.load(out)
    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as wav:
        embedding = encoder.embed_file(wav)
    typer.echo(f"{wav.name}: {len(embedding)} window(s) of {encoder.window_seconds:g} s, "
               f"embedding dim {encoder.embedding_dim}, backend {encoder.backend.description}")
    if embedding.logits is not None:
        for row in top_k_rows(embedding, encoder.labels, top_k=3):
            typer.echo(f"  {row.start:6.2f}-{row.end:6.2f} s  #{row.rank}  {row.label:32} {row.score:.3f}")
    if not result.passed:
        raise typer.Exit(EXIT_PARITY_FAILED)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)


def _register_extra_commands() -> None:
    # Each lives in its own module so that importing the CLI stays light (no torch, no tensorrt).
    from edgeenc.cli_bench import bench, optimize
    from edgeenc.cli_tensorrt import build
    from edgeenc.cli_watch import export_db, search, watch

    app.command("build")(build)
    app.command("bench")(bench)
    app.command("optimize")(optimize)
    app.command("watch")(watch)
    app.command("export-db")(export_db)
    app.command("search")(search)


_register_extra_commands()
