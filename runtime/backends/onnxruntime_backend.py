"""ONNX Runtime behind the Backend protocol: its CPU provider, CUDA, and its TensorRT execution provider.

onnxruntime-gpu silently falls back to the CPU when CUDA cannot load, so a session checks the provider
it really got.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from ..bundle import BundleError
from .gpu import nvidia_gpu_missing
from .protocol import Backend, BackendUnavailable

# ONNX Runtime graph rewrites that make BEATs / EAT slower on the CPU (SkipLayerNormFusion: its fused kernel is
# slower than the Add + LayerNormalization pair it replaces; benchmarks/README.md has the figures).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# The CUDA provider runs fp32 MatMul / Conv in TF32 by default (use_tf32 = 1 in
# microsoft/onnxruntime:include/onnxruntime/core/providers/cuda/cuda_provider_options.h), which rounds the
# front end's DFT MatMul to a 10-bit mantissa; edgeenc's TensorRT builds clear TF32 for the same reason.
# The option exists from onnxruntime 1.18 (microsoft/onnxruntime#19357, #19426); older releases reject
# unknown options, so they get none (a Jetson Zoo wheel for JetPack 6.0 can be that old).
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            "no ONNX Runtime is installed: pip install 'edgeenc[cpu]' (CPU) or 'edgeenc[gpu]' (CUDA; never both)"
        ) from exc
    return onnxruntime


def cuda_provider_options(ort) -> dict:
    major, minor = (int(p) for p in (re.findall(r"\d+", ort.__version__) + ["0", "0"])[:2])
    return dict(CUDA_PROVIDER_OPTIONS) if (major, minor) >= (1, 18) else {}


class OrtBackend:
    """ONNX Runtime session on one execution provider."""

    best_batch: int | None = None  # set by selection.py from the bundle's measured sweep

    def __init__(
        self,
        model_path: Path,
        output_names: list[str],
        *,
        provider: str,
        threads: int | None = None,
        provider_options: dict | None = None,
    ):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        first = (provider, provider_options) if provider_options else provider
        providers = [first] if provider == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]
        if provider == "TensorrtExecutionProvider":
            # for the nodes TensorRT does not take
            options_cuda = cuda_provider_options(ort)
            providers.insert(1, ("CUDAExecutionProvider", options_cuda) if options_cuda else "CUDAExecutionProvider")
        extra = {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)} if provider == "CPUExecutionProvider" else {}
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers, **extra)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a file it cannot load
            raise BundleError(f"{model_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]}); "
                              "re-export the bundle") from None
        active = self.session.get_providers()
        if active[0] != provider:
            raise BackendUnavailable(
                f"onnxruntime created the session on {active[0]} instead of {provider} "
                "(CUDA or cuDNN libraries not found?)"
            )
        self.output_names = output_names
        self.name = {"CPUExecutionProvider": "cpu", "TensorrtExecutionProvider": "trt"}.get(provider, "cuda")
        thread_note = f", {threads} threads" if threads else ""
        self.description = f"onnxruntime {ort.__version__} {provider} ({Path(model_path).name}{thread_note})"
        self.variant = f"{Path(model_path).name} on onnxruntime {provider}"

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        feed = {"audio": np.ascontiguousarray(audio, dtype=np.float32)}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def close(self) -> None:
        self.session = None


def onnx_cpu_backend(model_path: Path, output_names: list[str], threads: int | None = None) -> OrtBackend:
    """ONNX Runtime's CPU provider on one ONNX file (the runtime's CPU path, and the reference of every gate)."""
    return OrtBackend(model_path, output_names, provider="CPUExecutionProvider", threads=threads)


def ort_distributions() -> list[str]:
    """Which ONNX Runtime packages pip installed ("onnxruntime 1.32.0", "onnxruntime-gpu 1.20.1", ...)."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def cuda_backend(bundle: Path, output_names: list[str]) -> Backend:
    """ONNX Runtime CUDA on model.onnx (its TensorRT provider with EDGEENC_ORT_TENSORRT=1), or why not."""
    ort = import_onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        installed = ort_distributions()
        no_gpu = nvidia_gpu_missing()
        first = f"{no_gpu}; and " if no_gpu else ""
        both = any(d.startswith("onnxruntime ") for d in installed) and any("-gpu" in d for d in installed)
        if both:
            raise BackendUnavailable(
                f"{first}both {' and '.join(installed)} are installed, which hides the CUDA provider: "
                "pip uninstall onnxruntime onnxruntime-gpu, then pip install 'edgeenc[gpu]'"
            )
        raise BackendUnavailable(
            f"{first}the installed ONNX Runtime ({', '.join(installed) or ort.__version__}) has no "
            "CUDAExecutionProvider: on an NVIDIA machine install 'edgeenc[gpu]' (onnxruntime-gpu) instead of "
            "onnxruntime, not beside it",
            not_installed=not any("-gpu" in d for d in installed),
        )
    if os.environ.get("EDGEENC_ORT_TENSORRT") == "1" and "TensorrtExecutionProvider" in ort.get_available_providers():
        return ort_tensorrt_backend(bundle, output_names)
    return OrtBackend(bundle / "model.onnx", output_names, provider="CUDAExecutionProvider",
                      provider_options=cuda_provider_options(ort) or None)


def ort_tensorrt_backend(bundle: Path, output_names: list[str]) -> Backend:
    """onnxruntime-gpu's TensorRT execution provider, with its engine cache inside the bundle.

    Opt-in (EDGEENC_ORT_TENSORRT=1): the first run builds engines for minutes, and the cache is valid
    only for this GPU and TensorRT version, like the engines of `edgeenc build`.

    fp16 comes from model.fp16.onnx's own Casts, never from trt_fp16_enable: with the flag off the provider
    builds a strongly typed network on TensorRT > 8 (microsoft/onnxruntime#24298, #18707), which keeps the
    fp32 islands and is the only kind TensorRT 11 builds; with it on, the network is weakly typed, which
    TensorRT 11 no longer has and which lets 10.x override the islands. Without model.fp16.onnx: fp32.
    """
    cache = Path(bundle) / "engines" / "ort-tensorrt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
    }
    source = "model.fp16.onnx" if (Path(bundle) / "model.fp16.onnx").is_file() else "model.onnx"
    return OrtBackend(Path(bundle) / source, output_names, provider="TensorrtExecutionProvider",
                      provider_options=options)
