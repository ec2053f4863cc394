#!/usr/bin/env python3
"""Where one 10 s clip's time goes in ONNX Runtime: kernel time per op type and per op + input shape.

    python benchmarks/investigations/profile_ops.py MODEL.onnx [--threads 2] [--runs 5] [--rate 16000]

The runtime's session settings (ORT_ENABLE_ALL, SkipLayerNormFusion off), 3 untimed runs, then `--runs`
profiled runs; times are per run (ONNX Runtime's `enable_profiling`, which adds a little overhead).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import onnxruntime as ort

    from edgeenc.runtime.backends import CPU_DISABLED_OPTIMIZERS
    from edgeenc.runtime.bench import bench_audio

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
    feed = {"audio": bench_audio(args.rate, 10.0, 1)}
    for _ in range(3):
        session.run(None, feed)
    walls = []
    for _ in range(args.runs):
        start = time.perf_counter()
        session.run(None, feed)
        walls.append(time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = len([e for e in events if e.get("name") == "model_run"])
    by_op, count, by_shape = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            count[op] += 1
            by_shape[(op, json.dumps(e["args"].get("input_type_shape"))[:140])] += e["dur"]
    total = sum(by_op.values())
    print(f"{args.model}: {args.threads} threads, wall p50 {np.median(walls) * 1e3:.1f} ms, "
          f"kernel time {total / runs / 1e3:.1f} ms per run ({runs} runs incl. warm-up)\n")
    print("| op | ms per run | % | nodes |\n|---|---|---|---|")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {us / runs / 1e3:.2f} | {100 * us / total:.1f} | {count[op] // runs} |")
    print("\n| ms per run | op | input shapes |\n|---|---|---|")
    for (op, shapes), us in sorted(by_shape.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {us / runs / 1e3:.2f} | {op} | {shapes} |")


if __name__ == "__main__":
    main()
