"""`edgeenc build`: a TensorRT engine for this GPU into BUNDLE/engines/, gated on parity."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeenc.cli_common import ExitStatus, err, fail, failing_on, note, progress_printer


def build(
    bundle: Path = typer.Argument(..., help="a bundle folder written by `edgeenc export`"),
    precision: str = typer.Option("fp16", help="fp16 (GEMMs fp16, front end / LayerNorm / softmax fp32) or fp32"),
    max_batch: int | None = typer.Option(None, help="largest batch the engine accepts (default 8)"),
    min_seconds: float | None = typer.Option(None, help="shortest input in seconds (default: the model's minimum)"),
    max_seconds: float | None = typer.Option(None, help="longest input in seconds (default 30)"),
    opt_seconds: float | None = typer.Option(None, help="length TensorRT tunes for (default: the model's window)"),
    workspace_gb: float = typer.Option(2.0, help="builder workspace limit in GiB (Jetson: shared with the system)"),
) -> None:
    """Build a TensorRT engine for this GPU into BUNDLE/engines/ and add it to the manifest."""
    from edgeenc.export.tensorrt import PRECISIONS, BuildError, TensorRTUnavailable, build_engine, compute_profile
    from edgeenc.runtime.backends import require_tensorrt
    from edgeenc.runtime.bundle import BundleError, read_manifest

    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    with failing_on(TensorRTUnavailable, BundleError, ValueError), failing_on(BuildError, status=ExitStatus.FAILED):
        require_tensorrt()  # before reading anything: say at once what to install
        manifest = read_manifest(bundle)
        if manifest.get("status") != "ok":
            note(f"warning: {bundle} is marked {manifest.get('status')!r} by export (see parity.json)")
        profile = compute_profile(manifest, max_batch=max_batch, min_seconds=min_seconds, max_seconds=max_seconds,
                                  opt_seconds=opt_seconds)
        for line in profile.notes:
            note(f"note: {line}")
        result = build_engine(bundle, precision=precision, profile=profile, workspace_gb=workspace_gb,
                              progress=progress_printer())
    layers = result.data["layers"]
    by_precision = ", ".join(f"{label} {count}" for label, count in layers["by_precision"].items())
    note(f"layers: {layers['layers']} ({by_precision})")
    for name in layers["critical_not_fp32"][:10]:
        note(f"  not fp32 (LayerNorm / softmax / pooling / front end): {name}")
    parity = result.data["parity"]
    worst = ", ".join(f"{k} min_cos {v['min_cosine']:.6f} max_abs {v['max_abs']:.2e}"
                      for k, v in parity["worst"].items())
    note(f"parity {precision} engine vs ONNX Runtime fp32: {'PASS' if result.accepted else 'FAIL'} ({worst})")
    typer.echo(str(result.engine))
    if not result.accepted:
        err(f"the engine failed its parity gate and was not added to the manifest; kept aside as {result.engine.name} "
            f"(details in {result.sidecar.name}); try --precision fp32")
        raise typer.Exit(ExitStatus.PARITY_FAILED)

