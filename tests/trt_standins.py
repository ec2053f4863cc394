"""Stand-ins for tensorrt (8.6, 10.x, 11.x) and cuda-python (12.x, 13.x) that have only what the real release has.

The "engine" is the ONNX graph run by ONNX Runtime, and device memory is host memory, so buffers, copies and
shapes are exercised for real. Each stand-in refuses what its release lacks, with the source of the rule:

- 8.6 (JetPack 6.0): no NetworkDefinitionCreationFlag.STRONGLY_TYPED, and its ONNX parser refuses a network
  created without EXPLICIT_BATCH (NVIDIA/TensorRT@release/8.6:include/NvInfer.h; microsoft/onnxruntime#24298).
  The name-based runtime (set_input_shape, set_tensor_address, execute_async_v3) is there: it exists from 8.5
  (NVIDIA/TensorRT@release/8.6:python/docstrings/infer/pyCoreDoc.h).
- 10.x: STRONGLY_TYPED = 1, EXPLICIT_BATCH = 0 and ignored; a strongly typed network refuses layer precisions,
  output types and the FP16 builder flag (10.x Builder docs: "Setting layer precision and layer output types
  is not allowed"). Weak typing is deprecated from 10.12 but still works.
- 11.x: no BuilderFlag.FP16 / OBEY / PREFER_PRECISION_CONSTRAINTS, no ILayer.precision / set_output_type,
  no EXPLICIT_BATCH; STRONGLY_TYPED = 0 is deprecated and ignored (TensorRT 11.0 Python migration guide and
  Builder API page; docs.rs trtx-sys NetworkDefinitionCreationFlag; lightvector/KataGo#1206). The inspector's
  "Format/Datatype" is split into "DataType" and "Format" (11.0 IEngineInspector migration page).
- cuda-python 12.2: only `cuda.cudart`. 12.6.x: `cuda.bindings.runtime` as well, no `cuda.bindings.utils`.
  12.9.1: `cuda.bindings.utils.get_cuda_native_handle`. 13.0: no `cuda.cudart` any more, and int() on its
  objects is deprecated (cuda-bindings 12.6.1 / 12.9.1 / 13.0.0 release notes) - refused here outright.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from enum import IntEnum

import numpy as np
import onnx
import onnxruntime as ort

TRT_VERSIONS = ("8.6.2", "10.3.0", "10.16.1", "11.4.1")
CUDA_PYTHON_VERSIONS = ("12.2.0", "12.6.2", "12.9.1", "13.0.0")
CUDA_MODULES = ("cuda", "cuda.cudart", "cuda.bindings", "cuda.bindings.runtime", "cuda.bindings.utils")


def _major(version: str) -> int:
    return int(version.split(".")[0])


class _Stream:
    """cudaStream_t: int() works on 12.x and is refused on 13.x (deprecated there)."""

    def __init__(self, handle: int, allow_int: bool) -> None:
        self.handle, self.allow_int = handle, allow_int

    def __int__(self) -> int:
        if not self.allow_int:
            raise TypeError("int(cudaStream_t) is deprecated in cuda-bindings 13: use get_cuda_native_handle")
        return self.handle


class FakeCudart:
    """cudaMalloc & co. over host memory, so device pointers are real addresses."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaError_t = IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInsufficientDriver": 35})

    def __init__(self, version: str = "12.9.1", *, devices: int = 1, error: int = 0) -> None:
        self.version, self.heap, self.streams = version, {}, []
        self.devices, self.error = devices, error

    def _ok(self):
        return (self.cudaError_t(0),)

    def cudaGetDeviceCount(self):
        return self.cudaError_t(self.error), self.devices

    def cudaGetDeviceProperties(self, device):
        return self.cudaError_t(0), types.SimpleNamespace(
            name=b"Orin\x00", major=8, minor=7, multiProcessorCount=8, totalGlobalMem=8 << 30, integrated=1)

    def cudaMalloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.heap[ctypes.addressof(block)] = block
        return self.cudaError_t(0), ctypes.addressof(block)

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):
        self.heap.pop(ptr)
        return self._ok()

    cudaFreeHost = cudaFree

    def cudaStreamCreate(self):
        stream = _Stream(1000 + len(self.streams), allow_int=_major(self.version) < 13)
        self.streams.append(stream)
        return self.cudaError_t(0), stream

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return self._ok()

    def cudaStreamSynchronize(self, stream):
        assert isinstance(stream, _Stream)
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and isinstance(stream, _Stream)
        ctypes.memmove(dst, src, nbytes)
        return self._ok()


