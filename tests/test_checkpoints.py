"""The strict ESP checkpoint loader on tiny checkpoints written in the ESP / fairseq key layouts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgeenc.hashing import sha256_file
from edgeenc.models import checkpoints
from edgeenc.models.checkpoints import CheckpointError, CheckpointUnavailable, load_model
from edgeenc.models.frontend import mel_matrix, window_function
from edgeenc.models.registry import get_spec

NATURELM = "esp_aves2_naturelm_audio_v1_beats"  # BEATs, features only (with AudioSet predictor)
SL_BEATS = "esp_aves2_sl_beats_all"  # BEATs + classifier
SL_EAT = "esp_aves2_sl_eat_all_ssl_all"  # EAT + classifier
EAT_ALL = "esp_aves2_eat_all"  # EAT, features only, fairseq layout
LABELS = ["Parus major", "Bubo bubo", "Pica pica", "Canis lupus", "Apus apus"]
OUT_OF_ORDER = {LABELS[i]: i for i in (3, 0, 4, 2, 1)}


# --- writing tiny checkpoints in the ESP layouts -------------------------------------------------


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous()  # safetensors refuses shared / strided storage


def esp_beats_keys(
    state: dict[str, torch.Tensor],
    *,
    weight_norm: str = "legacy",
    table_layers: str = "all",
    predictor: bool = True,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Our BEATs state_dict -> the names of an ESP / NatureLM BEATs file.

    pos_conv goes back to weight norm with v = 3 * weight and g = |weight| per kernel tap (norm over
    output and input channels), so g * v / |v| folds back to the weight. `weight_norm` "legacy" writes
    weight_g / weight_v, "parametrized" the torch.nn.utils.parametrizations spelling.
    """
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    g_name, v_name = {
        "legacy": ("weight_g", "weight_v"),
        "parametrized": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    }[weight_norm]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "patch_embedding.proj.weight":
            out["patch_embedding.weight"] = _own(tensor)
        elif key == "encoder.pos_conv.weight":
            out[f"encoder.pos_conv.0.{g_name}"] = _own(tensor.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())
            out[f"encoder.pos_conv.0.{v_name}"] = _own(3.0 * tensor)
        elif key == "encoder.pos_conv.bias":
            out["encoder.pos_conv.0.bias"] = _own(tensor)
        elif key == "encoder.relative_attention_bias.weight":
            for i in range(depth) if table_layers == "all" else [0]:
                out[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = _own(tensor)
        else:
            out[key] = _own(tensor)
    if predictor:  # the AudioSet head of the fine-tuned BEATs NatureLM used: stored, never run
        width = state["post_extract_proj.weight"].shape[0]
        out["predictor.weight"] = torch.randn(7, width)
        out["predictor.bias"] = torch.zeros(7)
    return {(k if k.startswith("classifier.") else prefix + k): t for k, t in out.items()}


def esp_eat_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our EAT state_dict -> avex's EATHFModel.state_dict() names (sl_eat files)."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("classifier."):
            out[key] = _own(tensor)
        else:
            name = "fixed_positional_encoder.positions" if key == "positions" else key
            out["backbone.model." + name] = _own(tensor)
    return out


def fairseq_eat_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our EAT state_dict -> a fairseq EAT pretraining checkpoint (eat_all / eat_bio), decoder included."""
    image = "modality_encoders.IMAGE."
    out = {}
    for key, tensor in state.items():
        if key == "positions":
            name = image + "fixed_positional_encoder.positions"
        elif key.startswith("pre_norm."):
            name = image + "context_encoder.norm." + key[len("pre_norm.") :]
        elif key.startswith(("local_encoder.", "extra_tokens")):
            name = image + key
        else:
            name = key  # blocks.{i}.*
        out[name] = _own(tensor)
    out[image + "decoder.blocks.0.0.weight"] = torch.randn(16, 64, 3)
    out[image + "decoder.proj.bias"] = torch.zeros(16)
    return out


def write(folder: Path, tensors: dict, *, model_id: str | None = None, name: str | None = None, labels=None) -> Path:
    """Save tensors (and a label map) into `folder`, by default under the model's HF weights file name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or get_spec(model_id).weights_file)
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(path))
    if labels is not None:
        (folder / "label_map.json").write_text(json.dumps(labels))
    return path


