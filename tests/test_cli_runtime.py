"""`edgeenc embed` and `edgeenc classify` on tiny bundles: outputs, devices, bad files, windows, batching."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clirun import cli

from edgeenc.cli_common import ExitStatus
from edgeenc.runtime.writers import RAVEN_COLUMNS

BAD_KINDS = ("unreadable", "empty", "truncated", "zero_length", "nan")



def load_npz(path: Path) -> dict:
    with np.load(path) as data:  # no pickle needed
        return {k: data[k] for k in data.files}


# --- 6. outputs ----------------------------------------------------------------------------------


def test_embed_npz(tiny_eat_bundle, birds_wav, tmp_path):
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_eat_bundle[0], birds_wav, "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = load_npz(out)
    # 10.13 s: one 10 s window; the default drops the 0.13 s tail (--last short keeps it, see below)
    assert data["embeddings"].shape == (1, 64) and data["embeddings"].dtype == np.float32
    assert list(data["file"]) == [str(birds_wav)]
    np.testing.assert_allclose(data["start"], [0.0])
    np.testing.assert_allclose(data["end"], [10.0])
    meta = json.loads(str(data["metadata_json"]))
    assert meta["random_init"] == "true" and meta["files_failed"] == "0"
    assert "1 file(s) done, 0 failed" in result.stderr


def test_embed_csv(tiny_eat_bundle, birds_wav, tmp_path):
    out = tmp_path / "emb.csv"
    result = cli("embed", tiny_eat_bundle[0], birds_wav, "-o", out, "--window", "4")
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["file", "start", "end"]
    assert len(rows) == 3 and len(rows[0]) == 3 + 64
    assert [float(r["start"]) for r in rows] == [0.0, 4.0, 8.0]
    emb = np.array([[float(r[f"e{i}"]) for i in range(64)] for r in rows], np.float32)
    npz = tmp_path / "emb.npz"
    assert cli("embed", tiny_eat_bundle[0], birds_wav, "-o", npz, "--window", "4").exit_code == 0
    np.testing.assert_array_equal(emb, load_npz(npz)["embeddings"])  # csv floats round-trip exactly
    assert json.loads((tmp_path / "emb.csv.json").read_text())["model_id"] == "esp_aves2_sl_eat_all_ssl_all"


def read_detections(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classify_csv_top_k(tiny_eat_bundle, birds_wav, tmp_path):
    out = tmp_path / "det.csv"
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", out, "--top-k", "3", "--window", "5")
    assert result.exit_code == 0, result.output
    rows = read_detections(out)
    assert list(rows[0]) == ["file", "start", "end", "rank", "label", "score"]
    assert len(rows) == 2 * 3  # two windows (the 0.13 s tail is dropped), three labels each
    labels = json.loads((tiny_eat_bundle[0] / "labels.json").read_text())
    for start in ("0.0", "5.0"):
        window = [r for r in rows if r["start"] == start]
        assert [int(r["rank"]) for r in window] == [1, 2, 3]
        window_scores = [float(r["score"]) for r in window]
        assert all(0.0 <= s <= 1.0 for s in window_scores)
        assert window_scores == sorted(window_scores, reverse=True)
        assert all(r["label"] in labels for r in window)


def test_classify_threshold_filters(tiny_eat_bundle, birds_wav, tmp_path):
    everything = tmp_path / "all.csv"
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", everything, "--top-k", "10").exit_code == 0
    all_rows = read_detections(everything)
    assert len(all_rows) == 1 * 10  # one window (the 0.13 s tail is dropped), ten labels
    threshold = float(np.median([float(r["score"]) for r in all_rows]))
    kept = tmp_path / "kept.csv"
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", kept, "--top-k", "10", "--threshold", threshold)
    assert result.exit_code == 0, result.output
    rows = read_detections(kept)
    assert 0 < len(rows) < len(all_rows)
    assert all(float(r["score"]) >= threshold for r in rows)
    expected = [r for r in all_rows if float(r["score"]) >= threshold]
    assert [(r["start"], r["label"]) for r in rows] == [(r["start"], r["label"]) for r in expected]


def test_classify_raven_table(tiny_eat_bundle, birds_wav, tmp_path):
    out = tmp_path / "selections.txt"
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", out, "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(RAVEN_COLUMNS)
    rows = [dict(zip(RAVEN_COLUMNS, line.split("\t"))) for line in lines[1:]]
    assert len(rows) == 2  # one window, two labels
    assert [r["Selection"] for r in rows] == ["1", "2"]
    assert {r["Begin Path"] for r in rows} == {str(birds_wav)}
    assert float(rows[0]["End Time (s)"]) == 10.0 and float(rows[0]["High Freq (Hz)"]) == 8000.0
    assert all(0.0 <= float(r["Score"]) <= 1.0 for r in rows)


def test_classify_features_only_bundle_says_use_embed(tiny_beats_bundle, birds_wav, tmp_path):
    out = tmp_path / "det.csv"
    result = cli("classify", tiny_beats_bundle[0], birds_wav, "-o", out)
    assert result.exit_code == 2
    assert "no classifier head" in result.stderr and "edgeenc embed" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("last", "windows"), [("short", 2), ("pad", 2), ("drop", 1), ("auto", 1), (None, 1)])
def test_last_window_option(tiny_eat_bundle, birds_wav, tmp_path, last, windows):
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_eat_bundle[0], birds_wav, "-o", out, *(("--last", last) if last else ()))
    assert result.exit_code == 0, result.output
    data = load_npz(out)
    assert data["embeddings"].shape == (windows, 64)
    np.testing.assert_allclose(data["end"], [10.0, 10.13325][:windows])


def test_default_last_window_keeps_a_long_tail_and_a_short_file(tiny_eat_bundle, birds_wav, bad_audio_files,
                                                               tmp_path):
    out = tmp_path / "emb.npz"
    # 6 s windows on the 10.13 s recording: the 4.13 s tail is over half a window, so it stays
    result = cli("embed", tiny_eat_bundle[0], birds_wav, bad_audio_files["good_a"], "-o", out, "--window", "6")
    assert result.exit_code == 0, result.output
    data = load_npz(out)
    assert list(data["file"]) == [str(birds_wav)] * 2 + [str(bad_audio_files["good_a"])]
    np.testing.assert_allclose(data["start"], [0.0, 6.0, 0.0])
    np.testing.assert_allclose(data["end"], [6.0, 10.13325, 3.0])  # the 3 s file: its only window, kept
    for command in ("embed", "classify"):  # --help states the default (rich wraps it in a box: unwrap)
        text = " ".join(cli(command, "--help").output.replace("\u2502", " ").split())
        assert "--last" in text and "unless it is the file's only window" in text and "[default: auto]" in text


def test_batching_across_files(tiny_eat_bundle, birds_wav, bad_audio_files, tmp_path):
    files = [birds_wav, bad_audio_files["good_a"], bad_audio_files["good_b"]]
    outs = {}
    for batch in (1, 4):
        outs[batch] = tmp_path / f"b{batch}.npz"
        result = cli("embed", tiny_eat_bundle[0], *files, "-o", outs[batch], "--window", "2", "--batch", batch)
        assert result.exit_code == 0, result.output
    one, four = load_npz(outs[1]), load_npz(outs[4])
    # 2 s windows: 10.13 s -> 5 (its 0.13 s tail dropped), 3 s -> 2 (the 1 s tail stays), 4 s -> 2
    assert one["embeddings"].shape == four["embeddings"].shape == (5 + 2 + 2, 64)
    assert list(one["file"]) == list(four["file"])
    np.testing.assert_array_equal(one["start"], four["start"])
    np.testing.assert_allclose(one["embeddings"], four["embeddings"], atol=1e-4)


# --- 5. devices and threads ------------------------------------------------------------------------


def _have(provider: str) -> bool:
    import onnxruntime

    return provider in onnxruntime.get_available_providers()


def test_device_cpu_with_threads(tiny_beats_bundle, birds_wav, tmp_path):
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_beats_bundle[0], birds_wav, "-o", out, "--device", "cpu", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "running on cpu" in result.stderr and "1 threads" in result.stderr
    meta = json.loads(str(load_npz(out)["metadata_json"]))
    assert "CPUExecutionProvider" in meta["backend"] and "1 threads" in meta["backend"]


def test_device_cuda_is_an_error_naming_what_to_install(tiny_beats_bundle, birds_wav, tmp_path):
    if _have("CUDAExecutionProvider"):
        pytest.skip("this machine has onnxruntime-gpu")
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_beats_bundle[0], birds_wav, "-o", out, "--device", "cuda")
    assert result.exit_code == 2
    assert "onnxruntime-gpu" in result.stderr
    assert not out.exists()


def test_device_trt_is_an_error_naming_what_to_install(tiny_eat_bundle, birds_wav, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("this machine has TensorRT")
    except ImportError:
        pass
    out = tmp_path / "det.csv"
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", out, "--device", "trt")
    assert result.exit_code == 2
    assert "install" in result.stderr and "tensorrt" in result.stderr.lower()
    assert not out.exists()


def test_cpu_only_embed_prints_one_backend_line_and_verbose_says_why(tiny_beats_bundle, birds_wav, tmp_path):
    import importlib.util

    if _have("CUDAExecutionProvider") or importlib.util.find_spec("tensorrt"):
        pytest.skip("this machine has GPU software installed")
    result = cli("embed", tiny_beats_bundle[0], birds_wav, "-o", tmp_path / "emb.npz")
    assert result.exit_code == 0, result.output
    backend_lines = [line for line in result.stderr.splitlines()
                     if any(word in line for word in ("running on", "skipped", "TensorRT", "onnxruntime-gpu"))]
    assert len(backend_lines) == 1, result.stderr
    assert backend_lines[0].startswith("running on cpu: onnxruntime")
    assert backend_lines[0].endswith("(no GPU backend installed; -v for why)")
    verbose = cli("embed", tiny_beats_bundle[0], birds_wav, "-o", tmp_path / "emb2.npz", "-v")
    assert verbose.exit_code == 0, verbose.output
    assert "skipped trt:" in verbose.stderr and "JetPack" in verbose.stderr
    assert "skipped cuda:" in verbose.stderr and "onnxruntime-gpu" in verbose.stderr
    assert "running on cpu" in verbose.stderr and "-v for why" not in verbose.stderr


def test_explicit_missing_gpu_device_gets_the_full_message(tiny_beats_bundle, birds_wav, tmp_path):
    if _have("CUDAExecutionProvider"):
        pytest.skip("this machine has onnxruntime-gpu")
    result = cli("embed", tiny_beats_bundle[0], birds_wav, "-o", tmp_path / "emb.npz", "--device", "cuda")
    assert result.exit_code == 2
    assert "no CUDAExecutionProvider" in result.stderr and "install 'edgeenc[gpu]'" in result.stderr


# --- 3. bad input -----------------------------------------------------------------------------------


def _check_bad_run(result, bad_audio_files: dict[str, Path]) -> None:
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for kind in BAD_KINDS:
        path = str(bad_audio_files[kind])
        assert sum(line.startswith(f"error: {path}: ") for line in errors) == 1, (kind, errors)
    assert not any(str(bad_audio_files[k]) in line for k in ("good_a", "good_b") for line in errors)
    assert "2 file(s) done, 5 failed" in result.stderr


def test_embed_bad_files(tiny_eat_bundle, bad_audio_files, tmp_path):
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_eat_bundle[0], *bad_audio_files.values(), "-o", out, "--batch", "4")
    _check_bad_run(result, bad_audio_files)
    data = load_npz(out)
    assert list(data["file"]) == [str(bad_audio_files["good_a"]), str(bad_audio_files["good_b"])]
    assert data["embeddings"].shape == (2, 64) and np.isfinite(data["embeddings"]).all()
    assert json.loads(str(data["metadata_json"]))["files_failed"] == "5"


def test_classify_bad_files(tiny_eat_bundle, bad_audio_files, tmp_path):
    out = tmp_path / "det.csv"
    result = cli("classify", tiny_eat_bundle[0], *bad_audio_files.values(), "-o", out, "--top-k", "1")
    _check_bad_run(result, bad_audio_files)
    assert [r["file"] for r in read_detections(out)] == [str(bad_audio_files["good_a"]),
                                                          str(bad_audio_files["good_b"])]


def test_all_files_bad_still_exit_4(tiny_eat_bundle, bad_audio_files, tmp_path):
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_eat_bundle[0], bad_audio_files["empty"], bad_audio_files["nan"], "-o", out)
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED
    assert "0 file(s) done, 2 failed" in result.stderr
    assert load_npz(out)["embeddings"].shape == (0, 64)


# --- 7. a tampered bundle ---------------------------------------------------------------------------


def test_tampered_bundle(tiny_beats_bundle, birds_wav, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_beats_bundle[0], bundle)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    result = cli("embed", bundle, birds_wav, "-o", tmp_path / "emb.npz")
    assert result.exit_code == 2
    assert "model.onnx" in result.stderr and "changed since export" in result.stderr


# --- resuming an interrupted or partly failed run -------------------------------------------------


def test_embed_resumes_from_parts_and_cleans_up(tiny_eat_bundle, birds_wav, tmp_path):
    import soundfile as sf

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    samples, rate = sf.read(birds_wav, dtype="float32")
    for i in range(2):
        sf.write(inbox / f"good{i}.wav", samples[: (3 + i) * rate], rate)
    (inbox / "bad.wav").write_bytes(b"not audio at all")
    out = tmp_path / "emb.npz"
    first = cli("embed", tiny_eat_bundle[0], inbox, "-o", out, "--device", "cpu")
    assert first.exit_code == ExitStatus.SOME_FILES_FAILED, first.output
    parts = tmp_path / "emb.npz.parts"
    assert len(list(parts.glob("*.npz"))) == 2  # the finished files survive the failure
    assert "run again to resume" in first.stderr
    sf.write(inbox / "bad.wav", samples[: 2 * rate], rate)  # the user repairs the file
    second = cli("embed", tiny_eat_bundle[0], inbox, "-o", out, "--device", "cpu")
    assert second.exit_code == 0, second.output
    assert "resuming: 2 file(s) already done" in second.stderr
    assert not parts.exists()
    data = load_npz(out)
    assert sorted(set(data["file"])) == sorted(str(p) for p in inbox.glob("*.wav"))
    fresh = tmp_path / "fresh.npz"
    assert cli("embed", tiny_eat_bundle[0], inbox, "-o", fresh, "--device", "cpu").exit_code == 0
    np.testing.assert_allclose(data["embeddings"], load_npz(fresh)["embeddings"], atol=1e-5)


def test_a_changed_file_is_not_resumed_from_a_stale_part(tiny_eat_bundle, birds_wav, tmp_path):
    import os

    import soundfile as sf

    from edgeenc.hashing import sha256_file
    from edgeenc.runtime import WindowOptions
    from edgeenc.runtime.encoder import Encoder
    from edgeenc.runtime.resume import PartFolder, plan_files, run_identity

    samples, rate = sf.read(birds_wav, dtype="float32")
    wav = tmp_path / "a.wav"
    sf.write(wav, samples[: 3 * rate], rate)
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    (planned,), _ = plan_files(encoder, [str(wav)], WindowOptions())
    piece = planned.ranges[0]
    parts = PartFolder(tmp_path / "out.npz", run_identity(encoder, WindowOptions()))
    parts.save(wav, piece, encoder.embed_file(wav), sha256_file(wav))
    assert parts.load(wav, piece, sha256_file(wav)) is not None
    sf.write(wav, samples[: 4 * rate], rate)
    os.utime(wav, ns=(1, 1))
    assert parts.load(wav, piece, sha256_file(wav)) is None
    # Same name, size and mtime, other content: the sha256 kept in the part tells them apart.
    sf.write(wav, samples[: 3 * rate], rate)
    os.utime(wav, ns=(1, 1))
    parts.save(wav, piece, encoder.embed_file(wav), sha256_file(wav))
    sf.write(wav, samples[rate: 4 * rate], rate)
    os.utime(wav, ns=(1, 1))
    assert parts.load(wav, piece, sha256_file(wav)) is None


def test_embed_parquet_opens_in_pandas(tiny_eat_bundle, birds_wav, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out = tmp_path / "emb.parquet"
    assert cli("embed", tiny_eat_bundle[0], birds_wav, "-o", out, "--window", "4").exit_code == 0
    frame = pd.read_parquet(out)
    assert list(frame["start"]) == [0.0, 4.0, 8.0] and len(frame["embedding"][0]) == 64
    csv_out = tmp_path / "emb.csv"
    assert cli("embed", tiny_eat_bundle[0], birds_wav, "-o", csv_out, "--window", "4").exit_code == 0
    table = pd.read_csv(csv_out)
    np.testing.assert_allclose(table[[f"e{i}" for i in range(64)]].to_numpy(), np.stack(frame["embedding"]),
                               atol=1e-6)
