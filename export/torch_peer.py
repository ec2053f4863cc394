"""PyTorch eager peers: what a PyTorch user would run instead of the bundle, timed beside it.

`edgeenc bench --compare-torch` and benchmarks/run_benchmarks.py time these in the same interleaved loop as
the bundle's variants, so a report always answers "how much faster than what I would do in PyTorch". The
model is ours (models/, strict load; its outputs match avex's golden outputs, tests/test_parity.py), run as
the ONNX graph's contract does (tokens, mean embedding, logits):

- "fp32": eager float32, as the model cards' code runs it.
- "bf16-autocast": `torch.autocast("cpu", dtype=torch.bfloat16)` around the call: the first thing a PyTorch
  user tries for speed (oneDNN's AMX / AVX512_BF16 kernels for the matmuls; norms and softmax stay fp32).
- "bf16": the weights cast to bfloat16 (`module.bfloat16()`), the audio front end kept in float32 as avex
  keeps it (reference/avex-quirks.md Q10): the fastest plain-PyTorch bf16, a harder peer than autocast.

Needs torch (the export extra); the runtime never imports this module.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

TORCH_MODES = {
    "fp32": "PyTorch eager fp32 (the model cards' code path)",
    "bf16-autocast": "PyTorch eager under torch.autocast('cpu', bfloat16)",
    "bf16": "PyTorch eager, weights in bfloat16, front end fp32",
}


class PeerUnavailable(RuntimeError):
    """The PyTorch peer cannot be built here (no torch, no checkpoint); the message names the fix."""


def peer_checkpoint(manifest: dict, checkpoint: Path | None, bundle: Path) -> Path | None:
    """The checkpoint the peer loads: `checkpoint` when given, else the one the bundle was exported from
    (None: the model's Hugging Face file, downloaded). PeerUnavailable where neither can be found."""
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise PeerUnavailable(f"--checkpoint {checkpoint} does not exist")
        return Path(checkpoint)
    recorded = str(manifest.get("checkpoint") or "")
    if recorded.startswith("hf://"):
        return None
    if not recorded or recorded == "random-init":
        raise PeerUnavailable(f"{bundle} was exported from {recorded or 'no recorded checkpoint'}: pass "
                              "--checkpoint FILE with the weights the bundle holds")
    path = Path(recorded)
    for candidate in (path, bundle / path, bundle.parent / path):
        if candidate.exists():
            return candidate
    raise PeerUnavailable(f"{bundle} was exported from {recorded}, which is not here: pass --checkpoint FILE")


class TorchPeer:
    """One PyTorch eager mode of a loaded model, behind the Backend protocol's run/close."""

    name = "torch"

    def __init__(self, module, mode: str, threads: int | None):
        import torch

        from .onnx_export import OnnxGraph

        if mode not in TORCH_MODES:
            raise ValueError(f"PyTorch peer mode must be one of {', '.join(TORCH_MODES)}, not {mode!r}")
        self.torch, self.mode, self.threads = torch, mode, threads
        module = module.float().eval()
        if mode == "bf16":
            module = copy.deepcopy(module).bfloat16()
            module.fbank.float()  # the front end stays fp32; its output enters the bf16 encoder as bf16
            module.fbank.register_forward_hook(lambda _m, _inputs, out: out.to(torch.bfloat16))
        self.graph = OnnxGraph(module)
        self.precision = "fp32" if mode == "fp32" else "bf16"
        self.description = f"{TORCH_MODES[mode]}, torch {torch.__version__}"
        self.variant = f"pytorch eager {mode}"

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        if self.threads:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mode == "bf16-autocast"):
            outputs = self.graph(x)
        names = ("tokens", "embedding", "logits")
        return {name: out.float().numpy() for name, out in zip(names, outputs)}

    def close(self) -> None:
        self.graph = None


def torch_peers(model_id: str, checkpoint: Path | None, threads: int | None,
                modes: tuple[str, ...] = tuple(TORCH_MODES)) -> list[TorchPeer]:
    """The PyTorch peers of `model_id` (one model load; the bf16 mode holds its own bf16 copy)."""
    try:
        from edgeenc.models.checkpoints import load_model
    except ImportError as exc:
        raise PeerUnavailable(f"PyTorch is not installed ({exc}): pip install 'edgeenc[export]' for "
                              "--compare-torch") from exc
    module = load_model(model_id, checkpoint).module
    return [TorchPeer(module, mode, threads) for mode in modes]
