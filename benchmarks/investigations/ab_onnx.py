#!/usr/bin/env python3
"""Paired A/B timing of ONNX files on this CPU: is a graph rewrite faster, beyond this machine's noise?

    python benchmarks/investigations/ab_onnx.py --threads 2 --rounds 80 A.onnx B.onnx [C.onnx ...]

Every file runs through the runtime's own CPU backend (same session options users get) on a 10 s clip
of the bundled recording, interleaved round-robin with 50 ms of idle before each run. Besides each
file's p50, it prints the median and interquartile range of the per-round ratio to the first file:
neighbouring runs share the machine's state of the moment, so the paired ratio cancels the slow drift
that moves p50 by 5-10 % between runs on a shared 2-core VM. Outputs are compared to the first file's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rate", type=int, default=16000)
    args = parser.parse_args()

    from edgeenc.runtime.backends.onnxruntime_backend import OrtBackend
    from edgeenc.runtime.bench import bench_audio

    clip = bench_audio(args.rate, 10.0, 1)
    backends = [OrtBackend(p, ["embedding"], provider="CPUExecutionProvider", threads=args.threads)
                for p in args.models]
    first = backends[0].run(clip)["embedding"]
    for path, backend in zip(args.models, backends):
        diff = float(np.abs(backend.run(clip)["embedding"] - first).max())
        print(f"{path}: embedding max abs vs {args.models[0]}: {diff:.2e}")
    times = [[] for _ in backends]
    for _ in range(args.rounds):
        for i, backend in enumerate(backends):
            time.sleep(0.05)
            start = time.perf_counter()
            backend.run(clip)
            times[i].append(time.perf_counter() - start)
    base = np.asarray(times[0])
    print(f"\n| file | p50 ms | min ms | time / first, paired median (IQR) |  ({args.threads} threads, "
          f"{args.rounds} rounds)\n|---|---|---|---|")
    for path, ts in zip(args.models, times):
        ts = np.asarray(ts)
        ratio = ts / base
        print(f"| {path} | {np.median(ts) * 1e3:.1f} | {ts.min() * 1e3:.1f} | {np.median(ratio):.3f} "
              f"({np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f}) |")


if __name__ == "__main__":
    main()
