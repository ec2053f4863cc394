"""The machine and its physical limit, measured where the model runs (no torch).

- FLOPs per clip, counted from the bundle's ONNX graph at the clip's real shapes: one ONNX Runtime
  run of model.onnx with graph optimisations off and profiling on records the input and output shape
  of every node; MatMul / Gemm count 2*M*N*K (batched over leading dims) and Conv counts
  2 * output elements * (C_in / groups) * kernel size. Element-wise ops, softmax and norms are not
  counted (they are < 1 % of a transformer's work), so this is the GEMM work a perfect kernel must do.
- this machine's fp32 GEMM rate: numpy float32 matmul of square matrices (1024-2048) in a fresh
  subprocess with the same thread count and without the OpenBLAS/MKL kernel overrides, best of a few
  (`gemm_limits.py` sets it beside ONNX Runtime's own MatMul to make the limit).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .backend_protocol import BackendUnavailable
from .backends import import_onnxruntime

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul")
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU model, cores, ISA flags, runtime versions, Jetson power mode where present."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "logical_cpus": os.cpu_count()}
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        info["cpus_available"] = os.cpu_count()
    model, flags, cores = None, set(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    physical = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model") and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    info["cpu_model"] = model or platform.processor() or None
    info["physical_cores"] = len(cores) or None
    info["isa"] = {flag: flag in flags for flag in ISA_FLAGS} if flags else {}
    for package in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
        try:
            info[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"{package}_version"] = None
    if info.get("tensorrt_version") is None:
        try:
            import tensorrt  # noqa: F401  (Jetson: the system's TensorRT has no pip metadata)

            info["tensorrt_version"] = tensorrt.__version__
        except Exception:
            pass
    try:
        ort = import_onnxruntime()
        info["onnxruntime_providers"] = ort.get_available_providers()
    except BackendUnavailable:
        info["onnxruntime_providers"] = []
    info["jetson_power_mode"] = _nvpmodel()
    return info


def _nvpmodel() -> str | None:
    try:
        done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


_GEMM_CODE = """
import json, os, sys, time, numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
c = a @ b
best = float("inf")
for _ in range(repeats):
    t = time.perf_counter(); c = a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps({"gflops": 2.0 * n ** 3 / best / 1e9,
                  "blas_env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "MKL_"))}}))
"""

# Variables that force a BLAS library's kernel or cache-size choice instead of letting it read the CPU
# (set on shared machines for old OpenBLAS builds). OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU halves
# numpy's GEMM rate, and ONNX Runtime (MLAS) ignores them, so a limit measured under them is no limit.
MKL_OVERRIDES = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR")


def blas_overrides(env: dict[str, str] | None = None) -> dict[str, str]:
    """The BLAS kernel / cache overrides in `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if (k.startswith("OPENBLAS_") and k != "OPENBLAS_NUM_THREADS") or k in MKL_OVERRIDES}


def thread_env(threads: int | None, *, keep_blas_overrides: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if not keep_blas_overrides:
        for name in blas_overrides(env):
            del env[name]
    if threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
            env[name] = str(threads)
    return env


def gemm_gflops(threads: int | None, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, *,
                keep_blas_overrides: bool = False) -> dict:
    """fp32 GEMM GFLOP/s of numpy with `threads` BLAS threads (fresh process, so the count applies).

    The child runs without the BLAS overrides of `blas_overrides()` unless `keep_blas_overrides`, and
    reports the OPENBLAS_* / MKL_* variables it really saw (`child_blas_env`).
    """
    results, child_env = {}, None
    env = thread_env(threads, keep_blas_overrides=keep_blas_overrides)
    for n in sizes:
        done = subprocess.run([sys.executable, "-c", _GEMM_CODE, str(n), str(repeats)], capture_output=True,
                              text=True, env=env, timeout=300)
        if done.returncode == 0:
            out = json.loads(done.stdout.strip().splitlines()[-1])
            results[str(n)] = out["gflops"]
            child_env = out["blas_env"]
    best = max(results.values()) if results else None
    how = "numpy float32 square matmul, best of repeats, fresh process with *_NUM_THREADS set"
    return {"gflops": best, "per_size": results, "threads": threads, "repeats": repeats,
            "blas_overrides_removed": {} if keep_blas_overrides else blas_overrides(),
            "child_blas_env": child_env,
            "how": how + ("" if keep_blas_overrides else " and the BLAS kernel overrides removed")}


# ---------------------------------------------------------------------------------------------- FLOPs


def count_flops(model_path: Path, audio: np.ndarray) -> dict:
    """GEMM/Conv FLOPs of one run of `model_path` on `audio`, from ONNX Runtime's per-node shapes."""
    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "flops")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        session.run(None, {"audio": np.ascontiguousarray(audio, dtype=np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    conv = _conv_attributes(model_path)
    by_op: dict[str, float] = {}
    shapes: dict[tuple[int, int, int], float] = {}  # (M, K, N) of activation x weight GEMMs -> FLOPs
    seen: set[str] = set()
    for event in events:
        args = event.get("args", {})
        op = args.get("op_name")
        if event.get("cat") != "Node" or op is None or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event["name"] in seen:
            continue
        seen.add(event["name"])
        ins = [_shape(x) for x in args.get("input_type_shape", [])]
        outs = [_shape(x) for x in args.get("output_type_shape", [])]
        flops = _node_flops(op, ins, outs, conv.get(event["name"][: -len("_kernel_time")]))
        if flops:
            by_op[op] = by_op.get(op, 0.0) + flops
            mkn = _weight_gemm_shape(op, ins, outs)
            if mkn:
                shapes[mkn] = shapes.get(mkn, 0.0) + flops
    ranked = sorted(shapes.items(), key=lambda item: -item[1])
    return {"flops": sum(by_op.values()), "by_op": by_op, "batch": int(audio.shape[0]),
            "samples": int(audio.shape[1]),
            "gemm_shapes": [{"m": m, "k": k, "n": n, "flops": f} for (m, k, n), f in ranked],
            "how": "ONNX Runtime profile of model.onnx (no graph optimisation) at the clip's shapes; "
                   "MatMul/Gemm 2*M*N*K, Conv 2*out*Cin/groups*kernel; element-wise ops not counted"}


def _shape(entry: dict) -> list[int]:
    return list(next(iter(entry.values()))) if entry else []


def _conv_attributes(model_path: Path) -> dict[str, tuple[int, list[int]]]:
    """(groups, kernel shape) per Conv node: the profile leaves out initializer (weight) shapes."""
    try:
        import onnx
    except ImportError:
        return {}
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in CONV_OPS:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = weights.get(node.input[1] if node.op_type != "QLinearConv" else node.input[3])
            kernel = list(attrs.get("kernel_shape") or (w[2:] if w else []))
            found[node.name] = (int(attrs.get("group", 1)), kernel)
    return found


def _weight_gemm_shape(op: str, ins: list[list[int]], outs: list[list[int]]) -> tuple[int, int, int] | None:
    """(M, K, N) of a MatMul / Gemm by a 2-D (weight) matrix, leading dims folded into M; None otherwise.

    The profile lists no initializer, so a MatMul with one listed input multiplies by a weight."""
    out = outs[0]
    if op == "MatMul" and (len(ins) == 1 or len(ins[1]) == 2) and len(out) >= 2:
        return int(np.prod(out[:-1])), int(ins[0][-1]), int(out[-1])
    if op == "Gemm" and len(ins[0]) == 2 and len(out) == 2:
        k = ins[0][1] if ins[0][0] == out[0] else ins[0][0]
        return int(out[0]), int(k), int(out[1])
    return None


def _node_flops(op: str, ins: list[list[int]], outs: list[list[int]], conv: tuple | None = None) -> float:
    """2*M*N*K for MatMul/Gemm (K = last dim of A), 2*out*Cin/groups*kernel for Conv."""
    if not outs or not outs[0] or not ins or not ins[0]:
        return 0.0
    out = outs[0]
    if op in MATMUL_OPS:
        k = ins[0][-1]
        if op == "Gemm" and len(ins[0]) == 2 and len(out) == 2:
            k = ins[0][1] if ins[0][0] == out[0] else ins[0][0]  # transA is not in the profile
        return 2.0 * float(np.prod(out)) * k
    if op in CONV_OPS and conv is not None:
        groups, kernel = conv
        return 2.0 * float(np.prod(out)) * (ins[0][1] / groups) * float(np.prod(kernel))
    return 0.0
