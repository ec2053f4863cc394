"""Throughput of `edgeenc embed` single-process vs `--engine ray` at 1 and 2 workers, measured in one run.

    python benchmarks/ray_engine.py BUNDLE AUDIO_FOLDER [--range-seconds S]

Each engine runs the same files into a fresh output, as a subprocess of the CLI (so Ray's start-up and the
bundle check are counted, as a user sees them); wall time from start to exit. Prints files/s, audio hours
per wall hour, and Ray's overhead as wall time over the single-process run's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("audio")
    parser.add_argument("--range-seconds", type=float, default=600.0)
    args = parser.parse_args()
    files = sorted(Path(args.audio).rglob("*.wav"))
    hours = sum(sf.info(f).duration for f in files) / 3600
    edgeenc = str(Path(sys.executable).with_name("edgeenc"))
    base = [edgeenc, "embed", args.bundle, args.audio, "--device", "cpu"]
    runs = {
        "single process (ORT 1 thread)": ["--threads", "1"],
        "single process (ORT 2 threads)": [],
        "ray, 1 worker x 1 thread": ["--engine", "ray", "--workers", "1"],
        "ray, 2 workers x 1 thread": ["--engine", "ray", "--workers", "2"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            out = Path(tmp) / (name.replace(" ", "_") + ("" if "--engine" in extra else ".parquet"))
            if "--engine" in extra:
                extra = [*extra, "--range-seconds", str(args.range_seconds)]
            start = time.perf_counter()
            subprocess.run([*base, "-o", str(out), *extra], check=True, capture_output=True)
            results[name] = time.perf_counter() - start
    print(f"{len(files)} files, {hours:.3f} h of audio")
    print(f"{'engine':32} {'wall s':>8} {'files/s':>8} {'audio h / wall h':>17} {'wall / single(1 thr)':>21}")
    reference = results["single process (ORT 1 thread)"]
    for name, wall in results.items():
        print(f"{name:32} {wall:8.1f} {len(files) / wall:8.2f} {hours / (wall / 3600):17.0f} {wall / reference:21.2f}")


if __name__ == "__main__":
    main()
