"""OpenVINO on the CPU, behind the same Backend protocol as ONNX Runtime (optional: `edgeenc[openvino]`).

OpenVINO reads the bundle's portable model.onnx itself (model.cpu.onnx holds com.microsoft ops it does
not know). Its CPU plugin can run the same graph in bf16 (INFERENCE_PRECISION_HINT) where the CPU has
bf16 instructions, which ONNX Runtime's CPU provider cannot (no bf16 MatMul kernel). The precision is
always set explicitly: on CPUs with AMX OpenVINO's default is bf16, and an "fp32" variant must be fp32.

Two compile settings a variant can carry (manifest entry "compile", written by `edgeenc optimize` and gated
as written, benchmarks/sapphire-rapids-amx/README.md has the per-node profiles behind them):
- "inference_precision": the precision of an int8 IR's unquantised ops (attention, norms, the positional
  convolution): "bf16" on CPUs with bf16 dot products (the int8 GEMMs then hand bf16 to bf16 neighbours, no
  fp32 round trips), else "fp32". Entries without it run those ops in fp32, as before.
- "static_window_samples": calls of exactly [batch, that many samples] (the model's native window, what
  embed, watch and the Ray workers send) run on a model compiled for that static shape, one per batch size
  seen (at most STATIC_SHAPES); any other length (a file's short last window) on the dynamic one. With
  static shapes OpenVINO fuses the element-wise work around attention into its JIT subgraphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import BundleError
from .protocol import BackendUnavailable

# variant precision -> INFERENCE_PRECISION_HINT; an int8 IR runs its unquantised ops (front end, norms) in f32
# unless its entry's compile settings say bf16 (COMPUTE_PRECISIONS).
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
COMPUTE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # an int8 IR's "inference_precision" -> the hint
# Static compiled models kept (batch sizes of the native window); others run dynamic. Each holds its own
# weights: 330 MB more per batch size for the full-size BEATs int8 IR (benchmarks/sapphire-rapids-amx/), so two:
# the run's batch and one other (a file's or a run's last, partial batch).
STATIC_SHAPES = 2


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


def inference_hint(precision: str, inference_precision: str | None = None) -> str:
    """The INFERENCE_PRECISION_HINT of a variant: its precision's, or for an int8 IR the precision its entry
    records for the unquantised ops."""
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "int8" or not inference_precision:
        return PRECISIONS[precision]
    if inference_precision not in COMPUTE_PRECISIONS:
        raise ValueError(f"an int8 IR's inference precision must be one of {', '.join(COMPUTE_PRECISIONS)}, "
                         f"not {inference_precision!r}")
    return COMPUTE_PRECISIONS[inference_precision]


def compile_config(precision: str, threads: int | None, inference_precision: str | None = None) -> dict:
    """The CPU plugin settings every edgeenc OpenVINO model is compiled with (variants and the GEMM limit)."""
    config = {"INFERENCE_PRECISION_HINT": inference_hint(precision, inference_precision),
              "PERFORMANCE_HINT": "LATENCY"}
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
    """An OpenVINO CPU compiled model of `model_path` at `precision` ("fp32", "bf16" or "int8" for an int8 IR),
    with the variant's compile settings (`compile`: see the module docstring)."""

    name = "cpu"
    best_batch: int | None = None  # set by selection.py from the bundle's measured sweep

    def __init__(self, model_path: Path, output_names: list[str], *, precision: str = "fp32",
                 threads: int | None = None, compile: dict | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        compile = dict(compile or {})
        ov = import_openvino()
        self.core = ov.Core()
        self.model_path = Path(model_path)
        self.config = compile_config(precision, threads, compile.get("inference_precision"))
        self.static_samples = int(compile["static_window_samples"]) if compile.get("static_window_samples") else None
        self.compiled = self.core.compile_model(self._read(), "CPU", self.config)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        wanted = self.config["INFERENCE_PRECISION_HINT"]
        if got != wanted:  # OpenVINO falls back to f32 silently where the CPU has no bf16
            raise BackendUnavailable(f"OpenVINO compiled {self.model_path.name} in {got}, not {wanted}, on this CPU")
        self.request = self.compiled.create_infer_request()
        self.static: dict[int, object] = {}  # batch size -> infer request of the static native-window model
        self.output_names = output_names
        for name in output_names:
            self.compiled.output(name)  # raises now, naming the output, not at the first run
        used = self.compiled.get_property("INFERENCE_NUM_THREADS")
        version = openvino_version() or ov.__version__
        rest = f", unquantised ops {wanted}" if precision == "int8" else ""
        static = f", static {self.static_samples}-sample window" if self.static_samples else ""
        self.description = (f"openvino {version} CPU {precision} ({self.model_path.name}, {used} threads{rest}"
                            f"{static})")
        self.variant = f"{self.model_path.name} on openvino CPU {precision}"

    def _read(self):
        try:
            return self.core.read_model(str(self.model_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError-like types of its own
            raise BundleError(f"{self.model_path}: OpenVINO cannot read it ({str(exc).splitlines()[0][:300]}); "
                              "re-export the bundle") from None

    def request_for(self, shape: tuple[int, ...]):
        """The infer request for an input of `shape`: the static model of its batch size where the shape is the
        native window (compiled on first use, at most STATIC_SHAPES of them), else the dynamic one."""
        if self.static_samples is None or len(shape) != 2 or shape[1] != self.static_samples:
            return self.request
        batch = int(shape[0])
        if batch not in self.static:
            if len(self.static) >= STATIC_SHAPES:
                return self.request
            model = self._read()
            model.reshape({model.inputs[0].get_any_name(): [batch, self.static_samples]})
            self.static[batch] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.static[batch]

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        request = self.request_for(audio.shape)
        results = request.infer({"audio": audio})
        # infer() hands back views of the request's buffers, which the next call overwrites; outputs are
        # looked up by name (the static models have ports of their own).
        by_name = {name: value for port, value in results.items() for name in port.get_names()}
        return {name: np.array(by_name[name], dtype=np.float32) for name in self.output_names}

    def close(self) -> None:
        self.request = None
        self.static = {}
        self.compiled = None
