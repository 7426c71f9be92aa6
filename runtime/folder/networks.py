"""The one contract every network follows: input/output names, dtypes, symbolic shapes, and the
concrete shapes for a (batch, height, width) request.

Export (sample inputs, dynamic axes), engine building (TensorRT optimization profiles), buffer
allocation and engine input validation all read this module, so a network's signature is declared
exactly once. Torch-free: the runtime imports it.

Symbolic axis names:
  batch          images (the U-Net's batch is doubled under classifier-free guidance)
  height, width  image size in pixels
  latent_height, latent_width   height / vae_scale_factor, width / vae_scale_factor
  tokens         text sequence length seen by the U-Net: 77 per prompt chunk (long prompts are
                 encoded in 77-token chunks and concatenated)
  cache_height, cache_width   the step-cache feature's size when it lies below the first
                 downsampler (ModelDims.cache_level > 0): the latent size halved cache_level times,
                 rounded up; at level 0 the feature uses latent_height, latent_width

SDXL (two text encoders, `ModelDims.text_hidden_size_2` > 0): `text_encoder` (CLIP ViT-L) and
`text_encoder_2` (OpenCLIP ViT-bigG with its projection) each give their penultimate layer's hidden
states, `hidden_states` (diffusers StableDiffusionXLPipeline.encode_prompt: `hidden_states[-2]`), and
`text_encoder_2` also its pooled, projected `text_embeds`; the U-Net takes both hidden states
concatenated (`encoder_hidden_states`, text_hidden_size + text_hidden_size_2 channels), `text_embeds`
and `time_ids` (the TensorRT demo's XL names: demo/Diffusion/models.py UNetXLModel). The SDXL refiner
(`text_hidden_size` 0) has `text_encoder_2` alone: its hidden states are encoder_hidden_states, and its
`time_ids` are 5 (original size, crop top-left, aesthetic score); `required_networks` says which a folder has.

Optional networks (STEP_CACHE_NETWORKS) exist only in folders built with them: `unet_deep` (the
U-Net that also outputs the feature DeepCache caches) and `unet_shallow` (the retrieval step that
takes it); runtime/sampling/deepcache.py routes U-Net calls between them. `unet_tiled`,
`vae_decoder_tiled` and `vae_encoder_tiled` (TILING_NETWORKS, `build-engine --tiling`) are their
networks with circular padding in every padded convolution (seamless textures, A1111's `tiling`);
each has the contract of the network it varies (`base_network`). `vae_decoder_tiny` and
`vae_encoder_tiny` (TINY_VAE_NETWORKS, `build-engine --tiny-vae`) are a second, tiny autoencoder
(TAESD) beside the folder's VAE, under the contract of the VAE network they stand in for; each
manifest entry records its own `scaling_factor` (and TAESD's `latent_magnitude`, `latent_shift`),
which the decoder graph divides by and the runtime multiplies the encoder's latents by.
"""

from __future__ import annotations

from dataclasses import dataclass

NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# Optional: the step-cache split of the U-Net (DeepCache, arXiv:2312.00858), same weights as `unet`
STEP_CACHE_NETWORKS = ("unet_deep", "unet_shallow")
# Optional: the circular-padded variants (A1111 modules/sd_hijack.py `apply_circular`: every Conv2d's
# padding_mode "circular"), same weights as the network they vary (export/circular.py)
TILING_NETWORKS = ("unet_tiled", "vae_decoder_tiled", "vae_encoder_tiled")
# Optional: ControlNet (arXiv:2302.05543). Each ControlNet of a folder is a network "controlnet.NAME"
# (`controlnet_network`) with the contract of CONTROLNET; `unet_control` is the U-Net that takes their
# summed residuals, same weights as `unet` (export/onnx_export.py export_control_unet)
CONTROLNET = "controlnet"
CONTROL_UNET = "unet_control"
# Optional: a tiny autoencoder (TAESD; export/tiny_vae.py) beside the folder's VAE (build-engine --tiny-vae)
TINY_VAE_NETWORKS = ("vae_decoder_tiny", "vae_encoder_tiny")
# SDXL's second text encoder (in two-encoder folders only: ModelDims.text_hidden_size_2 > 0)
TEXT_ENCODER_2 = "text_encoder_2"
OPTIONAL_NETWORKS = STEP_CACHE_NETWORKS + TILING_NETWORKS + TINY_VAE_NETWORKS + (CONTROL_UNET, TEXT_ENCODER_2)
# A request's `vae`: "full", the folder's own VAE (vae_decoder / vae_encoder); "tiny", a TAESD (the
# folder's TINY_VAE_NETWORKS, or its own VAE where that is an AutoencoderTiny)
VAE_CHOICES = ("full", "tiny")
# Networks whose batch is the U-Net call's (doubled under guidance): TensorRT profiles read it
GUIDED_NETWORKS = ("unet",) + STEP_CACHE_NETWORKS + (CONTROL_UNET, CONTROLNET)
# A ControlNet's NAME: letters, digits, "_" and "-" (it names files: controlnet.NAME.onnx)
CONTROLNET_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
# The networks a U-Net call may run; each takes the guidance batch ([uncond, cond] stacked)
# (`unet_tiled` too: test `base_network(name) in UNET_NETWORKS`)
UNET_NETWORKS = ("unet",) + STEP_CACHE_NETWORKS
PRECISIONS = ("fp32", "fp16", "bf16")

