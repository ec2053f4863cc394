#!/usr/bin/env python3
"""OpenVINO's FullyConnected against oneDNN's matmul (through torch) on BEATs' GEMM shapes, bf16 and int8.

    python benchmarks/investigations/openvino_fc_vs_onednn.py [--threads 2] [--repeats 15]

Why the CPU default stops at about half of the bf16 limit on Sapphire Rapids: the model's weight GEMMs run in
OpenVINO's FullyConnected node (AMX kernels: brgemm_avx512_amx_bf16 / _I8 in the per-node profile), and this
measures that node alone, with constant weights as in the model, against torch's bf16 matmul and `_int_mm`
(oneDNN), ONNX Runtime's MatMulInteger (MLAS) and OpenVINO with a dynamic M. Best of `--repeats` runs each,
in one process, one shape after another.
"""

from __future__ import annotations

import argparse

import numpy as np

SHAPES = [(496, 768, 3072), (496, 3072, 768), (496, 768, 768)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import openvino as ov
    import torch

    from edgeenc.export.torch_gemm import best_seconds as best
    from edgeenc.runtime.backends.openvino_backend import compile_config
    from edgeenc.runtime.bench.gemm_limits import ort_gemm_gflops

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def openvino_fc(m: int, k: int, n: int, dynamic: bool) -> float:
        a = ov.opset13.parameter([-1 if dynamic else m, k], ov.Type.f32, name="a")
        w = ov.opset13.constant(rng.standard_normal((n, k)).astype(np.float32))
        model = ov.Model([ov.opset13.matmul(a, w, False, True)], [a], "fc")
        request = ov.Core().compile_model(model, "CPU", compile_config("bf16", args.threads)).create_infer_request()
        x = rng.standard_normal((m, k)).astype(np.float32)
        return 2 * m * k * n / best(lambda: request.infer({0: x}), args.repeats) / 1e9

    print(f"GFLOP/s (int8: GOP/s), {args.threads} threads, best of {args.repeats}")
    print(f"{'shape':>16} {'torch bf16':>11} {'OV bf16':>8} {'OV bf16 dyn M':>14} {'torch int_mm':>13} "
          f"{'ORT int8':>9}")
    for m, k, n in SHAPES:
        a, w = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
        ai = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        wi = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        flops = 2 * m * k * n
        torch_bf16 = flops / best(lambda: a @ w, args.repeats) / 1e9  # noqa: B023 - called at once
        torch_int8 = flops / best(lambda: torch._int_mm(ai, wi), args.repeats) / 1e9  # noqa: B023
        ov_static, ov_dynamic = openvino_fc(m, k, n, False), openvino_fc(m, k, n, True)
        ort_int8 = ort_gemm_gflops((m, k, n), "int8", args.threads, repeats=args.repeats)
        print(f"{m}x{k}x{n:>5} {torch_bf16:11.0f} {ov_static:8.0f} {ov_dynamic:14.0f} {torch_int8:13.0f} "
              f"{ort_int8:9.0f}")


if __name__ == "__main__":
    main()
