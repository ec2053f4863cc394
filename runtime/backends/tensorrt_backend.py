"""The TensorRT backend: a bundle's engine for this GPU, run with cuda-python (no pycuda, no torch).

The rules that say which engine file may run here are in tensorrt_engines.py. tensorrt and cuda-python are
imported only when a backend is made.

cuda-python renamed its modules in 12.6.1 (`cuda.cudart` -> `cuda.bindings.runtime`) and 13.0
dropped the old names; both are tried. One non-default stream; device buffers and pinned host
buffers per I/O tensor, reused across calls and grown when a bigger shape arrives. Which call
exists in which TensorRT / cuda-python release, with the source of each rule: docs/jetson.md,
"API rules by version".
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np

from .gpu import nvidia_gpu_missing
from .tensorrt_engines import Profile, TensorRTUnavailable, rebuild_command, select_engine

ON_JETSON = Path("/etc/nv_tegra_release").exists()
DESKTOP_TENSORRT = ("pip install 'edgeenc[tensorrt]' (CUDA 13 driver, r580+), or 'edgeenc[tensorrt-cu12]' on a "
                    "CUDA 12 driver")
JETSON_TENSORRT = ("use JetPack's TensorRT (sudo apt install nvidia-jetpack, which brings python3-libnvinfer) from a "
                   "venv made with --system-site-packages, never a pip wheel (docs/jetson.md)")


# The name-based tensor API (num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3) that
# the backend uses exists from TensorRT 8.5 (NVIDIA/TensorRT@release/8.6:python/docstrings/infer/pyCoreDoc.h);
# 8.6 is JetPack 6.0's. 12.x is unknown: refused rather than guessed at.
OLDEST_TENSORRT, NEWEST_TENSORRT_MAJOR = (8, 5), 11


def tensorrt_version(trt) -> tuple[int, int]:
    """(major, minor) of an imported tensorrt module."""
    major, minor = (re.findall(r"\d+", str(trt.__version__)) + ["0", "0"])[:2]
    return int(major), int(minor)


def cuda_python_version() -> str | None:
    """The installed cuda-bindings (13.x, 12.6.1+) or cuda-python (older 12.x) release, for messages."""
    from importlib import metadata

    for name in ("cuda-bindings", "cuda-python"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def import_cudart():
    """cuda-python's runtime module under its 12.6.1+ name or its older one; None if not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6.1
        except ImportError:
            return None
    return cudart


def _cuda(result):
    """Unwrap a cuda-python (err, value...) tuple, raising on any error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else None


def _handle(obj) -> int:
    """A raw handle for TensorRT; cuda-python 13 deprecates int() on its objects."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def require_tensorrt():
    """(tensorrt, cudart) modules, or TensorRTUnavailable naming everything that is missing."""
    problems = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        hints = [f"on a desktop GPU {DESKTOP_TENSORRT}", f"on Jetson {JETSON_TENSORRT}"]
        hints = hints[::-1] if ON_JETSON else hints
        problems.append("the tensorrt Python package is not installed: " + "; ".join(hints))
    else:
        version = tensorrt_version(trt)
        if version < OLDEST_TENSORRT or version[0] > NEWEST_TENSORRT_MAJOR:
            problems.append(f"TensorRT {trt.__version__} is not supported: edgeenc runs TensorRT 8.5 to "
                            f"{NEWEST_TENSORRT_MAJOR}.x (docs/jetson.md)")
    cudart = import_cudart()
    if cudart is None:
        problems.append("cuda-python is not installed (device memory and streams): pip install 'cuda-python>=13,<14' "
                        "on a CUDA 13 driver, 'cuda-python>=12.2,<13' on CUDA 12 / JetPack 6")
    else:
        try:
            count = _cuda(cudart.cudaGetDeviceCount())
        except RuntimeError as exc:
            count, detail = 0, str(exc)
        else:
            detail = "cudaGetDeviceCount() is 0"
        if not count and "InsufficientDriver" in detail:
            # cuda-bindings 13 links the CUDA 13 runtime statically and needs an r580+ driver
            # (nvidia.github.io/cuda-python: cuda-bindings 13.0.3 and 13.2.0 release notes).
            problems.append(f"cuda-python {cuda_python_version()} needs a newer NVIDIA driver than this machine's "
                            f"({detail}): on a CUDA 12 driver (JetPack 6 included) pip install 'cuda-python>=12.2,<13'")
        elif not count:
            problems.append(f"no CUDA GPU is visible ({detail}); TensorRT builds and runs engines on NVIDIA GPUs only")
    if problems:
        no_gpu = nvidia_gpu_missing()  # said first: on a laptop the rest is not what needs fixing
        raise TensorRTUnavailable("TensorRT cannot run here: " + "; ".join([no_gpu, *problems] if no_gpu else problems),
                                  not_installed=trt is None)
    return trt, cudart


def gpu_identity(cudart, device: int = 0) -> dict:
    """Name, compute capability and size of a GPU: what an engine is bound to."""
    prop = _cuda(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "name": name.split("\x00")[0].strip(),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "multiprocessors": int(prop.multiProcessorCount),
        "total_memory_bytes": int(prop.totalGlobalMem),
        "integrated": bool(prop.integrated),
    }


