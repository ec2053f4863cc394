"""The GEMM limit a bench row is measured against: what this machine's best GEMM kernels reach here, now.

Each limit is the best of several candidates, each recorded with the kernel that ran it where the library
says (OpenVINO's per-node exec type, oneDNN's verbose implementation name): on a CPU with AMX tiles the
bf16 and int8 limits must come from AMX kernels, or an AMX-using row would run "above its limit". bf16:
OpenVINO's bf16 MatMul and, where torch is installed, torch's bf16 matmul (oneDNN brgemm; on Sapphire Rapids
twice OpenVINO's FullyConnected rate, benchmarks/sapphire-rapids-amx/), run in a child process so that the
runtime never imports torch. int8: ONNX Runtime's MatMulInteger (MLAS, AMX where present) and torch's
`_int_mm`.

fp32: the best of numpy (OpenBLAS, in a fresh process without the OPENBLAS_* / MKL_* kernel overrides,
see `machine.gemm_gflops`) and ONNX Runtime's own MatMul (MLAS, the kernel the model runs on) on the
model's most expensive weight GEMM shapes and on a large square, at the bench's thread count. Both are
reported, with the winner. int8: ONNX Runtime's MatMulInteger (u8 activations x the weight type the
bundle's int8 files use) on the same shapes, where the CPU has VNNI or the bundle has int8 rows. bf16:
ONNX Runtime's bf16 MatMul where the CPU has bf16 dot products; its CPU provider has no such kernel
today, so OpenVINO's bf16 MatMul (oneDNN, the kernels the openvino:bf16 rows run on) gives it where
OpenVINO is installed, and the report says so otherwise. OpenVINO's f32 MatMul joins the fp32
candidates too (its rows run on those kernels, not on OpenBLAS or MLAS).

The one-node ONNX models are written here as protobuf bytes (a few fields of onnx.proto) because the
runtime depends on onnxruntime only, not on the onnx package.
numpy's probe is `machine.gemm_gflops`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np

from ..backends import (
    AMX_FLAGS,
    BF16_FLAGS,
    VNNI_FLAGS,
    BackendUnavailable,
    compile_config,
    cpu_flags,
    import_onnxruntime,
    import_openvino,
    int8_weight_type,
)
from .machine import blas_overrides, gemm_gflops, thread_env

BF16_LIMIT_FLAGS = (*BF16_FLAGS, "bf16")  # "bf16" is the ARM (aarch64) feature name
SQUARE = 2048
MODEL_SHAPES = 3  # the model's most expensive weight GEMM shapes probed (they hold most of its FLOPs)

# onnx.proto TensorProto.DataType values
FLOAT, UINT8, INT8, INT32, BFLOAT16 = 1, 2, 3, 6, 16
NUMPY_TYPES = {FLOAT: np.float32, UINT8: np.uint8, INT8: np.int8}


# ---------------------------------------------------------------------------------------------- protobuf


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)  # TensorShapeProto.dim { dim_value }
    tensor_type = _field(1, elem_type) + _field(2, dims)
    return _field(1, name) + _field(2, _field(1, tensor_type))  # ValueInfoProto { name, type { tensor_type } }


def _initializer(name: str, elem_type: int, array: np.ndarray) -> bytes:
    dims = b"".join(_field(1, d) for d in array.shape)
    return dims + _field(2, elem_type) + _field(8, name) + _field(9, np.ascontiguousarray(array).tobytes())


def matmul_model(m: int, k: int, n: int, a_type: int, b: np.ndarray, b_type: int) -> bytes:
    """A one-node ONNX model: MatMul (float types) or MatMulInteger (8-bit types) of input a [m, k] by the
    constant b [k, n], so ONNX Runtime pre-packs b as it does a model's weights."""
    integer = a_type in (UINT8, INT8)
    op, inputs, inits = "MatMul", ["a", "b"], [_initializer("b", b_type, b)]
    if integer:
        op, inputs = "MatMulInteger", [*inputs, "a_zero", "b_zero"]
        inits += [_initializer("a_zero", a_type, np.array(128, NUMPY_TYPES[a_type])),
                  _initializer("b_zero", b_type, np.array(0, NUMPY_TYPES[b_type]))]
    node = b"".join(_field(1, i) for i in inputs) + _field(2, "c") + _field(4, op)
    graph = (_field(1, node) + _field(2, "gemm_limit") + b"".join(_field(5, i) for i in inits)
             + _field(11, _value_info("a", a_type, (m, k))) + _field(12, _value_info("c", INT32 if integer
                                                                                   else a_type, (m, n))))
    opset = _field(1, "") + _field(2, 17)
    return _field(1, 8) + _field(2, "edgeenc") + _field(7, graph) + _field(8, opset)


