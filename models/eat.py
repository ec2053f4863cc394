"""EAT as avex 1.4.0 runs ESP's checkpoints, written for export.

A ViT over the fixed 1024 x 128 log-mel image: 16 x 16 patches, a frozen 2-D sin-cos table
(loaded from the checkpoint, never recomputed: float64 rebuilds differ by 6e-5), a CLS token
without position, a pre-norm, then 12 post-LayerNorm blocks and no final norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .frontend import EAT_FBANK, Fbank, FbankConfig


@dataclass(frozen=True)
class EATConfig:
    fbank: FbankConfig = field(default_factory=lambda: EAT_FBANK)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    max_length: int = 768  # time patches in the stored position table (rows = max_length * 8)
    layer_norm_eps: float = 1e-6
    num_classes: int = 0  # 0: features only

    @property
    def patches(self) -> int:
        assert self.fbank.target_frames is not None
        return (self.fbank.target_frames // self.patch_size) * (self.fbank.num_mel_bins // self.patch_size)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.proj(fbank.unsqueeze(1)).flatten(2).transpose(1, 2)  # time-major tokens


class Attention(nn.Module):
    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.embed_dim // cfg.heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.head_dim**-0.5) @ k.transpose(-1, -2)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class EAT(nn.Module):
    """audio [B, N] at 16 kHz -> tokens [B, 513, 768] (CLS first); logits from the CLS token."""

    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fbank = Fbank(cfg.fbank)
        self.local_encoder = PatchEmbed(cfg)
        mel_patches = cfg.fbank.num_mel_bins // cfg.patch_size
        self.positions = nn.Parameter(
            torch.zeros(1, cfg.max_length * mel_patches, cfg.embed_dim), requires_grad=False
        )
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pre_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else None

    def forward_features(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.local_encoder(self.fbank(audio))
        x = x + self.positions[:, : self.config.patches]
        cls = self.extra_tokens.expand(x.shape[0], -1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1))
        for block in self.blocks:
            x = block(x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this EAT model has no classifier head (features only)")
        return self.classifier(self.pool(tokens))
