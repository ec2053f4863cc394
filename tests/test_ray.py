"""`edgeenc embed|classify --engine ray` against the single-process commands, on one local Ray shared by the module.

The archive: 31 short files at three sample rates, one long file that is cut into several ranges, and one
corrupt file. The Ray runs join the module's cluster (as `--address` does); the killed run is a separate
driver process, killed with SIGKILL right after its first shard is on disk.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from clirun import cli

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from edgeenc.cli_common import ExitStatus  # noqa: E402

SHORT_FILES = 31
# 9 full windows and a 5.5 s one: no short file is 5.5 s long. Two windows of one length share an ORT batch
# in one engine and not in the other, and ORT's batch of 2 differs from two batches of 1 by up to 1.5e-5
# on this tiny model's 5 s windows (measured), whichever engine runs it; 10 s windows by ~1.4e-6.
LONG_SECONDS = 95.5
RANGE_SECONDS = 20  # so the long file is five ranges
FILES = SHORT_FILES + 1



@pytest.fixture(scope="module")
def ray_address():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(7)
    for i in range(SHORT_FILES):
        rate = (16000, 32000, 44100)[i % 3]
        samples = rng.standard_normal(int(rate * (1.0 + 0.2 * i))) * 0.1
        sf.write(folder / f"short_{i:02d}.wav", samples.astype(np.float32), rate, subtype="PCM_16")
    long = rng.standard_normal(int(44100 * LONG_SECONDS)) * 0.1
    sf.write(folder / "long.wav", long.astype(np.float32), 44100, subtype="PCM_16")
    (folder / "corrupt.wav").write_bytes(rng.bytes(4096))
    return folder


@pytest.fixture(scope="module")
def single_process(tiny_eat_bundle, archive, tmp_path_factory) -> dict:
    """The single-process `edgeenc embed` of the archive: rows sorted by (file, start).

    One ONNX Runtime thread, the configuration each Ray actor runs (--threads-per-worker 1).
    """
    out = tmp_path_factory.mktemp("single") / "embeddings.parquet"
    result = cli("embed", tiny_eat_bundle[0], archive, "-o", out, "--device", "cpu", "--threads", 1)
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    return _sorted(pq.read_table(out))


def _sorted(table) -> dict:
    rows = table.to_pydict()
    order = sorted(range(len(rows["file"])), key=lambda i: (rows["file"][i], rows["start"][i]))
    return {k: [v[i] for i in order] for k, v in rows.items()}


def _ray_args(bundle, archive, out, address, *extra):
    return ("embed", bundle, archive, "-o", out, "--engine", "ray", "--address", address, "--workers", 2,
            "--range-seconds", RANGE_SECONDS, "--device", "cpu", *extra)


def test_ray_gives_the_rows_and_embeddings_of_single_process_embed(tiny_eat_bundle, archive, single_process,
                                                                   ray_address, tmp_path):
    out = tmp_path / "out"
    result = cli(*_ray_args(tiny_eat_bundle[0], archive, out, ray_address))
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    assert f"{FILES} file(s) to do" in result.stderr and f"in {FILES + 4} range(s)" in result.stderr
    assert f"{FILES} file(s) done, 1 failed" in result.stderr
    rows = _sorted(pq.read_table(out / "shards"))
    assert len(set(rows["file"])) == FILES
    assert list(zip(rows["file"], rows["start"], rows["end"])) == list(
        zip(single_process["file"], single_process["start"], single_process["end"]))
    assert sum(f.endswith("long.wav") for f in rows["file"]) == 10
    np.testing.assert_allclose(np.array(rows["embedding"]), np.array(single_process["embedding"]), atol=1e-5, rtol=0)
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert failures == [{"path": str(archive / "corrupt.wav"), "error": failures[0]["error"]}]
    assert "libsndfile cannot read it" in failures[0]["error"]
    meta = pq.read_schema(next((out / "shards").glob("part-*.parquet"))).metadata
    manifest = json.loads((tiny_eat_bundle[0] / "manifest.json").read_text())
    assert meta[b"checkpoint_sha256"].decode() == str(manifest["checkpoint_sha256"])
    assert meta[b"bundle_sha256"].decode() == manifest["files"]["model.onnx"]["sha256"]


def test_ray_classify_keeps_the_top_k_of_single_process_classify(tiny_eat_bundle, archive, ray_address, tmp_path):
    files = [archive / "long.wav", *sorted(archive.glob("short_0*.wav"))[:3]]
    reference = tmp_path / "detections.csv"
    assert cli("classify", tiny_eat_bundle[0], *files, "-o", reference, "--top-k", 3, "--device", "cpu").exit_code == 0
    out = tmp_path / "out"
    result = cli("classify", tiny_eat_bundle[0], *files, "-o", out, "--top-k", 3, "--engine", "ray", "--address",
                 ray_address, "--range-seconds", RANGE_SECONDS, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open(reference, newline="") as f:
        expected = [(r["file"], float(r["start"]), r["label"], float(r["score"])) for r in csv.DictReader(f)]
    rows = _sorted(pq.read_table(out / "shards"))
    got = [(f, s, label, score) for f, s, labels, scores in zip(rows["file"], rows["start"], rows["labels"],
                                                                 rows["scores"])
           for label, score in zip(labels, scores)]
    assert [g[:3] for g in got] == [e[:3] for e in sorted(expected, key=lambda e: (e[0], e[1]))]
    np.testing.assert_allclose([g[3] for g in got], [e[3] for e in sorted(expected, key=lambda e: (e[0], e[1]))],
                               atol=1e-5)


def test_ray_classify_scores_with_an_attached_probe(tiny_probe_bundle, probe_set, ray_address, tmp_path):
    files = [probe_set[0] / label / f"{label}_3.wav" for label in ("tone", "chirp", "pulses")]
    out = tmp_path / "out"
    result = cli("classify", tiny_probe_bundle[0], *files, "-o", out, "--top-k", 1, "--window", 2, "--engine", "ray",
                 "--address", ray_address, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = _sorted(pq.read_table(out / "shards"))
    by_file = {}
    for file, labels in zip(rows["file"], rows["labels"]):
        by_file.setdefault(Path(file).name, set()).update(labels)
    assert by_file == {"tone_3.wav": {"tone"}, "chirp_3.wav": {"chirp"}, "pulses_3.wav": {"pulses"}}


# The killed job: the same command in another driver process, which SIGKILLs itself (no cleanup, no
# atexit) the moment its first shard is on disk, with the other files' ranges still in flight.
KILLED_AFTER_FIRST_SHARD = """
import functools, os, signal, sys
from edgeenc.runtime.archive import plan as archive, ray_run as ray_engine
ray_engine.RayOptions = functools.partial(ray_engine.RayOptions, shard_files=4)
write_shard = archive.ArchiveOutput.write_shard
def write_then_die(self, files):
    write_shard(self, files)
    os.kill(os.getpid(), signal.SIGKILL)
