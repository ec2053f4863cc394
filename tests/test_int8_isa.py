"""int8 weights by instruction set: s8 only where ONNX Runtime multiplies u8 x s8 without saturating.

On x86 without VNNI, MLAS's u8 x s8 kernel (vpmaddubsw) saturates int16 pair sums; `edgeenc optimize`
writes u8 weights there, and the runtime refuses an s8 file on such a CPU (runtime/isa.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from edgeenc.runtime.backends import isa

AVX2 = {"sse4_2", "avx", "avx2", "fma"}
VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        (AVX2, "x86_64", True),  # Zen 1-3, Haswell..Skylake client
        (AVX2 | {"avx512f", "avx512bw"}, "x86_64", True),  # Skylake-X: AVX-512 but no VNNI
        (VNNI, "x86_64", False),  # Zen 4, Ice Lake and later
        (AVX2 | {"avx_vnni"}, "AMD64", False),  # Alder Lake (AVX-VNNI without AVX-512)
        (None, "x86_64", True),  # flags unknown: assume the common case
        ({"fp", "asimd", "asimddp"}, "aarch64", False),  # Jetson
        (None, "arm64", False),
    ],
)
def test_signed_int8_saturates(flags, machine, saturates, monkeypatch):
    # flags=None means "cannot be read" here, not "this machine's": the answer must not depend on the CI CPU.
    monkeypatch.setattr(isa, "cpu_flags", lambda: None)
    assert isa.signed_int8_saturates(flags, machine) is saturates
    weights, why = isa.int8_weight_type("auto", flags, machine)
    assert weights == ("u8" if saturates else "s8") and why
    assert isa.int8_weight_type("s8", flags, machine)[0] == "s8"
    with pytest.raises(ValueError, match="auto, s8 or u8"):
        isa.int8_weight_type("int4", flags, machine)


def _pretend_cpu(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(isa, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")


def _weight_dtypes(path) -> set[int]:
    """Element types of the integer weights of every MatMulInteger / DequantizeLinear'd MatMul."""
    model = onnx.load(str(path))
    return {i.data_type for i in model.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) == 2}


@pytest.fixture(scope="module")
def by_weights(aliased_beats_bundle, tmp_path_factory):
    """The aliased tiny BEATs optimised twice, as on an AVX2-only CPU (u8) and as on a VNNI CPU (s8)."""
    from edgeenc.export.optimize import optimize_bundle

    out = {}
    mp = pytest.MonkeyPatch()
    try:
        for weights, flags in (("u8", AVX2), ("s8", VNNI)):
            _pretend_cpu(mp, flags)
            bundle = tmp_path_factory.mktemp(f"int8-{weights}") / "bundle"
            shutil.copytree(aliased_beats_bundle, bundle)
            summary = optimize_bundle(bundle, quick=True, threads=2, keep_failed=True)
            out[weights] = (bundle, summary)
    finally:
        mp.undo()
    return out


def test_optimize_writes_u8_weights_without_vnni_and_s8_with_it(by_weights):
    from edgeenc.runtime.bundle import read_manifest

    for weights, dtype in (("u8", onnx.TensorProto.UINT8), ("s8", onnx.TensorProto.INT8)):
        bundle, _summary = by_weights[weights]
        manifest = read_manifest(bundle)
        for name in ("model.int8dyn.onnx", "model.int8.onnx"):
            entry = manifest["variants"][name]
            assert entry["weights"] == weights and entry["activations"] == "u8"
            assert entry["gated_on"]["signed_int8_saturates"] is (weights == "u8")
            assert _weight_dtypes(bundle / name) == {dtype}, name
        ov_int8 = manifest["variants"].get("openvino:int8")  # present where OpenVINO is installed
        if ov_int8 and weights == "u8":  # NNCF writes s8 only: not even tried where s8 saturates
            assert ov_int8["written"] is False and "no VNNI" in ov_int8["reason"]


def test_runtime_refuses_s8_weights_on_a_cpu_that_saturates(by_weights, monkeypatch):
    from edgeenc.runtime.backends import BackendUnavailable, cpu_model
    from edgeenc.runtime.bench import load_target
    from edgeenc.runtime.bundle import read_manifest

    s8_bundle, _ = by_weights["s8"]
    u8_bundle, _ = by_weights["u8"]
    s8, u8 = read_manifest(s8_bundle), read_manifest(u8_bundle)
    for manifest in (s8, u8):  # the gate result is what decides, not the ISA; pretend both passed
        for name in ("model.int8dyn.onnx", "model.int8.onnx"):
            manifest["variants"][name]["parity"] = True

    _pretend_cpu(monkeypatch, AVX2)
    with pytest.raises(BackendUnavailable, match=r"s8 weights .*saturates.*edgeenc optimize .*int8-s8"):
        cpu_model(s8_bundle, s8, "int8dyn")
    with pytest.raises(BackendUnavailable, match="saturates"):
        load_target(s8_bundle, s8, "cpu", "model.int8.onnx", 1)
    assert cpu_model(u8_bundle, u8, "int8dyn").name == "model.int8dyn.onnx"
    legacy = {k: {kk: vv for kk, vv in v.items() if kk != "weights"} for k, v in s8["variants"].items()}
    with pytest.raises(BackendUnavailable, match="saturates"):  # written before weights were recorded: s8
        cpu_model(s8_bundle, {**s8, "variants": legacy}, "int8dyn")
    assert cpu_model(s8_bundle, s8, "fp32").name == "model.onnx"

    _pretend_cpu(monkeypatch, VNNI)
    assert cpu_model(s8_bundle, s8, "int8dyn").name == "model.int8dyn.onnx"
    assert cpu_model(u8_bundle, u8, "int8dyn").name == "model.int8dyn.onnx"  # u8 runs anywhere


@pytest.mark.skipif(not isa.signed_int8_saturates(), reason="this CPU multiplies u8 x s8 exactly (VNNI or ARM)")
def test_s8_weights_really_lose_accuracy_here(by_weights):
    """The measurement behind the policy, on this CPU: the s8 file is further from fp32 than the u8 one."""
    from edgeenc.runtime.bundle import read_manifest

    cos = {w: read_manifest(by_weights[w][0])["variants"]["model.int8dyn.onnx"]["figures"]["min_token_cosine"]
           for w in ("s8", "u8")}
    assert 1 - cos["u8"] < 0.5 * (1 - cos["s8"]), cos
    assert np.isfinite(list(cos.values())).all()


def test_info_says_when_a_variant_cannot_run_here(by_weights, monkeypatch, tmp_path):
    import json

    from typer.testing import CliRunner

    from edgeenc.cli import app

    bundle = tmp_path / "bundle"
    shutil.copytree(by_weights["s8"][0], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"]["model.int8dyn.onnx"]["parity"] = True  # as if gated on a VNNI CPU
    manifest["variants"]["model.int8.onnx"]["parity"] = False
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _pretend_cpu(monkeypatch, AVX2)
    lines = CliRunner().invoke(app, ["info", str(bundle)]).output.splitlines()
    dyn = next(x for x in lines if "model.int8dyn.onnx" in x)
    static = next(x for x in lines if "model.int8.onnx" in x)
    assert "s8 weights" in dyn and "NOT usable on this CPU" in dyn and "edgeenc optimize" in dyn
    assert "gate FAILED" in static and "NOT usable" not in static
    _pretend_cpu(monkeypatch, VNNI)
    dyn = next(x for x in CliRunner().invoke(app, ["info", str(bundle)]).output.splitlines() if "int8dyn" in x)
    assert "gate passed" in dyn and "NOT usable" not in dyn
