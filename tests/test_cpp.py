"""The C++ consumer (cpp/): built with cpp/build.sh, checked against `edgeenc embed` / `classify`.

The bars are the issue's: same windows, starts and ends within 1 ms, per-window embedding cosine
>= 0.9999 and max abs <= 1e-3, the same top-1 label; and one-line refusals with their exit codes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeenc.cli import app

REPO_ROOT = Path(__file__).resolve().parents[1]
BIRDS_WAV = REPO_ROOT / "edgeenc" / "data" / "birds_10s.wav"
TIME_TOLERANCE = 1e-3  # seconds
MIN_COSINE = 0.9999
MAX_ABS = 1e-3
EXIT_USAGE, EXIT_MODEL, EXIT_AUDIO = 2, 3, 4


@pytest.fixture(scope="session")
def edgeenc_embed() -> Path:
    """cpp/build.sh (installs what is missing, then an incremental CMake build) -> the binary.

    CI is Debian as root, where the build must work: a failure there fails the tests. Only where
    build.sh cannot install the toolchain (not root, or no apt) are they skipped, loudly.
    """
    proc = subprocess.run(["bash", str(REPO_ROOT / "cpp" / "build.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr + proc.stdout).strip().splitlines()[-4:])
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            reason = f"C++ consumer NOT TESTED: cpp/build.sh cannot install its toolchain (not root/no apt): {tail}"
            warnings.warn(reason, stacklevel=1)
            pytest.skip(reason)
        pytest.fail(f"cpp/build.sh failed (exit {proc.returncode}): {tail}")
    return REPO_ROOT / "cpp" / "build" / "edgeenc-embed"


def run_cpp(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=120)


def cpp_json(binary: Path, *args) -> dict:
    proc = run_cpp(binary, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def python_embed(bundle: Path, audio: Path, tmp_path: Path, *options: str) -> dict:
    out = tmp_path / "python.npz"
    result = CliRunner().invoke(app, ["embed", str(bundle), str(audio), "-o", str(out), "--device", "cpu", *options])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        return {k: data[k] for k in ("start", "end", "embeddings")}


def assert_same_windows(cpp: dict, python: dict) -> None:
    windows = cpp["windows"]
    assert len(windows) == len(python["start"]), "a different number of windows"
    np.testing.assert_allclose([w["start"] for w in windows], python["start"], rtol=0, atol=TIME_TOLERANCE)
    np.testing.assert_allclose([w["end"] for w in windows], python["end"], rtol=0, atol=TIME_TOLERANCE)
    ours = np.array([w["embedding"] for w in windows], dtype=np.float64)
    theirs = python["embeddings"].astype(np.float64)
    assert ours.shape == theirs.shape
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= MIN_COSINE, f"per-window cosine {cosine.min():.7f} < {MIN_COSINE}"
    assert np.abs(ours - theirs).max() <= MAX_ABS, f"max abs {np.abs(ours - theirs).max():.2e} > {MAX_ABS}"


@pytest.fixture(scope="module")
def stereo_flac(tmp_path_factory) -> Path:
    """The recording at 44.1 kHz, stereo (two different channels), 24-bit FLAC: downmix + a 441/160 resample."""
    import soundfile as sf
    import soxr

    samples, rate = sf.read(BIRDS_WAV, dtype="float32")
    upsampled = soxr.resample(samples, rate, 44100)
    path = tmp_path_factory.mktemp("cpp-audio") / "stereo44k.flac"
    sf.write(path, np.stack([upsampled, 0.5 * upsampled[::-1]], axis=1), 44100, subtype="PCM_24")
    return path


# --- the same numbers as the Python runtime -----------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [(), ("--window", "8"), ("--window", "4"), ("--window", "4", "--hop", "3"), ("--window", "3", "--hop", "4"),
     ("--last", "short"), ("--last", "pad"), ("--last", "drop"), ("--window", "2", "--batch", "3")],
    # auto (the default) drops the 0.13 s tail, drops a 2.13 s tail of an 8 s window (under half of
    # it) and keeps a 2.13 s tail of a 4 s window.
    ids=["default", "auto-half", "auto-keeps", "overlap", "gaps", "short", "pad", "drop", "batch3"],
)
def test_tiny_eat_matches_python_embed(edgeenc_embed, tiny_eat_bundle, tmp_path, options):
    bundle = tiny_eat_bundle[0]
    assert_same_windows(cpp_json(edgeenc_embed, bundle, BIRDS_WAV, *options),
                        python_embed(bundle, BIRDS_WAV, tmp_path, *options))


def test_file_shorter_than_a_second_is_one_window(edgeenc_embed, tiny_eat_bundle, tmp_path):
    import soundfile as sf

    samples, rate = sf.read(BIRDS_WAV, dtype="float32")
    clip = tmp_path / "half_second.wav"
    sf.write(clip, samples[: rate // 2], rate)
    cpp = cpp_json(edgeenc_embed, tiny_eat_bundle[0], clip)
    assert len(cpp["windows"]) == 1
    assert_same_windows(cpp, python_embed(tiny_eat_bundle[0], clip, tmp_path))


def test_stereo_44k_flac_is_downmixed_and_resampled_like_python(edgeenc_embed, tiny_eat_bundle, stereo_flac, tmp_path):
    bundle = tiny_eat_bundle[0]
    cpp = cpp_json(edgeenc_embed, bundle / "model.onnx", stereo_flac)
    assert_same_windows(cpp, python_embed(bundle, stereo_flac, tmp_path))
    assert cpp["sample_rate"] == 16000 and cpp["random_init"] is True


def test_tiny_beats_features_only_matches_python_embed(edgeenc_embed, tiny_beats_bundle, tmp_path):
    bundle = tiny_beats_bundle[0]
    assert_same_windows(cpp_json(edgeenc_embed, bundle, BIRDS_WAV), python_embed(bundle, BIRDS_WAV, tmp_path))


def python_top1(bundle: Path, audio: Path, tmp_path: Path) -> list[str]:
    out = tmp_path / "python.csv"
    result = CliRunner().invoke(app, ["classify", str(bundle), str(audio), "-o", str(out), "--top-k", "1"])
    assert result.exit_code == 0, result.output
    with out.open() as f:
        return [row["label"] for row in csv.DictReader(f)]


def test_classifier_top1_and_text_output(edgeenc_embed, tiny_eat_bundle, tmp_path):
    bundle = tiny_eat_bundle[0]
    labels = bundle / "labels.json"
    cpp = cpp_json(edgeenc_embed, bundle, BIRDS_WAV, "--labels", labels, "--top-k", "3")
    assert [w["top_k"][0]["label"] for w in cpp["windows"]] == python_top1(bundle, BIRDS_WAV, tmp_path)
    scores = [s["score"] for s in cpp["windows"][0]["top_k"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and cpp["activation"] == "sigmoid"
    python = tmp_path / "python3.csv"  # the scores of classify, by the same (the head's) activation
    assert CliRunner().invoke(app, ["classify", str(bundle), str(BIRDS_WAV), "-o", str(python), "--top-k", "3"]
                              ).exit_code == 0
    with python.open() as f:
        np.testing.assert_allclose(scores, [float(r["score"]) for r in csv.DictReader(f)][:3], atol=1e-4)
    # The text forms: "start end v0 ... vN-1", and tab-separated label/score pairs with --labels.
    plain = run_cpp(edgeenc_embed, bundle, BIRDS_WAV)
    rows = [line.split(" ") for line in plain.stdout.splitlines()]
    assert plain.returncode == 0 and [len(r) for r in rows] == [2 + 64] * len(cpp["windows"])
    np.testing.assert_allclose(np.array(rows, dtype=float)[:, 2:], [w["embedding"] for w in cpp["windows"]], rtol=1e-6)
    ranked = run_cpp(edgeenc_embed, bundle, BIRDS_WAV, "--labels", labels, "--top-k", "2").stdout.splitlines()
    assert [line.split("\t")[2] for line in ranked] == [w["top_k"][0]["label"] for w in cpp["windows"]]
    assert "random weights" in plain.stderr


def test_an_attached_probe_is_the_default_head(edgeenc_embed, tiny_probe_bundle, probe_set, tmp_path):
    """The metadata of an attached bundle names the probe's output, classes and activation: the same program
    prints the probe's labels and scores, as `edgeenc classify` does."""
    attached = tiny_probe_bundle[0]
    wav = probe_set[0] / "pulses" / "pulses_2.wav"
    cpp = cpp_json(edgeenc_embed, attached, wav, "--window", "2", "--labels", attached / "probe_labels.json",
                   "--top-k", "3")
    assert cpp["activation"] == "softmax" and [w["top_k"][0]["label"] for w in cpp["windows"]] == ["pulses"] * 3
    out = tmp_path / "python.csv"
    result = CliRunner().invoke(app, ["classify", str(attached), str(wav), "-o", str(out), "--window", "2",
                                      "--top-k", "3"])
    assert result.exit_code == 0, result.output
    with out.open() as f:
        python = [(r["label"], float(r["score"])) for r in csv.DictReader(f)]
    got = [(t["label"], t["score"]) for w in cpp["windows"] for t in w["top_k"]]
    assert [g[0] for g in got] == [p[0] for p in python]
    np.testing.assert_allclose([g[1] for g in got], [p[1] for p in python], atol=1e-5)


