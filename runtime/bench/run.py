"""`edgeenc bench`: latency, real-time factor, throughput, cold start and memory per backend and variant.

Never imports torch. Every report carries the physical limit measured in the same run (FLOPs per
clip from the graph: see `flops.py`; this machine's GEMM limits: see `gemm_limits.py`), measured
before and after the model runs (the higher one counts; other load on the machine only lowers it).

Every CPU row then shows "% of limit" = achieved FLOP/s (FLOPs per clip x clips/s) / its limit's
FLOP/s, never above 100 %: a row faster than its limit proves the limit wrong, and the report says so.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from edgeenc.progress import Progress

from ..backends import BackendUnavailable, open_cpu_variant, plan_for, select_backend
from ..bundle import Manifest, gated, output_names, read_manifest, variant_entry, variants
from .flops import count_flops
from .gemm_limits import apply_limits, limit_for, measure_limits, merge_limits
from .machine import machine_info, thread_env

# ---------------------------------------------------------------------------------------------- audio


def bench_audio(sample_rate: int, seconds: float, batch: int) -> np.ndarray:
    """`batch` clips of `seconds` of the bundled real recording (tiled at different gains)."""
    import soundfile as sf
    import soxr

    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as path:
        audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    n = int(round(seconds * sample_rate))
    reps = int(np.ceil(n * batch / len(audio))) + 1
    tiled = np.concatenate([audio * (1.0 if i % 2 == 0 else 0.5) for i in range(reps)]).astype(np.float32)
    return np.stack([tiled[i * n // 2: i * n // 2 + n] for i in range(batch)])


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Target:
    """One thing to time: a backend on one model file."""

    backend: str  # cpu, cuda, trt
    variant: str  # file name, e.g. model.cpu.onnx, or the engine
    precision: str
    runner: object = field(repr=False, default=None)
    description: str = ""
    quality: dict | None = None


def percentiles(times: list[float]) -> dict:
    arr = np.asarray(times, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(np.percentile(arr, q, method="higher")) for q in (50, 90, 99))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(arr.mean()), "min_ms": float(arr.min()),
            "runs": len(times)}


def time_interleaved(
    targets: list[Target], audio: np.ndarray, runs: int, warmup: int, gap: float = 0.05
) -> dict[str, list[float]]:
    """Warm every target, then round-robin one run each so load on the machine hits all alike.

    `gap` seconds of idle before each timed run let the previous target's worker threads stop spinning
    (ONNX Runtime's pool spins after a run), so they do not take this target's cores.
    """
    for target in targets:
        for _ in range(warmup):
            target.runner.run(audio)
    times: dict[str, list[float]] = {t.variant + "@" + t.backend: [] for t in targets}
    for _ in range(runs):
        for target in targets:
            if gap and len(targets) > 1:
                time.sleep(gap)
            start = time.perf_counter()
            target.runner.run(audio)
            times[target.variant + "@" + target.backend].append(time.perf_counter() - start)
    return times


_COLD_CODE = """
import sys, time, json, resource
t_import = time.time()
import numpy as np
from edgeenc.runtime.bench import bench_audio, load_target, peak_rss_mb
from edgeenc.runtime.bundle import read_manifest
bundle, backend, variant, threads, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
manifest = read_manifest(bundle)
audio = bench_audio(int(manifest["sample_rate"]), seconds, 1)
t_load = time.time()
target = load_target(bundle, manifest, backend, variant, threads or None)
t_loaded = time.time()
target.runner.run(audio)
t_done = time.time()
print(json.dumps({"interpreter_up": t_import, "load_start": t_load, "loaded": t_loaded, "first_done": t_done,
                  "peak_rss_mb": peak_rss_mb()}))
"""


_SWEEP_CODE = """
import sys, time, json
import numpy as np
from edgeenc.runtime.bench import bench_audio, peak_rss_mb
from edgeenc.runtime.backends import open_cpu_variant
from edgeenc.runtime.bundle import output_names, read_manifest
bundle, key, threads, runs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
manifest = read_manifest(bundle)
audio = bench_audio(int(manifest["sample_rate"]), float(manifest["window_seconds"]), batch)
runner = open_cpu_variant(bundle, manifest, key, output_names(manifest, tokens=False), threads or None)
runner.run(audio)
rss = peak_rss_mb()
times = []
for _ in range(runs):
    time.sleep(0.05)
    start = time.perf_counter()
    runner.run(audio)
    times.append(time.perf_counter() - start)
print(json.dumps({"description": runner.description, "rss": rss, "times": times}))
"""

NEAR_BEST = 0.97  # a smaller batch within 3 % of the best throughput wins: less latency, less memory


def pick_best_batch(rates: dict[int, float]) -> int:
    """The smallest batch whose windows/s is within 3 % of the highest (less latency and memory for ~nothing)."""
    top = max(rates.values())
    return min(b for b, rate in rates.items() if rate >= NEAR_BEST * top)


def batch_sweep(bundle: Path, key: str, threads: int | None, batches: tuple[int, ...] = (1, 4, 8, 16),
                runs: int = 3) -> dict:
    """Windows per second of variant `key` at each batch size, each batch size in a fresh process (its own
    compiled shapes, and its peak memory the runtime's alone, as in an `embed` run with that --batch), and the
    best batch: the smallest within 3 % of the highest rate."""
    batches = tuple(sorted(set(batches)))
    table, description = {}, None
    seconds = float(read_manifest(bundle)["window_seconds"])
    for b in batches:
        done = subprocess.run([sys.executable, "-c", _SWEEP_CODE, str(bundle), key, str(threads or 0), str(runs),
                               str(b)], capture_output=True, text=True, env=thread_env(threads), timeout=3600)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise RuntimeError(f"the batch sweep of {key} at batch {b} failed: {last[:300]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        description = out["description"]
        p50 = float(np.median(out["times"]))
        table[str(b)] = {"p50_ms": round(1000 * p50, 2), "windows_per_s": round(b / p50, 3),
                         "audio_hours_per_hour": round(b * seconds / p50, 1), "peak_rss_mb": round(out["rss"], 1)}
    best = pick_best_batch({int(b): r["windows_per_s"] for b, r in table.items()})
    return {"best_batch": best, "batches": table, "runs": runs, "threads": threads, "window_seconds": seconds,
            "description": description,
            "how": "one fresh process per batch size: the variant opened, native windows of the bundled recording "
                   f"run once (then peak RSS read), then {runs} timed runs (p50); best = the smallest batch within "
                   f"{100 - 100 * NEAR_BEST:.0f} % of the highest windows/s"}


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset at exec, unlike ru_maxrss, which Linux keeps across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cold_start(bundle: Path, backend: str, variant: str, threads: int | None, seconds: float) -> dict:
    """Process start -> first embedding, in a fresh `python -c`, timed from before the interpreter starts."""
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _COLD_CODE, str(bundle), backend, variant, str(threads or 0),
                           str(seconds)], capture_output=True, text=True, env=thread_env(threads), timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    t = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "cold_start_s": t["first_done"] - start,
        "interpreter_and_imports_s": t["load_start"] - start,
        "session_load_s": t["loaded"] - t["load_start"],
        "first_run_s": t["first_done"] - t["loaded"],
        "peak_rss_mb": t["peak_rss_mb"],
    }


# ---------------------------------------------------------------------------------------------- targets


def cpu_variants(bundle: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """(variant, precision) of model.onnx and every variant the manifest lists as passed (fp16 is GPU-only):
    ONNX Runtime files and OpenVINO precisions ("openvino:bf16")."""
    found = [("model.onnx", "fp32")]
    for name, entry in variants(manifest).items():
        if name == "model.onnx" or not gated(entry) or not (bundle / plan_for(name, entry).file).is_file():
            continue
        if entry.get("precision") == "fp16":
            continue  # ONNX Runtime CPU has no fast fp16 kernels; the fp16 variant is for GPUs
        found.append((name, entry.get("precision", "?")))
    return found


def load_target(bundle, manifest: Manifest, backend: str, variant: str, threads: int | None) -> Target:
    bundle = Path(bundle)
    names = output_names(manifest, tokens=False)
    precision = variant_entry(manifest, variant).get("precision", "fp32")
    if backend == "cpu":
        runner = open_cpu_variant(bundle, manifest, variant, names, threads)
    else:
        runner, _ = select_backend(bundle, manifest, names, backend, threads)
        variant = runner.description
    figures = variant_entry(manifest, variant).get("figures")
    return Target(backend, variant, precision, runner, runner.description, figures)


def gpu_memory_mb() -> float | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return float(done.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def run_bench(
    bundle: Path,
    *,
    device: str = "auto",
    batches: list[int] | None = None,
    seconds: float | None = None,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    cold: bool = True,
    progress: Progress | None = None,
    peers: list | None = None,
) -> dict:
    """The whole report as a dict (see `format_table` for the human view).

    `peers`: other runners timed in the same interleaved loop (the PyTorch eager peers of `--compare-torch`,
    built by the caller: this module never imports torch), each with run/close, variant, precision and
    description; every bundle row then carries its speed-up over each peer at the same batch."""
    say = progress or (lambda _m: None)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    rate = int(manifest["sample_rate"])
    seconds = float(seconds or manifest["window_seconds"])
    batches = sorted(set(batches or [1]))
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    report: dict = {"bundle": str(bundle), "model_id": manifest.get("model_id"), "clip_seconds": seconds,
                    "sample_rate": rate, "threads": threads, "runs": runs, "warmup": warmup, "batches": batches}
    say("machine info")
    report["machine"] = machine_info()
    say("counting FLOPs per clip from model.onnx")
    report["flops"] = count_flops(bundle / "model.onnx", bench_audio(rate, seconds, 1))
    flops_per_clip = report["flops"]["flops"]
    report["flops_per_clip"] = flops_per_clip
    report["gflop_per_clip"] = flops_per_clip / 1e9

    specs: list[tuple[str, str]] = []
    cpu_files = cpu_variants(bundle, manifest) if device in ("auto", "cpu") else []
    specs += [("cpu", name) for name, _ in cpu_files]
    int8_files = [name for name, precision in cpu_files if limit_for(precision) == "int8"]
    int8_weights = next((variant_entry(manifest, n)["weights"] for n in int8_files
                         if variant_entry(manifest, n).get("weights")), None)

    def limits(when: str) -> dict:
        say(f"GEMM limits ({when}): numpy and onnxruntime MatMul at {threads} threads")
        return measure_limits(threads, report["flops"]["gemm_shapes"], int8_rows=bool(int8_files),
                              int8_weights=int8_weights, compare_overrides=when == "before")

    limits_before = limits("before")
    if device in ("auto", "cuda", "trt"):
        for name in (("trt", "cuda") if device == "auto" else (device,)):
            specs.append((name, "model.onnx"))
    targets: list[Target] = []
    skipped = []
    for backend, variant in specs:
        try:
            targets.append(load_target(bundle, manifest, backend, variant, threads))
        except BackendUnavailable as exc:
            if device not in ("auto", "cpu"):
                raise
            skipped.append({"backend": backend, "variant": variant, "reason": str(exc)})
    report["skipped"] = skipped
    for peer in peers or []:
        targets.append(Target("torch", peer.variant, peer.precision, peer, peer.description))
    rows = []
    for batch in batches:
        audio = bench_audio(rate, seconds, batch)
        say(f"timing {len(targets)} targets at batch {batch} ({runs} interleaved runs)")
        times = time_interleaved(targets, audio, runs, warmup)
        for target in targets:
            stats = percentiles(times[target.variant + "@" + target.backend])
            p50 = stats["p50_ms"] / 1000.0
            rows.append({"backend": target.backend, "variant": target.variant, "precision": target.precision,
                         "description": target.description, "batch": batch, **stats,
                         "x_real_time": batch * seconds / p50, "real_time_factor": p50 / (batch * seconds),
                         "rtf": batch * seconds / p50, "clips_per_s": batch / p50,
                         "achieved_gflops": flops_per_clip * batch / p50 / 1e9, "quality": target.quality})
    for target in targets:
        target.runner.close()
    report["limits"] = merge_limits(limits_before, limits("after"))
    report["limit_problems"] = apply_limits(rows, report["limits"])
    for row in rows:
        if row["backend"] != "torch":
            row["x_vs_torch"] = {r["variant"]: r["p50_ms"] / row["p50_ms"] for r in rows
                                 if r["backend"] == "torch" and r["batch"] == row["batch"]} or None
    report["cpu_default"] = (manifest.get("cpu_default") or {}).get("variant")
    if cold:
        for target in targets:
            if target.backend == "torch":
                continue  # cold start is of a bundle's variant
            say(f"cold start {target.variant} ({target.backend})")
            variant = target.variant if target.backend == "cpu" else "model.onnx"
            figures = cold_start(bundle, target.backend, variant, threads, seconds)
            for row in rows:
                if row["variant"] == target.variant and row["backend"] == target.backend:
                    row.update({k: v for k, v in figures.items()})
    report["rows"] = rows
    report["bench_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report["gpu_memory_mb"] = gpu_memory_mb()
    report["notes"] = [
        "latency per call of the backend on a [batch, samples] array (no file I/O, no windowing)",
        "x_real_time = audio seconds per wall second at p50 (how many times faster than real time); "
        "real_time_factor = wall seconds per audio second (its inverse: below 1 keeps up); rtf is x_real_time, "
        "kept for reports written before; clips_per_s = batch / p50",
        "cold start: fresh python -c, timed from before the interpreter starts to the first output; "
        "peak_rss_mb is that process's ru_maxrss after one clip",
        "percent_of_limit = FLOPs per clip x clips/s / the row's GEMM limit (fp32, bf16, or int8 for int8 "
        "variants) at the same thread count: see limits; a row above its limit has none and is named in "
        "limit_problems",
        "torch rows (--compare-torch): PyTorch eager peers in the same interleaved loop; x_vs_torch = a peer's "
        "p50 / the row's p50 at the same batch",
    ]
    return report


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"{report['model_id']}  clip {report['clip_seconds']:g} s  threads {report['threads']}  "
        f"{report['gflop_per_clip']:.1f} GFLOP/clip",
        f"cpu: {m.get('cpu_model')}  ({m.get('cpus_available')} cpus; "
        + " ".join(k for k, v in m.get("isa", {}).items() if v) + ")",
        f"onnxruntime {m.get('onnxruntime_version') or m.get('onnxruntime-gpu_version')}  tensorrt "
        f"{m.get('tensorrt_version')}",
        *limit_lines(report["limits"]),
        "",
    ]
    header = ("backend", "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "x real time", "RTF", "clips/s",
              "GFLOP/s", "% limit", "cold s", "rss MB")
    table = [header]
    for r in report["rows"]:
        table.append((r["backend"], r["variant"], str(r["batch"]), f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['x_real_time']:.1f}", f"{r['real_time_factor']:.3f}",
                      f"{r['clips_per_s']:.2f}",
                      f"{r['achieved_gflops']:.1f}",
                      "over!" if r.get("above_limit") else f"{r['percent_of_limit']:.0f}"
                      if r.get("percent_of_limit") is not None else "-",
                      f"{r['cold_start_s']:.2f}" if "cold_start_s" in r else "-",
                      f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += torch_lines(report)
    for problem in report.get("limit_problems", []):
        lines.append(f"LIMIT WRONG: {problem}")
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['backend']}: {s['reason']}")
    return "\n".join(lines)


def limit_lines(limits: dict) -> list[str]:
    """The limits, which probe won, and the BLAS overrides found in the environment."""
    fp32, numpy = limits["fp32"], limits["fp32"]["numpy"]
    ort = fp32["onnxruntime"]
    overrides = limits.get("blas_overrides") or {}
    removed = f" with {', '.join(overrides)} removed" if overrides else ""
    with_them = (limits.get("numpy_with_overrides") or {}).get("gflops")
    numpy_note = f"numpy {numpy['gflops'] or 0:.1f}{removed}" + (f", {with_them:.1f} with them" if with_them else "")
    lines = [f"fp32 limit {fp32['gflops']:.1f} GFLOP/s, {fp32['winner']} won ({numpy_note}; onnxruntime MatMul "
             f"{ort['gflops']:.1f} on {ort['best_shape']}, shapes tried {', '.join(limits['shapes'])})"]
    for key in ("int8", "bf16"):
        entry = limits.get(key)
        if entry and entry.get("gflops"):
            kernel = f" [{entry['kernel']}]" if entry.get("kernel") else ""
            others = [f"{name} {c['gflops']:.1f}" + (f" [{c['kernel']}]" if c.get("kernel") else "")
                      for name, c in (entry.get("candidates") or {}).items()
                      if c and c.get("gflops") and not entry["winner"].startswith(name)]
            lines.append(f"{key} limit {entry['gflops']:.1f} GFLOP/s, {entry['winner']}{kernel} won"
                         + (f" (also: {'; '.join(others)})" if others else ""))
        elif entry:
            lines.append(f"{key} limit: not measured, {entry['why']}")
    lines += amx_lines(limits)
    if overrides:
        lines.append("BLAS overrides in the environment: " + " ".join(f"{k}={v}" for k, v in overrides.items())
                     + " (removed for numpy's limit; onnxruntime ignores them)")
    return lines


def torch_lines(report: dict) -> list[str]:
    """The bundle's CPU default (else its fastest CPU row) against each PyTorch peer, per batch."""
    lines = []
    for batch in report.get("batches", [1]):
        rows = [r for r in report["rows"] if r["batch"] == batch and r.get("x_vs_torch")]
        if not rows:
            continue
        default = [r for r in rows if r["variant"] == report.get("cpu_default")]
        row = default[0] if default else min(rows, key=lambda r: r["p50_ms"])
        which = "the bundle's CPU default" if default else "the fastest row"
        lines.append(f"vs PyTorch at batch {batch}: {which} {row['variant']} ({row['p50_ms']:.1f} ms) is "
                     + ", ".join(f"{x:.2f}x {name}" for name, x in row["x_vs_torch"].items()))
    return lines


def amx_lines(limits: dict) -> list[str]:
    """What the limits say about AMX: the tiles this CPU has, and which limits AMX kernels gave."""
    amx = limits.get("amx") or []
    if not amx:
        return []
    on_amx = [f"{key} ({limits[key]['kernel']})" for key in ("bf16", "int8")
              if "amx" in str((limits.get(key) or {}).get("kernel") or "").lower()]
    line = f"AMX: this CPU has {', '.join(amx)}; " + (f"limits measured on AMX kernels: {', '.join(on_amx)}"
                                                      if on_amx else "no limit's kernel names AMX")
    lines = [line]
    if (limits.get("torch_probe") or {}).get("why"):
        lines.append(f"torch probe: {limits['torch_probe']['why']} (with torch, oneDNN's matmul joins the bf16 and "
                     "int8 candidates: on Sapphire Rapids it reached twice OpenVINO's bf16 rate)")
    elif (limits.get("torch_probe") or {}).get("error"):
        lines.append(f"torch probe: {limits['torch_probe']['error']}")
    return lines


def report_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
