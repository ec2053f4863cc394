"""Static check of an ONNX graph's ops against what TensorRT 10's ONNX parser imports.

The list follows onnx/onnx-tensorrt docs/operators.md for TensorRT 10.x. It is deliberately the
subset a transformer audio encoder may contain plus the common neighbours; an op outside it is
reported as "unknown", which is a finding to look at, not proof that TensorRT lacks it.
"""

from __future__ import annotations

from collections import Counter

import onnx

TENSORRT10_SUPPORTED = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
    Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
    IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN MatMul Max MaxPool Mean Min
    Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
    Resize ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
    """.split()
)
TENSORRT10_UNSUPPORTED = frozenset({"DFT", "STFT", "MelWeightMatrix", "HannWindow", "HammingWindow"})


def op_report(model: onnx.ModelProto) -> dict:
    """Every op type with its count, split into supported / unsupported / unknown for TensorRT 10."""
    counts = Counter(node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx"))
    foreign = Counter(
        f"{node.domain}:{node.op_type}" for node in model.graph.node if node.domain not in ("", "ai.onnx")
    )
    unsupported = sorted(op for op in counts if op in TENSORRT10_UNSUPPORTED)
    unknown = sorted(op for op in counts if op not in TENSORRT10_SUPPORTED and op not in TENSORRT10_UNSUPPORTED)
    unknown += sorted(foreign)
    return {
        "target": "TensorRT 10 ONNX parser (onnx-tensorrt docs/operators.md)",
        "ops": dict(sorted(counts.items())),
        "custom_domain_ops": dict(sorted(foreign.items())),
        "unsupported": unsupported,
        "unknown": unknown,
        "all_supported": not unsupported and not unknown,
    }
