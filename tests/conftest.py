"""Shared test fixtures: where the reference fixtures live, and synthetic checkpoints made on demand."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Small, deterministic CPU budget for every test (the CI runners have 2 cores).
torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    """`shared/` (fixtures, reference sheets): $EDGEENC_SHARED, else <repo>/shared, else <repo>/../shared."""
    if os.environ.get("EDGEENC_SHARED"):
        return Path(os.environ["EDGEENC_SHARED"])
    for candidate in (REPO_ROOT / "shared", REPO_ROOT.parent / "shared"):
        if (candidate / "fixtures").is_dir():
            return candidate
    return REPO_ROOT / "shared"


def pytest_configure(config) -> None:
    # Test modules that parametrize from the fixtures at collection time read it from here.
    config.edgeenc_shared_dir = _shared_dir()


@pytest.fixture(scope="session")
def shared_dir(pytestconfig) -> Path:
    path = pytestconfig.edgeenc_shared_dir
    if not (path / "fixtures").is_dir():
        pytest.fail(f"reference fixtures not found under {path}; set EDGEENC_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def golden_index(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "golden" / "index.json").read_text())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def make_checkpoint(fixtures_dir: Path, tmp_path_factory):
    """make_checkpoint(arch, seed, num_classes=None) -> folder laid out like the HF repository.

    Runs shared/fixtures/make_checkpoint.py once per argument set per session (a few seconds for
    the full-size models) and hands every later caller the same folder.
    """
    cache: dict[tuple, Path] = {}

    def make(arch: str, seed: int, num_classes: int | None = None) -> Path:
        key = (arch, seed, num_classes)
        if key not in cache:
            name = f"{arch}-seed{seed}" + (f"-k{num_classes}" if num_classes is not None else "")
            out = tmp_path_factory.mktemp(name)
            cmd = [sys.executable, str(fixtures_dir / "make_checkpoint.py"), "--arch", arch, "--seed", str(seed)]
            if num_classes is not None:
                cmd += ["--num-classes", str(num_classes)]
            subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, text=True)
            cache[key] = out
        return cache[key]

    return make


# make_checkpoint.py's EAT sin-cos position table comes from numpy's float32 sin / cos, whose last bit
# depends on the SIMD path numpy picks (its AVX-512 SVML code where the goldens were made, its own AVX2
# code on Zen 3, where CI runs now). Every other tensor comes from the seeded RNG and plain IEEE
# arithmetic: the BEATs file, made the same way without sin / cos, matches its golden hash on both.
# On AVX2 the table is within 1 ulp (<= 6e-8) of the correctly rounded values, so the outputs move by
# ~1e-7, far inside the golden tolerances. These are the hashes known to be the golden checkpoint up to
# that rounding; any other hash still fails.
GOLDEN_WEIGHTS_SIMD_VARIANTS = {
    ("eat", "ad8ec4932fcbb1f44c5e1a5eeb9bc76e926b22deedda0daf147f80d9cf229bc8"): {
        "1f24b59ccd87f1b89935d5e3b10d68135ebedb492f0e9fb4d7885bf37a7e824a": "numpy AVX2 float32 sin/cos",
    },
}


def _golden_weight_hashes(name: str, entry: dict) -> set[str]:
    """The sha256 values accepted as index.json's checkpoint for model `name`."""
    variants = GOLDEN_WEIGHTS_SIMD_VARIANTS.get((name, entry["weights_sha256"]), {})
    return {entry["weights_sha256"], *variants}


@pytest.fixture(scope="session")
def golden_weight_hashes():
    """golden_weight_hashes(name, index_entry) -> the sha256 values accepted as that golden checkpoint."""
    return _golden_weight_hashes


