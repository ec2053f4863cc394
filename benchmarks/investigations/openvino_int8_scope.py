#!/usr/bin/env python3
"""Which layers OpenVINO int8 (NNCF) must keep in fp32 to pass the reduced-precision gate, and its speed.

    python benchmarks/investigations/openvino_int8_scope.py BUNDLE [--threads 2] [--runs 6]
                                                            [--rest bf16] [--static] [--scopes 2 3]

BUNDLE: an exported (full-size) bundle. For each ignored scope (front end only; + the attention's
activation x activation MatMuls; + the convolutions; front end + convolutions; front end with SmoothQuant
on) it quantises model.onnx, runs the gate of `edgeenc optimize` (export/parity.py compare
against ONNX Runtime on model.onnx, the quick case list) and then times every passing candidate and
OpenVINO bf16 in one interleaved run (one 10 s window, batch 1). The rule in export/openvino_variants.py
(front end + convolutions, SmoothQuant off) comes from this. `--rest bf16` runs every candidate's
unquantised ops in bf16 (the compile setting "inference_precision"), `--static` compiles the 10 s window
statically ("static_window_samples"), as `optimize` now gates them on bf16 CPUs; `--scopes` picks scopes by
their 0-based index in the list above.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--rest", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--scopes", type=int, nargs="*", default=None)
    args = parser.parse_args()
    settings = {"inference_precision": args.rest, **({"static_window_samples": 160000} if args.static else {})}

    import nncf
    import onnx
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from edgeenc.export.optimize import calibration_windows, ensure_names, front_end_nodes, optimize_cases
    from edgeenc.export.parity import LOWP_TOKEN_COSINE, compare, ort_runner
    from edgeenc.runtime.backends.openvino_backend import OpenVinoBackend
    from edgeenc.runtime.bench import Target, bench_audio, time_interleaved

    nncf.set_log_level(logging.WARNING)
    src, names = args.bundle / "model.onnx", ["tokens", "embedding"]
    front = set(front_end_nodes(ensure_names(onnx.load(str(src), load_external_data=False))))
    graph = ov.Core().read_model(str(src))

    def weight_free(node) -> bool:
        while node.get_type_name() in ("Convert", "Transpose", "Reshape", "Unsqueeze"):
            node = node.input_value(0).get_node()
        return node.get_type_name() != "Constant"

    ops = list(graph.get_ops())
    act_act = {o.get_friendly_name() for o in ops if o.get_type_name() == "MatMul"
               and weight_free(o.input_value(0).get_node()) and weight_free(o.input_value(1).get_node())}
    convs = {o.get_friendly_name() for o in ops if o.get_type_name() in ("Convolution", "GroupConvolution")}
    present = {o.get_friendly_name() for o in ops}
    scopes = {"front end": (front, False), "front end + act x act MatMuls": (front | act_act, False),
              "front end + convolutions": (front | convs, False),
              "front end + convolutions + act x act": (front | convs | act_act, False),
              "front end, SmoothQuant on": (front, True)}
    if args.scopes is not None:
        scopes = {k: v for i, (k, v) in enumerate(scopes.items()) if i in args.scopes}
    cases = optimize_cases(16000, 10.0, quick=True)
    reference = ort_runner(src, names, args.threads)
    references = {c.name: reference(c.audio) for c in cases}
    windows = calibration_windows(16000, 10.0, 8)
    work = Path(tempfile.mkdtemp(prefix="ov-int8-"))
    passing = []
    for i, (label, (ignored, smooth)) in enumerate(scopes.items()):
        advanced = (AdvancedQuantizationParameters() if smooth else
                    AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
        model = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(windows),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(windows),
                              ignored_scope=nncf.IgnoredScope(names=sorted(ignored & present), validate=False),
                              advanced_parameters=advanced)
        path = work / f"candidate{i}.xml"
        ov.save_model(model, str(path))
        backend = OpenVinoBackend(path, names, precision="int8", threads=args.threads, compile=settings)
        report = compare(label, backend.run, references, cases, names, token_cosine=LOWP_TOKEN_COSINE)
        worst = report.summary["worst"]
        tokens, centred = worst["tokens"]["min_cosine"], worst["embedding_centred"]["min_cosine"]
        print(f"{label:40s} gate {'PASS' if report.passed else 'FAIL'}  min token cos {tokens:.5f}  "
              f"centred embedding cos {centred:.4f}")
        if report.passed:
            passing.append(Target("cpu", label, "int8", backend))
    passing.append(Target("cpu", "bf16 (model.onnx)", "bf16",
                          OpenVinoBackend(src, names, precision="bf16", threads=args.threads,
                                          compile={"static_window_samples": 160000} if args.static else None)))
    times = time_interleaved(passing, bench_audio(16000, 10.0, 1), args.runs, 1)
    for key, values in times.items():
        print(f"{key:48s} p50 {1000 * float(np.median(values)):7.1f} ms")


if __name__ == "__main__":
    main()
