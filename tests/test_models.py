"""Tiny configurations of the real BEATs / EAT classes: geometry, position buckets, batching, heads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeenc.models.beats import BEATs, relative_bucket_table
from edgeenc.models.eat import EAT
from edgeenc.models.frontend import BEATS_FBANK, EAT_FBANK, num_frames
from edgeenc.models.registry import MODELS, UnknownModelError, build_model, get_spec


def audio(batch: int, n: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (batch, n)).astype(np.float32))


def run(module, x):
    with torch.no_grad():
        return module.forward_features(x)


@pytest.fixture(scope="module")
def beats(tiny_model):
    return tiny_model("esp_aves2_sl_beats_all", num_classes=5)


@pytest.fixture(scope="module")
def eat(tiny_model):
    return tiny_model("esp_aves2_sl_eat_all_ssl_all", num_classes=5)


# --- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_every_registered_id_builds(tiny_model, model_id):
    spec = get_spec(model_id)
    module = tiny_model(model_id, num_classes=3 if spec.has_classifier else 0)
    assert isinstance(module, BEATs if spec.arch == "beats" else EAT)
    assert not module.training
    assert (module.classifier is not None) == spec.has_classifier
    fbank = module.config.fbank
    if spec.arch == "eat":
        assert fbank == EAT_FBANK
    else:
        assert fbank.window == BEATS_FBANK.window and fbank.scale == 32768.0 and fbank.target_frames is None
        assert fbank.clamp == (model_id == "esp_aves2_naturelm_audio_v1_beats")
    assert spec.weights_file.endswith(".safetensors") and spec.hf_repo.startswith("EarthSpeciesProject/")
    assert spec.label_map_file == ("label_map.json" if spec.has_classifier else None)


def test_registry_specifics():
    assert get_spec("esp_aves2_sed_birdcode_beats_encoder").sample_rate == 32000
    assert get_spec("esp_aves2_sed_birdcode_beats_encoder").window_seconds == 5.0
    assert get_spec("esp_aves2_eat_all").layout == "fairseq"
    with pytest.raises(UnknownModelError, match="esp_aves2_sl_beats_all"):  # lists the known ids
        get_spec("esp_aves2_nonexistent")


def test_overrides_are_per_architecture():
    with pytest.raises(TypeError):
        build_model(get_spec("esp_aves2_sl_eat_all_ssl_all"), ffn_dim=128)  # EAT has mlp_ratio
    with pytest.raises(TypeError):
        build_model(get_spec("esp_aves2_sl_beats_all"), max_length=64)  # BEATs has no position table


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2_800, 3_000, 16_000, 48_000, 52_800])
def test_beats_token_count(beats, n):
    tokens = run(beats, audio(1, n))
    assert tokens.shape == (1, 8 * (num_frames(n) // 16), 64)


def test_beats_token_examples():
    assert 8 * (num_frames(160_000) // 16) == 496  # 10 s at 16 kHz
    assert 8 * (num_frames(16_000) // 16) == 48
    assert 8 * (num_frames(2_800) // 16) == 8


def test_beats_shorter_than_one_patch_row_fails(beats):
    # 400 <= N < 2800 gives 1..15 frames: the 16x16 patch convolution refuses it (as in avex).
    # Callers must respect min_samples (2800); this is not silently padded.
    with pytest.raises(RuntimeError):
        run(beats, audio(1, 2_799))


@pytest.mark.parametrize("n", [400, 2_799, 16_000, 52_800, 200_000])
def test_eat_always_513_tokens(eat, n):
    tokens = run(eat, audio(1, n))
    assert tokens.shape == (1, 513, 64)  # CLS + 64 time x 8 frequency patches


# --- relative position buckets (reference/beats.md §5.2) -----------------------------------------


@pytest.mark.parametrize(
    ("r", "bucket"),
    [(0, 0), (-1, 1), (1, 161), (-80, 80), (80, 240), (-100, 87), (100, 247), (-495, 143), (495, 303),
     (-777, 158), (777, 318), (-778, 159), (778, 319), (-800, 159), (800, 319)],
)  # fmt: skip
def test_relative_bucket_examples(r, bucket):
    table = relative_bucket_table(320, 800)
    assert int(table[r + 800]) == bucket


def test_relative_bucket_table_against_t5_formula():
    table = relative_bucket_table(320, 800).numpy()
    r = np.arange(-800, 801)
    a = np.abs(r)
    far = 80 + (np.log(np.maximum(a, 1) / 80.0) / np.log(10.0) * 80).astype(np.int64)
    expected = np.where(r > 0, 160, 0) + np.where(a < 80, a, np.minimum(far, 159))
    np.testing.assert_array_equal(table, expected)
    assert table.shape == (1601,) and table.min() == 0 and table.max() == 319


def test_position_bias_clamps_long_sequences(beats):
    bias = beats.encoder.position_bias(900, torch.device("cpu"))  # |r| up to 899 > max_distance 800
    assert bias.shape == (1, 4, 900, 900)
    table = beats.encoder.relative_attention_bias.weight
    torch.testing.assert_close(bias[0, :, 0, 899], table[319])  # r = +899 saturates
    torch.testing.assert_close(bias[0, :, 899, 0], table[159])
    torch.testing.assert_close(bias[0, :, 5, 5], table[0])


# --- batching, heads, precision ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["beats", "eat"])
def test_batch_independence(arch, beats, eat):
    module = beats if arch == "beats" else eat
    batch = audio(3, 16_000, seed=1) * torch.tensor([[1.0], [3.0], [0.3]])
    together = run(module, batch)
    for i in range(3):
        torch.testing.assert_close(run(module, batch[i : i + 1])[0], together[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["beats", "eat"])
def test_heads(arch, beats, eat):
    module = beats if arch == "beats" else eat
    tokens = run(module, audio(2, 16_000))
    with torch.no_grad():
        logits = module.forward_head(tokens)
    assert logits.shape == (2, 5)
    pooled = tokens.mean(dim=1) if arch == "beats" else tokens[:, 0]  # BEATs: mean; EAT: CLS
    torch.testing.assert_close(logits, module.classifier(pooled))


@pytest.mark.parametrize("model_id", ["esp_aves2_naturelm_audio_v1_beats", "esp_aves2_eat_all"])
def test_forward_head_without_classifier_raises(tiny_model, model_id):
    module = tiny_model(model_id)
    assert module.classifier is None
    with pytest.raises(RuntimeError, match="no classifier"):
        module.forward_head(torch.zeros(1, 8, 64))


@pytest.mark.parametrize("arch", ["beats", "eat"])
def test_float64_agrees_with_float32(arch, beats, eat):
    module = beats if arch == "beats" else eat
    x = audio(2, 16_000, seed=2)
    tokens32 = run(module, x)
    module64 = copy.deepcopy(module).double()
    tokens64 = run(module64, x.double())
    assert tokens64.dtype == torch.float64 and torch.isfinite(tokens32).all()
    diff = (tokens32.double() - tokens64).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(tokens32.double(), tokens64, dim=-1).min().item()
    assert diff < 1e-4 and cosine > 1 - 1e-9, (diff, cosine)  # measured ~2e-6 and 1 - 2e-13


def test_naturelm_clamps_and_sl_beats_does_not(tiny_model):
    square = torch.sign(audio(1, 16_000, seed=4))
    naturelm = tiny_model("esp_aves2_naturelm_audio_v1_beats")
    torch.testing.assert_close(run(naturelm, 2.0 * square), run(naturelm, square), rtol=0, atol=0)
    sl = tiny_model("esp_aves2_sl_beats_all", num_classes=5)
    assert (run(sl, 2.0 * square) - run(sl, square)).abs().max() > 1e-3
