"""A tiny autoencoder (TAESD) to add beside a model's VAE (`build-engine --tiny-vae PATH`): read from a
diffusers `AutoencoderTiny` folder or from madebyollin's single files, into export/tiny_vae.py.

Accepted `PATH`s:
- a diffusers `AutoencoderTiny` folder (`config.json` with `_class_name` "AutoencoderTiny" and
  `diffusion_pytorch_model.safetensors`), or a diffusers pipeline folder whose `vae/` is one;
- madebyollin/taesd's single files: a folder holding `taesd_encoder.safetensors` and
  `taesd_decoder.safetensors` (or `taesdxl_*`, the SDXL ones), or either file of such a pair.

The single files' layout is madebyollin/taesd taesd.py (commit 2a1b414): `Encoder()` and `Decoder()`
are bare `nn.Sequential`s, so their keys are `<index>.<param>`: the encoder's `conv(3, 64), Block, conv
(stride 2, no bias), Block x3, ..., conv(64, latent_channels)`; the decoder's `Clamp(), conv(latent,
64), ReLU, Block x3, Upsample, conv(no bias), ..., Block, conv(64, 3)`. diffusers' `EncoderTiny` /
`DecoderTiny` hold the same layers in `layers` (an `nn.Sequential`) with the decoder's `Clamp` moved
into `forward` (tanh(x / 3) * 3), so the whole key map is one rule per half (as diffusers'
scripts/convert_tiny_autoencoder_to_diffusers.py does): encoder `N.rest` -> `encoder.layers.N.rest`,
decoder `N.rest` -> `decoder.layers.(N - 1).rest`. Block keys (`conv.0/2/4`, `skip`) are the same on
both sides. The sizes (channels, blocks per stage, latent channels) are read from the tensors; what the
files cannot say is taesd.py's: ReLU, nearest 2x upsampling, and its `TAESD.latent_magnitude` 3 and
`latent_shift` 0.5; `scaling_factor` 1.0 is diffusers `AutoencoderTiny`'s default (the files carry no
config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.convert_ldm import CheckpointError
from export.hashing import file_sha256, tree_sha256
from export.tiny_vae import CLASS_NAME, AutoencoderTiny, TinyVAEConfig

# madebyollin/taesd's file names (its README): taesd_* for SD 1.x / 2.x latents, taesdxl_* for SDXL's
SINGLE_FILE_PREFIXES = ("taesd", "taesdxl")
_KEY = re.compile(r"(\d+)\.(.+)")


@dataclass
class TinyVAESource:
    """A tiny autoencoder read for `--tiny-vae`: its config, the reference module (float32, eval) and
    what the manifest records of it (kind, path, sha256, and the single files' prefix)."""

    config: TinyVAEConfig
    vae: AutoencoderTiny
    identity: dict[str, Any]


def load_tiny_vae(path: str | Path) -> TinyVAESource:
    """Read the TAESD at `path` (see the module doc); raise CheckpointError naming what is wrong."""
    from export.loading.read import _load_strict, _read_json, _read_safetensors

    path = Path(path).expanduser()
    folder = path / "vae" if (path / "model_index.json").is_file() else path
    if (folder / "config.json").is_file():
        config_dict = _read_json(folder / "config.json")
        if config_dict.get("_class_name") != CLASS_NAME:
            raise CheckpointError(f"{folder}: --tiny-vae needs an {CLASS_NAME} (TAESD); its config.json says "
                                  f"{config_dict.get('_class_name')!r}")
        weights = folder / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors beside its config.json")
        try:
            config = TinyVAEConfig.from_dict(config_dict)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from e
        state = _read_safetensors(weights)
        identity = {"kind": "diffusers", "path": str(folder.resolve()), "sha256": tree_sha256(folder)}
    else:
        encoder, decoder, prefix = _single_files(path)
        halves = {"encoder": _read_safetensors(encoder), "decoder": _read_safetensors(decoder)}
        config = _single_file_config(halves["encoder"], halves["decoder"], f"{encoder.parent}/{prefix}_*")
        state = {**{f"encoder.layers.{k}": v for k, v in halves["encoder"].items()},
                 **{_decoder_key(k, decoder): v for k, v in halves["decoder"].items()}}
        identity = {"kind": "single_files", "prefix": prefix, "path": str(encoder.parent.resolve()),
                    "sha256": {"encoder": file_sha256(encoder), "decoder": file_sha256(decoder)}}
    vae = AutoencoderTiny(config)
    _load_strict(vae, state, f"tiny VAE {path}")
    return TinyVAESource(config, vae.eval(), identity)


def _single_files(path: Path) -> tuple[Path, Path, str]:
    """The (encoder, decoder, prefix) single files `path` names: a folder holding one pair, or a file of it."""
    if path.is_file():
        m = re.fullmatch(r"(taesd|taesdxl)_(encoder|decoder)\.safetensors", path.name)
        if m is None:
            raise CheckpointError(f"{path}: --tiny-vae takes taesd_encoder.safetensors / taesd_decoder.safetensors "
                                  "(or taesdxl_*), an AutoencoderTiny folder, or a folder holding one of those")
        prefix, folder = m.group(1), path.parent
    elif path.is_dir():
        found = [p for p in SINGLE_FILE_PREFIXES if (path / f"{p}_decoder.safetensors").is_file()
                 or (path / f"{p}_encoder.safetensors").is_file()]
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected an AutoencoderTiny folder (config.json) or exactly one pair of "
                                  f"madebyollin's files ({', '.join(p + '_encoder/_decoder.safetensors' for p in SINGLE_FILE_PREFIXES)}); "
                                  f"found {found or 'neither'}")
        prefix, folder = found[0], path
    else:
        raise CheckpointError(f"--tiny-vae {path} does not exist")
    pair = folder / f"{prefix}_encoder.safetensors", folder / f"{prefix}_decoder.safetensors"
    missing = [p.name for p in pair if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: the tiny VAE needs both halves; {', '.join(missing)} is missing")
    return pair[0], pair[1], prefix


def _decoder_key(key: str, where: Path) -> str:
    m = _KEY.fullmatch(key)
    if m is None or int(m.group(1)) == 0:  # index 0 is taesd.py's Clamp, which has no weights
        raise CheckpointError(f"{where}: unexpected key {key!r} for taesd.py's Decoder (keys are '<layer>.<param>', "
                              "layer 0 being its weightless Clamp)")
    return f"decoder.layers.{int(m.group(1)) - 1}.{m.group(2)}"


def _layers(state: dict[str, Any], where: str) -> list[tuple[int, str, Any]]:
    """(index, "conv" | "block", the layer's first conv weight) per layer with weights, in order."""
    by_index: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"{where}: unexpected key {key!r}; taesd.py's layers are '<index>.<param>'")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = []
    for i in sorted(by_index):
        params = by_index[i]
        if "conv.0.weight" in params:
            out.append((i, "block", params["conv.0.weight"]))
        elif "weight" in params and params["weight"].ndim == 4:
            out.append((i, "conv", params["weight"]))
        else:
            raise CheckpointError(f"{where}: layer {i} ({sorted(params)}) is neither a conv nor a taesd.py Block")
    return out