@pytest.mark.slow
def test_full_size_eat_matches_python(edgeenc_embed, full_eat_bundle, tmp_path):
    bundle = full_eat_bundle[0]
    cpp = cpp_json(edgeenc_embed, bundle, BIRDS_WAV, "--labels", bundle / "labels.json")
    assert_same_windows(cpp, python_embed(bundle, BIRDS_WAV, tmp_path))
    assert [w["top_k"][0]["label"] for w in cpp["windows"]] == python_top1(bundle, BIRDS_WAV, tmp_path)


# --- refusals: a non-zero exit and one line naming the file and the problem ---------------------


def assert_refused(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeenc-embed: error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def test_refuses_missing_and_corrupt_model(edgeenc_embed, tmp_path):
    missing = tmp_path / "nowhere" / "model.onnx"
    assert_refused(run_cpp(edgeenc_embed, missing, BIRDS_WAV), EXIT_MODEL, str(missing), "does not exist")
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    assert_refused(run_cpp(edgeenc_embed, corrupt, BIRDS_WAV), EXIT_MODEL, str(corrupt), "ONNX Runtime cannot load it")


def test_refuses_model_without_metadata_naming_what_is_missing(edgeenc_embed, tiny_beats_bundle, tmp_path):
    import onnx

    model = onnx.load(str(tiny_beats_bundle[0] / "model.onnx"))
    kept = [p for p in model.metadata_props if p.key not in ("min_samples", "licence")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    partial = tmp_path / "partial.onnx"
    onnx.save(model, str(partial))
    assert_refused(run_cpp(edgeenc_embed, partial, BIRDS_WAV), EXIT_MODEL, str(partial),
                   "metadata_props lacks min_samples, licence")

    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    assert_refused(run_cpp(edgeenc_embed, bare, BIRDS_WAV), EXIT_MODEL,
                   "lacks model_id, sample_rate, window_seconds, min_samples, embedding_dim, licence, random_init")


@pytest.mark.parametrize("kind", ["unreadable", "empty", "truncated", "zero_length", "nan"])
def test_refuses_bad_audio(edgeenc_embed, tiny_beats_bundle, bad_audio_files, kind):
    path = bad_audio_files[kind]
    reason = {"unreadable": "libsndfile cannot read it", "empty": "file is empty", "truncated": "truncated",
              "zero_length": "no audio samples", "nan": "NaN"}[kind]
    assert_refused(run_cpp(edgeenc_embed, tiny_beats_bundle[0], path), EXIT_AUDIO, str(path), reason)


def test_refuses_missing_audio_and_input_shorter_than_the_minimum(edgeenc_embed, tiny_beats_bundle, tmp_path):
    import soundfile as sf

    bundle = tiny_beats_bundle[0]
    missing = tmp_path / "gone.wav"
    assert_refused(run_cpp(edgeenc_embed, bundle, missing), EXIT_AUDIO, str(missing), "does not exist")
    minimum = json.loads((bundle / "manifest.json").read_text())["min_samples"]
    short = tmp_path / "short.wav"
    sf.write(short, np.full(minimum - 1, 0.1, np.float32), 16000)
    assert_refused(run_cpp(edgeenc_embed, bundle, short), EXIT_AUDIO, str(short),
                   f"{minimum - 1} samples at 16000 Hz is shorter than the model's minimum of {minimum}")


def test_refuses_bad_options(edgeenc_embed, tiny_beats_bundle, tiny_eat_bundle):
    assert_refused(run_cpp(edgeenc_embed, tiny_beats_bundle[0], BIRDS_WAV, "--last", "most"), EXIT_USAGE,
                   "auto, short, pad, drop")
    assert_refused(run_cpp(edgeenc_embed, tiny_beats_bundle[0], BIRDS_WAV, "--labels",
                           tiny_eat_bundle[0] / "labels.json"), EXIT_USAGE, "no classifier head")
