"""An inbox of recordings made from the real bird recording (edgeenc/data/birds_10s.wav), for the real-audio row of
benchmarks/search/: each file is 30 s of pieces of it (random start, gain, sometimes reversed) over noise at a
random level, so that windows repeat calls at different strengths and positions, as a season on one site does.

    python benchmarks/search_inbox.py OUT_DIR --files 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

SOURCE = Path(__file__).resolve().parents[1] / "edgeenc" / "data" / "birds_10s.wav"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    audio, rate = sf.read(SOURCE, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    rng = np.random.default_rng(0)
    args.out.mkdir(parents=True, exist_ok=True)
    length = int(args.seconds * rate)
    for f in range(args.files):
        out = rng.standard_normal(length).astype(np.float32) * float(10 ** rng.uniform(-3.5, -1.5))
        at = 0
        while at < length:
            piece = int(rng.uniform(0.5, 4.0) * rate)
            start = int(rng.integers(0, len(audio) - piece))
            chunk = audio[start:start + piece] * float(10 ** rng.uniform(-1.0, 0.3))
            if rng.random() < 0.3:
                chunk = chunk[::-1]
            end = min(length, at + piece)
            out[at:end] += chunk[: end - at]
            at = end + int(rng.uniform(0.0, 2.0) * rate)
        sf.write(args.out / f"site_{f:04d}.wav", np.clip(out, -1, 1), rate, subtype="PCM_16")


if __name__ == "__main__":
    main()
