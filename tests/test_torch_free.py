"""The runtime never imports torch (CONTRACT.md): checked in subprocesses, with torch blocked and without.

The bundles are exported beforehand in this (torch-using) process; the subprocesses only run them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs before anything else in the child: any `import torch` / `import torch.x` raises ImportError
# (recorded, with the importing module), as on a machine where torch is not installed.
BLOCK_TORCH = '''
import sys, json, atexit
_attempts = []
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            _attempts.append([name, frame.f_globals.get("__name__") if frame else None])
            raise ImportError(f"torch is blocked in this test (import of {name})")
        return None
sys.meta_path.insert(0, _NoTorch())
'''

REPORT = '''
def _report():
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    sys.stdout.write("\\nTORCH_REPORT " + json.dumps({"loaded": loaded, "attempts": _attempts}) + "\\n")
    sys.stdout.flush()
atexit.register(_report)
'''

NO_BLOCK = "import sys, json, atexit\n_attempts = []\n"


def run_child(body: str, *, block: bool = True, args: tuple = ()) -> tuple[subprocess.CompletedProcess, dict]:
    code = (BLOCK_TORCH if block else NO_BLOCK) + REPORT + body
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TORCH_REPORT ")]
    assert lines, f"child did not report (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(lines[-1].removeprefix("TORCH_REPORT "))


def assert_torch_free(proc: subprocess.CompletedProcess, report: dict) -> None:
    assert not report["loaded"], f"torch modules loaded: {report['loaded']}"
    assert not report["attempts"], f"torch imports attempted (name, importer): {report['attempts']}"


IMPORTS = """
import edgeenc.runtime
import edgeenc.runtime.encoder
import edgeenc.runtime.backends
import edgeenc.runtime.audio
import edgeenc.runtime.windows
import edgeenc.runtime.writers
import edgeenc.runtime.bundle
import edgeenc.cli
import edgeenc.runtime.backends.tensorrt_backend
import edgeenc.runtime.recorder.store
import edgeenc.runtime.recorder.watch
# `edgeenc build` runs on a Jetson without torch: its engine gate and parity cases must not need it.
import edgeenc.export.tensorrt
import edgeenc.export.parity
assert edgeenc.export.parity.parity_cases("beats", 16000)
"""


@pytest.mark.parametrize("block", [True, False], ids=["torch-blocked", "torch-installed"])
def test_runtime_imports_without_torch(block):
    proc, report = run_child(IMPORTS, block=block)
    assert proc.returncode == 0, proc.stderr
    assert_torch_free(proc, report)


CLI = """
from edgeenc.cli import main
sys.argv = ["edgeenc", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.exit(code)
"""


@pytest.fixture(scope="module")
def torch_free_audio(birds_wav, tmp_path_factory) -> list[Path]:
    import soundfile as sf

    folder = tmp_path_factory.mktemp("torch-free-audio")
    samples, rate = sf.read(birds_wav, dtype="int16")
    shutil.copy(birds_wav, folder / "birds.wav")
    sf.write(folder / "birds.flac", samples[: 5 * rate], rate, subtype="PCM_16")
    return [folder / "birds.wav", folder / "birds.flac"]


@pytest.mark.parametrize("block", [True, False], ids=["torch-blocked", "torch-installed"])
def test_embed_cli_without_torch(tiny_eat_bundle, torch_free_audio, tmp_path, block):
    out = tmp_path / "emb.npz"
    proc, report = run_child(CLI, block=block, args=("embed", tiny_eat_bundle[0], *torch_free_audio, "-o", out))
    assert proc.returncode == 0, proc.stderr
    assert_torch_free(proc, report)
    with np.load(out) as data:
        assert data["embeddings"].shape == (1 + 1, 64)  # 10.13 s (its 0.13 s tail dropped) and 5 s: one each
        assert list(data["file"]) == [str(torch_free_audio[0]), str(torch_free_audio[1])]


@pytest.mark.parametrize("block", [True, False], ids=["torch-blocked", "torch-installed"])
def test_classify_cli_without_torch(tiny_eat_bundle, torch_free_audio, tmp_path, block):
    out = tmp_path / "det.csv"
    args = ("classify", tiny_eat_bundle[0], *torch_free_audio, "-o", out, "--top-k", "2")
    proc, report = run_child(CLI, block=block, args=args)
    assert proc.returncode == 0, proc.stderr
    assert_torch_free(proc, report)
    lines = out.read_text().splitlines()
    assert lines[0] == "file,start,end,rank,label,score"
    assert len(lines) == 1 + 2 * 2  # header, two windows of two labels


@pytest.mark.parametrize("block", [True, False], ids=["torch-blocked", "torch-installed"])
def test_probe_train_and_attach_without_torch(tiny_eat_bundle, probe_set, tmp_path, block):
    """A Jetson without torch trains and attaches its own classifier: scikit-learn and onnx only."""
    probe, attached = tmp_path / "probe", tmp_path / "attached"
    for args in (("probe", "train", tiny_eat_bundle[0], probe_set[0], "-o", probe, "--window", "2"),
                 ("probe", "attach", tiny_eat_bundle[0], probe, "-o", attached)):
        proc, report = run_child(CLI, block=block, args=args)
        assert proc.returncode == 0, proc.stderr
        assert_torch_free(proc, report)
    assert json.loads((attached / "probe_labels.json").read_text()) == ["chirp", "pulses", "tone"]


def test_runtime_is_python_310_compatible():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install 'edgeenc[dev]')")
    targets = ["runtime", "edgeenc"]
    proc = subprocess.run(
        [vermin, "--no-tips", "--violations", "--eval-annotations", "-t=3.10-", *targets],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 0, f"code that needs Python > 3.10:\n{proc.stdout}\n{proc.stderr}"
