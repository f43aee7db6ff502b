"""The U-Net ``F(x, t, u)`` behind a BCM (spec §2): DDPM++/NCSN++-style, with separate t and u embeddings.

Following the paper (Section 3.1), ``t`` and ``u`` get the same embedding each; the two are concatenated and
the dense layers that follow are twice as wide as in the single-time network. The rest is the usual EDM/Song
et al. U-Net: residual blocks with GroupNorm, conditioning on the embedding and dropout, self-attention at
chosen resolutions, skip connections between encoder and decoder. ``time_inputs=1`` builds the single-time
network ``F(x, t)`` of a consistency model instead (``purify.bcm.ConsistencyModel``), and ``add_u_input`` turns
its weights into a two-time network's with the same output (fine-tuning a BCM from a CT model, spec §3).

Five options turn the DDPM++-style default into the NCSN++ of Song et al. that the paper uses, as EDM's
``SongUNet`` offers them: Gaussian Fourier features instead of the positional embedding
(``embedding_type="fourier"``, with ``noise_mult=2``), the FIR filter [1, 3, 3, 1] instead of average pooling
and nearest-neighbour up-sampling (``resample_filter``), the residual input path of the encoder
(``encoder_type="residual"``, NCSN++'s ``progressive_input="residual"``), one added conditioning vector per
block instead of a scale and a shift (``conditioning="additive"``, EDM's ``adaptive_scale=False``) and
attention only after the last decoder block of a level (``decoder_attention="last"``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class NetworkConfig:
    """Width, depth and architecture of the U-Net. The sizes default to the CIFAR-10 NCSN++/DDPM++ size (Song et
    al., EDM); the architecture options to the DDPM++-style network, the NCSN++ values are in the comments."""

    image_channels: int = 3
    resolution: int = 32
    channels: int = 128                      # base width
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_blocks: int = 4                      # residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.3                     # iCT's CIFAR-10 setting
    emb_mult: int = 4                        # embedding width = channels * emb_mult (doubled for t and u)
    channels_per_head: int = 64
    embedding_type: str = "positional"       # of each time: "positional" (DDPM++) or "fourier" (NCSN++)
    noise_mult: int = 1                      # width of each time's embedding = channels * noise_mult (NCSN++: 2)
    fourier_scale: float = 16.0              # std of the Fourier frequencies (NCSN++: 16); "fourier" only
    resample_filter: list[int] = field(default_factory=lambda: [1, 1])  # FIR taps; [1, 3, 3, 1] in NCSN++
    encoder_type: str = "standard"           # "standard" or "residual" (NCSN++'s residual input path)
    conditioning: str = "scale-shift"        # of each block on the embedding: "scale-shift" or "additive" (NCSN++)
    decoder_attention: str = "every"         # at attn_resolutions, in "every" decoder block or the "last" of each
    #                                          level (NCSN++); the encoder attends in every block at them either way
    time_inputs: int = 2                     # 2: F(x, t, u) of a BCM; 1: F(x, t) of a consistency model

    def __post_init__(self):
        if self.embedding_type not in ("positional", "fourier"):
            raise ValueError(f"network.embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
        if self.encoder_type not in ("standard", "residual"):
            raise ValueError(f"network.encoder_type must be 'standard' or 'residual', got {self.encoder_type!r}")
        if self.conditioning not in ("scale-shift", "additive"):
            raise ValueError(f"network.conditioning must be 'scale-shift' or 'additive', got {self.conditioning!r}")
        if self.decoder_attention not in ("every", "last"):
            raise ValueError(f"network.decoder_attention must be 'every' or 'last', got {self.decoder_attention!r}")
        if self.time_inputs not in (1, 2):
            raise ValueError(f"network.time_inputs must be 1 (t) or 2 (t and u), got {self.time_inputs!r}")
        if self.noise_mult < 1:
            raise ValueError(f"network.noise_mult must be at least 1, got {self.noise_mult}")
        if not self.fourier_scale > 0:
            raise ValueError(f"network.fourier_scale must be positive, got {self.fourier_scale}")
        taps = self.resample_filter
        if len(taps) < 2 or len(taps) % 2 or sum(taps) <= 0:
            raise ValueError(f"network.resample_filter must have an even number (>= 2) of taps with a positive sum "
                             f"(so that resampling halves/doubles the size and can be normalised), got {taps}")


def _cos_sin(angles: torch.Tensor) -> torch.Tensor:
    """``[cos(angles), sin(angles)]`` along the channel axis: the layout of both time embeddings."""
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the noise-conditioning value, as in DDPM++:
    ``[cos(x w_i), sin(x w_i)]`` with ``w_i = (1 / max_positions)^(i / (n - 1))``, ``i = 0..n-1``, ``n = channels / 2``.
    Nothing is stored: the frequencies follow from ``channels``."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        self.channels, self.max_positions = channels, max_positions

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.arange(half, device=c_noise.device, dtype=torch.float32) / (half - 1)
        freqs = (1 / self.max_positions) ** freqs
        return _cos_sin(c_noise.float()[:, None] * freqs[None, :])


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features of the noise-conditioning value, as in NCSN++ (Song et al. 2021; EDM's
    ``FourierEmbedding``): ``[cos(2 pi f_i x), sin(2 pi f_i x)]`` with ``channels / 2`` frequencies
    ``f_i ~ N(0, scale^2)`` drawn once and never trained.

    The frequencies are a buffer, so they are saved in the state_dict and a loaded network embeds exactly as
    the trained one did. They come from a fixed-seed generator rather than the global RNG, so every build of
    a config gets the same ones and the global random stream (hence the weight initialisation) is unchanged.
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels // 2, generator=generator) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return _cos_sin(c_noise.float()[:, None] * (2 * math.pi * self.freqs)[None, :])


class Resample(nn.Module):
    """Down- or up-sampling by 2 with the separable FIR filter ``taps`` (NCSN++ / EDM).

    The 2-D filter is ``k k^T / (sum k)^2`` (unit gain). Down-sampling is its depthwise convolution at stride 2;
    up-sampling is the depthwise transposed convolution at stride 2 with 4 times the filter (each output pixel
    collects a quarter of the taps, so the gain is 1 again). A constant image therefore stays constant, except
    at the borders, where the zero padding enters (``(len(taps) - 1) // 2`` by default, which halves or doubles
    the size exactly). ``taps = [1, 1]`` is exactly 2x2 average pooling and nearest-neighbour up-sampling.
    """

    def __init__(self, direction: str, taps: Sequence[int], padding: int | None = None):
        super().__init__()
        if direction not in ("down", "up"):
            raise ValueError(f"resampling direction must be 'down' or 'up', got {direction!r}")
        self.direction = direction
        self.padding = (len(taps) - 1) // 2 if padding is None else padding
        k = torch.tensor(list(taps), dtype=torch.float32)
        gain = 1.0 if direction == "down" else 4.0
        # derived from the config, not a weight: kept out of the state_dict (persistent=False)
        self.register_buffer("kernel", (gain * torch.outer(k, k) / k.sum() ** 2)[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        kernel = self.kernel.to(x.dtype).repeat(channels, 1, 1, 1)
        if self.direction == "down":
            return F.conv2d(x, kernel, stride=2, padding=self.padding, groups=channels)
        return F.conv_transpose2d(x, kernel, stride=2, padding=self.padding, groups=channels)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding ``e``, with optional resampling and attention:

        h = conv0(resample(silu(norm0(x))))
        h = silu(norm1(h) * (1 + scale) + shift),  [scale, shift] = affine(e)     (conditioning "scale-shift")
        h = silu(norm1(h + affine(e)))                                             (conditioning "additive", NCSN++)
        out = (skip(resample(x)) + conv1(dropout(h))) / sqrt(2), then self-attention if any.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float,
                 resample: str | None = None, attention: bool = False, channels_per_head: int = 64,
                 resample_filter: Sequence[int] = (1, 1), conditioning: str = "scale-shift"):
        super().__init__()
        self.resample = Resample(resample, resample_filter) if resample else None
        self.takes_skip = False  # decoder blocks that concatenate an encoder skip are flagged by the UNet
        self.additive = conditioning == "additive"
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels if self.additive else 2 * out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels or resample else None
        self.attention = SelfAttention(out_channels, channels_per_head) if attention else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.resample is None else self.resample(x)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        h = self.conv0(h)
        params = self.affine(emb)[:, :, None, None]
        if self.additive:
            h = F.silu(self.norm1(h + params))
        else:
            scale, shift = params.chunk(2, dim=1)
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


class InputResidual(nn.Module):
    """One level of NCSN++'s residual input path (``progressive_input="residual"``; EDM ``encoder_type="residual"``).

    After each down-sampling block of the encoder, the previous level ``a`` of the input pyramid (the image at
    the first level) is convolved at its own resolution (3x3), FIR down-sampled and added to the block's output
    ``h``: ``h' = (h + down(conv(a))) / sqrt(2)``. ``h'`` continues through the encoder and is both the skip
    connection of that block and the next pyramid level. As in EDM's fused version and score_sde, the
    convolution is padded by 1 + the filter's padding and the filter by nothing, so at the borders the filter
    reads convolution outputs (of the zero-padded input) rather than zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, resample_filter: Sequence[int]):
        super().__init__()
        filter_padding = (len(resample_filter) - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1 + filter_padding)
        self.down = Resample("down", resample_filter, padding=0)

    def forward(self, pyramid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (h + self.down(self.conv(pyramid))) * (1 / math.sqrt(2))


class UNet(nn.Module):
    """``F(x, c_noise(t), c_noise(u))``: a U-Net conditioned on two noise levels (on one, ``F(x, c_noise(t))``,
    with ``time_inputs=1``)."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = c = config
        self.recompute = False  # set by recompute_activations
        noise_channels = c.channels * c.noise_mult
        self.map_noise = (FourierEmbedding(noise_channels, c.fourier_scale) if c.embedding_type == "fourier"
                          else PositionalEmbedding(noise_channels))
        # doubled for a BCM: the t and u embeddings are concatenated (spec §2)
        emb = c.time_inputs * c.channels * c.emb_mult
        self.map_layer0 = nn.Linear(c.time_inputs * noise_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        block = dict(emb_channels=emb, dropout=c.dropout, channels_per_head=c.channels_per_head,
                     resample_filter=c.resample_filter, conditioning=c.conditioning)

        self.conv_in = nn.Conv2d(c.image_channels, c.channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        # residual input path, keyed by the index of the down-sampling encoder block it follows; empty otherwise
        self.encoder_residual = nn.ModuleDict()
        skips, out_channels, res, pyramid_channels = [c.channels], c.channels, c.resolution, c.image_channels
        for level, mult in enumerate(c.channel_mult):
            if level > 0:
                res //= 2
                self.encoder.append(ResBlock(out_channels, out_channels, resample="down", **block))
                skips.append(out_channels)
                if c.encoder_type == "residual":
                    self.encoder_residual[str(len(self.encoder) - 1)] = InputResidual(
                        pyramid_channels, out_channels, c.resample_filter)
                    pyramid_channels = out_channels
            for _ in range(c.num_blocks):
                in_channels, out_channels = out_channels, c.channels * mult
                self.encoder.append(ResBlock(in_channels, out_channels, attention=res in c.attn_resolutions, **block))
                skips.append(out_channels)

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            if level == len(c.channel_mult) - 1:
                self.decoder.append(ResBlock(out_channels, out_channels, attention=True, **block))
                self.decoder.append(ResBlock(out_channels, out_channels, **block))
            else:
                res *= 2
                self.decoder.append(ResBlock(out_channels, out_channels, resample="up", **block))
            for index in range(c.num_blocks + 1):
                in_channels, out_channels = out_channels + skips.pop(), c.channels * mult
                attention = res in c.attn_resolutions and (c.decoder_attention == "every" or index == c.num_blocks)
                self.decoder.append(ResBlock(in_channels, out_channels, attention=attention, **block))
                self.decoder[-1].takes_skip = True
        self.norm_out = _group_norm(out_channels)
        self.conv_out = nn.Conv2d(out_channels, c.image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_u: torch.Tensor | None = None) -> torch.Tensor:
        labels = [noise_t] if noise_u is None else [noise_t, noise_u]
        if len(labels) != self.config.time_inputs:
            raise ValueError(f"this U-Net takes {self.config.time_inputs} noise level(s) (network.time_inputs), "
                             f"got {len(labels)}")
        emb = torch.cat([self.map_noise(label) for label in labels], dim=1)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb.to(x.dtype)))))

        h = self.conv_in(x)
        skips, pyramid = [h], x
        for index, block in enumerate(self.encoder):
            h = self._run(block, h, emb)
            if str(index) in self.encoder_residual:
                h = pyramid = self.encoder_residual[str(index)](pyramid, h)
            skips.append(h)
        for block in self.decoder:
            h = self._run(block, h, emb, skips.pop() if block.takes_skip else None)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor,
             skip: torch.Tensor | None = None) -> torch.Tensor:
        """One residual block, on ``h`` concatenated with the encoder's ``skip`` when given; with ``recompute``
        (``recompute_activations``) its activations are not kept for the backward pass but recomputed there
        (``torch.utils.checkpoint``, the RNG state replayed, so dropout draws the same mask): what a backward pass
        through the network keeps is then each block's input (the concatenation too is recomputed: the skip is
        kept anyway) and the memory of one block at a time."""
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(_skip_block, block, h, emb, skip, use_reentrant=False)
        return _skip_block(block, h, emb, skip)


def _skip_block(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    return block(h if skip is None else torch.cat([h, skip], dim=1), emb)


@contextlib.contextmanager
def recompute_activations(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every U-Net inside ``module`` recomputes its blocks' activations in the backward pass
    instead of keeping them (bounded-memory exact gradients, e.g. for attacks through a purifier); restored
    afterwards."""
    nets = [m for m in module.modules() if isinstance(m, UNet)]
    previous = [net.recompute for net in nets]
    for net in nets:
        net.recompute = enabled
    try:
        yield
    finally:
        for net, value in zip(nets, previous):
            net.recompute = value


