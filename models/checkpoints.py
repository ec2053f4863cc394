"""Read ESP checkpoints, normalise their key spellings, and load them STRICTLY.

avex loads with ``strict=False`` and logs the result at INFO, which hides a classifier left at
random init and (for eat_all / eat_bio) a model that loaded none of the file's tensors.
Here every tensor the model needs must be in the file with the
right shape, and every tensor in the file must be used or be one we know is unused (BEATs'
AudioSet ``predictor``, stored filterbank buffers, fairseq pretraining decoders).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeenc.hashing import sha256_file

from .frontend import mel_matrix, window_function
from .registry import ModelSpec, build_model, get_spec

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
LEADING_PREFIXES = ("module.", "backbone.", "model.")
FAIRSEQ_IMAGE = "modality_encoders.IMAGE."
# torch.nn.utils.parametrizations.weight_norm spelling -> the legacy weight_norm one.
PARAMETRIZED_WEIGHT_NORM = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}
# Tensors that fairseq EAT pretraining checkpoints carry for the masked-prediction decoder.
FAIRSEQ_UNUSED = ("decoder.", "_ema", "ema.", "recon_proj.", "shared_decoder.", "cls_proj.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the keys and the likely cause."""


class CheckpointUnavailable(RuntimeError):
    """The weights could not be fetched (offline hub, missing file)."""


@dataclass
class LoadReport:
    loaded: int
    ignored: list[str] = field(default_factory=list)  # known-unused tensors, by original name


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    labels: list[str] | None
    checkpoint_sha256: str | None
    source: str  # file path, "hf://repo/file", or "random-init"
    report: LoadReport | None

    @property
    def random_init(self) -> bool:
        return self.checkpoint_sha256 is None


def read_tensors(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Flat name -> tensor dict from a .safetensors file (or, when allowed, a pickled torch file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointUnavailable(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: refusing to unpickle a {path.suffix} checkpoint (pickle files can run code); "
                "convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
        return unwrap_state_dict(obj, path)
    raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r}; expected .safetensors")


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Trainer and fairseq files nest the weights under model_state_dict / state_dict / model."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model_state_dict", "state_dict", "model") if k in obj), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no flat tensor dictionary found inside the checkpoint")
    return dict(obj)


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in LEADING_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def guess_arch(keys) -> str | None:
    text = " ".join(keys)
    if "grep_linear" in text or "pos_conv" in text or "post_extract_proj" in text:
        return "beats"
    if "attn.qkv" in text or "extra_tokens" in text or FAIRSEQ_IMAGE in text:
        return "eat"
    return None


def _fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # weight_norm(dim=2): one norm per kernel tap over output and input channels.
    v64 = v.double()
    norm = v64.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    return (g.double() * v64 / norm).float()


