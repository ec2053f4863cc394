#!/usr/bin/env python3
"""Worst-case parity of our PyTorch models and of the exported ONNX graphs against avex's golden outputs.

    python benchmarks/parity_table.py [--work /tmp/edgeenc-parity]

Makes the seed-0 fixture checkpoints (shared/fixtures/make_checkpoint.py), exports both bundles with
`edgeenc export` when they are not in WORK yet, and prints a markdown table over every golden case.
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgeenc.export.parity import error_stats
from edgeenc.models.checkpoints import load_model

SHARED = next(
    p
    for p in (Path(__file__).resolve().parents[1] / "shared", Path(__file__).resolve().parents[2] / "shared")
    if (p / "fixtures").is_dir()
)
MODELS = [
    ("beats", "esp_aves2_naturelm_audio_v1_beats", []),
    ("eat", "esp_aves2_sl_eat_all_ssl_all", ["--num-classes", "12"]),
]


def prepare(work: Path, arch: str, model_id: str, extra: list[str]) -> tuple[Path, Path]:
    ckpt, bundle = work / f"{arch}-ckpt", work / f"{arch}-bundle"
    if not ckpt.is_dir():
        subprocess.run(
            [
                sys.executable,
                str(SHARED / "fixtures" / "make_checkpoint.py"),
                "--arch",
                arch,
                "--seed",
                "0",
                *extra,
                "--out",
                str(ckpt),
            ],
            check=True,
        )
    if not (bundle / "manifest.json").is_file():
        subprocess.run(["edgeenc", "export", model_id, "--checkpoint", str(ckpt), "-o", str(bundle)], check=True)
    return ckpt, bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeenc-parity"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        "| model | output | PyTorch vs avex: max abs / 1 - min cos | ONNX Runtime vs avex: max abs / 1 - min cos |"
    )
    print("|---|---|---|---|")
    for arch, model_id, extra in MODELS:
        ckpt, bundle = prepare(args.work, arch, model_id, extra)
        module = load_model(model_id, ckpt).module
        session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        worst: dict[str, list[float]] = {}
        for path in sorted(glob.glob(str(SHARED / "fixtures" / "golden" / arch / "*.npz"))):
            golden = np.load(path)
            audio = torch.from_numpy(golden["audio"])
            with torch.no_grad():
                tokens = module.forward_features(audio)
                ours = {
                    "fbank": module.fbank(audio).numpy(),
                    "tokens": tokens.numpy(),
                    "embedding": tokens.mean(1).numpy(),
                }
                if module.classifier is not None:
                    ours["logits"] = module.forward_head(tokens).numpy()
            onnx_out = dict(zip(names, session.run(None, {"audio": golden["audio"]})))
            for name, value in ours.items():
                w = worst.setdefault(name, [0.0, 1.0, 0.0, 1.0])
                max_abs, _, cos = error_stats(value, golden[name])
                w[0], w[1] = max(w[0], max_abs), min(w[1], cos)
                if name in onnx_out:
                    max_abs, _, cos = error_stats(onnx_out[name], golden[name])
                    w[2], w[3] = max(w[2], max_abs), min(w[3], cos)
        for name, w in worst.items():
            onnx_cell = f"{w[2]:.1e} / {1 - w[3]:.0e}" if name != "fbank" else "(inside the graph)"
            print(f"| {model_id} | {name} | {w[0]:.1e} / {1 - w[1]:.0e} | {onnx_cell} |")


if __name__ == "__main__":
    main()
