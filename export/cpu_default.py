"""`edgeenc optimize`, last step: every gated CPU variant valid here timed in one interleaved run; the fastest
becomes the bundle's CPU default.

The variants (ONNX Runtime files and OpenVINO precisions) are timed with bench's interleaved loop on one
native window of the bundled recording, batch 1; manifest["cpu_default"] records the ranking, fastest
first, with the winner's engine, precision, gate figures and the CPU (flags included) it was timed on.
The runtime runs the first entry of that ranking that is valid where it runs (backends/cpu_plan.py).
"""

from __future__ import annotations

from pathlib import Path

from edgeenc.progress import Progress
from edgeenc.runtime.backends import ISA_FLAGS, BackendUnavailable, cpu_flags, cpu_summary, open_cpu_variant
from edgeenc.runtime.bench import Target, bench_audio, percentiles, time_interleaved
from edgeenc.runtime.bundle import Manifest, VariantKey, gated, output_names, variant_entry, variants


def gated_on() -> dict:
    """The CPU a variant was gated or timed on, with the ISA flags that decide what may run."""
    flags = cpu_flags() or set()
    return {**cpu_summary(), "flags": sorted(f for f in ISA_FLAGS if f in flags)}


def pick_cpu_default(bundle: Path, manifest: Manifest, *, threads: int | None, runs: int = 5, warmup: int = 1,
                     say: Progress) -> dict:
    """Time every gated variant valid here in one interleaved run; manifest["cpu_default"] for the winner."""
    names = output_names(manifest, tokens=False)
    keys = ["model.onnx", *[k for k, v in variants(manifest).items() if k != "model.onnx" and gated(v)
                            and v.get("precision") != "fp16"]]
    targets, skipped = [], {}
    for key in keys:
        try:
            runner = open_cpu_variant(bundle, manifest, key, names, threads)
        except BackendUnavailable as exc:
            skipped[key] = str(exc)
            continue
        precision = variant_entry(manifest, key).get("precision", "fp32")
        targets.append(Target("cpu", key, precision, runner, runner.description))
    audio = bench_audio(int(manifest["sample_rate"]), float(manifest["window_seconds"]), 1)
    say(f"timing {len(targets)} CPU variants ({runs} interleaved runs, batch 1, one native window)")
    times = time_interleaved(targets, audio, runs, warmup)
    for target in targets:
        target.runner.close()
    ranking = []
    for target in targets:
        stats = percentiles(times[target.variant + "@cpu"])
        ranking.append({"variant": target.variant, "engine": VariantKey.parse(target.variant).engine,
                        "precision": target.precision, "p50_ms": round(stats["p50_ms"], 2),
                        "min_ms": round(stats["min_ms"], 2), "description": target.description})
    ranking.sort(key=lambda r: r["p50_ms"])
    best = ranking[0]
    figures = variant_entry(manifest, best["variant"]).get("figures") if best["variant"] != "model.onnx" else None
    return {"variant": best["variant"], "engine": best["engine"], "precision": best["precision"],
            "p50_ms": best["p50_ms"], "figures": figures,
            "speedup_vs_model_onnx": round(next(r["p50_ms"] for r in ranking if r["variant"] == "model.onnx")
                                           / best["p50_ms"], 3),
            "ranking": ranking, "not_timed": skipped, "timed_on": gated_on(), "threads": threads,
            "clip_seconds": float(manifest["window_seconds"]), "batch": 1, "runs": runs}
