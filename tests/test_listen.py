"""Live mode: `edgeenc listen` from stdin PCM, a sound device and ffmpeg into the results database."""

from __future__ import annotations

import io
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from stall import STALLING_CLI, stall_env

from edgeenc.runtime import ScoreOptions, WindowOptions
from edgeenc.runtime.audio import load
from edgeenc.runtime.encoder import Encoder
from edgeenc.runtime.recorder import LiveStore, listen
from edgeenc.runtime.recorder.sources import FfmpegSource, PcmSource, SoundDeviceSource, SourceError, open_source

BIRDS = resources.files("edgeenc") / "data" / "birds_10s.wav"  # 32 kHz int16 mono, 10.133 s
CLI = [sys.executable, "-c", "from edgeenc.cli import main; main()"]


@pytest.fixture(scope="module")
def bundle(tiny_eat_bundle) -> Path:
    return tiny_eat_bundle[0]  # width 64, 2 layers, a 10-class head


@pytest.fixture(scope="module")
def encoder(bundle) -> Encoder:
    return Encoder.load(bundle, "cpu", threads=1)


@pytest.fixture(scope="module")
def birds() -> tuple[np.ndarray, int]:
    with resources.as_file(BIRDS) as path:
        samples, rate = sf.read(path, dtype="int16")
    return samples, rate


@pytest.fixture(scope="module")
def reference(encoder):
    """`edgeenc embed` of the recording as a file, 1 s windows, 0.5 s hop, short last window."""
    with resources.as_file(BIRDS) as path:
        return encoder.embed_file(path, window_seconds=1.0, hop_seconds=0.5, last="short")