# CLIP's context length (openai/CLIP `model.py`, `context_length = 77`).
TEXT_MAX_LENGTH = 77


@dataclass(frozen=True)
class ModelDims:
    """The sizes a runtime needs, all derived from the model's configs (recorded in the manifest)."""

    latent_channels: int  # VAE latent_channels (4 for SD 1.x/2.x)
    unet_in_channels: int  # 4, or 9 for the inpainting U-Net (latents + mask + masked-image latents)
    vae_scale_factor: int  # 2 ** (len(vae.block_out_channels) - 1): 8 for SD
    text_hidden_size: int  # CLIP hidden size: 768 (SD 1.x), 1024 (SD 2.x)
    text_max_length: int = TEXT_MAX_LENGTH
    # The step-cache feature of unet_deep / unet_shallow (export/unet.py `cache_split` for the
    # folder's branch): its channels (0: the folder has no step-cache graphs) and resolution level
    # (its size is the latent size halved `cache_level` times, rounded up). SD 1.x/2.x, branch 0:
    # 320 channels at level 0.
    cache_channels: int = 0
    cache_level: int = 0
    # An LCM-distilled U-Net's guidance-embedding width (diffusers `time_cond_proj_dim`): its graphs
    # take `timestep_cond` [batch, time_cond_proj_dim]; 0 for every other U-Net (no such input)
    time_cond_proj_dim: int = 0
    # The U-Net's block_out_channels and layers_per_block, recorded in folders with ControlNets: they
    # give the residuals' channels and sizes (`control_residual_specs`); () and 0 elsewhere
    block_out_channels: tuple[int, ...] = ()
    layers_per_block: int = 0
    # SDXL: the second text encoder's width (its penultimate hidden states follow the first's in
    # encoder_hidden_states), its pooled projection's width (the U-Net's `text_embeds`) and the count
    # of size/crop conditioning values (`time_ids`: 6 for the base model); 0 for one-encoder models
    text_hidden_size_2: int = 0
    text_embeds_size: int = 0
    time_ids: int = 0

    @property
    def context_size(self) -> int:
        """The channels of the U-Net's encoder_hidden_states: the text encoders' widths together."""
        return self.text_hidden_size + self.text_hidden_size_2

    @property
    def hidden_output(self) -> str:
        """The text encoders' hidden-state output: SDXL's encoders give the penultimate layer's
        (`hidden_states`), the others the last layer's (`last_hidden_state`)."""
        return "hidden_states" if self.text_hidden_size_2 else "last_hidden_state"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int32"
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic axes (see module doc)


