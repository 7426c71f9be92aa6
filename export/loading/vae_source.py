"""A replacement KL autoencoder for `build-engine SRC --vae PATH`: read another `AutoencoderKL` and put
it in place of the source's VAE before export (SDXL's fp16-fixed VAE, madebyollin/sdxl-vae-fp16-fix;
SD 1.x's vae-ft-mse; the `*.vae.safetensors` / `*.vae.pt` files A1111 users keep beside checkpoints).

Accepted `PATH`s:
- a diffusers `AutoencoderKL` folder (`config.json`, `diffusion_pytorch_model.safetensors` or `.bin`),
  or a diffusers pipeline folder, whose `vae/` is taken;
- a single file (.safetensors, .pt, .ckpt, .pth, .bin; pickles read weights-only, A1111's `.vae.pt`
  `{"state_dict": ...}` included) in the original LDM layout (`encoder.down.N.block.M`, `decoder.up.N`,
  `quant_conv`, `post_quant_conv`; ldm/modules/diffusionmodules/model.py), converted by
  export/convert_ldm.py's VAE rules, or in diffusers' layout. Keys may carry a `first_stage_model.` or
  `vae.` prefix (diffusers single_file_utils.py `LDM_VAE_KEYS`, diffusers 0.42). As A1111
  modules/sd_vae.py `load_vae` does, keys starting with "loss" (the autoencoder's training loss) and
  `model_ema.decay` / `model_ema.num_updates` are dropped; anything else must fit the model, strictly.
  diffusers-layout files written before diffusers 0.14 name the mid-block attention `query`, `key`,
  `value`, `proj_attn`; they are renamed to `to_q`, `to_k`, `to_v`, `to_out.0` (diffusers
  modeling_utils.py `_convert_deprecated_attention_blocks`).

Its config (scaling_factor, force_upcast, sizes) is its own config.json's where it has one; a single
file's sizes are read from its tensors (export/loading/infer.py `infer_vae_fields`) and the rest
(scaling_factor, force_upcast, norm groups) is the source model's VAE config. `force_upcast` then
decides, as for the source's own VAE, whether an fp16 folder keeps fp32 VAE graphs (export/build.py
`network_precision`). A VAE whose latents do not fit the model's (channels, downsampling, image
channels) is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from export import convert_ldm
from export.configs import VAEConfig
from export.convert_ldm import CheckpointError
from export.hashing import file_sha256, files_sha256
from export.loading.infer import StateDict, infer_vae_fields

# diffusers loaders/single_file_utils.py LDM_VAE_KEYS: the prefixes of a VAE inside a checkpoint
VAE_PREFIXES = ("first_stage_model.", "vae.")
# A1111 modules/sd_vae.py load_vae: `k[0:4] != "loss" and k not in vae_ignore_keys`
_IGNORED_PREFIX = "loss"
_IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_LEGACY_ATTENTION = re.compile(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CLASS_NAME = "AutoencoderKL"


@dataclass
class VAESource:
    """A VAE read for `--vae`: its weights in our (diffusers 0.42) layout, its own config where it has
    one (None: a single file, completed from the source model's), and what the manifest records of it
    (kind, path, sha256, the file's layout, where its config came from)."""

    state: StateDict
    config: VAEConfig | None
    identity: dict[str, Any]


def read_vae(path: str | Path) -> VAESource:
    """Read the VAE at `path` (see the module doc); raise CheckpointError naming what is wrong."""
    from export.loading.read import _component_weights, _read_json, _read_weights

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--vae {path} does not exist (an AutoencoderKL folder or a single VAE file)")
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: a --vae folder is a diffusers AutoencoderKL folder (config.json and "
                                  "diffusion_pytorch_model.safetensors) or a pipeline folder with vae/")
        config_dict = _read_json(folder / "config.json")
        if config_dict.get("_class_name", _CLASS_NAME) != _CLASS_NAME:
            tiny = "Tiny" in str(config_dict["_class_name"])
            hint = " (a tiny autoencoder goes beside the VAE: --tiny-vae)" if tiny else ""
            raise CheckpointError(f"{folder}: --vae needs an {_CLASS_NAME}; its config.json says "
                                  f"{config_dict['_class_name']!r}{hint}")
        try:
            config = VAEConfig.from_dict(config_dict)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder}: {e}") from e
        weights = _component_weights(folder.parent, folder.name, ("diffusion_pytorch_model",))
        state, layout = _our_layout(_read_weights(weights), weights)
        digest = files_sha256([folder / "config.json", weights], root=folder)
        identity = {"kind": "diffusers", "path": str(folder.resolve()), "sha256": digest, "config": "own"}
    else:
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{path}: unsupported VAE file type {path.suffix!r}; expected an AutoencoderKL "
                                  f"folder or a single file ({', '.join(SINGLE_FILE_SUFFIXES)})")
        state, layout = _our_layout(_read_weights(path), path)
        config = None
        identity = {"kind": "single_file", "path": str(path.resolve()), "sha256": file_sha256(path),
                    "config": "source model"}
    return VAESource(state, config, {**identity, "layout": layout})


