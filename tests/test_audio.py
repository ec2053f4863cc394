"""Decoding recorder audio: formats, rates, channels, block reading and every way a file can be bad."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from edgeenc.runtime.audio import AudioError, AudioInfo, iter_blocks, load, probe
from edgeenc.runtime.windows import iter_windows


def _birds_recording() -> Path:
    # Resolved here, not through conftest's shared_dir fixture, so these runtime tests need no torch.
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(os.environ["EDGEENC_SHARED"])] if os.environ.get("EDGEENC_SHARED") else []
    for root in [*roots, repo / "shared", repo.parent / "shared"]:
        if (root / "audio" / "birds_10s.wav").is_file():
            return root / "audio" / "birds_10s.wav"
    return repo / "shared" / "audio" / "birds_10s.wav"


BIRDS = _birds_recording()
needs_birds = pytest.mark.skipif(not BIRDS.is_file(), reason=f"real recording not found at {BIRDS}; set EDGEENC_SHARED")


def chirp(seconds: float, rate: int, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(seed)
    sweep = 0.4 * np.sin(2 * np.pi * (300 * t + 600 * t**2))
    return (sweep + noise * rng.standard_normal(t.size)).astype(np.float32)


def aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Best correlation of b shifted against a by up to max_lag samples (codecs add delay)."""
    best, best_lag = -1.0, 0
    n = min(len(a), len(b)) - 2 * max_lag
    for lag in range(-max_lag, max_lag + 1):
        x = a[max_lag : max_lag + n]
        y = b[max_lag + lag : max_lag + lag + n]
        c = float(np.corrcoef(x, y)[0, 1])
        if c > best:
            best, best_lag = c, lag
    return best, best_lag


@needs_birds
def test_probe_describes_the_real_recording() -> None:
    info = probe(BIRDS)
    assert info == AudioInfo(
        path=str(BIRDS),
        sample_rate=32000,
        channels=1,
        frames=info.frames,
        duration_seconds=info.frames / 32000,
        format="WAV",
        subtype="PCM_16",
    )
    assert info.duration_seconds == pytest.approx(10.133, abs=1e-3)


@needs_birds
def test_real_recording_blocks_equal_whole_file_resampling() -> None:
    whole, rate = sf.read(BIRDS, dtype="float32")
    expected = soxr.resample(whole, rate, 16000, quality="HQ")
    blocks = list(iter_blocks(BIRDS, 16000, block_seconds=1.7))
    assert all(b.dtype == np.float32 and b.ndim == 1 and b.flags.c_contiguous for b in blocks)
    got = np.concatenate(blocks)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_same_audio_in_every_format_gives_the_same_samples(tmp_path: Path) -> None:
    rate = 22050
    x = chirp(2.0, rate)
    reference = soxr.resample(x, rate, 16000, quality="HQ")
    variants = {"wav": {"subtype": "PCM_16"}, "flac": {}, "ogg": {}, "mp3": {}}
    for ext, kwargs in variants.items():
        path = tmp_path / f"chirp.{ext}"
        try:
            sf.write(path, x, rate, **kwargs)
        except (sf.LibsndfileError, TypeError, ValueError) as e:
            if ext == "mp3":
                pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write mp3: {e}")
            raise
        got = load(path, 16000)
        if ext in ("wav", "flac"):
            # Lossless up to 16-bit quantisation.
            assert got.shape == reference.shape
            assert np.max(np.abs(got - reference)) < 1e-3
            continue
        # Lossy codecs. libsndfile 1.2 trims MP3 encoder delay using the LAME tag (lengths then match
        # exactly), older builds may not: allow 5 ms and compare after the best small shift.
        assert abs(len(got) - len(reference)) <= 0.005 * 16000, ext
        corr, lag = aligned_correlation(reference, got, max_lag=80)
        assert corr > 0.99, (ext, corr, lag)


def test_stereo_44k_int16_and_mono_16k_float_give_the_same_windows(tmp_path: Path) -> None:
    # No broadband noise: the top of the band would not survive a round trip through soxr's filters.
    mono16 = chirp(3.3, 16000, noise=0.0)
    left = soxr.resample(mono16, 16000, 44100, quality="HQ")
    stereo = np.stack([left, left], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 44100, subtype="PCM_16")
    sf.write(tmp_path / "mono.wav", mono16, 16000, subtype="FLOAT")

    # last="short": the 0.3 s tail checks that both files end at the same sample
    a = list(iter_windows(iter_blocks(tmp_path / "stereo.wav", 16000, block_seconds=0.7), 16000, 1.0, last="short"))
    b = list(iter_windows(iter_blocks(tmp_path / "mono.wav", 16000), 16000, 1.0, last="short"))
    assert [(w.start_seconds, w.end_seconds) for w in a] == [(w.start_seconds, w.end_seconds) for w in b]
    assert len(a) == 4 and a[-1].end_seconds == pytest.approx(3.3)
    # Away from the file edges (filter ringing) two resamplings and int16 agree to ~3e-5.
    for wa, wb in zip(a[1:-1], b[1:-1], strict=True):
        assert np.max(np.abs(wa.samples - wb.samples)) < 2e-4


