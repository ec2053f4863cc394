"""Parity: the one comparator behind every gate (export, optimize's variants, build's engines).

Thresholds: fp32 per-token cosine >= 0.99999 and max abs <= 2e-3, widened per case and output to 5x
PyTorch-fp32's own error against float64 where the audio puts the top mel bins at float32 rounding
level (any fp32 filterbank is that far from exact there). Reduced precision is judged on tokens
(per-token cosine) and on mean-centred embeddings, never on raw embedding cosine alone: pooled
embeddings of different clips are 0.99+ alike. Every gate returns a :class:`ParityReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from edgeenc.progress import Progress
from edgeenc.runtime.backends import onnx_cpu_backend

from .specs import EXPORT_SPECS

if TYPE_CHECKING:  # torch only where PyTorch runs: the engine gate of `edgeenc build` needs none
    import torch

    from edgeenc.models.checkpoints import LoadedModel

FP32_MAX_ABS = 2e-3
FP32_COSINE_GAP = 1e-5  # 1 - cosine
FLOOR_FACTOR = 5.0
FP16_TOKEN_COSINE = 0.999
LOWP_TOKEN_COSINE = 0.99  # int8, bf16
CENTRED_EMBEDDING_COSINE = 0.99


@dataclass
class ParityCase:
    name: str
    audio: np.ndarray  # [batch, samples] float32 at the model's rate


@dataclass
class Comparison:
    case: str
    output: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    min_cosine: float
    max_abs_limit: float
    min_cosine_limit: float
    passed: bool
    torch_fp32_vs_fp64_max_abs: float | None = None
    torch_fp32_vs_fp64_min_cosine: float | None = None


@dataclass
class ParityReport:
    variant: str  # "fp32", "fp16", ...
    passed: bool
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of every last-axis vector (per token / per row), in float64."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    # Two zero vectors are identical; one zero vector against a non-zero one is not.
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))


def error_stats(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    if candidate.shape != reference.shape:
        return float("inf"), float("inf"), -1.0
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    if not np.all(np.isfinite(candidate)):
        return float("inf"), float("inf"), -1.0
    return float(diff.max()), float(diff.mean()), float(rowwise_cosine(candidate, reference).min())


def reference_audio(sample_rate: int) -> np.ndarray:
    """The bundled real bird recording (MIT), mono float32 at `sample_rate`."""
    import soundfile as sf
    import soxr

    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as path:
        audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="VHQ")
    return audio.astype(np.float32)


def parity_cases(arch: str, rate: int) -> list[ParityCase]:
    """Lengths of the architecture's export spec at batch 1 and 3, plus the whole real recording."""
    spec = EXPORT_SPECS[arch]
    real = reference_audio(rate)
    # Longer cases tile the recording at different gains so no window is silence or a copy.
    gains = (1.0, 0.5, 2.0, 0.25)
    tiled = np.concatenate([real * g for g in gains])
    rng = np.random.default_rng(0)
    cases = [ParityCase("real_recording", real[None, :])]
    for seconds in spec.parity_seconds:
        n = int(round(seconds * rate))
        label = f"{seconds:g}s".replace(".", "p")
        cases.append(ParityCase(f"{label}_batch1", tiled[None, :n].copy()))
        if seconds in spec.batch3_seconds:
            starts = rng.integers(0, len(tiled) - n, size=3)
            batch = np.stack([tiled[s : s + n] for s in starts])
            # One row of plain noise at a realistic level checks the front end off the recording.
            batch[2] = rng.standard_normal(n).astype(np.float32) * 0.05
            cases.append(ParityCase(f"{label}_batch3", batch))
    return cases


Runner = Callable[[np.ndarray], dict[str, np.ndarray]]  # audio [batch, samples] -> outputs by name
Floors = Mapping[tuple[str, str], tuple[float, float, float]]  # (case, output) -> PyTorch fp32 vs fp64 error


