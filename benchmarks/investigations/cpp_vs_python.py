#!/usr/bin/env python3
"""Cold start and per-window time of cpp/build/edgeenc-embed next to the Python runtime, one run.

    python benchmarks/investigations/cpp_vs_python.py BUNDLE [AUDIO] [--rounds 5] [--threads 2]

Each round runs, one after the other (interleaved, so both see the machine's state of the moment):
- C++: `edgeenc-embed BUNDLE AUDIO --threads T --timing`, a fresh process;
- Python: a fresh `python` process that imports the runtime, `Encoder.load(BUNDLE, "cpu")` and
  `embed_file(AUDIO)`, as `edgeenc embed` does.
Cold start is the fresh process's wall time from exec to its last result (import, model load, decode,
every window). Model load is session creation alone; per-window time is (decode + windowing +
inference) / windows, inside the process. Medians over the rounds are printed, then how far the C++
embeddings are from the Python runtime's on the same file (the bars tests/test_cpp.py holds them to).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PYTHON_RUN = """
import json, sys, time
t0 = time.perf_counter()
from edgeenc.runtime.encoder import Encoder
t1 = time.perf_counter()
encoder = Encoder.load(sys.argv[1], "cpu", threads=int(sys.argv[3]))
t2 = time.perf_counter()
result = encoder.embed_file(sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "windows": len(result),
                  "per_window_ms": (t3 - t2) * 1e3 / len(result), "backend": encoder.backend.description}))
"""


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return (time.perf_counter() - start) * 1e3, proc


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("audio", type=Path, nargs="?", default=REPO / "edgeenc" / "data" / "birds_10s.wav")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--binary", type=Path, default=REPO / "cpp" / "build" / "edgeenc-embed")
    args = parser.parse_args()

    rows: dict[str, dict[str, list[float]]] = {"C++": {}, "Python": {}}
    backend = ""
    for _ in range(args.rounds):
        wall, proc = timed([str(args.binary), str(args.bundle), str(args.audio), "--threads", str(args.threads),
                            "--timing"])
        figures = dict(re.findall(r"(\w+)=([\d.]+)", proc.stderr.splitlines()[-1]))
        cpp = {"cold_start_ms": wall, "load_ms": float(figures["load_ms"]), "windows": float(figures["windows"]),
               "per_window_ms": (float(figures["decode_ms"]) + float(figures["infer_ms"])) / float(figures["windows"])}
        wall, proc = timed([sys.executable, "-c", PYTHON_RUN, str(args.bundle), str(args.audio), str(args.threads)])
        python = json.loads(proc.stdout.splitlines()[-1])
        backend = python.pop("backend")
        python["cold_start_ms"] = wall
        for name, figures in (("C++", cpp), ("Python", python)):
            for key, value in figures.items():
                rows[name].setdefault(key, []).append(float(value))

    print(f"{args.bundle} on {args.audio.name}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"Python backend: {backend}; C++: {args.bundle / 'model.onnx' if args.bundle.is_dir() else args.bundle}")
    print(f"{'':8}{'cold start ms':>15}{'model load ms':>15}{'per window ms':>15}{'windows':>9}")
    for name, figures in rows.items():
        print(f"{name:8}{median(figures['cold_start_ms']):15.0f}{median(figures['load_ms']):15.0f}"
              f"{median(figures['per_window_ms']):15.1f}{median(figures['windows']):9.0f}")
    for key, what in (("cold_start_ms", "cold start"), ("per_window_ms", "per window")):
        print(f"{what}, Python / C++: {median(rows['Python'][key]) / median(rows['C++'][key]):.2f}x")
    print(agreement(args))


def agreement(args: argparse.Namespace) -> str:
    import numpy as np

    from edgeenc.runtime.encoder import Encoder

    proc = subprocess.run([str(args.binary), str(args.bundle), str(args.audio), "--json"], capture_output=True,
                          text=True, check=True)
    windows = json.loads(proc.stdout)["windows"]
    python = Encoder.load(args.bundle, "cpu", threads=args.threads).embed_file(args.audio)
    ours = np.array([w["embedding"] for w in windows], dtype=np.float64)
    theirs = python.embeddings.astype(np.float64)
    if ours.shape != theirs.shape:
        return f"C++ and Python disagree: {ours.shape} vs {theirs.shape} embeddings"
    times = np.abs(np.array([[w["start"], w["end"]] for w in windows]) - np.stack([python.starts, python.ends], 1))
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    return (f"C++ vs Python: {len(windows)} windows each, max start/end difference {times.max():.1e} s, "
            f"max abs {np.abs(ours - theirs).max():.1e}, 1 - min cosine {1 - cosine.min():.1e}")


if __name__ == "__main__":
    main()
