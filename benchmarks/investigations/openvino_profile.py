#!/usr/bin/env python3
"""Where one 10 s clip's time goes in OpenVINO's CPU plugin: per node type and per kernel (exec type).

    python benchmarks/investigations/openvino_profile.py MODEL.onnx|MODEL.xml [--precision bf16] [--threads 2]
                                                          [--runs 10] [--static] [--top 25]

The runtime's compile settings (runtime/backends/openvino_backend.py compile_config) plus PERF_COUNT; 3
untimed runs, then `--runs` profiled runs; times are the median per run of OpenVINO's own per-node
counters (real_time), summed by node type and by the kernel that ran it (e.g. brgemm_avx512_amx: AMX tiles,
jit_avx512: AVX-512 vectors, ref: a reference loop), and the top single nodes. `--static` reshapes the
input to the 10 s window first.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import openvino as ov

    from edgeenc.runtime.backends.openvino_backend import compile_config
    from edgeenc.runtime.bench import bench_audio

    clip = bench_audio(args.rate, 10.0, args.batch)
    core = ov.Core()
    model = core.read_model(str(args.model))
    if args.static:
        model.reshape({model.inputs[0].get_any_name(): list(clip.shape)})
    config = {**compile_config(args.precision, args.threads), "PERF_COUNT": True}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(3):
        request.infer({0: clip})
    walls, by_type, by_exec, by_node = [], collections.defaultdict(list), collections.defaultdict(list), {}
    for _ in range(args.runs):
        time.sleep(0.05)
        start = time.perf_counter()
        request.infer({0: clip})
        walls.append(time.perf_counter() - start)
        types, execs = collections.Counter(), collections.Counter()
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            if us <= 0:
                continue
            types[info.node_type] += us
            execs[f"{info.node_type} / {info.exec_type}"] += us
            by_node.setdefault(info.node_name, (info.node_type, info.exec_type, []))[2].append(us)
        for key, us in types.items():
            by_type[key].append(us)
        for key, us in execs.items():
            by_exec[key].append(us)
    wall = 1000 * float(np.median(walls))
    counted = sum(float(np.median(v)) for v in by_type.values()) / 1000
    print(f"{args.model.name} {args.precision} {'static' if args.static else 'dynamic'} batch {args.batch}, "
          f"{args.threads} threads: wall p50 {wall:.1f} ms, node counters {counted:.1f} ms")

    def table(title: str, rows: dict) -> None:
        print(f"\n{title:60s} {'ms':>8s} {'%':>6s}")
        ranked = sorted(((float(np.median(v)) / 1000, k) for k, v in rows.items()), reverse=True)
        for ms, key in ranked[: args.top]:
            print(f"{key[:60]:60s} {ms:8.2f} {100 * ms / counted:6.1f}")

    table("node type", by_type)
    table("node type / kernel", by_exec)
    table("single nodes", {f"{n} [{t} / {e}]": v for n, (t, e, v) in by_node.items()})


if __name__ == "__main__":
    main()
