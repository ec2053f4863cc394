"""A newcomer's first hour (issue 25): outputs that keep their promises, installs that say what is missing,
errors before work and no noise."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from clirun import cli

from edgeenc.cli_common import ExitStatus
from edgeenc.runtime.bundle import MANIFEST, add_files_to_manifest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]



@pytest.fixture
def recordings(birds_wav, tmp_path) -> list[Path]:
    """Four copies of the 10.133 s recording (at other gains), which a Raven table lays end to end."""
    samples, rate = sf.read(birds_wav, dtype="float32")
    paths = []
    for i, gain in enumerate((1.0, 0.5, 0.25, 0.7)):
        paths.append(tmp_path / f"rec{i}.wav")
        sf.write(paths[-1], samples * gain, rate)
    return paths


# --- 1. Raven tables place each file by its length ---------------------------------------------------------


def test_raven_begin_times_follow_each_file_length(tiny_eat_bundle, recordings, tmp_path):
    out = tmp_path / "selections.txt"
    assert cli("classify", tiny_eat_bundle[0], *recordings, "-o", out, "--top-k", "1").exit_code == 0
    rows = list(csv.DictReader(open(out, newline=""), delimiter="\t"))
    first = {r["Begin Path"]: float(r["Begin Time (s)"]) - float(r["File Offset (s)"]) for r in rows}
    length = sf.info(recordings[0]).duration  # 10.133 s: the 0.133 s tail is no window, but it is audio
    assert [first[str(p)] for p in recordings] == pytest.approx([0, length, 2 * length, 3 * length], abs=1e-6)


# --- 2. random weights are flagged in every output -------------------------------------------------------


def test_random_weights_are_flagged_in_results_files_their_exports_and_the_python_api(tiny_eat_bundle, birds_wav,
                                                                                      tmp_path):
    from edgeenc.runtime import Encoder, RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        Encoder.load(tiny_eat_bundle[0], "cpu")
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    inbox.mkdir()
    shutil.copy(birds_wav, inbox)
    assert cli("watch", inbox, "--bundle", tiny_eat_bundle[0], "--db", db, "--once", "--settle", "0").exit_code == 0
    with sqlite3.connect(db) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta"))["random_init"] == "true"
    exported = cli("export-db", db, "-o", tmp_path / "t.csv")
    assert exported.exit_code == 0 and "RANDOM weights" in exported.stderr
    assert json.loads((tmp_path / "t.csv.json").read_text())["random_init"] == "true"
    pq = pytest.importorskip("pyarrow.parquet")
    assert cli("export-db", db, "-o", tmp_path / "t.parquet").exit_code == 0
    assert pq.read_schema(tmp_path / "t.parquet").metadata[b"random_init"] == b"true"


# --- 3. a results file records which variant made each row ------------------------------------------------


def test_a_results_file_records_the_variant_of_every_file_and_says_when_it_mixes(tiny_eat_bundle, birds_wav,
                                                                               tmp_path):
    from edgeenc.runtime import Encoder
    from edgeenc.runtime.recorder import FileInfo, Store

    db = tmp_path / "r.sqlite"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    result = encoder.embed_file(birds_wav)
    for i, variant in enumerate(("model.onnx on onnxruntime CPUExecutionProvider", "model.int8dyn.onnx on x")):
        with Store.open(db, model_id="m", bundle_hash="b" * 64, embedding_dim=64, variant=variant) as store:
            store.record_done(FileInfo(f"/r{i}.wav", 1, i, str(i) * 64), result.starts, result.ends,
                              result.embeddings)
    exported = cli("export-db", db, "-o", tmp_path / "t.csv")
    assert exported.exit_code == 0 and "mixes rows of 2 variants" in exported.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv", newline="")))
    assert [r["variant"] for r in rows] == ["model.onnx on onnxruntime CPUExecutionProvider", "model.int8dyn.onnx on x"]


# --- 5. a runtime-only install says which extra a command needs ------------------------------------------

BLOCK = '''
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "safetensors", "huggingface_hub"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
from edgeenc.cli import main
main()
'''


@pytest.mark.parametrize("command", [["models"], ["demo"], ["export", "esp_aves2_sl_eat_all_ssl_all"],
                                     ["optimize", "BUNDLE"]])
def test_a_runtime_only_install_names_the_extra_a_command_needs(tiny_eat_bundle, command):
    args = [str(tiny_eat_bundle[0]) if a == "BUNDLE" else a for a in command]
    done = subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitStatus.USAGE and "Traceback" not in done.stderr, done.stderr
    assert f"`edgeenc {command[0]}` needs" in done.stderr and "pip install 'edgeenc[export]'" in done.stderr


# --- 7. inputs are checked before the model loads ----------------------------------------------------------


def test_a_mistyped_input_is_refused_before_any_work(tiny_eat_bundle, tmp_path):
    out = tmp_path / "d.csv"
    result = cli("classify", tiny_eat_bundle[0], tmp_path / "recordngs", "-o", out)
    assert result.exit_code == ExitStatus.USAGE
    assert f"{tmp_path / 'recordngs'}: no such file or folder" in result.stderr
    assert "running on" not in result.stderr and not out.exists() and ".parts" not in result.stderr


# --- 8. --device cuda on a machine without a GPU says so first -------------------------------------------


def test_cuda_without_a_gpu_says_there_is_none_first(tiny_eat_bundle, birds_wav, tmp_path):
    from edgeenc.runtime.backends.gpu import nvidia_gpu_missing

    if nvidia_gpu_missing() is None:
        pytest.skip("this machine shows an NVIDIA GPU")
    result = cli("embed", tiny_eat_bundle[0], birds_wav, "-o", tmp_path / "e.npz", "--device", "cuda")
    assert result.exit_code == ExitStatus.USAGE
    assert re.search(r"error: no NVIDIA GPU or driver is visible on this machine .*; and the installed ONNX Runtime",
                     result.stderr)


# --- 9. listen knows a file from a live source -----------------------------------------------------------


def test_listen_says_when_audio_arrives_faster_than_real_time_and_no_drop_keeps_it_all(tiny_eat_bundle, birds_wav,
                                                                                      tmp_path):
    samples, rate = sf.read(birds_wav, dtype="int16")
    pcm = np.tile(samples, 6).tobytes()  # a minute of audio, piped in at once
    base = [*CLI, "listen", "--bundle", str(tiny_eat_bundle[0]), "--source", "-", "--rate", str(rate), "--window",
            "1", "--buffer", "2", "--device", "cpu", "--threads", "1"]
    dropping = subprocess.run([*base, "--db", str(tmp_path / "a.sqlite")], input=pcm, capture_output=True,
                              timeout=120)
    stderr = dropping.stderr.decode()
    assert dropping.returncode == 0, stderr
    drops = [line for line in stderr.splitlines() if "dropped" in line and "arrives at" in line]
    assert drops and "faster than a live source can" in drops[0] and "--no-drop" in drops[0]
    assert len([line for line in stderr.splitlines() if line.startswith("error: dropped")]) == len(drops)
    assert not any("dropped" in line and not line.startswith(("error: dropped", "end of source")) for line in
                   stderr.splitlines())  # said once, not also by the log
    kept = subprocess.run([*base, "--no-drop", "--db", str(tmp_path / "b.sqlite")], input=pcm, capture_output=True,
                          timeout=180)
    assert kept.returncode == 0 and "dropped" not in kept.stderr.decode().replace("0.0 s dropped", "")
    with sqlite3.connect(tmp_path / "b.sqlite") as conn:
        # every second of it, and the last 0.8 s at its true length (--last short at the end of a source)
        assert conn.execute("SELECT count(*) FROM windows").fetchone()[0] == int(np.ceil(6 * len(samples) / rate))
    assert re.search(r"batch +\d+ window\(s\) from \S+: \S+ \d\.\d\d", kept.stderr.decode())  # the top labels


# --- 10. optimize says what it did, not what its tools print ---------------------------------------------


def test_optimize_prints_no_raw_onnxruntime_or_quantizer_lines(tiny_eat_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_eat_bundle[0], bundle)
    done = subprocess.run([*CLI, "optimize", str(bundle), "--no-openvino", "--no-pick", "--no-dynamic", "--threads",
                           "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, ExitStatus.PARITY_FAILED), done.stderr
    assert "NOT_IMPLEMENTED" not in done.stderr and "Please consider to run pre-processing" not in done.stderr
    assert "model.bf16.onnx" in done.stdout  # the bf16 answer is still reported, in edgeenc's words


# --- 11. offline, the hub is given up on at once -----------------------------------------------------------


def test_an_unreachable_hub_is_said_at_once(monkeypatch):
    from huggingface_hub import constants

    from edgeenc.models.checkpoints import CheckpointUnavailable, load_model

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    began = time.perf_counter()
    with pytest.raises(CheckpointUnavailable, match=r"not reachable from this machine.*--checkpoint.*--random-init"):
        load_model("esp_aves2_sl_eat_all_ssl_all")
    assert time.perf_counter() - began < 5


# --- 12. smaller things ---------------------------------------------------------------------------------


def test_help_describes_the_tool_and_a_mistyped_model_id_gets_a_suggestion():
    assert "bioacoustic encoders" in cli("--help").stdout
    result = cli("export", "esp_aves2_sl_eat_all_ssl_al", "--random-init")
    assert result.exit_code == ExitStatus.USAGE and "did you mean 'esp_aves2_sl_eat_all_ssl_all'?" in result.stderr


def test_a_note_of_the_cpu_choice_is_said_once(tiny_eat_bundle, birds_wav, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_eat_bundle[0], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["cpu_default"] = {"variant": "model.onnx", "engine": "onnxruntime", "precision": "fp32",
                               "timed_on": {"cpu_model": "another CPU model"},
                               "ranking": [{"variant": "model.onnx", "p50_ms": 1.0}]}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    add_files_to_manifest(bundle, [])
    done = subprocess.run([*CLI, "embed", str(bundle), str(birds_wav), "-o", str(tmp_path / "e.npz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("was timed on another CPU model") == 1


def test_bench_names_speed_and_real_time_factor_apart(tiny_eat_bundle):
    from edgeenc.runtime.bench import format_table, run_bench

    report = run_bench(tiny_eat_bundle[0], device="cpu", runs=2, warmup=1, threads=1, cold=False)
    row = report["rows"][0]
    assert row["x_real_time"] == pytest.approx(1 / row["real_time_factor"]) and row["real_time_factor"] < 1
    assert "x real time" in format_table(report) and "RTF" in format_table(report)


def test_readme_exit_code_table_is_the_one_every_command_follows():
    table = re.findall(r"^\| (\d+) \| ", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    assert sorted(int(code) for code in table) == sorted(status.value for status in ExitStatus)
