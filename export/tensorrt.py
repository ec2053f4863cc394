"""`edgeenc build`: a TensorRT engine for this GPU from a bundle, gated on parity with ONNX Runtime.

Everything but `build_engine` needs no GPU and no tensorrt, so CI tests it: the profile, the
precision plan, and through the backends' TensorRT engine-file rules (the rules the runtime loads by)
engine names, sidecar matching and refusal messages. The build (docs/jetson.md has the sources):

- fp16 on TensorRT >= 10: a STRONGLY_TYPED network from model.fp16.onnx, whose Casts keep the
  front end, LayerNorm, softmax and pooling in fp32 (export/fp16.py);
- fp16 on TensorRT 8.6 (JetPack 6.0, no strong typing): weak typing from model.onnx with the
  FP16 flag, every fp32 node of `precision_plan` pinned (layer.precision + set_output_type) and
  OBEY_PRECISION_CONSTRAINTS. Myelin fusion can override pins: the parity gate decides;
- TF32 cleared in every build (fp32 and fp16): it would round the front end's DFT MatMul to 10 bits;
- one timing cache per device and TensorRT version in BUNDLE/engines/, reused by every build.

An engine is accepted only if it passes the gate against ONNX Runtime fp32 on the export's parity
cases; a failing one is kept aside as `*.rejected.engine` (sidecar `*.rejected.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeenc import __version__
from edgeenc.hashing import sha256_file
from edgeenc.progress import Progress
from edgeenc.runtime import bundle as bundle_io
from edgeenc.runtime.atomic import atomic_path, write_json_atomic
from edgeenc.runtime.backends import (
    ENGINES_DIR,
    Profile,
    TensorRTBackend,
    TensorRTUnavailable,
    device_key,
    engine_file_name,
    gpu_identity,
    onnx_cpu_backend,
    require_tensorrt,
    tensorrt_version,
)

PRECISIONS = ("fp16", "fp32")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SECONDS = 30.0
DEFAULT_WORKSPACE_GB = 2.0  # TensorRT's default is all device memory: on a Jetson, the system's RAM
SIDECAR_FORMAT = 1
CRITICAL_LAYER_MARKS = ("LayerNormalization", "Softmax", "ReduceMean", "/fbank/")


class BuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine; the message carries its log."""


def compute_profile(manifest: dict, *, max_batch: int | None = None, min_seconds: float | None = None,
                    max_seconds: float | None = None, opt_seconds: float | None = None) -> Profile:
    """The `audio` profile from the CLI options and the bundle. Defaults: batch 1-8, the model's shortest
    input (manifest min_samples) to 30 s, optimised for full batches of the model's native window."""
    rate, floor = int(manifest["sample_rate"]), int(manifest["min_samples"])
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    low = floor if min_seconds is None else int(round(min_seconds * rate))
    if low < floor:
        raise ValueError(f"--min-seconds {min_seconds:g} is shorter than the model accepts: at least {floor} "
                         f"samples ({floor / rate:g} s at {rate} Hz)")
    high = int(round((DEFAULT_MAX_SECONDS if max_seconds is None else max_seconds) * rate))
    if high < low:
        raise ValueError(f"--max-seconds {high / rate:g} is below the minimum length {low / rate:g} s")
    opt = int(round((opt_seconds if opt_seconds is not None else float(manifest.get("window_seconds", 10))) * rate))
    if opt_seconds is None:
        opt = min(max(opt, low), high)
    elif not low <= opt <= high:
        raise ValueError(f"--opt-seconds {opt_seconds:g} is outside the profile's {low / rate:g}-{high / rate:g} s")
    notes = []
    frames = (manifest.get("frontend") or {}).get("target_frames")
    if manifest.get("architecture") == "eat" and frames:
        crop = 400 + (int(frames) - 1) * 160  # kaldi frames: 25 ms long, 10 ms apart at 16 kHz
        notes.append(f"EAT reads only the first {crop} samples ({crop / rate:g} s, {frames} frames) of each row: "
                     "longer rows are valid input, cropped inside the graph, so a longer maximum only sizes the "
                     "input buffer")
    return Profile(rate, (1, low), (max_batch, opt), (max_batch, high), tuple(notes))


def precision_plan(onnx_model):
    """fp16/fp32 node sets of an edgeenc fp32 graph (export/fp16.py): the weak-typing fallback pins
    every fp32 node (front end, LayerNorm, softmax, ReduceMean, outputs, residual stream)."""
    from .fp16 import precision_plan as plan

    return plan(onnx_model)


