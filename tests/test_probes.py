"""Your own classifier (issue 23): labelled data in every form, `probe train | evaluate | attach`, and the attached
probe run by classify, watch, listen, a bare model.onnx and TensorRT (stand-ins); Ray and C++ in their own files.

The audio is tests/probe_data.py's: tones, up-chirps and pulse trains in noise, several recordings per label.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
from clirun import cli
from probe_data import make_dataset, recording, write_csv, write_raven

from edgeenc.cli_common import ExitStatus
from edgeenc.runtime import Encoder
from edgeenc.runtime.bundle import bundle_identity, read_manifest, verify_bundle
from edgeenc.runtime.probes import (
    AttachError,
    LabelledDataError,
    Probe,
    Recording,
    Span,
    attach_probe,
    labelled_windows,
    load_labelled,
)
from edgeenc.runtime.probes.attach import reference_scores
from edgeenc.runtime.probes.train import split_by_file

pytest.importorskip("sklearn")



def windows_of(recordings, encoder, window=2.0):
    """(resolved file, start, end, labels) of every window, with embeddings by the encoder."""
    results = {r.path: encoder.embed_file(r.path, window_seconds=window) for r in recordings}
    data = labelled_windows(recordings, results)
    rows = []
    for i in range(len(data.groups)):
        labels = frozenset(data.classes[c] for c in np.flatnonzero(data.targets[i]))
        rows.append((str(Path(data.files[data.groups[i]]).resolve()), float(data.starts[i]), float(data.ends[i]),
                     labels))
    return sorted(rows, key=lambda r: (r[0], r[1]))


@pytest.fixture(scope="module")
def eat(tiny_eat_bundle) -> Encoder:
    return Encoder.load(tiny_eat_bundle[0], "cpu", threads=1)


# --- labelled data in the forms people have ---------------------------------------------------------------------


def test_folders_csv_and_raven_give_the_same_windows_and_labels(eat, tmp_path):
    root = tmp_path / "data"
    written = make_dataset(root, per_label=2, negatives=1, both=1, seconds=4.0)
    folders = windows_of(load_labelled(root), eat)
    write_csv(tmp_path / "labels.csv", written)
    (tmp_path / "raven").mkdir()
    write_raven(tmp_path / "raven" / "all.Table.1.selections.txt", written)  # Begin File: ../data/<label>/...
    from_csv = windows_of(load_labelled(tmp_path / "labels.csv"), eat)
    from_raven = windows_of(load_labelled(tmp_path / "raven"), eat)
    assert len(folders) == 8 * 2  # 8 recordings of 4 s, two 2 s windows each
    assert from_csv == folders and from_raven == folders
    labels = {r[3] for r in folders}
    assert labels == {frozenset(), frozenset({"tone"}), frozenset({"chirp"}), frozenset({"pulses"}),
                      frozenset({"chirp", "tone"})}


def test_a_raven_table_beside_its_recording_with_a_named_label_column(tmp_path):
    sf.write(tmp_path / "rec.wav", np.zeros(16000 * 5, np.float32), 16000)
    table = tmp_path / "rec.Table.1.selections.txt"
    table.write_text("Selection\tBegin Time (s)\tEnd Time (s)\tCall\n1\t0.5\t1.5\twren\n2\t3\t4.5\trobin\n")
    (recording_,) = load_labelled(tmp_path, label_column="Call")
    assert Path(recording_.path) == tmp_path / "rec.wav"
    assert [(s.start, s.end, s.label) for s in recording_.spans] == [(0.5, 1.5, "wren"), (3.0, 4.5, "robin")]
    assert recording_.labels_of(0, 2) == {"wren"} and recording_.labels_of(2, 4) == {"robin"}
    with pytest.raises(LabelledDataError, match=r"rec\.Table\.1\.selections\.txt: missing column.*--label-column"):
        load_labelled(table)


def test_a_window_takes_the_labels_it_overlaps_by_the_minimum_or_holds_whole():
    rec = Recording("r.wav", [Span(1.8, 3.0, "late"), Span(0.2, 0.4, "short"), Span(1.0, 3.0, "long"),
                              Span(0.0, None, None)])
    assert rec.labels_of(0.0, 2.0, min_overlap=0.5) == {"short", "long"}  # 0.2 s of "late" is under 0.5 s
    assert rec.labels_of(0.0, 2.0, min_overlap=0.1) == {"short", "long", "late"}
    assert rec.labels_of(4.0, 6.0) == frozenset()  # a negative span gives no label


@pytest.mark.parametrize("content, message", [
    ("file,begin,end,label\na.wav,0,1,x\n", r"labels\.csv: missing column\(s\) start; expected a header"),
    ("file,start,end,label\na.wav,0,1,x\na.wav,2,2,x\n", r"labels\.csv:3: end \(2 s\) must come after start"),
    ("file,start,end,label\na.wav,zero,1,x\n", r"labels\.csv:2: start 'zero' / end '1' are not seconds"),
    ("file,start,end,label\na.wav,0,1,Tone\nb.wav,0,1,tone \n", r"labels 'Tone' and 'tone' differ only in case"),
])
def test_bad_annotation_tables_name_the_file_row_and_fix(tmp_path, content, message):
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(LabelledDataError, match=message):
        load_labelled(tmp_path / "labels.csv")


def test_a_reviewed_clips_index_becomes_labels_negatives_and_corrections(tmp_path):
    from edgeenc.runtime.clips import INDEX_COLUMNS

    sf.write(tmp_path / "rec.wav", np.zeros(16000 * 20, np.float32), 16000)
    sf.write(tmp_path / "live-clip.flac", np.zeros(16000 * 4, np.float32), 16000)
    rows = [  # clip, file, start, end, clip_start, label, score, windows, utc_start, verdict
        ("c1.flac", str(tmp_path / "rec.wav"), 0, 2, 0, "wren", 0.9, 1, "", "yes"),
        ("c2.flac", str(tmp_path / "rec.wav"), 4, 6, 3.5, "wren", 0.8, 1, "", "no"),
        ("c3.flac", str(tmp_path / "rec.wav"), 8, 10, 7.5, "wren", 0.7, 1, "", "robin"),
        ("c4.flac", str(tmp_path / "rec.wav"), 12, 14, 11.5, "wren", 0.6, 1, "", ""),
        ("live-clip.flac", "live:mic", 101, 103, 100, "wren", 0.9, 1, "", "yes"),
    ]
    with open(tmp_path / "index.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    found = {Path(r.path).name: [(s.start, s.end, s.label) for s in r.spans]
             for r in load_labelled(tmp_path / "index.csv")}
    assert found == {"rec.wav": [(0.0, 2.0, "wren"), (4.0, 6.0, None), (8.0, 10.0, "robin")],
                     "live-clip.flac": [(1.0, 3.0, "wren")]}  # a live event: its clip is the recording


def test_empty_data_and_unknown_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelledDataError, match="no labelled recording found"):
        load_labelled(tmp_path / "empty")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LabelledDataError, match="not labelled data"):
        load_labelled(tmp_path / "x.json")


# --- probe train --------------------------------------------------------------------------------------------------


def test_train_on_the_easy_set_holds_out_by_recording_and_is_the_same_twice(tiny_eat_bundle, tiny_probe_bundle,
                                                                           probe_set, tmp_path):
    _, first = tiny_probe_bundle
    result = cli("probe", "train", tiny_eat_bundle[0], probe_set[0], "-o", tmp_path / "again", "--window", 2,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "held out by recording: probe accuracy" in result.output
    one, two = Probe.load(first), Probe.load(tmp_path / "again")
    np.testing.assert_array_equal(one.weights, two.weights)
    np.testing.assert_array_equal(one.bias, two.bias)
    assert one.metrics["accuracy"] == two.metrics["accuracy"] >= 0.9
    assert one.classes == ["chirp", "pulses", "tone"] and one.activation == "softmax"
    assert one.weights.shape == (3, 64) and one.fold_max_abs <= 1e-6
    raw = json.loads((first / "probe.json").read_text())
    for key in ("weights", "bias", "classes", "activation", "bundle", "data", "split", "metrics", "versions"):
        assert key in raw
    assert raw["data"]["fingerprint"] == json.loads((tmp_path / "again" / "probe.json").read_text())["data"][
        "fingerprint"]
    assert raw["data"]["per_class"]["tone"] == {"windows": 15, "recordings": 5}
    assert raw["bundle"]["bundle_sha256"] == bundle_identity(tiny_eat_bundle[0], read_manifest(tiny_eat_bundle[0]))[1]
    assert set(raw["versions"]) >= {"scikit-learn", "numpy", "edgeenc"}
    held_out = raw["split"]["held_out_recordings"]
    assert {name.split("_")[0] for name in held_out} == {"chirp", "pulses", "tone"}  # every label held out
    assert "by recording" in (first / "report.md").read_text()
    assert not list(first.rglob("*.pkl")) and not list(first.rglob("*.pickle"))
    assert not (first / "embeddings.parts").exists()  # a finished run leaves no parts


def test_windows_of_one_recording_never_sit_on_both_sides(eat, probe_set):
    recordings = load_labelled(probe_set[0])
    data = labelled_windows(recordings, {r.path: eat.embed_file(r.path, window_seconds=2.0) for r in recordings})
    split = split_by_file(data)
    assert not set(data.groups[split.train]) & set(data.groups[split.test])
    assert len(split.test) and len(split.train)


def test_several_labels_or_none_train_one_sigmoid_per_label(tiny_eat_bundle, tmp_path):
    make_dataset(tmp_path / "data", per_label=3, negatives=3, both=2, seconds=4.0)
    result = cli("probe", "train", tiny_eat_bundle[0], tmp_path / "data", "-o", tmp_path / "p", "--window", 2,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    probe = Probe.load(tmp_path / "p")
    assert probe.activation == "sigmoid" and probe.settings["scheme"] == "one-vs-rest"
    assert 0 <= probe.metrics["macro_average_precision"] <= 1 and "accuracy" not in probe.metrics
    assert probe.data["negative_windows"] == 3 * 2
    assert probe.data["per_class"]["tone"]["recordings"] == 3 + 2  # its own folder and "chirp,tone"
    assert "probe mAP" in result.output


def test_a_label_with_one_recording_is_refused_naming_it(tiny_eat_bundle, tmp_path):
    make_dataset(tmp_path / "data", per_label=2, negatives=0, both=0, seconds=3.0)
    for extra in list((tmp_path / "data" / "pulses").iterdir())[1:]:
        extra.unlink()
    result = cli("probe", "train", tiny_eat_bundle[0], tmp_path / "data", "-o", tmp_path / "p", "--window", 2)
    assert result.exit_code == ExitStatus.USAGE
    assert "label 'pulses' has 1 recording(s) (pulses_0.wav)" in result.output and "at least 2" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p" / "probe.json").exists()


def test_a_bad_recording_and_an_annotation_past_the_end_are_reported_and_the_rest_used(tiny_eat_bundle, tmp_path):
    written = make_dataset(tmp_path / "data", per_label=3, negatives=0, both=0, seconds=3.0)
    (tmp_path / "data" / "tone" / "broken.wav").write_bytes(b"RIFF\x00\x00 not audio at all")
    rows = (tmp_path / "data").joinpath("labels.csv")
    write_csv(rows, written)
    with open(rows, "a") as fh:
        fh.write("tone/broken.wav,0,3,tone\nchirp/chirp_0.wav,2.5,9.0,chirp\n")  # 9 s: past the 3 s recording
    result = cli("probe", "train", tiny_eat_bundle[0], rows, "-o", tmp_path / "p", "--window", 1, "--device", "cpu")
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    assert "broken.wav" in result.output and "after the end of the recording (3.00 s)" in result.output
    probe = Probe.load(tmp_path / "p")  # written from the other recordings
    assert set(probe.data["failed"]) == {str(tmp_path / "data" / "tone" / "broken.wav"),
                                         str(tmp_path / "data" / "chirp" / "chirp_0.wav")}
    assert probe.data["recordings"] == 3 * 3 - 1
    assert "Recordings not used" in (tmp_path / "p" / "report.md").read_text()


def test_train_refuses_an_existing_probe_and_empty_data(tiny_eat_bundle, tiny_probe_bundle, tmp_path):
    result = cli("probe", "train", tiny_eat_bundle[0], tmp_path, "-o", tiny_probe_bundle[1])
    assert result.exit_code == ExitStatus.USAGE and "pass --overwrite" in result.output
    (tmp_path / "empty").mkdir()
    result = cli("probe", "train", tiny_eat_bundle[0], tmp_path / "empty", "-o", tmp_path / "p")
    assert result.exit_code == ExitStatus.USAGE and "no labelled recording found" in result.output


# --- probe evaluate -----------------------------------------------------------------------------------------------


def test_evaluate_two_bundles_side_by_side_matches_scikit_learn_directly(tiny_eat_bundle, tiny_beats_bundle,
                                                                        probe_set, tmp_path):
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, normalized_mutual_info_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    result = cli("probe", "evaluate", tiny_eat_bundle[0], tiny_beats_bundle[0], probe_set[0], "-o", tmp_path / "ev",
                 "--window", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "esp_aves2_sl_eat_all_ssl_all" in line and "beats" in line)
    assert header.index("eat") < header.index("beats")
    for metric in ("probe accuracy", "retrieval ROC AUC", "clustering NMI"):
        row = next(line for line in lines if line.startswith(metric))
        assert len(row.split()) == len(metric.split()) + 2  # one figure per bundle
    found = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    chart = tmp_path / "ev" / "average_precision.png"
    if importlib.util.find_spec("matplotlib"):
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not chart.exists() and "no chart: pip install matplotlib" in result.output
    assert (tmp_path / "ev" / "evaluation.csv").read_text().count("\n") == 1 + 2 * 3
    recordings = load_labelled(probe_set[0])
    for (name, figures), bundle in zip(found.items(), (tiny_eat_bundle[0], tiny_beats_bundle[0])):
        encoder = Encoder.load(bundle, "cpu")
        data = labelled_windows(recordings, {r.path: encoder.embed_file(r.path, window_seconds=2.0)
                                             for r in recordings})
        split = split_by_file(data)
        y = data.targets.argmax(axis=1)
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                                   random_state=0))
        model.fit(data.embeddings[split.train].astype(np.float64), y[split.train])
        accuracy = accuracy_score(y[split.test], model.predict(data.embeddings[split.test].astype(np.float64)))
        x = data.embeddings.astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        i, j = np.triu_indices(len(x), k=1)
        auc = roc_auc_score(y[i] == y[j], (x[i] * x[j]).sum(axis=1))
        clusters = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(data.embeddings.astype(np.float64))
        nmi = normalized_mutual_info_score(y, clusters)
        assert figures["accuracy"] == pytest.approx(accuracy, abs=1e-12), name
        assert figures["retrieval_roc_auc"] == pytest.approx(auc, abs=1e-9), name
        assert figures["clustering_nmi"] == pytest.approx(nmi, abs=1e-9), name


def test_evaluate_needs_a_bundle_and_data(tiny_eat_bundle):
    result = cli("probe", "evaluate", tiny_eat_bundle[0])
    assert result.exit_code == ExitStatus.USAGE and "BUNDLE... DATA" in result.output


# --- probe attach -------------------------------------------------------------------------------------------------


def test_attach_gates_on_scikit_learn_and_records_the_probe(tiny_eat_bundle, tiny_probe_bundle):
    attached, probe_dir = tiny_probe_bundle
    probe = Probe.load(probe_dir)
    assert verify_bundle(attached) == []
    parity = json.loads((attached / "parity.json").read_text())["probe"]
    scores = [c for c in parity["comparisons"] if c["output"] == "probe_scores"]
    assert parity["passed"] and len(scores) == 3 and max(c["max_abs"] for c in scores) <= 1e-5
    assert all(c["max_abs"] <= 1e-5 for c in parity["comparisons"] if c["output"] == "embedding")
    manifest = read_manifest(attached)
    parent = read_manifest(tiny_eat_bundle[0])
    info = manifest["probe"]
    assert info["parent_bundle_sha256"] == bundle_identity(tiny_eat_bundle[0], parent)[1]
    assert info["data"]["fingerprint"] == probe.data["fingerprint"] and info["classes"] == probe.classes
    assert info["metrics"]["accuracy"] == probe.metrics["accuracy"] and info["versions"] == probe.versions
    assert manifest["default_head"] == "probe" and manifest["variants"] == {}
    assert [o["name"] for o in manifest["outputs"]] == ["tokens", "embedding", "logits", "probe_logits",
                                                        "probe_scores"]
    assert json.loads((attached / "probe_labels.json").read_text()) == probe.classes
    assert (attached / "labels.json").read_bytes() == (tiny_eat_bundle[0] / "labels.json").read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(attached / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == probe.classes and meta["class_outputs_key"] == "probe_logits"
    assert meta["embedding_outputs_key"] == "embedding" and float(meta["sample_duration"]) == 10.0
    assert meta["sample_rate"] == "16000" and meta["num_classes"] == "3" and meta["activation"] == "softmax"
    assert meta["model_num_classes"] == "10"


def test_every_bundle_carries_the_opensoundscape_keys(tiny_eat_bundle, tiny_beats_bundle):
    for bundle, classes, key in ((tiny_eat_bundle[0], 10, "logits"), (tiny_beats_bundle[0], 0, "")):
        meta = {p.key: p.value for p in onnx.load(str(bundle / "model.onnx"), load_external_data=False).metadata_props}
        assert {"sample_rate", "sample_duration", "classes", "class_outputs_key", "embedding_outputs_key"} <= set(meta)
        assert len(json.loads(meta["classes"])) == classes and meta["class_outputs_key"] == key


def test_classify_uses_the_probe_by_default_and_the_model_head_when_asked(tiny_probe_bundle, probe_set, tmp_path):
    attached, probe_dir = tiny_probe_bundle
    probe = Probe.load(probe_dir)
    files = [probe_set[0] / label / f"{label}_0.wav" for label in ("tone", "chirp", "pulses")]
    out = tmp_path / "probe.csv"
    assert cli("classify", attached, *files, "-o", out, "--window", 2, "--top-k", 1, "--device", "cpu").exit_code == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["tone"] * 3 + ["chirp"] * 3 + ["pulses"] * 3
    encoder = Encoder.load(attached, "cpu")
    assert encoder.head.name == "probe" and encoder.labels == probe.classes
    result = encoder.embed_file(files[0], window_seconds=2.0)
    expected = reference_scores(probe, result.embeddings)
    got = np.exp(result.logits) / np.exp(result.logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose([float(r["score"]) for r in rows[:3]], expected.max(axis=1), atol=1e-5)
    model_out = tmp_path / "model.csv"
    result = cli("classify", attached, files[0], "-o", model_out, "--window", 2, "--head", "model", "--device", "cpu")
    assert result.exit_code == 0, result.output
    labels = json.loads((attached / "labels.json").read_text())
    with open(model_out, newline="") as fh:
        assert {r["label"] for r in csv.DictReader(fh)} <= set(labels)
    bare = Encoder.load(attached / "model.onnx", "cpu")  # by its ONNX metadata alone
    assert bare.head.name == "probe" and bare.labels == probe.classes
    np.testing.assert_allclose(bare.embed_file(files[0], window_seconds=2.0).logits,
                               encoder.embed_file(files[0], window_seconds=2.0).logits, atol=1e-6)


def test_head_model_on_a_bundle_without_a_probe_and_head_probe_without_one(tiny_eat_bundle, tiny_beats_bundle,
                                                                          probe_set, tmp_path):
    wav = probe_set[0] / "tone" / "tone_0.wav"
    result = cli("classify", tiny_eat_bundle[0], wav, "-o", tmp_path / "a.csv", "--head", "probe")
    assert result.exit_code == ExitStatus.USAGE and "no probe head" in result.output
    assert "edgeenc probe attach" in result.output
    result = cli("classify", tiny_eat_bundle[0], wav, "-o", tmp_path / "a.csv", "--head", "tail")
    assert result.exit_code == ExitStatus.USAGE and "--head must be one of probe, model" in result.output


def test_attach_refuses_a_probe_of_other_embeddings_naming_both_hashes(tiny_beats_bundle, tiny_eat_bundle,
                                                                      tiny_probe_bundle, tmp_path):
    attached, probe_dir = tiny_probe_bundle
    trained_on = bundle_identity(tiny_eat_bundle[0], read_manifest(tiny_eat_bundle[0]))[1]
    other = bundle_identity(tiny_beats_bundle[0], read_manifest(tiny_beats_bundle[0]))[1]
    result = cli("probe", "attach", tiny_beats_bundle[0], probe_dir, "-o", tmp_path / "x")
    assert result.exit_code == ExitStatus.USAGE and trained_on in result.output and other in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(AttachError, match="already has a probe attached"):
        attach_probe(attached, probe_dir, tmp_path / "y")
    result = cli("probe", "attach", tiny_eat_bundle[0], probe_dir, "-o", attached)
    assert result.exit_code == ExitStatus.USAGE and "pass --overwrite" in result.output


def test_attach_overwrite_replaces_the_bundle_whole(tiny_eat_bundle, tiny_probe_bundle, tmp_path):
    _, probe_dir = tiny_probe_bundle
    out = tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli("probe", "attach", tiny_eat_bundle[0], probe_dir, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and verify_bundle(out) == []
    assert not list(tmp_path.glob(".new.*")) and not (tmp_path / "new.attaching").exists()


def test_a_damaged_probe_file_is_refused(tiny_eat_bundle, tiny_probe_bundle, tmp_path):
    raw = json.loads((tiny_probe_bundle[1] / "probe.json").read_text())
    raw["bias"] = raw["bias"][:-1]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "probe.json").write_text(json.dumps(raw))
    result = cli("probe", "attach", tiny_eat_bundle[0], tmp_path / "p", "-o", tmp_path / "x")
    assert result.exit_code == ExitStatus.USAGE and "do not make a probe" in result.output


def test_optimize_on_the_attached_bundle_keeps_the_probe_in_every_variant(tiny_probe_bundle, probe_set, tmp_path):
    import shutil

    bundle = shutil.copytree(tiny_probe_bundle[0], tmp_path / "bundle")
    result = cli("optimize", bundle)
    assert result.exit_code == 0, result.output
    wav = probe_set[0] / "tone" / "tone_1.wav"
    # model.cpu.onnx is written on every CPU (the int8 and bf16 ones depend on its instructions)
    outputs = [o.name for o in onnx.load(str(bundle / "model.cpu.onnx"), load_external_data=False).graph.output]
    assert "probe_logits" in outputs and "probe_scores" in outputs
    out = tmp_path / "cpu.csv"
    result = cli("classify", bundle, wav, "-o", out, "--window", 2, "--top-k", 1, "--variant", "cpu",
                 "--cpu-engine", "onnxruntime")
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        assert [r["label"] for r in csv.DictReader(fh)] == ["tone"] * 3


# --- the recorder: watch and listen store the probe's labels ---------------------------------------------------


def detections(db: Path) -> list[tuple[str, float]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT label, score FROM detections ORDER BY rowid").fetchall()
    finally:
        conn.close()


def test_watch_and_listen_store_the_probes_labels(tiny_probe_bundle, tmp_path):
    attached, _ = tiny_probe_bundle
    rng = np.random.default_rng(5)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sf.write(inbox / "a_tone.wav", recording(rng, ("tone",), 4.0), 16000, subtype="PCM_16")
    result = cli("watch", inbox, "--bundle", attached, "--db", tmp_path / "w.sqlite", "--once", "--settle", 0,
                 "--window", 2, "--top-k", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [label for label, _ in detections(tmp_path / "w.sqlite")] == ["tone", "tone"]
    pcm = (recording(rng, ("chirp",), 4.0) * 32767).astype("<i2").tobytes()
    proc = subprocess.run([sys.executable, "-c", "from edgeenc.cli import main; main()", "listen", "--bundle",
                           str(attached), "--db", str(tmp_path / "l.sqlite"), "--source", "-", "--rate", "16000",
                           "--window", "2", "--top-k", "1", "--device", "cpu"], input=pcm, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert [label for label, _ in detections(tmp_path / "l.sqlite")] == ["chirp", "chirp"]
    result = cli("watch", inbox, "--bundle", attached, "--db", tmp_path / "w.sqlite", "--once", "--head", "model",
                 "--device", "cpu")
    assert result.exit_code == ExitStatus.USAGE and "--head probe, or another --db" in result.output


# --- TensorRT: an engine built from the attached model.onnx runs the probe (stand-ins, no GPU) -----------------


def test_a_tensorrt_engine_of_the_attached_bundle_scores_with_the_probe(tiny_probe_bundle, probe_set, monkeypatch,
                                                                       tmp_path):
    import shutil

    from trt_standins import fake_tensorrt, install_cuda_python

    from edgeenc.export import tensorrt as trt_build

    bundle = shutil.copytree(tiny_probe_bundle[0], tmp_path / "bundle")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    install_cuda_python(monkeypatch, "12.9.1")
    result = trt_build.build_engine(bundle, precision="fp32")
    assert result.accepted, result
    encoder = Encoder.load(bundle, "auto")
    assert encoder.backend.name == "trt" and encoder.head.name == "probe"
    wav = probe_set[0] / "chirp" / "chirp_1.wav"
    got = encoder.embed_file(wav, window_seconds=2.0).logits
    expected = Encoder.load(bundle, "cpu").embed_file(wav, window_seconds=2.0).logits
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert encoder.labels == ["chirp", "pulses", "tone"] and (got.argmax(axis=1) == 0).all()
