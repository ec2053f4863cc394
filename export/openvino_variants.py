"""`edgeenc optimize`, OpenVINO part: model.onnx on OpenVINO's CPU plugin in fp32, bf16 and NNCF int8, each gated.

- "openvino:fp32": model.onnx at f32, gated with the fp32 thresholds against ONNX Runtime on model.onnx
  (like model.cpu.onnx).
- "openvino:bf16": the same with INFERENCE_PRECISION_HINT bf16, reduced-precision gate; only where this CPU
  has bf16 instructions, and recorded with the CPU it was gated on.
- "openvino:int8": NNCF post-training int8 of model.onnx (an IR pair, model.openvino-int8.xml / .bin),
  calibrated on windows of the bundled recording, reduced-precision gate. The front end (every node before
  the first Conv) and the convolutions (BEATs' patch embedding, positional conv) stay fp32: with the
  convolutions in int8 the full-size BEATs fixture missed the centred-embedding gate. SmoothQuant is off: it
  folds scales into the front end's own MatMuls, which must stay exact fp32. Weights are s8, so on x86
  CPUs without VNNI the same int16 saturation as ONNX Runtime's applies and the variant is not written.
  Needs NNCF (the `openvino-int8` extra). benchmarks/README.md has the figures behind these choices.

Every entry carries the compile settings it was gated with ("compile", read by runtime/backends/
openvino_backend.py): the native window as a static shape (`static_window_samples`, the gate's batch-2 window
case runs on it, its shorter cases on the dynamic model), and for int8 the precision of the unquantised ops:
bf16 where the CPU has bf16 dot products (AMX or AVX512_BF16; on Sapphire Rapids 93 ms instead of 136 ms
per 10 s BEATs clip, benchmarks/sapphire-rapids-amx/), fp32 when bf16 there fails the gate or is absent.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edgeenc.progress import Progress
from edgeenc.runtime.backends import (
    BF16_FLAGS,
    OPENVINO_PRECISIONS,
    BackendUnavailable,
    has_bf16,
    import_openvino,
    open_cpu_backend,
    signed_int8_saturates,
)
from edgeenc.runtime.bundle import VariantKey

from .cpu_default import gated_on
from .parity import LOWP_TOKEN_COSINE, ParityCase, compare, fp32_figures, reduced_figures

INT8_XML = "model.openvino-int8.xml"
CONV_TYPES = ("Convolution", "GroupConvolution")


def int8_files(xml: str = INT8_XML) -> list[str]:
    return [xml, xml[: -len(".xml")] + ".bin"]


def write_openvino_int8(src: Path, dst: Path, windows: list[np.ndarray], front_end: list[str]) -> dict:
    """Quantise `src` (ONNX) into the IR `dst` (.xml); ImportError when NNCF is not installed."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    nncf.set_log_level(logging.WARNING)  # its INFO lines list every node it leaves alone
    model = ov.Core().read_model(str(src))
    present = {op.get_friendly_name() for op in model.get_ops()}
    convs = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in CONV_TYPES}
    ignored = sorted((set(front_end) & present) | convs)  # front-end names OpenVINO kept from the ONNX graph
    advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    quantised = nncf.quantize(model, nncf.Dataset(windows), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(windows), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                              advanced_parameters=advanced)
    ov.save_model(quantised, str(dst))
    return {"tool": f"nncf {nncf.__version__} quantize (ModelType.TRANSFORMER, SmoothQuant off, calibrated on "
                    f"{len(windows)} windows of the bundled recording), openvino {ov.__version__}",
            "weights": "s8", "activations": "u8", "fp32_nodes_kept": len(ignored), "fp32_convolutions": sorted(convs)}


def _not_written(base: dict, reason: str) -> dict:
    return {**base, "parity": False, "written": False, "figures": None, "reason": reason}


