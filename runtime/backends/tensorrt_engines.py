"""Which TensorRT engine may run here: the rules `edgeenc build` writes by and the runtime loads by.

Engines are per GPU model, compute capability, SM count and TensorRT version; their sidecar JSON
records these. Pure Python on purpose: export/tensorrt.py (build) and tensorrt_backend.py (load) both
use it, and neither needs the other or a GPU for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .protocol import BackendUnavailable

ENGINES_DIR = "engines"


class TensorRTUnavailable(BackendUnavailable):
    """tensorrt, cuda-python or a CUDA GPU is missing, or no engine fits; the message says what to do."""


@dataclass(frozen=True)
class Profile:
    """The optimisation profile of the `audio` input: [batch, samples] min / opt / max."""

    sample_rate: int
    min_shape: tuple[int, int]
    opt_shape: tuple[int, int]
    max_shape: tuple[int, int]
    notes: tuple[str, ...] = ()
    input_name: str = "audio"

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and all(lo <= n <= hi for lo, n, hi in zip(self.min_shape, shape, self.max_shape))

    def describe(self) -> str:
        (b0, n0), (bo, no), (b1, n1) = self.min_shape, self.opt_shape, self.max_shape
        rate = self.sample_rate
        return (f"batch {b0}-{b1}, {n0 / rate:g}-{n1 / rate:g} s ({n0}-{n1} samples at {rate} Hz), "
                f"optimised for {bo} x {no / rate:g} s")

    def to_json(self) -> dict:
        seconds = {k: s[1] / self.sample_rate for k, s in
                   (("min", self.min_shape), ("opt", self.opt_shape), ("max", self.max_shape))}
        return {"input": self.input_name, "sample_rate": self.sample_rate, "min": list(self.min_shape),
                "opt": list(self.opt_shape), "max": list(self.max_shape), "seconds": seconds,
                "notes": list(self.notes)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def device_key(gpu_name: str, compute_capability: str, trt_version: str) -> str:
    """What an engine or a timing cache is valid for, as a file-name fragment."""
    return f"{_slug(gpu_name)}.sm{compute_capability.replace('.', '')}.trt{trt_version}"


def engine_file_name(precision: str, gpu_name: str, compute_capability: str, trt_version: str) -> str:
    return f"model.{precision}.{device_key(gpu_name, compute_capability, trt_version)}.engine"


def rebuild_command(bundle: Path, sidecar: dict | None = None) -> str:
    command = f"edgeenc build {bundle}"
    if sidecar:
        command += f" --precision {sidecar.get('precision', 'fp16')}"
        profile = sidecar.get("profile") or {}
        if profile.get("max"):
            command += f" --max-batch {profile['max'][0]} --max-seconds {profile['seconds']['max']:g}"
    return command


def sidecar_matches(
    sidecar: dict, gpu_name: str, compute_capability: str, trt_version: str, *, multiprocessors: int | None = None
) -> tuple[bool, str]:
    """Whether the engine described by `sidecar` may run on this GPU and TensorRT, and why (not)."""
    gpu = sidecar.get("gpu", {})
    built = sidecar.get("tensorrt_version")
    if built != trt_version:
        return False, f"built with TensorRT {built}, this machine has TensorRT {trt_version}"
    if gpu.get("compute_capability") != compute_capability:
        return False, (f"built for compute capability {gpu.get('compute_capability')}, this {gpu_name} is "
                       f"{compute_capability}")
    if gpu.get("name") != gpu_name:
        return False, f"built on a {gpu.get('name')}, this GPU is a {gpu_name}"
    # Every Jetson Orin module reports "Orin" at sm_87; the SM count tells Nano, NX and AGX apart.
    built_sms = gpu.get("multiprocessors")
    if multiprocessors is not None and built_sms is not None and built_sms != multiprocessors:
        return False, f"built on a {gpu_name} with {built_sms} SMs, this one has {multiprocessors}"
    if not (sidecar.get("parity") or {}).get("passed", False):
        return False, "it failed its parity gate when it was built"
    return True, f"built for this {gpu_name} (compute capability {compute_capability}) and TensorRT {trt_version}"


def refusal_message(bundle: Path, reasons: list[str], machine: str, sidecar: dict | None = None) -> str:
    """Why no engine of `bundle` runs on `machine`, with the command that builds one that does."""
    found = "; ".join(reasons) if reasons else f"there is no engine in {Path(bundle) / ENGINES_DIR}"
    return (f"no TensorRT engine of {bundle} fits this machine ({machine}): {found}. An engine is valid only for "
            f"the GPU and TensorRT version that built it: build one here with `{rebuild_command(bundle, sidecar)}`")


def engine_sidecars(bundle: Path) -> list[tuple[Path, dict]]:
    """(engine path, sidecar) for every readable sidecar in BUNDLE/engines."""
    found = []
    for path in sorted((Path(bundle) / ENGINES_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # An engine is named by its file name beside the sidecar, never by a path elsewhere.
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, str) and engine not in ("", ".", "..") and Path(engine).name == engine:
            found.append((path.parent / engine, data))
    return found


def select_engine(bundle: Path, manifest: dict, gpu: dict, trt_version: str) -> tuple[Path, dict]:
    """The engine to run here (fp16 before fp32, newest first), or TensorRTUnavailable with every reason."""
    reasons, usable = [], []
    files = manifest.get("files", {})
    for engine, sidecar in engine_sidecars(bundle):
        ok, why = sidecar_matches(sidecar, gpu["name"], gpu["compute_capability"], trt_version,
                                  multiprocessors=gpu.get("multiprocessors"))
        source = files.get(sidecar.get("source_onnx", ""), {})
        if ok and source and source.get("sha256") != sidecar.get("source_onnx_sha256"):
            ok, why = False, f"built from an earlier export of {sidecar['source_onnx']}"
        elif ok and (not engine.is_file() or engine.stat().st_size != sidecar.get("engine_bytes")):
            ok, why = False, "the engine file is missing or differs from its sidecar"
        if ok:
            usable.append((engine, sidecar))
        else:
            reasons.append(f"{engine.name}: {why}")
    if not usable:
        machine = f"{gpu['name']}, compute capability {gpu['compute_capability']}, TensorRT {trt_version}"
        newest = max((sc for _, sc in engine_sidecars(bundle)), key=lambda sc: sc.get("built_at", ""), default=None)
        raise TensorRTUnavailable(refusal_message(bundle, reasons, machine, newest))
    fp16 = [item for item in usable if item[1].get("precision") == "fp16"]
    return max(fp16 or usable, key=lambda item: item[1].get("built_at", ""))
