"""OpenVINO on the CPU, behind the same Backend protocol as ONNX Runtime (optional: `edgeenc[openvino]`).

OpenVINO reads the bundle's portable model.onnx itself (model.cpu.onnx holds com.microsoft ops it does
not know). Its CPU plugin can run the same graph in bf16 (INFERENCE_PRECISION_HINT) where the CPU has
bf16 instructions, which ONNX Runtime's CPU provider cannot (no bf16 MatMul kernel). The precision is
always set explicitly: on CPUs with AMX OpenVINO's default is bf16, and an "fp32" variant must be fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend_protocol import BackendUnavailable

# variant precision -> INFERENCE_PRECISION_HINT; an int8 IR runs its unquantised ops (front end, norms) in f32.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"OpenVINO is not installed ({exc}): pip install 'edgeenc[openvino]'") from exc
    return openvino


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
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
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

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({"audio": np.ascontiguousarray(audio, dtype=np.float32)})
        # infer() hands back views of the request's buffers, which the next call overwrites.
        return {name: np.array(results[port], dtype=np.float32) for name, port in self.ports.items()}

    def close(self) -> None:
        self.request = None
        self.compiled = None


def matmul_gflops(threads: int | None, precision: str = "bf16", shape: tuple[int, int, int] = (2048, 2048, 2048),
                  repeats: int = 5) -> float:
    """GFLOP/s of OpenVINO's CPU plugin on one [m, k] x [k, n] MatMul with constant weights (as in the model),
    compiled with the same precision hint as the variants; best of `repeats` runs after a warm-up.

    numpy and ONNX Runtime's CPU provider have no bf16 GEMM, so this gives the bf16 limit (oneDNN's
    AVX512_BF16 / AMX kernels) and one more fp32 candidate (runtime/gemm_limits.py).
    """
    import time

    ov = import_openvino()
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = ov.opset13.parameter([m, k], ov.Type.f32, name="a")
    weights = ov.opset13.constant(rng.standard_normal((k, n)).astype(np.float32))
    model = ov.Model([ov.opset13.matmul(a, weights, False, False)], [a], "gemm_limit")
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    x = rng.standard_normal((m, k)).astype(np.float32)
    request.infer({0: x})
    best, total, count = float("inf"), 0.0, 0
    while count < repeats or (total < 0.05 and count < 200):  # more runs for tiny shapes (timer noise)
        start = time.perf_counter()
        request.infer({0: x})
        elapsed = time.perf_counter() - start
        best, total, count = min(best, elapsed), total + elapsed, count + 1
    return 2.0 * m * k * n / best / 1e9
