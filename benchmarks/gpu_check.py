#!/usr/bin/env python3
"""The first run on a lent NVIDIA machine: one call, one JSON of figures (docs/jetson.md, "Device check").

    python benchmarks/gpu_check.py --out gpu_check.json [--size full|tiny] [--export-size tiny|full]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json     # on any CPU machine

Made for a bare machine with PyTorch (CUDA), cuda-bindings and CPU onnxruntime, no TensorRT and no network;
sized for one call under 8 minutes (--budget-s, default 420, is checked before every step). Steps, each
recorded as ok / failed / skipped (with the reason) so that one failure loses nothing else:

1. environment: torch, CUDA, GPU, onnxruntime providers, cuda-python and tensorrt as found;
2. torch_fp16_gate: our PyTorch BEATs (random weights, --size) on the GPU in fp16 with the fp32 islands of
   model.fp16.onnx (front end, LayerNorm, softmax, pooling, outputs and residual stream fp32; GEMMs fp16)
   against fp32 with TF32 off, judged by the export's fp16 gate; fp32 / fp16 latency of one batch;
3. cuda_buffers: the runtime's cuda-python buffers and stream (runtime/tensorrt_backend.py _IOBuffer):
   a real device allocation, host -> device -> host copies, checked byte for byte, and their bandwidth;
4. export: a bundle with random weights (--export-size; tiny by default: the export is CPU work);
5. tensorrt: `edgeenc build` fp16 and fp32 on that bundle and the TensorRT backend, only if `import
   tensorrt` works; 6. ort_cuda: the onnxruntime CUDA backend, only if onnxruntime-gpu is there.

--dry-run runs steps 1, 2 (on the CPU: the same island code, no GPU figure) and 4 with the tiny model,
and says which GPU steps it skipped, so the script is known to start before a device is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "esp_aves2_sl_beats_all"  # BEATs with a classifier head: tokens, embedding and logits are gated
TINY = {"embed_dim": 64, "depth": 2, "heads": 4, "ffn_dim": 128, "patch_dim": 32, "conv_pos": 16,
        "conv_pos_groups": 4}
TIMING_BATCH, TIMING_SECONDS = 4, 10.0


def import_edgeenc() -> None:
    """Make edgeenc importable from a plain checkout (the package maps models/, export/, runtime/ under it)."""
    try:
        import edgeenc.export  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import edgeenc

        edgeenc.__path__.append(str(ROOT))  # edgeenc.models -> ROOT/models, as pyproject's package-dir says


class Check:
    """The JSON being written: every step's outcome, rewritten after each step."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.budget_s, self.started = out, budget_s, time.time()
        self.data: dict = {"format": 1, "dry_run": dry_run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "steps": {}, "skipped": []}

    def step(self, name: str, run: Callable[[], dict], skip: str | None = None) -> dict | None:
        elapsed = time.time() - self.started
        if skip is None and elapsed > self.budget_s:
            skip = f"time budget: {elapsed:.0f} s of {self.budget_s:.0f} s used"
        if skip is not None:
            entry = {"status": "skipped", "reason": skip}
            self.data["skipped"].append(f"{name}: {skip}")
        else:
            began = time.time()
            try:
                entry = {"status": "ok", **run()}
            except Exception as exc:  # one failing step must not lose the figures of the others
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.time() - began, 2)
        self.data["steps"][name] = entry
        self.save()
        print(f"{name}: {entry['status']}" + (f" ({entry.get('reason') or entry.get('error')})"
                                              if entry["status"] != "ok" else f" in {entry['seconds']} s"))
        return entry if entry["status"] == "ok" else None

    def save(self) -> None:
        from edgeenc.runtime.atomic import atomic_text

        self.data["total_seconds"] = round(time.time() - self.started, 2)
        with atomic_text(self.out) as fh:
            json.dump(self.data, fh, indent=1, default=str)
            fh.write("\n")


