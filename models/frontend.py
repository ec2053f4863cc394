"""Kaldi-compatible log-mel filterbank in export-friendly ops.

Reproduces ``torchaudio.compliance.kaldi.fbank`` as BEATs and EAT call it using only slicing, concatenation, matmul and
elementwise ops, so that ONNX Runtime, TensorRT and a C++ caller all run the same graph: no
STFT/DFT op, no per-sample Python loop, every step in float32 (float64 when the whole module
is cast to double for the parity truth).

Framing uses ``snip_edges`` semantics: frame f covers samples [160 f, 160 f + 400).
Because 400 = 2.5 hops, a frame is hop-chunk f, chunk f + 1 and the first half of chunk
f + 2, which is three slices of a reshaped signal instead of a gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FRAME_LENGTH = 400  # 25 ms at the filterbank's nominal 16 kHz
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # next power of two >= FRAME_LENGTH (kaldi round_to_power_of_two)
N_BINS = N_FFT // 2 + 1
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
NOMINAL_RATE = 16000  # the filterbank is built for 16 kHz even when fed 32 kHz (sed_birdcode)
# kaldi floors energies at float32 machine epsilon before the log.
LOG_FLOOR = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class FbankConfig:
    """What differs between the two families' front ends."""

    num_mel_bins: int = 128
    window: str = "povey"  # "povey" (BEATs) or "hanning" (EAT)
    scale: float = 32768.0  # BEATs multiplies by 2**15; EAT does not scale
    clip_dc: bool = False  # EAT subtracts the whole clip's mean first
    clamp: bool = False  # NatureLM BEATs clamps the waveform to [-1, 1]
    norm_mean: float = 15.41663
    norm_std: float = 6.55582
    target_frames: int | None = None  # EAT pads (log-mel 0.0) / crops to 1024 frames


BEATS_FBANK = FbankConfig()
# avex 1.4.0 runs EAT with its constructor defaults -4.268 / 4.569: the yml's -5.553 / 4.606
# are dropped by its factory. We reproduce what avex runs.
EAT_FBANK = FbankConfig(
    window="hanning", scale=1.0, clip_dc=True, norm_mean=-4.268, norm_std=4.569, target_frames=1024
)


def min_samples(config: FbankConfig, patch: int = 16) -> int:
    """Fewest input samples the model accepts (one frame for EAT, one 16-frame patch row for BEATs)."""
    frames = 1 if config.target_frames else patch
    return FRAME_LENGTH + (frames - 1) * FRAME_SHIFT


def num_frames(num_samples: int) -> int:
    return (num_samples - FRAME_LENGTH) // FRAME_SHIFT + 1


def window_function(kind: str) -> np.ndarray:
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2 * math.pi * n / (FRAME_LENGTH - 1))
    if kind == "hanning":
        return hann
    if kind == "povey":
        return hann**0.85
    raise ValueError(f"unknown window {kind!r}; expected 'povey' or 'hanning'")