def _datatype(fmt: str) -> str:
    text = fmt.lower()
    for marks, label in ((("int8",), "int8"), (("fp16", "half"), "fp16"), (("bf16",), "bf16"),
                         (("fp32", "float"), "fp32"), (("int32", "int64"), "int"), (("bool",), "bool")):
        if any(m in text for m in marks):
            return label
    return "unknown"


def _tensor_type(tensor: dict) -> str:
    """A layer tensor's type in the inspector's JSON: 8.6 / 10.x write one "Format/Datatype" string, 11.x
    split it into "DataType" and "Format" (TensorRT 11.0 IEngineInspector migration page,
    docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html)."""
    return str(tensor.get("Format/Datatype") or tensor.get("DataType") or tensor.get("Format") or "")


def layer_summary(engine_information: str | dict) -> dict:
    """Layer counts per precision from the engine inspector's JSON (ProfilingVerbosity.DETAILED).

    A layer's precision is that of its outputs (of its inputs when the outputs say nothing); a fused
    Myelin layer counts once. `critical_not_fp32` names LayerNorm / softmax / pooling / front-end
    layers whose outputs are not fp32: where to look first when the parity gate fails.
    """
    data = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    counts: dict[str, int] = {}
    critical: list[str] = []
    for layer in data.get("Layers", []):
        layer = layer if isinstance(layer, dict) else {"Name": str(layer)}
        labels = {_datatype(_tensor_type(t)) for t in layer.get("Outputs", [])} - {"unknown"}
        labels = labels or {_datatype(_tensor_type(t)) for t in layer.get("Inputs", [])} - {"unknown"}
        label = "+".join(sorted(labels)) or "unknown"
        counts[label] = counts.get(label, 0) + 1
        name = str(layer.get("Name", ""))
        if any(mark in name for mark in CRITICAL_LAYER_MARKS) and labels - {"fp32", "int", "bool"}:
            critical.append(name[:200])
    return {"layers": sum(counts.values()), "by_precision": dict(sorted(counts.items())),
            "critical_not_fp32": critical[:50]}


def fit_cases(cases: list, profile: Profile) -> tuple[list, list[str]]:
    """Parity cases trimmed to the profile: rows beyond its max batch and samples beyond its max length."""
    from .parity import ParityCase

    fitted, notes = [], []
    (_, low), (max_batch, high) = profile.min_shape, profile.max_shape
    for case in cases:
        audio = case.audio[:max_batch, :high]
        if audio.shape[1] < low:
            notes.append(f"skipped {case.name}: shorter than the profile's minimum")
            continue
        name = case.name
        if audio.shape != case.audio.shape:
            name = f"{case.name}_fit{audio.shape[0]}x{audio.shape[1]}"
            notes.append(f"{case.name} {list(case.audio.shape)} trimmed to the profile: {list(audio.shape)}")
        fitted.append(ParityCase(name, audio))
    return fitted, notes


def _fp32_floors(bundle: Path) -> dict[tuple[str, str], tuple[float, float, float]]:
    """PyTorch fp32-vs-fp64 error per (case, output) from the export's parity.json: the fp32 gate's floor."""
    try:
        reports = json.loads((Path(bundle) / bundle_io.PARITY).read_text())["reports"]
    except (OSError, KeyError, json.JSONDecodeError):
        return {}
    return {(c["case"], c["output"]): (c["torch_fp32_vs_fp64_max_abs"], 0.0, c["torch_fp32_vs_fp64_min_cosine"])
            for r in reports if r.get("variant") == "fp32" for c in r.get("comparisons", [])
            if c.get("torch_fp32_vs_fp64_max_abs") is not None}


def engine_parity(bundle: Path, manifest: dict, run_engine: Callable, precision: str, profile: Profile,
                  progress: Progress | None = None):
    """The engine against ONNX Runtime fp32 (CPU, model.onnx) on the export's parity cases fitted to the
    profile: fp16 with the reduced-precision gate, fp32 with the fp32 limits and the export's fp64 floors."""
    from . import parity

    names = bundle_io.output_names(manifest)
    cases, notes = fit_cases(parity.parity_cases(manifest["architecture"], int(manifest["sample_rate"])), profile)
    if not cases:
        raise ValueError(f"no parity case fits the profile ({profile.describe()})")
    reference = onnx_cpu_backend(Path(bundle) / "model.onnx", names)
    references = {case.name: reference.run(case.audio) for case in cases}
    if precision == "fp16":
        report = parity.compare("tensorrt-fp16", run_engine, references, cases, names,
                                token_cosine=parity.FP16_TOKEN_COSINE, progress=progress)
    else:
        report = parity.compare("tensorrt-fp32", run_engine, references, cases, names, floors=_fp32_floors(bundle),
                                progress=progress)
    report.notes = [f"reference: {reference.description} (fp32)", *notes, *report.notes]
    reference.close()
    return report