# ---------------------------------------------------------------------------------------------- probes


def _best_seconds(run, repeats: int, min_total: float = 0.05) -> float:
    """Best single-run time of `run` over `repeats` runs, more for tiny shapes (timer noise)."""
    run()
    best, total, count = float("inf"), 0.0, 0
    while count < repeats or (total < min_total and count < 200):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, total, count = min(best, elapsed), total + elapsed, count + 1
    return best


def ort_gemm_gflops(shape: tuple[int, int, int], precision: str, threads: int | None, repeats: int = 5,
                    weights: str = "s8") -> float:
    """GFLOP/s of ONNX Runtime CPU's MatMul (fp32, bf16) or MatMulInteger (int8, u8 x `weights`)."""
    ort = import_onnxruntime()
    m, k, n = shape
    rng = np.random.default_rng(0)
    if precision == "int8":
        a_type, b_type = UINT8, (INT8 if weights == "s8" else UINT8)
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b = rng.integers(-128, 128, (k, n)).astype(NUMPY_TYPES[b_type])
    else:
        a_type = b_type = FLOAT if precision == "fp32" else BFLOAT16
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        if precision == "bf16":  # bf16 is the upper half of an fp32: numpy has no bf16 dtype
            a, b = [(x.view(np.uint32) >> 16).astype(np.uint16) for x in (a, b)]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(matmul_model(m, k, n, a_type, b, b_type), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"a": a}
    seconds = _best_seconds(lambda: session.run(None, feed), repeats)
    return 2.0 * m * k * n / seconds / 1e9


def openvino_gemm(shape: tuple[int, int, int], precision: str, threads: int | None, repeats: int = 5
                  ) -> tuple[float, str | None]:
    """(GFLOP/s, kernel) of OpenVINO's CPU plugin on one MatMul with constant weights (as in the model),
    compiled as the openvino:* variants are; the kernel is the plugin's exec type for the MatMul node (e.g.
    brgemm_avx512_amx_bf16), read from a second, profiled compile so that profiling does not slow the timing."""
    ov = import_openvino()
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = ov.opset13.parameter([m, k], ov.Type.f32, name="a")
    weights = ov.opset13.constant(rng.standard_normal((k, n)).astype(np.float32))
    model = ov.Model([ov.opset13.matmul(a, weights, False, False)], [a], "gemm_limit")
    core, config = ov.Core(), compile_config(precision, threads)
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = rng.standard_normal((m, k)).astype(np.float32)
    seconds = _best_seconds(lambda: request.infer({0: x}), repeats)
    profiled = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    profiled.infer({0: x})
    kernels = [i.exec_type for i in profiled.profiling_info if i.node_type in ("FullyConnected", "MatMul")]
    return 2.0 * m * k * n / seconds / 1e9, (kernels[0] if kernels else None)


# ---------------------------------------------------------------------------------------------- torch (child)

TORCH_PROBE_MODULE = "edgeenc.export.torch_gemm"  # run as `python -m` in a child: torch never enters this process


def onednn_kernels(lines: list[str]) -> list[str]:
    """The implementation names of oneDNN's verbose "exec" lines (`onednn_verbose,[v1,primitive,]exec,cpu,
    <primitive>,<implementation>,...`), e.g. brg_matmul:avx10_1_512_amx."""
    found = []
    for line in lines:
        parts = line.strip().split(",")
        if not parts or parts[0] not in ("onednn_verbose", "dnnl_verbose") or "exec" not in parts:
            continue
        at = parts.index("exec")
        if len(parts) > at + 3 and parts[at + 1] == "cpu":
            found.append(f"{parts[at + 2]} {parts[at + 3]}".strip())
    return found


def parse_torch_probe(stdout: str) -> dict:
    """The torch child's report: per precision its rates per shape, best, and the oneDNN kernel it ran."""
    lines = stdout.splitlines()
    result = next((json.loads(line[len("RESULT "):]) for line in reversed(lines) if line.startswith("RESULT ")), None)
    if result is None:
        raise ValueError("the torch GEMM probe printed no RESULT line")
    kernels, current = {}, None
    for line in lines:
        if line.startswith("KERNEL "):
            current, kernels[line.split()[1]] = line.split()[1], []
        elif line.startswith("END"):
            current = None
        elif current:
            kernels[current].append(line)
    report = {"torch": result.get("torch"), "threads": result.get("threads")}
    for precision in ("bf16", "int8"):
        entry = result.get(precision) or {}
        per_shape = entry.get("per_shape") or {}
        if not per_shape:
            report[precision] = {"gflops": None, "why": entry.get("why") or "no shape ran"}
            continue
        best = max(per_shape, key=per_shape.get)
        names = onednn_kernels(kernels.get(precision, []))
        report[precision] = {"gflops": per_shape[best], "best_shape": best, "per_shape": per_shape,
                             "kernel": "oneDNN " + names[0] if names else "not oneDNN (no verbose line)"}
    return report


