"""The bundle folder: the only thing that crosses from export to runtime (CONTRACT.md).

The runtime is the bundle's reader, so the format lives here; export writes through this module
and never the other way round (tests/test_architecture.py holds the arrows). Torch-free: `edgeenc
info` and the runtime read and verify bundles with the standard library alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from edgeenc.hashing import sha256_file

from .atomic import write_json_atomic

MANIFEST = "manifest.json"
PARITY = "parity.json"
LABELS = "labels.json"
PROBE_LABELS = "probe_labels.json"  # the attached probe's class names, in the order of its output
HEADS = ("probe", "model")  # the classifier heads a bundle can have: a user's attached probe, the model's own
MANIFEST_FORMAT = 1
OPENVINO_PREFIX = "openvino:"
ENGINES = ("onnxruntime", "openvino")  # the CPU engines a variant runs on


class BundleError(ValueError):
    """A bundle that is missing, incomplete or changed since export."""


class FileEntry(TypedDict):
    sha256: str
    bytes: int


class Manifest(TypedDict, total=False):
    """manifest.json, the one description of a bundle (CONTRACT.md lists the promised fields).

    Written by `edgeenc export` (export/pipeline.py); `optimize` and `build` add to it through
    :func:`add_files_to_manifest`. Readers must tolerate missing optional fields: bundles from
    older versions lack the later ones.
    """

    format: int                  # MANIFEST_FORMAT of the writer
    model_id: str                # the avex id, e.g. esp_aves2_sl_eat_all_ssl_all
    architecture: str            # "beats" or "eat"
    sample_rate: int             # Hz of the `audio` input (16000; 32000 for sed_birdcode)
    embedding_dim: int           # width of `tokens` and `embedding`
    window_seconds: float        # the model's native window
    min_samples: int             # the shortest input the front end accepts
    num_classes: int             # 0 for an encoder without a classifier head
    classifier_pooling: str | None  # "cls" (EAT) or "mean" (BEATs) when there is a head
    activation: str | None       # how the head's logits become scores: "sigmoid" or "softmax"
    activation_why: str | None   # the reason, from the model's training
    inputs: list[dict[str, Any]]    # name, dtype, shape (dynamic axes as names)
    outputs: list[dict[str, Any]]   # tokens, embedding[, logits] with shapes
    opset: int
    licence: str                 # CC-BY-NC-SA-4.0 for every ESP checkpoint
    licence_note: str
    checkpoint: str              # where the weights came from (path, hub repo or "random-init")
    checkpoint_sha256: str | None
    random_init: bool            # True: random weights, every output is flagged
    hf_repository: str
    frontend: dict[str, Any]     # filterbank settings baked into the graph
    notes: list[str]             # where this bundle differs from avex, and why
    variants: dict[str, dict[str, Any]]  # model.<p>.onnx or openvino:<p> -> precision, parity, weights, gated_on, ...
    cpu_default: dict[str, Any]  # `optimize`'s timed winner: variant, engine, precision, ranking, timed_on (flags)
    optimize: dict[str, Any]     # what `edgeenc optimize` tried and measured
    engines: dict[str, dict[str, Any]]   # TensorRT engines added by `edgeenc build`
    tensorrt_op_check: dict[str, Any]    # ops outside TensorRT's ONNX support
    parity: dict[str, dict[str, Any]]    # variant -> summary of its parity gate
    status: str                  # "ok" or "failed-parity"
    versions: dict[str, str]     # edgeenc, torch, onnx, onnxruntime, python at export
    export_seconds: float
    files: dict[str, FileEntry]  # every file of the bundle but the manifest, with its sha256
    probe: dict[str, Any]        # `probe attach`: output, scores_output, labels, activation, classes, provenance
    default_head: str            # "probe" where a probe is attached (classify, watch, listen score with it)


def bundle_files(bundle: Path) -> list[str]:
    """Every file of the bundle except the manifest itself, as sorted relative paths."""
    bundle = Path(bundle)
    return sorted(
        str(p.relative_to(bundle))
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def hash_files(bundle: Path) -> dict[str, FileEntry]:
    return {
        name: {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
        for name in bundle_files(bundle)
    }


def write_manifest(bundle: Path, manifest: Manifest) -> Manifest:
    """Add the hash of every file in the folder and write manifest.json atomically."""
    bundle = Path(bundle)
    manifest = {**manifest, "format": MANIFEST_FORMAT, "files": hash_files(bundle)}
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest


def read_manifest(bundle: Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; pass the folder that `edgeenc export` wrote")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; is this a bundle written by `edgeenc export`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    check_manifest(bundle, manifest)
    return manifest


# What the runtime reads of every manifest, with the JSON type each must have.
REQUIRED = {"sample_rate": int, "window_seconds": (int, float), "embedding_dim": int, "outputs": list, "files": dict}


def check_manifest(bundle: Path, manifest: Manifest) -> None:
    """Raise BundleError for a manifest the runtime cannot trust: a newer format than it knows, a field it needs
    missing or of the wrong type, or a file it names outside the bundle (absolute, `..`, a link out)."""
    path = Path(bundle) / MANIFEST
    damaged = "the bundle is damaged or was edited: re-export it with `edgeenc export`"
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: not a manifest (a JSON object); {damaged}")
    version = manifest.get("format", MANIFEST_FORMAT)
    if not isinstance(version, int) or version > MANIFEST_FORMAT:
        raise BundleError(f"{path}: manifest format {version!r} is newer than this edgeenc reads ({MANIFEST_FORMAT}): "
                          "upgrade edgeenc (pip install -U edgeenc), or export the bundle again with this version")
    for name, kind in REQUIRED.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            what = "missing" if name not in manifest else f"a {type(manifest[name]).__name__}"
            raise BundleError(f"{path}: field {name!r} is {what}; {damaged}")
    if not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in manifest["outputs"]):
        raise BundleError(f"{path}: every entry of 'outputs' needs a name; {damaged}")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{path}: files[{name!r}] has no sha256; {damaged}")
    named = list(manifest["files"])
    probe = manifest.get("probe")
    if probe is not None:
        if not isinstance(probe, dict) or not isinstance(probe.get("output"), str):
            raise BundleError(f"{path}: field 'probe' must name the probe's output; {damaged}")
        named.append(str(probe.get("labels") or PROBE_LABELS))
    for key, entry in variants(manifest).items():
        parsed = VariantKey.parse(key)
        named.append(parsed.file(entry if isinstance(entry, dict) else None))
    outside = [name for name in named if not inside(bundle, name)]
    if outside:
        raise BundleError(f"{path} names a file outside the bundle ({outside[0]!r}); a manifest may name only files "
                          f"inside its own folder: {damaged}")


def inside(bundle: Path, name: str) -> bool:
    """Whether `name` is a relative path that stays inside the bundle folder, links resolved."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        return False
    root = Path(bundle).resolve()
    return (root / relative).resolve().is_relative_to(root)


