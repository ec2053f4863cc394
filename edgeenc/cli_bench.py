"""`edgeenc bench` (torch-free) and `edgeenc optimize` (export side: ONNX Runtime CPU variants)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeenc.cli_common import ExitStatus, fail, failing_on, note, require


def bench(
    bundle: Path = typer.Argument(..., help="a bundle folder written by `edgeenc export`"),
    device: str = typer.Option("auto", help="auto (every backend that runs here), cpu, cuda or trt"),
    batch: list[int] = typer.Option([1], "--batch", help="batch size; repeat for several"),
    seconds: float | None = typer.Option(None, help="clip length in seconds (default: the model's window)"),
    runs: int = typer.Option(10, help="timed runs per backend, variant and batch (interleaved)"),
    warmup: int = typer.Option(2, help="untimed runs first"),
    threads: int | None = typer.Option(None, help="CPU threads (default: the CPUs this process may use)"),
    cold: bool = typer.Option(True, "--cold/--no-cold", help="measure cold start in a fresh process"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the full report as JSON here"),
    compare_torch: bool = typer.Option(False, "--compare-torch", help="also time PyTorch eager (fp32, bf16 "
                                       "autocast, bf16 weights) in the same loop; needs torch (edgeenc[export])"),
    checkpoint: Path | None = typer.Option(None, help="--compare-torch: the weights file (default: the checkpoint "
                                                      "the bundle was exported from)"),
) -> None:
    """Latency p50/p90/p99, real-time factor, throughput, cold start, memory and % of the GEMM limit.

    The limits are measured in the same run, per precision, with the fastest kernels found here: fp32 the
    best of numpy (BLAS overrides such as OPENBLAS_CORETYPE removed), ONNX Runtime's and OpenVINO's MatMul;
    bf16 and int8 also torch's oneDNN matmul where torch is installed (AMX tiles where the CPU has them).
    """
    from edgeenc.runtime.backends import BackendUnavailable
    from edgeenc.runtime.bench import format_table, report_json, run_bench
    from edgeenc.runtime.bundle import BundleError, read_manifest

    if any(b < 1 for b in batch) or runs < 1 or warmup < 0:
        fail("--batch and --runs must be >= 1, --warmup >= 0")
    peers = None
    if compare_torch:
        require("bench --compare-torch", "torch", extra="export")
        from edgeenc.export.torch_peer import PeerUnavailable, peer_checkpoint, torch_peers
        from edgeenc.models.checkpoints import CheckpointError, CheckpointUnavailable

        with failing_on(BundleError, PeerUnavailable, CheckpointError, CheckpointUnavailable, ValueError):
            manifest = read_manifest(bundle)
            note("loading the PyTorch peers")
            peers = torch_peers(manifest["model_id"], peer_checkpoint(manifest, checkpoint, bundle), threads)
    elif checkpoint is not None:
        fail("--checkpoint is for --compare-torch")
    with failing_on(BundleError, BackendUnavailable, ValueError):
        report = run_bench(bundle, device=device, batches=batch, seconds=seconds, runs=runs, warmup=warmup,
                           threads=threads, cold=cold, progress=note, peers=peers)
    typer.echo(format_table(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report_json(report) + "\n")
        note(f"wrote {json_out}")


def optimize(
    bundle: Path = typer.Argument(..., help="a bundle folder written by `edgeenc export`"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also write and gate int8 variants"),
    dynamic: bool = typer.Option(True, "--dynamic/--no-dynamic", help="include the dynamic-int8 baseline"),
    keep_fp32: list[str] = typer.Option([], "--keep-fp32", help="node name to keep fp32 in int8 (repeatable)"),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="keep variant files that fail their gate"),
    threads: int | None = typer.Option(None, help="CPU threads for the checks"),
    int8_weights: str = typer.Option("auto", help="auto (s8 where this CPU has VNNI or is ARM, u8 on other x86 "
                                                   "CPUs, whose u8 x s8 kernel saturates), s8 or u8"),
    openvino: bool = typer.Option(True, "--openvino/--no-openvino", help="also gate OpenVINO fp32 and bf16 "
                                                                          "(bf16 only where the CPU has it)"),
    pick: bool = typer.Option(True, "--pick/--no-pick", help="time every variant valid here and record the "
                                                              "fastest as the bundle's CPU default"),
    timing_runs: int = typer.Option(5, help="interleaved timed runs per variant for --pick"),
    sweep: list[int] = typer.Option([1, 4, 8, 16], "--sweep-batch", help="--pick: batch sizes whose windows/s "
                                    "are measured for the winner (repeatable); the best becomes the default batch"),
    batch_sweep: bool = typer.Option(True, "--batch-sweep/--no-batch-sweep", help="measure the best batch"),
    sweep_all: bool = typer.Option(False, "--sweep-all", help="sweep every timed variant, not only the CPU "
                                                              "default (what --variant runs then batches by)"),
) -> None:
    """Write model.cpu.onnx (fused fp32), int8 and OpenVINO variants, gate each, record the fastest valid one."""
    require("optimize", "onnx", "onnxruntime")
    from edgeenc.export.optimize import optimize_bundle
    from edgeenc.runtime.bundle import BundleError

    if any(b < 1 for b in sweep):
        fail("--sweep-batch must be >= 1")
    with failing_on(BundleError, ValueError):
        summary = optimize_bundle(bundle, int8=int8, dynamic=dynamic, keep_fp32=keep_fp32, keep_failed=keep_failed,
                                  threads=threads, int8_weights=int8_weights, openvino=openvino, pick=pick,
                                  timing_runs=timing_runs, sweep_batches=tuple(sweep) if batch_sweep else None,
                                  sweep_all=sweep_all, progress=note)
    choice = summary.pop("cpu_default", None)
    throughput = summary.pop("throughput", None)
    for name, entry in summary.items():
        status = "PASS" if entry.get("parity") else ("not written" if entry.get("written") is False else "FAIL")
        typer.echo(f"{name}: {status} {entry.get('figures') or entry.get('reason', '')}")
    if choice:
        for row in choice["ranking"]:
            typer.echo(f"timed {row['variant']:22} {row['p50_ms']:9.2f} ms p50  ({row['description']})")
        typer.echo(f"CPU default: {choice['variant']} ({choice['engine']} {choice['precision']}, "
                   f"{choice['speedup_vs_model_onnx']:.2f}x model.onnx on ONNX Runtime)")
    if throughput:
        for batch, row in throughput["batches"].items():
            typer.echo(f"batch {batch:>3}: {row['windows_per_s']:8.2f} windows/s  {row['audio_hours_per_hour']:8.1f} "
                       f"audio-hours/hour  peak RSS {row['peak_rss_mb']:7.0f} MB")
        typer.echo(f"best batch: {throughput['best_batch']} (embed, classify and the Ray workers use it unless "
                   "--batch is given)")
    if not summary["model.cpu.onnx"]["parity"]:
        raise typer.Exit(ExitStatus.PARITY_FAILED)