def test_mean_downmix_and_channel_selection(tmp_path: Path) -> None:
    rate = 16000
    left = chirp(0.5, rate, seed=1)
    right = -0.5 * chirp(0.5, rate, seed=2)
    third = np.full_like(left, 0.25)
    path = tmp_path / "three.wav"
    sf.write(path, np.stack([left, right, third], axis=1), rate, subtype="FLOAT")

    np.testing.assert_allclose(load(path, rate), (left + right + third) / 3, atol=1e-7)
    np.testing.assert_array_equal(load(path, rate, channel=0), left)
    np.testing.assert_array_equal(load(path, rate, channel=1), right)
    np.testing.assert_array_equal(load(path, rate, channel=2), third)


@pytest.mark.parametrize("channel", [3, -1])
def test_out_of_range_channel_names_the_channel_count(tmp_path: Path, channel: int) -> None:
    path = tmp_path / "three.wav"
    sf.write(path, np.zeros((100, 3), np.float32), 16000)
    with pytest.raises(AudioError, match="has 3 channel") as e:
        load(path, 16000, channel=channel)
    assert e.value.path == str(path)


def test_long_file_is_read_in_bounded_blocks(tmp_path: Path) -> None:
    rate, seconds = 8000, 600
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(3)
    pieces = []
    with sf.SoundFile(path, "w", rate, 1, subtype="FLOAT") as f:
        for _ in range(seconds // 60):
            piece = (0.1 * rng.standard_normal(60 * rate)).astype(np.float32)
            f.write(piece)
            pieces.append(piece)
    expected = soxr.resample(np.concatenate(pieces), rate, 16000, quality="HQ")

    sizes, got = [], []
    for block in iter_blocks(path, 16000, block_seconds=5):
        sizes.append(len(block))
        got.append(block)
    assert max(sizes) <= 5 * 16000 * 1.1
    got_all = np.concatenate(got)
    assert got_all.shape == expected.shape
    assert np.max(np.abs(got_all - expected)) <= 1e-4


def test_matching_rate_is_not_resampled(tmp_path: Path) -> None:
    x = chirp(1.0, 16000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load(tmp_path / "a.wav", 16000), x)


def test_int_subtypes_are_scaled_to_unit_range(tmp_path: Path) -> None:
    x = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    sf.write(tmp_path / "i.wav", x, 8000, subtype="PCM_16")
    np.testing.assert_allclose(load(tmp_path / "i.wav", 8000), x / 32768.0)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="does not exist") as e:
        probe(path)
    assert str(e.value) == f"{path}: file does not exist"
    with pytest.raises(AudioError, match="does not exist"):
        list(iter_blocks(path, 16000))


def test_not_audio_names_the_libsndfile_message(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_bytes(b"these are field notes, not a recording\n" * 20)
    with pytest.raises(AudioError, match="libsndfile cannot read it: Format not recognised") as e:
        load(path, 16000)
    assert str(e.value).startswith(str(path))


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="0 bytes.*contains no audio samples"):
        probe(path)


def test_valid_header_with_zero_frames(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="contains no audio samples"):
        load(path, 16000)


@pytest.mark.parametrize("ext", ["wav", "aiff"])
def test_truncated_header_file_is_detected(tmp_path: Path, ext: str) -> None:
    # libsndfile shortens such files silently; the error must still say where the audio stops.
    full = tmp_path / f"full.{ext}"
    sf.write(full, chirp(2.0, 16000), 16000, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"truncated or corrupt after 0\.99\d s"):
        probe(cut)
    with pytest.raises(AudioError, match="truncated or corrupt"):
        load(cut, 16000)


@pytest.mark.parametrize("ext", ["flac", "mp3"])
def test_truncated_compressed_file_is_detected(tmp_path: Path, ext: str) -> None:
    full = tmp_path / f"full.{ext}"
    try:
        sf.write(full, chirp(3.0, 16000), 16000)
    except sf.LibsndfileError as e:
        pytest.skip(f"this libsndfile cannot write {ext}: {e}")
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated or corrupt after") as e:
        load(cut, 16000)
    assert e.value.path == str(cut)


def test_unfinalised_streaming_header_is_read_as_far_as_it_goes(tmp_path: Path) -> None:
    # Writers that stream to a pipe leave 0xFFFFFFFF as the data size: unknown, not truncated.
    x = chirp(1.0, 16000)
    path = tmp_path / "stream.wav"
    sf.write(path, x, 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    assert len(load(path, 16000)) == len(x)


def test_nan_samples_say_at_which_second(tmp_path: Path) -> None:
    x = chirp(3.0, 8000)
    x[int(2.5 * 8000)] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"NaN or infinite samples, the first at 2\.500 s"):
        load(path, 16000)
    with pytest.raises(AudioError, match=r"at 2\.500 s"):
        list(iter_blocks(path, 16000, block_seconds=0.3))


def test_inf_sample_in_one_channel(tmp_path: Path) -> None:
    x = np.zeros((800, 2), np.float32)
    x[400, 1] = np.inf
    path = tmp_path / "inf.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"at 0\.050 s"):
        load(path, 8000)


def test_audio_error_survives_pickling() -> None:
    e = pickle.loads(pickle.dumps(AudioError("a.wav", "file does not exist")))
    assert (e.path, e.reason, str(e)) == ("a.wav", "file does not exist", "a.wav: file does not exist")


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(10, np.float32), 8000)
    with pytest.raises(ValueError, match="target_rate"):
        list(iter_blocks(path, 0))
    with pytest.raises(ValueError, match="block_seconds"):
        list(iter_blocks(path, 16000, block_seconds=0))
