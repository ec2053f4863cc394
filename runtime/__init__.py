"""Torch-free inference: audio in, embeddings and class scores out.

The core is the path of one recording: bundle (the format), audio, windows, encoder, scores, writers,
resume, atomic. Five wings hang off it, each with its own short face and no arrows between them:
backends/ (what runs the graph), recorder/ (watch, listen), archive/ (Ray Data), bench/, probes/ (your own
classifier).
"""

from .audio import AudioError
from .bundle import BundleError
from .encoder import EmbeddingResult, Encoder, FileOutcome, RandomWeightsWarning, Stream
from .scores import NoClassifierHead, ScoreOptions
from .windows import WindowOptions

__all__ = ["AudioError", "BundleError", "EmbeddingResult", "Encoder", "FileOutcome", "NoClassifierHead",
           "RandomWeightsWarning", "ScoreOptions", "Stream", "WindowOptions"]
