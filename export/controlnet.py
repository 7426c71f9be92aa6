"""Reference ControlNet (Zhang, Rao and Agrawala 2023, arXiv:2302.05543) in plain PyTorch.

Module attribute names equal diffusers 0.42 `ControlNetModel` state-dict keys, so a diffusers
ControlNet folder loads with one strict `load_state_dict`; A1111 / lllyasviel single files
(`control_model.*` keys of the `ldm`-style `ControlNet` of lllyasviel/ControlNet `cldm/cldm.py`, e.g.
control_v11p_sd15_canny.safetensors, or unprefixed ones) are renamed by the U-Net's rules
(export/convert_ldm.py) plus three ControlNet rules (`controlnet_rules`), the same renaming as
diffusers 0.42 `convert_controlnet_checkpoint` (diffusers/loaders/single_file_utils.py).

A ControlNet is a copy of the U-Net's encoder (conv_in, time embedding, down blocks, mid block:
the blocks of export/unet.py) whose input also receives the control image through a small
convolutional embedding (`ControlNetConditioningEmbedding`), and whose 12 skip tensors and mid-block
output, each through a 1x1 "zero convolution", are the residuals added to the U-Net's skips and
mid-block output (export/unet.py `forward_control`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from export.configs import UNetConfig
from export.convert_ldm import CheckpointError, _apply_rules, _unet_rules, unet_layout_from_ldm
from export.unet import DownBlock, TimestepEmbedding, UNetMidBlock2DCrossAttn, timestep_embedding

# diffusers 0.42 ControlNetModel defaults (models/controlnets/controlnet.py __init__)
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)
CONDITIONING_CHANNELS = 3  # an RGB control image: the only kind the runtime's contract declares
# lllyasviel/ControlNet cldm/cldm.py and A1111's single files keep the ControlNet under this prefix
LDM_PREFIX = "control_model."
# config.json keys of a ControlNetModel that are not U-Net architecture (the rest is UNetConfig's)
_CONTROL_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels",
                 "controlnet_conditioning_channel_order", "global_pool_conditions")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet's sizes: its encoder's as a `UNetConfig` (up blocks mirrored, unused), the
    control image embedding's channels and channel order."""

    unet: UNetConfig
    conditioning_channels: int = CONDITIONING_CHANNELS
    embedding_channels: tuple[int, ...] = DEFAULT_EMBEDDING_CHANNELS
    channel_order: str = "rgb"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlNetConfig":
        if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"not a ControlNetModel config: _class_name {d.get('_class_name')!r}")
        if d.get("global_pool_conditions"):
            raise CheckpointError("global_pool_conditions (the shuffle ControlNet) is not implemented")
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise CheckpointError(f"unknown controlnet_conditioning_channel_order {order!r}; expected rgb or bgr")
        unet = {k: v for k, v in d.items() if k not in _CONTROL_KEYS}
        down = unet.get("down_block_types", list(UNetConfig.down_block_types))
        unet["up_block_types"] = [_UP_OF_DOWN.get(t, t) for t in reversed(down)]
        if unet.get("num_attention_heads") is None:
            unet.pop("num_attention_heads", None)
        try:
            config = UNetConfig.from_dict(unet)
        except ValueError as e:
            raise CheckpointError(f"ControlNet config: {e}") from e
        return cls(config, int(d.get("conditioning_channels", CONDITIONING_CHANNELS)),
                   tuple(d.get("conditioning_embedding_out_channels") or DEFAULT_EMBEDDING_CHANNELS), order)