def compile_settings(precision: str, window_samples: int | None) -> list[dict]:
    """The compile settings to gate for `precision`, first choice first (the next is tried when one fails)."""
    static = {"static_window_samples": int(window_samples)} if window_samples else {}
    if precision != "int8":
        return [static]
    rests = ["bf16", "fp32"] if has_bf16() else ["fp32"]
    return [{**static, "inference_precision": rest} for rest in rests]


def openvino_variants(bundle: Path, names: list[str], cases: list[ParityCase], references: dict, threads: int | None,
                      say: Progress, *, int8_windows: list | None = None, front_end: list[str] = (),
                      keep_failed: bool = False, window_samples: int | None = None
                      ) -> tuple[dict[str, dict], list[str]]:
    """manifest["variants"] entries for OpenVINO fp32, bf16 and (given `int8_windows`) int8 of model.onnx,
    failed or skipped ones too, and the bundle files written (the int8 IR when it passed or `keep_failed`).
    `window_samples`: the native window, compiled as a static shape beside the dynamic model."""
    precisions = ("fp32", "bf16", "int8") if int8_windows else ("fp32", "bf16")
    try:
        ov = import_openvino()
    except BackendUnavailable as exc:
        return {str(VariantKey.openvino(p)): _not_written({"engine": "openvino", "precision": p}, str(exc))
                for p in precisions}, []

    entries, written = {}, []
    for precision in precisions:
        key = str(VariantKey.openvino(precision))
        base = {"engine": "openvino", "precision": precision, "source": "model.onnx",
                "tool": f"openvino {ov.__version__} CPU plugin, INFERENCE_PRECISION_HINT "
                        + (OPENVINO_PRECISIONS[precision] if precision != "int8" else "of compile.inference_precision")}
        if precision == "bf16" and not has_bf16():
            entries[key] = _not_written(base, f"this CPU has none of {', '.join(BF16_FLAGS)}")
            continue
        if precision == "int8" and signed_int8_saturates():
            entries[key] = _not_written(base, "this x86 CPU has no VNNI: NNCF writes s8 weights, whose u8 x s8 "
                                              "kernels saturate here")
            continue
        started = time.time()
        if precision == "int8":
            say(f"writing {INT8_XML} (NNCF post-training int8, {len(int8_windows)} calibration windows)")
            try:
                base.update(write_openvino_int8(bundle / "model.onnx", bundle / INT8_XML, int8_windows,
                                                list(front_end)), source=INT8_XML)
            except ImportError as exc:
                entries[key] = _not_written(base, f"NNCF is not installed ({exc}): pip install nncf")
                continue
        failed = []
        for settings in compile_settings(precision, window_samples):
            rest = settings.get("inference_precision")
            rest = f", unquantised ops in {rest}" if rest else ""
            say(f"gate of {key} (OpenVINO on {base['source']}{rest})")
            try:
                runner = open_cpu_backend(bundle / base["source"], "openvino", precision, names, threads,
                                          compile=settings)
            except BackendUnavailable as exc:  # e.g. OpenVINO would not compile the bf16 rest here: try the next
                failed.append({"compile": settings, "reason": str(exc)})
                entries[key] = {**_not_written(base, str(exc)), "failed_attempts": failed}
                continue
            if precision == "fp32":
                report = compare(key, runner.run, references, cases, names)
                figures = fp32_figures(report)
            else:
                report = compare(key, runner.run, references, cases, names, token_cosine=LOWP_TOKEN_COSINE,
                                 progress=say)
                figures = reduced_figures(report)
            runner.close()
            entries[key] = {**base, "compile": settings, "parity": report.passed, "figures": figures,
                            "gated_on": gated_on(), "seconds": round(time.time() - started, 1)}
            if failed:
                entries[key]["failed_attempts"] = list(failed)
            if report.passed:
                break
            failed.append({"compile": settings, "figures": figures})
        if key not in entries or entries[key].get("written") is False:
            continue
        if precision == "int8":
            if report.passed or keep_failed:
                written += int8_files()
            else:
                for name in int8_files():
                    (bundle / name).unlink(missing_ok=True)
    return entries, written