def verify_bundle(bundle: Path, manifest: Manifest | None = None) -> list[str]:
    """Problems found (changed, missing or unlisted files), empty when the bundle is intact."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    listed = manifest.get("files", {})
    problems = []
    for name, entry in sorted(listed.items()):
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: changed since export (sha256 differs from the manifest)")
    for name in bundle_files(bundle):
        if name not in listed and not name.startswith("engines/"):
            problems.append(f"{name}: not listed in the manifest")
    return problems


def bundle_identity(bundle: Path, manifest: Manifest) -> tuple[str, str]:
    """(model_id, bundle hash): the hash is model.onnx's sha256 as the manifest records it. Results stores and
    archive shards are bound to it, so that embeddings of different bundles are never mixed."""
    entry = manifest.get("files", {}).get("model.onnx")
    if entry and entry.get("sha256"):
        return str(manifest.get("model_id")), str(entry["sha256"])
    onnx = Path(bundle) / "model.onnx"
    if not onnx.is_file():
        raise BundleError(f"{bundle}: no model.onnx to identify the bundle by")
    return str(manifest.get("model_id")), sha256_file(onnx)


def add_files_to_manifest(bundle: Path, names: list[str], **fields: Any) -> Manifest:
    """Hash files added after export (engines, optimised variants) into the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    manifest.update(fields)
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- accessors


def output_names(manifest: Manifest, *, tokens: bool = True) -> list[str]:
    """The graph's outputs in order (tokens, embedding[, logits]); without `tokens` what the runtime keeps per
    window (the token grid is for parity checks, not for users)."""
    return [o["name"] for o in manifest["outputs"] if tokens or o["name"] != "tokens"]


def has_classifier(manifest: Manifest) -> bool:
    return "logits" in output_names(manifest)


@dataclass(frozen=True)
class Head:
    """One classifier head of a bundle: which graph output holds its logits, its labels file and activation."""

    name: str  # "model" (the checkpoint's own) or "probe" (attached by `edgeenc probe attach`)
    output: str  # the graph output of its logits
    labels_file: str
    activation: str
    activation_why: str
    num_classes: int