def assert_same_weights(loaded, reference: torch.nn.Module) -> None:
    ours = loaded.module.state_dict()
    for key, tensor in reference.state_dict().items():
        # Only the folded weight-norm kernel goes through arithmetic (float64, one rounding).
        atol = 1e-6 if key == "encoder.pos_conv.weight" else 0.0
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=atol, msg=key)


def run(module, n: int = 16_000) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (1, n)).astype(np.float32))
    with torch.no_grad():
        return module.forward_features(x)


@pytest.fixture(scope="module")
def beats_state(tiny_model):
    return tiny_model(SL_BEATS, num_classes=5, seed=1)


@pytest.fixture(scope="module")
def eat_state(tiny_model):
    return tiny_model(SL_EAT, num_classes=5, seed=2)


@pytest.fixture
def beats_tiny(tiny_overrides):
    return tiny_overrides["beats"]


@pytest.fixture
def eat_tiny(tiny_overrides):
    return tiny_overrides["eat"]


def features_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t for k, t in state.items() if not k.startswith("classifier.")}


# --- accepted layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "weight_norm", "table_layers"),
    [
        ("", "legacy", "all"),  # the NatureLM file as ESP published it
        ("", "parametrized", "all"),
        ("", "legacy", "first"),
        ("backbone.", "legacy", "all"),
        ("backbone.", "parametrized", "first"),  # what avex's own state_dict() writes, minus copies
        ("module.", "legacy", "first"),
    ],
)
def test_beats_layouts_load_exactly(tmp_path, tiny_model, beats_tiny, weight_norm, table_layers, prefix):
    reference = tiny_model(NATURELM, seed=3)
    tensors = esp_beats_keys(reference.state_dict(), weight_norm=weight_norm, table_layers=table_layers, prefix=prefix)
    path = write(tmp_path, tensors, model_id=NATURELM)
    loaded = load_model(NATURELM, tmp_path, **beats_tiny)
    assert_same_weights(loaded, reference)
    torch.testing.assert_close(run(loaded.module), run(reference), rtol=0, atol=1e-5)
    assert sorted(loaded.report.ignored) == [prefix + "predictor.bias", prefix + "predictor.weight"]
    assert loaded.report.loaded == len(reference.state_dict())
    assert loaded.labels is None and not loaded.random_init
    assert loaded.checkpoint_sha256 == sha256_file(path)
    assert loaded.source == str(path)


def test_sl_beats_with_backbone_prefix_and_classifier(tmp_path, beats_state, beats_tiny):
    # ESP's sl_beats files: backbone.* encoder, top-level classifier.*, label map out of order.
    write(
        tmp_path, esp_beats_keys(beats_state.state_dict(), prefix="backbone."), model_id=SL_BEATS, labels=OUT_OF_ORDER
    )
    loaded = load_model(SL_BEATS, tmp_path, **beats_tiny)
    assert_same_weights(loaded, beats_state)
    assert loaded.labels == LABELS  # by index, not JSON order
    assert list(OUT_OF_ORDER) != LABELS


def test_module_prefix_on_every_key(tmp_path, beats_state, beats_tiny):
    tensors = {"module." + k: t for k, t in esp_beats_keys(beats_state.state_dict()).items()}
    write(tmp_path, tensors, model_id=SL_BEATS, labels=OUT_OF_ORDER)
    assert_same_weights(load_model(SL_BEATS, tmp_path, **beats_tiny), beats_state)


