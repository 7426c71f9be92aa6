"""Reference tiny autoencoder (TAESD, madebyollin/taesd; diffusers `AutoencoderTiny`) in plain PyTorch.

Module attribute names equal diffusers 0.42 `AutoencoderTiny` state-dict keys (`encoder.layers.N`,
`decoder.layers.N`, each block's `conv.0/2/4` and `skip`), so a diffusers folder's weights load with
one strict `load_state_dict`. Architecture from diffusers models/autoencoders/vae.py `EncoderTiny` /
`DecoderTiny` and models/unets/unet_2d_blocks.py `AutoencoderTinyBlock`.

The network contract (runtime/folder/networks.py) is that of the KL autoencoder, through the same
signature wrappers (export/onnx_export.py): `decode(latent / scaling_factor)` and `encode(image) ->
(mean, std)`. What diffusers' StableDiffusionPipeline does with an `AutoencoderTiny` (diffusers 0.42
pipeline_stable_diffusion.py `__call__`: `vae.decode(latents / vae.config.scaling_factor)`;
pipeline_stable_diffusion_img2img.py `prepare_latents`: `retrieve_latents(vae.encode(image))` takes
the output's `.latents`, then `* vae.config.scaling_factor`) is exactly that composite, with:
- `encode` deterministic: the encoder's raw latents, `std` zeros (the runtime's `mean + std * eps`
  then equals the latents);
- `decode` the decoder alone. `AutoencoderTiny.encode` / `.decode` do not apply `scale_latents` /
  `unscale_latents` (`latent_magnitude`, `latent_shift`): only its `forward` does, to round-trip the
  latents through uint8. Both values are read from the config and kept (`TinyVAEConfig`), never
  applied in the graphs, as the pipeline never applies them either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# diffusers models/activations.py ACT2CLS: the activations `get_activation(act_fn)` accepts.
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
CLASS_NAME = "AutoencoderTiny"
# config.json keys diffusers writes that change nothing here (`block_out_channels` is registered as
# the decoder's by `AutoencoderTiny.__init__`; checked against it below).
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "block_out_channels"}


@dataclass(frozen=True)
class TinyVAEConfig:
    """Sizes and latent constants of a diffusers `AutoencoderTiny` (defaults: its `__init__`'s, the
    values of madebyollin/taesd's config.json)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    kind = "tiny"  # the manifest's name for this VAE (networks' "vae" entry; export/build.py)

    def __post_init__(self) -> None:
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ValueError(f"unsupported AutoencoderTiny act_fn {self.act_fn!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        for blocks, channels, what in ((self.num_encoder_blocks, self.encoder_block_out_channels, "encoder"),
                                       (self.num_decoder_blocks, self.decoder_block_out_channels, "decoder")):
            if len(blocks) != len(channels):
                raise ValueError(f"AutoencoderTiny: num_{what}_blocks {blocks} and {what}_block_out_channels "
                                 f"{channels} must have the same length")
        down = 2 ** (len(self.encoder_block_out_channels) - 1)
        up = self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)
        if not down == up == self.vae_scale_factor:
            raise ValueError(f"AutoencoderTiny: the encoder downsamples by {down} and the decoder upsamples by {up}; "
                             f"StableDiffusionPipeline assumes both are 2 ** (len(block_out_channels) - 1) = "
                             f"{self.vae_scale_factor}")
        if self.shift_factor:
            raise ValueError(f"AutoencoderTiny shift_factor {self.shift_factor}: Stable Diffusion pipelines do not "
                             "apply it (FLUX / SD3 tiny autoencoders do); expected 0.0")

    @property
    def vae_scale_factor(self) -> int:
        """diffusers StableDiffusionPipeline: 2 ** (len(vae.config.block_out_channels) - 1), where
        `AutoencoderTiny` registers the decoder's channels as block_out_channels."""
        return 2 ** (len(self.decoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyVAEConfig:
        if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ValueError(f"expected an {CLASS_NAME} config, got _class_name {d.get('_class_name')!r}")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names - _IGNORED)
        if unknown:
            raise ValueError(f"unsupported AutoencoderTiny config keys {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        config = cls(**kw)
        registered = d.get("block_out_channels")
        if registered is not None and tuple(registered) != config.decoder_block_out_channels:
            raise ValueError(f"AutoencoderTiny block_out_channels {registered} differ from decoder_block_out_channels "
                             f"{config.decoder_block_out_channels}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in asdict(self).items()}}


def _activation(name: str) -> nn.Module:
    return ACTIVATIONS[name.lower()]()


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convolutions with the activation between, a residual (1x1 conv where the channels
    change), then ReLU."""

    def __init__(self, cin: int, cout: int, act_fn: str):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _activation(act_fn),
                                  nn.Conv2d(cout, cout, 3, padding=1), _activation(act_fn),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """image in [-1, 1] -> raw latents; each block after the first starts with a stride-2 conv."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n, c) in enumerate(zip(cfg.num_encoder_blocks, cfg.encoder_block_out_channels)):
            layers.append(nn.Conv2d(cfg.in_channels, c, 3, padding=1) if i == 0
                          else nn.Conv2d(c, c, 3, padding=1, stride=2, bias=False))
            layers.extend(AutoencoderTinyBlock(c, c, cfg.act_fn) for _ in range(n))
        layers.append(nn.Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # [-1, 1] -> [0, 1]


class DecoderTiny(nn.Module):
    """raw latents -> image in [-1, 1]: soft clamp to [-3, 3], blocks with upsampling between."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        ch = cfg.decoder_block_out_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), _activation(cfg.act_fn)]
        for i, (n, c) in enumerate(zip(cfg.num_decoder_blocks, ch)):
            final = i == len(ch) - 1
            layers.extend(AutoencoderTinyBlock(c, c, cfg.act_fn) for _ in range(n))
            if not final:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode=cfg.upsample_fn))
            layers.append(nn.Conv2d(c, cfg.out_channels if final else c, 3, padding=1, bias=final))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)  # [0, 1] -> [-1, 1]


class AutoencoderTiny(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [b, 3, h, w] in [-1, 1] -> (latents, zeros): deterministic, as diffusers'
        `AutoencoderTiny.encode(x).latents`, unscaled."""
        latents = self.encoder(x)
        return latents, torch.zeros_like(latents)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """unscaled latent -> image, about [-1, 1] (diffusers `AutoencoderTiny.decode(z).sample`)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


def build_vae(config: Any) -> nn.Module:
    """The reference autoencoder for a VAE config: `AutoencoderTiny` for a `TinyVAEConfig`, else the
    KL `AutoencoderKL` (export/vae.py)."""
    if isinstance(config, TinyVAEConfig):
        return AutoencoderTiny(config)
    from export.vae import AutoencoderKL

    return AutoencoderKL(config)


def vae_config(d: dict[str, Any]) -> Any:
    """A diffusers `vae/config.json` dict as our config: `TinyVAEConfig` for an `AutoencoderTiny`,
    else `VAEConfig` (which refuses what it does not support)."""
    if d.get("_class_name") == CLASS_NAME:
        return TinyVAEConfig.from_dict(d)
    from export.configs import VAEConfig

    return VAEConfig.from_dict(d)
