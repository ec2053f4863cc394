"""`edgeenc export`: ONNX graph, parity gate, bundle and `edgeenc info`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edgeenc.cli import app
from edgeenc.export import pipeline
from edgeenc.export.onnx_export import read_metadata
from edgeenc.export.parity import ParityCase, error_stats, rowwise_cosine, run_fp32_gate
from edgeenc.export.pipeline import export_bundle, ort_runner
from edgeenc.models.checkpoints import load_model
from edgeenc.runtime.bundle import read_manifest, verify_bundle

TINY_BEATS = dict(embed_dim=64, depth=2, heads=4, ffn_dim=128, patch_dim=32, conv_pos=16, conv_pos_groups=4)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_eat(tiny_eat_bundle):
    """(bundle, loaded) of conftest's tiny random-init EAT with a classifier."""
    return tiny_eat_bundle


def run_onnx(path: Path, audio: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"audio": audio.astype(np.float32)})))


def test_tiny_bundle_layout_and_manifest(tiny_eat):
    bundle, loaded = tiny_eat
    assert read_manifest(bundle)["parity"]["fp32"]["passed"]
    assert {p.name for p in bundle.iterdir()} >= {"model.onnx", "manifest.json", "labels.json", "parity.json"}
    manifest = read_manifest(bundle)
    assert manifest["model_id"] == "esp_aves2_sl_eat_all_ssl_all"
    assert manifest["random_init"] is True and manifest["checkpoint_sha256"] is None
    assert manifest["licence"] == "CC-BY-NC-SA-4.0"
    assert manifest["status"] == "ok"
    assert set(manifest["files"]) == {"model.onnx", "labels.json", "parity.json"}
    assert [o["name"] for o in manifest["outputs"]] == ["tokens", "embedding", "logits"]
    assert set(manifest["versions"]) >= {"edgeenc", "torch", "onnx"}
    assert json.loads((bundle / "labels.json").read_text()) == loaded.labels
    parity = json.loads((bundle / "parity.json").read_text())
    rows = parity["reports"][0]["comparisons"]
    assert {"case", "output", "max_abs", "mean_abs", "min_cosine", "passed"} <= set(rows[0])
    assert {r["case"] for r in rows} >= {"real_recording", "4s_batch1", "4s_batch3", "10s_batch1", "14s_batch1"}
    assert verify_bundle(bundle) == []


def test_graph_io_metadata_and_ops(tiny_eat):
    bundle, _ = tiny_eat
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["audio"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "samples"]
    assert [o.name for o in model.graph.output] == ["tokens", "embedding", "logits"]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"DFT", "STFT", "MelWeightMatrix"}
    meta = read_metadata(model)
    assert meta["model_id"] == "esp_aves2_sl_eat_all_ssl_all"
    assert meta["sample_rate"] == "16000" and meta["embedding_dim"] == "64" and meta["window_seconds"] == "10.0"
    assert meta["licence"] == "CC-BY-NC-SA-4.0" and meta["edgeenc_version"]
    check = read_manifest(bundle)["tensorrt_op_check"]
    assert check["all_supported"], check


def test_dynamic_batch_and_length(tiny_eat):
    bundle, loaded = tiny_eat
    rng = np.random.default_rng(1)
    for batch, samples in [(1, 400), (2, 16000), (5, 170000)]:
        out = run_onnx(bundle / "model.onnx", rng.standard_normal((batch, samples)) * 0.1)
        assert out["tokens"].shape == (batch, 513, 64)
        assert out["embedding"].shape == (batch, 64)
        assert out["logits"].shape == (batch, len(loaded.labels))
        np.testing.assert_allclose(out["embedding"], out["tokens"].mean(axis=1), atol=1e-4)


