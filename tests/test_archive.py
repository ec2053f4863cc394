"""Archive runs without an engine: ranges of long files, decoding a range, the output folder's guards."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from edgeenc.runtime import EmbeddingResult, WindowOptions
from edgeenc.runtime.archive import ArchiveError, ArchiveOutput, list_recordings, plan_archive
from edgeenc.runtime.audio import AudioInfo, iter_blocks, load
from edgeenc.runtime.ranges import plan_ranges
from edgeenc.runtime.windows import iter_windows

RATE = 100  # samples per second: windows of a few hundred samples keep the cases fast


def _cut(samples: np.ndarray, last: str, window: float, hop: float | None, min_samples: int = 1):
    return [(round(w.start_seconds * RATE), round(w.end_seconds * RATE), w.samples)
            for w in iter_windows([samples], RATE, window, hop, last=last, min_samples=min_samples)]


@pytest.mark.parametrize("hop", [None, 7.0, 13.0, 2.5])
@pytest.mark.parametrize("last", ["short", "pad", "drop"])
def test_ranges_cut_exactly_the_windows_of_the_whole_file(hop, last):
    rng = np.random.default_rng(0)
    for seconds in (3, 10, 10.5, 31, 60, 73, 77.7, 143, 200.01, 401):
        samples = rng.standard_normal(int(seconds * RATE)).astype(np.float32)
        info = AudioInfo("x.wav", RATE, 1, len(samples), len(samples) / RATE, "WAV", "FLOAT")
        recording = list_recordings([__file__])[0]
        ranges = plan_ranges(recording.path, info, RATE, WindowOptions(10.0, hop), 40.0)
        assert [r.index for r in ranges] == list(range(len(ranges))) and ranges[-1].stop is None
        assert all(r.count == len(ranges) for r in ranges)
        if seconds >= 200:
            assert len(ranges) > 3, "a long file must be spread over several ranges"
        pieces = []
        for r in ranges:
            for start, end, cut in _cut(samples[r.start:r.stop], "drop" if r.stop else last, 10.0, hop, 20):
                pieces.append((start + r.start, end + r.start, cut))
        whole = _cut(samples, last, 10.0, hop, 20)
        assert [(s, e) for s, e, _ in pieces] == [(s, e) for s, e, _ in whole], (seconds, hop, last)
        for (_, _, a), (_, _, b) in zip(pieces, whole):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rate", [16000, 44100, 22050])
def test_a_range_decodes_as_the_whole_file_does(tmp_path, rate):
    rng = np.random.default_rng(1)
    path = tmp_path / "long.wav"
    sf.write(path, (rng.standard_normal(rate * 14) * 0.2).astype(np.float32), rate, subtype="FLOAT")
    whole = load(path, 16000)
    for start, stop in ((0, 1000), (16000 * 5 + 7, 16000 * 9), (16000 * 12, None), (3, None)):
        part = np.concatenate(list(iter_blocks(path, 16000, start=start, stop=stop, block_seconds=1.3)))
        assert len(part) == len(whole[start:stop])
        # Resampled ranges start a second early: equal to float rounding, not bit for bit.
        np.testing.assert_allclose(part, whole[start:stop], atol=0 if rate == 16000 else 2e-7, rtol=0)


def test_a_range_past_the_end_is_an_error_naming_the_file(tmp_path):
    from edgeenc.runtime.audio import AudioError

    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="short.wav.*past the end"):
        list(iter_blocks(path, 16000, start=32000))


def _shard(folder, metadata, tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    recording = list_recordings([wav])[0]
    result = EmbeddingResult(str(wav), np.zeros(1), np.ones(1), np.ones((1, 4), np.float32))
    ArchiveOutput(folder, metadata).write_shard([(recording, result)])
    return wav, recording


METADATA = {"model_id": "m", "checkpoint_sha256": "c", "bundle_sha256": "b", "run_options": "{}"}


def test_done_files_are_skipped_and_a_changed_one_is_refused(tmp_path):
    wav, recording = _shard(tmp_path / "out", METADATA, tmp_path)
    done = ArchiveOutput(tmp_path / "out", METADATA).done()
    assert done == {recording.key}
    plan = plan_archive(list_recordings([wav]), done, 16000, WindowOptions(10.0, last="short"), 600.0)
    assert plan.skipped == [recording] and plan.ranges == [] and plan.todo == 0
    os.utime(wav, ns=(1, 1))
    with pytest.raises(ArchiveError, match="a.wav changed"):
        plan_archive(list_recordings([wav]), done, 16000, WindowOptions(10.0, last="short"), 600.0)


@pytest.mark.parametrize("key", ["bundle_sha256", "run_options"])
def test_shards_of_another_bundle_or_window_are_refused(tmp_path, key):
    _shard(tmp_path / "out", METADATA, tmp_path)
    with pytest.raises(ArchiveError, match=f"written with {key}"):
        ArchiveOutput(tmp_path / "out", {**METADATA, key: "other"}).done()


def test_the_shard_lists_its_files_in_its_footer(tmp_path):
    import pyarrow.parquet as pq

    _, recording = _shard(tmp_path / "out", METADATA, tmp_path)
    (shard,) = (tmp_path / "out" / "shards").glob("part-*.parquet")
    meta = pq.read_schema(shard).metadata
    assert json.loads(meta[b"edgeenc_files"]) == [list(recording.key)]
    assert meta[b"bundle_sha256"] == b"b" and meta[b"checkpoint_sha256"] == b"c"


def test_the_single_process_engine_never_imports_ray():
    code = ("import sys, edgeenc.cli, edgeenc.runtime.archive, edgeenc.runtime.encoder; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (("--engine", "ray", "-o", "out.npz"), "writes a folder of Parquet shards; pass -o FOLDER"),
    (("--engine", "spark", "-o", "out"), "unknown engine 'spark'; choose single or ray"),
])
def test_engine_options_are_checked_before_anything_starts(tiny_eat_bundle, birds_wav, args, message):
    from typer.testing import CliRunner

    from edgeenc.cli import app

    result = CliRunner().invoke(app, ["embed", str(tiny_eat_bundle[0]), str(birds_wav), *args])
    assert result.exit_code == 2 and message in result.stderr


def _url_folder(tmp_path):
    """A folder of recordings beside what a walk leaves out (dot files, other suffixes)."""
    rng = np.random.default_rng(3)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "a.wav", rng.standard_normal(44100 * 3).astype(np.float32) * 0.1, 44100)
    sf.write(tmp_path / "sub" / "b.flac", rng.standard_normal(16000 * 2).astype(np.float32) * 0.1, 16000)
    (tmp_path / "._a.wav").write_bytes(b"resource fork")
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_a_folder_url_is_walked_as_the_local_folder_is(tmp_path):
    folder = _url_folder(tmp_path)
    local = list_recordings([folder])
    urls = list_recordings([folder.as_uri()])
    assert [r.name for r in urls] == [p.resolve().as_uri() for p in (folder / "a.wav", folder / "sub" / "b.flac")]
    assert [r.path for r in urls] == [r.name for r in urls]  # the URL is what workers open and resuming matches
    assert [(r.size, r.mtime_ns) for r in urls] == [(r.size, r.mtime_ns) for r in local]
    assert list_recordings([(folder / "a.wav").as_uri()]) == urls[:1]
    # Resuming matches URLs by size and mtime, as paths.
    plan = plan_archive(urls, {urls[0].key}, 16000, WindowOptions(1.0, last="short"), 10.0)
    assert plan.skipped == urls[:1] and {r.path for r in plan.ranges} == {urls[1].path}


@pytest.mark.parametrize("url, reason", [("missing/", "no such file or folder"),
                                         ("zz://bucket/x", "pyarrow cannot open this URL")])
def test_a_url_with_nothing_at_it_is_an_error_naming_it(tmp_path, url, reason):
    from edgeenc.runtime.audio import AudioError

    url = (tmp_path / url).as_uri() if "://" not in url else url
    with pytest.raises(AudioError, match=reason) as caught:
        list_recordings([url])
    assert caught.value.path == url


def test_a_url_decodes_as_its_local_file_does(tmp_path):
    from edgeenc.runtime.archive import iter_source_blocks, probe_source
    from edgeenc.runtime.audio import AudioError, probe

    path = _url_folder(tmp_path) / "a.wav"
    url = path.as_uri()
    assert probe_source(url) == dataclasses.replace(probe(path), path=url)
    for start, stop in ((0, None), (20000, 35000), (30000, None)):
        np.testing.assert_array_equal(np.concatenate(list(iter_source_blocks(url, 16000, start=start, stop=stop))),
                                      np.concatenate(list(iter_blocks(path, 16000, start=start, stop=stop))))
    (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, reason in (("corrupt.wav", "libsndfile cannot read it"), ("empty.wav", "file is empty")):
        with pytest.raises(AudioError, match=reason) as caught:
            list(iter_source_blocks((tmp_path / name).as_uri(), 16000))
        assert str(caught.value).startswith((tmp_path / name).as_uri() + ": ")


def test_urls_are_refused_by_the_single_process_engine_and_a_missing_one_by_ray(tiny_eat_bundle, tmp_path):
    from typer.testing import CliRunner

    from edgeenc.cli import app

    url = (tmp_path / "nothing").as_uri()
    single = CliRunner().invoke(app, ["embed", str(tiny_eat_bundle[0]), url, "-o", str(tmp_path / "e.npz")])
    assert single.exit_code == 2 and f"{url}: URLs are read by --engine ray only" in single.stderr
    pytest.importorskip("ray")
    on_ray = CliRunner().invoke(app, ["embed", str(tiny_eat_bundle[0]), url, "-o", str(tmp_path / "out"),
                                      "--engine", "ray", "--device", "cpu"])
    assert on_ray.exit_code == 2 and f"{url}: no such file or folder" in on_ray.stderr
    assert not (tmp_path / "out").exists()
