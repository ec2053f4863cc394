"""model.fp16.onnx: GEMMs fp16 with explicit Casts; front end, LayerNorm, softmax, pooling and I/O fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeenc.export.fp16 import FP16_MAX, convert_fp16, precision_plan, tensor_ranges
from edgeenc.export.onnx_export import export_onnx
from edgeenc.export.parity import rowwise_cosine
from edgeenc.models.checkpoints import load_model

TINY = {
    "beats": ("esp_aves2_sl_beats_all", {"embed_dim": 64, "depth": 2, "heads": 4, "ffn_dim": 128, "patch_dim": 32,
                                         "conv_pos": 16, "conv_pos_groups": 4}),
    "eat": ("esp_aves2_sl_eat_all_ssl_all", {"embed_dim": 64, "depth": 2, "heads": 4, "max_length": 64}),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(arch, fp32 model, fp16 model, folder) for a tiny random-init model with a classifier."""
    model_id, overrides = TINY[request.param]
    loaded = load_model(model_id, random_init=True, **overrides)
    folder = tmp_path_factory.mktemp(f"fp16-{request.param}")
    fp32 = export_onnx(loaded, folder / "model.onnx")
    return request.param, fp32, convert_fp16(fp32, folder / "model.fp16.onnx"), folder


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def _float_input_types(model: onnx.ModelProto, node: onnx.NodeProto, types: dict[str, int]) -> set[int]:
    return {types[i] for i in node.input if i and types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def test_fp16_graph_passes_the_full_checker_and_keeps_float32_io(tiny):
    _, fp32, fp16, folder = tiny
    onnx.checker.check_model(onnx.load(str(folder / "model.fp16.onnx")), full_check=True)
    for value in [*fp16.graph.input, *fp16.graph.output]:
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT, value.name
    assert [o.name for o in fp16.graph.output] == [o.name for o in fp32.graph.output]
    props = {p.key: p.value for p in fp16.metadata_props}
    assert props["precision"] == "fp16" and props["sample_rate"] == "16000"


def test_front_end_layernorm_softmax_and_pooling_stay_fp32(tiny):
    _, fp32, fp16, _ = tiny
    plan = precision_plan(fp32)
    types = _types(fp16)
    nodes = {n.name: n for n in fp16.graph.node}
    front = [nodes[name] for name in plan.front_end if name in nodes]
    assert any(n.op_type == "MatMul" for n in front), "the DFT and mel MatMuls belong to the front end"
    for node in front:
        assert TensorProto.FLOAT16 not in _float_input_types(fp16, node, types), node.name
    for node in fp16.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceMean"):
            assert _float_input_types(fp16, node, types) == {TensorProto.FLOAT}, node.name
    patch_conv = next(n for n in fp16.graph.node if n.op_type == "Conv")
    assert _float_input_types(fp16, patch_conv, types) == {TensorProto.FLOAT16}
    cast_in = next(n for n in fp16.graph.node if patch_conv.input[0] in n.output)
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT16


def test_block_gemms_are_fp16(tiny):
    _, _, fp16, _ = tiny
    types = _types(fp16)
    block_matmuls = [n for n in fp16.graph.node
                     if n.op_type == "MatMul" and ("layers." in n.name or "blocks." in n.name)]
    assert len(block_matmuls) >= 10
    for node in block_matmuls:
        assert _float_input_types(fp16, node, types) == {TensorProto.FLOAT16}, node.name


def test_plan_keeps_residual_stream_and_position_bias_fp32(tiny):
    arch, fp32, _, _ = tiny
    plan = precision_plan(fp32)
    nodes = {n.name: n for n in fp32.graph.node}
    computing = [name for name in plan.front_end if nodes[name].op_type != "Constant"]
    assert all(name.startswith(("/fbank/", "/patch_embedding/", "/local_encoder/")) for name in computing)
    assert sum(name.startswith("/fbank/") for name in computing) > 20
    block_norms = [n for n in fp32.graph.node if n.op_type == "LayerNormalization" and ("layers." in n.name
                   or "blocks." in n.name) and nodes[_producer_name(fp32, n.input[0])].op_type == "Add"]
    assert len(block_norms) == 4  # two per block: the residual sums inside the blocks stay fp32
    for ln in block_norms:
        assert _producer_name(fp32, ln.input[0]) in plan.fp32
    if arch == "beats":
        # DeepNorm: alpha * x (x = a LayerNorm output) and the gated relative-position bias.
        assert plan.fp32["/encoder/layers.0/Mul"] == "has an fp32 input"
        assert "/encoder/relative_attention_bias/Gather" in plan.fp32
        assert "/encoder/layers.0/fc1/MatMul" in plan.fp16 and "/encoder/pos_conv/Conv" in plan.fp16
    assert plan.fp32["/classifier/Gemm"] == "graph output"


def _producer_name(model: onnx.ModelProto, tensor: str) -> str:
    return next(n.name for n in model.graph.node if tensor in n.output)


def test_onnxruntime_cpu_runs_the_fp16_graph_close_to_fp32(tiny):
    _, _, _, folder = tiny
    audio = (np.random.default_rng(0).standard_normal((2, 48000)) * 0.1).astype(np.float32)
    outputs = {}
    for variant in ("model.onnx", "model.fp16.onnx"):
        session = ort.InferenceSession(str(folder / variant), providers=["CPUExecutionProvider"])
        outputs[variant] = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"audio": audio})))
    for name, reference in outputs["model.onnx"].items():
        got = outputs["model.fp16.onnx"][name]
        assert got.dtype == np.float32 and got.shape == reference.shape
    assert rowwise_cosine(outputs["model.fp16.onnx"]["tokens"], outputs["model.onnx"]["tokens"]).min() >= 0.999


