"""OpenVINO on the CPU, behind the same Backend protocol as ONNX Runtime (optional: `edgeenc[openvino]`).

OpenVINO reads the bundle's portable model.onnx itself (model.cpu.onnx holds com.microsoft ops it does
not know). Its CPU plugin can run the same graph in bf16 (INFERENCE_PRECISION_HINT) where the CPU has
bf16 instructions, which ONNX Runtime's CPU provider cannot (no bf16 MatMul kernel). The precision is
always set explicitly: on CPUs with AMX OpenVINO's default is bf16, and an "fp32" variant must be fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import BundleError
from .protocol import BackendUnavailable

# variant precision -> INFERENCE_PRECISION_HINT; an int8 IR runs its unquantised ops (front end, norms) in f32.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"OpenVINO is not installed ({exc}): pip install 'edgeenc[openvino]'") from exc
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except BackendUnavailable:
        return False
    return True


def compile_config(precision: str, threads: int | None) -> dict:
    """The CPU plugin settings every edgeenc OpenVINO model is compiled with (variants and the GEMM limit)."""
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None (without importing it when it is absent)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class OpenVinoBackend:
    """An OpenVINO CPU compiled model of `model_path` at `precision` ("fp32" or "bf16")."""

    name = "cpu"

    def __init__(self, model_path: Path, output_names: list[str], *, precision: str = "fp32",
                 threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        ov = import_openvino()
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError-like types of its own
            raise BundleError(f"{model_path}: OpenVINO cannot read it ({str(exc).splitlines()[0][:300]}); "
                              "re-export the bundle") from None
        self.compiled = core.compile_model(model, "CPU", compile_config(precision, threads))
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        wanted = PRECISIONS[precision]
        if got != wanted:  # OpenVINO falls back to f32 silently where the CPU has no bf16
            raise BackendUnavailable(f"OpenVINO compiled {Path(model_path).name} in {got}, not {wanted}, on this CPU")
        self.request = self.compiled.create_infer_request()
        self.output_names = output_names
        self.ports = {n: self.compiled.output(n) for n in output_names}
        used = self.compiled.get_property("INFERENCE_NUM_THREADS")
        version = openvino_version() or ov.__version__
        self.description = f"openvino {version} CPU {precision} ({Path(model_path).name}, {used} threads)"
        self.variant = f"{Path(model_path).name} on openvino CPU {precision}"

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({"audio": np.ascontiguousarray(audio, dtype=np.float32)})
        # infer() hands back views of the request's buffers, which the next call overwrites.
        return {name: np.array(results[port], dtype=np.float32) for name, port in self.ports.items()}

    def close(self) -> None:
        self.request = None
        self.compiled = None

