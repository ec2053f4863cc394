"""Trace our PyTorch BEATs / EAT to ONNX with the whole front end inside the graph."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from edgeenc import __version__
from edgeenc.models.checkpoints import LoadedModel

from .specs import EXPORT_SPECS

DEFAULT_OPSET = 17  # first opset with LayerNormalization (TensorRT's INormalizationLayer)


class OnnxGraph(nn.Module):
    """The contract's graph: audio -> tokens, embedding (mean over tokens) and logits (if any)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor):
        tokens = self.model.forward_features(audio)
        embedding = tokens.mean(dim=1)
        if getattr(self.model, "classifier", None) is None:
            return tokens, embedding
        return tokens, embedding, self.model.forward_head(tokens)


def output_names(loaded: LoadedModel) -> list[str]:
    return ["tokens", "embedding"] + (["logits"] if loaded.labels else [])


def model_metadata(loaded: LoadedModel) -> dict[str, str]:
    """metadata_props a C++ caller reads instead of hard-coding anything about the model."""
    spec = loaded.spec
    cfg = loaded.module.config
    from edgeenc.models.frontend import min_samples

    return {
        "model_id": spec.model_id,
        "architecture": spec.arch,
        "sample_rate": str(spec.sample_rate),
        "embedding_dim": str(cfg.embed_dim),
        "window_seconds": str(spec.window_seconds),
        "min_samples": str(min_samples(cfg.fbank)),
        "num_classes": str(len(loaded.labels or [])),
        "pooling": "mean over tokens (embedding); " + ("CLS token (logits)" if spec.arch == "eat" else "mean (logits)"),
        "licence": spec.licence,
        "random_init": str(loaded.random_init).lower(),
        "activation": (spec.activation or "") if loaded.labels else "",  # how logits become scores
        "checkpoint_sha256": loaded.checkpoint_sha256 or "",
        "edgeenc_version": __version__,
        "producer": f"edgeenc {__version__} / torch {torch.__version__}",
        # What OpenSoundscape's ONNXModel reads: the model loads there by its metadata alone.
        "sample_duration": str(spec.window_seconds),
        "classes": json.dumps(list(loaded.labels or [])),
        "class_outputs_key": "logits" if loaded.labels else "",
        "embedding_outputs_key": "embedding",
    }


def export_onnx(loaded: LoadedModel, path: Path, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write `path` (fp32, standard ops, dynamic batch and samples) and return the checked model."""
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    spec = EXPORT_SPECS[loaded.spec.arch]
    graph = OnnxGraph(loaded.module.float().eval())
    samples = int(spec.trace_seconds * loaded.spec.sample_rate)
    example = torch.randn(2, samples, generator=torch.Generator().manual_seed(0)) * 0.1
    names = output_names(loaded)
    axes = {"audio": {0: "batch", 1: "samples"}, "tokens": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}}
    if "logits" in names:
        axes["logits"] = {0: "batch"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that shape arithmetic is traced; that is what we want.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            input_names=["audio"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = "edgeenc"
    model.producer_version = __version__
    model.doc_string = f"{loaded.spec.model_id}: audio [batch, samples] float32 at {loaded.spec.sample_rate} Hz"
    onnx.helper.set_model_props(model, model_metadata(loaded))
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