@pytest.fixture(scope="session")
def golden_checkpoints(golden_index: dict, make_checkpoint) -> dict[str, Path]:
    """index.json model name ("beats", "eat") -> folder with its seed checkpoint, sha256 verified."""
    folders = {}
    for name, entry in golden_index["models"].items():
        folder = make_checkpoint(entry["arch"], entry["seed"], entry.get("num_classes"))
        weights = folder / entry["weights_file"]
        digest = sha256_of(weights)
        assert digest in _golden_weight_hashes(name, entry), (
            f"{weights} (sha256 {digest}) is not the checkpoint the golden outputs were made from "
            "(make_checkpoint.py changed, or numpy rounds its sin/cos differently on this CPU: see "
            "GOLDEN_WEIGHTS_SIMD_VARIANTS)"
        )
        folders[name] = folder
    return folders


# Tiny configurations of the real classes (build_model overrides; each config accepts its own).
TINY_OVERRIDES = {
    "beats": dict(embed_dim=64, depth=2, heads=4, ffn_dim=128, patch_dim=32, conv_pos=16, conv_pos_groups=4),
    "eat": dict(embed_dim=64, depth=2, heads=4, max_length=64),
}


@pytest.fixture(scope="session")
def tiny_overrides() -> dict[str, dict]:
    """arch -> build_model / load_model overrides of a tiny model (embed_dim 64, 2 layers)."""
    return {arch: dict(kw) for arch, kw in TINY_OVERRIDES.items()}


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(model_id, num_classes=0, seed=0) -> an eval-mode tiny module with seeded random weights."""
    from edgeenc.models.registry import build_model, get_spec

    def build(model_id: str, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
        spec = get_spec(model_id)
        torch.manual_seed(seed)
        module = build_model(spec, num_classes=num_classes, **TINY_OVERRIDES[spec.arch])
        if spec.arch == "eat":  # zeros by construction: give the position table and CLS token content
            with torch.no_grad():
                module.positions.normal_(0, 0.5)
                module.extra_tokens.normal_(0, 1.0)
        return module

    return build


# --- runtime tests: tiny and full-size bundles, exported once per session -------------------------

BIRDS_WAV_NAME = "birds_10s.wav"


@pytest.fixture(scope="session")
def birds_wav(shared_dir: Path) -> Path:
    """The real recording (32 kHz mono int16, 10.13 s) under shared/audio/."""
    path = shared_dir / "audio" / BIRDS_WAV_NAME
    if not path.is_file():
        pytest.fail(f"{path} not found; set EDGEENC_SHARED to the shared/ folder")
    return path


def _export(loaded, out: Path) -> Path:
    from edgeenc.export.pipeline import export_bundle

    result = export_bundle(loaded, out)
    assert result.passed, f"parity gate failed for the test bundle in {out}"
    return out


@pytest.fixture(scope="session")
def tiny_eat_bundle(tmp_path_factory) -> tuple[Path, object]:
    """(bundle_path, loaded): a random-init EAT of width 64, 2 layers, with a 10-class head (~8 s)."""
    from edgeenc.models.checkpoints import load_model

    loaded = load_model(
        "esp_aves2_sl_eat_all_ssl_all", random_init=True, embed_dim=64, depth=2, heads=4, max_length=64
    )
    return _export(loaded, tmp_path_factory.mktemp("tiny-eat") / "bundle"), loaded


@pytest.fixture(scope="session")
def tiny_beats_bundle(tmp_path_factory) -> tuple[Path, object]:
    """(bundle_path, loaded): a random-init features-only BEATs of width 64, 2 layers (~2 s)."""
    from edgeenc.models.checkpoints import load_model

    loaded = load_model(
        "esp_aves2_naturelm_audio_v1_beats", random_init=True, embed_dim=64, depth=2, heads=4, ffn_dim=128,
        patch_dim=32, conv_pos=16, conv_pos_groups=4,
    )
    return _export(loaded, tmp_path_factory.mktemp("tiny-beats") / "bundle"), loaded


@pytest.fixture(scope="session")
def aliased_beats_bundle(tmp_path_factory) -> Path:
    """A tiny BEATs whose feed-forward width (1024) and positional-conv im2col row (16 x 64) are the
    4 KiB-aliased shapes export/layout.py rewrites, like the full model's 3072 and 48 x 128 (~4 s)."""
    from edgeenc.models.checkpoints import load_model

    loaded = load_model(
        "esp_aves2_naturelm_audio_v1_beats", random_init=True, embed_dim=64, depth=2, heads=4, ffn_dim=1024,
        patch_dim=32, conv_pos=64, conv_pos_groups=4,
    )
    return _export(loaded, tmp_path_factory.mktemp("aliased-beats") / "bundle")