def test_stored_fbank_buffers_are_checked_and_ignored(tmp_path, tiny_model, beats_tiny):
    reference = tiny_model(NATURELM)
    tensors = esp_beats_keys(reference.state_dict(), prefix="backbone.")
    tensors["backbone.fbank.window"] = torch.from_numpy(window_function("povey")).float()
    tensors["backbone.fbank.mel_fb"] = torch.from_numpy(mel_matrix(128)).float()
    write(tmp_path, tensors, model_id=NATURELM)
    loaded = load_model(NATURELM, tmp_path, **beats_tiny)
    assert {"backbone.fbank.window", "backbone.fbank.mel_fb"} <= set(loaded.report.ignored)

    tensors["backbone.fbank.window"] = torch.from_numpy(window_function("hanning")).float()
    write(tmp_path, tensors, model_id=NATURELM)
    with pytest.raises(CheckpointError, match="backbone.fbank.window"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_sl_eat_layout(tmp_path, eat_state, eat_tiny):
    path = write(tmp_path, esp_eat_keys(eat_state.state_dict()), model_id=SL_EAT, labels=OUT_OF_ORDER)
    loaded = load_model(SL_EAT, tmp_path, **eat_tiny)
    assert_same_weights(loaded, eat_state)
    torch.testing.assert_close(run(loaded.module), run(eat_state), rtol=0, atol=1e-5)
    assert loaded.labels == LABELS
    assert loaded.report.ignored == []
    assert loaded.checkpoint_sha256 == sha256_file(path)


def test_eat_max_length_comes_from_the_file(tmp_path, eat_state, eat_tiny):
    write(tmp_path, esp_eat_keys(eat_state.state_dict()), model_id=SL_EAT, labels=OUT_OF_ORDER)
    overrides = {k: v for k, v in eat_tiny.items() if k != "max_length"}
    loaded = load_model(SL_EAT, tmp_path, **overrides)
    assert loaded.module.config.max_length == eat_tiny["max_length"]
    assert_same_weights(loaded, eat_state)


def test_fairseq_eat_layout(tmp_path, tiny_model, eat_tiny):
    reference = tiny_model(EAT_ALL, seed=4)
    write(tmp_path, fairseq_eat_keys(reference.state_dict()), model_id=EAT_ALL)
    loaded = load_model(EAT_ALL, tmp_path, **eat_tiny)
    assert_same_weights(loaded, reference)
    assert sorted(loaded.report.ignored) == [
        "modality_encoders.IMAGE.decoder.blocks.0.0.weight",
        "modality_encoders.IMAGE.decoder.proj.bias",
    ]
    assert loaded.labels is None


def test_pickle_needs_allow_pickle(tmp_path, beats_state, beats_tiny):
    tensors = esp_beats_keys(beats_state.state_dict(), prefix="backbone.")
    path = write(tmp_path, {"model_state_dict": tensors}, name="checkpoint.pt", labels=OUT_OF_ORDER)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(SL_BEATS, path, **beats_tiny)
    loaded = load_model(SL_BEATS, path, allow_pickle=True, **beats_tiny)
    assert_same_weights(loaded, beats_state)
    assert loaded.labels == LABELS  # label_map.json beside the file


def test_folder_lookup_prefers_the_hf_weights_name(tmp_path, beats_state, beats_tiny):
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), model_id=SL_BEATS, labels=OUT_OF_ORDER)
    (tmp_path / "notes.safetensors").write_bytes(b"not a checkpoint")  # never opened
    loaded = load_model(SL_BEATS, tmp_path, **beats_tiny)
    assert Path(loaded.source).name == get_spec(SL_BEATS).weights_file == "esp-aves2-sl-beats-all.safetensors"


def test_folder_with_model_safetensors(tmp_path, beats_state, beats_tiny):
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), name="model.safetensors", labels=OUT_OF_ORDER)
    (tmp_path / "other.safetensors").write_bytes(b"")
    assert Path(load_model(SL_BEATS, tmp_path, **beats_tiny).source).name == "model.safetensors"


def test_folder_without_a_weights_file(tmp_path, beats_tiny):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointUnavailable, match="esp-aves2-sl-beats-all.safetensors"):
        load_model(SL_BEATS, tmp_path, **beats_tiny)


