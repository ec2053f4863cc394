"""The model cards' three figures on a user's own labelled data, each computed by scikit-learn:

- **linear probe**: accuracy (one label per window) or macro average precision (mAP, several labels or none) of
  a probe fit on the training recordings, on the held-out recordings (train.split_by_file);
- **retrieval ROC AUC**: the cosine similarity of every pair of labelled windows as a score for "same label"
  (pairs that share a label are the positives);
- **clustering NMI**: k-means (k = number of labels, a fixed seed) on the windows with exactly one label,
  against those labels.

Retrieval and clustering need no training, so they use every labelled window (at most MAX_WINDOWS, drawn
with a fixed seed). train.evaluate computes all three for one bundle's embeddings.
"""

from __future__ import annotations

import numpy as np

SEED = 0  # every draw (held-out recordings, k-means starts, sampled windows) is seeded: two runs agree
MAX_WINDOWS = 3000  # retrieval compares every pair: 4.5 million at most


def import_sklearn():
    """scikit-learn, or an error naming the extra that brings it."""
    try:
        import sklearn
    except ImportError:
        raise ImportError("scikit-learn is not installed: pip install 'edgeenc[probe]'") from None
    return sklearn


def probe_metrics(scores: np.ndarray, targets: np.ndarray, classes: list[str], activation: str) -> dict:
    """Accuracy (softmax) or mAP, and precision / recall / average precision per class, of `scores` [n, classes]
    against `targets` [n, classes] (bool). A window's labels: its best (softmax), or those scoring >= 0.5."""
    import_sklearn()
    from sklearn.metrics import accuracy_score, average_precision_score, precision_score, recall_score

    predicted = np.zeros_like(targets, dtype=bool)
    if activation == "softmax":
        predicted[np.arange(len(scores)), scores.argmax(axis=1)] = True
    else:
        predicted = scores >= 0.5
    per_class, aps = {}, []
    for c, label in enumerate(classes):
        truth = targets[:, c]
        ap = float(average_precision_score(truth, scores[:, c])) if truth.any() else None
        if ap is not None:
            aps.append(ap)
        per_class[label] = {"support": int(truth.sum()),
                            "precision": float(precision_score(truth, predicted[:, c], zero_division=0)),
                            "recall": float(recall_score(truth, predicted[:, c], zero_division=0)),
                            "average_precision": ap}
    out: dict = {"task": "one label per window" if activation == "softmax" else "several labels or none per window",
                 "windows": int(len(scores))}
    if activation == "softmax":
        out["accuracy"] = float(accuracy_score(targets.argmax(axis=1), scores.argmax(axis=1)))
    out["macro_average_precision"] = float(np.mean(aps)) if aps else None
    out["per_class"] = per_class
    return out


def _sample(rows: np.ndarray, seed: int) -> np.ndarray:
    if len(rows) <= MAX_WINDOWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, MAX_WINDOWS, replace=False))


def retrieval_roc_auc(embeddings: np.ndarray, targets: np.ndarray, seed: int = SEED) -> float | None:
    """ROC AUC of cosine similarity for "these two windows share a label", over every pair of labelled windows."""
    import_sklearn()
    from sklearn.metrics import roc_auc_score

    rows = _sample(np.flatnonzero(targets.any(axis=1)), seed)
    if len(rows) < 2:
        return None
    x = embeddings[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    t = targets[rows].astype(np.float64)
    upper = np.triu_indices(len(rows), k=1)
    similar = (x @ x.T)[upper]
    same = ((t @ t.T) > 0)[upper]
    if same.all() or not same.any():
        return None
    return float(roc_auc_score(same, similar))


def clustering_nmi(embeddings: np.ndarray, targets: np.ndarray, seed: int = SEED) -> float | None:
    """Normalised mutual information of k-means clusters (k = labels) with the labels, over one-label windows."""
    import_sklearn()
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    rows = _sample(np.flatnonzero(targets.sum(axis=1) == 1), seed)
    labels = targets[rows].argmax(axis=1)
    k = len(np.unique(labels))
    if k < 2 or len(rows) <= k:
        return None
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embeddings[rows].astype(np.float64))
    return float(normalized_mutual_info_score(labels, clusters))


def headline(figures: dict) -> dict[str, float | None]:
    """The figures side by side: probe (accuracy or mAP), retrieval ROC AUC, clustering NMI."""
    probe = figures.get("accuracy", figures.get("macro_average_precision"))
    return {"probe " + ("accuracy" if "accuracy" in figures else "mAP"): probe,
            "retrieval ROC AUC": figures.get("retrieval_roc_auc"), "clustering NMI": figures.get("clustering_nmi")}


def plot_average_precision(figures_by_bundle: dict[str, dict], path) -> bool:
    """Per-class average precision bars, one colour per bundle, as a PNG at `path`; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(figures_by_bundle)
    classes = sorted({c for f in figures_by_bundle.values() for c in f.get("per_class", {})})
    width = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) * max(len(names), 1)), 4))
    for i, name in enumerate(names):
        per_class = figures_by_bundle[name].get("per_class", {})
        values = [per_class.get(c, {}).get("average_precision") or 0.0 for c in classes]
        axes.bar(np.arange(len(classes)) + i * width, values, width, label=name)
    axes.set_xticks(np.arange(len(classes)) + width * (len(names) - 1) / 2, classes, rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("average precision (held-out recordings)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
