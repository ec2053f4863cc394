"""Exact rewrites of an exported graph that make ONNX Runtime's CPU GEMMs fast (standard ops only).

ONNX Runtime's SGEMM (MLAS) reads the left operand A in place, row by row with stride K. When a row is
a multiple of 4 KiB (K = 1024, 2048, 3072 floats), the rows it walks together land in the same L1
cache sets and evict each other ("4K aliasing"). Measured on a Zen 4 core (one ORT MatMul node,
[496, K] x [K, 768]): K = 3072 runs at 64-78 GFLOP/s, K = 3088 at 96-99 — and the BEATs / EAT
feed-forward output projection (fc2) has K = 3072. The grouped positional Conv (48 channels x 128 taps
per group, im2col rows of 6144 floats) has the same trouble.

Rewrites, each exact (the added weights are zeros, so the added products are exact zeros):
- `pad_hidden`: a MatMul -> [bias Add] -> element-wise activation -> MatMul chain whose inner width
  K is a multiple of 1024 floats gets `pad` extra zero columns in the first weight and bias and
  `pad` zero rows in the second. The padded activations are act(0) (finite), multiplied by zeros.
- `pad_conv_taps`: a Conv whose im2col row (C_in / groups * kernel) is a multiple of 1024 floats
  gets one zero tap at the end of the kernel and one more end pad, so every output is unchanged.

The result stays a standard-op graph, so the int8 quantisers can start from it too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

ALIAS_FLOATS = 1024  # 4 KiB of float32
HIDDEN_PAD = 16  # one AVX-512 vector; measured: 3088 and 3080 both clear the aliasing, 3104 does not
# element-wise ops allowed between the two MatMuls, with the inputs that may be per-column constants
CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "BiasGelu", "FastGelu"}


def _aliased(floats: int) -> bool:
    return floats > 0 and floats % ALIAS_FLOATS == 0


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.consts = {}
        for node in self.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.consts.get(name)

    def set_initializer(self, node: onnx.NodeProto, index: int, value: np.ndarray, tag: str) -> None:
        """Give input `index` of `node` a new initializer (a fresh name: the old one may be shared)."""
        name = f"{node.input[index]}__{tag}"
        if name not in self.inits:
            tensor = numpy_helper.from_array(value, name)
            self.graph.initializer.append(tensor)
            self.inits[name] = tensor
        node.input[index] = name


def _hidden_region(g: _Graph, first: onnx.NodeProto, width: int):
    """The element-wise nodes between `first` and the one MatMul that consumes them, or None.

    Every node reachable from first's output must be element-wise (CHAIN_OPS) with only constant side
    inputs (scalars or [width] vectors), until exactly one MatMul takes a region tensor as its A input.
    """
    region, seen, edits, second = [], set(), [], None
    tensors, todo = {first.output[0]}, [first.output[0]]
    while todo:
        tensor = todo.pop()
        if tensor in g.outputs:
            return None
        for node in g.consumers.get(tensor, []):
            if id(node) in seen or node is second:
                continue
            if node.op_type == "MatMul" and node.input[0] == tensor and node.input[1] not in tensors:
                if second is not None:
                    return None
                second = node
                continue
            if node.op_type not in CHAIN_OPS or len(node.output) != 1:
                return None
            for index, name in enumerate(node.input):
                if name in tensors:
                    continue
                value = g.array(name)
                if value is None:
                    continue  # a runtime input: it must come from the region, checked once the region is whole
                if value.size == 1:
                    continue
                if value.size == width and value.shape[-1:] == (width,):
                    edits.append((node, index, value))
                    continue
                return None
            region.append(node)
            seen.add(id(node))
            tensors.add(node.output[0])
            todo.append(node.output[0])
    if second is None:
        return None
    for node in region:  # every side input must come from the region itself
        for name in node.input:
            if name not in tensors and g.array(name) is None:
                return None
    return region, edits, second


def pad_hidden(model: onnx.ModelProto, pad: int = HIDDEN_PAD) -> int:
    """Pad every aliased MatMul -> element-wise -> MatMul hidden width by `pad`. Returns how many."""
    g = _Graph(model)
    done = 0
    for first in list(g.graph.node):
        if first.op_type != "MatMul" or first.input[1] not in g.inits:
            continue
        w1 = g.array(first.input[1])
        if w1.ndim != 2 or not _aliased(w1.shape[1]):
            continue
        width = w1.shape[1]
        found = _hidden_region(g, first, width)
        if found is None:
            continue
        _region, edits, second = found
        if second.input[1] not in g.inits:
            continue
        w2 = g.array(second.input[1])
        if w2.ndim != 2 or w2.shape[0] != width:
            continue
        g.set_initializer(first, 1, np.concatenate([w1, np.zeros((w1.shape[0], pad), w1.dtype)], 1), f"pad{pad}")
        g.set_initializer(second, 1, np.concatenate([w2, np.zeros((pad, w2.shape[1]), w2.dtype)], 0), f"pad{pad}")
        for node, index, value in edits:
            flat = value.reshape(-1)
            fill = np.ones if node.op_type in ("Mul", "Div") else np.zeros  # keep the padded columns finite
            padded = np.concatenate([flat, fill(pad, flat.dtype)]).reshape(value.shape[:-1] + (width + pad,))
            g.set_initializer(node, index, padded, f"pad{pad}")
        done += 1
    _drop_unused_initializers(model)
    return done


def pad_conv_taps(model: onnx.ModelProto) -> int:
    """Append one zero tap to every 1-D Conv whose im2col row is aliased. Returns how many."""
    g = _Graph(model)
    done = 0
    for node in g.graph.node:
        if node.op_type != "Conv" or node.input[1] not in g.inits:
            continue
        w = g.array(node.input[1])
        attrs = {a.name: a for a in node.attribute}
        if w.ndim != 3 or not _aliased(w.shape[1] * w.shape[2]):
            continue
        if "auto_pad" in attrs and onnx.helper.get_attribute_value(attrs["auto_pad"]) not in (b"NOTSET", "NOTSET"):
            continue
        dilations = onnx.helper.get_attribute_value(attrs["dilations"]) if "dilations" in attrs else [1]
        if list(dilations) != [1]:
            continue
        pads = list(onnx.helper.get_attribute_value(attrs["pads"])) if "pads" in attrs else [0, 0]
        g.set_initializer(node, 1, np.concatenate([w, np.zeros(w.shape[:2] + (1,), w.dtype)], 2), "tap")
        kept = [a for a in node.attribute if a.name not in ("pads", "kernel_shape")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("kernel_shape", [w.shape[2] + 1]))
        node.attribute.append(onnx.helper.make_attribute("pads", [pads[0], pads[1] + 1]))
        done += 1
    _drop_unused_initializers(model)
    return done


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def cpu_layout(model: onnx.ModelProto) -> dict:
    """Apply every rewrite in place; returns what was changed (recorded in the manifest)."""
    return {"hidden_padded": pad_hidden(model), "conv_taps_padded": pad_conv_taps(model),
            "why": "MLAS SGEMM reads A rows with stride K; K a multiple of 4 KiB aliases in L1"}