def _stages(layers: list[tuple[int, str, Any]], where: str) -> tuple[list[int], list[int]]:
    """Blocks per stage and their channels, stages being split by the convs between them."""
    counts, channels = [], []
    for _, kind, weight in layers:
        if kind == "conv":
            counts.append(0)
            channels.append(int(weight.shape[0]))
        elif not counts:
            raise CheckpointError(f"{where}: a Block before the first conv is not taesd.py's layout")
        else:
            counts[-1] += 1
    return counts, channels


def _single_file_config(encoder: dict[str, Any], decoder: dict[str, Any], where: str) -> TinyVAEConfig:
    """The sizes the two halves' tensors imply (taesd.py's layout; see the module doc)."""
    enc = _layers(encoder, f"{where} encoder")
    dec = _layers(decoder, f"{where} decoder")
    if len(enc) < 2 or enc[-1][1] != "conv" or len(dec) < 2 or dec[-1][1] != "conv" or dec[0][1] != "conv":
        raise CheckpointError(f"{where}: the layers do not follow taesd.py's Encoder / Decoder")
    enc_counts, enc_channels = _stages(enc[:-1], f"{where} encoder")  # the last conv makes the latents
    # stage i: the blocks after conv i (the first conv takes the latents; the last makes the image)
    dec_counts, _ = _stages(dec, f"{where} decoder")
    latent_channels = int(enc[-1][2].shape[0])
    if int(dec[0][2].shape[1]) != latent_channels:
        raise CheckpointError(f"{where}: the encoder makes {latent_channels} latent channels, the decoder takes "
                              f"{int(dec[0][2].shape[1])}")
    dec_convs = [int(w.shape[0]) for _, kind, w in dec if kind == "conv"]
    try:
        return TinyVAEConfig(in_channels=int(enc[0][2].shape[1]), out_channels=dec_convs[-1],
                             encoder_block_out_channels=tuple(enc_channels), num_encoder_blocks=tuple(enc_counts),
                             decoder_block_out_channels=tuple(dec_convs[:-1]),
                             num_decoder_blocks=tuple(dec_counts[:-1]), latent_channels=latent_channels,
                             act_fn="relu", upsample_fn="nearest", upsampling_scaling_factor=2,
                             latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def with_tiny_vae(model: Any, tiny: TinyVAESource) -> Any:
    """A shallow copy of the `LoadedModel` `model` whose VAE is `tiny` (what the tiny VAE networks
    are exported from); refused where its latents are not the model's (channels, downsampling), or
    where madebyollin's single files are named for the other family (its README: taesd_* for SD 1.x /
    2.x, taesdxl_* for SDXL)."""
    from dataclasses import replace

    from export.configs import family_base

    have, want = model.spec.vae, tiny.config
    if (want.latent_channels, want.vae_scale_factor) != (have.latent_channels, have.vae_scale_factor):
        raise CheckpointError(f"the tiny VAE has {want.latent_channels} latent channels at 1/{want.vae_scale_factor} "
                              f"size; this model's latents have {have.latent_channels} at 1/{have.vae_scale_factor}")
    prefix, sdxl = tiny.identity.get("prefix"), family_base(model.spec.family) == "sdxl"
    if prefix is not None and (prefix == "taesdxl") != sdxl:  # same shapes, other latent spaces: by name
        raise CheckpointError(f"{tiny.identity['path']}: madebyollin's {prefix}_* files decode "
                              f"{'SDXL' if prefix == 'taesdxl' else 'SD 1.x / 2.x'} latents; this is an "
                              f"{model.spec.family} model: use {'taesdxl' if sdxl else 'taesd'}_*")
    return replace(model, vae=tiny.vae, spec=replace(model.spec, vae=want))


def manifest_entry(tiny: TinyVAESource) -> dict[str, Any]:
    """What a manifest records of each tiny VAE network beside its file: the kind, its own latent
    constants from its config (never assumed), and its source."""
    c = tiny.config
    return {"vae": c.kind, "scaling_factor": c.scaling_factor, "latent_magnitude": c.latent_magnitude,
            "latent_shift": c.latent_shift, "source": dict(tiny.identity)}