def float_dtype(precision: str) -> str:
    """Dtype of a graph's float inputs and outputs. bf16 is an engine-level inference precision
    (OpenVINO, TensorRT) over an fp32 graph, so its I/O stays float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return "float16" if precision == "fp16" else "float32"


def base_network(network: str) -> str:
    """The network whose contract a variant shares (and, for the tiled ones, its weights): `unet` for
    `unet_tiled`, `vae_decoder` for `vae_decoder_tiny`; a network that is no variant is its own base. A
    ControlNet "controlnet.NAME" has the contract of CONTROLNET."""
    if controlnet_name(network) is not None:
        return CONTROLNET
    if network in TINY_VAE_NETWORKS:
        return network.removesuffix("_tiny")
    return network.removesuffix("_tiled") if network in TILING_NETWORKS else network


def controlnet_network(name: str) -> str:
    """The network key of the ControlNet called `name` ("controlnet.NAME"); ValueError for a bad name."""
    if not isinstance(name, str) or not name or not set(name) <= CONTROLNET_NAME_CHARS:
        raise ValueError(f"a ControlNet name is letters, digits, '_' and '-'; got {name!r}")
    return f"{CONTROLNET}.{name}"


def controlnet_name(network: str) -> str | None:
    """NAME of a "controlnet.NAME" network key, or None for any other network."""
    prefix, dot, name = network.partition(".")
    if prefix == CONTROLNET and dot and name and set(name) <= CONTROLNET_NAME_CHARS:
        return name
    return None


def known_network(network: str) -> bool:
    """A network key a manifest may hold."""
    return network in NETWORKS + OPTIONAL_NETWORKS or controlnet_name(network) is not None


def tiled_network(network: str, tiling: bool) -> str:
    """The graph to run for `network` with circular padding on (`tiling`) or off."""
    return f"{network}_tiled" if tiling else network


def required_networks(dims: ModelDims) -> tuple[str, ...]:
    """The networks every folder of these dims has: NETWORKS, without text_encoder where the model has
    no first text encoder (the SDXL refiner), with text_encoder_2 where it has a second."""
    first = NETWORKS if dims.text_hidden_size else tuple(n for n in NETWORKS if n != "text_encoder")
    return first + ((TEXT_ENCODER_2,) if dims.text_hidden_size_2 else ())


def _text_encoder_io(network: str, dims: ModelDims, f: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """text_encoder: token ids -> hidden states; text_encoder_2 (SDXL): also the pooled `text_embeds`."""
    ids = (TensorSpec("input_ids", "int32", ("batch", dims.text_max_length)),)
    if network == "text_encoder":
        if not dims.text_hidden_size:
            raise ValueError("these dims have no first text encoder (text_hidden_size 0: the SDXL refiner)")
        return ids, (TensorSpec(dims.hidden_output, f, ("batch", dims.text_max_length, dims.text_hidden_size)),)
    if not dims.text_hidden_size_2:
        raise ValueError("text_encoder_2 exists only in two-encoder (SDXL) folders: these dims have one encoder")
    return ids, (TensorSpec("hidden_states", f, ("batch", dims.text_max_length, dims.text_hidden_size_2)),
                 TensorSpec("text_embeds", f, ("batch", dims.text_embeds_size)))


def network_io(network: str, dims: ModelDims, precision: str = "fp32") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of `network`, in order."""
    network = base_network(network)
    f = float_dtype(precision)
    c, lat = dims.latent_channels, ("batch", dims.latent_channels, "latent_height", "latent_width")
    if network in ("text_encoder", TEXT_ENCODER_2):
        return _text_encoder_io(network, dims, f)
    if network == CONTROLNET:
        residuals = control_residual_specs(dims, precision)
        return (
            TensorSpec("sample", f, lat),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", f, ("batch", "tokens", dims.text_hidden_size)),
            # the control image in [0, 1], RGB, at the image size (diffusers' prepared `image`)
            TensorSpec("controlnet_cond", f, ("batch", 3, "height", "width")),
            # one scale per residual and row: conditioning_scale (x logspace(-1, 0, n) in guess mode)
            TensorSpec("conditioning_scale", "float32", ("batch", len(residuals))),
        ), residuals
    if network in UNET_NETWORKS + (CONTROL_UNET,):
        unet_inputs = (
            TensorSpec("sample", f, ("batch", dims.unet_in_channels, "latent_height", "latent_width")),
            # float32 in every graph, fp16 ones included: the Euler-family samplers feed fractional
            # timesteps (946.42...), which float16 would round to 946.5
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", f, ("batch", "tokens", dims.context_size)),
        )
        if dims.time_cond_proj_dim:  # LCM: the guidance-scale embedding (runtime/families.py SD_LCM)
            unet_inputs += (TensorSpec("timestep_cond", f, ("batch", dims.time_cond_proj_dim)),)
        if dims.time_ids:  # SDXL (runtime/families.py SDXL); time_ids float32 as timestep: sizes up to 16384 exact
            unet_inputs += (TensorSpec("text_embeds", f, ("batch", dims.text_embeds_size)),
                            TensorSpec("time_ids", "float32", ("batch", dims.time_ids)))
        noise = TensorSpec("noise_pred", f, lat)
        if network == "unet":
            return unet_inputs, (noise,)
        if network == CONTROL_UNET:  # the summed ControlNet residuals, added to the skips and the mid block
            return unet_inputs + control_residual_specs(dims, precision), (noise,)
        feature = cache_feature_spec(dims, precision)
        if network == "unet_deep":  # the full U-Net; noise_pred equals unet's
            return unet_inputs, (noise, feature)
        return unet_inputs + (feature,), (noise,)  # unet_shallow: the feature of the last unet_deep call
    if network == "vae_decoder":
        # input: latents as the denoising loop holds them (scaled by scaling_factor);
        # output: image in [-1, 1] (not clamped), NCHW
        return (
            (TensorSpec("latent", f, lat),),
            (TensorSpec("image", f, ("batch", 3, "height", "width")),),
        )
    if network == "vae_encoder":
        # input: image in [-1, 1], NCHW; outputs: the diagonal Gaussian's mean and std, unscaled.
        # The runtime samples mean + std * noise with its own seeded RNG, then multiplies by
        # scaling_factor.
        return (
            (TensorSpec("image", f, ("batch", 3, "height", "width")),),
            (TensorSpec("latent_mean", f, ("batch", c, "latent_height", "latent_width")),
             TensorSpec("latent_std", f, ("batch", c, "latent_height", "latent_width"))),
        )
    raise ValueError(f"unknown network {network!r}; expected one of {', '.join(NETWORKS + OPTIONAL_NETWORKS)}")