def _our_layout(state: StateDict, where: Path) -> tuple[StateDict, str]:
    """A VAE state dict in our layout, and the layout it was in ("ldm" | "diffusers")."""
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in state)), "")
    kept = {k.removeprefix(prefix): v for k, v in state.items()}
    kept = {k: v for k, v in kept.items() if not k.startswith(_IGNORED_PREFIX) and k not in _IGNORED_KEYS}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in kept):
        layout, out = "diffusers", {_LEGACY_ATTENTION.sub(lambda m: f"{m[1]}.{_LEGACY_NAMES[m[2]]}.", k): v
                                    for k, v in kept.items()}
    elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in kept):
        try:
            layout, out = "ldm", convert_ldm.vae_from_ldm(kept)
        except (RuntimeError, IndexError, ValueError) as e:
            raise CheckpointError(f"{where}: tensors of unexpected shapes for the LDM VAE layout: {e}") from e
    else:
        found = sorted({".".join(k.split(".")[:2]) for k in state})
        raise CheckpointError(f"{where}: no autoencoder found (neither LDM encoder.down.* / decoder.up.* nor "
                              f"diffusers encoder.down_blocks.* keys); prefixes: {', '.join(found[:12]) or 'none'}")
    return out, layout


def vae_config_for(vae: VAESource, base: Any, where: str) -> VAEConfig:
    """The replacement's config against the source model's VAE config `base` (see the module doc),
    refused unless its latents and images are the model's."""
    config = vae.config
    if config is None:
        if not isinstance(base, VAEConfig):
            raise CheckpointError(f"{where}: the source's VAE is an {type(base).__name__}, whose config cannot "
                                  "complete a single-file KL VAE's; give an AutoencoderKL folder (with config.json)")
        try:
            config = replace(base, **infer_vae_fields(vae.state))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: {e}") from e
    have = (base.latent_channels, base.vae_scale_factor, base.in_channels, base.out_channels)
    want = (config.latent_channels, config.vae_scale_factor, config.in_channels, config.out_channels)
    if have != want:
        raise CheckpointError(f"{where}: this VAE has {want[0]} latent channels at 1/{want[1]} size ({want[2]} -> "
                              f"{want[3]} image channels); the model's latents have {have[0]} channels at 1/{have[1]} "
                              f"size ({have[2]} -> {have[3]}): it cannot decode this model's latents")
    return config


def with_vae(model: Any, vae: VAESource) -> Any:
    """A copy of the `LoadedModel` `model` whose VAE is `vae` (float32, eval), strictly loaded, and
    whose spec's VAE config is the replacement's (`vae_config_for`)."""
    from export.loading.read import _load_strict
    from export.vae import AutoencoderKL

    where = f"--vae {vae.identity['path']}"
    config = vae_config_for(vae, model.spec.vae, where)
    module = AutoencoderKL(config)
    _load_strict(module, vae.state, f"VAE {vae.identity['path']}")
    module.float().eval().requires_grad_(False)
    return replace(model, vae=module, spec=replace(model.spec, vae=config))


def apply_recorded_vae(model: Any, source: dict[str, Any]) -> Any:
    """`model` with the VAE a manifest's `source` records (`source["vae"]`), for the PyTorch reference
    engine, which rebuilds the model from the source; the file must still be there, unchanged."""
    recorded = source.get("vae")
    if not recorded:
        return model
    vae = read_vae(recorded["path"])
    if vae.identity["sha256"] != recorded["sha256"]:
        raise CheckpointError(f"{recorded['path']}: the VAE changed since the engine folder was built (sha256 "
                              f"{recorded['sha256'][:12]}...)")
    return with_vae(model, vae)