class ControlNetConditioningEmbedding(nn.Module):
    """Control image [b, 3, H, W] in [0, 1] -> [b, block_out_channels[0], H / 8, W / 8] (a 3x3 conv,
    then per level a 3x3 conv and a stride-2 3x3 conv, SiLU after each; a zero-initialised conv_out)."""

    def __init__(self, out_channels: int, conditioning_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        ch, heads, last = cfg.block_out_channels, cfg.num_heads, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(ch[0], config.conditioning_channels,
                                                                         config.embedding_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], heads[i], t == "CrossAttnDownBlock2D", i == last, cfg)
            for i, t in enumerate(cfg.down_block_types))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in residual_channels(cfg))
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], heads[-1], cfg)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """sample [b, in_channels, lh, lw], timestep [b], encoder_hidden_states [b, tokens, cross_dim],
        controlnet_cond [b, 3, 8 lh, 8 lw] in [0, 1], conditioning_scale [b, residuals] (one scale per
        residual: diffusers' conditioning_scale, times logspace(-1, 0, residuals) in guess mode) ->
        the down residuals (12 for SD) then the mid residual, each scaled."""
        cfg = self.config.unet
        t = timestep.reshape(-1).expand(sample.shape[0])
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).to(sample.dtype))
        if self.config.channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, encoder_hidden_states)
            skips.extend(s)
        mid = self.mid_block(x, temb, encoder_hidden_states)
        outs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(mid)]
        scale = conditioning_scale.to(sample.dtype)
        return tuple(o * scale[:, i, None, None, None] for i, o in enumerate(outs))


def residual_channels(cfg: UNetConfig) -> list[int]:
    """Channels of the down residuals in the order the down path makes them: conv_in's, then per
    level `layers_per_block` resnets and (but the last level) a downsampler."""
    out = [cfg.block_out_channels[0]]
    for i, c in enumerate(cfg.block_out_channels):
        out += [c] * (cfg.layers_per_block + (i < len(cfg.block_out_channels) - 1))
    return out


# --- compatibility with the base model ---------------------------------------------------------------

def check_compatible(control: ControlNetConfig, base: UNetConfig, family: str, name: str,
                     vae_scale_factor: int = 8) -> None:
    """Refuse a ControlNet whose residuals cannot feed `base`: another cross-attention width (a SD 2.x
    ControlNet on SD 1.x), another block layout, or another attention kind. The message names both."""
    c = control.unet
    fields = ("cross_attention_dim", "block_out_channels", "layers_per_block", "down_block_types",
              "use_linear_projection")
    bad = [f"{f} {getattr(c, f)!r} (model: {getattr(base, f)!r})" for f in fields if getattr(c, f) != getattr(base, f)]
    if c.in_channels != base.out_channels:  # the latents alone (an inpainting U-Net's ControlNet too)
        bad.append(f"in_channels {c.in_channels} (model latents: {base.out_channels})")
    down = 2 ** (len(control.embedding_channels) - 1)
    if down != vae_scale_factor:
        bad.append(f"control image embedding downsampling x{down} (conditioning_embedding_out_channels "
                   f"{list(control.embedding_channels)}; the model's VAE: x{vae_scale_factor})")
    if control.conditioning_channels != CONDITIONING_CHANNELS:
        bad.append(f"conditioning_channels {control.conditioning_channels} (the runtime takes RGB control images: 3)")
    if bad:
        kind = "sd2" if c.use_linear_projection else "sd1"
        raise CheckpointError(f"ControlNet {name!r} ({kind}-like, cross-attention {c.cross_attention_dim}) does not fit "
                              f"the {family} model (cross-attention {base.cross_attention_dim}): " + "; ".join(bad))


# --- LDM (A1111 / lllyasviel) single files --------------------------------------------------------------

def controlnet_rules(keys: Any) -> list:
    """The renaming rules between our keys and a single file's unprefixed LDM keys: the U-Net's down
    and mid rules (export/convert_ldm.py), and input_hint_block (the embedding: convs at even
    indices, SiLUs between), zero_convs.i.0 and middle_block_out.0 (diffusers 0.42
    `convert_controlnet_checkpoint`)."""
    keys = list(keys)
    layout = unet_layout_from_ldm(keys) if any(k.startswith("input_blocks.") for k in keys) else None
    if layout is None:
        from export.convert_ldm import unet_layout_from_ours

        layout = unet_layout_from_ours(keys)
    hint = _count(keys, r"input_hint_block\.(\d+)\.weight", r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
    zero = _count(keys, r"zero_convs\.(\d+)\.0\.weight", r"controlnet_down_blocks\.(\d+)\.weight")
    rules = [r for r in _unet_rules(layout) if not r[0].startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    rules += [("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", ()),
              ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * hint + 2}.", ()),
              ("controlnet_mid_block.", "middle_block_out.0.", ())]
    rules += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * i + 2}.", ()) for i in range(hint)]
    rules += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", ()) for i in range(zero)]
    return rules


