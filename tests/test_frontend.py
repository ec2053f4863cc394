"""Fbank against an independent float64 numpy Kaldi fbank written from reference/beats.md §2 (and eat.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgeenc.models.frontend import (
    BEATS_FBANK,
    EAT_FBANK,
    FRAME_LENGTH,
    Fbank,
    FbankConfig,
    mel_matrix,
    min_samples,
    num_frames,
)

RATE = 16000
EPS = float(np.finfo(np.float32).eps)
CONFIGS = [pytest.param(BEATS_FBANK, id="beats"), pytest.param(EAT_FBANK, id="eat")]
# Our front end runs in float32 (DFT as a matmul against a float32 matrix); the reference in
# float64. Measured: ~6e-6 on noise and ~1e-4 on the tone below (its quiet mel bins carry the
# float32 rounding of the loud tone bin). 1e-3 is the filterbank bar (avex-vs-us on the
# golden clips is ~1.5e-5); it leaves room for BLAS differences without hiding a real error
# (a wrong window, pre-emphasis or mel edge moves values by 1e-2 or more).
ATOL = 1e-3


# --- the reference ------------------------------------------------------------------------------


def ref_mel_banks(num_bins: int = 128, n_fft: int = 512, low: float = 20.0, high: float = RATE / 2) -> np.ndarray:
    """Kaldi/HTK triangles in the natural-log mel domain, [n_fft/2 + 1, num_bins], zero Nyquist row."""

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    edges = mel(low) + (mel(high) - mel(low)) / (num_bins + 1) * np.arange(num_bins + 2)
    freqs = mel(np.arange(n_fft // 2) * RATE / n_fft)[:, None]  # bins 0..255, Nyquist excluded
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    up = (freqs - left) / (centre - left)
    down = (right - freqs) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.concatenate([banks, np.zeros((1, num_bins))], axis=0)


def ref_fbank(audio: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    """One clip [N] -> normalised log-mel [F, mel] (EAT: [target_frames, mel]), all in float64."""
    x = np.asarray(audio, dtype=np.float64)
    if cfg.clamp:
        x = np.clip(x, -1.0, 1.0)
    if cfg.clip_dc:
        x = x - x.mean()
    x = x * cfg.scale
    n_frames = 1 + (len(x) - 400) // 160
    frames = np.stack([x[160 * i : 160 * i + 400] for i in range(n_frames)])
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # replicate the first sample
    frames = frames - 0.97 * previous
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    window = hann if cfg.window == "hanning" else hann**0.85
    padded = np.zeros((n_frames, 512))
    padded[:, :400] = frames * window
    power = np.abs(np.fft.rfft(padded, axis=1)) ** 2
    logmel = np.log(np.maximum(power @ ref_mel_banks(cfg.num_mel_bins), EPS))
    if cfg.target_frames is not None:
        out = np.zeros((cfg.target_frames, cfg.num_mel_bins))  # 0.0 in the log domain
        keep = min(n_frames, cfg.target_frames)
        out[:keep] = logmel[:keep]
        logmel = out
    return (logmel - cfg.norm_mean) / (2.0 * cfg.norm_std)


# --- signals -------------------------------------------------------------------------------------


def noise(n: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, n).astype(np.float32)


def tone(n: int, freq: float = 1234.5, amp: float = 0.5) -> np.ndarray:
    # A -50 dBFS noise floor keeps the far mel bins well above float32 FFT rounding level: a pure
    # tone's window sidelobes fall ~1e14 below its peak, where no float32 implementation (avex's
    # included, see fixtures/README.md) agrees with float64. At -60 dBFS the BEATs error is
    # already 5.6e-4 (vs 1e-4 here); the offset checks DC removal.
    t = np.arange(n) / RATE
    return (amp * np.sin(2 * np.pi * freq * t) + noise(n, seed=1, scale=3e-3) + 0.05).astype(np.float32)


def ours(cfg: FbankConfig, audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Fbank(cfg)(torch.from_numpy(np.atleast_2d(audio))).numpy()


# --- tests ---------------------------------------------------------------------------------------


def test_mel_matrix_matches_formula():
    ours_mel = mel_matrix(128)
    ref = ref_mel_banks(128)
    assert ours_mel.shape == (257, 128)
    assert np.all(ours_mel[256] == 0.0), "Nyquist row must be zero"
    assert ours_mel.min() >= 0.0 and ours_mel.max() <= 1.0, "triangles peak at <= 1 (no area normalisation)"
    # Built in float32 like kaldi's get_mel_banks (mel values ~2800 carry ~2e-4 float32 rounding,
    # i.e. ~1e-5 of a triangle's ~22-mel width); the reference is float64.
    np.testing.assert_allclose(ours_mel, ref, rtol=0, atol=5e-5)
    # Triangles advance with the mel index: the centre bin (argmax) never moves backwards.
    centres = ours_mel[:, ours_mel.max(axis=0) > 0].argmax(axis=0)
    assert np.all(np.diff(centres) >= 0)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("signal", ["noise", "tone"])
@pytest.mark.parametrize("n", [400, 16_000, 52_800])
def test_matches_float64_reference(cfg, signal, n):
    audio = noise(n) if signal == "noise" else tone(n)
    got = ours(cfg, audio)[0]
    expected = ref_fbank(audio, cfg)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_eat_crops_long_clips_to_1024_frames():
    n = 400 + 1199 * 160  # 1200 frames: the last 176 are cropped
    audio = noise(n, seed=3)
    got = ours(EAT_FBANK, audio)[0]
    assert got.shape == (1024, 128)
    np.testing.assert_allclose(got, ref_fbank(audio, EAT_FBANK), rtol=0, atol=ATOL)


def test_eat_pads_with_zero_log_mel_before_normalising():
    got = ours(EAT_FBANK, noise(16_000))[0]
    frames = num_frames(16_000)
    padded_value = (0.0 - EAT_FBANK.norm_mean) / (2 * EAT_FBANK.norm_std)
    np.testing.assert_allclose(got[frames:], padded_value, rtol=0, atol=1e-6)
    assert np.abs(got[:frames] - padded_value).max() > 0.1


@pytest.mark.parametrize("cfg", CONFIGS)
def test_dc_offset_is_removed(cfg):
    # Per-frame DC removal cancels a constant in exact arithmetic for both families; EAT's
    # clip-mean removal additionally keeps float32 from losing the signal under a large offset.
    audio = noise(16_000)
    np.testing.assert_allclose(ours(cfg, audio + np.float32(0.3)), ours(cfg, audio), rtol=0, atol=ATOL)


def test_beats_scales_by_2_pow_15_and_eat_does_not():
    audio = noise(4_000)
    silence_beats = (np.log(EPS) - BEATS_FBANK.norm_mean) / (2 * BEATS_FBANK.norm_std)
    assert ours(BEATS_FBANK, np.zeros(4_000, np.float32)).max() == pytest.approx(silence_beats, abs=1e-6)
    # A 2**15 larger input moves BEATs' log-mel by log(2**30) before normalisation.
    loud = ours(dataclasses.replace(BEATS_FBANK, scale=1.0), audio * np.float32(2**15))
    np.testing.assert_allclose(ours(BEATS_FBANK, audio), loud, atol=1e-4)


@pytest.mark.parametrize(("n", "frames"), [(400, 1), (559, 1), (560, 2), (16_000, 98), (160_000, 998), (162_132, 1011)])
def test_frame_counts(n, frames):
    assert num_frames(n) == frames
    audio = noise(n)
    assert ours(BEATS_FBANK, audio).shape == (1, frames, 128)
    assert ours(EAT_FBANK, audio).shape == (1, 1024, 128)


def test_last_frame_ends_inside_the_clip():
    """snip_edges: samples after the last whole frame do not change any value."""
    audio = noise(559)
    np.testing.assert_array_equal(ours(BEATS_FBANK, audio), ours(BEATS_FBANK, audio[:400]))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("n", [0, 1, 159, 160, 399])
def test_shorter_than_one_frame_is_an_error(cfg, n):
    # Without the check, framing gives 0 frames (BEATs) or, worse, EAT silently returns its
    # constant padding image. Eager mode raises; an exported graph relies on min_samples.
    with pytest.raises(ValueError, match="at least 400 samples"):
        ours(cfg, noise(n))


def test_min_samples():
    assert min_samples(BEATS_FBANK) == 400 + 15 * 160 == 2800  # one 16-frame patch row
    assert min_samples(EAT_FBANK) == FRAME_LENGTH


@pytest.mark.parametrize("cfg", CONFIGS)
def test_batch_equals_single_calls(cfg):
    clips = [noise(20_000, seed=s, scale=0.05 * (s + 1)) for s in range(2)] + [tone(20_000)]
    batch = ours(cfg, np.stack(clips))
    assert batch.shape[0] == 3
    for i, clip in enumerate(clips):
        np.testing.assert_allclose(batch[i], ours(cfg, clip)[0], rtol=0, atol=1e-5)


def test_clamp():
    cfg = dataclasses.replace(BEATS_FBANK, clamp=True)
    square = np.sign(noise(8_000)).astype(np.float32)
    np.testing.assert_array_equal(ours(cfg, 2 * square), ours(cfg, square))
    assert np.abs(ours(BEATS_FBANK, 2 * square) - ours(BEATS_FBANK, square)).max() > 0.05
    np.testing.assert_allclose(ours(cfg, 2 * square)[0], ref_fbank(2 * square, cfg), atol=ATOL)


def test_double_module_runs_in_float64():
    audio = tone(16_000)
    fb = Fbank(BEATS_FBANK).double()
    with torch.no_grad():
        got64 = fb(torch.from_numpy(audio[None].astype(np.float64)))[0].numpy()
    assert got64.dtype == np.float64
    # The folded DFT and mel matrices were rounded to float32 once, so this is not the float64
    # reference bit for bit, but it is free of float32 accumulation error.
    np.testing.assert_allclose(got64, ref_fbank(audio, BEATS_FBANK), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_length_check_is_not_traced(cfg):
    """The N < 400 check is eager-only: a traced graph carries no Python branch on the length."""
    import warnings

    module = Fbank(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace itself is deprecated
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a traced Python branch would warn
        traced = torch.jit.trace(module, torch.from_numpy(noise(16_000)[None]))
    other = torch.from_numpy(noise(8_000, seed=5)[None])
    torch.testing.assert_close(traced(other), module(other), rtol=0, atol=1e-5)