def ort_runner(path, names: list[str], threads: int | None = None) -> Runner:
    """The candidate the gates judge: the runtime's own ONNX Runtime CPU backend on `path`."""
    return onnx_cpu_backend(path, names, threads).run


def torch_outputs(graph: torch.nn.Module, audio: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import torch

    dtype = next(graph.parameters()).dtype
    with torch.no_grad():
        outs = graph(torch.from_numpy(audio).to(dtype))
    return {name: out.numpy() for name, out in zip(names, outs)}


def limits(fp32_err: tuple[float, float, float] | None) -> tuple[float, float]:
    if fp32_err is None:
        return FP32_MAX_ABS, 1.0 - FP32_COSINE_GAP
    max_abs, _, cos = fp32_err
    return max(FP32_MAX_ABS, FLOOR_FACTOR * max_abs), 1.0 - max(FP32_COSINE_GAP, FLOOR_FACTOR * (1.0 - cos))


def compare(
    variant: str,
    run_candidate: Runner,
    references: Mapping[str, dict[str, np.ndarray]],
    cases: Iterable[ParityCase],
    names: list[str],
    *,
    token_cosine: float | None = None,
    floors: Floors | None = None,
    progress: Progress | None = None,
) -> ParityReport:
    """The one comparator: `run_candidate` against `references` (outputs per case name) on every case.

    Without `token_cosine`, the fp32 gate: every output in `names` within max abs and cosine limits, widened
    per (case, output) by `floors` (PyTorch fp32's own error against fp64) where given. With `token_cosine`,
    the reduced-precision gate: per-token cosine >= `token_cosine`, mean-centred embedding cosine, and the
    same top-1 class on the real recording.
    """
    report = ParityReport(variant=variant, passed=True)
    reference_embeddings, embeddings = [], []
    for case in cases:
        if progress:
            progress(f"parity {variant} {case.name} {list(case.audio.shape)}")
        got = run_candidate(case.audio)
        if token_cosine is None:
            _compare_fp32(report, case.name, got, references[case.name], names, floors or {})
        else:
            _compare_tokens(report, case.name, got, references[case.name], token_cosine)
            reference_embeddings.append(references[case.name]["embedding"])
            embeddings.append(got["embedding"])
    if token_cosine is not None:
        _compare_centred(report, reference_embeddings, embeddings)
        report.notes.append(
            "reference: fp32; embedding_centred subtracts the mean reference embedding of all parity cases "
            "before the cosine (raw pooled embeddings of different clips are 0.99+ alike)"
        )
    report.summary = summarise(report)
    return report


def _add(report: ParityReport, comparison: Comparison) -> None:
    report.comparisons.append(comparison)
    report.passed &= comparison.passed


def _compare_fp32(report: ParityReport, case: str, got: dict, ref: dict, names: list[str], floors: Floors) -> None:
    for name in names:
        floor = floors.get((case, name))
        max_abs_limit, cos_limit = limits(floor)
        max_abs, mean_abs, cos = error_stats(got[name], ref[name])
        passed = max_abs <= max_abs_limit and cos >= cos_limit
        _add(report, Comparison(case, name, list(got[name].shape), max_abs, mean_abs, cos, max_abs_limit, cos_limit,
                                passed, floor[0] if floor else None, floor[2] if floor else None))


def _compare_tokens(report: ParityReport, case: str, got: dict, ref: dict, token_cosine: float) -> None:
    max_abs, mean_abs, cos = error_stats(got["tokens"], ref["tokens"])
    _add(report, Comparison(case, "tokens", list(got["tokens"].shape), max_abs, mean_abs, cos, float("inf"),
                            token_cosine, cos >= token_cosine))
    if "logits" in ref and case == "real_recording":
        same = bool(np.argmax(got["logits"], axis=1)[0] == np.argmax(ref["logits"], axis=1)[0])
        max_abs, mean_abs, cos = error_stats(got["logits"], ref["logits"])
        _add(report, Comparison(case, "logits_top1", list(got["logits"].shape), max_abs, mean_abs, cos,
                                float("inf"), -1.0, same))


def _compare_centred(report: ParityReport, references: list[np.ndarray], got: list[np.ndarray]) -> None:
    ref_e, got_e = np.concatenate(references), np.concatenate(got)
    centre = ref_e.mean(axis=0, keepdims=True)
    max_abs, mean_abs, _ = error_stats(got_e, ref_e)
    centred_cos = float(rowwise_cosine(got_e - centre, ref_e - centre).min())
    _add(report, Comparison("all_cases", "embedding_centred", list(got_e.shape), max_abs, mean_abs, centred_cos,
                            float("inf"), CENTRED_EMBEDDING_COSINE, centred_cos >= CENTRED_EMBEDDING_COSINE))


def run_fp32_gate(
    loaded: LoadedModel,
    run_candidate: Runner,
    names: list[str],
    cases: Iterable[ParityCase],
    *,
    progress: Progress | None = None,
) -> tuple[ParityReport, dict[str, dict[str, np.ndarray]]]:
    """Export's gate: `run_candidate` (ONNX Runtime on model.onnx) against PyTorch fp32, with PyTorch in
    float64 as the truth that sets each (case, output)'s floor.

    Returns the report and the PyTorch fp32 outputs per case (the reference for reduced precision).
    """
    import copy

    from .onnx_export import OnnxGraph

    graph32 = OnnxGraph(loaded.module.float().eval())
    graph64 = OnnxGraph(copy.deepcopy(loaded.module).double().eval())
    cases = list(cases)
    references: dict[str, dict[str, np.ndarray]] = {}
    floors: dict[tuple[str, str], tuple[float, float, float]] = {}
    for case in cases:
        if progress:
            progress(f"PyTorch fp32 and fp64 on {case.name} {list(case.audio.shape)}")
        references[case.name] = torch_outputs(graph32, case.audio, names)
        ref64 = torch_outputs(graph64, case.audio.astype(np.float64), names)
        floors.update({(case.name, name): error_stats(references[case.name][name], ref64[name]) for name in names})
    report = compare("fp32", run_candidate, references, cases, names, floors=floors, progress=progress)
    report.notes.append(
        "reference: our PyTorch model in eval mode (avex parity is proven by the test suite against avex's "
        "golden outputs); truth: the same model in float64; limits widen to 5x PyTorch-fp32's own error"
    )
    return report, references


def fp32_figures(report: ParityReport) -> dict:
    """What the manifest keeps of an fp32 gate: the worst max abs and cosine over every output."""
    return {"max_abs": max((c.max_abs for c in report.comparisons), default=0.0),
            "min_token_cosine": min((c.min_cosine for c in report.comparisons), default=1.0)}


def reduced_figures(report: ParityReport) -> dict:
    """What the manifest keeps of a reduced-precision gate."""
    worst = report.summary.get("worst", {})
    return {"passed": report.passed,
            "min_token_cosine": worst.get("tokens", {}).get("min_cosine"),
            "min_centred_embedding_cosine": worst.get("embedding_centred", {}).get("min_cosine"),
            "token_max_abs": worst.get("tokens", {}).get("max_abs"),
            "limits": {"token_cosine": LOWP_TOKEN_COSINE, "centred_embedding_cosine": CENTRED_EMBEDDING_COSINE}}


def summarise(report: ParityReport) -> dict:
    worst: dict[str, dict[str, float]] = {}
    for c in report.comparisons:
        w = worst.setdefault(c.output, {"max_abs": 0.0, "min_cosine": 1.0})
        w["max_abs"] = max(w["max_abs"], c.max_abs)
        w["min_cosine"] = min(w["min_cosine"], c.min_cosine)
    return {
        "passed": report.passed,
        "cases": len({c.case for c in report.comparisons}),
        "comparisons": len(report.comparisons),
        "failed": len(report.failures()),
        "worst": worst,
    }