def install_cuda_python(monkeypatch, version: str = "12.9.1", **options) -> FakeCudart:
    """Put the module layout of cuda-python `version` in sys.modules (None = absent, even if installed)."""
    cudart = FakeCudart(version, **options)
    major, minor, patch = (int(p) for p in version.split("."))
    modules: dict[str, types.ModuleType | None] = dict.fromkeys(CUDA_MODULES)
    modules["cuda"] = types.ModuleType("cuda")
    modules["cuda"].__path__ = []
    runtime = types.ModuleType("runtime")
    for name in dir(cudart):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(cudart, name))
    if major < 13:
        modules["cuda.cudart"] = runtime
        modules["cuda"].cudart = runtime
    if (major, minor, patch) >= (12, 6, 1):
        modules["cuda.bindings"] = types.ModuleType("cuda.bindings")
        modules["cuda.bindings"].__path__ = []
        modules["cuda.bindings.runtime"] = modules["cuda.bindings"].runtime = runtime
        modules["cuda"].bindings = modules["cuda.bindings"]
    if (major, minor, patch) >= (12, 9, 1):
        utils = types.ModuleType("cuda.bindings.utils")
        utils.get_cuda_native_handle = lambda obj: obj.handle
        modules["cuda.bindings.utils"] = modules["cuda.bindings"].utils = utils
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return cudart


class _Layer:
    __slots__ = ("name", "type", "outputs", "num_outputs", "strong")

    def __init__(self, node, dtypes, strong: bool):
        self.name, self.type, self.strong = node.name, node.op_type, strong
        self.outputs = [types.SimpleNamespace(name=o, is_execution_tensor=True,
                                              dtype="float32" if dtypes.get(o) == 1 else "int64")
                        for o in node.output]
        self.num_outputs = len(self.outputs)

    def get_output(self, index):
        return self.outputs[index]


class _WeakTypingLayer(_Layer):
    """8.6 / 10.x: precision hints exist, and a strongly typed network refuses them."""

    __slots__ = ("_precision", "output_types")

    def __init__(self, *args):
        super().__init__(*args)
        self._precision, self.output_types = None, {}

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, dtype):
        if self.strong:
            raise RuntimeError("a strongly typed network does not allow setting layer precision")
        self._precision = dtype

    def set_output_type(self, index, dtype):
        if self.strong:
            raise RuntimeError("a strongly typed network does not allow setting layer output types")
        self.output_types[index] = dtype


