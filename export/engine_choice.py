"""`edgeenc optimize`, second half: OpenVINO variants gated, then every CPU variant timed and the winner recorded.

- "openvino:fp32": OpenVINO's CPU plugin on model.onnx at f32, gated with the fp32 thresholds of
  DESIGN.md against ONNX Runtime on model.onnx (like model.cpu.onnx).
- "openvino:bf16": the same with INFERENCE_PRECISION_HINT bf16, gated with the reduced-precision gate
  (per-token cosine >= 0.99, mean-centred embedding cosine >= 0.99); only written where this CPU has
  bf16 instructions (runtime/isa.py BF16_FLAGS), and recorded with the CPU it was gated on.
- "openvino:int8": NNCF post-training int8 of model.onnx calibrated on the bundled recording, front
  end in fp32 (export/openvino_int8.py), reduced-precision gate; s8 weights, so refused on x86 CPUs
  without VNNI like the ONNX Runtime s8 files. Needs NNCF (pip install nncf); skipped with the reason
  without it.

Then every gated variant valid on this CPU (ONNX Runtime files and OpenVINO precisions) is timed in one
interleaved run (runtime/bench.py time_interleaved) on one native window of the bundled recording,
batch 1, and manifest["cpu_default"] records the ranking, fastest first, with the winner's engine,
precision, gate figures and the CPU (flags included) it was timed on. The runtime runs the first entry
of that ranking that is valid where it runs (runtime/cpu_choice.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgeenc.runtime.backend_protocol import BackendUnavailable
from edgeenc.runtime.bench import Target, bench_audio, percentiles, time_interleaved
from edgeenc.runtime.cpu_choice import OPENVINO_PREFIX, engine_of, key_problem, plan_for
from edgeenc.runtime.isa import BF16_FLAGS, cpu_flags, cpu_summary, has_bf16, signed_int8_saturates
from edgeenc.runtime.limits import ISA_FLAGS
from edgeenc.runtime.openvino_backend import PRECISIONS, OpenVinoBackend, import_openvino

from .openvino_int8 import INT8_XML, int8_files, write_openvino_int8
from .parity import LOWP_TOKEN_COSINE, ParityCase, run_reduced_gate

Progress = Callable[[str], None]


def gated_on() -> dict:
    """The CPU a variant was gated or timed on, with the ISA flags that decide what may run."""
    flags = cpu_flags() or set()
    return {**cpu_summary(), "flags": sorted(f for f in ISA_FLAGS if f in flags)}


def openvino_variants(bundle: Path, names: list[str], cases: list[ParityCase], references: dict, threads: int | None,
                      fp32_compare: Callable, gate_summary: Callable, say: Progress, *,
                      int8_windows: list | None = None, front_end: list[str] = (), keep_failed: bool = False,
                      ) -> tuple[dict[str, dict], list[str]]:
    """manifest["variants"] entries for OpenVINO fp32, bf16 and (given `int8_windows`) int8 of model.onnx,
    failed or skipped ones too, and the bundle files written (the int8 IR when it passed or `keep_failed`)."""
    precisions = ("fp32", "bf16", "int8") if int8_windows else ("fp32", "bf16")
    try:
        ov = import_openvino()
    except BackendUnavailable as exc:
        return {OPENVINO_PREFIX + p: {"engine": "openvino", "precision": p, "parity": False, "written": False,
                                      "figures": None, "reason": str(exc)} for p in precisions}, []

    def cached(audio):
        return next(references[c.name] for c in cases if c.audio is audio)

    entries, written = {}, []
    for precision in precisions:
        key = OPENVINO_PREFIX + precision
        base = {"engine": "openvino", "precision": precision, "source": "model.onnx",
                "tool": f"openvino {ov.__version__} CPU plugin, INFERENCE_PRECISION_HINT {PRECISIONS[precision]}"}
        if precision == "bf16" and not has_bf16():
            entries[key] = {**base, "parity": False, "written": False, "figures": None,
                            "reason": f"this CPU has none of {', '.join(BF16_FLAGS)}"}
            continue
        if precision == "int8" and signed_int8_saturates():
            entries[key] = {**base, "parity": False, "written": False, "figures": None,
                            "reason": "this x86 CPU has no VNNI: NNCF writes s8 weights, whose u8 x s8 kernels "
                                      "saturate here"}
            continue
        started = time.time()
        if precision == "int8":
            say(f"writing {INT8_XML} (NNCF post-training int8, {len(int8_windows)} calibration windows)")
            try:
                base.update(write_openvino_int8(bundle / "model.onnx", bundle / INT8_XML, int8_windows,
                                                list(front_end)), source=INT8_XML)
            except ImportError as exc:
                entries[key] = {**base, "parity": False, "written": False, "figures": None,
                                "reason": f"NNCF is not installed ({exc}): pip install nncf"}
                continue
        say(f"gate of {key} (OpenVINO on {base['source']})")
        try:
            runner = OpenVinoBackend(bundle / base["source"], names, precision=precision, threads=threads).run
        except BackendUnavailable as exc:
            entries[key] = {**base, "parity": False, "written": False, "figures": None, "reason": str(exc)}
            continue
        if precision == "fp32":
            figures = fp32_compare(runner, cached, cases, names)
            passed, worst = figures["passed"], figures["worst"]
        else:
            report = run_reduced_gate(key, runner, references, cases, token_cosine=LOWP_TOKEN_COSINE, progress=say)
            passed, worst = report.passed, gate_summary(report)
        entries[key] = {**base, "parity": passed, "figures": worst, "gated_on": gated_on(),
                        "seconds": round(time.time() - started, 1)}
        if precision == "int8":
            if passed or keep_failed:
                written += int8_files()
            else:
                for name in int8_files():
                    (bundle / name).unlink(missing_ok=True)
    return entries, written


def pick_cpu_default(bundle: Path, manifest: dict, *, threads: int | None, runs: int = 5, warmup: int = 1,
                     say: Progress) -> dict:
    """Time every gated variant valid here in one interleaved run; manifest["cpu_default"] for the winner."""
    from edgeenc.runtime.backends import OrtBackend

    names = [o["name"] for o in manifest["outputs"] if o["name"] in ("embedding", "logits")]
    variants = manifest.get("variants") or {}
    keys = ["model.onnx", *[k for k, v in variants.items() if k != "model.onnx" and v.get("parity")
                            and v.get("precision") != "fp16"]]
    targets, skipped = [], {}
    for key in keys:
        problem = key_problem(bundle, manifest, key)
        if problem:
            skipped[key] = problem
            continue
        plan = plan_for(key, variants.get(key, {"precision": "fp32"}))
        try:
            if plan.engine == "openvino":
                runner = OpenVinoBackend(bundle / plan.file, names, precision=plan.precision, threads=threads)
            else:
                runner = OrtBackend(bundle / plan.file, names, provider="CPUExecutionProvider", threads=threads)
        except BackendUnavailable as exc:
            skipped[key] = str(exc)
            continue
        targets.append(Target("cpu", key, plan.precision, runner, runner.description))
    audio = bench_audio(int(manifest["sample_rate"]), float(manifest["window_seconds"]), 1)
    say(f"timing {len(targets)} CPU variants ({runs} interleaved runs, batch 1, one native window)")
    times = time_interleaved(targets, audio, runs, warmup)
    for target in targets:
        target.runner.close()
    ranking = []
    for target in targets:
        stats = percentiles(times[target.variant + "@cpu"])
        ranking.append({"variant": target.variant, "engine": engine_of(target.variant), "precision": target.precision,
                        "p50_ms": round(stats["p50_ms"], 2), "min_ms": round(stats["min_ms"], 2),
                        "description": target.description})
    ranking.sort(key=lambda r: r["p50_ms"])
    best = ranking[0]
    figures = variants.get(best["variant"], {}).get("figures") if best["variant"] != "model.onnx" else None
    return {"variant": best["variant"], "engine": best["engine"], "precision": best["precision"],
            "p50_ms": best["p50_ms"], "figures": figures,
            "speedup_vs_model_onnx": round(next(r["p50_ms"] for r in ranking if r["variant"] == "model.onnx")
                                           / best["p50_ms"], 3),
            "ranking": ranking, "not_timed": skipped, "timed_on": gated_on(), "threads": threads,
            "clip_seconds": float(manifest["window_seconds"]), "batch": 1, "runs": runs}
