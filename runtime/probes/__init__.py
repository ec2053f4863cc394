"""Your own classifier on the encoder's frozen embeddings: labelled data in (data.py), a linear probe trained with
scikit-learn and split by recording (train.py), the model cards' figures (metrics.py), and the probe attached
into the bundle's graph as a head every consumer runs (attach.py). Torch-free: the runtime, scikit-learn and onnx
(`edgeenc[probe]`)."""

from .attach import AttachError, AttachResult, attach_probe
from .data import NEGATIVE_NAMES, LabelledDataError, Recording, Span, check_spans, load_labelled
from .metrics import headline, plot_average_precision
from .train import (
    PROBE_FILE,
    REPORT_FILE,
    LabelledWindows,
    Probe,
    ProbeError,
    ProbeSettings,
    evaluate,
    fingerprint,
    labelled_windows,
    train_probe,
)

__all__ = [
    "NEGATIVE_NAMES", "PROBE_FILE", "REPORT_FILE", "AttachError", "AttachResult", "LabelledDataError",
    "LabelledWindows", "Probe", "ProbeError", "ProbeSettings", "Recording", "Span", "attach_probe", "check_spans",
    "evaluate", "fingerprint", "headline", "labelled_windows", "load_labelled", "plot_average_precision",
    "train_probe",
]
