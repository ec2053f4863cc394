"""OpenVINO beside ONNX Runtime on the CPU, and the bundle's timed CPU default (tiny BEATs bundle).

The pretend CPUs patch runtime/isa.py's one seam for flags, as tests/test_int8_isa.py does.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from edgeenc.runtime.backends import isa

AVX512_NO_BF16 = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}  # Ice Lake: VNNI, no bf16
AVX2 = {"avx", "avx2", "fma"}  # Zen 3: neither


def _pretend_cpu(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(isa, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")


def _edit_manifest(bundle, change) -> dict:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


FORGED_BF16 = {"engine": "openvino", "precision": "bf16", "source": "model.onnx", "parity": True,
               "figures": {"min_token_cosine": 0.9995}, "gated_on": {"cpu_model": "a bf16 CPU", "bf16": True}}


@pytest.fixture(scope="module")
def optimized(tiny_beats_bundle, tmp_path_factory):
    """The tiny BEATs after a full `optimize` on this CPU (int8, OpenVINO where installed, timing)."""
    from edgeenc.export.optimize import optimize_bundle

    bundle = tmp_path_factory.mktemp("ov-opt") / "bundle"
    shutil.copytree(tiny_beats_bundle[0], bundle)
    summary = optimize_bundle(bundle, quick=True, threads=2, timing_runs=3)
    return bundle, summary


def test_openvino_matches_onnxruntime_fp32(tiny_beats_bundle):
    pytest.importorskip("openvino")
    from edgeenc.export.parity import FP32_COSINE_GAP, FP32_MAX_ABS, error_stats, reference_audio
    from edgeenc.runtime.backends.onnxruntime_backend import OrtBackend
    from edgeenc.runtime.backends.openvino_backend import OpenVinoBackend

    bundle = tiny_beats_bundle[0]
    names = ["tokens", "embedding"]
    audio = reference_audio(16000)[None, :]
    batch = np.stack([audio[0, :48000], audio[0, 20000:68000] * 0.5])
    ort = OrtBackend(bundle / "model.onnx", names, provider="CPUExecutionProvider", threads=2)
    ov = OpenVinoBackend(bundle / "model.onnx", names, precision="fp32", threads=2)
    assert ov.description.startswith("openvino ") and "fp32" in ov.description
    for clip in (audio, batch):  # two shapes through one compiled model
        ref, got = ort.run(clip), ov.run(clip)
        for name in names:
            max_abs, _mean, cos = error_stats(got[name], ref[name])
            assert max_abs <= FP32_MAX_ABS and cos >= 1 - FP32_COSINE_GAP, (name, max_abs, cos)
    first = ov.run(audio)["embedding"].copy()
    ov.run(batch)
    np.testing.assert_array_equal(first, ov.run(audio)["embedding"])  # outputs are copies, not live buffers
    with pytest.raises(ValueError, match="fp32, bf16"):
        OpenVinoBackend(bundle / "model.onnx", names, precision="int4")


def test_optimize_gates_records_and_uses_the_fastest(optimized):
    from edgeenc.runtime.backends import ISA_FLAGS
    from edgeenc.runtime.bundle import read_manifest, verify_bundle
    from edgeenc.runtime.encoder import Encoder

    bundle, summary = optimized
    manifest = read_manifest(bundle)
    choice = manifest["cpu_default"]
    assert choice == summary["cpu_default"]
    ranking = choice["ranking"]
    assert [r["p50_ms"] for r in ranking] == sorted(r["p50_ms"] for r in ranking)
    assert choice["variant"] == ranking[0]["variant"] and choice["p50_ms"] == ranking[0]["p50_ms"]
    assert {r["variant"] for r in ranking} >= {"model.onnx", "model.cpu.onnx"}
    for row in ranking:  # only gated variants are timed
        assert row["variant"] == "model.onnx" or manifest["variants"][row["variant"]]["parity"], row
    here = isa.cpu_flags() or set()
    assert set(choice["timed_on"]["flags"]) == {f for f in ISA_FLAGS if f in here}
    assert choice["threads"] == 2 and choice["batch"] == 1
    if choice["variant"] != "model.onnx":
        assert choice["figures"] == manifest["variants"][choice["variant"]]["figures"]
    assert not verify_bundle(bundle)
    if "openvino" in sys.modules or _has_openvino():
        fp32 = manifest["variants"]["openvino:fp32"]
        assert fp32["parity"] and fp32["figures"]["max_abs"] < 1e-3 and fp32["gated_on"]["cpu_model"]
        window = round(manifest["sample_rate"] * manifest["window_seconds"])
        assert fp32["compile"] == {"static_window_samples": window}  # gated (window_batch2) as it runs
        bf16 = manifest["variants"]["openvino:bf16"]
        if isa.has_bf16():
            assert bf16["parity"] and 0.99 <= bf16["figures"]["min_token_cosine"] < 1.0
            assert bf16["gated_on"]["bf16"] is True and set(bf16["gated_on"]["flags"]) & set(isa.BF16_FLAGS)
        else:
            assert bf16["written"] is False and "avx512_bf16" in bf16["reason"]
        if _has("nncf") and not isa.signed_int8_saturates():
            int8 = manifest["variants"]["openvino:int8"]
            assert int8["weights"] == "s8" and int8["source"] == "model.openvino-int8.xml"
            assert int8["fp32_convolutions"] and int8["figures"]["min_token_cosine"] is not None
            listed = {"model.openvino-int8.xml", "model.openvino-int8.bin"} <= set(manifest["files"])
            assert listed is int8["parity"]  # the IR pair stays (hashed) only when it passed
            rest = int8["compile"]["inference_precision"]  # bf16 first where the CPU has it, fp32 after a failure
            assert rest == ("bf16" if isa.has_bf16() and not int8.get("failed_attempts") else "fp32")

    encoder = Encoder.load(bundle, "cpu", threads=2)  # the recorded winner runs
    expected = "openvino" if ranking[0]["engine"] == "openvino" else "onnxruntime"
    assert encoder.backend.description.startswith(expected), encoder.backend.description
    assert ranking[0]["precision"] in encoder.backend.description or expected == "onnxruntime"

    # Whatever the ranking says first is what runs: make model.int8dyn.onnx the winner.
    copy = bundle.parent / "forced"
    shutil.copytree(bundle, copy)
    _edit_manifest(copy, lambda m: m["cpu_default"].update(
        ranking=[r for r in ranking if r["variant"] == "model.int8dyn.onnx"] + ranking))
    assert "model.int8dyn.onnx" in Encoder.load(copy, "cpu", threads=2).backend.description
    # Told otherwise, the default gives way.
    assert "model.onnx" in Encoder.load(copy, "cpu", threads=2, variant="fp32").backend.description


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _has_openvino() -> bool:
    return _has("openvino")


def test_bf16_refused_on_a_cpu_without_bf16(optimized, monkeypatch, tmp_path):
    from edgeenc.export.optimize import optimize_bundle
    from edgeenc.runtime.backends import BackendUnavailable, plan_cpu

    bundle = tmp_path / "bundle"
    shutil.copytree(optimized[0], bundle)
    manifest = _edit_manifest(bundle, lambda m: m["variants"].update({"openvino:bf16": FORGED_BF16}))
    if _has_openvino():  # on a bf16 CPU `--variant bf16` alone finds OpenVINO's (ONNX Runtime has none)
        _pretend_cpu(monkeypatch, AVX512_NO_BF16 | {"avx512_bf16"})
        assert plan_cpu(bundle, manifest, None, "bf16").key == "openvino:bf16"
    _pretend_cpu(monkeypatch, AVX512_NO_BF16)
    assert not isa.has_bf16()
    with pytest.raises(BackendUnavailable, match=r"bf16|OpenVINO is not installed"):
        plan_cpu(bundle, manifest, "openvino", "bf16")
    if _has_openvino():
        with pytest.raises(BackendUnavailable, match=r"bf16 \(gated on a bf16 CPU\).*avx512_bf16"):
            plan_cpu(bundle, manifest, "openvino", "bf16")
        assert plan_cpu(bundle, manifest, "openvino", "fp32").precision == "fp32"
    # optimize on such a CPU does not write (or gate) a bf16 variant at all
    summary = optimize_bundle(bundle, quick=True, threads=2, int8=False, pick=False)
    entry = summary["openvino:bf16"]
    assert entry["parity"] is False and entry["written"] is False
    assert "avx512_bf16" in entry["reason"] or "not installed" in entry["reason"]

    from typer.testing import CliRunner

    from edgeenc.cli import app

    _edit_manifest(bundle, lambda m: m["variants"].update({"openvino:bf16": FORGED_BF16}))
    line = next(x for x in CliRunner().invoke(app, ["info", str(bundle)]).output.splitlines() if "openvino:bf16" in x)
    assert "NOT usable on this CPU (no bf16" in line


def test_a_copy_on_another_cpu_falls_back_and_says_so(optimized, monkeypatch, tmp_path):
    from edgeenc.runtime.encoder import Encoder

    bundle = tmp_path / "bundle"
    shutil.copytree(optimized[0], bundle)

    def as_if_timed_on_a_bf16_cpu(m):
        m["variants"]["openvino:bf16"] = FORGED_BF16
        m["variants"]["model.int8dyn.onnx"]["weights"] = "s8"
        m["cpu_default"].update(variant="openvino:bf16", timed_on={"cpu_model": "a bf16 CPU"}, ranking=[
            {"variant": v, "engine": "openvino" if v.startswith("openvino") else "onnxruntime", "p50_ms": t}
            for v, t in (("openvino:bf16", 1.0), ("model.int8dyn.onnx", 2.0), ("model.onnx", 3.0))])

    _edit_manifest(bundle, as_if_timed_on_a_bf16_cpu)
    _pretend_cpu(monkeypatch, AVX512_NO_BF16)  # VNNI: s8 int8 is valid here, bf16 is not
    encoder = Encoder.load(bundle, "cpu", threads=2)
    assert "model.int8dyn.onnx" in encoder.backend.description
    said = "\n".join(encoder.backend_log)
    assert "CPU default openvino:bf16" in said and "falling back to model.int8dyn.onnx" in said, said

    _pretend_cpu(monkeypatch, AVX2)  # no VNNI either: s8 weights saturate, only fp32 is left
    from edgeenc.runtime.backends import key_problem

    forged_int8 = {**FORGED_BF16, "precision": "int8", "weights": "s8"}
    problem = key_problem(bundle, {"variants": {"openvino:int8": forged_int8}}, "openvino:int8")
    assert "saturate" in problem or "not installed" in problem
    encoder = Encoder.load(bundle, "cpu", threads=2)
    said = "\n".join(encoder.backend_log)
    assert encoder.backend.description.startswith("onnxruntime") and "(model.onnx" in encoder.backend.description
    assert "falling back to model.onnx" in said and "saturates" in said, said

    _edit_manifest(bundle, lambda m: m["cpu_default"].update(ranking=m["cpu_default"]["ranking"][2:]))
    said = "\n".join(Encoder.load(bundle, "cpu", threads=2).backend_log)
    assert "was timed on a bf16 CPU, not this CPU" in said, said  # valid here, but timed elsewhere: said too


def test_without_openvino_everything_works_as_before(optimized, monkeypatch, tmp_path):
    from edgeenc.export.optimize import optimize_bundle
    from edgeenc.runtime.backends import BackendUnavailable
    from edgeenc.runtime.encoder import Encoder

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    bundle = tmp_path / "bundle"
    shutil.copytree(optimized[0], bundle)
    _edit_manifest(bundle, lambda m: m["cpu_default"]["ranking"].insert(
        0, {"variant": "openvino:fp32", "engine": "openvino", "p50_ms": 0.1}))
    _edit_manifest(bundle, lambda m: m["variants"].update({"openvino:fp32": {**FORGED_BF16, "precision": "fp32"}}))
    encoder = Encoder.load(bundle, "cpu", threads=2)
    assert encoder.backend.description.startswith("onnxruntime")
    assert "OpenVINO is not installed" in "\n".join(encoder.backend_log)
    with pytest.raises(BackendUnavailable, match="not installed"):
        Encoder.load(bundle, "cpu", threads=2, cpu_engine="openvino")

    summary = optimize_bundle(bundle, quick=True, threads=2, int8=False, timing_runs=2)
    for key in ("openvino:fp32", "openvino:bf16"):
        assert summary[key]["written"] is False and "pip install 'edgeenc[openvino]'" in summary[key]["reason"]
    assert {r["engine"] for r in summary["cpu_default"]["ranking"]} == {"onnxruntime"}
    assert Encoder.load(bundle, "cpu", threads=2).backend.description.startswith("onnxruntime")


def test_cli_engine_and_variant(optimized, birds_wav, tmp_path):
    pytest.importorskip("openvino")
    from typer.testing import CliRunner

    from edgeenc.cli import app

    bundle = optimized[0]
    for args, expected in ((["--cpu-engine", "openvino", "--variant", "fp32"], "openvino"),
                           (["--cpu-engine", "onnxruntime"], "onnxruntime")):
        out = tmp_path / f"{expected}.npz"
        result = CliRunner().invoke(app, ["embed", str(bundle), str(birds_wav), "-o", str(out), "--device", "cpu",
                                          "--threads", "2", *args])
        assert result.exit_code == 0, result.output
        assert f"running on cpu: {expected}" in result.output
        assert np.load(out)["embeddings"].shape[1] == 64
    result = CliRunner().invoke(app, ["embed", str(bundle), str(birds_wav), "-o", str(tmp_path / "x.npz"),
                                      "--cpu-engine", "tflite"])
    assert result.exit_code == 2 and "unknown engine 'tflite'" in result.output
