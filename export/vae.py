"""Reference Stable Diffusion KL autoencoder (Rombach et al. 2022, arXiv:2112.10752, sec. 3 and
appendix G) in plain PyTorch.

Module attribute names equal diffusers 0.42 `AutoencoderKL` state-dict keys (mid-block attention as
`to_q`/`to_k`/`to_v`/`to_out.0`), so diffusers weights load with one strict `load_state_dict`.
Latents here are unscaled: callers multiply by / divide by `config.scaling_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.configs import VAEConfig
from export.unet import Downsample2D, ResnetBlock2D, Upsample2D

# GroupNorm epsilon throughout the VAE (diffusers Encoder/Decoder `resnet_eps=1e-6`, as the
# original ldm/modules/diffusionmodules/model.py `Normalize`).
EPS = 1e-6


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with GroupNorm and a residual (diffusers
    `Attention(..., residual_connection=True, bias=True)` with `group_norm`)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [b, c, h, w] -> [b, h*w, c]
        q, k, v = (t[:, None] for t in (self.to_q(h), self.to_k(h), self.to_v(h)))  # one head: [b, 1, hw, c]
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + h.transpose(1, 2).reshape(x.shape)  # [b, h*w, c] -> [b, c, h, w]


class UNetMidBlock2D(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, None, groups, EPS), ResnetBlock2D(c, c, None, groups, EPS)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    """diffusers DownEncoderBlock2D."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, EPS) for i in range(layers))
        # padding 0: pad right/bottom by one, then stride-2 conv (ldm Downsample)
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    """diffusers UpDecoderBlock2D."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, EPS) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """image [b, in_channels, h, w] -> moments [b, 2 * latent_channels, h / f, w / f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i != last) for i in range(len(ch)))
        self.mid_block = UNetMidBlock2D(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """latent [b, latent_channels, lh, lw] -> image [b, out_channels, lh * f, lw * f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i != last) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1)
        self.post_quant_conv = nn.Conv2d(n, n, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [b, 3, h, w] in [-1, 1] -> (mean, std) of the diagonal Gaussian posterior, each
        [b, latent_channels, h / f, w / f], unscaled. logvar clamped to [-30, 20] (ldm
        DiagonalGaussianDistribution, diffusers the same)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """unscaled latent [b, latent_channels, lh, lw] -> image [b, 3, lh * f, lw * f], about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])
