"""A linear probe on frozen embeddings, as the model cards use these encoders: scikit-learn's logistic regression.

- **Windows and labels**: every window of a recording takes the labels of the spans it overlaps (data.py).
- **Split by recording**: the held-out recordings are chosen per file (stratified by each file's rarest label,
  a fixed seed), so windows of one recording never sit on both sides; the figures are those of a probe fit on
  the other recordings. The probe that is kept is then fit on every recording with the same settings.
- **The fit**: standardised embeddings, logistic regression with balanced class weights and a fixed seed (two
  runs on the same data give the same probe). One label per window: one multinomial (softmax) regression.
  Windows with several labels, or windows with none (negatives): one-vs-rest, one sigmoid per label.
- **The probe**: the standardisation is folded into the weights, so scores are ``activation(W @ embedding + b)``
  with nothing else to carry: probe.json (documented in docs/probes.md), never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeenc.hashing import sha256_file

from ..atomic import atomic_text, write_json_atomic
from ..encoder import EmbeddingResult
from .data import MIN_OVERLAP, LabelledDataError, Recording
from .metrics import SEED, clustering_nmi, import_sklearn, probe_metrics, retrieval_roc_auc

PROBE_FILE = "probe.json"
REPORT_FILE = "report.md"
PROBE_FORMAT = 1
MAX_FOLDS = 5  # at most 1 in 5 recordings (per label) is held out


class ProbeError(ValueError):
    """A probe file that cannot be used as given; the message names the file and the fix."""


@dataclass
class LabelledWindows:
    """The windows of labelled recordings with their embeddings and labels."""

    embeddings: np.ndarray  # [n, dim] float32
    targets: np.ndarray  # [n, classes] bool: the labels of each window
    classes: list[str]
    groups: np.ndarray  # [n] index into `files`: the recording of each window
    files: list[str]
    starts: np.ndarray  # [n] seconds
    ends: np.ndarray

    @property
    def multilabel(self) -> bool:
        """Whether a window can have several labels, or none (negatives): then one sigmoid per label."""
        per_window = self.targets.sum(axis=1)
        return bool((per_window != 1).any())

    @property
    def activation(self) -> str:
        """How the probe's logits become scores: one sigmoid per label (multilabel), else softmax."""
        return "sigmoid" if self.multilabel else "softmax"

    def file_labels(self) -> list[frozenset[str]]:
        """The labels of each recording's windows together."""
        found: list[set[str]] = [set() for _ in self.files]
        for group, row in zip(self.groups, self.targets):
            found[group].update(self.classes[c] for c in np.flatnonzero(row))
        return [frozenset(f) for f in found]


def labelled_windows(recordings: list[Recording], results: Mapping[str, EmbeddingResult],
                     min_overlap: float = MIN_OVERLAP) -> LabelledWindows:
    """Each embedded window of `recordings` (those in `results`, by path) with the labels its spans give it."""
    used = [r for r in recordings if r.path in results and len(results[r.path])]
    if not used:
        raise LabelledDataError("no labelled recording could be embedded: nothing to train on")
    rows: list[tuple[int, float, float, frozenset[str]]] = []
    embeddings = []
    for index, recording in enumerate(used):
        result = results[recording.path]
        keep = [recording.used(float(s), float(e)) for s, e in zip(result.starts, result.ends)]
        for start, end, kept in zip(result.starts, result.ends, keep):
            if kept:
                rows.append((index, float(start), float(end), recording.labels_of(float(start), float(end),
                                                                                   min_overlap)))
        embeddings.append(result.embeddings[np.asarray(keep, bool)])
    classes = sorted({label for *_, labels in rows for label in labels})
    if not classes:
        raise LabelledDataError("no window of the data overlaps a labelled span: nothing but negatives to train on")
    column = {label: i for i, label in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), bool)
    for i, (*_, labels) in enumerate(rows):
        targets[i, [column[label] for label in labels]] = True
    return LabelledWindows(np.concatenate(embeddings).astype(np.float32), targets, classes,
                           np.array([r[0] for r in rows]), [r.path for r in used],
                           np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))