def environment() -> dict:
    import onnxruntime
    import torch

    from edgeenc.runtime.backends import tensorrt_backend as trt_rt

    info = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
            "cuda_python": trt_rt.cuda_python_version(), "cudart_module": getattr(trt_rt.import_cudart(), "__name__",
                                                                                 None)}
    # parity cases read the bundled recording (soundfile, soxr); the export writes ONNX (onnx)
    info["missing_modules"] = [name for name in ("onnx", "soundfile", "soxr") if importlib.util.find_spec(name) is None]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_bytes=props.total_memory)
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        info["tensorrt"] = f"not importable: {exc}"
    return info


@contextlib.contextmanager
def fp16_islands(model, device_type: str):
    """Autocast fp16 for the GEMMs, with model.fp16.onnx's fp32 islands forced explicitly (export/fp16.py):
    the front end, every LayerNorm, softmax and the classifier head run in fp32 on fp32 inputs, and the
    residual stream stays fp32 by type promotion (fp32 LayerNorm output + fp16 GEMM output). Autocast's own
    fp32 lists differ between CPU and CUDA, so nothing here relies on them."""
    import torch

    def in_fp32(module):
        forward = module.forward

        def run(*args):
            with torch.autocast(device_type, enabled=False):
                return forward(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))

        module.forward = run
        return module

    islands = [model.fbank, *(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))]
    islands += [model.classifier] if getattr(model, "classifier", None) is not None else []
    saved = [in_fp32(m) for m in islands]
    softmax = torch.Tensor.softmax

    def softmax_fp32(self, *args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return softmax(self.float(), *args, **kwargs)

    torch.Tensor.softmax = softmax_fp32
    try:
        with torch.autocast(device_type, dtype=torch.float16):
            yield
    finally:
        torch.Tensor.softmax = softmax
        for module in saved:
            del module.forward  # back to the class's forward


def observed_precisions(model, graph, audio, device_type: str) -> dict[str, str]:
    """The output dtype of one module of each kind under fp16_islands: what the gate really ran."""
    import torch

    blocks = model.encoder.layers[0]
    watch = {"front_end": model.fbank, "patch_embedding_conv": model.patch_embedding.proj, "ffn_gemm": blocks.fc1,
             "attention_gemm": blocks.self_attn.q_proj, "layer_norm": blocks.final_layer_norm}
    if getattr(model, "classifier", None) is not None:
        watch["classifier_head"] = model.classifier
    seen: dict[str, str] = {}

    def recorder(key: str):
        def hook(_module, _inputs, out) -> None:  # returns None: a forward hook's value would replace the output
            seen.setdefault(key, str(out.dtype))

        return hook

    hooks = [m.register_forward_hook(recorder(key)) for key, m in watch.items()]
    try:
        with torch.no_grad(), fp16_islands(model, device_type):
            outs = graph(torch.from_numpy(audio).to(device_type))
    finally:
        for hook in hooks:
            hook.remove()
    return {**seen, "outputs": str(outs[0].dtype)}


def _median_ms(run: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    run()
    sync()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - began) * 1000)
    return float(np.median(times))


