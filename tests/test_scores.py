"""One scorer: the activation, top-k and threshold that classify, watch, listen and Ray all use, and the
options every recorder command shares with embed and classify."""

from __future__ import annotations

import csv
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgeenc.runtime.scores import ScoreOptions, activate, detections

CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]
BIRDS = resources.files("edgeenc") / "data" / "birds_10s.wav"
# The same windows and scores from every command: 2 s windows every 1.5 s, independent (sigmoid) scores.
OPTIONS = ["--window", "2", "--hop", "1.5", "--last", "short", "--top-k", "3", "--activation", "sigmoid"]


def test_activations_and_the_kept_labels():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    softmax = activate(logits, "softmax")
    np.testing.assert_allclose(softmax.sum(axis=1), 1.0)
    np.testing.assert_allclose(activate(logits, "sigmoid"), 1 / (1 + np.exp(-logits)))
    found = detections(logits, ["a", "b", "c"], ScoreOptions(top_k=2, threshold=0.2, activation="softmax"))
    assert [(d.window, d.label, d.rank) for d in found] == [(0, "a", 1), (1, "c", 1)]  # the rest are < 0.2
    assert found[0].score == pytest.approx(softmax[0, 0])
    sigmoid = detections(logits, ["a", "b", "c"], ScoreOptions(top_k=2, activation="sigmoid"))
    assert [(d.window, d.label) for d in sigmoid] == [(0, "a"), (0, "b"), (1, "c"), (1, "a")]  # ties: stable
    assert detections(None, None, ScoreOptions()) == []  # a model without a head has nothing to keep
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        ScoreOptions(activation="relu")


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, timeout=180, **kw)


def classify_rows(bundle: Path, wav: Path, tmp_path: Path) -> list[tuple]:
    out = tmp_path / "classify.csv"
    done = run("classify", bundle, wav, "-o", out, "--device", "cpu", *OPTIONS)
    assert done.returncode == 0, done.stderr.decode()
    with open(out, newline="") as f:
        return [(float(r["start"]), float(r["end"]), int(r["rank"]), r["label"], float(r["score"]))
                for r in csv.DictReader(f)]


def stored_rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute('SELECT w.start, w."end", d.rank, d.label, d.score FROM detections d '
                            "JOIN windows w ON w.id = d.window_id ORDER BY w.start, d.rank").fetchall()
    finally:
        conn.close()


def assert_same_rows(got: list[tuple], expected: list[tuple], atol: float) -> None:
    """(start, end, rank, label, score) rows: the same windows and labels, scores within `atol`."""
    assert [g[2:4] for g in got] == [e[2:4] for e in expected]
    np.testing.assert_allclose([g[:2] for g in got], [e[:2] for e in expected], atol=1e-9)
    np.testing.assert_allclose([g[4] for g in got], [e[4] for e in expected], atol=atol)


def test_watch_stores_the_scores_classify_gives(tiny_eat_bundle, tmp_path):
    bundle = tiny_eat_bundle[0]
    inbox, db = tmp_path / "inbox", tmp_path / "r.sqlite"
    inbox.mkdir()
    with resources.as_file(BIRDS) as wav:
        (inbox / "birds.wav").write_bytes(wav.read_bytes())
    expected = classify_rows(bundle, inbox / "birds.wav", tmp_path)
    assert len(expected) == 7 * 3  # 2 s windows every 1.5 s over 10.13 s, three labels each
    done = run("watch", inbox, "--bundle", bundle, "--db", db, "--once", "--settle", "0", "--device", "cpu", *OPTIONS)
    assert done.returncode == 0, done.stderr.decode()
    assert_same_rows(stored_rows(db), expected, atol=1e-6)  # the same file, windows and backend: equal


def test_listen_stores_the_scores_classify_gives(tiny_eat_bundle, tmp_path):
    bundle, db = tiny_eat_bundle[0], tmp_path / "live.sqlite"
    with resources.as_file(BIRDS) as wav:
        samples, rate = sf.read(wav, dtype="int16")
        expected = classify_rows(bundle, wav, tmp_path)
    done = run("listen", "--bundle", bundle, "--db", db, "--source", "-", "--rate", rate, "--device", "cpu",
               "--cpu-engine", "onnxruntime", "--variant", "fp32", *OPTIONS, input=samples.tobytes())
    assert done.returncode == 0, done.stderr.decode()
    # Resampled from the pipe in chunks rather than from the file at once: equal to float rounding.
    assert_same_rows(stored_rows(db), expected, atol=1e-4)


def test_recorder_commands_take_the_options_of_embed():
    """Declared once (edgeenc/cli_common.py): watch, listen and search offer what embed and classify offer."""
    from typer.testing import CliRunner

    from edgeenc.cli import app

    shared = ["--window", "--hop", "--last", "--batch", "--channel", "--device", "--threads", "--variant",
              "--cpu-engine", "--verbose"]
    for command in ("embed", "classify", "watch", "listen", "search"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
        assert all(flag in text for flag in shared), (command, [f for f in shared if f not in text])
    for command in ("classify", "watch", "listen"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert all(flag in text for flag in ("--top-k", "--threshold", "--activation")), command


@pytest.mark.parametrize("args, message", [
    (["--last", "never"], "last must be one of auto, short, pad, drop"),
    (["--activation", "relu"], "unknown activation 'relu'"),
    (["--batch", "0"], "batch_size must be at least 1"),
])
def test_a_bad_shared_option_is_one_line_before_any_work(tiny_eat_bundle, tmp_path, args, message):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    done = run("watch", inbox, "--bundle", tiny_eat_bundle[0], "--db", tmp_path / "r.sqlite", "--once", *args)
    assert done.returncode == 2 and message in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode() and not (tmp_path / "r.sqlite").exists()
