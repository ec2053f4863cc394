"""Detections a field researcher can act on (issue 24): the head's own activation, per-label thresholds and label
lists, events instead of windows, and events of a results file that survive kill -9."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from clirun import cli
from stall import STALLING_CLI, kill_when_stalled

from edgeenc.cli_common import ExitStatus
from edgeenc.runtime.bundle import MANIFEST, add_files_to_manifest
from edgeenc.runtime.scores import Detection, ScoreOptions, detections, merge_events

CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]



def rows_of(path: Path, delimiter: str = ",") -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


# --- activation per head ---------------------------------------------------------------------------------


def _edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    add_files_to_manifest(bundle, [])


def test_an_sl_head_scores_with_sigmoid_and_a_single_label_head_with_softmax(tiny_eat_bundle, tmp_path):
    from edgeenc.runtime import Encoder

    bundle = tmp_path / "b"
    shutil.copytree(tiny_eat_bundle[0], bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["activation"] == "sigmoid" and "multi-label" in manifest["activation_why"]
    assert Encoder.load(bundle, "cpu").activation == "sigmoid"
    _edit(bundle, lambda m: [m.pop("activation"), m.pop("activation_why")])  # exported before it was recorded
    assert Encoder.load(bundle, "cpu").activation == "sigmoid"  # the model id says sl_*
    _edit(bundle, lambda m: m.update(activation="softmax", activation_why="a single-label head"))
    encoder = Encoder.load(bundle, "cpu")
    assert encoder.activation == "softmax" and encoder.scoring().activation == "softmax"
    assert encoder.scoring(ScoreOptions(activation="sigmoid")).activation == "sigmoid"  # --activation overrides
    info = cli("info", bundle)
    assert "activation         softmax (a single-label head)" in info.stdout


def test_classify_uses_the_head_activation_by_default(tiny_eat_bundle, birds_wav, tmp_path):
    default, sigmoid = tmp_path / "d.csv", tmp_path / "s.csv"
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", default, "--top-k", "3").exit_code == 0
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", sigmoid, "--top-k", "3", "--activation",
               "sigmoid").exit_code == 0
    assert rows_of(default) == rows_of(sigmoid)
    assert sum(float(r["score"]) for r in rows_of(default)) > 1.0  # independent scores, not a distribution
    assert json.loads((tmp_path / "d.csv.json").read_text())["activation"] == "sigmoid"


# --- events from a sequence of windows ------------------------------------------------------------------


def test_events_merge_consecutive_windows_of_a_label():
    # Windows of 2 s every 1 s (overlapping), then a gap of dropped audio, then 2 s windows every 2 s.
    starts = [0, 1, 2, 3, 4, 10, 12, 14]
    ends = [2, 3, 4, 5, 6, 12, 14, 16]
    found = [Detection(w, "owl", 1, s) for w, s in ((0, 0.5), (1, 0.9), (2, 0.7), (5, 0.6), (6, 0.8))]
    found += [Detection(w, "wren", 2, s) for w, s in ((1, 0.3), (3, 0.4), (4, 0.5), (7, 0.2))]
    events = merge_events(starts, ends, found)
    assert [(e.label, e.start, e.end, e.windows) for e in events] == [
        ("owl", 0, 4, 3), ("wren", 1, 3, 1), ("wren", 3, 6, 2), ("owl", 10, 14, 2), ("wren", 14, 16, 1)]
    owl = events[0]
    assert owl.max_score == 0.9 and owl.mean_score == pytest.approx(0.7)
    # 4 -> 10 is a gap (dropped audio): windows 4 and 5 are next to each other in the list but not in time
    assert [(e.label, e.windows) for e in merge_events(starts, ends, found, min_windows=2)] == [
        ("owl", 3), ("wren", 2), ("owl", 2)]


def test_per_label_thresholds_and_label_lists():
    logits = np.log(np.array([[0.9, 0.6, 0.3], [0.8, 0.7, 0.1]]) / (1 - np.array([[0.9, 0.6, 0.3], [0.8, 0.7, 0.1]])))
    labels = ["owl", "wren", "crow"]
    plain = detections(logits, labels, ScoreOptions(top_k=3, threshold=0.5, activation="sigmoid"))
    assert [(d.window, d.label) for d in plain] == [(0, "owl"), (0, "wren"), (1, "owl"), (1, "wren")]
    wren_high = detections(logits, labels, ScoreOptions(top_k=3, threshold=0.5, activation="sigmoid",
                                                        thresholds=(("wren", 0.65),)))
    assert [(d.window, d.label) for d in wren_high] == [(0, "owl"), (1, "owl"), (1, "wren")]  # only wren changed
    only = detections(logits, labels, ScoreOptions(top_k=1, activation="sigmoid", include=frozenset({"wren"})))
    assert [(d.label, d.rank) for d in only] == [("wren", 1), ("wren", 1)]
    assert [d.label for d in detections(logits, labels, ScoreOptions(top_k=1, activation="sigmoid",
                                                                     exclude=frozenset({"owl"})))] == ["wren", "wren"]


def test_a_thresholds_file_changes_only_its_label(tiny_eat_bundle, birds_wav, tmp_path):
    base, tuned = tmp_path / "base.csv", tmp_path / "tuned.csv"
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", base, "--top-k", "10", "--window", "2",
               "--threshold", "0.3").exit_code == 0
    rows = rows_of(base)
    label = rows[0]["label"]
    thresholds = tmp_path / "thresholds.csv"
    thresholds.write_text(f"label,threshold\n{label},0.99\n")
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", tuned, "--top-k", "10", "--window", "2",
               "--threshold", "0.3", "--thresholds", thresholds).exit_code == 0
    assert rows_of(tuned) == [r for r in rows if r["label"] != label]


@pytest.mark.parametrize("text, message", [
    ("random_clas_3,0.5\nnot a label,0.2\n", "unknown label(s) 'random_clas_3' (closest: random_class_3"),
    ("random_class_3,1.5\n", "threshold 1.5 for 'random_class_3' is not between 0 and 1"),
    ("random_class_3\n", "expected 'label,threshold'"),
])
def test_a_bad_thresholds_file_is_one_line_before_any_work(tiny_eat_bundle, birds_wav, tmp_path, text, message):
    thresholds = tmp_path / "t.csv"
    thresholds.write_text(text)
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", tmp_path / "d.csv", "--thresholds", thresholds)
    assert result.exit_code == ExitStatus.USAGE and message in result.stderr
    assert not (tmp_path / "d.csv").exists() and not (tmp_path / "d.csv.parts").exists()


def test_classify_events_merge_its_window_rows(tiny_eat_bundle, birds_wav, tmp_path):
    windows, events, raven = tmp_path / "w.csv", tmp_path / "e.csv", tmp_path / "e.txt"
    common = ["--window", "2", "--hop", "1", "--top-k", "1", "--threshold", "0.4"]
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", windows, *common).exit_code == 0
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", events, "--events", *common).exit_code == 0
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", raven, "--events", *common).exit_code == 0
    got = rows_of(events)
    assert got and sum(int(e["windows"]) for e in got) == len(rows_of(windows))
    for event in got:
        inside = [r for r in rows_of(windows) if r["label"] == event["label"]
                  and float(event["start"]) <= float(r["start"]) < float(event["end"])]
        assert len(inside) == int(event["windows"])
        assert float(event["max_score"]) == max(float(r["score"]) for r in inside)
    selections = rows_of(raven, "\t")
    assert [(s["Species"], float(s["Begin Time (s)"]), float(s["End Time (s)"])) for s in selections] == [
        (e["label"], float(e["start"]), float(e["end"])) for e in got]
    confirmed = tmp_path / "c.csv"
    assert cli("classify", tiny_eat_bundle[0], birds_wav, "-o", confirmed, "--min-windows", "2", *common
               ).exit_code == 0
    long_enough = {(e["label"], float(e["start"])) for e in got if int(e["windows"]) >= 2}
    assert len(rows_of(confirmed)) == sum(int(e["windows"]) for e in got if int(e["windows"]) >= 2)
    assert long_enough


# --- events of a results file survive kill -9 ---------------------------------------------------------


def test_watch_killed_mid_file_then_restarted_gives_the_events_of_an_uninterrupted_run(tiny_eat_bundle, birds_wav,
                                                                                      tmp_path):
    samples, rate = sf.read(birds_wav, dtype="float32")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(4):
        sf.write(inbox / f"r{i}.wav", np.roll(samples, i * rate), rate)
    args = ["watch", str(inbox), "--bundle", str(tiny_eat_bundle[0]), "--settle", "0", "--poll", "0.05",
            "--window", "2", "--hop", "1", "--threshold", "0.3", "--device", "cpu"]
    clean = subprocess.run([*CLI, *args, "--db", str(tmp_path / "clean.sqlite"), "--once"], capture_output=True,
                           timeout=120)
    assert clean.returncode == 0, clean.stderr.decode()
    db, marker = tmp_path / "killed.sqlite", tmp_path / "stalled"
    kill_when_stalled([*STALLING_CLI, *args, "--db", str(db)], 3, marker)
    restarted = subprocess.run([*CLI, *args, "--db", str(db), "--once"], capture_output=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr.decode()
    for name in ("clean", "killed"):
        assert cli("export-db", tmp_path / f"{name}.sqlite", "-o", tmp_path / f"{name}.csv", "--events"
                   ).exit_code == 0
    clean_events = sorted((r["file"], r["label"], r["start"], r["end"], r["windows"]) for r in
                          rows_of(tmp_path / "clean.csv"))
    assert clean_events and clean_events == sorted((r["file"], r["label"], r["start"], r["end"], r["windows"])
                                                   for r in rows_of(tmp_path / "killed.csv"))


# --- clips to review --------------------------------------------------------------------------------------


def check_clips(folder: Path, margin: float) -> list[dict]:
    """Every clip of the index: the recording's samples from its clip_start, as long as event +- margin."""
    index = rows_of(folder / "index.csv")
    assert index and list(index[0]) == ["clip", "file", "start", "end", "clip_start", "label", "score", "windows",
                                        "utc_start", "verdict"]
    for row in index:
        recording, rate = sf.read(row["file"], dtype="int16")
        clip, clip_rate = sf.read(folder / row["clip"], dtype="int16")
        first = round(float(row["clip_start"]) * rate)
        expected = min(len(recording), round((float(row["end"]) + margin) * rate)) - first
        assert clip_rate == rate and first == max(0, round((float(row["start"]) - margin) * rate))
        assert len(clip) == expected and np.array_equal(clip, recording[first:first + expected])
        assert row["verdict"] == "" and row["clip"].endswith(f"_{float(row['score']):.3f}.flac")
    return index


