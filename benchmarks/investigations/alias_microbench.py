#!/usr/bin/env python3
"""The 4 KiB-aliasing effect behind export/layout.py, on single ONNX Runtime nodes.

    python benchmarks/investigations/alias_microbench.py [--threads 1 2] [--rounds 40]

BEATs shapes at a 10 s clip (496 tokens): fc2 as a MatMul [496, K] x [K, 768] with K = 3072 (as
exported) and K = 3088 (16 zero rows added), and the grouped positional conv (768 channels, 16 groups,
48 x 128 taps) against the same conv with one zero tap (129). Every pair runs interleaved in one
process, in alternating blocks of runs (the first run of each block untimed: the other session's pool
thread spins for a while after its last run and would take a core), and each pair's outputs are
checked equal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 10


def session(nodes, inits, x_shape, threads):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def pairs(threads: int):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3072, 768)).astype(np.float32) * 0.02
    padded = np.concatenate([w, np.zeros((16, 768), np.float32)])
    a = rng.standard_normal((496, 3072)).astype(np.float32)
    a_padded = np.concatenate([a, rng.standard_normal((496, 16)).astype(np.float32)], 1)  # x zero rows
    mm = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    yield ("fc2 MatMul [496,K]x[K,768]", 2 * 496 * 3072 * 768,
           ("K=3072", session(mm, [numpy_helper.from_array(w, "w")], [496, 3072], threads), a),
           ("K=3088", session(mm, [numpy_helper.from_array(padded, "w")], [496, 3088], threads), a_padded))
    k = rng.standard_normal((768, 48, 128)).astype(np.float32) * 0.02
    k129 = np.concatenate([k, np.zeros((768, 48, 1), np.float32)], 2)
    x = rng.standard_normal((1, 768, 496)).astype(np.float32)

    def conv(kernel, taps, end_pad):
        node = helper.make_node("Conv", ["x", "k"], ["y"], group=16, kernel_shape=[taps], pads=[64, end_pad])
        return session([node], [numpy_helper.from_array(kernel, "k")], [1, 768, 496], threads)

    yield ("pos conv 16 groups x 48 ch", 2 * 496 * 768 * 48 * 128,
           ("128 taps", conv(k, 128, 63), x), ("129 taps", conv(k129, 129, 64), x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--table-header", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if len(args.threads) > 1:  # one fresh process per thread count (sessions of the other count linger)
        for i, threads in enumerate(args.threads):
            subprocess.run([sys.executable, __file__, "--threads", str(threads), "--rounds", str(args.rounds),
                            "--table-header" if i == 0 else "--no-table-header"], check=True)
        return
    if args.table_header:
        print(f"onnxruntime {ort.__version__}")
        print("| threads | node | variant | p50 ms | GFLOP/s |\n|---|---|---|---|---|", flush=True)
    for threads in args.threads:
        for label, flops, *variants in pairs(threads):
            outs = [s.run(None, {"x": x})[0] for _name, s, x in variants]
            assert np.allclose(outs[0], outs[1], atol=1e-4), f"{label}: the two variants disagree"
            times = [[] for _ in variants]
            for _ in range(args.rounds):
                for i, (_name, s, x) in enumerate(variants):
                    s.run(None, {"x": x})  # untimed: the other session's pool thread may still be spinning
                    for _ in range(BLOCK):
                        start = time.perf_counter()
                        s.run(None, {"x": x})
                        times[i].append(time.perf_counter() - start)
            for (name, _s, _x), t in zip(variants, times):
                p50 = float(np.median(t))
                print(f"| {threads} | {label} | {name} | {p50 * 1e3:.2f} | {flops / p50 / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