def torch_fp16_gate(size: str, device_type: str) -> dict:
    import torch

    from edgeenc.export import parity
    from edgeenc.export.onnx_export import OnnxGraph, output_names
    from edgeenc.models.checkpoints import load_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a real fp32 reference
    loaded = load_model(MODEL_ID, random_init=True, **(TINY if size == "tiny" else {}))
    graph = OnnxGraph(loaded.module.float().eval()).to(device_type)
    names = output_names(loaded)
    device = torch.device(device_type)

    def run(audio: np.ndarray, fp16: bool) -> dict[str, np.ndarray]:
        with torch.no_grad(), fp16_islands(loaded.module, device_type) if fp16 else contextlib.nullcontext():
            outs = graph(torch.from_numpy(audio).to(device))
        return {n: o.float().cpu().numpy() for n, o in zip(names, outs)}

    cases = parity.parity_cases("beats", loaded.spec.sample_rate)
    references = {case.name: run(case.audio, fp16=False) for case in cases}
    report = parity.compare(f"torch-{device_type}-fp16", lambda a: run(a, fp16=True), references, cases, names,
                            token_cosine=parity.FP16_TOKEN_COSINE)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    batch = np.random.default_rng(0).standard_normal(
        (TIMING_BATCH, int(TIMING_SECONDS * loaded.spec.sample_rate))).astype(np.float32) * 0.1
    reps = 10 if device_type == "cuda" else 1
    fp32_ms = _median_ms(lambda: run(batch, fp16=False), sync, reps)
    fp16_ms = _median_ms(lambda: run(batch, fp16=True), sync, reps)
    precisions = observed_precisions(loaded.module, graph, cases[0].audio, device_type)
    # The same fp32 model on the CPU (last: it moves the module there), one case: does the GPU agree at all?
    cpu = parity.torch_outputs(graph.cpu(), cases[0].audio, names) if device_type != "cpu" else None
    return {"model": MODEL_ID, "size": size, "device": device_type, "passed": report.passed,
            "precisions": precisions,
            "summary": report.summary, "comparisons": report.to_json()["comparisons"],
            "device_fp32_vs_cpu_fp32_token_cosine": None if cpu is None else float(parity.rowwise_cosine(
                references[cases[0].name]["tokens"], cpu["tokens"]).min()),
            "timing": {"batch": [TIMING_BATCH, TIMING_SECONDS], "reps": reps, "fp32_median_ms": round(fp32_ms, 2),
                       "fp16_median_ms": round(fp16_ms, 2), "fp32_over_fp16": round(fp32_ms / fp16_ms, 3),
                       "note": "one run, median of reps after one warm-up, outputs copied to the host included"}}


def cuda_buffers(cudart, nbytes: int = 64 << 20) -> dict:
    """A pinned host buffer -> device -> a second device buffer's host side, through the runtime's own code."""
    from edgeenc.runtime.backends import tensorrt_backend as trt_rt

    gpu = trt_rt.gpu_identity(cudart)
    kind = cudart.cudaMemcpyKind
    stream = trt_rt._cuda(cudart.cudaStreamCreate())
    source, sink = trt_rt._IOBuffer(cudart, np.uint8), trt_rt._IOBuffer(cudart, np.uint8)
    try:
        sent = source.reserve((nbytes,))
        sent[...] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        received = sink.reserve((nbytes,))
        received[...] = 0
        began = time.perf_counter()
        trt_rt._cuda(cudart.cudaMemcpyAsync(source.device, source.host_ptr, nbytes,
                                            kind.cudaMemcpyHostToDevice, stream))
        trt_rt._cuda(cudart.cudaStreamSynchronize(stream))
        to_device = time.perf_counter() - began
        began = time.perf_counter()
        trt_rt._cuda(cudart.cudaMemcpyAsync(sink.host_ptr, source.device, nbytes,
                                            kind.cudaMemcpyDeviceToHost, stream))
        trt_rt._cuda(cudart.cudaStreamSynchronize(stream))
        to_host = time.perf_counter() - began
        identical = bool(np.array_equal(sent, received))
        handle = trt_rt._handle(stream)
    finally:
        source.free()
        sink.free()
        cudart.cudaStreamDestroy(stream)
    if not identical:
        raise RuntimeError(f"{nbytes} bytes came back different from the device")
    return {"gpu": gpu, "bytes": nbytes, "identical": identical, "stream_handle_is_int": isinstance(handle, int),
            "host_to_device_GBps": round(nbytes / to_device / 1e9, 2),
            "device_to_host_GBps": round(nbytes / to_host / 1e9, 2)}


def export(work: Path, size: str) -> dict:
    from edgeenc.export.pipeline import export_bundle
    from edgeenc.models.checkpoints import load_model

    loaded = load_model(MODEL_ID, random_init=True, **(TINY if size == "tiny" else {}))
    result = export_bundle(loaded, work / "bundle", fp16=True)
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    return {"bundle": str(work / "bundle"), "size": size, "passed": result.passed,
            "variants": manifest.get("variants"), "files": sorted(manifest.get("files", {}))}


