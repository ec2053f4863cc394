#!/usr/bin/env python3
"""OpenVINO compile options tried for fp32 / bf16 speed, timed interleaved in one run.

    python benchmarks/investigations/openvino_options.py BUNDLE [--threads 2] [--runs 8]

Dynamic [batch, samples] input (what the runtime compiles) against the model reshaped to the static
10 s window, and with ENABLE_CPU_PINNING; one 10 s window of the bundled recording, batch 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()

    import openvino as ov

    from edgeenc.runtime.bench import bench_audio

    core = ov.Core()
    clip = bench_audio(16000, 10.0, 1)

    def compiled(hint: str, static: bool, **extra):
        model = core.read_model(str(args.bundle / "model.onnx"))
        if static:
            model.reshape({"audio": list(clip.shape)})
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads,
                  "PERFORMANCE_HINT": "LATENCY", **extra}
        request = core.compile_model(model, "CPU", config).create_infer_request()
        for _ in range(2):
            request.infer({0: clip})
        return request

    candidates = {"f32 dynamic": compiled("f32", False), "f32 static": compiled("f32", True),
                  "f32 dynamic, pinned": compiled("f32", False, ENABLE_CPU_PINNING=True),
                  "bf16 dynamic": compiled("bf16", False), "bf16 static": compiled("bf16", True)}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.runs):
        for name, request in candidates.items():
            time.sleep(0.05)  # let the previous candidate's worker threads stop spinning
            start = time.perf_counter()
            request.infer({0: clip})
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:24s} p50 {1000 * float(np.median(values)):7.1f} ms")


if __name__ == "__main__":
    main()
