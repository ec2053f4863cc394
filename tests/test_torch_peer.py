"""The PyTorch eager peers of `bench --compare-torch` and run_benchmarks.py (issue 26): fair rows in the same loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeenc.cli import app
from edgeenc.export.torch_peer import PeerUnavailable, TorchPeer, peer_checkpoint

runner = CliRunner()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_every_mode_runs_the_contracts_outputs(tiny_beats_bundle):
    import torch

    from edgeenc.export.onnx_export import OnnxGraph

    module = tiny_beats_bundle[1].module
    audio = np.random.default_rng(0).standard_normal((2, 32000)).astype(np.float32) * 0.1
    with torch.inference_mode():
        tokens, embedding = OnnxGraph(module.float().eval())(torch.from_numpy(audio))
    peers = {mode: TorchPeer(module, mode, 2) for mode in ("fp32", "bf16-autocast", "bf16")}
    outs = {mode: peer.run(audio) for mode, peer in peers.items()}
    np.testing.assert_array_equal(outs["fp32"]["embedding"], embedding.numpy())  # the model, unchanged
    for mode in ("bf16-autocast", "bf16"):
        assert peers[mode].precision == "bf16" and outs[mode]["tokens"].dtype == np.float32
        assert outs[mode]["tokens"].shape == tuple(tokens.shape)
        assert 0.98 < _cos(outs[mode]["tokens"], tokens.numpy()) < 1.0  # bf16 really ran, and stayed close
    assert next(module.parameters()).dtype == torch.float32  # the bf16 peer works on its own copy
    assert peers["bf16"].graph.model.fbank is not module.fbank
    assert "autocast" in peers["bf16-autocast"].description and peers["fp32"].variant == "pytorch eager fp32"
    with pytest.raises(ValueError, match="fp32, bf16-autocast, bf16"):
        TorchPeer(module, "fp16", 2)


def test_the_checkpoint_is_the_one_the_bundle_came_from(tmp_path):
    weights = tmp_path / "ckpt" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    bundle = tmp_path / "bundle"
    assert peer_checkpoint({"checkpoint": "hf://EarthSpeciesProject/x/w.safetensors"}, None, bundle) is None
    assert peer_checkpoint({"checkpoint": str(weights)}, None, bundle) == weights
    assert peer_checkpoint({"checkpoint": "ckpt/w.safetensors"}, None, bundle) == tmp_path / "ckpt" / "w.safetensors"
    assert peer_checkpoint({"checkpoint": "random-init"}, weights, bundle) == weights  # told: no guessing
    with pytest.raises(PeerUnavailable, match="random-init: pass --checkpoint"):
        peer_checkpoint({"checkpoint": "random-init"}, None, bundle)
    with pytest.raises(PeerUnavailable, match="gone.safetensors, which is not here: pass --checkpoint"):
        peer_checkpoint({"checkpoint": "gone.safetensors"}, None, bundle)
    with pytest.raises(PeerUnavailable, match="does not exist"):
        peer_checkpoint({}, tmp_path / "nope.safetensors", bundle)


def test_bench_times_the_peers_in_the_same_loop(tiny_beats_bundle):
    from edgeenc.runtime.bench import format_table, run_bench

    bundle, loaded = tiny_beats_bundle
    peers = [TorchPeer(loaded.module, mode, 2) for mode in ("fp32", "bf16-autocast")]
    report = run_bench(bundle, device="cpu", seconds=2.0, runs=2, warmup=1, threads=2, cold=False, peers=peers)
    torch_rows = [r for r in report["rows"] if r["backend"] == "torch"]
    assert [r["variant"] for r in torch_rows] == ["pytorch eager fp32", "pytorch eager bf16-autocast"]
    assert all(r["runs"] == 2 and r["limit"] == r["precision"] for r in torch_rows)  # own precision's limit
    cpu = next(r for r in report["rows"] if r["variant"] == "model.onnx")
    assert set(cpu["x_vs_torch"]) == {"pytorch eager fp32", "pytorch eager bf16-autocast"}
    fp32 = next(r for r in torch_rows if r["precision"] == "fp32")
    assert cpu["x_vs_torch"]["pytorch eager fp32"] == pytest.approx(fp32["p50_ms"] / cpu["p50_ms"])
    table = format_table(report)
    assert "vs PyTorch at batch 1: the fastest row" in table and "x pytorch eager bf16-autocast" in table


def test_cli_compare_torch_needs_the_weights(tiny_beats_bundle, tmp_path):
    bundle = tiny_beats_bundle[0]
    assert json.loads((bundle / "manifest.json").read_text())["checkpoint"] == "random-init"
    result = runner.invoke(app, ["bench", str(bundle), "--device", "cpu", "--compare-torch", "--no-cold"])
    assert result.exit_code == 2 and "random-init: pass --checkpoint" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["bench", str(bundle), "--checkpoint", str(tmp_path)])
    assert result.exit_code == 2 and "--checkpoint is for --compare-torch" in result.output
