"""Reference Stable Diffusion 1.x/2.x/XL U-Net (latent noise predictor) in plain PyTorch.

Module attribute names equal diffusers 0.42 `UNet2DConditionModel` state-dict keys, so diffusers
weights load with one strict `load_state_dict`. Architecture: Rombach et al. 2022 (arXiv:2112.10752),
the U-Net of Ho et al. 2020 (arXiv:2006.11239) with spatial transformers for text cross-attention.
SDXL (Podell et al. 2023, arXiv:2307.01952) is a config of it: transformer depth per block
(`transformer_layers_per_block`), and the pooled text embedding plus the size/crop conditioning
`time_ids` added to the timestep embedding (`addition_embed_type="text_time"`: `add_time_proj`,
`add_embedding`).

Export-friendly: no Python branching on tensor values; every reshape reads sizes from the tensor,
so batch, height, width and token count stay dynamic in ONNX.

Step caching (DeepCache, arXiv:2312.00858): `forward_deep` is `forward` that also returns the
feature cached for a skip branch, `forward_shallow` the retrieval step that starts from it
(`cache_split` says where the U-Net is cut). All three share the same modules and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from export.configs import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding [batch] -> [batch, dim] in float32 (Ho et al. 2020, following Vaswani et
    al. 2017 sec. 3.5; max period 10000, diffusers `get_timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP over the sinusoidal timestep embedding. With `cond_dim` (an LCM-distilled U-Net's
    time_cond_proj_dim), the guidance-scale embedding is first projected, without bias, and added to
    its input (diffusers TimestepEmbedding `cond_proj`; Luo et al. arXiv:2310.04378 §4.2)."""

    def __init__(self, cin: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, cin, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between (none in the VAE)."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb is not None else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.out_scale == 1.0 else out / self.out_scale


class Attention(nn.Module):
    """Multi-head attention [b, n, query_dim] x [b, m, context_dim] -> [b, n, query_dim]."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # [b, n, heads * d] -> [b, heads, n, d]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast:  # SD 2.x: softmax(QK^T) overflows float16 (diffusers `upcast_attention`)
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # [b, n, heads * d] -> [b, n, query_dim]


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # indices match diffusers' [GEGLU, Dropout, Linear]
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, dim, heads, dim // heads, upcast)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: [b, c, h, w] feature map attends to itself and to the text context."""

    def __init__(self, c: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        self.linear = cfg.use_linear_projection
        # GroupNorm eps 1e-6: diffusers Transformer2DModel._init_continuous_input
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(c, heads, cfg.cross_attention_dim, cfg.upcast_attention, 1e-5)
            for _ in range(depth))
        self.proj_out = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [b, c, h, w] -> [b, h*w, c]
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(x.shape)  # [b, h*w, c] -> [b, c, h, w]
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, c: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # the VAE pads right/bottom only (diffusers Downsample2D)
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if like is not None:
            # Odd-sized skip: nearest x2 then crop picks the same pixels as diffusers' resize to
            # `upsample_size` (floor(i * n / (2n - 1)) == floor(i / 2) for i < 2n - 1).
            x = x[:, :, : like.shape[2], : like.shape[3]]
        return self.conv(x)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D: returns (x, skip tensors)."""

    def __init__(self, cin: int, cout: int, heads: int, attn: bool, last: bool, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        n, temb = cfg.layers_per_block, cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, temb, cfg.norm_num_groups, cfg.norm_eps) for i in range(n))
        self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, cfg, depth) for _ in range(n)) if attn else None
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                limit: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each sub-layer (resnet + attention, then the downsampler) yields one skip tensor; `limit`
        stops after that many (the shallow path of a step-cache split)."""
        skips = []
        n = len(self.resnets) + (self.downsamplers is not None)
        for i in range(n if limit is None else min(limit, n)):
            if i < len(self.resnets):
                x = self.resnets[i](x, temb)
                if self.attentions is not None:
                    x = self.attentions[i](x, context)
            else:
                x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `attentions`) or UpBlock2D; consumes layers_per_block + 1 skips."""

    def __init__(self, cin: int, cprev: int, cout: int, heads: int, attn: bool, last: bool, cfg: UNetConfig,
                 depth: int = 1):
        super().__init__()
        n, temb = cfg.layers_per_block + 1, cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb,
                          cfg.norm_num_groups, cfg.norm_eps)
            for i in range(n))
        self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, cfg, depth) for _ in range(n)) if attn else None
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(cout)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                next_skip: torch.Tensor | None, start: int = 0,
                capture: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`skips`: the skip tensors of resnets `start`.. (all of this block's by default), consumed
        last first; `next_skip`: the skip the next block takes first, whose size the upsampled
        output must match. Returns (output, the input of resnet `capture` before its concatenation,
        or None): a step-cache split caches that input and a shallow path enters at `start` with it."""
        feature = None
        for i, skip in zip(range(start, len(self.resnets)), reversed(skips)):
            if i == capture:
                feature = x
            x = self.resnets[i](torch.cat([x, skip], dim=1), temb)  # [b, c + c_skip, h, w] -> [b, cout, h, w]
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, next_skip)
        return x, feature


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, c: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        args = (c, c, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor)
        self.resnets = nn.ModuleList([ResnetBlock2D(*args), ResnetBlock2D(*args)])
        self.attentions = nn.ModuleList([Transformer2DModel(c, heads, cfg, depth)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


@dataclass(frozen=True)
class CacheSplit:
    """Where DeepCache (Ma et al., CVPR 2024, arXiv:2312.00858) splits the U-Net for one skip branch.

    The skip tensors, in the order the down path makes them: 0 = conv_in's output, then one per
    down sub-layer (each resnet + attention, then the downsampler). On a retrieval (shallow) step
    only conv_in, the down sub-layers up to skip `branch`, the up resnets that consume skips
    `branch`..0 and conv_out run; the up path enters with the feature cached at the last full step:
    the input of resnet `resnet` of `up_blocks[up_block]` (before its concatenation with skip
    `branch`). This is what horseee/DeepCache's `DeepCacheSDHelper` (DeepCache/extension/
    deepcache.py, set_params(cache_branch_id=branch)) caches on diffusers' UNet2DConditionModel:
    its (block, layer) = divmod(branch, 3) for SD's three skips per level, divmod(branch,
    layers_per_block + 1) here. (Its older SD pipeline, DeepCache/sd/, caches one sub-layer deeper
    for the same ids.)"""

    branch: int
    up_block: int  # index into UNet2DConditionModel.up_blocks
    resnet: int  # index into that block's resnets
    channels: int  # the cached feature's channels
    level: int  # its resolution: the latent size halved `level` times (rounded up, as the downsamplers do)


def cache_split(config: UNetConfig, branch: int) -> CacheSplit:
    """The split of `config`'s U-Net for skip `branch` (0 = the shallowest: conv_in's skip)."""
    per_level = config.layers_per_block + 1  # skips consumed per up block
    levels = len(config.block_out_channels)
    count = levels * per_level  # conv_in + layers_per_block per level + a downsampler per level but the last
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
        raise ValueError(f"cache branch must be an integer in 0..{count - 1} for this U-Net "
                         f"({levels} levels of {config.layers_per_block} layers); got {branch!r}")
    level, position = divmod(branch, per_level)
    if level > 0 and config.downsample_padding != 1:
        raise ValueError(f"cache branch {branch} lies below the first downsampler, whose output size this runtime "
                         f"derives for downsample_padding=1 only (this U-Net has {config.downsample_padding})")
    resnet = config.layers_per_block - position
    # the first resnet of an up block takes the block below's output (the middle block's at the bottom)
    channels = config.block_out_channels[min(level + 1, levels - 1) if resnet == 0 else level]
    return CacheSplit(branch, levels - 1 - level, resnet, channels, level)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, heads, depths = config.block_out_channels, config.num_heads, config.depths
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim, config.time_cond_proj_dim)
        if config.addition_embed_type == "text_time":  # SDXL; add_time_proj has no weights (diffusers Timesteps)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, config.time_embed_dim)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], heads[i], t == "CrossAttnDownBlock2D", i == last, config, depths[i])
            for i, t in enumerate(config.down_block_types))
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], heads[-1], config, depths[-1])
        rch, rheads, rdepths = ch[::-1], heads[::-1], depths[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[min(i + 1, last)], rch[max(i - 1, 0)], rch[i], rheads[i], t == "CrossAttnUpBlock2D",
                    i == last, config, rdepths[i])
            for i, t in enumerate(config.up_block_types))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sample [b, in_channels, lh, lw], timestep [] or [b] (or [1]), encoder_hidden_states
        [b, tokens, cross_attention_dim], for an LCM-distilled U-Net timestep_cond [b,
        time_cond_proj_dim] (the guidance-scale embedding), for SDXL text_embeds [b, pooled] and
        time_ids [b, n] -> noise prediction [b, out_channels, lh, lw]."""
        added = None if text_embeds is None and time_ids is None else (text_embeds, time_ids)
        return self._full(sample, timestep, encoder_hidden_states, None, timestep_cond, added=added)[0]

    def forward_deep(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     branch: int, timestep_cond: torch.Tensor | None = None,
                     added: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full U-Net (the same operations as `forward`, so the same noise prediction) that also
        returns the feature DeepCache caches for `branch` (see `cache_split`):
        (noise [b, out_channels, lh, lw], feature [b, channels, lh / 2**level, lw / 2**level]).
        `timestep_cond` (LCM) and `added` = (text_embeds, time_ids) (SDXL) as in `forward`."""
        return self._full(sample, timestep, encoder_hidden_states, cache_split(self.config, branch), timestep_cond,
                          added=added)

    def forward_shallow(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        feature: torch.Tensor, branch: int, timestep_cond: torch.Tensor | None = None,
                        added: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """DeepCache's retrieval step: conv_in, the down path up to skip `branch`, then the up path
        from the resnet that consumes it (entered with the cached `feature` of `forward_deep`), and
        conv_out. The middle of the U-Net does not run; the time embedding (with the LCM and SDXL
        conditioning) does, as every block takes it."""
        split = cache_split(self.config, branch)
        temb = self._time_embedding(sample, timestep, timestep_cond, added)
        skips = self._down(self.conv_in(sample), temb, encoder_hidden_states, limit=split.branch + 1)
        return self._up(feature, skips, temb, encoder_hidden_states, start=split)[0]

    def forward_control(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        residuals: list[torch.Tensor], timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` with a ControlNet's residuals (export/controlnet.py): `residuals[:-1]` added to
        the skip tensors after the down path, `residuals[-1]` to the mid block's output (diffusers
        UNet2DConditionModel's down_block_additional_residuals / mid_block_additional_residual)."""
        return self._full(sample, timestep, encoder_hidden_states, None, timestep_cond, residuals)[0]

    def _time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor,
                        timestep_cond: torch.Tensor | None = None,
                        added: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        cfg = self.config
        if (timestep_cond is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError("an LCM-distilled U-Net (time_cond_proj_dim) takes timestep_cond, and only it does")
        if (added is None) != (cfg.addition_embed_type is None) or (added is not None and None in added):
            raise ValueError("an SDXL U-Net (addition_embed_type 'text_time') takes text_embeds and time_ids, and only "
                             "it does")
        t = timestep.reshape(-1).expand(sample.shape[0])
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        cond = None if timestep_cond is None else timestep_cond.to(sample.dtype)
        emb = self.time_embedding(temb.to(sample.dtype), cond)  # [b, time_embed_dim]
        if added is None:
            return emb
        # diffusers UNet2DConditionModel.get_aug_embed, "text_time": each time id embedded sinusoidally
        # (add_time_proj: Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)), [b, n] -> [b, n * dim]
        text_embeds, time_ids = added
        ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        ids = ids.reshape(text_embeds.shape[0], -1)
        return emb + self.add_embedding(torch.cat([text_embeds, ids.to(text_embeds.dtype)], dim=-1).to(emb.dtype))

    def _full(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              capture: CacheSplit | None, timestep_cond: torch.Tensor | None = None,
              residuals: list[torch.Tensor] | None = None,
              added: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        temb = self._time_embedding(sample, timestep, timestep_cond, added)
        skips = self._down(self.conv_in(sample), temb, context)
        x = self.mid_block(skips[-1], temb, context)  # the last skip is the down path's output
        if residuals is not None:  # a ControlNet's, added after the down and mid blocks ran (as diffusers)
            if len(residuals) != len(skips) + 1:
                raise ValueError(f"{len(residuals)} ControlNet residuals for {len(skips)} skips and the mid block")
            skips = [s + r for s, r in zip(skips, residuals)]
            x = x + residuals[-1]
        return self._up(x, skips, temb, context, capture=capture)

    def _down(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
              limit: int | None = None) -> list[torch.Tensor]:
        """Skip tensors in order: conv_in's output `x`, then one per down sub-layer; `limit` stops
        after that many."""
        skips = [x]
        for block in self.down_blocks:
            if limit is not None and len(skips) >= limit:
                break
            x, s = block(x, temb, context, None if limit is None else limit - len(skips))
            skips.extend(s)
        return skips

    def _up(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor, *,
            start: CacheSplit | None = None,
            capture: CacheSplit | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The up path over `skips` (consumed last first) and conv_out: whole (x = the middle block's
        output), or from `start`'s resnet on (x = the cached feature). Returns (noise, the feature
        at `capture`, or None)."""
        feature = None
        for i, block in enumerate(self.up_blocks):
            first = 0
            if start is not None and i <= start.up_block:
                if i < start.up_block:
                    continue
                first = start.resnet
            n = len(block.resnets) - first
            own, skips = skips[-n:], skips[:-n]
            at = capture.resnet if capture is not None and i == capture.up_block else None
            x, f = block(x, own, temb, context, skips[-1] if skips else None, first, at)
            feature = f if f is not None else feature
        return self.conv_out(self.conv_act(self.conv_norm_out(x))), feature