def fake_tensorrt(version: str = "10.3.0", noise: float = 0.0) -> types.ModuleType:
    """The tensorrt API of `version`; a "plan" is a JSON header plus the ONNX graph, run by ONNX Runtime."""
    ns, major = types.SimpleNamespace, _major(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32, trt.float16, trt.nptype, trt.built = version, "float32", "float16", np.dtype, {}
    severity = IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)
    trt.ILogger = type("ILogger", (), {"Severity": severity, "__init__": lambda self, *a: None})
    trt.Logger = type("Logger", (trt.ILogger,), {"WARNING": severity.WARNING})
    creation = {8: {"EXPLICIT_BATCH": 0}, 10: {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
                11: {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1, "PREFER_JIT_PYTHON_PLUGINS": 2}}[major]
    trt.NetworkDefinitionCreationFlag = ns(**creation)
    flags = {"TF32": "TF32", "REFIT": "REFIT"}
    if major <= 10:
        flags.update(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY", PREFER_PRECISION_CONSTRAINTS="PREFER")
    trt.BuilderFlag = ns(**flags)
    trt.MemoryPoolType, trt.ProfilingVerbosity = ns(WORKSPACE="workspace"), ns(DETAILED="detailed")
    trt.LayerType = ns(CONSTANT="Constant", SHAPE="Shape")
    trt.TensorIOMode, trt.LayerInformationFormat = ns(INPUT="input", OUTPUT="output"), ns(JSON="json")
    layer_class = _Layer if major >= 11 else _WeakTypingLayer

    def strongly_typed(network_flags: int) -> bool:
        if major >= 11:
            return True
        return "STRONGLY_TYPED" in creation and bool(network_flags & (1 << creation["STRONGLY_TYPED"]))

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []
            self.num_errors = 0

        def get_error(self, index):
            return ns(desc=lambda: self.errors[index])

        def parse_from_file(self, path):
            if major == 8 and not self.network.flags & (1 << creation["EXPLICIT_BATCH"]):
                self.errors, self.num_errors = ["the ONNX parser needs an explicit-batch network"], 1
                return False
            model = onnx.load(path)
            inferred = onnx.shape_inference.infer_shapes(model).graph
            dtypes = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
            layers = [layer_class(n, dtypes, strongly_typed(self.network.flags)) for n in model.graph.node]
            self.network.__dict__.update(layers=layers, num_layers=len(layers), get_layer=layers.__getitem__,
                                         onnx_bytes=model.SerializeToString())
            return True

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.shapes, self.profiling_verbosity = set(), set(), None, None

        def set_memory_pool_limit(self, pool, nbytes):
            assert pool == "workspace" and nbytes > 0

        def set_flag(self, flag):
            assert flag in vars(trt.BuilderFlag).values()
            self.flags.add(flag)

        def clear_flag(self, flag):
            assert flag in vars(trt.BuilderFlag).values()
            self.cleared.add(flag)

        def create_timing_cache(self, data):
            return ns(serialize=lambda: data + b"+")

        def add_optimization_profile(self, profile):
            self.shapes = profile.shapes

        def set_timing_cache(self, cache, ignore_mismatch):
            self.get_timing_cache = lambda: cache
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            assert flags < 1 << len(creation), f"unknown network creation flags {flags:b} for TensorRT {version}"
            return ns(flags=flags, layers=[])

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = ns(shapes=None)
            profile.set_shape = lambda name, lo, opt, hi: setattr(profile, "shapes", [list(lo), list(opt), list(hi)])
            return profile

        def build_serialized_network(self, network, config):
            if strongly_typed(network.flags) and config.flags & {"FP16", "INT8"}:
                self.logger.log(severity.ERROR, "precision builder flags are not allowed in a strongly typed network")
                return None
            trt.built = {"flags": config.flags, "cleared": config.cleared, "network_flags": network.flags,
                         "strong": strongly_typed(network.flags),
                         "pinned": [layer.name for layer in network.layers if getattr(layer, "precision", None)]}
            return json.dumps({"shapes": config.shapes, "noise": noise}).encode() + b"\n" + network.onnx_bytes

    def tensor_info(fmt: str) -> dict:
        if major >= 11:
            return {"DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}
        return {"Format/Datatype": fmt}

    class Engine:
        def __init__(self, data):
            header, model = data.split(b"\n", 1)
            self.meta = json.loads(header)
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.names = ["audio"] + [o.name for o in self.session.get_outputs()]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return "input" if name == "audio" else "output"

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_profile_shape(self, name, index):
            assert name == "audio" and index == 0
            return self.meta["shapes"]

        def create_execution_context(self):
            return Context(self)

        def create_engine_inspector(self):
            return Inspector(self)

    class Inspector:
        __slots__ = ("engine", "execution_context")

        def __init__(self, engine):
            self.engine, self.execution_context = engine, None

        def get_engine_information(self, fmt):
            assert fmt == "json" and self.execution_context is not None
            layers = [{"Name": n, "Outputs": [tensor_info("Row major linear FP32")]} for n in self.engine.names[1:]]
            io = {"I/O Tensors": [{"Name": n} for n in self.engine.names]} if major >= 11 else {
                "Bindings": self.engine.names}
            return json.dumps({"Layers": layers, **io})

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shape, self.outputs = engine, {}, None, {}

        def _run(self, audio):
            return dict(zip(self.engine.names[1:], self.engine.session.run(self.engine.names[1:], {"audio": audio})))

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            self.outputs = self._run(np.zeros(self.shape, np.float32))
            return True

        def get_tensor_shape(self, name):
            return self.outputs[name].shape

        def set_tensor_address(self, name, address):
            assert isinstance(address, int) and address, f"{name}: a device pointer, got {address!r}"
            self.addresses[name] = address

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int), f"execute_async_v3 takes an int stream handle, got {stream_handle!r}"
            audio = (ctypes.c_float * int(np.prod(self.shape))).from_address(self.addresses["audio"])
            for name, value in self._run(np.ctypeslib.as_array(audio).reshape(self.shape).copy()).items():
                value = np.ascontiguousarray(value + self.engine.meta["noise"], dtype=np.float32)
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, lambda logger: ns(deserialize_cuda_engine=Engine)
    return trt