def test_classify_cuts_event_clips_with_a_review_index(tiny_eat_bundle, birds_wav, tmp_path):
    folder = tmp_path / "clips"
    result = cli("classify", tiny_eat_bundle[0], birds_wav, "-o", tmp_path / "e.csv", "--events", "--window", "2",
                 "--hop", "1", "--top-k", "1", "--threshold", "0.4", "--clips", folder, "--clip-margin", "0.5")
    assert result.exit_code == 0, result.output
    index = check_clips(folder, 0.5)
    assert len(index) == len(rows_of(tmp_path / "e.csv"))


def test_clips_of_a_watch_results_file_and_of_a_live_stream(tiny_eat_bundle, birds_wav, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(birds_wav, inbox)
    common = ["--window", "1", "--threshold", "0.4", "--top-k", "1", "--device", "cpu"]
    assert cli("watch", inbox, "--bundle", tiny_eat_bundle[0], "--db", tmp_path / "w.sqlite", "--once", "--settle",
               "0", *common).exit_code == 0
    made = cli("clips", tmp_path / "w.sqlite", "-o", tmp_path / "wclips", "--margin", "0.25")
    assert made.exit_code == 0, made.output
    check_clips(tmp_path / "wclips", 0.25)
    assert cli("clips", tmp_path / "w.sqlite", "-o", tmp_path / "wclips").exit_code == ExitStatus.USAGE  # exists
    samples, rate = sf.read(birds_wav, dtype="int16")
    live = subprocess.run([*CLI, "listen", "--bundle", str(tiny_eat_bundle[0]), "--db", str(tmp_path / "l.sqlite"),
                           "--source", "-", "--rate", str(rate), "--save-clips", str(tmp_path / "saved"), *common],
                          input=samples.tobytes(), capture_output=True, timeout=120)
    assert live.returncode == 0, live.stderr.decode()
    made = cli("clips", tmp_path / "l.sqlite", "-o", tmp_path / "lclips")
    assert made.exit_code == 0, made.output
    for row in rows_of(tmp_path / "lclips" / "index.csv"):
        clip, clip_rate = sf.read(tmp_path / "lclips" / row["clip"], dtype="int16")
        assert clip_rate == 16000 and len(clip) == round((float(row["end"]) - float(row["start"])) * 16000)
        assert row["utc_start"] and row["file"].startswith("live:-@")
