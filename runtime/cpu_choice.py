"""Which engine and variant runs a bundle on this CPU: asked for, the bundle's timed default, or a fallback.

Every CPU variant is a manifest["variants"] entry that passed its gate: ONNX Runtime files keyed by file
name (model.onnx, model.cpu.onnx, model.int8dyn.onnx, model.int8.onnx) and OpenVINO precisions of
model.onnx keyed "openvino:fp32" / "openvino:bf16" (entry "engine": "openvino", "source": the file).
`edgeenc optimize` times every variant valid on its CPU and writes manifest["cpu_default"] with the
ranking, fastest first. Here the first entry of that ranking that can run on *this* CPU wins (a bundle
copied to a CPU without bf16, or to an x86 CPU without VNNI for s8 weights, or without OpenVINO
installed, falls back to the next), and the notes say so. No torch, no onnxruntime, no OpenVINO import
unless an OpenVINO variant is considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .backend_protocol import BackendUnavailable
from .isa import cpu_summary, variant_problem
from .openvino_backend import import_openvino

ENGINES = ("onnxruntime", "openvino")
OPENVINO_PREFIX = "openvino:"


@dataclass
class CpuPlan:
    engine: str  # "onnxruntime" or "openvino"
    key: str  # the manifest["variants"] key
    file: str  # the ONNX file the engine reads
    precision: str
    notes: list[str] = field(default_factory=list)


def engine_of(key: str, entry: dict | None = None) -> str:
    return (entry or {}).get("engine") or ("openvino" if key.startswith(OPENVINO_PREFIX) else "onnxruntime")


def plan_for(key: str, entry: dict) -> CpuPlan:
    engine = engine_of(key, entry)
    file = entry.get("source", "model.onnx") if engine == "openvino" else key
    return CpuPlan(engine, key, file, entry.get("precision", "fp32"))


def openvino_available() -> bool:
    try:
        import_openvino()
    except BackendUnavailable:
        return False
    return True


def key_problem(bundle: Path, manifest: dict, key: str) -> str | None:
    """Why variant `key` cannot run here (not gated, file missing, engine or CPU feature missing), or None."""
    if key == "model.onnx":
        return None if (bundle / key).is_file() else f"{bundle / key} is missing"
    entry = (manifest.get("variants") or {}).get(key)
    if not entry:
        return f"{key} is not in this bundle"
    if not entry.get("parity"):
        return f"{key} did not pass its quality gate"
    plan = plan_for(key, entry)
    if not (bundle / plan.file).is_file():
        return f"{plan.file} is not in this bundle"
    if plan.engine == "openvino" and not openvino_available():
        return "OpenVINO is not installed (pip install 'edgeenc[openvino]')"
    return variant_problem(key, entry, bundle)


def cpu_model(bundle: Path, manifest: dict, variant: str | None = None) -> Path:
    """The ONNX file for ONNX Runtime: `variant` (e.g. "int8dyn" -> model.int8dyn.onnx) when asked for,
    else model.cpu.onnx (ONNX Runtime-optimised fp32) when it passed, else model.onnx.

    Only variants that passed their quality gate at export/optimize time are offered.
    """
    variants = manifest.get("variants") or {}
    if variant:
        name = "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"
        entry = variants.get(name)
        offered = sorted(k[len("model.") : -len(".onnx")] for k, v in variants.items()
                         if v.get("parity") and k.startswith("model.") and k != "model.onnx"
                         and (bundle / k).is_file())
        if name != "model.onnx" and (not entry or not entry.get("parity") or not (bundle / name).is_file()):
            why = "did not pass its quality gate" if entry and not entry.get("parity") else "is not in this bundle"
            raise BackendUnavailable(
                f"variant {variant!r} ({name}) {why}; offered: fp32{''.join(', ' + v for v in offered)} "
                f"(`edgeenc optimize {bundle}` writes the CPU variants)"
            )
        problem = variant_problem(name, entry, bundle) if entry else None
        if problem:
            raise BackendUnavailable(problem)
        return bundle / name
    entry = variants.get("model.cpu.onnx")
    if entry and entry.get("parity") and (bundle / "model.cpu.onnx").is_file():
        return bundle / "model.cpu.onnx"
    return bundle / "model.onnx"


def _openvino_plan(bundle: Path, manifest: dict, variant: str) -> CpuPlan:
    key = OPENVINO_PREFIX + variant
    problem = key_problem(bundle, manifest, key)
    if problem:
        offered = [k[len(OPENVINO_PREFIX):] for k in manifest.get("variants") or {}
                   if k.startswith(OPENVINO_PREFIX) and key_problem(bundle, manifest, k) is None]
        raise BackendUnavailable(f"OpenVINO variant {variant!r}: {problem}; offered here: "
                                 f"{', '.join(offered) or 'none'} (`edgeenc optimize {bundle}` gates them)")
    return plan_for(key, manifest["variants"][key])


def default_plan(bundle: Path, manifest: dict, engine: str | None = None) -> CpuPlan:
    """The first variant of the bundle's timed ranking (of `engine`'s, when given) that runs on this CPU.

    Without a ranking (or none of it valid here): ONNX Runtime's model.cpu.onnx / model.onnx as before
    `optimize` timed anything, or OpenVINO fp32 when OpenVINO was asked for.
    """
    choice = manifest.get("cpu_default") or {}
    ranking = [r["variant"] for r in choice.get("ranking", []) if engine in (None, engine_of(r["variant"]))]
    variants = manifest.get("variants") or {}
    timed_on = (choice.get("timed_on") or {}).get("cpu_model") or "another CPU"
    skipped = []
    for key in ranking:
        problem = key_problem(bundle, manifest, key)
        if problem:
            skipped.append(f"{key}: {problem}")
            continue
        plan = plan_for(key, variants.get(key, {"precision": "fp32"}))
        if skipped:
            plan.notes.append(f"the bundle's CPU default {ranking[0]} (timed on {timed_on}) cannot run here ("
                              + "; ".join(skipped) + f"); falling back to {key}, the fastest of the timed "
                              f"variants valid on this CPU (`edgeenc optimize {bundle}` re-times them here)")
        elif cpu_summary().get("cpu_model") != (choice.get("timed_on") or {}).get("cpu_model"):
            plan.notes.append(f"CPU default {key} was timed on {timed_on}, not this CPU "
                              f"(`edgeenc optimize {bundle}` re-times the variants here)")
        return plan
    if engine == "openvino":
        plan = _openvino_plan(bundle, manifest, "fp32")
    else:
        name = cpu_model(bundle, manifest).name
        plan = CpuPlan("onnxruntime", name, name, variants.get(name, {}).get("precision", "fp32"))
    if skipped:
        plan.notes.append(f"no variant of the bundle's CPU ranking runs here ({'; '.join(skipped)}); using {plan.key}")
    return plan


def plan_cpu(bundle: Path, manifest: dict, engine: str | None = None, variant: str | None = None) -> CpuPlan:
    """What runs on the CPU: `engine` / `variant` when given (never a silent substitute), else the default."""
    bundle = Path(bundle)
    if engine not in (None, *ENGINES):
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if variant and variant.startswith(OPENVINO_PREFIX):
        engine, variant = "openvino", variant[len(OPENVINO_PREFIX):]
    if not variant:
        return default_plan(bundle, manifest, engine)
    variants = manifest.get("variants") or {}
    ort_file = "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"
    if engine is None and not (variants.get(ort_file) or {}).get("parity") and OPENVINO_PREFIX + variant in variants:
        engine = "openvino"  # e.g. --variant bf16: ONNX Runtime has none, OpenVINO does
    if engine == "openvino":
        return _openvino_plan(bundle, manifest, variant)
    path = cpu_model(bundle, manifest, variant)
    entry = (manifest.get("variants") or {}).get(path.name, {})
    return CpuPlan("onnxruntime", path.name, path.name, entry.get("precision", "fp32"))
