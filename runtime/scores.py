"""Class scores from logits: the one activation, top-k and threshold behind classify, watch, listen and Ray.

Every command that turns a window's logits into labels goes through :func:`detections`, so the same
window gets the same labels and scores whichever path ran it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ACTIVATIONS = ("softmax", "sigmoid")


class NoClassifierHead(ValueError):
    """Scores were asked of a bundle whose model has no classifier head."""

    def __init__(self, model_id: str | None) -> None:
        super().__init__(f"{model_id or 'this bundle'} has no classifier head: use `edgeenc embed` for embeddings")


@dataclass(frozen=True)
class ScoreOptions:
    """Which labels of a window are kept: the `top_k` best after `activation`, none below `threshold`."""

    top_k: int = 5
    threshold: float | None = None
    activation: str = "softmax"  # softmax: one label per window; sigmoid: independent labels

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose {' or '.join(ACTIVATIONS)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a score between 0 and 1, got {self.threshold:g}")


class Detection(NamedTuple):
    window: int  # index of the window in the logits given
    label: str
    rank: int  # 1-based within its window
    score: float


def activate(logits: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """Scores [windows, classes] in float64 from logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if activation == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    raise ValueError(f"unknown activation {activation!r}; choose {' or '.join(ACTIVATIONS)}")


def detections(logits: np.ndarray | None, labels: list[str] | None, options: ScoreOptions) -> list[Detection]:
    """The kept labels of every window, best first; none for a model without a head (`logits` None)."""
    if logits is None or not labels:
        return []
    scores = activate(logits, options.activation)
    k = max(1, min(options.top_k, scores.shape[1]))
    found = []
    for window, row in enumerate(scores):
        for rank, cls in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            if options.threshold is not None and row[cls] < options.threshold:
                break
            found.append(Detection(window, labels[cls], rank, float(row[cls])))
    return found
