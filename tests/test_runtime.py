"""The torch-free runtime API (edgeenc.runtime.encoder.Encoder) against our PyTorch models.

Fast tests use tiny random-init bundles (conftest: tiny_eat_bundle, tiny_beats_bundle); the
full-size parity test is marked slow and shares conftest's full_eat_bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgeenc.runtime.audio import AudioError, load
from edgeenc.runtime.backends import BackendUnavailable
from edgeenc.runtime.bundle import BundleError
from edgeenc.runtime.encoder import Encoder

# The fp32 parity thresholds of DESIGN.md, applied here to the pooled embedding (and logits).
MAX_ABS = 2e-3
MIN_COSINE = 0.99999


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def torch_outputs(loaded, audio: np.ndarray, starts: np.ndarray, ends: np.ndarray, rate: int):
    """PyTorch embedding (tokens.mean(1)) and logits (or None) of each window [start, end) of `audio`."""
    import torch

    embeddings, logits = [], []
    module = loaded.module.eval()
    with torch.no_grad():
        for start, end in zip(starts, ends):
            window = audio[int(round(start * rate)) : int(round(end * rate))]
            tokens = module.forward_features(torch.from_numpy(np.ascontiguousarray(window))[None])
            embeddings.append(tokens.mean(1)[0].numpy())
            if loaded.labels:
                logits.append(module.forward_head(tokens)[0].numpy())
    return np.stack(embeddings), (np.stack(logits) if logits else None)


def check_parity(bundle: Path, loaded, wav: Path) -> None:
    encoder = Encoder.load(bundle, "cpu")
    # last="short": the 0.13 s remainder is a clip of its own, compared with avex at that length (the
    # default would drop it: windowing decides which clips a long file gives, not what a clip returns).
    result = encoder.embed_file(wav, last="short")
    # The runtime resamples with soxr HQ (streaming); audio.load gives exactly those samples.
    audio = load(wav, encoder.sample_rate)
    # 10.13 s: one 10 s window, and the 0.13 s remainder when it reaches min_samples.
    remainder = len(audio) - 10 * encoder.sample_rate
    expected = 2 if remainder >= encoder.min_samples else 1
    assert len(result) == expected
    np.testing.assert_allclose(result.starts, [0.0, 10.0][:expected])
    np.testing.assert_allclose(result.ends, [10.0, len(audio) / encoder.sample_rate][:expected])
    emb, logits = torch_outputs(loaded, audio, result.starts, result.ends, encoder.sample_rate)
    assert result.embeddings.shape == emb.shape == (expected, encoder.embedding_dim)
    diff = np.abs(result.embeddings - emb).max()
    assert diff <= MAX_ABS, f"embedding max abs {diff:.3e} > {MAX_ABS}"
    cos = cosine(result.embeddings, emb).min()
    assert cos >= MIN_COSINE, f"embedding min cosine {cos:.7f} < {MIN_COSINE}"
    if loaded.labels:
        assert result.logits is not None and result.logits.shape == logits.shape
        diff = np.abs(result.logits - logits).max()
        assert diff <= MAX_ABS, f"logits max abs {diff:.3e} > {MAX_ABS}"
        cos = cosine(result.logits, logits).min()
        assert cos >= MIN_COSINE, f"logits min cosine {cos:.7f} < {MIN_COSINE}"
        np.testing.assert_array_equal(result.logits.argmax(1), logits.argmax(1))
    else:
        assert result.logits is None


# --- 1. parity with PyTorch on the real recording ----------------------------------------------


def test_parity_tiny_eat_real_recording(tiny_eat_bundle, birds_wav):
    check_parity(*tiny_eat_bundle, birds_wav)


def test_parity_tiny_beats_real_recording(tiny_beats_bundle, birds_wav):
    check_parity(*tiny_beats_bundle, birds_wav)


@pytest.mark.slow
def test_parity_full_eat_real_recording(full_eat_bundle, birds_wav):
    bundle, loaded = full_eat_bundle
    assert loaded.labels and len(loaded.labels) == 12
    check_parity(bundle, loaded, birds_wav)


def test_embed_array_equals_embed_file(tiny_eat_bundle, birds_wav):
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    samples, rate = sf.read(birds_wav, dtype="float32")
    from_array = encoder.embed(samples, rate)
    from_file = encoder.embed_file(birds_wav)
    assert from_array.file is None
    np.testing.assert_allclose(from_array.starts, from_file.starts)
    np.testing.assert_allclose(from_array.embeddings, from_file.embeddings, atol=1e-5)


# --- 3. bad input: a per-file error naming the file, the others complete -----------------------


# what each kind's message must say
BAD_REASONS = {
    "unreadable": "cannot read",
    "empty": "empty",
    "truncated": "truncated",
    "zero_length": "no audio samples",
    "nan": "NaN",
}


@pytest.fixture
def bad_inputs(bad_audio_files) -> dict[str, Path]:
    return bad_audio_files


def test_embed_files_bad_inputs(tiny_eat_bundle, bad_inputs):
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    paths = list(bad_inputs.values())
    outcomes = list(encoder.embed_files(paths, batch_size=4))
    assert [o.path for o in outcomes] == [str(p) for p in paths]  # one per file, in order
    by_name = dict(zip(bad_inputs, outcomes))
    for name in ("good_a", "good_b"):
        outcome = by_name[name]
        assert outcome.error is None, outcome.error
        assert outcome.result is not None and outcome.result.embeddings.shape == (1, encoder.embedding_dim)
        assert np.isfinite(outcome.result.embeddings).all()
    for name, reason in BAD_REASONS.items():
        outcome = by_name[name]
        assert outcome.result is None
        assert outcome.error and reason.lower() in outcome.error.lower(), (name, outcome.error)
    # The good files give what they give alone: a bad neighbour in the batch changes nothing.
    alone = encoder.embed_file(bad_inputs["good_b"])
    np.testing.assert_allclose(by_name["good_b"].result.embeddings, alone.embeddings, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_embed_file_bad_input_raises_naming_the_file(tiny_beats_bundle, bad_inputs, name):
    encoder = Encoder.load(tiny_beats_bundle[0], "cpu")
    with pytest.raises(AudioError) as info:
        encoder.embed_file(bad_inputs[name])
    assert str(bad_inputs[name]) in str(info.value)
    assert BAD_REASONS[name].lower() in str(info.value).lower()


def test_embed_array_with_nan_is_an_error(tiny_beats_bundle):
    encoder = Encoder.load(tiny_beats_bundle[0], "cpu")
    samples = np.zeros(16000, np.float32)
    samples[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encoder.embed(samples, 16000)


# --- 4. formats ----------------------------------------------------------------------------------


def _mp3_writable() -> bool:
    return "MP3" in sf.available_formats() and "MPEG_LAYER_III" in sf.available_subtypes("MP3")


@pytest.fixture(scope="module")
def format_variants(birds_wav, tmp_path_factory) -> dict[str, Path]:
    """The real recording as wav (original), flac, 44.1 kHz stereo int16 wav and (if writable) mp3."""
    import soxr

    folder = tmp_path_factory.mktemp("formats")
    samples, rate = sf.read(birds_wav, dtype="int16")
    variants = {"wav": birds_wav}
    variants["flac"] = folder / "birds.flac"
    sf.write(variants["flac"], samples, rate, subtype="PCM_16")
    up = soxr.resample(samples.astype(np.float32) / 32768, rate, 44100, quality="VHQ")
    stereo = np.clip(np.round(np.stack([up, up], axis=1) * 32767), -32768, 32767).astype(np.int16)
    variants["wav44k_stereo"] = folder / "birds_44k_stereo.wav"
    sf.write(variants["wav44k_stereo"], stereo, 44100, subtype="PCM_16")
    if _mp3_writable():
        variants["mp3"] = folder / "birds.mp3"
        sf.write(variants["mp3"], samples.astype(np.float32) / 32768, rate, format="MP3", subtype="MPEG_LAYER_III")
    return variants


# name -> (min cosine, max abs) against the original wav.
# flac is bit-exact PCM. The 44.1 kHz stereo copy went through one more resampling and int16
# rounding, so it differs at the ~1e-4 level of the signal. MP3 is lossy (perceptual quantisation
# noise, a low-pass near 16 kHz that resampling to 16 kHz would remove anyway) and its decoded
# length and alignment depend on the encoder's padding, so it gets a looser bound.
FORMAT_TOLERANCE = {"flac": (0.999999, 1e-5), "wav44k_stereo": (0.999, 1e-2), "mp3": (0.999, 5e-2)}


@pytest.mark.parametrize("name", ["flac", "wav44k_stereo", "mp3"])
def test_formats_give_same_windows_and_embeddings(tiny_eat_bundle, format_variants, name):
    if name not in format_variants:
        pytest.skip("this libsndfile cannot write MP3")
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    reference = encoder.embed_file(format_variants["wav"], last="short")  # the 0.13 s tail checks the length
    result = encoder.embed_file(format_variants[name], last="short")
    assert len(result) == len(reference) == 2
    np.testing.assert_allclose(result.starts, reference.starts)
    # 10.133 s at 32 kHz and at 44.1 kHz both resample to the same count of 16 kHz samples (one at most apart).
    np.testing.assert_allclose(result.ends, reference.ends, atol=1.5 / encoder.sample_rate)
    min_cos, max_abs = FORMAT_TOLERANCE[name]
    cos = cosine(result.embeddings, reference.embeddings).min()
    diff = np.abs(result.embeddings - reference.embeddings).max()
    assert cos > min_cos, f"{name}: min cosine {cos:.7f}"
    assert diff < max_abs, f"{name}: max abs {diff:.3e}"


# --- 5. device selection -------------------------------------------------------------------------


def test_device_cpu_and_threads(tiny_beats_bundle):
    encoder = Encoder.load(tiny_beats_bundle[0], "cpu", threads=1)
    assert encoder.backend.name == "cpu"
    assert "CPUExecutionProvider" in encoder.backend.description
    assert "1 threads" in encoder.backend.description
    assert encoder.metadata["backend"] == encoder.backend.description
    options = encoder.backend.session.get_session_options()
    assert options.intra_op_num_threads == 1


def _have(provider: str) -> bool:
    import onnxruntime

    return provider in onnxruntime.get_available_providers()


def test_device_cuda_unavailable_names_what_to_install(tiny_beats_bundle):
    if _have("CUDAExecutionProvider"):
        pytest.skip("this machine has onnxruntime-gpu")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        Encoder.load(tiny_beats_bundle[0], "cuda")


def test_device_trt_unavailable_names_what_to_install(tiny_beats_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("this machine has TensorRT")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="(?i)tensorrt") as info:
        Encoder.load(tiny_beats_bundle[0], "trt")
    assert "install" in str(info.value)


def test_device_auto_logs_why_others_were_skipped(tiny_beats_bundle, caplog):
    if _have("CUDAExecutionProvider"):
        pytest.skip("this machine has onnxruntime-gpu")
    with caplog.at_level("INFO", logger="edgeenc.runtime"):
        encoder = Encoder.load(tiny_beats_bundle[0], "auto")
    assert encoder.backend.name == "cpu"
    log = encoder.backend_log
    assert any(line.startswith("skipped trt:") for line in log), log
    assert any(line.startswith("skipped cuda:") and "onnxruntime-gpu" in line for line in log), log
    assert log[-1].startswith("running on cpu")
    assert "skipped trt" in caplog.text and "skipped cuda" in caplog.text


def test_unknown_device_is_an_error(tiny_beats_bundle):
    with pytest.raises(ValueError, match="unknown device"):
        Encoder.load(tiny_beats_bundle[0], "tpu")


# --- 6. windows and batching (API) ----------------------------------------------------------------


def test_last_window_policy(tiny_eat_bundle, birds_wav):
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")  # min_samples 400: the 0.13 s remainder counts
    short = encoder.embed_file(birds_wav, last="short")
    padded = encoder.embed_file(birds_wav, last="pad")
    dropped = encoder.embed_file(birds_wav, last="drop")
    assert (len(short), len(padded), len(dropped)) == (2, 2, 1)
    np.testing.assert_allclose(short.ends, padded.ends)  # end is the last real sample, also when padded
    np.testing.assert_allclose(short.embeddings[0], dropped.embeddings[0], atol=1e-5)


def test_batching_across_files_matches_batch_one(tiny_eat_bundle, bad_inputs, birds_wav):
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    paths = [birds_wav, bad_inputs["good_a"], bad_inputs["good_b"], birds_wav]
    options = {"window_seconds": 2.0, "hop_seconds": 1.5}
    one = list(encoder.embed_files(paths, batch_size=1, **options))
    four = list(encoder.embed_files(paths, batch_size=4, **options))
    assert [o.error for o in one + four] == [None] * 8
    for a, b in zip(one, four):
        assert a.path == b.path
        np.testing.assert_allclose(a.result.starts, b.result.starts)
        np.testing.assert_allclose(a.result.ends, b.result.ends)
        np.testing.assert_allclose(a.result.embeddings, b.result.embeddings, atol=1e-4)
        np.testing.assert_allclose(a.result.logits, b.result.logits, atol=1e-4)
    assert len(one[0].result) == 7  # 10.13 s, 2 s windows every 1.5 s: 6 full + a 1.13 s remainder


# --- 7. a tampered bundle -------------------------------------------------------------------------


def test_tampered_bundle_is_refused(tiny_beats_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_beats_bundle[0], bundle)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx"):
        Encoder.load(bundle, "cpu")


def test_backend_failure_costs_only_the_files_in_that_batch(tiny_eat_bundle, birds_wav, tmp_path):
    import soundfile as sf

    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    samples, rate = sf.read(birds_wav, dtype="float32")
    paths = []
    for i, seconds in enumerate((2.0, 3.0, 2.0)):  # 2 s windows batch together, the 3 s one alone
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], samples[: int(seconds * rate)], rate)
    real_run = encoder.backend.run

    def flaky(audio):
        if audio.shape[1] == 3 * encoder.sample_rate:
            raise RuntimeError("simulated device error")
        return real_run(audio)

    encoder.backend.run = flaky
    outcomes = list(encoder.embed_files(paths, window_seconds=10.0, batch_size=4))
    assert [o.path for o in outcomes] == [str(p) for p in paths]
    assert outcomes[0].error is None and outcomes[2].error is None
    assert "simulated device error" in outcomes[1].error and str(paths[1]) == outcomes[1].path
    assert len(outcomes[0].result) == 1 and len(outcomes[2].result) == 1


def test_cuda_message_names_the_conflicting_onnxruntime_packages(tiny_beats_bundle, monkeypatch):
    from edgeenc.runtime.backends import onnxruntime_backend as backends

    monkeypatch.setattr(backends, "ort_distributions", lambda: ["onnxruntime 1.32.0", "onnxruntime-gpu 1.32.0"])
    with pytest.raises(backends.BackendUnavailable, match="both onnxruntime 1.32.0 and onnxruntime-gpu"):
        Encoder.load(tiny_beats_bundle[0], "cuda")


def test_ort_tensorrt_provider_is_opt_in_with_an_engine_cache(tiny_beats_bundle, monkeypatch, tmp_path):
    """Without a GPU, check what the session is asked for: TensorRT EP (fp16, cache in the bundle), then CUDA."""
    import shutil

    import onnxruntime

    from edgeenc.runtime.backends import onnxruntime_backend as backends

    bundle = tmp_path / "b"
    shutil.copytree(tiny_beats_bundle[0], bundle)
    asked = {}

    class FakeSession:
        def __init__(self, path, options, providers):
            asked.update(path=path, providers=providers)

        def get_providers(self):
            return [p[0] if isinstance(p, tuple) else p for p in asked["providers"]]

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setenv("EDGEENC_ORT_TENSORRT", "1")
    backend = backends.cuda_backend(bundle, ["embedding"])
    assert backend.name == "trt"
    (name, options), *rest = asked["providers"]
    assert name == "TensorrtExecutionProvider"
    assert rest == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    # fp16 from model.fp16.onnx's Casts (a strongly typed network), never the weak-typing trt_fp16_enable
    assert "trt_fp16_enable" not in options and asked["path"].endswith("model.onnx")  # no fp16 file: fp32
    (bundle / "model.fp16.onnx").write_bytes(b"")  # FakeSession never reads it
    backends.cuda_backend(bundle, ["embedding"])
    assert asked["path"].endswith("model.fp16.onnx") and "trt_fp16_enable" not in asked["providers"][0][1]
    assert options["trt_engine_cache_path"].startswith(str(bundle / "engines"))
    monkeypatch.delenv("EDGEENC_ORT_TENSORRT")
    backends.cuda_backend(bundle, ["embedding"])
    assert asked["providers"] == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "__version__", "1.17.3")  # no use_tf32 option yet: none is passed
    backends.cuda_backend(bundle, ["embedding"])
    assert asked["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_sed_birdcode_runs_at_32_khz_end_to_end(birds_wav, tmp_path):
    """The one id fed 32 kHz: the rate travels in the manifest and ONNX metadata, not as a constant."""
    import onnx
    import soundfile as sf
    import torch

    from edgeenc.export.onnx_export import read_metadata
    from edgeenc.export.pipeline import export_bundle
    from edgeenc.models.checkpoints import load_model

    loaded = load_model("esp_aves2_sed_birdcode_beats_encoder", random_init=True, embed_dim=64, depth=2, heads=4,
                        ffn_dim=128, patch_dim=32, conv_pos=16, conv_pos_groups=4)
    bundle = tmp_path / "sed"
    assert export_bundle(loaded, bundle).passed
    assert read_metadata(onnx.load(str(bundle / "model.onnx")))["sample_rate"] == "32000"
    encoder = Encoder.load(bundle, "cpu")
    assert encoder.sample_rate == 32000 and encoder.window_seconds == 5.0
    result = encoder.embed_file(birds_wav)  # the recording is 32 kHz: no resampling
    np.testing.assert_allclose(result.starts, [0.0, 5.0])  # the 0.13 s tail is dropped by default
    samples, rate = sf.read(birds_wav, dtype="float32")
    assert rate == 32000
    with torch.no_grad():
        ref = loaded.module.forward_features(torch.from_numpy(samples[None, : 5 * rate])).mean(1).numpy()
    np.testing.assert_allclose(result.embeddings[0], ref[0], atol=2e-3)
    assert float(np.dot(result.embeddings[0], ref[0]) / np.linalg.norm(ref) / np.linalg.norm(result.embeddings[0])) \
        >= 0.99999
