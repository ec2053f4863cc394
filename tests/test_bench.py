"""`edgeenc bench --json` and `edgeenc optimize` on a tiny random-init BEATs bundle (fast)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from edgeenc.cli import app


@pytest.fixture(scope="module")
def tiny_bundle(tiny_beats_bundle):
    return tiny_beats_bundle[0]


@pytest.fixture(scope="module")
def optimized(aliased_beats_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "bundle"
    shutil.copytree(aliased_beats_bundle, out)
    result = CliRunner().invoke(app, ["optimize", str(out), "--threads", "2"])
    assert result.exit_code == 0, result.output
    return out


def test_bench_json_fields(optimized, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(optimized), "--device", "cpu", "--batch", "1", "--batch", "2",
                                      "--seconds", "2", "--runs", "3", "--warmup", "1", "--threads", "2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "% limit" in result.output and "fp32 limit" in result.output
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in ("cpu_model", "cpus_available", "isa", "onnxruntime_version", "tensorrt_version", "jetson_power_mode"):
        assert key in machine
    assert "avx512f" in machine["isa"] or not machine["isa"]
    assert report["flops_per_clip"] > 0 and report["flops"]["by_op"]
    fp32 = report["limits"]["fp32"]
    candidates = [fp32["numpy"]["gflops"], fp32["onnxruntime"]["gflops"], (fp32.get("openvino") or {}).get("gflops", 0)]
    assert fp32["gflops"] == max(candidates) > 0
    assert "gpu_memory_mb" in report and report["bench_process_peak_rss_mb"] > 0
    variants = {r["variant"] for r in report["rows"]}
    assert {"model.onnx", "model.cpu.onnx"} <= variants
    assert {r["batch"] for r in report["rows"]} == {1, 2}
    for row in report["rows"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["rtf"] > 0 and row["clips_per_s"] > 0
        precision = row["precision"]
        assert row["limit"] == ("int8" if "int8" in precision else "bf16" if precision == "bf16" else "fp32")
        assert 0 < row["percent_of_limit"] <= 100 and not row["above_limit"]
        assert row["cold_start_s"] > row["session_load_s"] > 0
        assert row["peak_rss_mb"] > 0


def test_flops_scale_with_length(tiny_bundle):
    from edgeenc.runtime.bench import bench_audio, count_flops

    short = count_flops(tiny_bundle / "model.onnx", bench_audio(16000, 2.0, 1))["flops"]
    long = count_flops(tiny_bundle / "model.onnx", bench_audio(16000, 4.0, 1))["flops"]
    two = count_flops(tiny_bundle / "model.onnx", bench_audio(16000, 2.0, 2))["flops"]
    assert long > 1.8 * short  # linear layers double, attention quadruples
    assert two == pytest.approx(2 * short, rel=1e-6)


def test_optimize_writes_preferred_cpu_model(optimized):
    from edgeenc.runtime.backends import plan_cpu
    from edgeenc.runtime.bundle import read_manifest, verify_bundle
    from edgeenc.runtime.encoder import Encoder

    manifest = read_manifest(optimized)
    entry = manifest["variants"]["model.cpu.onnx"]
    assert entry["parity"] is True and entry["precision"] == "fp32"
    assert entry["figures"]["max_abs"] <= 2e-3 and entry["figures"]["min_token_cosine"] >= 0.99999
    assert entry["fused_operators"]
    # both aliased shapes of the tiny model were rewritten, and the gate above still passed
    assert entry["layout"]["hidden_padded"] == 2 and entry["layout"]["conv_taps_padded"] == 1
    assert not any(p.name.startswith(".") for p in optimized.iterdir())  # the quantisers' staging file is gone
    if (optimized / "model.int8dyn.onnx").is_file():  # the quantisers start from the rewritten graph
        import onnx

        dims = {tuple(i.dims) for i in onnx.load(str(optimized / "model.int8dyn.onnx")).graph.initializer}
        assert (1040, 64) in dims and (64, 1040) in dims
    assert manifest["variants"]["model.onnx"]["parity"] is True  # the export's entry survives the merge
    for name in ("model.int8dyn.onnx", "model.int8.onnx"):
        v = manifest["variants"][name]
        assert v["figures"]["min_token_cosine"] is not None
        assert v["parity"] == (optimized / name).is_file()  # only passing files stay in the bundle
    assert manifest["variants"]["model.bf16.onnx"]["written"] is False
    assert verify_bundle(optimized) == []
    untimed = {k: v for k, v in manifest.items() if k != "cpu_default"}
    assert plan_cpu(optimized, untimed).key == "model.cpu.onnx"  # preferred over model.onnx before any timing
    choice = manifest["cpu_default"]  # after timing, the fastest valid variant runs (tests/test_openvino.py)
    encoder = Encoder.load(optimized, "cpu", threads=choice["threads"])
    assert encoder.backend.description == choice["ranking"][0]["description"]


def test_runtime_offers_only_gated_variants(optimized):
    from edgeenc.runtime.backends import BackendUnavailable
    from edgeenc.runtime.bundle import read_manifest
    from edgeenc.runtime.encoder import Encoder

    manifest = read_manifest(optimized)
    passed = [k for k, v in manifest["variants"].items() if v.get("parity") and "int8" in k and k.startswith("model.")]
    for name in passed:
        variant = name[len("model.") : -len(".onnx")]
        encoder = Encoder.load(optimized, "auto", variant=variant)
        assert name in encoder.backend.description
    if (manifest["variants"].get("openvino:bf16") or {}).get("parity"):  # ORT has no bf16: OpenVINO's runs
        assert "openvino" in Encoder.load(optimized, "cpu", variant="bf16").backend.description
    else:
        with pytest.raises(BackendUnavailable, match=r"bf16.*(did not pass its quality gate|none of avx512_bf16)"):
            Encoder.load(optimized, "cpu", variant="bf16")
    with pytest.raises(BackendUnavailable, match="not in this bundle"):
        Encoder.load(optimized, "cpu", variant="int4")
    with pytest.raises(BackendUnavailable, match="cpu only"):
        Encoder.load(optimized, "cuda", variant="int8dyn")
    assert "model.onnx" in Encoder.load(optimized, "cpu", variant="fp32").backend.description


def test_int8_that_fails_its_gate_is_retried_with_ffn_down_projections_in_fp32(aliased_beats_bundle, tmp_path,
                                                                             monkeypatch):
    """The control flow of the fallback: a first attempt the gate rejects is retried once with each block's
    fc2 in fp32, and both attempts are recorded (the full EAT fixture needs it: centred cosine 0.988)."""
    import onnx

    from edgeenc.export import optimize as opt
    from edgeenc.runtime.bundle import read_manifest

    out = tmp_path / "bundle"
    shutil.copytree(aliased_beats_bundle, out)
    real_gate, calls = opt.compare, []

    def first_attempt_fails(name, *args, **kwargs):
        report = real_gate(name, *args, **kwargs)
        calls.append(name)
        if name.startswith("model.int8") and calls.count(name) == 1:
            report.passed = False  # stands in for an int8 fc2 that breaks quality
        return report

    monkeypatch.setattr(opt, "compare", first_attempt_fails)
    opt.optimize_bundle(out, dynamic=True, quick=True, threads=2)
    assert calls.count("model.int8dyn.onnx") == 2 and calls.count("model.int8.onnx") == 2
    manifest = read_manifest(out)
    entry = manifest["variants"]["model.int8dyn.onnx"]
    assert entry["parity"] is True and len(entry["failed_attempts"]) == 1
    assert entry["failed_attempts"][0]["fp32_nodes_kept"] == 0
    kept = entry["fp32_nodes_kept"]
    assert len(kept) == 2 and all("fc2" in name for name in kept)  # one per block, found by the widest K
    model = onnx.load(str(out / "model.int8dyn.onnx"))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    fp32_fc2 = [n for n in model.graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) == (1040, 64)]
    assert len(fp32_fc2) == 2  # still plain fp32 MatMuls on the padded fc2 weights


def test_bench_limit_ignores_a_forced_openblas_core(tiny_bundle, tmp_path, monkeypatch):
    """OPENBLAS_CORETYPE=Haswell in the environment (as on shared machines) slows numpy, never the limit's
    numpy run: the child runs without it, the report names it, and no row is above 100 % of its limit."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--device", "cpu", "--seconds", "2", "--runs", "2",
                                      "--warmup", "1", "--threads", "2", "--no-cold", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    limits = report["limits"]
    assert limits["blas_overrides"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert "OPENBLAS_CORETYPE=Haswell" in result.output
    numpy = limits["fp32"]["numpy"]
    assert numpy["child_blas_env"] is not None and "OPENBLAS_CORETYPE" not in numpy["child_blas_env"]
    assert limits["numpy_with_overrides"]["child_blas_env"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert limits["fp32"]["winner"] in result.output
    assert limits["fp32"]["onnxruntime"]["per_shape"]["2048x2048x2048"] > 0
    assert len(limits["shapes"]) >= 2  # the model's own GEMM shapes, then the square
    assert report["rows"] and all(0 < r["percent_of_limit"] <= 100 for r in report["rows"])


def test_a_row_above_its_limit_says_the_limit_is_wrong():
    from edgeenc.runtime.bench import apply_limits, format_table

    numpy = {"gflops": 50.0}
    limits = {"fp32": {"gflops": 100.0, "winner": "numpy", "numpy": numpy,
                       "onnxruntime": {"gflops": 80.0, "best_shape": "2048x2048x2048"}},
              "int8": {"gflops": 400.0, "winner": "onnxruntime MatMulInteger u8 x s8 2048x2048x2048"},
              "blas_overrides": {}, "shapes": ["2048x2048x2048"]}
    rows = [{"backend": "cpu", "variant": "model.cpu.onnx", "precision": "fp32", "batch": 1, "achieved_gflops": 150.0},
            {"backend": "cpu", "variant": "model.int8.onnx", "precision": "int8", "batch": 1, "achieved_gflops": 150.0},
            {"backend": "trt", "variant": "engine", "precision": "fp16", "batch": 1, "achieved_gflops": 900.0}]
    problems = apply_limits(rows, limits)
    assert rows[0]["above_limit"] and rows[0]["percent_of_limit"] is None
    assert rows[1]["limit"] == "int8" and rows[1]["percent_of_limit"] == pytest.approx(37.5)
    assert rows[2]["limit"] is None and rows[2]["percent_of_limit"] is None  # CPU limits say nothing of a GPU
    assert len(problems) == 1 and "model.cpu.onnx" in problems[0] and "the limit is wrong" in problems[0]
    for row in rows:
        row.update(p50_ms=1.0, p90_ms=1.0, p99_ms=1.0, rtf=1.0, x_real_time=1.0, real_time_factor=1.0,
                   clips_per_s=1.0)
    report = {"model_id": "m", "clip_seconds": 2.0, "threads": 2, "gflop_per_clip": 1.0, "limits": limits,
              "machine": {"cpu_model": "x", "cpus_available": 2, "isa": {}}, "rows": rows,
              "limit_problems": problems}
    table = format_table(report)
    assert "LIMIT WRONG" in table and table.count("over!") == 1 and "int8 limit 400.0 GFLOP/s" in table