archive.ArchiveOutput.write_shard = write_then_die
from edgeenc.cli import main
sys.argv = ["edgeenc", *sys.argv[1:]]
main()
"""


def test_a_killed_run_resumes_with_every_file_exactly_once(tiny_eat_bundle, archive, single_process, ray_address,
                                                         tmp_path):
    out = tmp_path / "out"
    args = [str(a) for a in _ray_args(tiny_eat_bundle[0], archive, out, ray_address)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_SHARD, *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ray_address})
    assert killed.returncode == -9, killed.stderr[-3000:]
    (first,) = (out / "shards").glob("part-*.parquet")
    done_first = json.loads(pq.read_schema(first).metadata[b"edgeenc_files"])
    assert len(done_first) == 4 and not (out / "failures.parquet").exists()

    result = cli(*_ray_args(tiny_eat_bundle[0], archive, out, ray_address))
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    assert "resuming: 4 file(s) already done" in result.stderr
    assert f"{FILES - 4} file(s) done, 1 failed, 4 already done" in result.stderr
    shards = sorted((out / "shards").glob("part-*.parquet"))
    listed = [f for shard in shards for f in json.loads(pq.read_schema(shard).metadata[b"edgeenc_files"])]
    assert len(listed) == FILES and len({f[0] for f in listed}) == FILES  # every file in exactly one shard
    rows = _sorted(pq.read_table(out / "shards"))
    keys = list(zip(rows["file"], rows["start"]))
    assert len(keys) == len(set(keys))  # no duplicate rows
    assert list(zip(rows["file"], rows["start"], rows["end"])) == list(
        zip(single_process["file"], single_process["start"], single_process["end"]))
    np.testing.assert_allclose(np.array(rows["embedding"]), np.array(single_process["embedding"]), atol=1e-5, rtol=0)


def test_recordings_given_as_urls_give_the_rows_of_their_local_files(tiny_eat_bundle, archive, single_process,
                                                                     ray_address, tmp_path):
    # file:// goes through pyarrow's URL code path (FileSystem.from_uri) exactly as s3:// or gs:// would.
    url = archive.as_uri()
    out = tmp_path / "out"
    result = cli(*_ray_args(tiny_eat_bundle[0], url, out, ray_address))
    assert result.exit_code == ExitStatus.SOME_FILES_FAILED, result.output
    assert f"{FILES} file(s) done, 1 failed" in result.stderr
    rows = _sorted(pq.read_table(out / "shards"))
    assert all(f.startswith(url + "/") for f in rows["file"])
    local = [str(archive / f[len(url) + 1:]) for f in rows["file"]]
    assert list(zip(local, rows["start"], rows["end"])) == list(
        zip(single_process["file"], single_process["start"], single_process["end"]))
    np.testing.assert_allclose(np.array(rows["embedding"]), np.array(single_process["embedding"]), atol=1e-5, rtol=0)
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert [f["path"] for f in failures] == [f"{url}/corrupt.wav"]
    assert "libsndfile cannot read it" in failures[0]["error"]

    rerun = cli(*_ray_args(tiny_eat_bundle[0], url, out, ray_address))
    assert rerun.exit_code == ExitStatus.SOME_FILES_FAILED, rerun.output
    assert f"resuming: {FILES} file(s) already done" in rerun.stderr
    assert f"0 file(s) done, 1 failed, {FILES} already done" in rerun.stderr


def test_an_archive_written_by_ray_is_indexed_and_searchable(tiny_eat_bundle, tiny_beats_bundle, archive,
                                                             ray_address, tmp_path, monkeypatch):
    pytest.importorskip("usearch")
    import shutil

    from edgeenc.runtime.neighbours import VectorIndex

    monkeypatch.setattr(VectorIndex, "exact_below", 0)  # through the index, small as this archive is

    bundle = tiny_eat_bundle[0]
    files = [archive / "long.wav", *sorted(archive.glob("short_0*.wav"))[:5]]
    out = tmp_path / "out"
    ray_args = ("--top-k", 2, "--engine", "ray", "--address", ray_address, "--range-seconds", RANGE_SECONDS,
                "--device", "cpu")
    first = cli("classify", bundle, *files[:3], "-o", out, *ray_args)
    assert first.exit_code == 0, first.output
    windows = pq.read_table(out / "shards").num_rows
    assert f"indexed {windows} new window(s) for `edgeenc search`: {windows} in {out}/index" in first.stderr

    def search(*args):
        result = cli("search", out, *args, "--top", 4, "--device", "cpu")
        assert result.exit_code == 0, result.output
        return [line.split() for line in result.stdout.splitlines()[2:]], result.stderr

    by_audio, _ = search(files[1], "--bundle", bundle)
    exact, _ = search(files[1], "--bundle", bundle, "--exact")
    assert by_audio[0][1] == str(files[1]) and abs(float(by_audio[0][4]) - 1.0) < 1e-3  # itself, float16 cosine
    assert [row[1:4] for row in by_audio] == [row[1:4] for row in exact]
    np.testing.assert_allclose([float(r[4]) for r in by_audio], [float(r[4]) for r in exact], atol=1e-3)
    assert all(len(row) == 6 for row in by_audio)  # the stored top labels of classify
    like, _ = search("--like", f"{files[0]}@20")
    assert like[0][1:4] == [str(files[0]), "20.000", "30.000"]

    saved = tmp_path / "index-after-first-run"
    shutil.copytree(out / "index", saved)
    second = cli("classify", bundle, *files[3:], "-o", out, *ray_args)  # a new shard, added to the index
    assert second.exit_code == 0, second.output
    total = pq.read_table(out / "shards").num_rows
    assert f"indexed {total - windows} new window(s) for `edgeenc search`: {total} in" in second.stderr
    shutil.rmtree(out / "index")
    shutil.copytree(saved, out / "index")  # as if the index had not been updated: the new shard is searched exactly
    behind, notes = search(files[4], "--bundle", bundle)
    assert "1 shard(s) written after the index are searched exactly" in notes
    assert behind[0][1] == str(files[4]) and abs(float(behind[0][4]) - 1.0) < 1e-6  # a float32 row: exact
    indexed = cli("index", out)
    assert indexed.exit_code == 0 and f"{total} window(s) indexed, {total - windows} added" in indexed.stderr
    _, notes = search(files[4], "--bundle", bundle)
    assert "written after the index" not in notes

    hits = tmp_path / "hits.parquet"
    assert cli("search", out, "--like", f"{files[2]}@0", "-o", hits).exit_code == 0
    table = pq.read_table(hits).to_pylist()
    assert table[0]["file"] == str(files[2]) and table[0]["label"] == "" and len(table[0]["stored_labels"]) == 2
    other = cli("search", out, files[1], "--bundle", tiny_beats_bundle[0], "--device", "cpu")
    assert other.exit_code == ExitStatus.USAGE and "cannot be compared" in other.stderr