def test_broken_graph_fails_the_gate(tiny_eat, tmp_path):
    bundle, loaded = tiny_eat
    model = onnx.load(str(bundle / "model.onnx"))
    # Scale the largest MatMul weight (a transformer layer) by 1 %: a subtle, realistic export bug.
    matmul_inputs = {name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for name in n.input}
    target = max((t for t in model.graph.initializer if t.name in matmul_inputs), key=lambda t: np.prod(t.dims))
    weights = onnx.numpy_helper.to_array(target) * 1.01
    target.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float32), target.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    names = ["tokens", "embedding", "logits"]
    audio = np.random.default_rng(0).standard_normal((1, 32000)).astype(np.float32) * 0.1
    report, _ = run_fp32_gate(loaded, ort_runner(broken, names), names, [ParityCase("noise", audio)])
    assert not report.passed
    assert report.failures()
    good, _ = run_fp32_gate(loaded, ort_runner(bundle / "model.onnx", names), names,
                            [ParityCase("noise", audio)])
    assert good.passed


def test_failed_parity_marks_bundle_and_exits_nonzero(tmp_path, monkeypatch):
    def noisy_runner(path, names, threads=None):
        run = ort_runner(path, names, threads)
        return lambda audio: {k: v + 0.01 for k, v in run(audio).items()}

    monkeypatch.setattr(pipeline, "ort_runner", noisy_runner)
    loaded = load_model("esp_aves2_naturelm_audio_v1_beats", random_init=True, **TINY_BEATS)
    result = export_bundle(loaded, tmp_path / "b")
    assert not result.passed
    manifest = read_manifest(tmp_path / "b")
    assert manifest["status"] == "failed-parity"
    assert (tmp_path / "b" / "model.onnx").is_file()  # still written, marked failed
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert parity["passed"] is False


def test_info_verifies_hashes_and_names_a_changed_file(tiny_eat, tmp_path):
    import shutil

    bundle = tmp_path / "copy"
    shutil.copytree(tiny_eat[0], bundle)
    ok = runner.invoke(app, ["info", str(bundle)])
    assert ok.exit_code == 0, ok.output
    assert "esp_aves2_sl_eat_all_ssl_all" in ok.output and "all file hashes match" in ok.output
    labels = bundle / "labels.json"
    labels.write_text(labels.read_text().replace("random_class_0", "tampered"))
    bad = runner.invoke(app, ["info", str(bundle)])
    assert bad.exit_code == 2  # as every other command refuses the same bundle
    assert "labels.json" in bad.output and "changed" in bad.output
    (bundle / "parity.json").unlink()
    gone = runner.invoke(app, ["info", str(bundle)])
    assert "parity.json: missing" in gone.output


