"""`edgeenc optimize`: CPU variants of a bundle, each checked against model.onnx before it is listed.

- model.cpu.onnx: the exact layout rewrites of export/layout.py (GEMM widths that alias in L1 padded
  with zeros), then ONNX Runtime's own fusions (LayerNormalization, BiasGelu, FusedMatMul) saved into
  the file, fp32. Gate:
  the fp32 thresholds of export/parity.py (max abs <= 2e-3, per-token cosine >= 0.99999) against ONNX
  Runtime running model.onnx (the model.onnx itself was gated against PyTorch at export).
- the int8 variants start from the layout-rewritten model.onnx (standard ops, so the quantisers
  understand it).
- model.int8dyn.onnx: dynamic int8 (weights per channel, activations quantised at run time), a
  baseline.
- int8 weights are s8 where this CPU multiplies u8 x s8 exactly (VNNI, ARM) and u8 on x86 CPUs without
  VNNI, where ONNX Runtime's u8 x s8 kernel saturates (runtime/isa.py); the manifest records which, and
  the runtime refuses an s8 file on a CPU that would saturate it.
- model.int8.onnx: static int8 (QDQ, weights per channel, activations calibrated on windows of the
  bundled real recording), the front end (everything before the first Conv) and any layer listed
  in `keep_fp32` stay fp32.
- bf16: no ONNX Runtime file; its CPU provider has no bf16 MatMul kernel (checked at run time and
  recorded in the manifest). OpenVINO runs model.onnx in bf16 instead ("openvino:bf16", with
  "openvino:fp32" and an NNCF int8 IR beside it: export/openvino_variants.py). Then every variant is
  timed and the fastest valid one recorded as manifest["cpu_default"] (export/cpu_default.py).

When an int8 variant fails its gate and no --keep-fp32 was given, it is written once more with each
block's feed-forward down-projection (fc2, the weight MatMuls with the widest K) in fp32 and gated
again; the failed attempt's figures stay in the manifest ("failed_attempts"). The full-size EAT
fixture needs this (all-int8 mean-centred embedding cosine 0.988; with fc2 in fp32 0.993).

Every variant goes through parity.compare: the fp32 thresholds for fp32 files, the reduced-precision
gate (per-token cosine >= 0.99, mean-centred embedding cosine >= 0.99) for the others. Only passing
files stay in the bundle; the figures of every variant, passed or not, are recorded under
manifest["variants"] and manifest["optimize"].
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from edgeenc.progress import Progress
from edgeenc.runtime import bundle as bundle_io
from edgeenc.runtime.atomic import write_json_atomic
from edgeenc.runtime.backends import CPU_DISABLED_OPTIMIZERS, cpu_summary, int8_weight_type
from edgeenc.runtime.bench import batch_sweep

from .cpu_default import pick_cpu_default
from .layout import cpu_layout
from .openvino_variants import int8_files, openvino_variants
from .parity import (
    LOWP_TOKEN_COSINE,
    ParityCase,
    compare,
    fp32_figures,
    ort_runner,
    reduced_figures,
    reference_audio,
)

WEIGHT_OPS = ("MatMul", "Gemm")


def optimize_cases(sample_rate: int, window_seconds: float, *, quick: bool = False) -> list[ParityCase]:
    """The real recording, shorter and longer crops of it at other gains, a batch of 2 with a noise row, and
    (not `quick`) one native window alone: what `optimize` times, and the shape OpenVINO variants compile
    statically (openvino_variants.py), so batch 1 and 2 of that path are both gated."""
    real = reference_audio(sample_rate)
    tiled = np.concatenate([real * g for g in (1.0, 0.5, 2.0, 0.25)])
    n = int(round(window_seconds * sample_rate))
    rng = np.random.default_rng(0)
    cases = [ParityCase("real_recording", real[None, :])]
    for seconds in ((3.0,) if quick else (3.0, 5.0)):
        m = int(seconds * sample_rate)
        cases.append(ParityCase(f"{seconds:g}s_batch1", tiled[None, n // 3: n // 3 + m].copy()))
    batch = np.stack([tiled[n // 2: n // 2 + n], rng.standard_normal(n).astype(np.float32) * 0.05])
    cases.append(ParityCase("window_batch2", batch))
    if not quick:
        cases.append(ParityCase("window_batch1", tiled[None, n: 2 * n].copy()))
    return cases


def calibration_windows(sample_rate: int, window_seconds: float, count: int = 8) -> list[np.ndarray]:
    """Windows of the bundled real recording at several offsets and gains, batch 1 each."""
    real = reference_audio(sample_rate)
    n = int(round(window_seconds * sample_rate))
    tiled = np.concatenate([real * g for g in (1.0, 0.5, 2.0, 0.25, 1.0)])
    starts = np.linspace(0, len(tiled) - n, count).astype(int)
    return [tiled[None, s: s + n].copy() for s in starts]


def write_layout_model(src: Path, dst: Path) -> dict:
    """model.onnx with the exact CPU layout rewrites of export/layout.py (standard ops only)."""
    model = onnx.load(str(src))
    info = cpu_layout(model)
    onnx.save(model, str(dst))
    return info


def write_cpu_model(layout_src: Path, dst: Path, *, say: Progress) -> dict:
    """model.cpu.onnx from the layout-rewritten model.onnx: ONNX Runtime's own fusions saved into the file.

    ONNX Runtime at ORT_ENABLE_EXTENDED fuses LayerNormalization, Gelu / BiasGelu, MatMul + scale
    (FusedMatMul) and folds constants; the result uses com.microsoft ops, so it lives beside the portable
    model.onnx. ORT_ENABLE_ALL is not saved: it adds layout changes tied to this CPU. The transformer
    optimizer (onnxruntime.transformers) was tried and dropped: its SkipLayerNormalization kernel made
    the model slower (see CPU_DISABLED_OPTIMIZERS) and its Attention fusion does not match BEATs' gated
    relative bias.
    """
    import onnxruntime as ort

    say("onnxruntime graph optimisations (ORT_ENABLE_EXTENDED), saved")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(layout_src), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
    fused = {}
    for node in onnx.load(str(dst), load_external_data=False).graph.node:
        if node.domain == "com.microsoft":
            fused[node.op_type] = fused.get(node.op_type, 0) + 1
    return {"tool": f"export.layout + onnxruntime {ort.__version__} ORT_ENABLE_EXTENDED (saved optimised model; "
                    f"disabled: {', '.join(CPU_DISABLED_OPTIMIZERS)})", "fused_operators": fused}


def front_end_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of every node before the first Conv (the fbank front end), in graph order."""
    names = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            break
        names.append(node.name)
    return names