def heads(manifest: Manifest) -> dict[str, Head]:
    """The bundle's classifier heads by name (none for a features-only model without a probe)."""
    found = {}
    probe = manifest.get("probe")
    if isinstance(probe, dict) and probe.get("output") in output_names(manifest):
        found["probe"] = Head("probe", str(probe["output"]), str(probe.get("labels") or PROBE_LABELS),
                              str(probe.get("activation") or "sigmoid"),
                              str(probe.get("activation_why") or "the probe's training"), len(probe.get("classes", [])))
    if "logits" in output_names(manifest):
        activation, why = model_head_activation(manifest)
        found["model"] = Head("model", "logits", LABELS, activation, why, int(manifest.get("num_classes") or 0))
    return found


def choose_head(manifest: Manifest, name: str | None = None) -> Head | None:
    """The head asked for by `name`, else the default: the attached probe where there is one, else the model's own.
    Raises BundleError naming the heads there are when the asked one is not in the bundle."""
    found = heads(manifest)
    if name is None:
        wanted = manifest.get("default_head") or "probe"
        return found.get(wanted) or found.get("probe") or found.get("model")
    if name not in HEADS:
        raise BundleError(f"unknown head {name!r}: choose probe (an attached probe) or model (the model's own head)")
    if name not in found:
        there = " and ".join(found) or "no classifier head"
        fix = "attach one with `edgeenc probe attach`" if name == "probe" else "this model has no head of its own"
        raise BundleError(f"{manifest.get('model_id')}: no {name} head in this bundle ({there}): {fix}")
    return found[name]


def head_activation(manifest: Manifest) -> tuple[str, str]:
    """(activation, why) of the bundle's default head (the attached probe's where it has one)."""
    head = choose_head(manifest)
    if head is not None and head.name == "probe":
        return head.activation, head.activation_why
    return model_head_activation(manifest)


def model_head_activation(manifest: Manifest) -> tuple[str, str]:
    """(activation, why) of the bundle's head: the manifest's own, else what bundles exported before it was
    recorded need (the ESP `sl_*` heads are multi-label: sigmoid; another head: softmax, one label per window)."""
    if manifest.get("activation"):
        return str(manifest["activation"]), str(manifest.get("activation_why") or "recorded at export")
    if str(manifest.get("model_id", "")).startswith("esp_aves2_sl_"):
        return "sigmoid", "an ESP sl_* head (multi-label); this bundle was exported before edgeenc recorded it"
    return "softmax", "no activation recorded for this head: one label per window"


def variants(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """manifest["variants"]: every variant `export` and `optimize` tried, passed or not (empty for old bundles)."""
    return manifest.get("variants") or {}


def variant_entry(manifest: Manifest, key: str | VariantKey) -> dict[str, Any]:
    """The entry of one variant, or {} when the bundle has none of that name."""
    return variants(manifest).get(str(key)) or {}


def gated(entry: dict[str, Any]) -> bool:
    """Whether a variant entry passed its quality gate (only those are ever run)."""
    return bool(entry.get("parity"))


@dataclass(frozen=True)
class VariantKey:
    """A key of manifest["variants"]: an ONNX Runtime file of the bundle ("model.int8dyn.onnx") or an OpenVINO
    precision of model.onnx ("openvino:bf16")."""

    engine: str  # one of ENGINES
    name: str  # the ONNX file for ONNX Runtime, the precision for OpenVINO

    @classmethod
    def parse(cls, key: str | VariantKey) -> VariantKey:
        if isinstance(key, VariantKey):
            return key
        if key.startswith(OPENVINO_PREFIX):
            return cls("openvino", key[len(OPENVINO_PREFIX):])
        return cls("onnxruntime", key)

    @classmethod
    def onnxruntime(cls, variant: str) -> VariantKey:
        """The file of a user's `--variant` name: "fp32" is model.onnx, "int8dyn" model.int8dyn.onnx."""
        return cls("onnxruntime", "model.onnx" if variant == "fp32" else f"model.{variant}.onnx")

    @classmethod
    def openvino(cls, precision: str) -> VariantKey:
        return cls("openvino", precision)

    @property
    def short(self) -> str:
        """The name `--variant` takes: "int8dyn" for model.int8dyn.onnx, "fp32" for model.onnx, "bf16" for
        OpenVINO's bf16."""
        if self.engine == "openvino":
            return self.name
        return "fp32" if self.name == "model.onnx" else self.name[len("model."):-len(".onnx")]

    def file(self, entry: dict[str, Any] | None = None) -> str:
        """The bundle file the engine reads: the key itself for ONNX Runtime, the entry's source for OpenVINO."""
        return (entry or {}).get("source", "model.onnx") if self.engine == "openvino" else self.name

    def __str__(self) -> str:
        return OPENVINO_PREFIX + self.name if self.engine == "openvino" else self.name
