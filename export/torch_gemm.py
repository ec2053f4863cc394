"""torch's bf16 matmul and int8 `_int_mm` rates on given GEMM shapes: the torch candidate of `edgeenc bench`'s
bf16 and int8 limits (runtime/bench/gemm_limits.py runs this as `python -m edgeenc.export.torch_gemm`, in a
child process, so that the runtime never imports torch).

    python -m edgeenc.export.torch_gemm '[[496, 768, 3072]]' REPEATS THREADS

Prints, per precision, one oneDNN verbose block between "KERNEL <precision>" and "END" (one more call with
oneDNN's verbose mode on: the implementation that ran), then "RESULT " + JSON of the rates per shape.
"""

from __future__ import annotations

import json
import sys
import time


def best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _operands(torch, precision: str, m: int, k: int, n: int):
    if precision == "bf16":
        a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
        return lambda: a @ b
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    return lambda: torch._int_mm(a, b)


def main(argv: list[str]) -> None:
    import torch

    shapes, repeats, threads = json.loads(argv[0]), int(argv[1]), int(argv[2])
    if threads:
        torch.set_num_threads(threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for precision in ("bf16", "int8"):
        per_shape, why = {}, None
        for m, k, n in shapes:
            try:
                seconds = best_seconds(_operands(torch, precision, m, k, n), repeats)
            except (RuntimeError, NotImplementedError) as exc:
                why = str(exc).splitlines()[0][:200]
                continue
            per_shape["x".join(map(str, (m, k, n)))] = 2.0 * m * k * n / seconds / 1e9
        out[precision] = {"per_shape": per_shape, "why": why}
        if per_shape:
            run = _operands(torch, precision, *shapes[0])
            run()
            print("KERNEL " + precision, flush=True)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
            print("END", flush=True)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