@dataclass
class _Source:
    path: Path  # the ONNX file TensorRT parses
    name: str  # the bundle file it stands for (recorded in the sidecar)
    sha256: str
    typing: str  # "strong" or "weak"
    plan: object | None = None  # PrecisionPlan to pin (weak-typed fp16 only)
    notes: list[str] = field(default_factory=list)


def network_typing(trt) -> str:
    """"strong" or "weak": the network kind this TensorRT builds (docs/jetson.md, "API rules by version").

    11.x: every network is strongly typed and the weak-typing API is gone (TensorRT 11.0 Python migration
    guide, docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-python-api.html),
    whether or not its STRONGLY_TYPED flag is still there. 9.x / 10.x: strong when the flag exists.
    8.6 (JetPack 6.0) has no strong typing (NVIDIA/TensorRT@release/8.6:include/NvInfer.h).
    """
    if tensorrt_version(trt)[0] >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return "strong"
    return "weak"


def network_flags(trt, typing: str) -> int:
    """create_network flags. 11.x keeps STRONGLY_TYPED only as an ignored, deprecated flag and has no
    EXPLICIT_BATCH (11.0 Python API reference, NetworkDefinitionCreationFlag; lightvector/KataGo#1206);
    10.x ignores EXPLICIT_BATCH; 8.6 needs it, or the ONNX parser refuses the implicit-batch network
    (microsoft/onnxruntime#24298 sets it only for TensorRT <= 8)."""
    flag = trt.NetworkDefinitionCreationFlag
    if typing == "strong":
        return 1 << int(flag.STRONGLY_TYPED) if hasattr(flag, "STRONGLY_TYPED") else 0
    return 1 << int(flag.EXPLICIT_BATCH)


@contextlib.contextmanager
def _build_source(bundle: Path, manifest: dict, precision: str, trt) -> Iterator[_Source]:
    strong = network_typing(trt) == "strong"
    fp16_file = bundle / "model.fp16.onnx"

    def checked_sha(name: str) -> str:
        digest = sha256_file(bundle / name)
        if manifest.get("files", {}).get(name, {}).get("sha256") not in (None, digest):
            raise BuildError(f"{bundle / name} changed since export (sha256 differs from the manifest); re-export")
        return digest

    if precision == "fp32":
        yield _Source(bundle / "model.onnx", "model.onnx", checked_sha("model.onnx"), "strong" if strong else "weak")
        return
    if strong and fp16_file.is_file():
        notes = [] if bundle_io.gated(bundle_io.variant_entry(manifest, "model.fp16.onnx")) else [
            "model.fp16.onnx failed its ONNX Runtime gate at export; the engine's own gate decides"]
        yield _Source(fp16_file, fp16_file.name, checked_sha(fp16_file.name), "strong", notes=notes)
        return
    try:
        import onnx
    except ImportError:
        raise TensorRTUnavailable(
            f"{bundle} has no model.fp16.onnx and the onnx package, needed to derive the fp16 plan, is not installed: "
            "pip install onnx, or re-export with `edgeenc export MODEL_ID --fp16`") from None
    model = onnx.load(str(bundle / "model.onnx"))
    sha = checked_sha("model.onnx")
    if not strong:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise BuildError(f"TensorRT {trt.__version__} has neither strong typing nor the FP16 builder flag")
        yield _Source(bundle / "model.onnx", "model.onnx", sha, "weak", plan=precision_plan(model))
        return
    from .fp16 import convert_fp16

    with tempfile.TemporaryDirectory(prefix="edgeenc-fp16-") as tmp:
        convert_fp16(model, Path(tmp) / "model.fp16.onnx")
        yield _Source(Path(tmp) / "model.fp16.onnx", "model.onnx", sha, "strong",
                      notes=["no model.fp16.onnx in the bundle: converted from model.onnx at build time"])


