"""model.fp16.onnx: the GEMMs in fp16 with explicit Casts, precision-critical parts in fp32.

fp32 where precision lives: the front end reaches ~1e14 in the power spectrum (fp16 tops out at
65504), LayerNorm and softmax statistics overflow or lose digits in fp16, and mean pooling is a long
reduction. So the plan below is:

- fp16 anchors: every MatMul / Gemm / Conv after the front end (patch embedding, attention,
  FFN, positional conv), unless a weight does not fit fp16;
- front end: every node the first Conv (the patch embedding) depends on stays fp32;
- always fp32: LayerNormalization, Softmax, ReduceMean, and every node that writes a graph
  output (tokens, embedding, logits stay float32 I/O);
- everything else follows its inputs: an elementwise / layout op runs in fp16 only when every
  input that varies at run time is fp16. The residual adds inside the blocks meet an fp32
  LayerNorm output, so the residual stream there (BEATs' DeepNorm alpha * x included) and the
  position-bias path stay fp32 without naming them.

Every tensor that crosses a precision boundary gets an explicit Cast, so a TensorRT network
built with STRONGLY_TYPED runs exactly this plan, and `precision_plan` gives the same node sets
to the weak-typing fallback (export/tensorrt.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_MAX = 65504.0
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
GEMM_OPS = frozenset({"MatMul", "Gemm", "Conv"})
ALWAYS_FP32 = {"LayerNormalization": "LayerNorm", "Softmax": "softmax", "ReduceMean": "pooling statistics"}
# Ops whose float inputs and outputs share one type T, so they can simply run in fp16.
FOLLOW_OPS = frozenset(
    """Add Sub Mul Div Neg Erf Sigmoid Tanh Relu Reshape Transpose Slice Concat Unsqueeze Squeeze Flatten
    ReduceSum Split Gather Expand Identity Pad""".split()
)
# Ops that take a float input of any type without a Cast in front.
ANY_TYPE_INPUT = frozenset({"Shape", "Size", "Cast"})


@dataclass
class PrecisionPlan:
    """Which node computes in which precision; nodes without float tensors appear in neither."""

    fp16: list[str] = field(default_factory=list)
    fp32: dict[str, str] = field(default_factory=dict)  # node name -> why it stays fp32
    front_end: list[str] = field(default_factory=list)  # ancestors of the patch-embedding Conv
    fp16_tensors: set[str] = field(default_factory=set)  # float outputs of fp16 nodes
    fp32_tensors: set[str] = field(default_factory=set)  # float outputs of fp32 nodes

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for why in self.fp32.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {"fp16_nodes": len(self.fp16), "fp32_nodes": len(self.fp32), "fp32_reasons": reasons}


class _Graph:
    """Lookups over one graph: producers, element types, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        for i, node in enumerate(graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{i}"
        inferred = onnx.shape_inference.infer_shapes(model)
        self.types = {vi.name: vi.type.tensor_type.elem_type
                      for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
        self.initializers = {init.name: init for init in graph.initializer}
        self.types.update({name: init.data_type for name, init in self.initializers.items()})
        self.producer = {out: node for node in graph.node for out in node.output}
        self.constants = {node.output[0]: node for node in graph.node
                          if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
        self.outputs = {o.name for o in graph.output}
        self.static: set[str] = set(self.initializers) | set(self.constants)
        for node in graph.node:
            if node.input and all(not name or name in self.static for name in node.input):
                self.static.update(node.output)

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def constant_array(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constants:
            return numpy_helper.to_array(self.constants[name].attribute[0].t)
        return None

    def static_roots_fit_fp16(self, name: str) -> bool:
        """Whether every constant a static tensor derives from fits fp16's range."""
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current in seen or not current:
                continue
            seen.add(current)
            array = self.constant_array(current)
            if array is not None:
                if array.dtype.kind == "f" and array.size and float(np.nanmax(np.abs(array))) > FP16_MAX:
                    return False
            elif current in self.producer:
                stack.extend(self.producer[current].input)
        return True

    def ancestors(self, name: str) -> set[str]:
        """Names of all nodes `name` depends on."""
        found: set[str] = set()
        stack = [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and node.name not in found:
                found.add(node.name)
                stack.extend(i for i in node.input if i)
        return found


def _front_end(g: _Graph) -> set[str]:
    first_conv = next((n for n in g.model.graph.node if n.op_type == "Conv"), None)
    if first_conv is None:
        raise ValueError("no Conv in the graph: expected the patch-embedding Conv right after the filterbank")
    return g.ancestors(first_conv.input[0])


def _plan(g: _Graph) -> PrecisionPlan:
    plan = PrecisionPlan()
    front = _front_end(g)
    plan.front_end = [n.name for n in g.model.graph.node if n.name in front]
    half: set[str] = set()  # tensors that will be fp16
    for node in g.model.graph.node:
        float_in = [i for i in node.input if g.is_float(i)]
        float_out = [o for o in node.output if g.is_float(o)]
        if node.op_type == "Constant" or not float_out:
            continue  # shape arithmetic (Shape of a float tensor included) has no precision
        varying = [i for i in float_in if i not in g.static]
        reason = None
        if node.name in front:
            reason = "front end"
        elif node.op_type in ALWAYS_FP32:
            reason = ALWAYS_FP32[node.op_type]
        elif any(o in g.outputs for o in node.output):
            reason = "graph output"
        elif node.op_type not in GEMM_OPS | FOLLOW_OPS:
            reason = f"{node.op_type} kept fp32"
        elif not all(g.static_roots_fit_fp16(i) for i in float_in if i in g.static):
            reason = "a constant exceeds fp16 range"
        elif node.op_type in FOLLOW_OPS and not varying:
            reason = "constant inputs only"
        elif node.op_type in FOLLOW_OPS and not all(i in half for i in varying):
            reason = "has an fp32 input"
        if reason is None:
            plan.fp16.append(node.name)
            half.update(float_out)
            plan.fp16_tensors.update(float_out)
        else:
            plan.fp32[node.name] = reason
            plan.fp32_tensors.update(float_out)
    return plan


def precision_plan(model: onnx.ModelProto) -> PrecisionPlan:
    """The fp16/fp32 split of an fp32 graph exported by edgeenc (see the module docstring)."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    return _plan(_Graph(model_copy))


def convert_fp16(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Write `path` (model.fp16.onnx) from the fp32 `model` and return the checked mixed-precision graph."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    g = _Graph(converted)
    plan = _plan(g)
    graph = converted.graph
    taken = {n.name for n in graph.node} | set(g.types) | {o for n in graph.node for o in n.output}
    casts: dict[tuple[str, int], str] = {}
    new_initializers: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []

    def unique(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def tensor_as(name: str, dtype: int) -> str:
        key = (name, dtype)
        if key in casts:
            return casts[key]
        suffix = "fp16" if dtype == HALF else "fp32"
        array = g.constant_array(name) if dtype == HALF else None
        if array is not None:
            target = unique(f"{name}.{suffix}")
            new_initializers.append(numpy_helper.from_array(array.astype(np.float16), target))
        else:
            target = unique(f"{name}.to_{suffix}")
            new_nodes.append(helper.make_node("Cast", [name], [target], name=unique(f"{target}/Cast"), to=dtype))
        casts[key] = target
        return target

    dtype_of = {name: FLOAT for name in g.types if g.types[name] == FLOAT}
    dtype_of.update(dict.fromkeys(plan.fp16_tensors, HALF))
    fp16_nodes = set(plan.fp16)
    for node in graph.node:
        if node.name in fp16_nodes or node.name in plan.fp32:
            want = HALF if node.name in fp16_nodes else FLOAT
            if node.op_type not in ANY_TYPE_INPUT:
                for index, name in enumerate(node.input):
                    if g.is_float(name) and dtype_of.get(name, FLOAT) != want:
                        node.input[index] = tensor_as(name, want)
        new_nodes.append(node)
    for output in graph.output:
        if dtype_of.get(output.name, FLOAT) != FLOAT:
            raise AssertionError(f"output {output.name} would be fp16; graph outputs must stay float32")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_initializers)
    _drop_unused(graph)
    del graph.value_info[:]
    converted.doc_string = (model.doc_string + " | " if model.doc_string else "") + (
        "mixed precision: GEMMs fp16; front end, LayerNorm, softmax, pooling and outputs fp32"
    )
    helper.set_model_props(converted, {**{p.key: p.value for p in model.metadata_props}, "precision": "fp16"})
    onnx.checker.check_model(converted, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(path))
    return converted


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and Constant nodes that only the fp32 originals of fp16 copies used."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def tensor_ranges(model: onnx.ModelProto, audio_cases: Iterable[np.ndarray]) -> dict[str, float]:
    """max |value| of every float tensor of the fp32 `model` over `audio_cases` (ONNX Runtime CPU).

    The fp16 range check (fp16 range is +-65504): compare with `PrecisionPlan.fp16_tensors`.
    """
    import onnxruntime as ort

    probe = onnx.shape_inference.infer_shapes(model)
    present = {o.name for o in probe.graph.output}
    for vi in probe.graph.value_info:
        if vi.type.tensor_type.elem_type == FLOAT and vi.name not in present:
            probe.graph.output.append(vi)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, float] = {}
    for audio in audio_cases:
        values = session.run(names, {"audio": np.ascontiguousarray(audio, dtype=np.float32)})
        for name, value in zip(names, values):
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            ranges[name] = max(ranges.get(name, 0.0), peak)
    return ranges
