"""OpenVINO int8 of model.onnx: NNCF post-training quantisation calibrated on windows of the real recording.

The front end (every ONNX node before the first Conv, the fbank) is left out of quantisation, as for
the ONNX Runtime int8 files (export/optimize.py), and so are the convolutions (BEATs' patch embedding
and positional conv): on the full-size BEATs fixture with them in int8 the mean-centred embedding
cosine was 0.972 (gate 0.99), with them in fp32 0.9976 (per-token 0.99942), and keeping the
attention's activation x activation MatMuls or the fc2 layers in fp32 as well changed nothing
(0.972 without the convs, 0.9977 with them; benchmarks/investigations/openvino_int8_scope.py,
OpenVINO 2026.4.1, NNCF 3.4.0, Zen 5). NNCF's transformer preset keeps softmax / layer norms / GELU in floating point.
SmoothQuant is off: it folded scales into the fbank's own MatMuls, which must stay exact fp32, and
with it the centred embedding cosine fell to 0.885. The result is an OpenVINO IR pair
(model.openvino-int8.xml / .bin) beside model.onnx; the runtime reads it with OpenVINO only. Weights are
s8 and activations u8, so on x86 CPUs without VNNI the same int16 saturation as ONNX Runtime's applies
(runtime/isa.py refuses the variant there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

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
