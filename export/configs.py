"""Model configurations: frozen dataclasses for the U-Net and the VAE, the `ModelSpec` bundling a
whole Stable Diffusion model, and named presets.

`UNetConfig.from_dict` / `VAEConfig.from_dict` read a diffusers `config.json` dict and refuse, with a
`ValueError` naming the key, any value that selects an architecture feature the reference models in
`export/unet.py` / `export/vae.py` do not implement. `to_dict()` writes a dict diffusers 0.42 consumes.

Sources for the full-size presets (pinned Hugging Face repositories):
  sd15          runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/ config.json)
  sd15-inpaint  runwayml/stable-diffusion-inpainting (same, U-Net in_channels 9)
  sd21          stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
  sdxl          stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/,
                scheduler/ config.json; 1024 px)
  sdxl-refiner  stabilityai/stable-diffusion-xl-refiner-1.0 (unet/, vae/, text_encoder_2/, scheduler/ config.json,
                model_index.json; no text_encoder / tokenizer; 1024 px)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from runtime.folder.manifest import FAMILIES
from runtime.folder.networks import ModelDims

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel.__init__ arguments we do not implement, with the only value(s)
# accepted (the diffusers 0.42 defaults, or an equivalent spelling). `dropout` is inference-irrelevant.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
_UNET_IGNORED = ("dropout", "addition_embed_type_num_heads")

_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "shift_factor": (None, 0, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}
_VAE_IGNORED = ("force_upcast",)  # a pipeline precision hint, not architecture


def _uniform(key: str, value: Any, n: int) -> Any:
    """A per-block list whose entries are all equal collapses to one value; anything else is refused."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(value)) != 1:
            raise ValueError(f"unsupported {key}={value!r}: expected one value shared by all {n} blocks")
        return value[0]
    return value