# --- refused checkpoints: CheckpointError naming the key ----------------------------------------


def beats_file(state, **kw) -> dict[str, torch.Tensor]:
    return esp_beats_keys(features_only(state.state_dict()), **kw)


def test_missing_key(tmp_path, beats_state, beats_tiny):
    tensors = beats_file(beats_state)
    del tensors["encoder.layers.1.fc1.bias"]
    write(tmp_path, tensors, model_id=NATURELM)
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layers\.1\.fc1\.bias"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_unexpected_key(tmp_path, beats_state, beats_tiny):
    tensors = beats_file(beats_state)
    tensors["encoder.layers.0.self_attn.mystery"] = torch.zeros(3)
    write(tmp_path, tensors, model_id=NATURELM)
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.layers\.0\.self_attn\.mystery"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_wrong_shape(tmp_path, beats_state, beats_tiny):
    tensors = beats_file(beats_state)
    tensors["post_extract_proj.bias"] = torch.zeros(65)
    write(tmp_path, tensors, model_id=NATURELM)
    with pytest.raises(CheckpointError, match=r"wrong shape.*post_extract_proj\.bias.*\(65,\).*\(64,\)"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_full_size_model_refuses_a_tiny_file(tmp_path, beats_state):
    write(tmp_path, beats_file(beats_state), model_id=NATURELM)
    with pytest.raises(CheckpointError, match=r"missing \d+ key.*wrong shape.*file \(64,\) vs model \(768,\)"):
        load_model(NATURELM, tmp_path)


def test_unequal_relative_position_copies(tmp_path, beats_state, beats_tiny):
    tensors = beats_file(beats_state)
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    tensors[key] = tensors[key] + 1e-3
    write(tmp_path, tensors, model_id=NATURELM)
    with pytest.raises(CheckpointError, match=r"relative-position.*layers\.1\.self_attn\.relative_attention_bias"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_beats_weights_for_an_eat_id(tmp_path, beats_state, eat_tiny):
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), model_id=SL_EAT, labels=OUT_OF_ORDER)
    with pytest.raises(CheckpointError, match="looks like a BEATS checkpoint") as err:
        load_model(SL_EAT, tmp_path, **eat_tiny)
    assert SL_EAT in str(err.value)


def test_eat_weights_for_a_beats_id(tmp_path, eat_state, beats_tiny):
    write(tmp_path, esp_eat_keys(eat_state.state_dict()), model_id=SL_BEATS, labels=OUT_OF_ORDER)
    with pytest.raises(CheckpointError, match="looks like a EAT checkpoint") as err:
        load_model(SL_BEATS, tmp_path, **beats_tiny)
    assert SL_BEATS in str(err.value)


def test_classifier_in_a_features_only_file(tmp_path, beats_state, beats_tiny):
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), model_id=NATURELM, labels=OUT_OF_ORDER)
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*features-only"):
        load_model(NATURELM, tmp_path, **beats_tiny)


def test_classifier_missing_for_a_classifier_id(tmp_path, beats_state, beats_tiny):
    write(tmp_path, beats_file(beats_state), model_id=SL_BEATS, labels=OUT_OF_ORDER)
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*has a classifier head but the checkpoint has none"):
        load_model(SL_BEATS, tmp_path, **beats_tiny)


def test_eat_classifier_in_a_features_only_fairseq_file(tmp_path, eat_state, eat_tiny):
    tensors = fairseq_eat_keys(eat_state.state_dict())  # includes classifier.*
    write(tmp_path, tensors, model_id=EAT_ALL)
    with pytest.raises(CheckpointError, match=r"classifier\.bias"):
        load_model(EAT_ALL, tmp_path, **eat_tiny)


