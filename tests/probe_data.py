"""Labelled audio made for the probe tests: distinct calls (tones, up-chirps, pulse trains) in noise.

`make_dataset(root)` writes a folder per label (BirdNET-Analyzer's layout), negatives (noise only), and a folder
"chirp,tone" whose recordings hold both calls, and returns what it wrote so that tests can write the same
labels as a CSV or a Raven table. Each recording draws its own pitch, level and noise, so recordings of one
label differ as field recordings of one species do.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
SECONDS = 6.0


def tone(rng, t):
    f = rng.uniform(900, 1300)
    return np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))


def chirp(rng, t):
    period = rng.uniform(0.4, 0.6)  # repeated up-sweeps, 3 kHz -> 6 kHz
    phase = (t % period) / period
    f0, f1 = rng.uniform(2800, 3200), rng.uniform(5500, 6500)
    return np.sin(2 * np.pi * (f0 * phase + 0.5 * (f1 - f0) * phase ** 2) * period)


def pulses(rng, t):
    rate = rng.uniform(7, 10)  # clicks of a broadband 300 Hz-centred burst
    gate = ((t * rate) % 1.0) < 0.15
    return gate * np.sin(2 * np.pi * rng.uniform(250, 350) * t) * 1.5


CALLS = {"tone": tone, "chirp": chirp, "pulses": pulses}


@dataclass
class Written:
    path: Path
    labels: tuple[str, ...]  # () for a negative
    seconds: float


def recording(rng, labels, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    audio = rng.standard_normal(len(t)) * rng.uniform(0.01, 0.03)
    for label in labels:
        audio += CALLS[label](rng, t) * rng.uniform(0.15, 0.3)
    return (audio / max(1.0, np.abs(audio).max() * 1.05)).astype(np.float32)


def make_dataset(root: Path, per_label: int = 4, negatives: int = 3, both: int = 2, seed: int = 0,
                 seconds: float = SECONDS) -> list[Written]:
    """root/<label>/<label>_<i>.wav for tone, chirp and pulses; root/negative/; root/chirp,tone/ (both)."""
    rng = np.random.default_rng(seed)
    plan = [(label, (label,), per_label) for label in CALLS] + [("negative", (), negatives),
                                                               ("chirp,tone", ("chirp", "tone"), both)]
    written = []
    for folder, labels, count in plan:
        for i in range(count):
            path = root / folder / f"{folder.replace(',', '+')}_{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, recording(rng, labels, seconds), RATE, subtype="PCM_16")
            written.append(Written(path, labels, seconds))
    return written


def write_csv(path: Path, written: list[Written]) -> None:
    """The same labels as the folders, as file,start,end,label rows (a negative: one row with no label)."""
    with open(path, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["file", "start", "end", "label"])
        for w in written:
            for label in w.labels or ("",):
                rows.writerow([Path(os.path.relpath(w.path, path.parent)).as_posix(), 0, f"{w.seconds:g}", label])


def write_raven(path: Path, written: list[Written], column: str = "Species") -> None:
    """One Raven selection table naming each recording in Begin File (relative to the table)."""
    header = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)",
              "Begin File", column]
    rows = ["\t".join(header)]
    n = 0
    for w in written:
        for label in w.labels or ("",):
            n += 1
            rows.append("\t".join([str(n), "Spectrogram 1", "1", "0", f"{w.seconds:g}", "0", "8000",
                                   Path(os.path.relpath(w.path, path.parent)).as_posix(), label]))
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":  # python tests/probe_data.py OUT: the labelled set README's example trains on
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "calls")
    made = make_dataset(out, per_label=6, negatives=4, both=3, seed=2)
    print(f"wrote {len(made)} recordings of {SECONDS:g} s under {out}/: tone, chirp, pulses, chirp,tone, negative")