def cache_feature_spec(dims: ModelDims, precision: str = "fp32") -> TensorSpec:
    """The step-cache feature: unet_deep's second output, unet_shallow's fourth input."""
    if dims.cache_channels <= 0:
        raise ValueError("these model dims declare no step-cache feature (cache_channels is 0): the engine folder "
                         "has no unet_deep / unet_shallow graphs; rebuild it with build-engine --step-cache")
    axes = ("latent_height", "latent_width") if dims.cache_level == 0 else ("cache_height", "cache_width")
    return TensorSpec("cache_feature", float_dtype(precision), ("batch", dims.cache_channels) + axes)


def control_residual_specs(dims: ModelDims, precision: str = "fp32") -> tuple[TensorSpec, ...]:
    """A ControlNet's outputs, `unet_control`'s extra inputs: down_residual_0.. in the order the U-Net's
    down path makes its skips (conv_in's, then per level layers_per_block resnets and a downsampler
    but at the last level: 12 for SD), then mid_residual. A tensor at level l (halved l times,
    rounded up) has axes res_height_l, res_width_l (latent_height, latent_width at level 0)."""
    ch = dims.block_out_channels
    if not ch or dims.layers_per_block < 1:
        raise ValueError("these model dims declare no ControlNet residuals (block_out_channels is empty): the engine "
                         "folder has no ControlNet; rebuild it with build-engine --controlnet")
    f = float_dtype(precision)

    def axes(level: int) -> tuple[str, str]:
        return ("latent_height", "latent_width") if level == 0 else (f"res_height_{level}", f"res_width_{level}")

    shapes = [(ch[0], 0)]
    for i, c in enumerate(ch):
        shapes += [(c, i)] * dims.layers_per_block + ([(c, i + 1)] if i < len(ch) - 1 else [])
    down = tuple(TensorSpec(f"down_residual_{k}", f, ("batch", c) + axes(level)) for k, (c, level) in enumerate(shapes))
    return down + (TensorSpec("mid_residual", f, ("batch", ch[-1]) + axes(len(ch) - 1)),)


def float_precision(specs: tuple[TensorSpec, ...]) -> str:
    """"fp16" when any float tensor of `specs` is float16, else "fp32" (the graph precision the
    declared I/O implies)."""
    return "fp16" if any(t.dtype == "float16" for t in specs) else "fp32"


def axis_values(dims: ModelDims, batch: int, height: int, width: int, tokens: int | None = None) -> dict[str, int]:
    """Values of the symbolic axes for a request of `batch` images of height x width pixels."""
    s = dims.vae_scale_factor
    if height % s or width % s:
        raise ValueError(f"height and width must be multiples of the VAE scale factor {s}; got {height}x{width}")
    down = 2 ** dims.cache_level  # stride-2 downsamplers with padding 1 round up: ceil(ceil(n / 2) / 2) = ceil(n / 4)
    levels = {f"res_{a}_{level}": -(-(n // s) // 2 ** level) for level in range(1, len(dims.block_out_channels))
              for a, n in (("height", height), ("width", width))}
    return {**levels,
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // s,
        "latent_width": width // s,
        "tokens": dims.text_max_length if tokens is None else tokens,
        "cache_height": -(-(height // s) // down),
        "cache_width": -(-(width // s) // down),
    }


def concrete_shape(spec: TensorSpec, axes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else axes[d] for d in spec.shape)