def _canonical_beats(tensors: dict[str, torch.Tensor], ignored: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pos: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    originals = {}
    for original, tensor in tensors.items():
        key = strip_prefixes(original)
        originals[key] = original
        if key.startswith("predictor."):
            ignored.append(original)
        elif key in ("fbank.window", "fbank.mel_fb"):
            _check_fbank_buffer(key, tensor, original)
            ignored.append(original)
        elif key.startswith("encoder.pos_conv.0."):
            part = key[len("encoder.pos_conv.0.") :]
            part = PARAMETRIZED_WEIGHT_NORM.get(part, part)
            pos[part] = tensor
        elif re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight", key):
            shared[original] = tensor
        elif key == "patch_embedding.weight":
            out["patch_embedding.proj.weight"] = tensor
        else:
            out[key] = tensor
    if pos:
        if "weight_g" in pos and "weight_v" in pos:
            out["encoder.pos_conv.weight"] = _fold_weight_norm(pos.pop("weight_g"), pos.pop("weight_v"))
        if "weight" in pos:
            out["encoder.pos_conv.weight"] = pos.pop("weight")
        if "bias" in pos:
            out["encoder.pos_conv.bias"] = pos.pop("bias")
        for part, tensor in pos.items():
            out[f"encoder.pos_conv.0.{part}"] = tensor
    if shared:
        first_name, first = next(iter(shared.items()))
        for name, tensor in shared.items():
            if tensor.shape != first.shape or not torch.equal(tensor, first):
                raise CheckpointError(
                    f"relative-position tables differ: {name!r} != {first_name!r} "
                    "(BEATs shares one table across layers; the copies must be identical)"
                )
        out["encoder.relative_attention_bias.weight"] = first
    return out


def _check_fbank_buffer(key: str, tensor: torch.Tensor, original: str) -> None:
    expected = window_function("povey") if key == "fbank.window" else mel_matrix(tensor.shape[-1])
    if tuple(tensor.shape) != expected.shape or not np.allclose(tensor.numpy(), expected, atol=1e-5):
        raise CheckpointError(
            f"checkpoint tensor {original!r} is not the Kaldi 16 kHz filterbank this model runs "
            f"(shape {tuple(tensor.shape)}); edgeenc cannot honour a custom filterbank"
        )


def _canonical_eat(tensors: dict[str, torch.Tensor], ignored: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for original, tensor in tensors.items():
        key = strip_prefixes(original)
        if key.startswith(FAIRSEQ_IMAGE):
            key = key[len(FAIRSEQ_IMAGE) :]
            if key.startswith("context_encoder.norm."):
                key = "pre_norm." + key[len("context_encoder.norm.") :]
        if key.startswith(FAIRSEQ_UNUSED):
            ignored.append(original)
            continue
        if key == "fixed_positional_encoder.positions":
            key = "positions"
        out[key] = tensor
    return out


def canonical_tensors(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a file's key spellings onto our module's parameter names; returns (tensors, ignored)."""
    ignored: list[str] = []
    convert = _canonical_beats if spec.arch == "beats" else _canonical_eat
    return convert(tensors, ignored), ignored


def _describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_strict(module: nn.Module, spec: ModelSpec, tensors: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy `tensors` into `module` or raise CheckpointError naming every problem."""
    canonical, ignored = canonical_tensors(spec, tensors)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(canonical))
    unexpected = sorted(set(canonical) - set(expected))
    misshapen = [
        f"{k!r}: file {tuple(canonical[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(canonical))
        if canonical[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshapen:
        problems = []
        file_arch = guess_arch(tensors)
        if file_arch and file_arch != spec.arch:
            problems.append(
                f"this looks like a {file_arch.upper()} checkpoint, but {spec.model_id} is {spec.arch.upper()}: "
                "check the model id"
            )
        if missing:
            problems.append(f"missing {len(missing)} key(s): {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {_describe(unexpected)}")
        if misshapen:
            problems.append(f"wrong shape: {'; '.join(misshapen[:6])}")
        head_missing = any(k.startswith("classifier.") for k in missing)
        head_extra = any(k.startswith("classifier.") for k in unexpected)
        if head_missing:
            problems.append(f"{spec.model_id} has a classifier head but the checkpoint has none")
        if head_extra:
            problems.append(f"the checkpoint has a classifier head but {spec.model_id} is features-only")
        raise CheckpointError(f"{source} does not fit {spec.model_id}: " + "; ".join(problems))
    non_float = [k for k, t in canonical.items() if not t.is_floating_point()]
    if non_float:
        raise CheckpointError(f"{source}: non-floating-point tensors {_describe(non_float)}")
    module.load_state_dict({k: t.float() for k, t in canonical.items()}, strict=True)
    return LoadReport(loaded=len(canonical), ignored=ignored)


def read_labels(path: Path, num_classes: int) -> list[str]:
    """label_map.json ({label: index}) -> labels in logit order, checked against the head width."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the label map ({exc})") from exc
    if isinstance(mapping, list):
        labels = [str(x) for x in mapping]
    elif isinstance(mapping, dict):
        by_index: dict[int, str] = {}
        for label, index in mapping.items():
            idx = int(index)
            if idx in by_index:
                raise CheckpointError(f"{path}: labels {by_index[idx]!r} and {label!r} share index {idx}")
            by_index[idx] = str(label)
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"{path}: label indices are not 0..{len(by_index) - 1}")
        labels = [by_index[i] for i in range(len(by_index))]
    else:
        raise CheckpointError(f"{path}: expected a JSON object {{label: index}}")
    if len(labels) != num_classes:
        raise CheckpointError(f"{path}: {len(labels)} labels but the classifier has {num_classes} outputs")
    return labels


def resolve_checkpoint(spec: ModelSpec, checkpoint: Path) -> tuple[Path, Path | None]:
    """A weights file or a folder laid out like the HF repository -> (weights, label_map or None)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        candidates = [checkpoint / spec.weights_file, checkpoint / "model.safetensors"]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            found = sorted(checkpoint.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointUnavailable(
                    f"{checkpoint}: expected {spec.weights_file} (or exactly one .safetensors file) in the folder"
                )
            weights = found[0]
        folder = checkpoint
    else:
        weights, folder = checkpoint, checkpoint.parent
    label_map = folder / "label_map.json"
    return weights, (label_map if label_map.is_file() else None)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, from one TCP connection (huggingface_hub itself retries for ~20 s before
    it gives up), or None when it answers, when offline mode is on, or behind a proxy (which may reach it)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached ({exc.strerror or exc})"
    return None


def download_checkpoint(spec: ModelSpec) -> tuple[Path, Path | None]:
    """Fetch the weights (and label map) from the Hugging Face hub, cached by huggingface_hub; without a
    connection, only from that cache."""
    from huggingface_hub import hf_hub_download

    offline = hub_unreachable()

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(spec.hf_repo, filename, local_files_only=offline is not None))
        except Exception as exc:  # hub errors, connection errors and offline mode all land here
            why = (f"the hub is not reachable from this machine: {offline}, and it is not in the local cache"
                   if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}")
            raise CheckpointUnavailable(
                f"cannot download {filename} from https://huggingface.co/{spec.hf_repo} ({why}). "
                f"Download it yourself and pass --checkpoint PATH, or pass --random-init to export "
                "random weights for testing"
            ) from exc

    weights = fetch(spec.weights_file)
    return weights, (fetch(spec.label_map_file) if spec.label_map_file else None)


def load_model(
    model_id: str,
    checkpoint: Path | None = None,
    *,
    random_init: bool = False,
    allow_pickle: bool = False,
    random_classes: int = 10,
    seed: int = 0,
    **overrides,
) -> LoadedModel:
    """Build `model_id` and fill it from `checkpoint`, the hub, or (only when asked) random weights."""
    spec = get_spec(model_id)
    if random_init:
        if checkpoint is not None:
            raise ValueError("pass either a checkpoint or random_init, not both")
        torch.manual_seed(seed)
        classes = random_classes if spec.has_classifier else 0
        module = build_model(spec, num_classes=classes, **overrides)
        labels = [f"random_class_{i}" for i in range(classes)] if classes else None
        return LoadedModel(spec, module, labels, None, "random-init", None)
    if checkpoint is None:
        weights, label_map = download_checkpoint(spec)
        source = f"hf://{spec.hf_repo}/{spec.weights_file}"
    else:
        weights, label_map = resolve_checkpoint(spec, checkpoint)
        source = str(weights)
    tensors = read_tensors(weights, allow_pickle=allow_pickle)
    head = next((t for k, t in tensors.items() if strip_prefixes(k) == "classifier.weight"), None)
    num_classes = int(head.shape[0]) if head is not None and spec.has_classifier else 0
    if spec.has_classifier and head is None:
        num_classes = 1  # placeholder head: the strict load below reports classifier.* as missing
    if spec.arch == "eat" and "max_length" not in overrides:
        table = next((t for k, t in tensors.items() if k.endswith("fixed_positional_encoder.positions")), None)
        if table is not None and table.ndim == 3:
            overrides["max_length"] = table.shape[1] // 8  # 8 mel patches per time patch
    module = build_model(spec, num_classes=num_classes, **overrides)
    report = load_state_strict(module, spec, tensors, source)
    labels = None
    if spec.has_classifier:
        if label_map is None:
            raise CheckpointUnavailable(
                f"{spec.model_id} has a classifier but no label_map.json was found beside {weights}; "
                "put the HF repository's label_map.json in the same folder"
            )
        labels = read_labels(label_map, num_classes)
    return LoadedModel(spec, module.eval(), labels, sha256_file(weights), source, report)
