"""Every ESP BEATs and EAT model id that avex 1.4.0 knows."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from torch import nn

from .beats import BEATs, BEATsConfig
from .eat import EAT, EATConfig
from .frontend import BEATS_FBANK, FbankConfig

LICENCE = "CC-BY-NC-SA-4.0"
HF_ORG = "EarthSpeciesProject"


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    arch: str  # "beats" or "eat"
    hf_repo: str
    weights_file: str
    has_classifier: bool
    sample_rate: int
    window_seconds: float  # the training clip length: the runtime's default window
    licence: str = LICENCE
    clamp: bool = False  # NatureLM BEATs clamps the waveform to [-1, 1]
    layout: str = "esp"  # "esp" (avex names) or "fairseq" (EAT pretraining checkpoints)
    note: str = ""  # where we knowingly differ from avex

    @property
    def activation(self) -> str | None:
        """How the head's logits become scores: every ESP head is a supervised `sl_*` head (see SL_ACTIVATION)."""
        return "sigmoid" if self.has_classifier else None

    @property
    def label_map_file(self) -> str | None:
        return "label_map.json" if self.has_classifier else None


def _spec(model_id: str, arch: str, *, repo: str | None = None, **kwargs) -> ModelSpec:
    repo = repo or model_id.replace("_", "-")
    defaults = {"sample_rate": 16000, "window_seconds": 10.0, "has_classifier": False}
    return ModelSpec(
        model_id=model_id,
        arch=arch,
        hf_repo=f"{HF_ORG}/{repo}",
        weights_file=f"{repo}.safetensors",
        **{**defaults, **kwargs},
    )


# Why the sl_* heads score with a sigmoid: they were post-trained multi-label, with BCE and mixup whose labels are
# the union of both clips' (avex's training configs sl_eat_animalspeak_ssl_all_h100.yml and
# sl_beats_animalspeak_audioset_h100.yml: loss_function bce, multilabel mixup; the model card: "mixup-style
# within-batch mixing with union of labels"). Their scores are independent per label; a softmax would make
# co-occurring species compete for one unit of probability.
SL_ACTIVATION_WHY = ("post-trained multi-label (BCE loss, mixup with the union of labels: avex's training "
                     "configs and the model card), so each label's score is independent: sigmoid")

_AVEX_DROPS_EAT_WEIGHTS = (
    "avex 1.4.0 silently loads none of these ESP tensors and runs the base EAT weights "
    "(worstchan/EAT-base_epoch30_pretrain); edgeenc loads the ESP weights strictly"
)

MODELS: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        _spec("esp_aves2_naturelm_audio_v1_beats", "beats", clamp=True),
        _spec("esp_aves2_sl_beats_all", "beats", has_classifier=True),
        _spec("esp_aves2_sl_beats_bio", "beats", has_classifier=True),
        # Fed 32 kHz audio through the 16 kHz-parameter filterbank: 5 s gives 496 tokens.
        _spec(
            "esp_aves2_sed_birdcode_beats_encoder",
            "beats",
            repo="esp-aves2-sed-birdcode-ablation-ssl-beats-clip-pseudo-encoder",
            sample_rate=32000,
            window_seconds=5.0,
        ),
        _spec("esp_aves2_sl_eat_all_ssl_all", "eat", has_classifier=True),
        _spec("esp_aves2_sl_eat_bio_ssl_all", "eat", has_classifier=True),
        _spec("esp_aves2_eat_all", "eat", layout="fairseq", note=_AVEX_DROPS_EAT_WEIGHTS),
        _spec("esp_aves2_eat_bio", "eat", layout="fairseq", note=_AVEX_DROPS_EAT_WEIGHTS),
    )
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        close = difflib.get_close_matches(model_id, MODELS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownModelError(f"unknown model id {model_id!r}; {hint}known ids (`edgeenc models`): "
                                f"{', '.join(MODELS)}") from None


def fbank_config(spec: ModelSpec) -> FbankConfig:
    if spec.arch == "beats":
        return replace(BEATS_FBANK, clamp=spec.clamp)
    return EATConfig().fbank


def build_model(spec: ModelSpec, num_classes: int = 0, **overrides) -> nn.Module:
    """An untrained module of the spec's architecture (`overrides` shrink it for tests)."""
    if spec.arch == "beats":
        return BEATs(BEATsConfig(fbank=fbank_config(spec), num_classes=num_classes, **overrides)).eval()
    if spec.arch == "eat":
        return EAT(EATConfig(num_classes=num_classes, **overrides)).eval()
    raise ValueError(f"unknown architecture {spec.arch!r}")
