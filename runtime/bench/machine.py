"""Facts about the machine a bench runs on (no torch): CPU, ISA flags, versions, BLAS overrides, numpy's GEMM.

numpy's fp32 GEMM rate: float32 matmul of square matrices (1024-2048) in a fresh subprocess with the same
thread count and without the OpenBLAS/MKL kernel overrides, best of a few (gemm_limits.py sets it beside
ONNX Runtime's and OpenVINO's own MatMul to make the limit).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata

from ..backends import ISA_FLAGS, BackendUnavailable, import_onnxruntime, read_cpuinfo

# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU model, cores, ISA flags, runtime versions, Jetson power mode where present."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "logical_cpus": os.cpu_count()}
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        info["cpus_available"] = os.cpu_count()
    model, flags, cores = read_cpuinfo()
    info["cpu_model"] = model or platform.processor() or None
    info["physical_cores"] = cores
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