@pytest.fixture(scope="session")
def full_eat_bundle(make_checkpoint, tmp_path_factory) -> tuple[Path, object]:
    """(bundle_path, loaded): the full-size EAT fixture checkpoint (seed 0, 12 classes), exported (~2 min).

    For tests marked slow; shared by every test that needs a full-size bundle.
    """
    from edgeenc.models.checkpoints import load_model

    loaded = load_model("esp_aves2_sl_eat_all_ssl_all", make_checkpoint("eat", 0, 12))
    return _export(loaded, tmp_path_factory.mktemp("full-eat") / "bundle"), loaded


@pytest.fixture(scope="session")
def bad_audio_files(birds_wav: Path, tmp_path_factory) -> dict[str, Path]:
    """name -> path, in order: a good 3 s wav, each kind of bad file, a good 4 s wav (treat as read-only).

    Bad kinds: unreadable (random bytes), empty (0 bytes), truncated (a wav cut in half),
    zero_length (valid header, no frames), nan (float wav with a NaN sample).
    """
    import numpy as np
    import soundfile as sf

    folder = tmp_path_factory.mktemp("bad-audio")
    good_source = birds_wav
    samples, rate = sf.read(good_source, dtype="int16")
    paths = {}
    paths["good_a"] = folder / "good_a.wav"
    sf.write(paths["good_a"], samples[: 3 * rate], rate, subtype="PCM_16")
    paths["unreadable"] = folder / "unreadable.wav"
    paths["unreadable"].write_bytes(np.random.default_rng(0).bytes(4096))
    paths["empty"] = folder / "empty.wav"
    paths["empty"].write_bytes(b"")
    whole = folder / "whole.tmp"
    sf.write(whole, samples[: 4 * rate], rate, subtype="PCM_16", format="WAV")
    data = whole.read_bytes()
    whole.unlink()
    paths["truncated"] = folder / "truncated.wav"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["zero_length"] = folder / "zero_length.wav"
    sf.write(paths["zero_length"], np.zeros(0, np.int16), rate, subtype="PCM_16")
    noisy = samples[: 2 * rate].astype(np.float32) / 32768
    noisy[rate // 2] = np.nan
    paths["nan"] = folder / "nan.wav"
    sf.write(paths["nan"], noisy, rate, subtype="FLOAT")
    paths["good_b"] = folder / "good_b.wav"
    sf.write(paths["good_b"], samples[rate : 5 * rate], rate, subtype="PCM_16")
    return paths


# --- your own classifier: a labelled set and a probe attached to the tiny EAT -------------------------------


@pytest.fixture(scope="session")
def probe_set(tmp_path_factory) -> tuple[Path, list]:
    """(root, written): tests/probe_data.py's easy set: tone, chirp and pulses, 5 recordings of 6 s each."""
    from probe_data import make_dataset

    root = tmp_path_factory.mktemp("probe-set") / "data"
    return root, make_dataset(root, per_label=5, negatives=0, both=0, seed=1)


@pytest.fixture(scope="session")
def tiny_probe_bundle(tiny_eat_bundle, probe_set, tmp_path_factory) -> tuple[Path, Path]:
    """(attached bundle, probe folder): `probe train` on the easy set (2 s windows) and `probe attach`, by the CLI."""
    from clirun import cli

    folder = tmp_path_factory.mktemp("tiny-probe")
    probe, attached = folder / "probe", folder / "attached"
    for args in (["probe", "train", tiny_eat_bundle[0], probe_set[0], "-o", probe, "--window", "2", "--device", "cpu"],
                 ["probe", "attach", tiny_eat_bundle[0], probe, "-o", attached]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    return attached, probe
