"""BEATs as avex 1.4.0 runs ESP's checkpoints, written for export.

Post-LayerNorm transformer with DeepNorm residual scaling, a convolutional positional embedding
and a gated, bucketed relative-position bias shared by all layers. Everything that does not
depend on the input (bucket table, weight-normalised conv kernel) is a buffer or a plain weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .frontend import BEATS_FBANK, Fbank, FbankConfig


@dataclass(frozen=True)
class BEATsConfig:
    fbank: FbankConfig = field(default_factory=lambda: BEATS_FBANK)
    patch_size: int = 16
    patch_dim: int = 512  # patch embedding width before post_extract_proj
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    layer_norm_eps: float = 1e-5
    num_classes: int = 0  # 0: features only

    @property
    def deep_norm_alpha(self) -> float:
        return (2.0 * self.depth) ** 0.25


def relative_bucket_table(num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of every relative position r = key - query in [-max_distance, max_distance].

    Buckets saturate before |r| reaches max_distance, so clamping r to this range and looking
    it up gives the exact T5-style bucket for any sequence length.
    """
    half = num_buckets // 2
    max_exact = half // 2
    r = torch.arange(-max_distance, max_distance + 1)
    offset = (r > 0).long() * half
    a = r.abs()
    # float32 log like the reference: its truncation decides bucket edges.
    far = max_exact + (
        torch.log(a.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    far = far.clamp(max=half - 1)
    return offset + torch.where(a < max_exact, a, far)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.patch_dim, cfg.patch_size, stride=cfg.patch_size, bias=False)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        # Frames past the last whole 16-frame patch are dropped by the stride, as in avex.
        x = self.proj(fbank.unsqueeze(1))  # [B, C, T/16, mel/16]
        return x.flatten(2).transpose(1, 2)  # time-major tokens: index = t * 8 + f


class GatedRelativeAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.embed_dim // cfg.heads
        self.q_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.k_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.v_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.out_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, cfg.heads, 1, 1))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        q = self.split(self.q_proj(x))
        k = self.split(self.k_proj(x))
        v = self.split(self.v_proj(x))
        # The gate reads the raw (unscaled) query: two sigmoid groups of 4 summed outputs.
        groups = self.grep_linear(q).reshape(*q.shape[:3], 2, 4).sum(-1).sigmoid()
        gate_a, gate_b = groups[..., 0:1], groups[..., 1:2]
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, T, 1]
        logits = (q * self.head_dim**-0.5) @ k.transpose(-1, -2) + gate * position_bias
        attn = logits.softmax(dim=-1) @ v
        b, _, t, _ = attn.shape
        return self.out_proj(attn.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class BEATsLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.alpha = cfg.deep_norm_alpha
        self.self_attn = GatedRelativeAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(self.alpha * x + self.self_attn(x, position_bias))
        return self.final_layer_norm(self.alpha * x + self.fc2(nn.functional.gelu(self.fc1(x))))


class BEATsEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        # pos_conv holds the already weight-normalised kernel (g * v / |v|, folded at load time).
        self.pos_conv = nn.Conv1d(
            cfg.embed_dim, cfg.embed_dim, cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)
        self.layers = nn.ModuleList(BEATsLayer(cfg) for _ in range(cfg.depth))
        self.register_buffer(
            "bucket_table", relative_bucket_table(cfg.num_buckets, cfg.max_distance), persistent=False
        )
        self.max_distance = cfg.max_distance

    def position_bias(self, tokens: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(tokens, device=device)
        relative = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance)
        buckets = self.bucket_table[relative + self.max_distance]  # [T, T]
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        # Even kernel with padding k/2 yields T + 1 outputs; the reference drops the last one.
        conv = self.pos_conv(x.transpose(1, 2))[:, :, :tokens]
        x = self.layer_norm(x + nn.functional.gelu(conv).transpose(1, 2))
        bias = self.position_bias(tokens, x.device).to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x


class BEATs(nn.Module):
    """audio [B, N] at the model's rate -> tokens [B, 8 * floor(F / 16), 768]; logits via forward_head."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fbank = Fbank(cfg.fbank)
        self.patch_embedding = PatchEmbed(cfg)
        self.layer_norm = nn.LayerNorm(cfg.patch_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)
        self.encoder = BEATsEncoder(cfg)
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else None

    def forward_features(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(self.fbank(audio))
        x = self.post_extract_proj(self.layer_norm(x))
        return self.encoder(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this BEATs model has no classifier head (features only)")
        return self.classifier(self.pool(tokens))