def test_only_front_end_tensors_exceed_fp16_range_on_full_scale_audio(tiny):
    arch, fp32, _, _ = tiny
    plan = precision_plan(fp32)
    rng = np.random.default_rng(1)
    loud = np.clip(rng.standard_normal((1, 32000)), -1, 1).astype(np.float32)
    ranges = tensor_ranges(fp32, [loud])
    front_outputs = {o for n in fp32.graph.node if n.name in set(plan.front_end) for o in n.output}
    beyond = {name for name, peak in ranges.items() if peak > FP16_MAX}
    if arch == "beats":  # BEATs scales by 2**15: the power spectrum of full-scale audio reaches ~1e13
        assert beyond
    assert beyond <= front_outputs
    assert max(ranges[t] for t in plan.fp16_tensors if t in ranges) < FP16_MAX


def test_a_graph_without_patch_conv_is_refused(tmp_path):
    x = helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["audio"], ["tokens"], name="relu")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="patch-embedding Conv"):
        convert_fp16(model, tmp_path / "model.fp16.onnx")


@pytest.mark.slow
def test_full_size_beats_fp16_variant_passes_its_gate(make_checkpoint, tmp_path):
    from edgeenc.export.parity import reference_audio
    from edgeenc.export.pipeline import export_bundle

    loaded = load_model("esp_aves2_naturelm_audio_v1_beats", make_checkpoint("beats", 0))
    result = export_bundle(loaded, tmp_path / "bundle", fp16=True)
    fp16 = next(r for r in result.reports if r.variant == "fp16")
    assert fp16.passed, [c for c in fp16.comparisons if not c.passed]
    assert fp16.summary["worst"]["tokens"]["min_cosine"] >= 0.999
    assert result.manifest["variants"]["model.fp16.onnx"]["parity"] is True
    model = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    plan = precision_plan(model)
    real = reference_audio(16000)[None, :160000]
    ranges = tensor_ranges(model, [real, np.clip(real * 4, -1, 1)])
    assert max(ranges[t] for t in plan.fp16_tensors) < FP16_MAX / 16