def add_u_input(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a two-time U-Net (``time_inputs=2``) built from a single-time one's (``time_inputs=1``, the
    same config otherwise) so that ``F(x, t, u) = F(x, t)`` for every ``u``: the fine-tuning start of spec §3's
    last bullet, as the authors' ImageNet code starts a BCM from iCT (there with a separate projection layer).

    With ``e(s) = silu(W1 silu(W0 m(s) + b0) + b1)`` the single-time embedding of noise level ``s`` (``m``: its
    Fourier or positional features) and ``A`` a block's conditioning layer, the doubled layers become
    block-diagonal copies and every block reads only the ``t`` half of the embedding:

        map_layer0:  [[W0, 0], [0, W0]], [b0; b0]     ->  the embedding is [e(t); e(u)]
        map_layer1:  [[W1, 0], [0, W1]], [b1; b1]
        affine:      [A, 0], its bias unchanged       ->  A e(t) + b, as in the single-time network

    Every other weight is copied. The ``u`` half starts as a copy of the trained ``t`` embedding (the authors'
    code copies its t embedding layers likewise); the zero columns of ``A`` get gradients from the first step,
    so training teaches the blocks to read ``u``. Keys may carry a prefix (``net.`` in a BCM's state_dict).
    """
    widened = {}
    for key, value in state.items():
        layer, name = key.split(".")[-2:]
        if layer in ("map_layer0", "map_layer1"):
            value = torch.block_diag(value, value) if name == "weight" else torch.cat([value, value])
        elif layer == "affine" and name == "weight":
            value = torch.cat([value, torch.zeros_like(value)], dim=1)
        widened[key] = value
    return widened
