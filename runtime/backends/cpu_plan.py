"""Which engine and variant runs a bundle on this CPU: asked for, the bundle's timed default, or a fallback.

Every CPU variant is a manifest["variants"] entry that passed its gate (bundle.VariantKey names them: ONNX
Runtime files such as model.int8dyn.onnx, OpenVINO precisions of model.onnx such as openvino:bf16).
`edgeenc optimize` times every variant valid on its CPU and writes manifest["cpu_default"] with the
ranking, fastest first. Here the first entry of that ranking that can run on *this* CPU wins (a bundle
copied to a CPU without bf16, or to an x86 CPU without VNNI for s8 weights, or without OpenVINO
installed, falls back to the next), and the notes say so. Nothing here imports onnxruntime, and OpenVINO
only when an OpenVINO variant is considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import ENGINES, Manifest, VariantKey, gated, variant_entry, variants
from .isa import cpu_summary, variant_problem
from .openvino_backend import openvino_available
from .protocol import BackendUnavailable

CPU_ENGINES = ENGINES


@dataclass
class CpuPlan:
    engine: str  # "onnxruntime" or "openvino"
    key: str  # the manifest["variants"] key
    file: str  # the bundle file the engine reads
    precision: str
    notes: list[str] = field(default_factory=list)
    compile: dict = field(default_factory=dict)  # the entry's engine settings (openvino_backend.py), as gated


def check_cpu_engine(cpu_engine: str | None) -> None:
    if cpu_engine not in (None, *CPU_ENGINES):
        raise ValueError(f"unknown engine {cpu_engine!r} for the CPU (--cpu-engine); choose one of "
                         f"{', '.join(CPU_ENGINES)}")


def plan_for(key: str | VariantKey, entry: dict) -> CpuPlan:
    parsed = VariantKey.parse(key)
    return CpuPlan(parsed.engine, str(parsed), parsed.file(entry), entry.get("precision", "fp32"),
                   compile=dict(entry.get("compile") or {}))


def key_problem(bundle: Path, manifest: Manifest, key: str | VariantKey) -> str | None:
    """Why variant `key` cannot run here (not gated, file missing, engine or CPU feature missing), or None."""
    key = str(key)
    if key == "model.onnx":
        return None if (bundle / key).is_file() else f"{bundle / key} is missing"
    entry = variant_entry(manifest, key)
    if not entry:
        return f"{key} is not in this bundle"
    if not gated(entry):
        return f"{key} did not pass its quality gate"
    plan = plan_for(key, entry)
    if not (bundle / plan.file).is_file():
        return f"{plan.file} is not in this bundle"
    if plan.engine == "openvino" and not openvino_available():
        return "OpenVINO is not installed (pip install 'edgeenc[openvino]')"
    return variant_problem(key, entry, bundle)


def cpu_model(bundle: Path, manifest: Manifest, variant: str | None = None) -> Path:
    """The ONNX file for ONNX Runtime: `variant` (e.g. "int8dyn" -> model.int8dyn.onnx) when asked for,
    else model.cpu.onnx (ONNX Runtime-optimised fp32) when it passed, else model.onnx.

    Only variants that passed their quality gate at export/optimize time are offered.
    """
    if variant:
        name = VariantKey.onnxruntime(variant).name
        entry = variant_entry(manifest, name)
        offered = sorted(VariantKey.parse(k).short for k, v in variants(manifest).items()
                         if gated(v) and k.startswith("model.") and k != "model.onnx" and (bundle / k).is_file())
        if name != "model.onnx" and (not gated(entry) or not (bundle / name).is_file()):
            why = "did not pass its quality gate" if entry and not gated(entry) else "is not in this bundle"
            raise BackendUnavailable(
                f"variant {variant!r} ({name}) {why}; offered: fp32{''.join(', ' + v for v in offered)} "
                f"(`edgeenc optimize {bundle}` writes the CPU variants)"
            )
        problem = variant_problem(name, entry, bundle) if entry else None
        if problem:
            raise BackendUnavailable(problem)
        return bundle / name
    if gated(variant_entry(manifest, "model.cpu.onnx")) and (bundle / "model.cpu.onnx").is_file():
        return bundle / "model.cpu.onnx"
    return bundle / "model.onnx"


def _openvino_plan(bundle: Path, manifest: Manifest, variant: str) -> CpuPlan:
    key = VariantKey.openvino(variant)
    problem = key_problem(bundle, manifest, key)
    if problem:
        offered = [VariantKey.parse(k).name for k in variants(manifest)
                   if VariantKey.parse(k).engine == "openvino" and key_problem(bundle, manifest, k) is None]
        raise BackendUnavailable(f"OpenVINO variant {variant!r}: {problem}; offered here: "
                                 f"{', '.join(offered) or 'none'} (`edgeenc optimize {bundle}` gates them)")
    return plan_for(key, variant_entry(manifest, key))


def default_plan(bundle: Path, manifest: Manifest, cpu_engine: str | None = None) -> CpuPlan:
    """The first variant of the bundle's timed ranking (of `cpu_engine`'s, when given) that runs on this CPU.

    Without a ranking (or none of it valid here): ONNX Runtime's model.cpu.onnx / model.onnx as before
    `optimize` timed anything, or OpenVINO fp32 when OpenVINO was asked for.
    """
    choice = manifest.get("cpu_default") or {}
    ranking = [r["variant"] for r in choice.get("ranking", [])
               if cpu_engine in (None, VariantKey.parse(r["variant"]).engine)]
    timed_on = (choice.get("timed_on") or {}).get("cpu_model") or "another CPU"
    skipped = []
    for key in ranking:
        problem = key_problem(bundle, manifest, key)
        if problem:
            skipped.append(f"{key}: {problem}")
            continue
        plan = plan_for(key, variant_entry(manifest, key) or {"precision": "fp32"})
        if skipped:
            plan.notes.append(f"the bundle's CPU default {ranking[0]} (timed on {timed_on}) cannot run here ("
                              + "; ".join(skipped) + f"); falling back to {key}, the fastest of the timed "
                              f"variants valid on this CPU (`edgeenc optimize {bundle}` re-times them here)")
        elif cpu_summary().get("cpu_model") != (choice.get("timed_on") or {}).get("cpu_model"):
            plan.notes.append(f"CPU default {key} was timed on {timed_on}, not this CPU "
                              f"(`edgeenc optimize {bundle}` re-times the variants here)")
        return plan
    if cpu_engine == "openvino":
        plan = _openvino_plan(bundle, manifest, "fp32")
    else:
        name = cpu_model(bundle, manifest).name
        plan = CpuPlan("onnxruntime", name, name, variant_entry(manifest, name).get("precision", "fp32"))
    if skipped:
        plan.notes.append(f"no variant of the bundle's CPU ranking runs here ({'; '.join(skipped)}); using {plan.key}")
    return plan


def plan_cpu(bundle: Path, manifest: Manifest, cpu_engine: str | None = None, variant: str | None = None) -> CpuPlan:
    """What runs on the CPU: `cpu_engine` / `variant` when given (never a silent substitute), else the default."""
    bundle = Path(bundle)
    check_cpu_engine(cpu_engine)
    if variant and VariantKey.parse(variant).engine == "openvino":
        cpu_engine, variant = "openvino", VariantKey.parse(variant).name
    if not variant:
        return default_plan(bundle, manifest, cpu_engine)
    ort_key = VariantKey.onnxruntime(variant)
    if (cpu_engine is None and not gated(variant_entry(manifest, ort_key))
            and str(VariantKey.openvino(variant)) in variants(manifest)):
        cpu_engine = "openvino"  # e.g. --variant bf16: ONNX Runtime has none, OpenVINO does
    if cpu_engine == "openvino":
        return _openvino_plan(bundle, manifest, variant)
    path = cpu_model(bundle, manifest, variant)
    return CpuPlan("onnxruntime", path.name, path.name, variant_entry(manifest, path.name).get("precision", "fp32"))
