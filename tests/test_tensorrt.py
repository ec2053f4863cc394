"""`edgeenc build` and the TensorRT backend without a GPU: profiles, sidecars, refusals, the CLI, and the whole
build -> gate -> sidecar -> manifest -> backend path against stand-in tensorrt / cuda-python releases whose
"engine" is ONNX Runtime (tests/trt_standins.py; buffers, copies and shapes are exercised). GPU tests at the
end skip cleanly without tensorrt and a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from trt_standins import fake_tensorrt, install_cuda_python
from typer.testing import CliRunner

from edgeenc.export import tensorrt as trt_build
from edgeenc.export.parity import rowwise_cosine
from edgeenc.runtime.backends import BackendUnavailable, select_backend
from edgeenc.runtime.backends import tensorrt_backend as trt_rt
from edgeenc.runtime.backends import tensorrt_engines as engines
from edgeenc.runtime.bundle import read_manifest, verify_bundle

BEATS = {"sample_rate": 16000, "min_samples": 2800, "window_seconds": 10.0, "architecture": "beats"}
EAT = {"sample_rate": 16000, "min_samples": 400, "window_seconds": 10.0, "architecture": "eat",
       "frontend": {"target_frames": 1024}}
GPU = {"name": "Orin", "compute_capability": "8.7", "multiprocessors": 8}


def test_profiles_from_defaults_options_and_the_sample_rate():
    profile = trt_build.compute_profile(BEATS)
    assert (profile.min_shape, profile.opt_shape, profile.max_shape) == ((1, 2800), (8, 160000), (8, 480000))
    assert "batch 1-8, 0.175-30 s" in profile.describe()
    assert profile.contains((3, 16000)) and not profile.contains((9, 16000)) and not profile.contains((1, 2799))
    profile = trt_build.compute_profile(BEATS, max_batch=4, min_seconds=1, max_seconds=12, opt_seconds=5)
    assert (profile.min_shape, profile.opt_shape, profile.max_shape) == ((1, 16000), (4, 80000), (4, 192000))
    assert trt_build.compute_profile({**BEATS, "sample_rate": 32000, "window_seconds": 5.0}).opt_shape == (8, 160000)
    assert trt_build.compute_profile(BEATS, max_seconds=5).opt_shape == (8, 80000)  # window clamped to the max
    eat = trt_build.compute_profile(EAT)
    assert eat.min_shape == (1, 400) and "164080 samples (10.255 s" in eat.notes[0] and "cropped" in eat.notes[0]


@pytest.mark.parametrize("options, message", [
    ({"min_seconds": 0.1}, "at least 2800 samples"),
    ({"min_seconds": 5, "max_seconds": 2}, "below the minimum"),
    ({"opt_seconds": 40}, "outside the profile"),
    ({"max_batch": 0}, "at least 1"),
])
def test_impossible_profiles_are_refused_with_the_limit(options, message):
    with pytest.raises(ValueError, match=message):
        trt_build.compute_profile(BEATS, **options)


def _sidecar(**changes) -> dict:
    sidecar = {"engine": "e.engine", "precision": "fp16", "tensorrt_version": "10.3.0", "gpu": dict(GPU),
               "parity": {"passed": True}, "profile": trt_build.compute_profile(BEATS).to_json()}
    for key, value in changes.items():
        sidecar["gpu"].update(value) if key == "gpu" else sidecar.__setitem__(key, value)
    return sidecar


@pytest.mark.parametrize("changes, reason", [
    ({"tensorrt_version": "8.6.2"}, "built with TensorRT 8.6.2, this machine has TensorRT 10.3.0"),
    ({"gpu": {"compute_capability": "8.9"}}, "compute capability 8.9"),
    ({"gpu": {"name": "NVIDIA A100"}}, "built on a NVIDIA A100"),
    ({"gpu": {"multiprocessors": 16}}, "16 SMs, this one has 8"),
    ({"parity": {"passed": False}}, "failed its parity gate"),
])
def test_sidecar_mismatches_say_why(changes, reason):
    ok, why = engines.sidecar_matches(_sidecar(**changes), "Orin", "8.7", "10.3.0", multiprocessors=8)
    assert not ok and reason in why
    assert engines.sidecar_matches(_sidecar(), "Orin", "8.7", "10.3.0", multiprocessors=8)[0]


def test_engine_names_and_the_refusal_message():
    name = trt_build.engine_file_name("fp16", "NVIDIA GeForce RTX 4090", "8.9", "10.3.0")
    assert name == "model.fp16.nvidia-geforce-rtx-4090.sm89.trt10.3.0.engine"
    message = engines.refusal_message(Path("bundles/x"), ["a.engine: built with TensorRT 8.6.2"], "Orin", _sidecar())
    assert "a.engine: built with TensorRT 8.6.2" in message
    assert "`edgeenc build bundles/x --precision fp16 --max-batch 8 --max-seconds 30`" in message


def _write_engine(bundle: Path, name: str, sidecar: dict) -> None:
    (bundle / "engines").mkdir(parents=True, exist_ok=True)
    (bundle / "engines" / name).write_bytes(b"plan")
    sidecar = {**sidecar, "engine": name, "engine_bytes": 4, "source_onnx": "model.onnx", "source_onnx_sha256": "a1"}
    (bundle / "engines" / name).with_suffix(".json").write_text(json.dumps(sidecar))


def test_engine_selection_prefers_fp16_and_refuses_stale_or_foreign_engines(tmp_path):
    manifest = {"files": {"model.onnx": {"sha256": "a1"}}}
    with pytest.raises(BackendUnavailable, match=r"no engine in .*engines.*`edgeenc build"):
        engines.select_engine(tmp_path, manifest, GPU, "10.3.0")
    _write_engine(tmp_path, "fp32.engine", _sidecar(precision="fp32", built_at="2026-01-02"))
    _write_engine(tmp_path, "fp16.engine", _sidecar(built_at="2026-01-01"))
    _write_engine(tmp_path, "old-trt.engine", _sidecar(tensorrt_version="8.6.2", built_at="2026-01-03"))
    assert engines.select_engine(tmp_path, manifest, GPU, "10.3.0")[0].name == "fp16.engine"
    with pytest.raises(BackendUnavailable) as refused:
        engines.select_engine(tmp_path, {"files": {"model.onnx": {"sha256": "b2"}}}, GPU, "10.3.0")
    assert "built from an earlier export of model.onnx" in str(refused.value)
    assert "old-trt.engine: built with TensorRT 8.6.2" in str(refused.value)
    assert "edgeenc build" in str(refused.value)


def test_layer_summary_counts_precisions_and_flags_critical_layers():
    def layer(name, out, inputs=()):
        return {"Name": name, "Outputs": [{"Format/Datatype": out}], "Inputs": [{"Format/Datatype": i} for i in inputs]}

    info = {"Layers": [layer("/encoder/layers.0/fc1/MatMul", "Row major linear FP16 format"),
                       layer("/encoder/layers.0/final_layer_norm/LayerNormalization", "Row major linear FP32"),
                       layer("/encoder/layers.0/self_attn/Softmax", "Half"),
                       layer("shape", "N/A due to dynamic shapes", ["Int32"]), "(Unnamed Layer* 3) [Shuffle]"]}
    summary = trt_build.layer_summary(json.dumps(info))
    assert summary["by_precision"] == {"fp16": 2, "fp32": 1, "int": 1, "unknown": 1}
    assert summary["critical_not_fp32"] == ["/encoder/layers.0/self_attn/Softmax"]


# --- without tensorrt: the CLI and the backend fail at once, naming what to install -------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where it is installed
    monkeypatch.setattr(trt_rt, "import_cudart", lambda: None)


def test_build_without_tensorrt_exits_2_naming_what_to_install(no_tensorrt, tmp_path):
    from edgeenc.cli import app

    result = CliRunner().invoke(app, ["build", str(tmp_path), "--precision", "fp16"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "pip install 'edgeenc[tensorrt]'" in text and "JetPack's TensorRT" in text
    assert "--system-site-packages" in text and "edgeenc[tensorrt-cu12]" in text
    assert "pip install 'cuda-python>=13,<14'" in text and "'cuda-python>=12.2,<13' on CUDA 12" in text


def test_backend_without_tensorrt_is_unavailable(no_tensorrt, tmp_path):
    with pytest.raises(BackendUnavailable, match="tensorrt Python package is not installed"):
        trt_rt.TensorRTBackend.from_bundle(tmp_path, {"sample_rate": 16000}, ["tokens"])
    with pytest.raises(trt_build.TensorRTUnavailable, match="cuda-python"):
        trt_build.build_engine(tmp_path)


def test_tensorrt_modules_and_build_cli_never_import_torch(tmp_path):
    script = f"""
