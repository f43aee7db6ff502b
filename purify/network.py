"""The U-Net ``F(x, t, u)`` behind a BCM (spec §2): DDPM++/NCSN++-style, with separate t and u embeddings.

Following the paper (Appendix B), ``t`` and ``u`` get the same positional embedding each; the two are
concatenated and the dense layers that follow are twice as wide as in the single-time network. The rest is
the usual EDM/Song et al. U-Net: residual blocks with GroupNorm, scale-shift conditioning and dropout,
self-attention at chosen resolutions, skip connections between encoder and decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NetworkConfig:
    """Width and depth of the U-Net. Defaults are the CIFAR-10 NCSN++/DDPM++ size (Song et al., EDM)."""

    image_channels: int = 3
    resolution: int = 32
    channels: int = 128                      # base width
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_blocks: int = 4                      # residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.3                     # iCT's CIFAR-10 setting
    emb_mult: int = 4                        # embedding width = channels * emb_mult (doubled for t and u)
    channels_per_head: int = 64


def positional_embedding(c_noise: torch.Tensor, channels: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer sinusoidal embedding of the noise-conditioning value, as in DDPM++."""
    freqs = torch.arange(channels // 2, device=c_noise.device, dtype=torch.float32) / (channels // 2 - 1)
    freqs = (1 / max_positions) ** freqs
    angles = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the embedding and optional resampling and attention."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float, resample: str | None = None,
                 attention: bool = False, channels_per_head: int = 64):
        super().__init__()
        self.resample = resample
        self.takes_skip = False  # decoder blocks that concatenate an encoder skip are flagged by the UNet
        self.norm0 = _group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.attention = SelfAttention(cout, channels_per_head) if attention else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        h = self.conv0(h)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        x = (x + h) * (1 / math.sqrt(2))
        if self.attention is not None:
            x = self.attention(x)
        return x


class SelfAttention(nn.Module):
    def __init__(self, channels: int, channels_per_head: int):
        super().__init__()
        self.heads = max(1, channels // channels_per_head)
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1 / math.sqrt(2))


class UNet(nn.Module):
    """``F(x, c_noise(t), c_noise(u))``: a U-Net conditioned on two noise levels."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = c = config
        self.noise_channels = c.channels
        emb = 2 * c.channels * c.emb_mult  # doubled: t and u embeddings are concatenated (spec §2)
        self.map_layer0 = nn.Linear(2 * c.channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)

        self.conv_in = nn.Conv2d(c.image_channels, c.channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        skips, cout, res = [c.channels], c.channels, c.resolution
        for level, mult in enumerate(c.channel_mult):
            if level > 0:
                res //= 2
                self.encoder.append(ResBlock(cout, cout, emb, c.dropout, "down"))
                skips.append(cout)
            for _ in range(c.num_blocks):
                cin, cout = cout, c.channels * mult
                self.encoder.append(ResBlock(cin, cout, emb, c.dropout, attention=res in c.attn_resolutions,
                                             channels_per_head=c.channels_per_head))
                skips.append(cout)

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            if level == len(c.channel_mult) - 1:
                self.decoder.append(ResBlock(cout, cout, emb, c.dropout, attention=True,
                                             channels_per_head=c.channels_per_head))
                self.decoder.append(ResBlock(cout, cout, emb, c.dropout))
            else:
                res *= 2
                self.decoder.append(ResBlock(cout, cout, emb, c.dropout, "up"))
            for _ in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.channels * mult
                self.decoder.append(ResBlock(cin, cout, emb, c.dropout, attention=res in c.attn_resolutions,
                                             channels_per_head=c.channels_per_head))
                self.decoder[-1].takes_skip = True
        self.norm_out = _group_norm(cout)
        self.conv_out = nn.Conv2d(cout, c.image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_u: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([positional_embedding(noise_t, self.noise_channels),
                         positional_embedding(noise_u, self.noise_channels)], dim=1)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb.to(x.dtype)))))

        h = self.conv_in(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.decoder:
            if block.takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