def rows(db: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def stored(db: Path, stream: int | None = None):
    """(starts, ends, utc starts as unix seconds, embeddings [n, dim]) of one stream, in window order."""
    import datetime as dt

    where = "" if stream is None else f"WHERE w.file_id = {int(stream)}"
    got = rows(db, f'SELECT w.start, w."end", t.utc_start, w.embedding, w.dim FROM windows w '
                   f"JOIN window_times t ON t.window_id = w.id {where} ORDER BY w.id")
    walls = np.array([dt.datetime.fromisoformat(r[2]).timestamp() for r in got])
    emb = np.stack([np.frombuffer(r[3], "<f4") for r in got]) if got else np.zeros((0, 64), np.float32)
    return np.array([r[0] for r in got]), np.array([r[1] for r in got]), walls, emb


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def listen_cmd(bundle: Path, db: Path, *extra: str) -> list[str]:
    return [*CLI, "listen", "--bundle", str(bundle), "--db", str(db), "--source", "-", "--rate", "32000",
            "--device", "cpu", "--threads", "1", *extra]


def open_store(db: Path, encoder: Encoder) -> LiveStore:
    return LiveStore.for_encoder(db, encoder)


def test_stdin_faster_than_real_time_matches_embed_of_the_file_and_closes_cleanly(bundle, birds, tmp_path):
    samples, rate = birds
    db, out = tmp_path / "live.sqlite", tmp_path / "file.npz"
    with resources.as_file(BIRDS) as wav:
        embedded = subprocess.run([*CLI, "embed", str(bundle), str(wav), "-o", str(out), "--window", "1",
                                   "--hop", "0.5", "--last", "short", "--device", "cpu"], capture_output=True)
    assert embedded.returncode == 0, embedded.stderr.decode()
    began = time.time()
    result = subprocess.run(listen_cmd(bundle, db, "--window", "1", "--hop", "0.5", "--last", "short",
                                       "--top-k", "3"), input=samples.tobytes(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert "end of source" in result.stderr.decode()
    assert time.time() - began < 10.0  # 10 s of audio, processed faster than real time
    file = np.load(out)
    starts, ends, walls, emb = stored(db)
    assert len(starts) == len(file["start"]) == 20
    np.testing.assert_allclose(starts, file["start"], atol=1e-9)
    np.testing.assert_allclose(ends, file["end"], atol=1e-9)
    assert cosines(emb, file["embeddings"]).min() >= 0.9999
    # Wall clock: the audio's own clock, so exactly the hop apart (ISO strings carry microseconds).
    np.testing.assert_allclose(np.diff(walls), 0.5, atol=2e-6)
    assert began - 1 < walls[0] < began + 10
    assert rows(db, "SELECT count(*) FROM detections") == [(60,)]
    # The source ended: the stream is closed, the totals are final, the lock and the WAL are gone.
    (path, closed, seconds, dropped), = rows(db, "SELECT f.path, s.closed_at, s.audio_seconds, s.dropped_seconds "
                                                 "FROM streams s JOIN files f ON f.id = s.file_id")
    assert path.startswith("live:-@") and closed is not None
    assert seconds == pytest.approx(len(samples) / rate, abs=1 / 16000) and dropped == 0
    assert rows(db, "PRAGMA integrity_check") == [("ok",)] and not Path(f"{db}-wal").exists()
    table = tmp_path / "table.csv"
    exported = subprocess.run([*CLI, "export-db", str(db), "-o", str(table)], capture_output=True, text=True)
    assert exported.returncode == 0 and len(table.read_text().splitlines()) == 21


@pytest.mark.parametrize("fmt", ["s32le", "f32le"])
def test_other_pcm_formats_and_stereo_give_the_same_windows(encoder, birds, reference, fmt, tmp_path):
    samples, rate = birds
    mono = samples.astype(np.int32) << 16 if fmt == "s32le" else (samples / 32768).astype("<f4")
    stereo = np.repeat(mono[:, None], 2, axis=1)  # both channels equal: their mean is the recording
    source = PcmSource(io.BytesIO(stereo.astype("<i4" if fmt == "s32le" else "<f4").tobytes()), fmt, rate, 2)
    with open_store(tmp_path / "r.sqlite", encoder) as store:
        summary = listen(encoder, store, source, source_name="-", options=WindowOptions(1.0, 0.5, last="short"),
                         handle_signals=False)
    assert summary.ended == "end of source" and summary.windows == 20
    starts, _, _, emb = stored(tmp_path / "r.sqlite")
    np.testing.assert_allclose(starts, reference.starts, atol=1e-9)
    assert cosines(emb, reference.embeddings).min() >= 0.9999


def test_the_last_partial_window_follows_last_at_the_end_of_the_source(encoder, birds, tmp_path):
    samples, rate = birds
    ends = {}
    for last in ("short", "pad", "drop"):
        source = PcmSource(io.BytesIO(samples.tobytes()), "s16le", rate, 1)
        with open_store(tmp_path / f"{last}.sqlite", encoder) as store:
            listen(encoder, store, source, source_name="-", options=WindowOptions(1.0, last=last),
                   handle_signals=False)
        ends[last] = list(stored(tmp_path / f"{last}.sqlite")[1])
    assert ends["short"] == ends["pad"] == [*range(1, 11), pytest.approx(10.13325)]
    assert ends["drop"] == list(range(1, 11))


def _reader(stream, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for line in stream:
            lines.append(line.decode(errors="replace"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait(predicate, seconds: float = 60.0) -> bool:
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    return predicate()


def test_a_source_that_stalls_and_resumes(bundle, birds, reference, tmp_path):
    samples, rate = birds
    db = tmp_path / "r.sqlite"
    proc = subprocess.Popen(listen_cmd(bundle, db, "--window", "1", "--hop", "0.5", "--resync-after", "1"),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    lines: list[str] = []
    reader = _reader(proc.stderr, lines)
    try:
        assert _wait(lambda: any("listening to" in line for line in lines)), "".join(lines)
        proc.stdin.write(samples[: 2 * rate].tobytes())
        proc.stdin.flush()
        time.sleep(3.5)  # the sender stalls; 2 s of audio came in at once, so it is 1.5 s late when it resumes
        proc.stdin.write(samples[2 * rate:].tobytes())
        proc.stdin.close()
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    starts, _, walls, emb = stored(db)
    # The audio is contiguous across the stall: the same windows and numbers as the file.
    np.testing.assert_allclose(starts, reference.starts, atol=1e-9)
    assert cosines(emb, reference.embeddings).min() >= 0.9999
    steps = np.diff(walls)
    assert (steps > 0).all()
    late = np.flatnonzero(np.abs(steps - 0.5) > 1e-3)
    # The window starting at 2.0 s is the first heard after the stall: the clock moved forward once.
    assert list(late) == [int(np.flatnonzero(starts == 2.0)[0]) - 1], steps
    assert 1.5 < steps[late[0]] < 5.0


def test_sigterm_finishes_the_batch_and_exits_0(bundle, birds, tmp_path):
    samples, rate = birds
    db = tmp_path / "r.sqlite"
    proc = subprocess.Popen(listen_cmd(bundle, db, "--window", "1"), stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    lines: list[str] = []
    reader = _reader(proc.stderr, lines)
    try:
        proc.stdin.write(samples[: 3 * rate + rate // 2].tobytes())
        proc.stdin.flush()  # and the pipe stays open: a live source that has not ended
        assert _wait(lambda: db.exists() and rows(db, "SELECT count(*) FROM windows")[0][0] >= 3), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert any("signal:" in line for line in lines), "".join(lines)
    assert rows(db, "SELECT count(*) FROM windows") == [(3,)]
    (closed,), = rows(db, "SELECT closed_at FROM streams")
    assert closed is not None and rows(db, "PRAGMA integrity_check") == [("ok",)]


def test_kill9_mid_batch_then_restart_leaves_no_duplicate_or_torn_rows(bundle, birds, tmp_path):
    samples, _ = birds
    db, marker = tmp_path / "r.sqlite", tmp_path / "stalled"
    args = listen_cmd(bundle, db, "--window", "1", "--batch", "2")
    proc = subprocess.Popen([*STALLING_CLI, *args[len(CLI):]], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=stall_env(3, marker))
    lines: list[str] = []
    reader = _reader(proc.stderr, lines)
    try:
        proc.stdin.write(samples.tobytes())
        proc.stdin.close()
        assert _wait(marker.exists), "".join(lines)  # batch 3 is inserted, not committed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    (stream, closed), = rows(db, "SELECT file_id, closed_at FROM streams")
    assert closed is None  # the run died: its stream was never closed
    first = rows(db, "SELECT start FROM windows ORDER BY id")
    # Two whole batches (of one or two windows each), contiguous from 0, and nothing of the third.
    assert 2 <= len(first) <= 4 and [s for (s,) in first] == list(range(len(first)))
    restart = subprocess.run(args, input=samples.tobytes(), capture_output=True, timeout=120)
    assert restart.returncode == 0, restart.stderr.decode()
    per_stream = rows(db, "SELECT s.file_id, s.closed_at IS NOT NULL, count(w.id) FROM streams s "
                          "JOIN windows w ON w.file_id = s.file_id GROUP BY s.file_id ORDER BY s.file_id")
    assert per_stream == [(stream, 0, len(first)), (per_stream[1][0], 1, 11)]
    assert rows(db, "SELECT count(*) FROM (SELECT file_id, start FROM windows GROUP BY file_id, start "
                    "HAVING count(*) > 1)") == [(0,)]
    # Every window whole: its wall-clock time and its five detections.
    total = len(first) + 11
    assert rows(db, "SELECT count(*) FROM window_times") == [(total,)]
    assert rows(db, "SELECT count(*) FROM detections") == [(5 * total,)]


class PretendBackend:
    """A slow encoder: a fixed cost per batch, embeddings that depend on the audio."""

    name, description, variant = "cpu", "pretend backend (slowed)", "pretend (a fixed cost per batch)"

    def __init__(self, seconds_per_batch: float, dim: int, classes: int) -> None:
        self.seconds_per_batch, self.dim, self.classes = seconds_per_batch, dim, classes
        self.batch_sizes: list[int] = []

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.seconds_per_batch)
        self.batch_sizes.append(len(audio))
        level = audio[:, :1].astype(np.float32)
        return {"embedding": np.repeat(level, self.dim, axis=1) + 1.0,
                "logits": np.zeros((len(audio), self.classes), np.float32)}

    def close(self) -> None:
        pass


class FastSource:
    """Audio at ``speed`` x real time (never held whole), in 0.1 s blocks."""

    description, sample_rate, restarts = "generated", 16000, 0

    def __init__(self, seconds: int, speed: float) -> None:
        self.blocks, self.speed = seconds * 10, speed

    def run(self, stamper, stop) -> None:
        block = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
        began = time.monotonic()
        for i in range(self.blocks):
            if stop.is_set():
                return
            stamper.push(block)
            while time.monotonic() < began + (i + 1) * 0.1 / self.speed:
                time.sleep(0.0005)

    def close(self) -> None:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_overload_drops_the_oldest_audio_with_bounded_memory(encoder, tmp_path, caplog):
    backend = PretendBackend(0.05, encoder.embedding_dim, len(encoder.labels))
    slow = Encoder(encoder.bundle, encoder.manifest, backend, encoder.labels, [])
    events: list[tuple[str, str]] = []
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open_store(tmp_path / "r.sqlite", slow) as store, caplog.at_level("WARNING"):
        # The source at 500x real time, the encoder at most 80x (four 1 s windows per 0.05 s batch).
        summary = listen(slow, store, FastSource(1800, speed=500), source_name="generated",
                         options=WindowOptions(1.0, last="short", batch_size=4), buffer_seconds=8.0,
                         report_seconds=0.5, handle_signals=False, on_event=lambda *e: events.append(e))
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    # 1800 s of float32 audio is 115 MB: had it been kept, the peak would have grown by that much.
    assert grew < 40 * 2**20, f"peak RSS grew {grew / 2**20:.0f} MiB"
    assert summary.max_buffered_seconds <= 8.0 and summary.audio_seconds == pytest.approx(1800)
    assert summary.dropped_seconds > 900 and summary.windows >= 40
    assert summary.windows + summary.dropped_seconds <= 1800 + 1e-6
    assert max(backend.batch_sizes) == 4  # behind: windows went in full batches
    assert any(kind == "dropped" for kind, _ in events)
    assert any("cannot keep up" in r.getMessage() for r in caplog.records)
    (dropped,), = rows(tmp_path / "r.sqlite", "SELECT dropped_seconds FROM streams")
    assert dropped == pytest.approx(summary.dropped_seconds)
    starts = stored(tmp_path / "r.sqlite")[0]
    assert (np.diff(starts) >= 1.0 - 1e-9).all()  # windows never overlap a drop nor each other (float seconds)


FAKE_FFMPEG = """#!{python}
import sys, time, pathlib
import numpy as np
calls = pathlib.Path({calls!r})
n = len(calls.read_text()) if calls.exists() else 0
calls.write_text("x" * (n + 1))
args = sys.argv[1:]
assert args[args.index("-f") + 1] == "f32le" and args[args.index("-ac") + 1] == "1", args
if n == 0:
    sys.stderr.write("rtsp://cam/stream: Connection refused\\n")
    sys.exit(1)
rate = int(args[args.index("-ar") + 1])
sys.stdout.buffer.write((0.1 * np.sin(np.arange(int(2.5 * rate)) * (n + 1) / 10)).astype("<f4").tobytes())
"""


def test_ffmpeg_source_restarts_with_backoff(encoder, tmp_path, caplog):
    calls = tmp_path / "calls"
    fake = tmp_path / "ffmpeg"
    fake.write_text(FAKE_FFMPEG.format(python=sys.executable, calls=str(calls)))
    fake.chmod(0o755)
    source = FfmpegSource("rtsp://cam/stream", encoder.sample_rate, ffmpeg=str(fake), backoff=(0.05, 0.2))
    stop = threading.Event()
    watcher = threading.Thread(target=lambda: _wait(lambda: calls.exists() and len(calls.read_text()) >= 5)
                               and stop.set(), daemon=True)
    watcher.start()
    with open_store(tmp_path / "r.sqlite", encoder) as store, caplog.at_level("WARNING"):
        summary = listen(encoder, store, source, source_name="ffmpeg:rtsp://cam/stream",
                         options=WindowOptions(1.0, last="short"), stop=stop, handle_signals=False)
    assert summary.ended == "stopped" and summary.restarts >= 4
    restarts = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert "Connection refused" in restarts[0]
    assert [m.rsplit("restarting in ", 1)[1] for m in restarts[:4]] == ["0.05 s", "0.1 s", "0.2 s", "0.2 s"]
    starts, _, walls, _ = stored(tmp_path / "r.sqlite")
    # Each connection gives 2.5 s: two whole windows, a new window grid after each restart, and the
    # half window before a restart dropped.
    assert list(starts[:6]) == [0.0, 1.0, 2.5, 3.5, 5.0, 6.0]
    assert (np.diff(walls) > 0).all()
    assert rows(tmp_path / "r.sqlite", "SELECT restarts FROM streams") == [(summary.restarts,)]


def real_ffmpeg() -> str | None:
    """$EDGEENC_TEST_FFMPEG, ffmpeg on PATH, or the static build the dev extra's imageio-ffmpeg wheel ships."""
    found = shutil.which(os.environ.get("EDGEENC_TEST_FFMPEG", "ffmpeg"))
    if found is None:
        try:
            import imageio_ffmpeg
        except ImportError:
            return None
        found = imageio_ffmpeg.get_ffmpeg_exe()
    return found


REAL_FFMPEG = real_ffmpeg()


@pytest.mark.skipif(REAL_FFMPEG is None, reason="no ffmpeg on PATH, in $EDGEENC_TEST_FFMPEG or from imageio-ffmpeg")
def test_a_real_ffmpeg_reads_the_recording_like_embed(encoder, tmp_path):
    with resources.as_file(BIRDS) as wav:
        reference = encoder.embed_file(wav, window_seconds=1.0, last="drop")
        source = FfmpegSource(str(wav), encoder.sample_rate, ffmpeg=REAL_FFMPEG, backoff=(0.05, 0.05))
        db, stop = tmp_path / "r.sqlite", threading.Event()
        with open_store(db, encoder) as store:
            threading.Thread(target=lambda: _wait(lambda: rows(db, "SELECT count(*) FROM windows")[0][0] >= 20)
                             and stop.set(), daemon=True).start()
            summary = listen(encoder, store, source, source_name="ffmpeg", options=WindowOptions(1.0, last="short"),
                             stop=stop,
                             handle_signals=False)
    assert summary.restarts >= 1  # a file ends: ffmpeg is started again, the recording heard again
    starts, _, _, emb = stored(db)
    # ffmpeg resamples 32 -> 16 kHz with its own filter, not soxr: close, not identical.
    np.testing.assert_allclose(starts[:10], reference.starts, atol=1e-9)
    assert starts[10] == pytest.approx(10.13325)  # the second run's grid starts after the first's audio
    assert cosines(emb[:10], reference.embeddings).min() >= 0.9999
    assert cosines(emb[10:20], reference.embeddings).min() >= 0.9999


def test_ffmpeg_missing_is_a_clear_error():
    with pytest.raises(SourceError, match="needs the ffmpeg program"):
        open_source("ffmpeg:http://radio/stream", model_rate=16000, stdin=io.BytesIO(), ffmpeg="no-such-ffmpeg-x")
    with pytest.raises(SourceError, match="unknown source"):
        open_source("pulse:mic", model_rate=16000, stdin=io.BytesIO())


class PretendSoundDevice:
    """What edgeenc uses of the sounddevice module, playing a recording through the callback."""

    class PortAudioError(Exception):
        pass

    def __init__(self, frames: np.ndarray, rate: int) -> None:
        self.frames, self.rate = frames, rate

    def query_devices(self, device, kind):
        if device not in (None, "USB mic"):
            raise ValueError(f"No input device matching {device!r}")
        return {"name": "USB mic", "default_samplerate": float(self.rate)}

    def InputStream(self, *, device, samplerate, channels, dtype, blocksize, callback):  # noqa: N802
        device_self = self

        class Stream:
            active = True  # a device that has played its recording stays open, silent

            def __enter__(self):
                self.thread = threading.Thread(target=self.play, daemon=True)
                self.thread.start()
                return self

            def play(self):
                status = type("Status", (), {"input_overflow": False})()
                for i in range(0, len(device_self.frames), blocksize):
                    block = device_self.frames[i:i + blocksize]
                    callback(np.repeat(block[:, None], channels, axis=1).astype(dtype), len(block), None, status)

            def __exit__(self, *exc):
                self.thread.join()

        return Stream()


def test_a_sound_device_through_portaudio_gives_the_same_windows(encoder, birds, reference, tmp_path, monkeypatch):
    samples, rate = birds
    monkeypatch.setitem(sys.modules, "sounddevice", PretendSoundDevice(samples / np.float32(32768), rate))
    source = open_source("alsa:USB mic", model_rate=encoder.sample_rate, stdin=io.BytesIO(), channels=2)
    assert isinstance(source, SoundDeviceSource) and source.sample_rate == rate
    with pytest.raises(SourceError, match="No input device"):
        open_source("alsa:nothing", model_rate=16000, stdin=io.BytesIO())
    stop = threading.Event()
    db = tmp_path / "r.sqlite"
    with open_store(db, encoder) as store:
        threading.Thread(target=lambda: _wait(lambda: rows(db, "SELECT count(*) FROM windows")[0][0] >= 19)
                         and stop.set(), daemon=True).start()
        summary = listen(encoder, store, source, source_name="alsa:USB mic",
                         options=WindowOptions(1.0, 0.5, last="short"), stop=stop, handle_signals=False)
    assert summary.ended == "stopped"
    starts, _, _, emb = stored(db)
    # A device never ends: every full window is there, the short last one is not (no end of source).
    np.testing.assert_allclose(starts, reference.starts[:19], atol=1e-9)
    assert cosines(emb, reference.embeddings[:19]).min() >= 0.9999


def test_sounddevice_missing_names_the_package(bundle, tmp_path):
    code = "import sys; sys.modules['sounddevice'] = None; from edgeenc.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "listen", "--bundle", str(bundle), "--db",
                             str(tmp_path / "r.sqlite"), "--source", "default", "--device", "cpu"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "'sounddevice' package: pip install 'edgeenc[listen]'" in result.stderr
    assert not (tmp_path / "r.sqlite").exists()


def test_clips_for_detections_are_flac_with_a_row(encoder, birds, reference, tmp_path):
    samples, rate = birds
    e = np.exp(reference.logits.astype(np.float64) - reference.logits.max(1, keepdims=True))
    top = (e / e.sum(1, keepdims=True)).max(1)
    threshold = float(np.median(top))
    source = PcmSource(io.BytesIO(samples.tobytes()), "s16le", rate, 1)
    db, clips = tmp_path / "r.sqlite", tmp_path / "clips"
    with open_store(db, encoder) as store:
        summary = listen(encoder, store, source, source_name="-", options=WindowOptions(1.0, 0.5, last="short"),
                         scoring=ScoreOptions(threshold=threshold, activation="softmax"), clips_dir=clips,
                         handle_signals=False)
    expected = int((top >= threshold).sum())
    assert 0 < summary.clips == expected < len(top)
    saved = rows(db, 'SELECT c.path, c.label, c.score, w.start, w."end", d.label, d.score FROM clips c '
                     "JOIN windows w ON w.id = c.window_id JOIN detections d ON d.window_id = w.id AND d.rank = 1")
    assert len(saved) == expected == len(list(clips.glob("*.flac")))
    with resources.as_file(BIRDS) as wav:
        heard = load(wav, encoder.sample_rate)
    for path, label, score, start, end, top_label, top_score in saved:
        assert (label, score) == (top_label, top_score) and score >= threshold
        assert Path(path).name.endswith(f"_{label}_{score:.3f}.flac") and Path(path).name[:8].isdigit()
        audio, clip_rate = sf.read(path, dtype="float32")
        assert clip_rate == encoder.sample_rate
        a, b = int(round(start * clip_rate)), int(round(end * clip_rate))
        np.testing.assert_allclose(audio, heard[a:b], atol=1.5 / 32768)  # FLAC holds 16-bit samples