import sys
sys.modules["torch"] = sys.modules["tensorrt"] = None  # import torch / tensorrt -> ImportError
import edgeenc.runtime.backends.tensorrt_backend, edgeenc.export.tensorrt
from typer.testing import CliRunner
from edgeenc.cli import app
result = CliRunner().invoke(app, ["build", {str(tmp_path)!r}])
assert result.exit_code == 2 and "tensorrt Python package is not installed" in result.output, result.output
"""
    subprocess.run([sys.executable, "-c", script], check=True)


# --- stand-ins for tensorrt 8.6 / 10.x / 11.x and cuda-python 12 / 13 (tests/trt_standins.py) ------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from edgeenc.export.pipeline import export_bundle
    from edgeenc.models.checkpoints import load_model

    loaded = load_model("esp_aves2_sl_beats_all", random_init=True, embed_dim=64, depth=2, heads=4, ffn_dim=128,
                        patch_dim=32, conv_pos=16, conv_pos_groups=4)
    out = tmp_path_factory.mktemp("tiny-beats") / "bundle"
    assert export_bundle(loaded, out, fp16=True).passed
    return out


@pytest.fixture
def fake_gpu(monkeypatch, tiny_bundle, tmp_path):
    """A copy of the tiny bundle and a function installing stand-in tensorrt and cuda-python releases."""
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")

    def install(version: str = "10.3.0", cuda: str = "12.9.1", noise: float = 0.0):
        trt = fake_tensorrt(version, noise=noise)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt, install_cuda_python(monkeypatch, cuda)

    return bundle, install


def test_fp16_build_is_gated_recorded_and_selected_by_the_runtime(fake_gpu):
    bundle, install = fake_gpu
    trt, cudart = install()
    profile = trt_build.compute_profile(read_manifest(bundle), max_batch=3, max_seconds=12)
    result = trt_build.build_engine(bundle, precision="fp16", profile=profile)
    assert result.accepted and result.engine.name == "model.fp16.orin.sm87.trt10.3.0.engine"
    assert trt.built["network_flags"] == 1 << 1 and "TF32" in trt.built["cleared"] and not trt.built["flags"]
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["source_onnx"] == "model.fp16.onnx" and sidecar["typing"] == "strong"
    assert sidecar["gpu"]["name"] == "Orin" and sidecar["profile"]["max"] == [3, 192000]
    assert sidecar["parity"]["passed"] and sidecar["parity"]["report"]["variant"] == "tensorrt-fp16"
    assert any("trimmed to the profile" in n for n in sidecar["parity"]["report"]["notes"])  # 30 s -> 12 s
    assert (bundle / "engines" / "timing.orin.sm87.trt10.3.0.cache").read_bytes() == b"+"
    manifest = read_manifest(bundle)
    assert f"engines/{result.engine.name}" in manifest["files"] and result.engine.name in manifest["engines"]
    assert verify_bundle(bundle) == []

    backend, notes = select_backend(bundle, manifest, ["tokens", "embedding", "logits"], device="auto")
    assert backend.name == "trt" and "TensorRT 10.3.0 fp16 engine" in notes[-1]
    session = ort.InferenceSession(str(bundle / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 16000), (3, 48000), (2, 8000)]:  # grows, then reuses the buffers
        audio = (np.random.default_rng(len(shape)).standard_normal(shape) * 0.1).astype(np.float32)
        got = backend.run(audio)
        expected = session.run(["tokens"], {"audio": audio})[0]
        assert got["tokens"].shape == expected.shape and rowwise_cosine(got["tokens"], expected).min() > 0.99999
    with pytest.raises(ValueError, match=r"outside this engine's profile \(batch 1-3, 0.175-12 s"):
        backend.run(np.zeros((4, 16000), np.float32))
    backend.close()
    assert cudart.heap == {} and cudart.streams == []


def test_weak_typing_pins_the_fp32_plan_on_tensorrt_8_6(fake_gpu):
    bundle, install = fake_gpu
    trt, _ = install("8.6.2", cuda="12.2.0")
    result = trt_build.build_engine(bundle, precision="fp16")
    assert result.accepted and result.data["typing"] == "weak" and result.data["source_onnx"] == "model.onnx"
    assert {"FP16", "OBEY"} <= trt.built["flags"] and "TF32" in trt.built["cleared"]
    assert trt.built["network_flags"] == 1 << 0  # EXPLICIT_BATCH
    pinned = set(trt.built["pinned"])
    assert "/encoder/layers.0/final_layer_norm/LayerNormalization" in pinned
    assert "/encoder/layers.0/self_attn/Softmax" in pinned and "/ReduceMean" in pinned
    assert any(name.startswith("/fbank/") for name in pinned)
    assert "/encoder/layers.0/fc1/MatMul" not in pinned and "/patch_embedding/proj/Conv" not in pinned


def test_an_engine_that_fails_parity_is_kept_aside_and_refused(fake_gpu):
    bundle, install = fake_gpu
    install(noise=0.5)
    before = read_manifest(bundle)
    result = trt_build.build_engine(bundle, precision="fp32")
    assert not result.accepted and result.engine.name.endswith(".rejected.engine") and result.engine.is_file()
    assert read_manifest(bundle)["files"] == before["files"]
    with pytest.raises(BackendUnavailable, match=r"failed its parity gate.*`edgeenc build .* --precision fp32"):
        trt_rt.TensorRTBackend.from_bundle(bundle, before, ["tokens"])


def test_engine_from_another_tensorrt_version_is_refused_with_the_rebuild_command(fake_gpu, monkeypatch):
    bundle, install = fake_gpu
    trt, _ = install()
    assert trt_build.build_engine(bundle, precision="fp16").accepted
    trt.__version__ = "10.7.0"
    with pytest.raises(BackendUnavailable) as refused:
        trt_rt.TensorRTBackend.from_bundle(bundle, read_manifest(bundle), ["tokens"])
    assert "built with TensorRT 10.3.0, this machine has TensorRT 10.7.0" in str(refused.value)
    assert f"edgeenc build {bundle} --precision fp16" in str(refused.value)


@pytest.mark.parametrize("noise, exit_code", [(0.0, 0), (0.5, 3)])
def test_build_cli_prints_layers_and_parity_and_exits_3_on_a_failed_gate(fake_gpu, noise, exit_code):
    from edgeenc.cli import app

    bundle, install = fake_gpu
    install(noise=noise)
    result = CliRunner().invoke(app, ["build", str(bundle), "--max-batch", "2", "--max-seconds", "11"])
    assert result.exit_code == exit_code, result.output
    assert "layers: 3 (fp32 3)" in result.output and "parity fp16 engine vs ONNX Runtime fp32" in result.output
    verdict = "FAIL" if noise else "PASS"
    assert f"parity fp16 engine vs ONNX Runtime fp32: {verdict}" in result.output
    assert (".rejected.engine" in result.output) == bool(noise)


# --- every TensorRT / cuda-python pairing a user can have: the version-specific paths ---------------------------

# (TensorRT, cuda-python, network kind, create_network flags): JetPack 6.0, JetPack 6.1/6.2, current 10.x, 11.x
PAIRINGS = [("8.6.2", "12.2.0", "weak", 1 << 0), ("10.3.0", "12.6.2", "strong", 1 << 1),
            ("10.16.1", "12.9.1", "strong", 1 << 1), ("11.4.1", "13.0.0", "strong", 1 << 0)]


@pytest.mark.parametrize("version, cuda, typing, network_flags", PAIRINGS)
def test_build_sidecar_load_and_run_on_each_release(fake_gpu, version, cuda, typing, network_flags):
    bundle, install = fake_gpu
    trt, cudart = install(version, cuda=cuda)
    profile = trt_build.compute_profile(read_manifest(bundle), max_batch=2, max_seconds=4)
    result = trt_build.build_engine(bundle, precision="fp16", profile=profile)
    assert result.accepted and trt.built["network_flags"] == network_flags
    assert trt.built["strong"] == (typing == "strong")
    assert trt.built["flags"] == ({"FP16", "OBEY"} if typing == "weak" else set()) and "TF32" in trt.built["cleared"]
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["typing"] == typing and sidecar["tensorrt_version"] == version
    assert sidecar["source_onnx"] == ("model.onnx" if typing == "weak" else "model.fp16.onnx")
    assert sidecar["layers"]["by_precision"] == {"fp32": 3}  # 11.x's split DataType / Format fields read too
    manifest = read_manifest(bundle)
    backend = trt_rt.TensorRTBackend.from_bundle(bundle, manifest, ["tokens", "embedding"])
    assert f"TensorRT {version} fp16 engine" in backend.description
    audio = (np.random.default_rng(1).standard_normal((2, 16000)) * 0.1).astype(np.float32)
    session = ort.InferenceSession(str(bundle / sidecar["source_onnx"]), providers=["CPUExecutionProvider"])
    expected = session.run(["tokens"], {"audio": audio})[0]
    assert rowwise_cosine(backend.run(audio)["tokens"], expected).min() > 0.99999
    backend.close()
    assert cudart.heap == {} and cudart.streams == []
    trt.__version__ = PAIRINGS[(PAIRINGS.index((version, cuda, typing, network_flags)) + 1) % 4][0]
    with pytest.raises(BackendUnavailable, match=f"built with TensorRT {version}, this machine has TensorRT"):
        trt_rt.TensorRTBackend.from_bundle(bundle, manifest, ["tokens"])


@pytest.mark.parametrize("version, cuda, typing, network_flags", [PAIRINGS[0], PAIRINGS[-1]])
def test_fp32_builds_without_precision_flags_on_8_6_and_11(fake_gpu, version, cuda, typing, network_flags):
    bundle, install = fake_gpu
    trt, _ = install(version, cuda=cuda)
    result = trt_build.build_engine(bundle, precision="fp32", profile=trt_build.compute_profile(
        read_manifest(bundle), max_batch=1, max_seconds=4))
    assert result.accepted and result.data["source_onnx"] == "model.onnx" and result.data["typing"] == typing
    assert trt.built["flags"] == set() and trt.built["network_flags"] == network_flags and trt.built["pinned"] == []


def test_tensorrt_11_builds_strongly_typed_without_model_fp16_onnx(fake_gpu):
    bundle, install = fake_gpu
    trt, _ = install("11.4.1", cuda="13.0.0")
    (bundle / "model.fp16.onnx").unlink()
    result = trt_build.build_engine(bundle, precision="fp16")
    assert result.accepted and result.data["typing"] == "strong" and trt.built["flags"] == set()
    assert any("converted from model.onnx at build time" in n for n in result.data["build_notes"])


def test_the_standins_refuse_what_their_release_lacks(monkeypatch, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgeenc.export.fp16 import PrecisionPlan

    trt11, trt10, trt86 = fake_tensorrt("11.4.1"), fake_tensorrt("10.3.0"), fake_tensorrt("8.6.2")
    for name in ("FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        assert not hasattr(trt11.BuilderFlag, name) and hasattr(trt10.BuilderFlag, name)
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(trt86.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", value[:1], value[1:])
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    parser = trt86.OnnxParser(trt86.Builder(None).create_network(0), None)  # implicit batch
    assert not parser.parse_from_file(str(tmp_path / "relu.onnx")) and "explicit-batch" in parser.get_error(0).desc()
    for trt, strong in ((trt11, 0), (trt10, 1 << 1)):
        network = trt.Builder(None).create_network(strong)
        assert trt.OnnxParser(network, None).parse_from_file(str(tmp_path / "relu.onnx"))
        with pytest.raises((AttributeError, RuntimeError)):  # 11.x: no such attribute; 10.x: strongly typed
            network.get_layer(0).precision = trt.float32
        with pytest.raises((AttributeError, RuntimeError)):
            network.get_layer(0).set_output_type(0, trt.float32)
    # forcing the weak-typing path on TensorRT 11 fails at its first missing call instead of passing
    weak = trt_build._Source(tmp_path / "relu.onnx", "model.onnx", "0", "weak", plan=PrecisionPlan())
    profile = trt_build.compute_profile(BEATS)
    with pytest.raises(AttributeError, match="EXPLICIT_BATCH"):
        trt_build._build_serialized(trt11, weak, profile, 1.0, tmp_path / "t.cache")
    install_cuda_python(monkeypatch, "13.0.0")
    with pytest.raises(ImportError):
        from cuda import cudart  # noqa: F401  (removed in cuda-python 13)
    runtime = trt_rt.import_cudart()
    stream = trt_rt._cuda(runtime.cudaStreamCreate())
    with pytest.raises(TypeError):
        int(stream)
    assert trt_rt._handle(stream) == stream.handle
    install_cuda_python(monkeypatch, "12.2.0")
    assert trt_rt.import_cudart() is sys.modules["cuda.cudart"]  # the pre-12.6.1 name, found by the fallback
    with pytest.raises(ImportError):
        from cuda.bindings import runtime  # noqa: F401


def test_unsupported_tensorrt_and_a_too_old_driver_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.4.3"))
    install_cuda_python(monkeypatch, "13.0.0", devices=0, error=35)
    with pytest.raises(trt_rt.TensorRTUnavailable) as refused:
        trt_rt.require_tensorrt()
    assert "TensorRT 8.4.3 is not supported" in str(refused.value)
    assert "needs a newer NVIDIA driver" in str(refused.value) and "cuda-python>=12.2,<13" in str(refused.value)


# --- on a real GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_real_engine_matches_onnxruntime(tiny_bundle, tmp_path, precision):
    import shutil

    pytest.importorskip("tensorrt")
    try:
        trt_rt.require_tensorrt()
    except trt_rt.TensorRTUnavailable as exc:
        pytest.skip(str(exc))
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    profile = trt_build.compute_profile(read_manifest(bundle), max_batch=3)
    result = trt_build.build_engine(bundle, precision=precision, profile=profile)
    assert result.accepted, result.data["parity"]
    backend = trt_rt.TensorRTBackend.from_bundle(bundle, read_manifest(bundle), ["tokens", "embedding", "logits"])
    audio = (np.random.default_rng(0).standard_normal((2, 48000)) * 0.1).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert rowwise_cosine(backend.run(audio)["tokens"], session.run(["tokens"], {"audio": audio})[0]).min() >= 0.999
    backend.close()
