"""What every backend is (Polygraphy's runner idea) and the one error a missing backend raises."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what to install or build.

    `not_installed` marks the plain case of a machine without that backend's software (no tensorrt, an
    onnxruntime without CUDA): nothing is broken, so `--device auto` need not explain it at length.
    """

    def __init__(self, message: str, *, not_installed: bool = False):
        super().__init__(message)
        self.not_installed = not_installed


class Backend(Protocol):
    name: str  # "trt", "cuda" or "cpu"
    description: str  # what actually runs, e.g. "onnxruntime 1.32.0 CPUExecutionProvider, 2 threads"
    variant: str  # what computes the numbers, without settings that do not change them (threads, versions)
    # The batch `optimize` measured fastest for this variant (manifest entry "throughput"); None: not measured.
    best_batch: int | None

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