def fingerprint(recordings: list[Recording], min_overlap: float) -> str:
    """The training data's identity: every recording's content (sha256, not its path) and its labelled spans."""
    items = sorted((sha256_file(r.path), sorted((s.start, s.end if s.end is not None else -1.0, s.label or "")
                                                for s in r.spans)) for r in recordings)
    return hashlib.sha256(json.dumps([min_overlap, items]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the split


@dataclass
class Split:
    train: np.ndarray  # window indices
    test: np.ndarray
    test_files: list[str]
    folds: int
    description: str


def split_by_file(data: LabelledWindows, seed: int = SEED) -> Split:
    """Hold out about 1 in `folds` recordings of every label (stratified by each recording's rarest label), so
    that no recording has windows on both sides. Raises LabelledDataError for a label with under 2 recordings."""
    import_sklearn()
    from sklearn.model_selection import StratifiedKFold

    file_labels = data.file_labels()
    per_label = {c: [f for f, labels in zip(data.files, file_labels) if c in labels] for c in data.classes}
    few = {c: files for c, files in per_label.items() if len(files) < 2}
    if few:
        label, files = next(iter(few.items()))
        raise LabelledDataError(
            f"label {label!r} has {len(files)} recording(s) ({', '.join(Path(f).name for f in files)}): a probe needs "
            "at least 2 recordings of every label to hold one out for its figures; add recordings of it" +
            (f" (also too few: {', '.join(sorted(few)[1:6])})" if len(few) > 1 else ""))
    frequency = {c: len(files) for c, files in per_label.items()}
    strata = [min(labels, key=lambda c: (frequency[c], c)) if labels else "" for labels in file_labels]
    counts = {s: strata.count(s) for s in set(strata)}
    folds = max(2, min(MAX_FOLDS, min(n for s, n in counts.items() if s)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stratum (the negatives) smaller than the folds: sklearn warns
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        _, test_files = next(splitter.split(np.zeros(len(strata)), strata))
    test_mask = np.isin(data.groups, test_files)
    train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    for c, label in enumerate(data.classes):
        for side, rows in (("training", train), ("held-out", test)):
            if not data.targets[rows, c].any():
                raise LabelledDataError(
                    f"label {label!r}: no window of the {side} recordings has it (its annotations are too short for "
                    "the window, or too few recordings have it): add recordings of it, or a smaller --min-overlap")
    if not data.multilabel and len(data.classes) < 2:
        raise LabelledDataError(f"only one label ({data.classes[0]!r}) and no negatives: add recordings of another "
                                "label or of background (a folder named negative)")
    names = sorted(Path(data.files[i]).name for i in test_files)
    description = (f"by recording: {len(test_files)} of {len(data.files)} recordings held out (1 in {folds}, "
                   f"stratified by each recording's rarest label, seed {seed}); no recording has windows on both "
                   "sides. The figures are those of a probe fit on the other recordings; the probe kept is fit on "
                   "all of them.")
    return Split(train, test, names, folds, description)


# ---------------------------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class ProbeSettings:
    c: float = 1.0  # inverse regularisation strength of the logistic regression
    max_iter: int = 2000
    seed: int = SEED
    min_overlap: float = MIN_OVERLAP


def fit_linear(embeddings: np.ndarray, targets: np.ndarray, multilabel: bool, settings: ProbeSettings
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """(weights [classes, dim], bias [classes], fold error): a standardised logistic regression with the
    standardisation folded in, and the largest difference of its scores from scikit-learn's own predict_proba."""
    import_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    x = embeddings.astype(np.float64)
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    regression = LogisticRegression(C=settings.c, class_weight="balanced", max_iter=settings.max_iter,
                                    random_state=settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny, separable sets: the fold check below holds
        if multilabel:
            model = OneVsRestClassifier(regression).fit(z, targets.astype(int))
            coef = np.vstack([e.coef_ for e in model.estimators_])
            intercept = np.concatenate([e.intercept_ for e in model.estimators_])
            expected = model.predict_proba(z)
        else:
            model = regression.fit(z, targets.argmax(axis=1))
            coef, intercept = model.coef_, model.intercept_
            if coef.shape[0] == 1:  # two classes: sklearn keeps one row; softmax([0, s]) == sigmoid(s)
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
            expected = model.predict_proba(z)
    weights = coef / scaler.scale_
    bias = intercept - (coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    weights, bias = weights.astype(np.float32), bias.astype(np.float32)
    got = probe_scores(embeddings, weights, bias, "sigmoid" if multilabel else "softmax")
    return weights, bias, float(np.abs(got - expected).max())


def probe_scores(embeddings: np.ndarray, weights: np.ndarray, bias: np.ndarray, activation: str) -> np.ndarray:
    """activation(embeddings @ weights.T + bias) in float64: what the attached graph computes."""
    logits = embeddings.astype(np.float64) @ weights.astype(np.float64).T + bias.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- the probe


@dataclass
class Probe:
    """A trained probe: probe.json's content (docs/probes.md lists every field)."""

    classes: list[str]
    activation: str  # sigmoid (one-vs-rest) or softmax (multinomial)
    weights: np.ndarray  # [classes, embedding_dim] float32, standardisation folded in
    bias: np.ndarray  # [classes] float32
    bundle: dict[str, Any]  # model_id, bundle_sha256, checkpoint_sha256, variant: the embeddings it was fit on
    data: dict[str, Any] = field(default_factory=dict)  # fingerprint, counts per class, recordings, failures
    split: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out figures (metrics.py)
    settings: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    fold_max_abs: float = 0.0  # folded weights against sklearn's predict_proba on the training windows

    @property
    def embedding_dim(self) -> int:
        return int(self.weights.shape[1])

    @property
    def activation_why(self) -> str:
        return ("one-vs-rest logistic regression: windows may have several labels or none" if self.activation ==
                "sigmoid" else "multinomial logistic regression: every training window had exactly one label")

    def to_json(self) -> dict[str, Any]:
        return {"format": PROBE_FORMAT, "kind": "edgeenc linear probe", "classes": self.classes,
                "activation": self.activation, "activation_why": self.activation_why,
                "embedding_dim": self.embedding_dim, "weights": self.weights.tolist(), "bias": self.bias.tolist(),
                "bundle": self.bundle, "data": self.data, "split": self.split, "metrics": self.metrics,
                "settings": self.settings, "window": self.window, "versions": self.versions,
                "fold_max_abs": self.fold_max_abs}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / PROBE_FILE, self.to_json())
        with atomic_text(folder / REPORT_FILE) as fh:
            fh.write(report(self))
        return folder / PROBE_FILE

    @classmethod
    def load(cls, folder: str | Path) -> Probe:
        path = Path(folder)
        path = path / PROBE_FILE if path.is_dir() else path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProbeError(f"{path}: no probe here; train one with `edgeenc probe train BUNDLE DATA -o DIR`"
                             ) from None
        except (OSError, ValueError) as exc:
            raise ProbeError(f"{path}: cannot be read ({exc}); train the probe again") from None
        if not isinstance(raw, dict) or raw.get("kind") != "edgeenc linear probe":
            raise ProbeError(f"{path}: not an edgeenc probe file")
        if int(raw.get("format", 0)) > PROBE_FORMAT:
            raise ProbeError(f"{path}: probe format {raw.get('format')} is newer than this edgeenc reads "
                             f"({PROBE_FORMAT}): upgrade edgeenc")
        try:
            weights = np.asarray(raw["weights"], np.float32)
            bias = np.asarray(raw["bias"], np.float32)
            classes = [str(c) for c in raw["classes"]]
            activation = str(raw["activation"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProbeError(f"{path}: field {exc} is missing or malformed; train the probe again") from None
        if weights.ndim != 2 or weights.shape[0] != len(classes) or bias.shape != (len(classes),) or \
                activation not in ("sigmoid", "softmax") or not np.isfinite(weights).all() or \
                not np.isfinite(bias).all():
            raise ProbeError(f"{path}: weights {list(weights.shape)}, bias {list(bias.shape)} and {len(classes)} "
                             f"classes ({activation}) do not make a probe; train the probe again")
        return cls(classes, activation, weights, bias, dict(raw.get("bundle") or {}), dict(raw.get("data") or {}),
                   dict(raw.get("split") or {}), dict(raw.get("metrics") or {}), dict(raw.get("settings") or {}),
                   dict(raw.get("window") or {}), dict(raw.get("versions") or {}), float(raw.get("fold_max_abs", 0)))


def versions() -> dict[str, str]:
    import sklearn

    from edgeenc import __version__

    return {"edgeenc": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def counts(data: LabelledWindows) -> dict[str, dict[str, int]]:
    """Windows and recordings of every label."""
    return {label: {"windows": int(data.targets[:, c].sum()),
                    "recordings": int(len(np.unique(data.groups[data.targets[:, c]])))}
            for c, label in enumerate(data.classes)}


def train_probe(data: LabelledWindows, bundle: dict[str, Any], settings: ProbeSettings = ProbeSettings(), *,
                data_info: dict[str, Any] | None = None, window: dict[str, Any] | None = None) -> Probe:
    """Split by recording, fit on the training recordings, measure on the held-out ones (metrics.py), then fit
    the probe that is kept on every recording."""
    started = time.perf_counter()
    figures = evaluate(data, settings)
    split_info = figures.pop("split")
    weights, bias, fold_error = fit_linear(data.embeddings, data.targets, data.multilabel, settings)
    negatives = int((~data.targets.any(axis=1)).sum())
    info = {**(data_info or {}), "recordings": len(data.files), "windows": int(len(data.groups)),
            "negative_windows": negatives, "per_class": counts(data)}
    return Probe(data.classes, data.activation, weights, bias, bundle, info, split_info,
                 {**figures, "fit_seconds": round(time.perf_counter() - started, 3)},
                 {**asdict(settings), "solver": "lbfgs", "class_weight": "balanced", "standardised": True,
                  "scheme": "one-vs-rest" if data.multilabel else "multinomial"},
                 window or {}, versions(), fold_error)


def evaluate(data: LabelledWindows, settings: ProbeSettings = ProbeSettings()) -> dict:
    """The three figures of one bundle's embeddings of `data`: the probe's on the held-out recordings, retrieval
    and clustering on every labelled window; with the split it used."""
    split = split_by_file(data, settings.seed)
    weights, bias, _ = fit_linear(data.embeddings[split.train], data.targets[split.train], data.multilabel, settings)
    held_out = probe_metrics(probe_scores(data.embeddings[split.test], weights, bias, data.activation),
                             data.targets[split.test], data.classes, data.activation)
    return {**held_out,
            "retrieval_roc_auc": retrieval_roc_auc(data.embeddings, data.targets, settings.seed),
            "clustering_nmi": clustering_nmi(data.embeddings, data.targets, settings.seed),
            "split": {"description": split.description, "folds": split.folds, "held_out_recordings": split.test_files,
                      "train_windows": int(len(split.train)), "held_out_windows": int(len(split.test))}}


def report(probe: Probe) -> str:
    """report.md: what was trained on what, the split, and the held-out figures, for a person."""
    m = probe.metrics
    lines = [f"# Linear probe on {probe.bundle.get('model_id')}", "",
             f"- Classes ({len(probe.classes)}): {', '.join(probe.classes)}",
             f"- Scores: {probe.activation} ({probe.activation_why})",
             f"- Embeddings of bundle model.onnx sha256 {probe.bundle.get('bundle_sha256')}, "
             f"variant {probe.bundle.get('variant')}",
             f"- Data: {probe.data.get('source')}: {probe.data.get('recordings')} recordings, "
             f"{probe.data.get('windows')} windows ({probe.data.get('negative_windows')} with no label); "
             f"fingerprint {probe.data.get('fingerprint')}",
             f"- Windows: {probe.window}", f"- Split: {probe.split.get('description')}",
             f"- Held-out recordings: {', '.join(probe.split.get('held_out_recordings', []))}", "",
             "## Held-out figures", ""]
    if "accuracy" in m:
        lines.append(f"- Accuracy (one label per window): {m['accuracy']:.4f}")
    if m.get("macro_average_precision") is not None:
        lines.append(f"- Macro average precision (mAP): {m['macro_average_precision']:.4f}")
    for key, name in (("retrieval_roc_auc", "Retrieval ROC AUC (cosine, every labelled window)"),
                      ("clustering_nmi", "Clustering NMI (k-means, windows with one label)")):
        if m.get(key) is not None:
            lines.append(f"- {name}: {m[key]:.4f}")
    lines += ["", "| label | held-out windows | precision | recall | average precision |", "|---|---|---|---|---|"]
    for label, row in m.get("per_class", {}).items():
        ap = "" if row.get("average_precision") is None else f"{row['average_precision']:.4f}"
        lines.append(f"| {label} | {row['support']} | {row['precision']:.4f} | {row['recall']:.4f} | {ap} |")
    lines += ["", "## Training windows per class", "", "| label | recordings | windows |", "|---|---|---|"]
    for label, row in probe.data.get("per_class", {}).items():
        lines.append(f"| {label} | {row['recordings']} | {row['windows']} |")
    failed = probe.data.get("failed") or {}
    if failed:
        lines += ["", "## Recordings not used", ""] + [f"- {path}: {why}" for path, why in failed.items()]
    lines += ["", f"Settings: {json.dumps(probe.settings)}", f"Versions: {json.dumps(probe.versions)}", ""]
    return "\n".join(lines)