# --- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "exception", "message"),
    [
        ({"a": 0, "b": 1, "c": 2}, CheckpointError, "3 labels but the classifier has 5 outputs"),
        ({"a": 0, "b": 0, "c": 1, "d": 2, "e": 3}, CheckpointError, "share index 0"),
        ({"a": 0, "b": 1, "c": 2, "d": 3, "e": 7}, CheckpointError, "not 0..4"),
        (None, CheckpointUnavailable, "label_map.json"),
    ],
    ids=["count", "duplicate-index", "gap", "missing"],
)
def test_bad_label_maps(tmp_path, beats_state, beats_tiny, labels, exception, message):
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), model_id=SL_BEATS, labels=labels)
    with pytest.raises(exception, match=message):
        load_model(SL_BEATS, tmp_path, **beats_tiny)


def test_label_indices_given_as_strings(tmp_path, beats_state, beats_tiny):
    labels = {label: str(index) for label, index in OUT_OF_ORDER.items()}
    write(tmp_path, esp_beats_keys(beats_state.state_dict()), model_id=SL_BEATS, labels=labels)
    assert load_model(SL_BEATS, tmp_path, **beats_tiny).labels == LABELS


# --- files that cannot be read -------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointUnavailable, match="not found"):
        load_model(NATURELM, tmp_path / "nope.safetensors")


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_model(NATURELM, tmp_path / "broken.safetensors")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_model(NATURELM, tmp_path / "weights.npz")


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".ckpt"])
def test_every_pickle_suffix_is_refused(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save({"a": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(NATURELM, path)


# --- no checkpoint: hub and random init -----------------------------------------------------------


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """An empty HF cache; huggingface_hub reads its constants at import, so patch those too."""
    import huggingface_hub.constants as hf

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf, "HF_HOME", str(home))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    return hf


def test_offline_hub_names_both_ways_out(monkeypatch, empty_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(empty_hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointUnavailable) as err:
        load_model(SL_EAT)
    assert "--checkpoint" in str(err.value) and "--random-init" in str(err.value)
    assert get_spec(SL_EAT).weights_file in str(err.value)


class _NoSleep:
    """The `time` module with sleep() a no-op: huggingface_hub retries refused connections with backoff."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds):
        return None


def test_unreachable_hub_names_both_ways_out(monkeypatch, empty_hub):
    from huggingface_hub.utils import _http

    endpoint = "http://127.0.0.1:9"  # discard port: connection refused at once
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(empty_hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(empty_hub, "ENDPOINT", endpoint)
    monkeypatch.setattr(empty_hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    if hasattr(_http, "time"):  # 5 retries with 1-8 s backoff would take ~23 s
        monkeypatch.setattr(_http, "time", _NoSleep())
    start = time.monotonic()
    with pytest.raises(CheckpointUnavailable) as err:
        load_model(SL_EAT)
    assert "--checkpoint" in str(err.value) and "--random-init" in str(err.value)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("model_id", [NATURELM, SL_EAT])
def test_random_init(tiny_overrides, model_id):
    spec = get_spec(model_id)
    loaded = load_model(model_id, random_init=True, random_classes=4, **tiny_overrides[spec.arch])
    assert loaded.random_init and loaded.checkpoint_sha256 is None and loaded.source == "random-init"
    assert loaded.report is None
    if spec.has_classifier:
        assert loaded.labels == [f"random_class_{i}" for i in range(4)]
        assert loaded.module.classifier.out_features == 4
    else:
        assert loaded.labels is None and loaded.module.classifier is None
    assert torch.isfinite(run(loaded.module)).all()
    again = load_model(model_id, random_init=True, random_classes=4, **tiny_overrides[spec.arch])
    assert_same_weights(again, loaded.module)  # seeded: the same weights every time


def test_random_init_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_model(NATURELM, tmp_path, random_init=True)


def test_canonical_tensors_maps_names(beats_state):
    spec = get_spec(SL_BEATS)
    canonical, ignored = checkpoints.canonical_tensors(spec, esp_beats_keys(beats_state.state_dict()))
    assert set(canonical) == set(beats_state.state_dict())
    assert sorted(ignored) == ["predictor.bias", "predictor.weight"]