def tensorrt_paths(bundle: Path) -> dict:
    from edgeenc.export import tensorrt as trt_build
    from edgeenc.runtime.backends import tensorrt_backend as trt_rt
    from edgeenc.runtime.bundle import output_names

    manifest = json.loads((bundle / "manifest.json").read_text())
    profile = trt_build.compute_profile(manifest, max_batch=2, max_seconds=10)
    results = {}
    for precision in ("fp16", "fp32"):
        built = trt_build.build_engine(bundle, precision=precision, profile=profile)
        results[precision] = {"accepted": built.accepted, "typing": built.data["typing"],
                              "build_seconds": built.data["build_seconds"], "layers": built.data["layers"],
                              "parity": {k: v for k, v in built.data["parity"].items() if k != "report"}}
    backend = trt_rt.TensorRTBackend.from_bundle(bundle, manifest, output_names(manifest))
    audio = np.zeros((2, 160000), np.float32)
    results["backend"] = {"description": backend.description,
                          "median_ms_2x10s": round(_median_ms(lambda: backend.run(audio), lambda: None, 10), 2)}
    backend.close()
    return results


def ort_cuda(bundle: Path) -> dict:
    from edgeenc.export.parity import parity_cases, rowwise_cosine
    from edgeenc.runtime.backends import onnx_cpu_backend, select_backend
    from edgeenc.runtime.bundle import output_names

    manifest = json.loads((bundle / "manifest.json").read_text())
    names = output_names(manifest)
    audio = parity_cases("beats", int(manifest["sample_rate"]))[0].audio
    gpu = select_backend(bundle, manifest, names, device="cuda")[0]
    cpu = onnx_cpu_backend(bundle / "model.onnx", names)
    cosine = float(rowwise_cosine(gpu.run(audio)["tokens"], cpu.run(audio)["tokens"]).min())
    return {"description": gpu.description, "token_cosine_vs_cpu": cosine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--work", type=Path, default=None, help="folder for the bundle (default: beside --out)")
    parser.add_argument("--size", choices=("full", "tiny"), default=None, help="model of the fp16 gate")
    parser.add_argument("--export-size", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--dry-run", action="store_true", help="CPU only: skip (and name) every GPU step")
    args = parser.parse_args(argv)
    import_edgeenc()
    from edgeenc.runtime.backends import tensorrt_backend as trt_rt

    size = args.size or ("tiny" if args.dry_run else "full")
    work = args.work or args.out.resolve().parent / "gpu_check_work"
    check = Check(args.out, args.budget_s, args.dry_run)
    env = check.step("environment", environment) or {}
    no_gpu = "dry run (no GPU step)" if args.dry_run else (
        None if env.get("cuda_available") else "torch sees no CUDA device")
    # In a dry run the gate runs on the CPU: the same island code, no GPU figure.
    check.step("torch_fp16_gate", lambda: torch_fp16_gate(size, "cpu" if args.dry_run else "cuda"),
               skip=None if args.dry_run else no_gpu)
    cudart = trt_rt.import_cudart()
    check.step("cuda_buffers", lambda: cuda_buffers(cudart),
               skip=no_gpu or (None if cudart is not None else "cuda-python is not installed"))
    exported = check.step("export", lambda: export(work, args.export_size))
    bundle = Path(exported["bundle"]) if exported else None
    no_bundle = None if bundle else "no bundle (the export step did not succeed)"
    found = str(env.get("tensorrt", "not importable: the environment step failed"))
    check.step("tensorrt", lambda: tensorrt_paths(bundle),
               skip=no_gpu or no_bundle or (f"tensorrt {found}" if found.startswith("not importable") else None))
    check.step("ort_cuda", lambda: ort_cuda(bundle),
               skip=no_gpu or no_bundle or (None if "CUDAExecutionProvider" in env.get("ort_providers", [])
                                            else "onnxruntime has no CUDAExecutionProvider (CPU onnxruntime)"))
    failed = [name for name, entry in check.data["steps"].items() if entry["status"] == "failed"]
    print(f"wrote {args.out}; skipped: {check.data['skipped'] or 'none'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
