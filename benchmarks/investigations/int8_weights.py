#!/usr/bin/env python3
"""Which int8 weights pass the quality gate, and how fast they run, on THIS CPU.

    python benchmarks/investigations/int8_weights.py --bundle /tmp/edgeenc-bench/beats [--threads 2] [--rounds 12]

ONNX Runtime multiplies u8 activations by s8 weights with `vpmaddubsw` on x86 CPUs without VNNI, which
saturates int16 pair sums (runtime/isa.py). This writes dynamic-int8 variants of the bundle's
layout-rewritten model.onnx with
  - s8 weights (8 bit): what `edgeenc optimize` writes on VNNI and ARM CPUs,
  - s8 weights, 7 bit (onnxruntime's reduce_range): the usual workaround, no saturation,
  - s8 weights, 7 bit, each block's fc2 kept fp32 (the optimize fallback),
  - u8 weights (8 bit): what `edgeenc optimize` writes on x86 without VNNI,
gates each with the reduced-precision gate of DESIGN.md against model.onnx, and times them interleaved
with model.onnx on a 10 s clip. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeenc.export import optimize as opt
    from edgeenc.export.parity import LOWP_TOKEN_COSINE, compare, ort_runner, reduced_figures
    from edgeenc.runtime.backends import cpu_summary
    from edgeenc.runtime.bundle import output_names, read_manifest

    manifest = read_manifest(args.bundle)
    names = output_names(manifest)
    rate, window = int(manifest["sample_rate"]), float(manifest["window_seconds"])
    cases = opt.optimize_cases(rate, window)
    reference = ort_runner(args.bundle / "model.onnx", names, args.threads)
    references = {c.name: reference(c.audio) for c in cases}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        opt.write_layout_model(args.bundle / "model.onnx", tmp / "layout.onnx")
        model = opt.ensure_names(onnx.load(str(tmp / "layout.onnx")))
        onnx.save(model, str(tmp / "named.onnx"))
        nodes = opt.weight_matmuls(model, set(opt.front_end_nodes(model)))
        fc2 = set(opt.ffn_down_projections(model))

        def quantize(name, weights, reduce_range, skip=()):
            dst = tmp / name
            quantize_dynamic(str(tmp / "named.onnx"), str(dst), per_channel=True, reduce_range=reduce_range,
                             weight_type=weights, op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_quantize=[n for n in nodes if n not in skip],
                             extra_options={"MatMulConstBOnly": True})
            return dst

        candidates = {
            "s8 weights, 8 bit": quantize("s8.onnx", QuantType.QInt8, False),
            "s8 weights, 7 bit (reduce_range)": quantize("s8r.onnx", QuantType.QInt8, True),
            "s8 weights, 7 bit, fc2 fp32": quantize("s8r_fc2.onnx", QuantType.QInt8, True, fc2),
            "u8 weights, 8 bit": quantize("u8.onnx", QuantType.QUInt8, False),
        }
        runners = {"model.onnx (fp32)": ort_runner(args.bundle / "model.onnx", ["embedding"], args.threads)}
        gates = {}
        for label, path in candidates.items():
            report = compare(label, ort_runner(path, names, args.threads), references, cases, names,
                             token_cosine=LOWP_TOKEN_COSINE)
            gates[label] = reduced_figures(report)
            runners[label] = ort_runner(path, ["embedding"], args.threads)

        clip = cases[0].audio[:, : int(window * rate)]
        times = {k: [] for k in runners}
        for run in runners.values():
            run(clip)
        for _ in range(args.rounds):
            for label, run in runners.items():
                time.sleep(0.05)
                start = time.perf_counter()
                run(clip)
                times[label].append(time.perf_counter() - start)

    cpu = cpu_summary()
    base = np.asarray(times["model.onnx (fp32)"])
    print(f"CPU: {cpu['cpu_model']} ({cpu['machine']}, VNNI: {cpu['vnni']}), {args.threads} threads, "
          f"{args.rounds} interleaved rounds, 10 s clip\n")
    print("| variant | gate | min token cos | centred emb cos | p50 ms | time / fp32 (paired median) |")
    print("|---|---|---|---|---|---|")
    for label, ts in times.items():
        ts = np.asarray(ts)
        g = gates.get(label)
        gate = ("pass" if g["passed"] else "FAIL") if g else "reference"
        tok = f"{g['min_token_cosine']:.5f}" if g else ""
        cen = f"{g['min_centred_embedding_cosine']:.4f}" if g else ""
        print(f"| {label} | {gate} | {tok} | {cen} | {np.median(ts) * 1e3:.0f} | {np.median(ts / base):.3f} |")


if __name__ == "__main__":
    main()
