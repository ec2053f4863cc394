"""FLOPs per clip, counted from the bundle's ONNX graph at the clip's real shapes (no torch).

One ONNX Runtime run of model.onnx with graph optimisations off and profiling on records the input and
output shape of every node; MatMul / Gemm count 2*M*N*K (batched over leading dims) and Conv counts
2 * output elements * (C_in / groups) * kernel size. Element-wise ops, softmax and norms are not counted
(they are < 1 % of a transformer's work), so this is the GEMM work a perfect kernel must do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..backends import import_onnxruntime

MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul")
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


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