def _check_fixed(kind: str, d: dict[str, Any], fixed: dict[str, tuple[Any, ...]], known: set[str]) -> None:
    for key, value in d.items():
        if key.startswith("_") or key in known:
            continue
        if key in fixed:
            v = value
            if isinstance(v, list) and v and all(x == v[0] for x in v):
                v = v[0]  # e.g. only_cross_attention: [false, false, false, false]
            if v not in fixed[key]:
                raise ValueError(f"unsupported {kind} config {key}={value!r}; supported: "
                                 f"{', '.join(repr(x) for x in fixed[key])}")
        elif value not in (None, False):
            raise ValueError(f"unknown {kind} config key {key!r} (value {value!r}); it may select an "
                             "architecture this runtime does not implement")


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of a Stable Diffusion 1.x/2.x U-Net, in diffusers' vocabulary.

    Note diffusers' historical naming: `attention_head_dim` is the NUMBER of attention heads per
    block (diffusers issue #2011); each head has `channels // attention_head_dim` dimensions.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    sample_size: int = 64
    # LCM-distilled U-Nets (Luo et al. arXiv:2310.04378 §4.2): the width of the guidance-scale
    # embedding projected into the timestep embedding (diffusers `time_embedding.cond_proj`); None: none
    time_cond_proj_dim: int | None = None
    # SDXL (Podell et al. arXiv:2307.01952 §2.2; diffusers addition_embed_type="text_time"): the pooled
    # text embedding and the sinusoidal embeddings of the size/crop conditioning `time_ids`
    # (addition_time_embed_dim channels each) are concatenated (projection_class_embeddings_input_dim
    # channels) and added to the timestep embedding through `add_embedding`. None: no such embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need {n} entries (one per block_out_channels)")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for t in getattr(self, name):
                if t not in allowed:
                    raise ValueError(f"unsupported {name} entry {t!r}; supported: {', '.join(allowed)}")
        for key in ("attention_head_dim", "transformer_layers_per_block"):
            value = getattr(self, key)
            if not isinstance(value, int) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                raise ValueError(f"{key} needs 1 or {n} integers; got {value!r}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unsupported addition_embed_type {self.addition_embed_type!r}; supported: None, 'text_time'")
        if (self.addition_embed_type is None) != (self.addition_time_embed_dim is None) or \
                (self.addition_embed_type is None) != (self.projection_class_embeddings_input_dim is None):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim, and only it takes them")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"block channels {c} must divide by the head count {h} and norm_num_groups "
                                 f"{self.norm_num_groups}")

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per down block (up blocks use them reversed, the mid block the last)."""
        h = self.attention_head_dim
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer blocks per spatial transformer, per down block (up blocks use them reversed,
        the mid block the last: diffusers UNet2DConditionModel with reverse_transformer_layers_per_block None)."""
        d = self.transformer_layers_per_block
        return (d,) * len(self.block_out_channels) if isinstance(d, int) else tuple(d)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        names = {f.name for f in fields(cls)}
        _check_fixed("U-Net", d, _UNET_FIXED, names | set(_UNET_IGNORED))
        n = len(d.get("block_out_channels", cls.block_out_channels))
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        for key in ("layers_per_block", "cross_attention_dim"):
            if key in kw:
                kw[key] = _uniform(key, kw[key], n)
        depth = kw.get("transformer_layers_per_block")
        if isinstance(depth, (list, tuple)) and len(set(depth)) == 1 and len(depth) == n:
            kw["transformer_layers_per_block"] = depth[0]  # one shared depth: SD 1.x/2.x's configs stay as they were
        for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                    "transformer_layers_per_block"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        if kw.get("sample_size") is None:
            kw.pop("sample_size", None)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for k, v in asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        for key in ("time_cond_proj_dim", "addition_embed_type", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim"):
            if d[key] is None:  # written only where set: configs of other U-Nets stay as they were
                del d[key]
        d.update(act_fn="silu", center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn")
        return d


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the Stable Diffusion KL autoencoder (diffusers AutoencoderKL)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    # Latent scale: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
    # `scale_factor: 0.18215` (also diffusers AutoencoderKL's default).
    scaling_factor: float = 0.18215
    sample_size: int = 512
    force_upcast: bool = True

    def __post_init__(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE block channels {bad} must divide by norm_num_groups {self.norm_num_groups}")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        names = {f.name for f in fields(cls)}
        _check_fixed("VAE", d, _VAE_FIXED, names | {"down_block_types", "up_block_types"} | set(_VAE_IGNORED))
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        n = len(kw.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = list(d.get(key, [want] * n))
            if got != [want] * n:
                raise ValueError(f"unsupported VAE {key}={got!r}; supported: {n} x {want!r}")
        if isinstance(kw.get("block_out_channels"), list):
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        if kw.get("sample_size") is None:
            kw.pop("sample_size", None)
        if isinstance(kw.get("sample_size"), (list, tuple)):
            kw["sample_size"] = kw["sample_size"][0]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        d: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for k, v in asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        d.update(act_fn="silu", down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
        return d


def scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """diffusers scheduler_config.json of Stable Diffusion 1.x/2.x.

    Betas: CompVis/stable-diffusion v1-inference.yaml `linear_start: 0.00085`, `linear_end: 0.0120`,
    `timesteps: 1000`; the remaining keys as runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon or v_prediction")
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
        "trained_betas": None,
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
    }


def infer_family(unet: UNetConfig, first_encoder: bool = True) -> str:
    """SDXL U-Nets add the pooled text and size conditioning (`addition_embed_type="text_time"`);
    SD 2.x U-Nets use linear projections in their transformers (SD 1.x: 1x1 convolutions);
    inpainting U-Nets take 9 input channels; LCM-distilled U-Nets embed the guidance scale
    (`time_cond_proj_dim`). `first_encoder` False: the model has only SDXL's second text encoder,
    which is the SDXL refiner ("sdxl-refiner": diffusers' StableDiffusionXLImg2ImgPipeline with
    text_encoder None and requires_aesthetics_score)."""
    base = "sd2" if unet.use_linear_projection else "sd1"
    if unet.addition_embed_type == "text_time":
        if unet.time_cond_proj_dim:
            raise ValueError("an SDXL U-Net with a guidance embedding (time_cond_proj_dim) is not supported")
        base = "sdxl"
        if not first_encoder:
            if unet.in_channels != 4:
                raise ValueError("an SDXL refiner U-Net (one text encoder) takes 4 input channels")
            return "sdxl-refiner"
    if not first_encoder:
        raise ValueError("a model without its first text encoder must be an SDXL refiner (addition_embed_type "
                         "'text_time')")
    if unet.time_cond_proj_dim:
        if unet.in_channels == 9:
            raise ValueError("an inpainting U-Net with a guidance embedding (time_cond_proj_dim) is not supported")
        return f"{base}-lcm"
    return f"{base}-inpaint" if unet.in_channels == 9 else base


def family_base(family: str) -> str:
    """"sd1", "sd2" or "sdxl" of a family name ("sd1-inpaint" -> "sd1")."""
    return family.split("-")[0]


@dataclass(frozen=True)
class ModelSpec:
    family: str  # one of FAMILIES
    unet: UNetConfig
    vae: VAEConfig
    # transformers CLIPTextConfig keyword arguments; None for the SDXL refiner, whose only text encoder is
    # text_encoder_2 (stabilityai/stable-diffusion-xl-refiner-1.0 model_index.json: text_encoder null)
    text_encoder: dict[str, Any] | None
    scheduler: dict[str, Any] = field(default_factory=scheduler_config)  # diffusers scheduler config
    pad_token: str = "<|endoftext|>"  # tokenizer padding: "<|endoftext|>" (SD 1.x), "!" (SD 2.x)
    # SDXL: the second text encoder (transformers CLIPTextModelWithProjection keyword arguments), its
    # tokenizer's padding ("!": stabilityai/stable-diffusion-xl-base-1.0 tokenizer_2/special_tokens_map.json)
    # and the pipeline's force_zeros_for_empty_prompt (model_index.json; diffusers' default True)
    text_encoder_2: dict[str, Any] | None = None
    pad_token_2: str = "!"
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if (family_base(self.family) == "sdxl") != (self.text_encoder_2 is not None):
            raise ValueError(f"family {self.family!r}: SDXL models, and only they, have a second text encoder")
        if (self.family == "sdxl-refiner") != (self.text_encoder is None):
            raise ValueError(f"family {self.family!r}: the SDXL refiner, and only it, lacks the first text encoder")
        if self.text_encoder_2 is not None:
            first = self.text_encoder["hidden_size"] if self.text_encoder is not None else 0
            width = first + self.text_encoder_2["hidden_size"]
            pooled = self.unet.projection_class_embeddings_input_dim - self.text_encoder_2["projection_dim"]
            if width != self.unet.cross_attention_dim or pooled <= 0 or pooled % self.unet.addition_time_embed_dim:
                raise ValueError(f"the text encoders (widths {first} + "
                                 f"{self.text_encoder_2['hidden_size']}, projection {self.text_encoder_2['projection_dim']}) "
                                 f"do not fit the U-Net (cross_attention_dim {self.unet.cross_attention_dim}, "
                                 f"projection_class_embeddings_input_dim {self.unet.projection_class_embeddings_input_dim})")

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def dims(self) -> ModelDims:
        two = self.text_encoder_2 or {}
        return ModelDims(
            latent_channels=self.vae.latent_channels,
            unet_in_channels=self.unet.in_channels,
            vae_scale_factor=self.vae.vae_scale_factor,
            text_hidden_size=self.text_encoder["hidden_size"] if self.text_encoder is not None else 0,
            time_cond_proj_dim=self.unet.time_cond_proj_dim or 0,
            text_hidden_size_2=two.get("hidden_size", 0),
            text_embeds_size=two.get("projection_dim", 0),
            # the rest of add_embedding's input: one addition_time_embed_dim embedding per time id
            time_ids=((self.unet.projection_class_embeddings_input_dim - two["projection_dim"])
                      // self.unet.addition_time_embed_dim) if two else 0,
        )


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int,
               pad_id: int) -> dict[str, Any]:
    # Token ids from the CLIP BPE vocabulary (export/assets/clip-bpe/vocab.json):
    # 49406 <|startoftext|>, 49407 <|endoftext|>, 0 "!".
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": pad_id,
    }


# openai/clip-vit-large-patch14 text tower (SD 1.x): quick_gelu, 12 layers of width 768.
_CLIP_L = _clip_text(768, 12, 12, 3072, "quick_gelu", 768, 49407)
# OpenCLIP ViT-H/14 text tower minus its last layer (SD 2.x, stabilityai/stable-diffusion-2-1 text_encoder).
_OPENCLIP_H = _clip_text(1024, 23, 16, 4096, "gelu", 512, 0)

_SD15_UNET = UNetConfig()
_SD21_UNET = UNetConfig(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                        use_linear_projection=True, upcast_attention=True, sample_size=96)
_TINY_UNET = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                        cross_attention_dim=32, layers_per_block=1, sample_size=32)
_TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=64)
_TINY_TEXT_SD1 = _clip_text(32, 3, 4, 64, "quick_gelu", 32, 49407)
_TINY_TEXT_SD2 = _clip_text(32, 3, 4, 64, "gelu", 32, 0)
# diffusers tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py get_dummy_components (diffusers
# 0.42): two blocks, DownBlock2D first, depths (1, 2), heads (2, 4), 8-wide time-id embeddings, two 32-wide
# text encoders (cross_attention_dim 64; add_embedding input 6 * 8 + 32 = 80); its CLIP configs, but the CLIP
# vocabulary and token ids (its 1000-token test tokenizer is a download)
_TINY_SDXL_UNET = UNetConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                             cross_attention_dim=64, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                             norm_num_groups=1, sample_size=32, addition_embed_type="text_time",
                             addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
_TINY_TEXT_SDXL = _clip_text(32, 5, 4, 37, "gelu", 32, 49407)
_TINY_TEXT_SDXL_2 = _clip_text(32, 5, 4, 37, "gelu", 32, 0)
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json; text_encoder_2/config.json (OpenCLIP ViT-bigG/14
# text tower, 32 layers of width 1280, projection 1280)
_SDXL_UNET = UNetConfig(block_out_channels=(320, 640, 1280),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                        use_linear_projection=True, sample_size=128, addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_OPENCLIP_BIGG = _clip_text(1280, 32, 20, 5120, "gelu", 1280, 0)
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json (sgm configs/inference/sd_xl_refiner.yaml:
# model_channels 384, channel_mult (1, 2, 4, 4), attention at the middle two levels, 64-wide heads, depth 4,
# context 1280 = text_encoder_2 alone, adm_in_channels 2560 = 1280 pooled + 5 time ids x 256)
_SDXL_REFINER_UNET = UNetConfig(block_out_channels=(384, 768, 1536, 1536),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                  "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
                                transformer_layers_per_block=4, use_linear_projection=True, sample_size=128,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2560)
# diffusers tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py, the refiner-only tests'
# get_dummy_components (diffusers 0.42): the tiny SDXL U-Net with cross_attention_dim 32 (text_encoder_2 alone)
# and add_embedding input 5 * 8 + 32 = 72
_TINY_SDXL_REFINER_UNET = replace(_TINY_SDXL_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=72)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler)
_SDXL_SCHEDULER = {**scheduler_config(), "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                   "use_karras_sigmas": False}


def _presets() -> dict[str, ModelSpec]:
    return {
        "sd15": ModelSpec("sd1", _SD15_UNET, VAEConfig(), dict(_CLIP_L)),
        "sd15-inpaint": ModelSpec("sd1-inpaint", replace(_SD15_UNET, in_channels=9), VAEConfig(), dict(_CLIP_L)),
        "sd21": ModelSpec("sd2", _SD21_UNET, VAEConfig(sample_size=768), dict(_OPENCLIP_H),
                          scheduler_config("v_prediction"), pad_token="!"),
        "tiny-sd1": ModelSpec("sd1", _TINY_UNET, _TINY_VAE, dict(_TINY_TEXT_SD1)),
        "tiny-sd2": ModelSpec("sd2", replace(_TINY_UNET, attention_head_dim=(2, 4), use_linear_projection=True,
                                             upcast_attention=True),
                              _TINY_VAE, dict(_TINY_TEXT_SD2), scheduler_config("v_prediction"), pad_token="!"),
        "tiny-inpaint": ModelSpec("sd1-inpaint", replace(_TINY_UNET, in_channels=9), _TINY_VAE, dict(_TINY_TEXT_SD1)),
        "sdxl": ModelSpec("sdxl", _SDXL_UNET, VAEConfig(scaling_factor=0.13025, sample_size=1024), dict(_CLIP_L),
                          dict(_SDXL_SCHEDULER), text_encoder_2=dict(_OPENCLIP_BIGG)),
        "tiny-sdxl": ModelSpec("sdxl", _TINY_SDXL_UNET, replace(_TINY_VAE, scaling_factor=0.13025),
                               dict(_TINY_TEXT_SDXL), dict(_SDXL_SCHEDULER), text_encoder_2=dict(_TINY_TEXT_SDXL_2)),
        # the refiner's model_index.json: force_zeros_for_empty_prompt false; its scheduler is the base's
        "sdxl-refiner": ModelSpec("sdxl-refiner", _SDXL_REFINER_UNET,
                                  VAEConfig(scaling_factor=0.13025, sample_size=1024), None, dict(_SDXL_SCHEDULER),
                                  text_encoder_2=dict(_OPENCLIP_BIGG), force_zeros_for_empty_prompt=False),
        # diffusers' dummy refiner pipeline keeps StableDiffusionXLImg2ImgPipeline's default (True)
        "tiny-sdxl-refiner": ModelSpec("sdxl-refiner", _TINY_SDXL_REFINER_UNET,
                                       replace(_TINY_VAE, scaling_factor=0.13025), None, dict(_SDXL_SCHEDULER),
                                       text_encoder_2=dict(_TINY_TEXT_SDXL_2)),
    }


PRESETS: tuple[str, ...] = tuple(_presets())


def preset(name: str) -> ModelSpec:
    specs = _presets()
    if name not in specs:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(specs)}")
    return specs[name]