def weight_matmuls(model: onnx.ModelProto, skip: set[str]) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in WEIGHT_OPS and n.name not in skip and any(x in weights for x in n.input[1:2])]


def ensure_names(model: onnx.ModelProto) -> onnx.ModelProto:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def ffn_down_projections(model: onnx.ModelProto) -> list[str]:
    """Names of the weight MatMuls with the largest inner size: each block's feed-forward output
    projection (fc2, K = 3072 or its padded 3088), whose input is a GELU output with long tails and the
    first layer to lose accuracy in int8."""
    model = ensure_names(model)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    skip = set(front_end_nodes(model))
    weighted = [(n.name, shapes[n.input[1]]) for n in model.graph.node
                if n.op_type in WEIGHT_OPS and n.name not in skip and len(shapes.get(n.input[1], ())) == 2]
    if not weighted:
        return []
    widest = max(k for _name, (k, _n) in weighted)
    return [name for name, (k, _n) in weighted if k == widest]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger ("Please consider to run pre-processing", which
    does not apply: the graph is already optimised) and, with no handler there, would install one for the
    rest of the process: hold it at ERROR with a handler of its own while quantising."""
    root, null = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(null)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(null)
        root.setLevel(level)


def _weight_quant_type(weights: str):
    from onnxruntime.quantization import QuantType

    return {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[weights]


def write_dynamic_int8(src: Path, dst: Path, keep_fp32: list[str], weights: str = "s8") -> dict:
    from onnxruntime.quantization import quantize_dynamic

    model = ensure_names(onnx.load(str(src)))
    named = dst.with_suffix(".named.onnx")
    onnx.save(model, str(named))
    skip = set(front_end_nodes(model)) | set(keep_fp32)
    nodes = weight_matmuls(model, skip)
    try:
        with _quiet_quantizer():
            quantize_dynamic(str(named), str(dst), per_channel=True, weight_type=_weight_quant_type(weights),
                             op_types_to_quantize=list(WEIGHT_OPS), nodes_to_quantize=nodes,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        named.unlink(missing_ok=True)
    return {"tool": f"onnxruntime.quantization.quantize_dynamic (per-channel {weights} weights, MatMul/Gemm with "
                    "constant weights only)", "weights": weights, "activations": "u8",
            "quantized_nodes": len(nodes), "fp32_nodes_kept": sorted(set(keep_fp32)),
            "fp32_front_end_nodes": len(front_end_nodes(model))}


class _Reader:
    def __init__(self, windows: list[np.ndarray]):
        self.items = iter([{"audio": w} for w in windows])

    def get_next(self):
        return next(self.items, None)


def write_static_int8(src: Path, dst: Path, windows: list[np.ndarray], keep_fp32: list[str],
                      method: str = "minmax", weights: str = "s8") -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = ensure_names(onnx.load(str(src)))
    named = dst.with_suffix(".named.onnx")
    onnx.save(model, str(named))
    skip = set(front_end_nodes(model)) | set(keep_fp32)
    nodes = weight_matmuls(model, skip)
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    try:
        with _quiet_quantizer():
            quantize_static(str(named), str(dst), _Reader(windows), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=_weight_quant_type(weights),
                            op_types_to_quantize=list(WEIGHT_OPS), nodes_to_quantize=nodes, calibrate_method=calib,
                            extra_options={"MatMulConstBOnly": True, "CalibMovingAverage": method == "minmax"})
    finally:
        named.unlink(missing_ok=True)
    return {"tool": f"onnxruntime.quantization.quantize_static (QDQ, per-channel {weights} weights, u8 activations, "
                    f"{method} calibration on {len(windows)} windows of the bundled recording)",
            "weights": weights, "activations": "u8",
            "quantized_nodes": len(nodes), "fp32_nodes_kept": sorted(set(keep_fp32)),
            "fp32_front_end_nodes": len(front_end_nodes(model))}


def bf16_supported() -> tuple[bool, str]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the expected refusal, not an error log line on the user's terminal
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means no kernel
        return False, f"onnxruntime {ort.__version__} CPUExecutionProvider: {str(exc).splitlines()[0][:200]}"
    return True, "bf16 MatMul kernel present"


def optimize_bundle(
    bundle: Path,
    *,
    int8: bool = True,
    dynamic: bool = True,
    keep_fp32: list[str] | None = None,
    calibration_windows_count: int = 8,
    keep_failed: bool = False,
    quick: bool = False,
    threads: int | None = None,
    int8_weights: str = "auto",
    openvino: bool = True,
    pick: bool = True,
    timing_runs: int = 5,
    sweep_batches: tuple[int, ...] | None = (1, 4, 8, 16),
    sweep_all: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Write the CPU variants into `bundle`, gate each, record them in the manifest. Returns the summary.

    `int8_weights`: "auto" (s8 where this CPU multiplies u8 x s8 without saturation, else u8), "s8" or "u8".
    `openvino`: also gate OpenVINO fp32 / bf16 (export/engine_choice.py; skipped with the reason when
    OpenVINO is not installed). `pick`: time every variant valid here (`timing_runs` interleaved runs) and
    write the fastest as manifest["cpu_default"] (summary["cpu_default"]); then (`sweep_batches`) measure the
    winner's windows/s at those batch sizes in a fresh process (runtime/bench batch_sweep) and record the best
    as cpu_default["best_batch"], with the table in its variant entry's "throughput": the batch embed and
    the Ray workers use by default. `sweep_all`: sweep every timed variant, not only the winner (each entry's
    "throughput" then gives the batch a run of that variant, e.g. `--variant int8dyn`, uses).
    """
    say = progress or (lambda _m: None)
    weights, weights_why = int8_weight_type(int8_weights)
    bundle = Path(bundle)
    manifest = bundle_io.read_manifest(bundle)
    names = bundle_io.output_names(manifest)
    rate, window = int(manifest["sample_rate"]), float(manifest["window_seconds"])
    cases = optimize_cases(rate, window, quick=quick)
    src = bundle / "model.onnx"
    reference = ort_runner(src, names, threads)
    say(f"reference outputs of model.onnx on {len(cases)} cases")
    references = {c.name: reference(c.audio) for c in cases}

    variants = dict(bundle_io.variants(manifest))
    summary: dict = {}
    written: list[str] = []

    layout_src = bundle / ".model.layout.onnx"  # model.onnx after the layout rewrites: every variant's input
    try:
        started = time.time()
        say("layout rewrites (pad 4 KiB-aliased GEMM widths with exact zeros)")
        layout = write_layout_model(src, layout_src)
        info = {**write_cpu_model(layout_src, bundle / "model.cpu.onnx", say=say), "layout": layout}
        say("fp32 gate of model.cpu.onnx against model.onnx")
        report = compare("model.cpu.onnx", ort_runner(bundle / "model.cpu.onnx", names, threads), references, cases,
                         names)
        entry = {"precision": "fp32", "parity": report.passed, "figures": fp32_figures(report), **info,
                 "seconds": round(time.time() - started, 1)}
        summary["model.cpu.onnx"] = {**entry, "comparisons": report.to_json()["comparisons"]}
        variants["model.cpu.onnx"] = entry
        _keep_or_drop(bundle, "model.cpu.onnx", report.passed, keep_failed, written)

        plans = []
        if int8 and dynamic:
            plans.append(("model.int8dyn.onnx",
                          lambda dst, keep: write_dynamic_int8(layout_src, dst, keep, weights=weights)))
        if int8:
            windows = calibration_windows(rate, window, calibration_windows_count)
            plans.append(("model.int8.onnx",
                          lambda dst, keep: write_static_int8(layout_src, dst, windows, keep, weights=weights)))
        down_projections = None  # the fallback's fp32 nodes, found once when first needed
        for name, write in plans:
            started = time.time()
            keep, tried = list(keep_fp32 or []), []
            while True:
                kept = f", {len(keep)} nodes kept fp32" if keep else ""
                say(f"writing {name} ({weights} weights: {weights_why}{kept})")
                info = write(bundle / name, keep)
                say(f"reduced-precision gate of {name}")
                report = compare(name, ort_runner(bundle / name, names, threads), references, cases, names,
                                 token_cosine=LOWP_TOKEN_COSINE, progress=say)
                gate = reduced_figures(report)
                if report.passed or keep_fp32 or tried:  # one retry, and only without the caller's own list
                    break
                tried.append({"fp32_nodes_kept": len(keep), "figures": gate})
                say(f"{name} failed its gate; retrying with the feed-forward down-projections in fp32")
                if down_projections is None:
                    down_projections = ffn_down_projections(onnx.load(str(layout_src), load_external_data=False))
                keep = down_projections
            entry = {"precision": "int8", "parity": report.passed, "figures": gate, **info, "weights_why": weights_why,
                     "gated_on": cpu_summary(),
                     "seconds": round(time.time() - started, 1)}
            if tried:
                entry["failed_attempts"] = tried
            variants[name] = entry
            summary[name] = {**entry, "comparisons": report.to_json()["comparisons"]}
            _keep_or_drop(bundle, name, report.passed, keep_failed, written)
    finally:
        layout_src.unlink(missing_ok=True)

    ok, why = bf16_supported()
    variants["model.bf16.onnx"] = {"precision": "bf16", "parity": False, "written": False,
                                   "figures": None, "reason": why if not ok else "not attempted"}
    summary["model.bf16.onnx"] = variants["model.bf16.onnx"]
    if openvino:
        front_end = front_end_nodes(ensure_names(onnx.load(str(src), load_external_data=False)))
        engines, files = openvino_variants(
            bundle, names, cases, references, threads, say, keep_failed=keep_failed,
            int8_windows=calibration_windows(rate, window, calibration_windows_count) if int8 else None,
            front_end=front_end, window_samples=int(round(rate * window)))
        variants.update(engines)
        summary.update(engines)
        written += files

    manifest = bundle_io.read_manifest(bundle)
    for stale in ("model.cpu.onnx", "model.int8.onnx", "model.int8dyn.onnx", *int8_files()):
        if stale not in written:  # e.g. --no-int8 after an earlier run: an unlisted file would fail verify
            manifest["files"].pop(stale, None)
            (bundle / stale).unlink(missing_ok=True)
    write_json_atomic(bundle / bundle_io.MANIFEST, manifest)
    merged = {**bundle_io.variants(manifest), **variants}
    manifest = bundle_io.add_files_to_manifest(bundle, written, variants=merged,
                                               optimize={k: {kk: vv for kk, vv in v.items() if kk != "comparisons"}
                                                         for k, v in summary.items()})
    if pick:
        choice = pick_cpu_default(bundle, manifest, threads=threads, runs=timing_runs, say=say)
        summary["cpu_default"] = choice
        if sweep_batches:
            variants = bundle_io.variants(bundle_io.read_manifest(bundle))
            keys = [r["variant"] for r in choice["ranking"]] if sweep_all else [choice["variant"]]
            for key in keys:
                say(f"batch sweep of {key} (windows/s at batch {', '.join(map(str, sweep_batches))}, a fresh "
                    "process each)")
                sweep = batch_sweep(bundle, key, threads, tuple(sweep_batches), runs=3)
                if key in variants:  # every timed variant has an entry (model.onnx's is written by export)
                    variants[key] = {**variants[key], "throughput": sweep}
                if key == choice["variant"]:
                    choice.update(best_batch=sweep["best_batch"], throughput=sweep)
                    summary["throughput"] = sweep
            bundle_io.add_files_to_manifest(bundle, [], variants=variants, cpu_default=choice)
        else:
            bundle_io.add_files_to_manifest(bundle, [], cpu_default=choice)
    return summary


def _keep_or_drop(bundle: Path, name: str, passed: bool, keep_failed: bool, written: list[str]) -> None:
    if passed or keep_failed:
        written.append(name)
    else:
        (bundle / name).unlink(missing_ok=True)
