"""`edgeenc export`: checkpoint -> ONNX -> parity gate -> bundle folder."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from edgeenc import __version__
from edgeenc.models.checkpoints import LoadedModel
from edgeenc.models.registry import SL_ACTIVATION_WHY
from edgeenc.progress import Progress
from edgeenc.runtime import bundle as bundle_io
from edgeenc.runtime.atomic import write_json_atomic

from .onnx_export import DEFAULT_OPSET, export_onnx, output_names
from .opcheck import op_report
from .parity import FP16_TOKEN_COSINE, ParityReport, compare, ort_runner, parity_cases, run_fp32_gate


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    reports: list[ParityReport]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)


def remove_stale_outputs(out: Path) -> None:
    """A re-export invalidates every variant and engine made from the old graph (timing caches stay valid)."""
    for stale in [*out.glob("model*.onnx"), *out.glob("model*.onnx.data")]:
        stale.unlink()
    for name in ("labels.json", "parity.json", "manifest.json"):
        (out / name).unlink(missing_ok=True)
    engines = out / "engines"
    if engines.is_dir():
        for stale in [*engines.glob("*.engine"), *engines.glob("*.json")]:
            stale.unlink()


def io_description(loaded: LoadedModel) -> tuple[list[dict], list[dict]]:
    dim = loaded.module.config.embed_dim
    inputs = [
        {"name": "audio", "dtype": "float32", "shape": ["batch", "samples"], "sample_rate": loaded.spec.sample_rate}
    ]
    outputs = [
        {"name": "tokens", "dtype": "float32", "shape": ["batch", "frames", dim]},
        {"name": "embedding", "dtype": "float32", "shape": ["batch", dim]},
    ]
    if loaded.labels:
        outputs.append({"name": "logits", "dtype": "float32", "shape": ["batch", len(loaded.labels)]})
    return inputs, outputs


def export_bundle(
    loaded: LoadedModel,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the bundle of CONTRACT.md into `out`; the manifest says whether parity passed."""
    say = progress or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_outputs(out)
    spec = loaded.spec
    names = output_names(loaded)
    started = time.time()
    say(f"exporting {spec.model_id} to ONNX (opset {opset})")
    model = export_onnx(loaded, out / "model.onnx", opset=opset)
    ops = op_report(model)
    cases = parity_cases(spec.arch, spec.sample_rate)
    say(f"checking parity of model.onnx against PyTorch ({len(cases)} cases)")
    fp32_report, references = run_fp32_gate(loaded, ort_runner(out / "model.onnx", names), names, cases, progress=say)
    reports = [fp32_report]
    variants = {"model.onnx": {"precision": "fp32", "parity": fp32_report.passed}}
    if fp16:
        from .fp16 import convert_fp16

        say("writing model.fp16.onnx (GEMMs fp16; front end, LayerNorm, softmax, pooling fp32)")
        convert_fp16(model, out / "model.fp16.onnx")
        fp16_report = compare("fp16", ort_runner(out / "model.fp16.onnx", names), references, cases, names,
                              token_cosine=FP16_TOKEN_COSINE, progress=say)
        reports.append(fp16_report)
        variants["model.fp16.onnx"] = {"precision": "fp16", "parity": fp16_report.passed}
    write_json_atomic(
        out / bundle_io.PARITY, {"passed": all(r.passed for r in reports), "reports": [r.to_json() for r in reports]}
    )
    if loaded.labels:
        write_json_atomic(out / bundle_io.LABELS, loaded.labels)
    inputs, outputs = io_description(loaded)
    cfg = loaded.module.config
    from edgeenc.models.frontend import min_samples

    manifest = {
        "model_id": spec.model_id,
        "architecture": spec.arch,
        "sample_rate": spec.sample_rate,
        "embedding_dim": cfg.embed_dim,
        "window_seconds": spec.window_seconds,
        "min_samples": min_samples(cfg.fbank),
        "num_classes": len(loaded.labels or []),
        "classifier_pooling": ("cls" if spec.arch == "eat" else "mean") if loaded.labels else None,
        "activation": spec.activation if loaded.labels else None,
        "activation_why": SL_ACTIVATION_WHY if loaded.labels else None,
        "inputs": inputs,
        "outputs": outputs,
        "opset": opset,
        "licence": spec.licence,
        "licence_note": "ESP model weights are CC-BY-NC-SA-4.0: non-commercial use, share alike, attribute "
        "Earth Species Project",
        "checkpoint": loaded.source,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "random_init": loaded.random_init,
        "hf_repository": spec.hf_repo,
        "frontend": {
            "window": cfg.fbank.window,
            "scale": cfg.fbank.scale,
            "norm_mean": cfg.fbank.norm_mean,
            "norm_std": cfg.fbank.norm_std,
            "target_frames": cfg.fbank.target_frames,
            "clamp": cfg.fbank.clamp,
        },
        "notes": [n for n in [spec.note] if n],
        "variants": variants,
        "tensorrt_op_check": ops,
        "parity": {r.variant: r.summary for r in reports},
        "status": "ok" if all(r.passed for r in reports) else "failed-parity",
        "versions": {
            "edgeenc": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": _ort_version(),
            "python": platform.python_version(),
        },
        "export_seconds": round(time.time() - started, 1),
    }
    if spec.arch == "eat":
        manifest["notes"].append(
            "EAT normalisation uses avex 1.4.0's run-time values (-4.268, 4.569); the model yml's -5.553 / 4.606 "
            "are dropped by avex's factory, so training likely used those"
        )
    manifest = bundle_io.write_manifest(out, manifest)
    return ExportResult(out, manifest, reports)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
