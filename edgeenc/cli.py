"""The `edgeenc` command: parse, call the library, print, choose the exit code.

Commands import their library lazily so that the runtime commands never import torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