def _count(keys: list[str], ldm: str, ours: str) -> int:
    """How many blocks the keys hold, read from whichever layout they are in (LDM: the embedding's
    last conv is not a block, so its count is the highest even index / 2 - 1)."""
    found = {int(m.group(1)) for k in keys for m in [re.match(ldm, k)] if m}
    if found:
        return max(found) // 2 - 1 if "hint" in ldm else len(found)
    return len({int(m.group(1)) for k in keys for m in [re.match(ours, k)] if m})


def from_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single file's ControlNet keys (`control_model.` prefix or none) -> ours."""
    sd = {k.removeprefix(LDM_PREFIX): v for k, v in state_dict.items()
          if k.startswith(LDM_PREFIX) or not any(k.startswith(p) for p in ("model.", "first_stage", "cond_stage"))}
    if "input_hint_block.0.weight" not in sd:
        raise CheckpointError("not a ControlNet single file: no input_hint_block.0.weight "
                              f"(keys start {sorted(state_dict)[:3]})")
    return _apply_rules(sd, controlnet_rules(sd), to_ldm=False)


def to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ControlNet keys -> a single file's (`control_model.` prefixed)."""
    return {LDM_PREFIX + k: v for k, v in _apply_rules(state_dict, controlnet_rules(state_dict), to_ldm=True).items()}


def _infer_config(sd: dict[str, torch.Tensor], base: UNetConfig) -> ControlNetConfig:
    """A single file's config: the shapes give the sizes; head counts (which shapes do not tell)
    and the other settings are the base model's."""
    from export.loading.infer import infer_unet_fields

    fields = infer_unet_fields({**sd, "conv_out.weight": torch.empty(base.out_channels, 1)})
    fields.pop("up_block_types", None)
    fields.pop("out_channels", None)
    down = fields.get("down_block_types", base.down_block_types)
    ups = tuple(_UP_OF_DOWN[t] for t in reversed(down))
    unet = replace(base, **{**fields, "up_block_types": ups, "in_channels": fields.get("in_channels", 4),
                            "time_cond_proj_dim": None})
    n = len([k for k in sd if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k)])
    emb = tuple(sd[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0] for i in range(n // 2))
    return ControlNetConfig(unet, sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
                            (sd["controlnet_cond_embedding.conv_in.weight"].shape[0],) + emb)


# --- loading ------------------------------------------------------------------------------------------------

def load_controlnet(source: str | Path, base: UNetConfig) -> ControlNetModel:
    """A ControlNet from a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model
    weights) or a single file (.safetensors, or a .pth / .ckpt read with torch.load(weights_only=True)),
    loaded with one strict load_state_dict; float32, eval mode. `base`: the U-Net it will feed (a
    single file's head counts come from it)."""
    from export.loading.read import _component_weights, _load_strict, _read_weights

    path = Path(source).expanduser()
    if path.is_dir():
        config = ControlNetConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
        sd = _read_weights(_component_weights(path.parent, path.name, ("diffusion_pytorch_model",)))
    elif path.is_file():
        sd = from_ldm(_read_weights(path))
        config = _infer_config(sd, base)
    else:
        raise CheckpointError(f"ControlNet {path} does not exist (a diffusers ControlNetModel folder or a single file)")
    model = ControlNetModel(config)
    _load_strict(model, sd, f"ControlNet {path.name}")
    return model.eval()
