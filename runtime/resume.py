"""Resumable multi-file runs: each finished file's windows are saved at once, beside the output.

`edgeenc embed` and `edgeenc classify` over an archive can take hours. Every finished file is
written atomically to `<OUT>.parts/` as soon as it is done, so a crash or a power cut loses at
most the files in flight; the next run with the same output skips every file whose part is there
(same path, size and mtime) and the final table is assembled from the parts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .encoder import EmbeddingResult


class PartFolder:
    """One `.npz` per finished input file, keyed by its absolute path, size and mtime."""

    def __init__(self, out: str | os.PathLike, metadata: dict[str, str]) -> None:
        out = Path(out)
        self.folder = out.with_name(out.name + ".parts")
        # Parts from another bundle or backend must not be mixed into this table.
        self.fingerprint = "|".join(f"{k}={metadata.get(k)}" for k in ("model_id", "checkpoint_sha256", "bundle"))

    def _path(self, audio: str | os.PathLike) -> Path:
        stat = Path(audio).stat()
        key = f"{Path(audio).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.fingerprint}"
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")

    def load(self, audio: str | os.PathLike) -> EmbeddingResult | None:
        """The saved result of `audio`, or None when it has none (or the file changed since)."""
        try:
            path = self._path(audio)
        except OSError:
            return None
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as part:
                logits = part["logits"] if part["logits"].size else None
                return EmbeddingResult(str(audio), part["starts"], part["ends"], part["embeddings"], logits)
        except (OSError, ValueError, KeyError):
            return None  # a part cut short by a crash: redo that file

    def save(self, result: EmbeddingResult) -> None:
        logits = result.logits if result.logits is not None else np.zeros((0, 0), np.float32)
        with atomic_path(self._path(result.file)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, starts=result.starts, ends=result.ends, embeddings=result.embeddings, logits=logits)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