def _recording_logger(trt):
    class Recorder(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

    return Recorder()


def _pin_fp32(trt, network, plan) -> int:
    """Weak typing: force the plan's fp32 layers (matched by output tensor, else by owning node name)."""
    owners = sorted([*plan.fp16, *plan.fp32], key=len, reverse=True)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE) or not outputs or any(
                o.dtype not in (trt.float32, trt.float16) or not o.is_execution_tensor for o in outputs):
            continue  # shape / integer layers cannot take a float precision (issue #3177)
        names = {o.name for o in outputs}
        if names & plan.fp16_tensors:
            continue
        owner = next((n for n in owners if layer.name == n or layer.name.startswith(n)), None)
        if names & plan.fp32_tensors or owner in plan.fp32:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _build_serialized(trt, source: _Source, profile: Profile, workspace_gb: float, cache_path: Path):
    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, source.typing))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source.path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {source.name}: " + "; ".join(errors or logger.messages))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):  # in 8.6, 10.x and 11.x alike (11.x keeps kTF32: docs.rs trtx-sys BuilderFlag)
        config.clear_flag(trt.BuilderFlag.TF32)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    notes = list(source.notes)
    if source.plan is not None:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        notes.append(f"weak typing: {_pin_fp32(trt, network, source.plan)} layers pinned to fp32 (obey)")
    shapes = builder.create_optimization_profile()
    shapes.set_shape(profile.input_name, profile.min_shape, profile.opt_shape, profile.max_shape)
    config.add_optimization_profile(shapes)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"{cache_path.name} did not fit this device; started a new timing cache")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the engine:\n  " + "\n  ".join(logger.messages[-20:]))
    _write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized)), notes + logger.messages[-10:]


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as staged:
        Path(staged).write_bytes(data)


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    accepted: bool
    data: dict  # the sidecar's content


def build_engine(bundle: Path, *, precision: str = "fp16", profile: Profile | None = None,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, progress: Progress | None = None) -> BuildResult:
    """Build, check and record a TensorRT engine for this GPU in BUNDLE/engines/ (see the module docstring).

    Raises TensorRTUnavailable at once when tensorrt, cuda-python or a GPU is missing.
    """
    trt, cudart = require_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    say = progress or (lambda _msg: None)
    bundle = Path(bundle)
    manifest = bundle_io.read_manifest(bundle)
    profile = profile or compute_profile(manifest)
    gpu = gpu_identity(cudart)
    (bundle / ENGINES_DIR).mkdir(exist_ok=True)
    cache = bundle / ENGINES_DIR / f"timing.{device_key(gpu['name'], gpu['compute_capability'], trt.__version__)}.cache"
    started = time.time()
    with _build_source(bundle, manifest, precision, trt) as source:
        say(f"building a {precision} engine from {source.name} ({source.typing} typing) for {gpu['name']} "
            f"(compute capability {gpu['compute_capability']}), TensorRT {trt.__version__}: {profile.describe()}")
        plan_bytes, build_notes = _build_serialized(trt, source, profile, workspace_gb, cache)
    build_seconds = round(time.time() - started, 1)
    name = engine_file_name(precision, gpu["name"], gpu["compute_capability"], trt.__version__)
    staged = bundle / ENGINES_DIR / f".{name}.tmp"
    staged.write_bytes(plan_bytes)
    say(f"built in {build_seconds:g} s; checking parity against ONNX Runtime fp32")
    backend = TensorRTBackend(staged, bundle_io.output_names(manifest), profile.sample_rate,
                              sidecar={"precision": precision, "gpu": gpu}, bundle=bundle)
    try:
        layers = layer_summary(backend.layer_information(profile.opt_shape))
        report = engine_parity(bundle, manifest, backend.run, precision, profile, progress=say)
    finally:
        backend.close()
    engine = bundle / ENGINES_DIR / (name if report.passed else name.replace(".engine", ".rejected.engine"))
    os.replace(staged, engine)
    data = {
        "format": SIDECAR_FORMAT, "engine": engine.name, "engine_sha256": sha256_file(engine),
        "engine_bytes": engine.stat().st_size, "precision": precision, "typing": source.typing, "tf32": False,
        "tensorrt_version": trt.__version__, "gpu": gpu, "profile": profile.to_json(),
        "source_onnx": source.name, "source_onnx_sha256": source.sha256, "model_id": manifest.get("model_id"),
        "workspace_bytes": int(workspace_gb * (1 << 30)), "timing_cache": f"{ENGINES_DIR}/{cache.name}",
        "build_seconds": build_seconds, "build_notes": build_notes, "layers": layers,
        "parity": {**report.summary, "report": report.to_json()},
        "edgeenc_version": __version__, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    sidecar = engine.with_suffix(".json")
    write_json_atomic(sidecar, data)
    if report.passed:
        entry = {"precision": precision, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                 "tensorrt": trt.__version__, "profile": profile.to_json(), "sidecar": sidecar.name}
        bundle_io.add_files_to_manifest(bundle, [f"{ENGINES_DIR}/{engine.name}", f"{ENGINES_DIR}/{sidecar.name}"],
                                        engines={**manifest.get("engines", {}), engine.name: entry})
    return BuildResult(engine, sidecar, report.passed, data)
