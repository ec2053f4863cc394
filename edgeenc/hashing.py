"""File hashes shared by every layer: checkpoints (models), bundle files (export, runtime), stores.

It lives beside the CLI, not in one of the layers, because models/ must not import export/ or
runtime/ and the runtime must not import models/: a neutral leaf that imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
