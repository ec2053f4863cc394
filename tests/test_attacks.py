"""The runtime under attack: nothing lost, nothing silently wrong, nothing outside the bundle.

One section per failure found when the runtime was attacked (issue 27); each test failed before its fix.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from clirun import cli

from edgeenc.cli_common import ExitStatus
from edgeenc.hashing import sha256_file
from edgeenc.runtime.bundle import MANIFEST, add_files_to_manifest, read_manifest

CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]
REPO = Path(__file__).resolve().parents[1]



def run(*args, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def one_line_error(stderr: str, *words: str) -> None:
    """A user's mistake: one clear line naming the problem, no traceback."""
    assert "Traceback" not in stderr, stderr
    assert all(w in stderr for w in words), stderr


@pytest.fixture
def clip(birds_wav, tmp_path) -> Path:
    samples, rate = sf.read(birds_wav, dtype="float32")
    path = tmp_path / "clip.wav"
    sf.write(path, samples[: 3 * rate], rate)
    return path


@pytest.fixture
def bundle_copy(tiny_eat_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_eat_bundle[0], target)
    return target


# --- 1. an existing output is never replaced by a worse one ------------------------------------------


def test_a_rerun_with_a_mistyped_folder_keeps_the_good_output(tiny_eat_bundle, clip, tmp_path):
    out = tmp_path / "prev.csv"
    assert cli("embed", tiny_eat_bundle[0], clip, "-o", out).exit_code == 0
    before = out.read_bytes()
    (tmp_path / "recordngs").mkdir()  # a mistyped folder that exists, but holds something else
    shutil.copy(clip, tmp_path / "recordngs" / "other.wav")
    refused = cli("embed", tiny_eat_bundle[0], tmp_path / "recordngs", "-o", out)
    assert refused.exit_code == ExitStatus.USAGE and "exists: pass --overwrite" in refused.stderr
    assert out.read_bytes() == before
    # Even when asked to overwrite, a run in which every input failed leaves the output as it was.
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF and nothing else")
    failed = cli("embed", tiny_eat_bundle[0], broken, "-o", out, "--overwrite")
    assert failed.exit_code == ExitStatus.SOME_FILES_FAILED and "kept as it was" in failed.stderr
    assert out.read_bytes() == before
    assert cli("embed", tiny_eat_bundle[0], clip, clip, "-o", out, "--overwrite").exit_code == 0
    assert len(out.read_text().splitlines()) == 3  # replaced when the run has results for it


@pytest.mark.parametrize("name, message", [("out.xlsx", "unsupported output format '.xlsx'"),
                                           ("folder", "is a folder")])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tiny_eat_bundle, clip, tmp_path, name,
                                                                            message):
    out = tmp_path / name
    if name == "folder":
        out.mkdir()
    began = time.perf_counter()
    result = cli("embed", tiny_eat_bundle[0], clip, "-o", out)
    assert result.exit_code == ExitStatus.USAGE and message in result.stderr
    assert "running on" not in result.stderr  # no backend was opened
    assert time.perf_counter() - began < 5


# --- 2. resuming never mixes the rows of two runs with different options -------------------------------