def torch_installed() -> bool:
    """Whether torch can be imported here, found without importing it (the runtime never imports torch)."""
    return importlib.util.find_spec("torch") is not None


def torch_gemm_probe(shapes: list[tuple[int, int, int]], threads: int | None, repeats: int = 5) -> dict | None:
    """torch's bf16 matmul and int8 `_int_mm` rates on `shapes`, measured in a child process (the runtime never
    imports torch), with the oneDNN kernel each ran; None where torch is not installed."""
    if not torch_installed():
        return None
    done = subprocess.run([sys.executable, "-m", TORCH_PROBE_MODULE, json.dumps(shapes), str(repeats),
                           str(threads or 0)], capture_output=True, text=True, env=thread_env(threads), timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": f"the torch GEMM probe failed: {last[:200]}"}
    return parse_torch_probe(done.stdout)


def _best_over(shapes: list[tuple[int, int, int]], run) -> dict:
    """The best of `run(shape)` -> (GFLOP/s, kernel or None) over `shapes`, with every shape's rate."""
    runs = {"x".join(map(str, s)): run(s) for s in shapes}
    best = max(runs, key=lambda k: runs[k][0])
    return {"gflops": runs[best][0], "best_shape": best, "per_shape": {k: v[0] for k, v in runs.items()},
            "kernel": runs[best][1]}


def _ort_probe(shapes: list[tuple[int, int, int]], precision: str, threads: int | None, weights: str) -> dict:
    return _best_over(shapes, lambda s: (ort_gemm_gflops(s, precision, threads, weights=weights), None))


def _openvino_probe(shapes: list[tuple[int, int, int]], precision: str, threads: int | None) -> dict | None:
    """The best OpenVINO MatMul rate over `shapes` at `precision` with its kernel, or None where OpenVINO is not
    installed."""
    try:
        probe = _best_over(shapes, lambda s: openvino_gemm(s, precision, threads))
    except BackendUnavailable:
        return None
    return {**probe, "kernel": f"OpenVINO {probe['kernel']}" if probe["kernel"] else None}


def best_candidate(candidates: dict[str, dict | None]) -> dict | None:
    """The fastest of `candidates` ({name: probe with gflops, best_shape, kernel}), with every candidate's figures
    kept and "winner" = name and shape; None where none ran."""
    ran = {name: c for name, c in candidates.items() if c and c.get("gflops")}
    if not ran:
        return None
    name = max(ran, key=lambda n: ran[n]["gflops"])
    best = ran[name]
    return {**best, "winner": f"{name} {best.get('best_shape', '')}".strip(),
            "candidates": {n: {k: c.get(k) for k in ("gflops", "best_shape", "kernel", "why")} if c else None
                           for n, c in candidates.items()}}


def probe_shapes(gemm_shapes: list[dict]) -> list[tuple[int, int, int]]:
    """The model's most expensive weight GEMM shapes (M x K x N) and a large square."""
    found = [(s["m"], s["k"], s["n"]) for s in gemm_shapes[:MODEL_SHAPES]]
    return [*found, (SQUARE, SQUARE, SQUARE)]


def measure_limits(threads: int | None, gemm_shapes: list[dict], *, int8_rows: bool = False,
                   int8_weights: str | None = None, compare_overrides: bool = True) -> dict:
    """fp32 (and, where they apply, int8 and bf16) GEMM limits of this machine, each with how it was found:
    the winning candidate, its kernel, every candidate's figures, and the CPU's AMX flags ("amx")."""
    flags = cpu_flags() or set()
    shapes = probe_shapes(gemm_shapes)
    numpy_clean = gemm_gflops(threads)
    ort_fp32 = _ort_probe(shapes, "fp32", threads, "s8")
    fp32 = {"numpy": numpy_clean, "onnxruntime": ort_fp32, "how": "best of numpy (overrides removed) and "
            "onnxruntime MatMul on the model's GEMM shapes and a large square, same thread count"}
    if (numpy_clean["gflops"] or 0.0) >= ort_fp32["gflops"]:
        fp32.update(gflops=numpy_clean["gflops"], winner="numpy")
    else:
        fp32.update(gflops=ort_fp32["gflops"], winner=f"onnxruntime MatMul {ort_fp32['best_shape']}")
    ov_fp32 = _openvino_probe(shapes, "fp32", threads)  # OpenVINO's rows run on its own (oneDNN) kernels
    if ov_fp32:
        fp32["openvino"] = ov_fp32
        fp32["how"] += "; and OpenVINO's MatMul where it is installed"
        if ov_fp32["gflops"] > fp32["gflops"]:
            fp32.update(gflops=ov_fp32["gflops"], winner=f"openvino MatMul f32 {ov_fp32['best_shape']}")
    limits: dict = {"fp32": fp32, "blas_overrides": blas_overrides(), "threads": threads,
                    "shapes": ["x".join(map(str, s)) for s in shapes]}
    if limits["blas_overrides"] and compare_overrides:  # what they cost numpy: why they were removed
        limits["numpy_with_overrides"] = gemm_gflops(threads, keep_blas_overrides=True)
    vnni = any(f in flags for f in VNNI_FLAGS)
    bf16 = any(f in flags for f in BF16_LIMIT_FLAGS)
    limits["amx"] = sorted(f for f in AMX_FLAGS if f in flags)
    torch_probe = None
    if vnni or int8_rows or bf16:
        torch_probe = torch_gemm_probe(shapes, threads)
        limits["torch_probe"] = ({k: v for k, v in torch_probe.items() if k not in ("bf16", "int8")}
                                 if torch_probe else {"why": "torch is not installed here"})
    torch_ran = bool(torch_probe) and "error" not in torch_probe
    if vnni or int8_rows:
        weights = int8_weights or int8_weight_type()[0]
        ort = {**_ort_probe(shapes, "int8", threads, weights),
               "why": "ONNX Runtime's MLAS names no kernel (it picks AMX, VNNI or AVX2 code by CPU feature)"}
        candidates = {f"onnxruntime MatMulInteger u8 x {weights}": ort}
        if torch_ran:
            candidates["torch _int_mm s8 x s8"] = torch_probe["int8"]
        limits["int8"] = {**best_candidate(candidates), "vnni": vnni, "weights": weights}
    if bf16:
        candidates: dict[str, dict | None] = {}
        try:
            candidates["onnxruntime MatMul bf16"] = _ort_probe(shapes, "bf16", threads, "s8")
            ort_why = None
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a missing kernel
            ort_why = ("onnxruntime could not run a bf16 MatMul on its CPU provider (no kernel): "
                       + str(exc).splitlines()[0][:160])
        candidates["openvino MatMul bf16"] = _openvino_probe(shapes, "bf16", threads)
        if torch_ran:
            candidates["torch matmul bf16"] = torch_probe["bf16"]
        best = best_candidate(candidates)
        if best:
            limits["bf16"] = best
            if ort_why:
                limits["bf16"]["onnxruntime"] = ort_why
        else:
            limits["bf16"] = {"gflops": None, "why": (ort_why or "no bf16 kernel ran") + "; neither OpenVINO (the "
                              "bf16 rows' engine) nor torch is installed"}
    return limits


def merge_limits(before: dict, after: dict) -> dict:
    """The higher of two measurements of each limit (load on the machine only ever lowers one)."""
    merged = {**before, **after}  # numpy_with_overrides is measured before only
    for key in ("fp32", "int8", "bf16"):
        runs = [r for r in (before.get(key), after.get(key)) if r]
        if runs:
            best = max(runs, key=lambda r: r.get("gflops") or 0.0)
            merged[key] = {**best, "before_gflops": (before.get(key) or {}).get("gflops"),
                           "after_gflops": (after.get(key) or {}).get("gflops")}
    return merged


def limit_for(precision: str) -> str:
    """Which limit a row of `precision` is measured against."""
    return "int8" if "int8" in precision else "bf16" if precision == "bf16" else "fp32"


def apply_limits(rows: list[dict], limits: dict) -> list[str]:
    """Set each CPU row's limit and % of it; a row above its limit gets no % and a line saying the limit is
    wrong (returned). GPU rows get no limit: these are CPU kernels (the PyTorch peers' "torch" rows run on the CPU)."""
    problems = []
    for row in rows:
        key = limit_for(row.get("precision", "fp32"))
        gflops = (limits.get(key) or {}).get("gflops") if row["backend"] in ("cpu", "torch") else None
        row.update(limit=key if gflops else None, limit_gflops=gflops, percent_of_limit=None, above_limit=False)
        if not gflops:
            continue
        percent = 100.0 * row["achieved_gflops"] / gflops
        if percent > 100.0:
            row["above_limit"] = True
            problems.append(f"{row['variant']} ({row['backend']}, batch {row['batch']}) ran at "
                            f"{row['achieved_gflops']:.1f} GFLOP/s, above the {key} limit of {gflops:.1f} GFLOP/s "
                            f"({limits[key].get('winner')}): the limit is wrong, so no percentage is shown")
        else:
            row["percent_of_limit"] = percent
    return problems