class _IOBuffer:
    """Device memory and pinned host memory for one I/O tensor, grown on demand."""

    def __init__(self, cudart, dtype) -> None:
        self.cudart, self.dtype = cudart, np.dtype(dtype)
        self.capacity, self.device, self.host_ptr, self.host = 0, 0, 0, None

    def reserve(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        nbytes = max(count, 1) * self.dtype.itemsize
        if nbytes > self.capacity:
            self.free()
            self.device = _cuda(self.cudart.cudaMalloc(nbytes))
            self.host_ptr = _cuda(self.cudart.cudaMallocHost(nbytes))
            self.capacity = nbytes
            raw = (ctypes.c_byte * nbytes).from_address(self.host_ptr)
            self.host = np.ctypeslib.as_array(raw).view(self.dtype)
        return self.host[:count].reshape(shape)

    def free(self) -> None:
        if self.capacity:
            self.cudart.cudaFree(self.device)
            self.cudart.cudaFreeHost(self.host_ptr)
        self.capacity, self.device, self.host_ptr, self.host = 0, 0, 0, None


class TensorRTBackend:
    """One engine, one execution context and one stream: audio [B, N] float32 -> named outputs."""

    name = "trt"
    best_batch: int | None = None  # set by selection.py from the bundle's measured sweep

    def __init__(self, engine_path: Path, output_names: list[str], sample_rate: int, *, sidecar: dict | None = None,
                 bundle: Path | None = None) -> None:
        trt, cudart = require_tensorrt()
        self._trt, self._cudart, self._stream, self._buffers = trt, cudart, None, {}
        engine_path = Path(engine_path)
        self._rebuild = rebuild_command(bundle or engine_path.parent.parent, sidecar)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} could not load {engine_path} (made by another "
                                      f"TensorRT version or GPU?); rebuild with `{self._rebuild}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = [n for n in output_names if n not in self._outputs]
        if "audio" not in names or missing:
            raise TensorRTUnavailable(f"{engine_path.name} does not have the bundle's I/O (input audio, outputs "
                                      f"{output_names}; missing {missing}); rebuild with `{self._rebuild}`")
        self.output_names = list(output_names)
        low, opt, high = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape("audio", 0))
        notes = tuple((sidecar or {}).get("profile", {}).get("notes", ()))
        self.profile = Profile(int(sample_rate), low, opt, high, notes)
        self._buffers = {n: _IOBuffer(cudart, trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = _cuda(cudart.cudaStreamCreate())
        gpu = (sidecar or {}).get("gpu") or gpu_identity(cudart)
        precision = (sidecar or {}).get("precision", "unknown-precision")
        self.variant = f"{engine_path.name} on TensorRT {precision}"
        self.description = (f"TensorRT {trt.__version__} {precision} engine {engine_path.name} on {gpu['name']} "
                            f"(compute capability {gpu['compute_capability']}), {self.profile.describe()}")

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: dict, output_names: list[str]) -> TensorRTBackend:
        """The bundle's engine for this GPU and TensorRT version; BackendUnavailable says why there is none."""
        trt, cudart = require_tensorrt()
        engine, sidecar = select_engine(Path(bundle), manifest, gpu_identity(cudart), trt.__version__)
        return cls(engine, output_names, int(manifest["sample_rate"]), sidecar=sidecar, bundle=Path(bundle))

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if not self.profile.contains(audio.shape):
            raise ValueError(f"audio of shape {list(audio.shape)} is outside this engine's profile "
                             f"({self.profile.describe()}); pass smaller batches or shorter windows, or rebuild "
                             f"with a wider profile (`{self._rebuild}` with other --max-batch / --max-seconds)")
        cudart, stream, context = self._cudart, self._stream, self.context
        context.set_input_shape("audio", audio.shape)
        staged = self._buffers["audio"]
        staged.reserve(audio.shape)[...] = audio
        _cuda(cudart.cudaMemcpyAsync(staged.device, staged.host_ptr, audio.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        context.set_tensor_address("audio", staged.device)
        views = {}
        for name in self._outputs:
            views[name] = self._buffers[name].reserve(tuple(int(d) for d in context.get_tensor_shape(name)))
            context.set_tensor_address(name, self._buffers[name].device)
        if not context.execute_async_v3(_handle(stream)):
            raise RuntimeError(f"TensorRT failed to run the engine on audio of shape {list(audio.shape)}")
        for name in self._outputs:
            _cuda(cudart.cudaMemcpyAsync(self._buffers[name].host_ptr, self._buffers[name].device,
                                         views[name].nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _cuda(cudart.cudaStreamSynchronize(stream))
        return {name: views[name].astype(np.float32, copy=True) for name in self.output_names}

    def layer_information(self, shape: tuple[int, int]) -> str:
        """The engine inspector's JSON at `shape` (dynamic shapes report 'N/A' without a context)."""
        self.context.set_input_shape("audio", tuple(shape))
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        self.context = None
        self.engine = None
        for buffer in self._buffers.values():
            buffer.free()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