def test_a_resume_with_other_window_options_is_refused_naming_the_option(tiny_eat_bundle, clip, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    out = tmp_path / "emb.npz"
    first = cli("embed", tiny_eat_bundle[0], clip, bad, "-o", out, "--window", "2")
    assert first.exit_code == ExitStatus.SOME_FILES_FAILED and (tmp_path / "emb.npz.parts").is_dir()
    other = cli("embed", tiny_eat_bundle[0], clip, bad, "-o", out, "--window", "1")
    assert other.exit_code == ExitStatus.USAGE
    one_line_error(other.stderr, "window_seconds 2.0", "this run has 1.0")
    assert cli("embed", tiny_eat_bundle[0], clip, bad, "-o", out, "--window", "2", "--last", "pad").exit_code == 2
    with np.load(out) as data:  # the first run's table is untouched
        assert np.allclose(np.diff(data["start"]), 2.0)


# --- 3. watch stops when its results file is deleted under it -----------------------------------------


def test_watch_stops_when_its_results_file_is_deleted(tiny_eat_bundle, clip, tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "results.sqlite"
    inbox.mkdir()
    shutil.copy(clip, inbox / "a.wav")
    proc = subprocess.Popen([*CLI, "watch", inbox, "--bundle", tiny_eat_bundle[0], "--db", db, "--settle", "0",
                             "--poll", "0.05", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT count(*) FROM files").fetchone()[0]:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(clip, inbox / "b.wav")
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitStatus.USAGE
    one_line_error(stderr, f"{db} was deleted while in use")


# --- 4. outputs are checked: extreme samples never become NaN rows ------------------------------------


def test_extreme_samples_fail_their_file_instead_of_writing_nan(tiny_eat_bundle, clip, tmp_path):
    loud = tmp_path / "loud.wav"
    x = np.full(3 * 16000, 1e30, np.float32)
    x[::2] = -1e30
    sf.write(loud, x, 16000, subtype="FLOAT")
    out = tmp_path / "emb.npz"
    result = cli("embed", tiny_eat_bundle[0], clip, loud, "-o", out)
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED
    assert f"{loud}: the model's output is not finite for the window 0.000-3.000 s" in result.stderr
    with np.load(out) as data:
        assert list(data["file"]) == [str(clip)] and np.isfinite(data["embeddings"]).all()


def test_listen_skips_windows_whose_outputs_are_not_finite(tiny_eat_bundle, tmp_path):
    db = tmp_path / "live.sqlite"
    quiet = np.zeros(2 * 16000, np.float32) + 0.01
    loud = np.full(2 * 16000, 1e30, np.float32)
    loud[::2] = -1e30  # finite samples, but their power overflows float32 in the filterbank
    pcm = np.concatenate([quiet, loud, quiet]).astype("<f4").tobytes()
    result = subprocess.run([*CLI, "listen", "--bundle", str(tiny_eat_bundle[0]), "--db", str(db), "--source", "-",
                             "--format", "f32le", "--window", "2", "--device", "cpu"], input=pcm, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert "1 window(s) with outputs that are not finite" in result.stderr.decode()
    with sqlite3.connect(db) as conn:
        stored = [np.frombuffer(e, "<f4") for (e,) in conn.execute("SELECT embedding FROM windows")]
        scores = [s for (s,) in conn.execute("SELECT score FROM detections")]
    assert len(stored) == 2 and all(np.isfinite(e).all() for e in stored) and np.isfinite(scores).all()


# --- 5. inputs that cannot be read are said, never skipped ---------------------------------------------


def test_an_unreadable_folder_counts_as_a_failure(tiny_eat_bundle, clip, tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    (inbox / "locked").mkdir(parents=True)
    shutil.copy(clip, inbox / "a.wav")
    shutil.copy(clip, inbox / "locked" / "b.wav")
    if os.geteuid() == 0:  # root reads any folder: stand in for the kernel's refusal
        real = os.scandir

        def scandir(path="."):
            if Path(path) == inbox / "locked":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        (inbox / "locked").chmod(0)
    try:
        result = cli("embed", tiny_eat_bundle[0], inbox, "-o", tmp_path / "emb.npz")
    finally:
        (inbox / "locked").chmod(0o755)
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED
    assert f"{inbox / 'locked'}: cannot be listed (permission denied)" in result.stderr
    assert "1 file(s) done, 1 failed" in result.stderr


def test_a_file_that_may_not_be_read_and_a_link_loop_say_so(tiny_eat_bundle, clip, tmp_path, monkeypatch):
    from edgeenc.runtime import audio

    locked, loop = tmp_path / "locked.wav", tmp_path / "loop.wav"
    shutil.copy(clip, locked)
    loop.symlink_to(loop)
    if os.geteuid() == 0:
        real = open

        def guarded(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(audio, "open", guarded, raising=False)
    else:
        locked.chmod(0)
    result = cli("embed", tiny_eat_bundle[0], clip, locked, loop, "-o", tmp_path / "emb.npz")
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED
    assert f"{locked}: cannot be read: permission denied" in result.stderr
    assert f"{loop}: is a symbolic link to '{loop}', which does not exist or loops" in result.stderr


# --- 6. a long recording is resumed where it stopped, with progress inside it -------------------------


KILLED_AFTER_TWO_PARTS = """
import os, signal, sys
from edgeenc.runtime import resume
save, saved = resume.PartFolder.save, []
def save_then_die(self, *args):
    save(self, *args)
    saved.append(1)
    if len(saved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
resume.PartFolder.save = save_then_die
from edgeenc.cli import main
main()
"""


def test_a_killed_long_recording_resumes_from_its_last_range(tiny_eat_bundle, birds_wav, tmp_path):
    samples, rate = sf.read(birds_wav, dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([samples * g for g in (1.0, 0.5, 0.25, 0.7)]), rate)  # 40.5 s
    out, fresh = tmp_path / "emb.npz", tmp_path / "fresh.npz"
    args = ["embed", str(tiny_eat_bundle[0]), str(long), "-o", str(out), "--range-seconds", "10", "--device", "cpu"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_PARTS, *args], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert len(list((tmp_path / "emb.npz.parts").glob("*.npz"))) == 2
    resumed = cli(*args)
    assert resumed.exit_code == 0 and "and 2 range(s) of others" in resumed.stderr
    assert cli("embed", tiny_eat_bundle[0], long, "-o", fresh, "--device", "cpu").exit_code == 0
    with np.load(out) as a, np.load(fresh) as b:
        np.testing.assert_allclose(a["start"], b["start"])
        np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5)
    assert not (tmp_path / "emb.npz.parts").exists()


def test_progress_comes_range_by_range_inside_a_long_file(tiny_eat_bundle, birds_wav, tmp_path):
    from edgeenc.runtime import Encoder, WindowOptions
    from edgeenc.runtime.resume import PartFolder, plan_files, resumable_run, run_identity

    samples, rate = sf.read(birds_wav, dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(samples, 4), rate)
    encoder = Encoder.load(tiny_eat_bundle[0], "cpu")
    planned, total = plan_files(encoder, [str(long)], WindowOptions(), range_seconds=10)
    steps = list(resumable_run(encoder, planned, WindowOptions(), PartFolder(tmp_path / "o.npz",
                                                                            run_identity(encoder, WindowOptions()))))
    progress = [s.audio_seconds for s in steps if s.outcome is None and s.audio_seconds]
    assert len(planned[0].ranges) == len(progress) == 3  # 10 s, 10 s, then 20 s and a 0.5 s tail left out
    assert sum(progress) == pytest.approx(40.0) and total == pytest.approx(4 * len(samples) / rate)
    assert [s.outcome.path for s in steps if s.outcome] == [str(long)]


# --- 7. a bundle may name only files inside itself -----------------------------------------------------


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "link.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle_copy, name):
    if name == "link.onnx":
        (bundle_copy / name).symlink_to("/etc/passwd")
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    result = cli("info", bundle_copy)
    assert result.exit_code == ExitStatus.USAGE
    one_line_error(result.stderr, f"names a file outside the bundle ({name!r})")
    assert "all file hashes match" not in result.stdout


def test_a_newer_manifest_format_is_refused_naming_both_versions(bundle_copy, clip, tmp_path):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    (bundle_copy / MANIFEST).write_text(json.dumps({**manifest, "format": 99, "quantum_weights": True}))
    result = cli("embed", bundle_copy, clip, "-o", tmp_path / "e.npz")
    assert result.exit_code == ExitStatus.USAGE
    one_line_error(result.stderr, "manifest format 99 is newer than this edgeenc reads (1)")


def test_an_engine_sidecar_cannot_point_outside_the_bundle(bundle_copy):
    from edgeenc.runtime.backends import engine_sidecars

    (bundle_copy / "engines").mkdir()
    (bundle_copy / "engines" / "x.json").write_text(json.dumps({"engine": "../../../../etc/passwd"}))
    (bundle_copy / "engines" / "y.json").write_text(json.dumps({"engine": "y.engine"}))
    assert [path.name for path, _ in engine_sidecars(bundle_copy)] == ["y.engine"]


# --- 8. spreadsheet-safe text cells ---------------------------------------------------------------------


def test_labels_and_file_names_cannot_become_spreadsheet_formulas(bundle_copy, clip, tmp_path, monkeypatch):
    labels = json.loads((bundle_copy / "labels.json").read_text())
    labels = ["=cmd|' /C calc'!A0"] * len(labels)  # every label, so whichever wins is a formula
    (bundle_copy / "labels.json").write_text(json.dumps(labels))
    add_files_to_manifest(bundle_copy, ["labels.json"])
    shutil.copy(clip, tmp_path / "=2+3.wav")
    monkeypatch.chdir(tmp_path)
    assert cli("classify", bundle_copy, "=2+3.wav", "-o", "d.csv", "--top-k", "1").exit_code == 0
    assert cli("classify", bundle_copy, "=2+3.wav", "-o", "d.txt", "--top-k", "1").exit_code == 0
    assert cli("embed", bundle_copy, "=2+3.wav", "-o", "e.csv").exit_code == 0
    rows = list(csv.DictReader(open("d.csv", newline="")))
    assert rows[0]["file"] == "'=2+3.wav" and rows[0]["label"] == "'=cmd|' /C calc'!A0"
    assert float(rows[0]["score"]) > 0  # numbers stay numbers
    raven = list(csv.DictReader(open("d.txt", newline=""), delimiter="\t"))
    assert raven[0]["Begin Path"] == "'=2+3.wav" and raven[0]["Species"].startswith("'=")
    assert next(csv.DictReader(open("e.csv", newline="")))["file"] == "'=2+3.wav"
    assert cli("embed", bundle_copy, "=2+3.wav", "-o", "e.npz").exit_code == 0
    with np.load("e.npz") as data:
        assert list(data["file"]) == ["=2+3.wav"]  # NPZ (and Parquet, SQLite) keep the raw text


# --- 9. no test hook in production code -----------------------------------------------------------------


def test_production_code_has_no_test_hooks():
    hooks = [f"{path.relative_to(REPO)}:{i}" for folder in ("runtime", "edgeenc", "export", "models")
             for path in (REPO / folder).rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if "EDGEENC_TEST" in line or "if_testing" in line]
    assert hooks == []


# --- 10. numbers are range-checked, naming the option or variable ----------------------------------------


@pytest.mark.parametrize("args, env, message", [
    (["--rate", "1"], {}, "a sample rate of 1 Hz is not one audio is recorded at"),
    (["--rate", "0"], {}, "a sample rate of 0 Hz is not one audio is recorded at"),
    (["--threads", "10000"], {}, "--threads must be between 1 and"),
    (["--threads", "-1"], {}, "--threads must be between 1 and"),
    ([], {"EDGEENC_THREADS": "abc"}, "EDGEENC_THREADS must be a whole number of threads, got 'abc'"),
    ([], {"EDGEENC_THREADS": "10000"}, "EDGEENC_THREADS must be between 1 and"),
    (["--top-k", "0"], {}, "top_k must be at least 1"),
    (["--threshold", "2"], {}, "threshold is a score between 0 and 1"),
])
def test_numbers_out_of_range_are_refused(tiny_eat_bundle, tmp_path, args, env, message):
    result = run("listen", "--bundle", tiny_eat_bundle[0], "--db", tmp_path / "r.sqlite", "--source", "-", *args,
                 env=env, input="", timeout=30)
    assert result.returncode == ExitStatus.USAGE
    one_line_error(result.stderr, message)


# --- 11. user errors are messages with exit 2, never tracebacks -----------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda m, b: m.pop("sample_rate"), "field 'sample_rate' is missing"),
    (lambda m, b: m.update(outputs="tokens"), "field 'outputs' is a str"),
    (lambda m, b: m["files"]["model.onnx"].pop("sha256"), "files['model.onnx'] has no sha256"),
    (lambda m, b: (b / "labels.json").write_text('["only one"]'), "has 1 names for the model's 10 classes"),
    (lambda m, b: (b / "labels.json").write_text('{"0": "a"}'), "must be a JSON list of class names"),
])
def test_a_damaged_bundle_is_a_message(bundle_copy, clip, tmp_path, damage, message):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    damage(manifest, bundle_copy)
    manifest["files"]["labels.json"]["sha256"] = sha256_file(bundle_copy / "labels.json")
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    result = run("embed", bundle_copy, clip, "-o", tmp_path / "e.npz")
    assert result.returncode == ExitStatus.USAGE
    one_line_error(result.stderr, message)


def test_an_output_in_a_place_that_cannot_be_written_is_a_message(tiny_eat_bundle, clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = run("embed", tiny_eat_bundle[0], clip, "-o", blocker / "out.npz")
    assert result.returncode == ExitStatus.USAGE
    one_line_error(result.stderr, f"{blocker / 'out.npz'}: cannot write in {blocker}")


def test_a_full_disk_while_writing_keeps_the_old_file(tiny_eat_bundle, clip, tmp_path, monkeypatch):
    out = tmp_path / "emb.csv"
    assert cli("embed", tiny_eat_bundle[0], clip, "-o", out).exit_code == 0
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = cli("embed", tiny_eat_bundle[0], clip, clip, "-o", out, "--overwrite")
    assert result.exit_code == ExitStatus.USAGE
    one_line_error(result.stderr, "No space left on device")
    assert out.read_bytes() == before


def test_a_results_file_that_refuses_writes_is_a_store_error(tiny_eat_bundle, tmp_path):
    from edgeenc.runtime import Encoder
    from edgeenc.runtime.recorder import FileInfo, Store, StoreError

    store = Store.for_encoder(tmp_path / "r.sqlite", Encoder.load(tiny_eat_bundle[0], "cpu"))

    class ReadOnly:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    store.conn = ReadOnly(store.conn)
    with pytest.raises(StoreError, match="cannot be written .*readonly database.*rows were not stored"):
        store.record_failed(FileInfo(str(tmp_path / "a.wav"), 1, 1, "0" * 64), "bad")
    assert not store.conn.in_transaction  # rolled back
    store.close()


def test_onnx_external_data_outside_the_bundle_is_a_message(bundle_copy, clip, tmp_path):
    import onnx

    model = onnx.load(str(bundle_copy / "model.onnx"))
    onnx.save(model, str(bundle_copy / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=1024)
    model = onnx.load(str(bundle_copy / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:  # onnx refuses to write this; an edited file says it anyway
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.bin"
    (bundle_copy / "weights.bin").rename(tmp_path / "outside.bin")
    (bundle_copy / "model.onnx").write_bytes(model.SerializeToString())
    add_files_to_manifest(bundle_copy, ["model.onnx"])
    result = run("embed", bundle_copy, clip, "-o", tmp_path / "e.npz", "--device", "cpu", "--cpu-engine",
                 "onnxruntime")
    assert result.returncode == ExitStatus.USAGE
    one_line_error(result.stderr, "model.onnx: ONNX Runtime cannot load it")


def test_an_unreachable_ray_address_is_a_message_at_once(tiny_eat_bundle, clip, tmp_path):
    pytest.importorskip("ray")
    began = time.perf_counter()
    result = run("embed", tiny_eat_bundle[0], clip, "-o", tmp_path / "out", "--engine", "ray", env={
        "RAY_ADDRESS": "127.0.0.1:9"}, timeout=60)
    assert result.returncode == ExitStatus.USAGE
    one_line_error(result.stderr, "cannot reach the Ray cluster at 127.0.0.1:9 (RAY_ADDRESS)")
    assert time.perf_counter() - began < 20
    assert read_manifest(tiny_eat_bundle[0])  # nothing of the bundle was touched
