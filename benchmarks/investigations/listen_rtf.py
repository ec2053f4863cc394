#!/usr/bin/env python3
"""Real-time factor and CPU use of `edgeenc listen` with a stdin source paced at real time.

    python benchmarks/investigations/listen_rtf.py BUNDLE --seconds 60 --threads 1 2

For each thread count, `edgeenc listen --source -` runs as a child and gets the bundled recording
(looped, 16-bit PCM at its own 32 kHz, so the resampler is in the path) in 0.1 s blocks on the
real-time schedule, then end of input. Figures per run, all from that one run:

- speed: audio seconds encoded per second of inference (`listen`'s own summary; x real time);
- CPU while listening: process CPU seconds (every thread) over wall seconds of the listen loop, in
  cores (1.0 = one core busy), from `listen`'s summary; and the whole child (start-up and model load
  included) from ``wait4``;
- lag: how long after the end of each window's audio its row was committed, p50 / max (a reader
  polls the database every 50 ms, so this is rounded up by up to 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources

import numpy as np
import soundfile as sf


def run(bundle: str, seconds: float, threads: int, folder: str) -> dict:
    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as wav:
        recording, rate = sf.read(wav, dtype="int16")
    block = rate // 10
    total_blocks = int(seconds * 10)
    pcm = np.resize(recording, total_blocks * block).astype("<i2")
    db = os.path.join(folder, f"listen-{threads}.sqlite")
    cmd = [sys.executable, "-c", "from edgeenc.cli import main; main()", "listen", "--bundle", bundle, "--db", db,
           "--source", "-", "--rate", str(rate), "--device", "cpu", "--threads", str(threads), "--quiet"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(line.decode() for line in proc.stderr), daemon=True)
    reader.start()
    while not any("listening to" in line for line in stderr):
        time.sleep(0.02)
    committed: dict[float, float] = {}  # window end (s of audio) -> unix time its row was first seen
    began = time.time()
    for i in range(total_blocks):
        proc.stdin.write(pcm[i * block:(i + 1) * block].tobytes())
        proc.stdin.flush()
        _poll(db, committed)
        pause = began + (i + 1) / 10 - time.time()
        if pause > 0:
            time.sleep(pause)
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    _poll(db, committed)
    text = "".join(stderr)
    summary = re.search(r"encoder at ([\d.]+)x real time, CPU ([\d.]+) s over ([\d.]+) s", text)
    if proc.returncode != 0 or summary is None:
        raise SystemExit(f"listen failed ({proc.returncode}):\n{text}")
    speed, cpu, wall = (float(g) for g in summary.groups())
    # Wall-clock end of each window's audio on the sender's schedule (the sample clock from `began`).
    lags = [seen - (began + end) for end, seen in committed.items() if end <= seconds]
    return {"threads": threads, "audio_seconds": seconds, "windows": len(committed), "speed_x_real_time": speed,
            "cpu_cores_while_listening": cpu / wall, "listen_wall_s": wall,
            "child_cpu_s": usage.ru_utime + usage.ru_stime, "child_max_rss_mib": usage.ru_maxrss / 1024,
            "lag_p50_s": float(np.median(lags)) if lags else None, "lag_max_s": max(lags) if lags else None}


def _poll(db: str, committed: dict[float, float]) -> None:
    if not os.path.exists(db):
        return
    conn = sqlite3.connect(db)
    try:
        now = time.time()
        for (end,) in conn.execute('SELECT "end" FROM windows'):
            committed.setdefault(end, now)
    except sqlite3.OperationalError:
        pass  # tables not created yet
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for threads in args.threads:
            result = run(args.bundle, args.seconds, threads, folder)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "loadavg_after": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
