"""`--device auto` with honest fallback: which backend runs a bundle here, and why the others did not.

Order for auto: a TensorRT engine built for this GPU and TensorRT version, then ONNX Runtime CUDA, then the
CPU (ONNX Runtime or OpenVINO, as cpu_plan.py decides). Every skipped backend is logged with the reason; an
explicitly requested device never falls back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..bundle import Manifest, VariantKey, variant_entry
from .cpu_plan import check_cpu_engine, key_problem, plan_cpu, plan_for
from .onnxruntime_backend import cuda_backend, onnx_cpu_backend
from .protocol import Backend, BackendUnavailable
from .tensorrt_backend import TensorRTBackend

log = logging.getLogger("edgeenc.runtime")

DEVICES = ("auto", "trt", "cuda", "cpu")


def select_backend(
    bundle: Path,
    manifest: Manifest,
    output_names: list[str],
    device: str = "auto",
    threads: int | None = None,
    variant: str | None = None,
    skipped: list[BackendUnavailable] | None = None,
    cpu_engine: str | None = None,
) -> tuple[Backend, list[str]]:
    """The backend to run and a log of why others were skipped. Explicit devices never fall back.

    `skipped`, when given, receives the exception of every backend that `auto` skipped (see `brief_log`).
    On the CPU, `cpu_engine` ("onnxruntime" or "openvino") and `variant` pick what runs; without them the
    bundle's timed CPU default (cpu_plan.py) does.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    check_cpu_engine(cpu_engine)
    bundle = Path(bundle)
    threads = check_threads(threads) or _default_threads()
    notes: list[str] = []
    attempts = {
        "trt": lambda: TensorRTBackend.from_bundle(bundle, manifest, output_names),
        "cuda": lambda: cuda_backend(bundle, output_names),
        "cpu": lambda: _planned_cpu_backend(bundle, manifest, output_names, threads, cpu_engine, variant, notes),
    }
    order = ["trt", "cuda", "cpu"] if device == "auto" else [device]
    if (variant and variant != "fp32") or cpu_engine:
        # CPU variants and engines are CPU choices; GPU engines carry their own precision.
        if device not in ("auto", "cpu"):
            what = f"CPU engine {cpu_engine!r}" if cpu_engine else f"variant {variant!r}"
            raise BackendUnavailable(f"{what} runs on --device cpu only")
        order = ["cpu"]
    for name in order:
        try:
            backend = attempts[name]()
        except BackendUnavailable as exc:
            if device != "auto":
                raise
            notes.append(f"skipped {name}: {exc}")
            if skipped is not None:
                skipped.append(exc)
            log.info("skipped %s: %s", name, exc)
            continue
        notes.append(f"running on {backend.name}: {backend.description}")
        log.info("running on %s: %s", backend.name, backend.description)
        return backend, notes
    raise BackendUnavailable("no backend could run this bundle:\n  " + "\n  ".join(notes))


def open_cpu_variant(bundle: Path, manifest: Manifest, key: str | VariantKey, output_names: list[str],
                     threads: int | None) -> Backend:
    """The CPU backend of one gated variant (an ONNX Runtime file or an OpenVINO precision), or
    BackendUnavailable saying why it cannot run here; what `bench` and `optimize` time."""
    check_threads(threads)
    problem = key_problem(Path(bundle), manifest, key)
    if problem:
        raise BackendUnavailable(problem)
    plan = plan_for(key, variant_entry(manifest, key) or {"precision": "fp32"})
    return open_cpu_backend(Path(bundle) / plan.file, plan.engine, plan.precision, output_names, threads,
                            compile=plan.compile)


def _planned_cpu_backend(bundle: Path, manifest: Manifest, output_names: list[str], threads: int | None,
                         cpu_engine: str | None, variant: str | None, notes: list[str]) -> Backend:
    """The CPU backend of `plan_cpu`'s choice; its notes (a fallback, a default timed elsewhere) go to `notes`."""
    plan = plan_cpu(bundle, manifest, cpu_engine, variant)
    for line in plan.notes:  # the caller says them (Encoder.backend_log); a warning here would say them twice
        notes.append(line)
        log.info("%s", line)
    backend = open_cpu_backend(bundle / plan.file, plan.engine, plan.precision, output_names, threads,
                               compile=plan.compile)
    backend.best_batch = best_batch(manifest, plan.key)
    return backend


def best_batch(manifest: Manifest, key: str) -> int | None:
    """The batch size `optimize` measured fastest for variant `key` (its entry's "throughput", or the CPU default's
    for model.onnx, which has no entry of its own), or None where none was measured."""
    entry = variant_entry(manifest, key)
    sweep = entry.get("throughput") or {}
    if not sweep and (manifest.get("cpu_default") or {}).get("variant") == key:
        sweep = manifest["cpu_default"].get("throughput") or {}
    batch = sweep.get("best_batch")
    return int(batch) if isinstance(batch, int) and batch >= 1 else None


def open_cpu_backend(path: Path, engine: str, precision: str, output_names: list[str], threads: int | None,
                     *, compile: dict | None = None) -> Backend:
    """`engine` ("onnxruntime" or "openvino") running the ONNX (or OpenVINO IR) file `path` at `precision`, with
    a variant's OpenVINO compile settings (`compile`, see openvino_backend.py)."""
    if engine == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(path, output_names, precision=precision, threads=threads, compile=compile)
    return onnx_cpu_backend(path, output_names, threads)


def brief_log(notes: list[str], skipped: list[BackendUnavailable]) -> list[str]:
    """`notes` of `select_backend`, or, where `auto` fell back only past GPU software that is not installed
    (a laptop, a CPU server), without the "skipped" lines: those reasons are then noise to say only when
    asked (`-v`). What the CPU choice said (a fallback from the bundle's default) is always kept."""
    if skipped and all(exc.not_installed for exc in skipped):
        kept = [n for n in notes[:-1] if not n.startswith("skipped ")]
        return [*kept, f"{notes[-1]} (no GPU backend installed; -v for why)"]
    return notes


THREADS_PER_CPU = 8  # more CPU threads than this per core only thrash (and ten thousand hang ONNX Runtime)


def check_threads(threads: int | None, what: str = "--threads") -> int | None:
    """`threads` when it is a sensible thread count for this machine, else ValueError naming `what`."""
    if threads is None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 1 <= threads <= THREADS_PER_CPU * cpus:
        raise ValueError(f"{what} must be between 1 and {THREADS_PER_CPU * cpus} ({THREADS_PER_CPU} per CPU this "
                         f"process may use, {cpus}), got {threads}")
    return threads


def _default_threads() -> int | None:
    value = os.environ.get("EDGEENC_THREADS")
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"EDGEENC_THREADS must be a whole number of threads, got {value!r}") from None
    return check_threads(threads, "EDGEENC_THREADS")
