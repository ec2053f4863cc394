"""Backends behind one small protocol, and `--device auto` with honest fallback.

Order for auto: a TensorRT engine built for this GPU and TensorRT version, then ONNX Runtime
CUDA, then ONNX Runtime CPU. Every skipped backend is logged with the reason. onnxruntime-gpu
silently falls back to CPU when CUDA cannot load, so the CUDA backend checks the providers the
session really got.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from .backend_protocol import Backend, BackendUnavailable
from .isa import int8_variant_problem

log = logging.getLogger("edgeenc.runtime")

DEVICES = ("auto", "trt", "cuda", "cpu")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            "no ONNX Runtime is installed: pip install 'edgeenc[cpu]' (CPU) or 'edgeenc[gpu]' (CUDA; never both)"
        ) from exc
    return onnxruntime


# ONNX Runtime graph rewrites that make BEATs / EAT slower on CPU. SkipLayerNormFusion turns Add +
# LayerNormalization into SkipLayerNormalization, whose CPU kernel took ~1.0 ms per [496, 768] call
# against ~0.2 ms for the pair (onnxruntime 1.32, 2 Zen 4 threads; int8 BEATs 10 s clip: 323 -> 304 ms
# p50 with it off, fp32 unchanged; measured with an interleaved run of both sessions).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# The CUDA provider runs fp32 MatMul / Conv in TF32 by default (use_tf32 = 1 in
# microsoft/onnxruntime:include/onnxruntime/core/providers/cuda/cuda_provider_options.h), which rounds the
# front end's DFT MatMul to a 10-bit mantissa; edgeenc's TensorRT builds clear TF32 for the same reason.
# The option exists from onnxruntime 1.18 (microsoft/onnxruntime#19357, #19426); older releases reject
# unknown options, so they get none (a Jetson Zoo wheel for JetPack 6.0 can be that old).
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0"}


def cuda_provider_options(ort) -> dict:
    major, minor = (int(p) for p in (re.findall(r"\d+", ort.__version__) + ["0", "0"])[:2])
    return dict(CUDA_PROVIDER_OPTIONS) if (major, minor) >= (1, 18) else {}


class OrtBackend:
    """ONNX Runtime session on one execution provider."""

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
        self.session = ort.InferenceSession(str(model_path), options, providers=providers, **extra)
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

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        feed = {"audio": np.ascontiguousarray(audio, dtype=np.float32)}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def close(self) -> None:
        self.session = None


def cpu_model(bundle: Path, manifest: dict, variant: str | None = None) -> Path:
    """The ONNX file for ONNX Runtime: `variant` (e.g. "int8dyn" -> model.int8dyn.onnx) when asked for,
    else model.cpu.onnx (ONNX Runtime-optimised fp32) when it passed, else model.onnx.

    Only variants that passed their quality gate at export/optimize time are offered.
    """
    variants = manifest.get("variants") or {}
    if variant:
        name = "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"
        entry = variants.get(name)
        offered = sorted(k[len("model.") : -len(".onnx")] for k, v in variants.items()
                         if v.get("parity") and k != "model.onnx" and (bundle / k).is_file())
        if name != "model.onnx" and (not entry or not entry.get("parity") or not (bundle / name).is_file()):
            why = "did not pass its quality gate" if entry and not entry.get("parity") else "is not in this bundle"
            raise BackendUnavailable(
                f"variant {variant!r} ({name}) {why}; offered: fp32{''.join(', ' + v for v in offered)} "
                f"(`edgeenc optimize {bundle}` writes the CPU variants)"
            )
        problem = int8_variant_problem(name, entry, bundle) if entry else None
        if problem:
            raise BackendUnavailable(problem)
        return bundle / name
    entry = variants.get("model.cpu.onnx")
    if entry and entry.get("parity") and (bundle / "model.cpu.onnx").is_file():
        return bundle / "model.cpu.onnx"
    return bundle / "model.onnx"


def _try_trt(bundle: Path, manifest: dict, output_names: list[str]) -> Backend:
    try:
        from .tensorrt_backend import TensorRTBackend
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT backend unavailable ({exc}): install TensorRT (pip install 'edgeenc[tensorrt]'; on Jetson "
            "use JetPack's TensorRT) and build an engine with `edgeenc build BUNDLE`", not_installed=True
        ) from exc
    return TensorRTBackend.from_bundle(bundle, manifest, output_names)


def ort_distributions() -> list[str]:
    """Which ONNX Runtime packages pip installed ("onnxruntime 1.32.0", "onnxruntime-gpu 1.20.1", ...)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def _try_cuda(bundle: Path, output_names: list[str]) -> Backend:
    ort = import_onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        installed = ort_distributions()
        both = any(d.startswith("onnxruntime ") for d in installed) and any("-gpu" in d for d in installed)
        if both:
            raise BackendUnavailable(
                f"both {' and '.join(installed)} are installed, which hides the CUDA provider: "
                "pip uninstall onnxruntime onnxruntime-gpu, then pip install 'edgeenc[gpu]'"
            )
        raise BackendUnavailable(
            f"the installed ONNX Runtime ({', '.join(installed) or ort.__version__}) has no CUDAExecutionProvider: "
            "install 'edgeenc[gpu]' (onnxruntime-gpu) instead of onnxruntime, not beside it",
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


def select_backend(
    bundle: Path,
    manifest: dict,
    output_names: list[str],
    device: str = "auto",
    threads: int | None = None,
    variant: str | None = None,
    skipped: list[BackendUnavailable] | None = None,
) -> tuple[Backend, list[str]]:
    """The backend to run and a log of why others were skipped. Explicit devices never fall back.

    `skipped`, when given, receives the exception of every backend that `auto` skipped (see `brief_log`).
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    bundle = Path(bundle)
    threads = threads or _default_threads()
    attempts = {
        "trt": lambda: _try_trt(bundle, manifest, output_names),
        "cuda": lambda: _try_cuda(bundle, output_names),
        "cpu": lambda: OrtBackend(cpu_model(bundle, manifest, variant), output_names,
                                  provider="CPUExecutionProvider", threads=threads),
    }
    order = ["trt", "cuda", "cpu"] if device == "auto" else [device]
    if variant and variant != "fp32":
        # Reduced-precision ONNX variants are CPU (ONNX Runtime) files; engines carry their own precision.
        if device not in ("auto", "cpu"):
            raise BackendUnavailable(f"variant {variant!r} runs on --device cpu only")
        order = ["cpu"]
    notes: list[str] = []
    for name in order:
        try:
            backend = attempts[name]()
        except BackendUnavailable as exc:
            if device != "auto":
                raise
            notes.append(f"skipped {name}: {exc}")
            if skipped is not None:
                skipped.append(exc)
            log.info("skipped %s: %s", name, exc)
            continue
        notes.append(f"running on {backend.name}: {backend.description}")
        log.info("running on %s: %s", backend.name, backend.description)
        return backend, notes
    raise BackendUnavailable("no backend could run this bundle:\n  " + "\n  ".join(notes))


def brief_log(notes: list[str], skipped: list[BackendUnavailable]) -> list[str]:
    """`notes` of `select_backend`, or one line where `auto` fell back only past GPU software that is not
    installed (a laptop, a CPU server): the reasons are then noise to say only when asked (`-v`)."""
    if skipped and all(exc.not_installed for exc in skipped):
        return [f"{notes[-1]} (no GPU backend installed; -v for why)"]
    return notes


def _default_threads() -> int | None:
    value = os.environ.get("EDGEENC_THREADS")
    return int(value) if value else None
