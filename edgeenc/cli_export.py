"""`edgeenc models`, `edgeenc export` and `edgeenc demo`: the PyTorch side (torch imported lazily)."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from edgeenc.cli_common import ExitStatus, fail, failing_on, note, progress_printer, require

EXPORT_MODULES = ("torch", "onnx", "safetensors", "huggingface_hub", "onnxruntime")


def models() -> None:
    """List every model id edgeenc knows."""
    require("models", "torch")
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
    require("export", *EXPORT_MODULES)
    from edgeenc.models.checkpoints import CheckpointError, CheckpointUnavailable, load_model
    from edgeenc.models.registry import UnknownModelError

    if checkpoint is not None and random_init:
        fail("pass either --checkpoint or --random-init, not both")
    import torch

    if threads:
        torch.set_num_threads(threads)
    with failing_on(UnknownModelError, CheckpointError, CheckpointUnavailable, ValueError):
        note(f"loading {model_id} from {checkpoint or 'the Hugging Face hub' if not random_init else 'random init'}")
        loaded = load_model(model_id, checkpoint, random_init=random_init, allow_pickle=allow_pickle)
    if loaded.random_init:
        note("warning: RANDOM weights (--random-init): outputs are meaningless; the bundle is flagged")
    from edgeenc.export.pipeline import export_bundle

    target = out or Path("bundles") / model_id
    result = export_bundle(loaded, target, opset=opset, fp16=fp16, progress=progress_printer())
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
        fail(f"parity gate failed; the bundle in {target} is marked failed (see parity.json)", ExitStatus.PARITY_FAILED)
    note(f"next: `edgeenc optimize {target}` on a CPU (model.cpu.onnx, faster fp32, and gated int8 variants), "
         f"`edgeenc build {target}` on a GPU or Jetson")


DEFAULT_MODEL = "esp_aves2_sl_eat_all_ssl_all"


def demo(
    model_id: str = typer.Argument(DEFAULT_MODEL, help="model to export"),
    out: Path = typer.Option(Path("bundles") / "demo", "-o", "--out", help="bundle folder"),
    random_init_if_offline: bool = typer.Option(
        True, help="when the hub cannot be reached, continue with RANDOM weights (loudly flagged)"
    ),
) -> None:
    """The whole path on built-in defaults: export MODEL_ID, then classify the bundled bird recording."""
    require("demo", *EXPORT_MODULES)
    from importlib import resources

    from edgeenc.models.checkpoints import CheckpointUnavailable, load_model

    try:
        loaded = load_model(model_id)
    except CheckpointUnavailable as exc:
        if not random_init_if_offline:
            fail(str(exc))
        note(f"warning: {exc}")
        note("warning: continuing the DEMO with RANDOM weights: every number below is meaningless, "
             "and the bundle and outputs are flagged random_init")
        loaded = load_model(model_id, random_init=True)
    from edgeenc.export.pipeline import export_bundle

    result = export_bundle(loaded, out, progress=progress_printer())
    note(f"bundle: {out} (parity {'passed' if result.passed else 'FAILED'})")
    from edgeenc.runtime import Encoder, RandomWeightsWarning, ScoreOptions
    from edgeenc.runtime.encoder import top_k_rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said above, in the demo's own words
        encoder = Encoder.load(out)
    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as wav:
        embedding = encoder.embed_file(wav)
    typer.echo(f"{wav.name}: {len(embedding)} window(s) of {encoder.window_seconds:g} s, "
               f"embedding dim {encoder.embedding_dim}, backend {encoder.backend.description}")
    if embedding.logits is not None:
        for row in top_k_rows(embedding, encoder.labels, encoder.scoring(ScoreOptions(top_k=3))):
            typer.echo(f"  {row.start:6.2f}-{row.end:6.2f} s  #{row.rank}  {row.label:32} {row.score:.3f}")
    if not result.passed:
        raise typer.Exit(ExitStatus.PARITY_FAILED)