def mel_matrix(num_mel_bins: int) -> np.ndarray:
    """Kaldi mel triangles [N_BINS, num_mel_bins] (no area normalisation, zero Nyquist row).

    Same expression order as kaldi's get_mel_banks (python-float edges, float32 tensors), so
    the weights equal the reference's to the last bit or two.
    """

    def mel(freq):
        return 1127.0 * (1.0 + freq / 700.0).log()

    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + (NOMINAL_RATE / 2) / 700.0)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    m = torch.arange(num_mel_bins).unsqueeze(1)
    left, centre, right = mel_low + m * delta, mel_low + (m + 1.0) * delta, mel_low + (m + 2.0) * delta
    fft_mel = mel((NOMINAL_RATE / N_FFT) * torch.arange(N_FFT // 2)).unsqueeze(0)
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    banks = torch.max(torch.zeros(1), torch.min(up, down))  # [mel, 256]
    return torch.cat([banks.T, torch.zeros(1, num_mel_bins)], dim=0).numpy()


def dft_matrix(window: str) -> np.ndarray:
    """Pre-emphasis, window and the real DFT folded into one [400, 2 * N_BINS] matrix.

    Each of the three is linear in the (DC-removed) frame, so their product is exact up to one
    rounding to float32; computing it in float64 keeps it at least as accurate as kaldi's
    step-by-step float32 arithmetic. Columns: cos terms for bins 0..256, then sin terms.
    """
    emphasis = np.eye(FRAME_LENGTH)
    emphasis[np.arange(1, FRAME_LENGTH), np.arange(FRAME_LENGTH - 1)] = -PREEMPHASIS
    emphasis[0, 0] = 1.0 - PREEMPHASIS  # kaldi replicates the first sample: y0 = x0 - 0.97 x0
    n = np.arange(FRAME_LENGTH)[:, None]
    k = np.arange(N_BINS)[None, :]
    angle = 2 * math.pi * n * k / N_FFT
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # zero padding to 512 is implicit
    # rows of `emphasis` are outputs: frame_out = emphasis @ frame_in; then window, then DFT.
    return emphasis.T @ (window_function(window)[:, None] * basis)


def frame_signal(audio: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, F, 400] kaldi snip_edges frames, with slices only (N >= 400)."""
    frames = (audio.shape[1] - FRAME_LENGTH) // FRAME_SHIFT + 1
    # One extra zero hop lets the reshape below cover the last frame's final half-chunk.
    padded = nn.functional.pad(audio, (0, FRAME_SHIFT))
    chunks = padded[:, : (frames + 2) * FRAME_SHIFT].reshape(audio.shape[0], frames + 2, FRAME_SHIFT)
    half = FRAME_LENGTH - 2 * FRAME_SHIFT
    return torch.cat([chunks[:, :frames], chunks[:, 1 : frames + 1], chunks[:, 2 : frames + 2, :half]], dim=2)


class Fbank(nn.Module):
    """Waveform [B, N] -> normalised log-mel [B, F, mel] (EAT: F fixed at target_frames)."""

    def __init__(self, config: FbankConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("dft", torch.from_numpy(dft_matrix(config.window)).float(), persistent=False)
        self.register_buffer("mel_fb", torch.from_numpy(mel_matrix(config.num_mel_bins)), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # Eager only: while tracing/exporting no Python branch is taken on the (symbolic) length,
        # and the caller must honour the exported model's min_samples metadata instead.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and audio.shape[-1] < FRAME_LENGTH:
            # Otherwise framing silently yields 0 frames (BEATs) or a constant padded image (EAT).
            raise ValueError(
                f"the filterbank needs at least {FRAME_LENGTH} samples (one 25 ms frame) per clip, "
                f"got {audio.shape[-1]}"
            )
        x = audio.to(self.dft.dtype)
        if cfg.clamp:
            x = x.clamp(-1.0, 1.0)
        if cfg.clip_dc:
            x = x - x.mean(dim=1, keepdim=True)
        if cfg.target_frames is not None:
            # Frames past target_frames are cropped anyway; skip their arithmetic.
            x = x[:, : FRAME_LENGTH + (cfg.target_frames - 1) * FRAME_SHIFT]
        if cfg.scale != 1.0:
            x = x * cfg.scale
        frames = frame_signal(x)
        frames = frames - frames.mean(dim=2, keepdim=True)
        spectrum = frames @ self.dft
        real, imag = spectrum[..., :N_BINS], spectrum[..., N_BINS:]
        power = real * real + imag * imag
        logmel = torch.log(torch.clamp(power @ self.mel_fb, min=LOG_FLOOR))
        if cfg.target_frames is not None:
            # avex pads short clips with 0.0 in the log-mel domain, then crops to the first frames.
            logmel = nn.functional.pad(logmel, (0, 0, 0, cfg.target_frames))[:, : cfg.target_frames]
        return (logmel - cfg.norm_mean) / (2.0 * cfg.norm_std)
