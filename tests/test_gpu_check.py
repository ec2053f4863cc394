"""benchmarks/gpu_check.py on a CPU machine: the dry run end to end, the fp16 islands it claims, and its
cuda-python buffer step against the cuda-python 12 and 13 stand-ins (the device run itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from trt_standins import install_cuda_python

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_cpu_step_and_names_the_gpu_steps_it_skipped(gpu_check, tmp_path, capsys):
    out = tmp_path / "figures" / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    steps = data["steps"]
    assert data["dry_run"] and {name: s["status"] for name, s in steps.items()} == {
        "environment": "ok", "torch_fp16_gate": "ok", "cuda_buffers": "skipped", "export": "ok",
        "tensorrt": "skipped", "ort_cuda": "skipped"}
    assert data["skipped"] == [f"{name}: dry run (no GPU step)" for name in ("cuda_buffers", "tensorrt", "ort_cuda")]
    assert "skipped: ['cuda_buffers: dry run" in capsys.readouterr().out
    gate = steps["torch_fp16_gate"]
    assert gate["passed"] and gate["device"] == "cpu" and gate["size"] == "tiny"
    assert {c["output"] for c in gate["comparisons"]} == {"tokens", "logits_top1", "embedding_centred"}
    # the islands of model.fp16.onnx, as the gate really ran them
    assert gate["precisions"] == {"front_end": "torch.float32", "patch_embedding_conv": "torch.float16",
                                  "ffn_gemm": "torch.float16", "attention_gemm": "torch.float16",
                                  "layer_norm": "torch.float32", "classifier_head": "torch.float32",
                                  "outputs": "torch.float32"}
    bundle = Path(steps["export"]["bundle"])
    assert steps["export"]["passed"] and (bundle / "model.fp16.onnx").is_file()
    assert steps["export"]["variants"]["model.fp16.onnx"]["parity"]


def test_a_failing_step_is_recorded_and_the_others_still_run(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path / "g.json", budget_s=60, dry_run=True)
    assert check.step("broken", lambda: 1 / 0) is None
    assert check.step("fine", lambda: {"x": 1}) == {"status": "ok", "x": 1, "seconds": 0.0}
    check.budget_s = -1
    assert check.step("late", lambda: {"x": 2}) is None
    saved = json.loads((tmp_path / "g.json").read_text())["steps"]
    assert saved["broken"]["status"] == "failed" and "ZeroDivisionError" in saved["broken"]["error"]
    assert saved["late"]["status"] == "skipped" and "time budget" in saved["late"]["reason"]


@pytest.mark.parametrize("cuda", ["12.2.0", "13.0.0"])
def test_cuda_buffer_step_copies_through_the_runtime_buffers(gpu_check, monkeypatch, cuda):
    from edgeenc.runtime.backends import tensorrt_backend as trt_rt

    cudart = install_cuda_python(monkeypatch, cuda)
    figures = gpu_check.cuda_buffers(trt_rt.import_cudart(), nbytes=1 << 16)
    assert figures["identical"] and figures["bytes"] == 1 << 16 and figures["stream_handle_is_int"]
    assert figures["gpu"]["name"] == "Orin" and cudart.heap == {} and cudart.streams == []
