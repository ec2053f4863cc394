"""`edgeenc probe attach`: a new bundle whose model.onnx computes the probe's scores inside the graph.

One Gemm on the `embedding` output (`probe_logits`) and the probe's activation (`probe_scores`), so every
consumer of model.onnx (ONNX Runtime, OpenVINO, TensorRT engines built from it, the C++ program, Ray,
watch, listen) runs the probe with no code of its own. The model's own outputs stay as they were (`tokens`,
`embedding`, and an EAT's `logits`); the ONNX metadata then describes the default head, the probe
(`num_classes`, `activation`, and OpenSoundscape's `classes` / `class_outputs_key`), and keeps the model's own
head as `model_num_classes` / `model_activation`.

Gate: on the parity cases (windows of the bundled recording, a short clip, noise), the graph's `probe_scores`
against scikit-learn's `predict_proba` of the same probe on the graph's own embeddings (max abs <= 1e-5), and
the graph's embedding against the parent bundle's (the base is unchanged). Recorded in parity.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic
from ..backends import onnx_cpu_backend
from ..bundle import (
    LABELS,
    MANIFEST,
    PARITY,
    PROBE_LABELS,
    BundleError,
    bundle_identity,
    read_manifest,
    verify_bundle,
    write_manifest,
)
from .train import Probe

PROBE_LOGITS = "probe_logits"
PROBE_SCORES = "probe_scores"
SCORES_MAX_ABS = 1e-5  # graph scores against scikit-learn's predict_proba
EMBEDDING_MAX_ABS = 1e-5  # the attached graph's embedding against the parent's


class AttachError(ValueError):
    """A probe that cannot be attached to this bundle; the message says why and what to do."""


@dataclass
class ProbeComparison:
    case: str
    output: str
    shape: list[int]
    max_abs: float
    max_abs_limit: float
    reference: str
    passed: bool


@dataclass
class AttachResult:
    bundle: Path
    passed: bool
    comparisons: list[ProbeComparison]


def reference_scores(probe: Probe, embeddings: np.ndarray) -> np.ndarray:
    """scikit-learn's own predict_proba of the probe (rebuilt from probe.json's weights, no pickle)."""
    from sklearn.linear_model import LogisticRegression

    x = embeddings.astype(np.float64)
    w, b = probe.weights.astype(np.float64), probe.bias.astype(np.float64)

    def regression(coef: np.ndarray, intercept: np.ndarray, classes: int) -> LogisticRegression:
        model = LogisticRegression()
        model.classes_, model.coef_, model.intercept_ = np.arange(classes), coef, intercept
        return model

    if probe.activation == "sigmoid":  # one-vs-rest: a binary regression per class
        return np.stack([regression(w[c:c + 1], b[c:c + 1], 2).predict_proba(x)[:, 1] for c in range(len(w))], axis=1)
    if len(w) == 2:  # sklearn's binary form: one row, the difference of the two
        return regression(w[1:] - w[:1], b[1:] - b[:1], 2).predict_proba(x)
    return regression(w, b, len(w)).predict_proba(x)


def parity_cases(sample_rate: int, window_seconds: float, min_samples: int) -> list[tuple[str, np.ndarray]]:
    """Windows of the bundled bird recording (three at once), a short clip, and a row of noise."""
    from ..audio import load

    with resources.as_file(resources.files("edgeenc") / "data" / "birds_10s.wav") as path:
        audio = load(path, sample_rate)
    n = int(round(window_seconds * sample_rate))
    tiled = np.concatenate([audio, audio * 0.5, audio * 2.0, audio * 0.25])[: 3 * n]
    tiled = np.pad(tiled, (0, max(0, 3 * n - len(tiled))))
    noise = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.05
    short = audio[: max(min_samples, sample_rate)]
    return [("recording_batch3", tiled.reshape(3, n)), ("short_clip", short[None, :]),
            ("noise", noise[None, :])]


def _check(bundle: Path, probe: Probe, manifest: dict) -> None:
    if manifest.get("probe"):
        raise AttachError(f"{bundle} already has a probe attached ({manifest['probe'].get('classes')}): attach to its "
                          f"parent bundle (model.onnx sha256 {manifest['probe'].get('parent_bundle_sha256')})")
    sha = bundle_identity(bundle, manifest)[1]
    trained_on = probe.bundle.get("bundle_sha256")
    if trained_on != sha:
        raise AttachError(f"the probe was trained on the embeddings of bundle model.onnx sha256 {trained_on} "
                          f"({probe.bundle.get('model_id')}), not on this bundle's ({bundle}: sha256 {sha}, "
                          f"{manifest.get('model_id')}): train it on this bundle with `edgeenc probe train {bundle} "
                          "DATA -o DIR`")
    if probe.embedding_dim != int(manifest["embedding_dim"]):
        raise AttachError(f"the probe takes {probe.embedding_dim}-wide embeddings, {bundle} makes "
                          f"{manifest['embedding_dim']}: train it on this bundle")
    if manifest.get("status") == "failed-parity":
        raise AttachError(f"{bundle} failed its own parity gate at export: export it again first")


def _graph(bundle: Path, probe: Probe, manifest: dict):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(bundle / "model.onnx"))
    graph = model.graph
    taken = {o.name for o in graph.output} | {i.name for i in graph.initializer}
    if "embedding" not in {o.name for o in graph.output}:
        raise AttachError(f"{bundle / 'model.onnx'}: no 'embedding' output to attach a probe to; re-export the bundle")
    if taken & {PROBE_LOGITS, PROBE_SCORES, "probe_weights", "probe_bias"}:
        raise AttachError(f"{bundle / 'model.onnx'} already has probe outputs: attach to its parent bundle")
    graph.initializer.extend([numpy_helper.from_array(probe.weights.astype(np.float32), "probe_weights"),
                              numpy_helper.from_array(probe.bias.astype(np.float32), "probe_bias")])
    graph.node.append(helper.make_node("Gemm", ["embedding", "probe_weights", "probe_bias"], [PROBE_LOGITS],
                                       name="probe_gemm", transB=1))
    if probe.activation == "sigmoid":
        graph.node.append(helper.make_node("Sigmoid", [PROBE_LOGITS], [PROBE_SCORES], name="probe_activation"))
    else:
        graph.node.append(helper.make_node("Softmax", [PROBE_LOGITS], [PROBE_SCORES], name="probe_activation", axis=1))
    embedding = next(o for o in graph.output if o.name == "embedding")
    batch = embedding.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    for name in (PROBE_LOGITS, PROBE_SCORES):
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch_dim, len(probe.classes)]))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({
        "model_num_classes": props.get("num_classes", str(manifest.get("num_classes") or 0)),
        "model_activation": props.get("activation", ""),
        "num_classes": str(len(probe.classes)),  # the default head's: the probe's
        "activation": probe.activation,
        "sample_duration": str(manifest["window_seconds"]),
        "classes": json.dumps(probe.classes),
        "class_outputs_key": PROBE_LOGITS,
        "probe_scores_key": PROBE_SCORES,
        "embedding_outputs_key": "embedding",
        "probe_parent_sha256": bundle_identity(bundle, manifest)[1],
        "probe_data_fingerprint": str(probe.data.get("fingerprint", "")),
    })
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def _gate(parent: Path, out: Path, probe: Probe, manifest: dict) -> list[ProbeComparison]:
    names = ["embedding", PROBE_LOGITS, PROBE_SCORES]
    attached = onnx_cpu_backend(out / "model.onnx", names, threads=None)
    original = onnx_cpu_backend(parent / "model.onnx", ["embedding"], threads=None)
    found = []
    for case, audio in parity_cases(int(manifest["sample_rate"]), float(manifest["window_seconds"]),
                                    int(manifest.get("min_samples", 1))):
        got = attached.run(audio)
        emb = got["embedding"]
        checks = [
            ("embedding", emb, original.run(audio)["embedding"], EMBEDDING_MAX_ABS, "the parent bundle's model.onnx"),
            (PROBE_SCORES, got[PROBE_SCORES], reference_scores(probe, emb), SCORES_MAX_ABS,
             "scikit-learn predict_proba on the graph's embedding"),
        ]
        logits_ref = emb.astype(np.float64) @ probe.weights.astype(np.float64).T + probe.bias.astype(np.float64)
        checks.append((PROBE_LOGITS, got[PROBE_LOGITS], logits_ref, 1e-5 * max(1.0, float(np.abs(logits_ref).max())),
                       "scikit-learn decision_function (float64) on the graph's embedding"))
        for output, value, reference, limit, what in checks:
            err = float(np.abs(value.astype(np.float64) - reference).max()) if value.shape == reference.shape \
                else float("inf")
            found.append(ProbeComparison(case, output, list(value.shape), err, limit, what,
                                         bool(np.isfinite(err) and err <= limit)))
    return found


def attach_probe(bundle: str | os.PathLike, probe_dir: str | os.PathLike, out: str | os.PathLike) -> AttachResult:
    """Write `out`, a new bundle: `bundle` with the probe of `probe_dir` inside its model.onnx. `out` is written
    beside itself and moved into place whole; it must not exist. Raises AttachError / BundleError / ProbeError."""
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    problems = verify_bundle(bundle, manifest)
    if problems:
        raise BundleError(f"{bundle}: " + "; ".join(problems) + " (re-export the bundle)")
    probe = Probe.load(probe_dir)
    _check(bundle, probe, manifest)
    if out.exists():
        raise AttachError(f"{out} exists: give a new folder (the parent bundle stays as it is)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        import onnx

        onnx.save(_graph(bundle, probe, manifest), str(work / "model.onnx"))
        if (bundle / LABELS).is_file():
            shutil.copy2(bundle / LABELS, work / LABELS)
        write_json_atomic(work / PROBE_LABELS, probe.classes)
        comparisons = _gate(bundle, work, probe, manifest)
        passed = all(c.passed for c in comparisons)
        parity = json.loads((bundle / PARITY).read_text()) if (bundle / PARITY).is_file() else {}
        parity["probe"] = {"variant": "probe", "passed": passed, "comparisons": [asdict(c) for c in comparisons],
                           "notes": ["the attached probe's scores against scikit-learn on the parity cases; the "
                                     "model's own outputs are those of the parent bundle, whose entries are above"]}
        write_json_atomic(work / PARITY, parity)
        write_manifest(work, _manifest(bundle, manifest, probe, passed, comparisons))
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AttachResult(out, passed, comparisons)


def _manifest(bundle: Path, parent: dict, probe: Probe, passed: bool, comparisons: list[ProbeComparison]) -> dict:
    classes = len(probe.classes)
    manifest = {k: v for k, v in parent.items()
                if k not in ("files", "variants", "cpu_default", "optimize", "engines", MANIFEST)}
    manifest["outputs"] = [o for o in parent["outputs"] if o.get("name") not in (PROBE_LOGITS, PROBE_SCORES)] + [
        {"name": PROBE_LOGITS, "dtype": "float32", "shape": ["batch", classes]},
        {"name": PROBE_SCORES, "dtype": "float32", "shape": ["batch", classes]}]
    manifest["variants"] = {}
    manifest["default_head"] = "probe"
    manifest["probe"] = {
        "output": PROBE_LOGITS, "scores_output": PROBE_SCORES, "labels": PROBE_LABELS, "classes": probe.classes,
        "activation": probe.activation, "activation_why": probe.activation_why,
        "parent_bundle": str(bundle.resolve()), "parent_bundle_sha256": bundle_identity(bundle, parent)[1],
        "parent_model_id": parent.get("model_id"), "data": {k: v for k, v in probe.data.items() if k != "failed"},
        "metrics": probe.metrics, "split": probe.split.get("description"), "settings": probe.settings,
        "window": probe.window, "versions": probe.versions, "probe_file_fold_max_abs": probe.fold_max_abs,
    }
    manifest["parity"] = {**parent.get("parity", {}), "probe": {
        "passed": passed, "comparisons": len(comparisons), "failed": sum(not c.passed for c in comparisons),
        "max_abs_scores": max((c.max_abs for c in comparisons if c.output == PROBE_SCORES), default=None)}}
    if not passed:
        manifest["status"] = "failed-parity"
    manifest["notes"] = [*parent.get("notes", []),
                         f"probe attached ({classes} classes, {probe.activation}): outputs {PROBE_LOGITS} and "
                         f"{PROBE_SCORES}; classify, watch and listen use it by default (--head model for the "
                         "model's own head). Variants and engines of the parent are not carried: run `edgeenc "
                         "optimize` / `edgeenc build` on this bundle."]
    return manifest