def test_info_on_a_folder_that_is_not_a_bundle(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "manifest.json" in result.output


def test_export_offline_names_the_fixes(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    result = runner.invoke(app, ["export", "esp_aves2_sl_eat_all_ssl_all", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "--checkpoint" in result.output and "--random-init" in result.output
    assert not (tmp_path / "b").exists()


def test_export_rejects_unknown_model_id(tmp_path):
    result = runner.invoke(app, ["export", "esp_aves2_no_such_model", "--random-init", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown model id" in result.output and "esp_aves2_sl_eat_all_ssl_all" in result.output


def test_models_lists_every_id_and_the_avex_difference():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    from edgeenc.models.registry import MODELS

    for model_id in MODELS:
        assert model_id in result.output
    assert "avex 1.4.0 silently loads none" in result.output


GOLDEN_CASES = ["birds_10s", "birds_3p3s", "birds_batch2_4s"]


def _check_against_golden(bundle: Path, golden: Path, outputs: list[str]) -> None:
    for case in GOLDEN_CASES:
        ref = np.load(golden / f"{case}.npz")
        got = run_onnx(bundle / "model.onnx", ref["audio"])
        for name in outputs:
            assert got[name].shape == ref[name].shape, (case, name)
            max_abs, _, min_cos = error_stats(got[name], ref[name])
            assert max_abs <= 2e-3, (case, name, max_abs)
            assert min_cos >= 0.99999, (case, name, min_cos)


@pytest.mark.slow
def test_full_beats_export_passes_gate_and_matches_avex(make_checkpoint, fixtures_dir, tmp_path_factory):
    loaded = load_model("esp_aves2_naturelm_audio_v1_beats", make_checkpoint("beats", 0))
    out = tmp_path_factory.mktemp("beats-bundle")
    result = runner.invoke(app, ["export", "esp_aves2_naturelm_audio_v1_beats", "--checkpoint",
                                 str(make_checkpoint("beats", 0)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["status"] == "ok" and manifest["random_init"] is False
    assert manifest["checkpoint_sha256"] == loaded.checkpoint_sha256
    parity = json.loads((out / "parity.json").read_text())
    cases = {c["case"] for c in parity["reports"][0]["comparisons"]}
    assert cases == {"real_recording", "1s_batch1", "1s_batch3", "3p3s_batch1", "3p3s_batch3", "10s_batch1",
                     "10s_batch3", "30s_batch1"}
    assert all(c["passed"] for c in parity["reports"][0]["comparisons"])
    _check_against_golden(out, fixtures_dir / "golden" / "beats", ["tokens", "embedding"])
    # 1.37 s: fewer frames than a whole number of patches, the dropped-frames edge.
    ref = np.load(fixtures_dir / "golden" / "beats" / "birds_1p37s.npz")
    got = run_onnx(out / "model.onnx", ref["audio"])
    assert got["tokens"].shape == ref["tokens"].shape
    assert rowwise_cosine(got["tokens"], ref["tokens"]).min() >= 0.99999


@pytest.mark.slow
def test_full_eat_export_passes_gate_and_matches_avex(full_eat_bundle, fixtures_dir):
    bundle, loaded = full_eat_bundle
    manifest = read_manifest(bundle)
    assert manifest["status"] == "ok"
    assert manifest["num_classes"] == 12 and manifest["classifier_pooling"] == "cls"
    assert json.loads((bundle / "labels.json").read_text()) == loaded.labels
    _check_against_golden(bundle, fixtures_dir / "golden" / "eat", ["tokens", "embedding", "logits"])


def test_reexport_removes_stale_variants_and_engines(tmp_path):
    loaded = load_model("esp_aves2_naturelm_audio_v1_beats", random_init=True, **TINY_BEATS)
    out = tmp_path / "b"
    export_bundle(loaded, out)
    (out / "model.int8dyn.onnx").write_bytes(b"old variant")
    (out / "engines").mkdir()
    (out / "engines" / "model.fp16.x.engine").write_bytes(b"old engine")
    (out / "engines" / "model.fp16.x.json").write_text("{}")
    (out / "engines" / "timing.x.cache").write_bytes(b"cache")
    export_bundle(loaded, out)
    assert not (out / "model.int8dyn.onnx").exists()
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["timing.x.cache"]
    assert verify_bundle(out) == []


def test_demo_says_offline_and_runs_flagged_random_weights(tmp_path, monkeypatch):
    from edgeenc.models import checkpoints

    real = checkpoints.load_model

    def offline(model_id, checkpoint=None, *, random_init=False, **kwargs):
        if not random_init:
            raise checkpoints.CheckpointUnavailable("offline; pass --checkpoint PATH or --random-init")
        return real(model_id, random_init=True, embed_dim=64, depth=2, heads=4, max_length=64)

    monkeypatch.setattr(checkpoints, "load_model", offline)
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    # 10.13 s: one window, the 0.13 s tail is dropped
    assert "RANDOM weights" in result.output and "birds_10s.wav: 1 window(s)" in result.output
    assert "#1  random_class_" in result.output
    assert read_manifest(tmp_path / "demo")["random_init"] is True
    stop = runner.invoke(app, ["demo", "-o", str(tmp_path / "d2"), "--no-random-init-if-offline"])
    assert stop.exit_code == 2 and "--checkpoint" in stop.output
