"""Reference models (export/configs.py, unet.py, vae.py, text_encoder.py) against published
parameter counts and against diffusers / transformers on identical weights."""

from __future__ import annotations

import json

import pytest
import torch

from export.configs import PRESETS, UNetConfig, VAEConfig, infer_family, preset, scheduler_config
from export.text_encoder import CLIP_BPE_DIR, build_text_encoder, write_tokenizer_files
from export.unet import UNet2DConditionModel
from export.vae import AutoencoderKL
from runtime.compare import rel_err

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)  # the CI machine's cores are shared

# Outputs of our modules and diffusers' on the same weights, max|a - b| / max|b|.
PARITY_RTOL = 1e-5
TINY = ("tiny-sd1", "tiny-sd2", "tiny-inpaint")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_state(reference: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The reference's default init, perturbed so zero/one-initialized tensors (norms, biases)
    are exercised too."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in reference.state_dict().items()}


# ---- parameter counts of the full-size presets (meta device: no memory) ----

# Published counts: SD 1.5 U-Net 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480
# (runwayml/stable-diffusion-v1-5 model card / diffusers `num_parameters()`); SD 2.1 U-Net
# 865,910,724. The inpainting U-Net adds 5 input channels to conv_in: 5 * 320 * 3 * 3 = 14,400.
# SD 2.1's OpenCLIP ViT-H text tower (23 layers) is a regression value measured here.
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724,
    ("sd21", "vae"): 83_653_863,
    ("sd21", "text_encoder"): 340_387_840,
    ("sd15-inpaint", "unet"): 859_520_964 + 14_400,
}


def build(name: str, part: str) -> torch.nn.Module:
    spec = preset(name)
    if part == "unet":
        return UNet2DConditionModel(spec.unet)
    if part == "vae":
        return AutoencoderKL(spec.vae)
    return build_text_encoder(spec.text_encoder)


@pytest.mark.parametrize(("name", "part"), list(PUBLISHED))
def test_full_size_parameter_counts(name, part):
    with torch.device("meta"):
        model = build(name, part)
    assert n_params(model) == PUBLISHED[name, part]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_stay_small(name):
    total = sum(n_params(build(name, part)) for part in ("unet", "vae", "text_encoder"))
    assert total < 3_500_000  # under 14 MB in float32 (1.6M of it the 49408-token embedding)


# ---- configs ----

@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trip(name):
    spec = preset(name)
    assert UNetConfig.from_dict(json.loads(json.dumps(spec.unet.to_dict()))) == spec.unet
    assert VAEConfig.from_dict(json.loads(json.dumps(spec.vae.to_dict()))) == spec.vae
    assert infer_family(spec.unet, first_encoder=spec.text_encoder is not None) == spec.family
    assert spec.dims.unet_in_channels == spec.unet.in_channels
    if spec.text_encoder is not None:  # the SDXL refiner has only text_encoder_2
        assert spec.text_encoder["pad_token_id"] == (0 if spec.pad_token == "!" else 49407)


@pytest.mark.parametrize("name", ("tiny-sd2", "sd21"))
def test_reads_diffusers_full_config(name):
    """A config diffusers wrote (every 0.42 key, defaults included) parses back to ours."""
    spec = preset(name)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(spec.unet.to_dict())
        vae = diffusers.AutoencoderKL.from_config(spec.vae.to_dict())
    assert UNetConfig.from_dict(dict(unet.config)) == spec.unet
    assert VAEConfig.from_dict(dict(vae.config)) == spec.vae


def test_reads_published_sd21_unet_config():
    # stabilityai/stable-diffusion-2-1 unet/config.json (diffusers 0.8 era, lists per block)
    published = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0", "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "sample_size": 96,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": True, "use_linear_projection": True,
    }
    assert UNetConfig.from_dict(published) == preset("sd21").unet


@pytest.mark.parametrize(("patch", "match"), [
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"layers_per_block": [1, 2]}, "layers_per_block"),
    ({"attention_head_dim": [2, 2, 2]}, "attention_head_dim"),
    ({"some_future_feature": "on"}, "some_future_feature"),
])
def test_unet_config_refuses_unsupported(patch, match):
    d = {**preset("tiny-sd1").unet.to_dict(), **patch}
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_dict(d)


def test_vae_config_refuses_unsupported():
    d = preset("tiny-sd1").vae.to_dict()
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({**d, "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_dict({**d, "shift_factor": 0.1159})


def test_preset_errors_and_constants():
    with pytest.raises(ValueError, match="sd15, sd15-inpaint, sd21"):
        preset("sdxl-base")
    sd15, sd21 = preset("sd15"), preset("sd21")
    assert sd15.vae_scale_factor == 8 and preset("tiny-sd1").vae_scale_factor == 2
    assert sd15.vae.scaling_factor == 0.18215
    assert sd15.prediction_type == "epsilon" and sd21.prediction_type == "v_prediction"
    assert (sd15.pad_token, sd21.pad_token) == ("<|endoftext|>", "!")
    assert sd15.scheduler == scheduler_config("epsilon")
    assert {preset(n).family for n in PRESETS} == {"sd1", "sd2", "sd1-inpaint", "sdxl", "sdxl-refiner"}
    refiner = preset("sdxl-refiner")  # stabilityai/stable-diffusion-xl-refiner-1.0: text_encoder_2 only
    assert refiner.text_encoder is None and refiner.text_encoder_2["hidden_size"] == 1280
    assert (refiner.unet.cross_attention_dim, refiner.unet.depths, refiner.dims.time_ids) == (1280, (4,) * 4, 5)
    sd15.text_encoder["hidden_size"] = 1  # presets hand out fresh dicts
    assert preset("sd15").text_encoder["hidden_size"] == 768


# ---- numerical parity with diffusers on identical weights ----

@pytest.mark.parametrize("name", TINY)
def test_unet_matches_diffusers(name):
    cfg = preset(name).unet
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).eval()
    ours = UNet2DConditionModel(cfg).eval()
    state = random_state(reference, seed=1)
    reference.load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(2)
    # (16, 16): regular; (15, 13): odd latent sizes take diffusers' `upsample_size` path
    for h, w, t in ((16, 16, torch.tensor([10.0, 981.0])), (15, 13, torch.tensor(500.0))):
        x = torch.randn(2, cfg.in_channels, h, w, generator=g)
        context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
        with torch.no_grad():
            got = ours(x, t, context)
            want = reference(x, t, context).sample
        assert got.shape == want.shape == (2, cfg.out_channels, h, w)
        assert rel_err(got, want) <= PARITY_RTOL


def test_unet_timestep_broadcast():
    ours = UNet2DConditionModel(preset("tiny-sd1").unet).eval()
    x, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    with torch.no_grad():
        scalar = ours(x, torch.tensor(250.0), context)
        batch = ours(x, torch.full((3,), 250.0), context)
        single = ours(x, torch.tensor([250.0]), context)
    torch.testing.assert_close(scalar, batch, rtol=0, atol=0)
    torch.testing.assert_close(single, batch, rtol=0, atol=0)


def test_vae_matches_diffusers():
    cfg = preset("tiny-sd1").vae
    reference = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    ours = AutoencoderKL(cfg).eval()
    state = random_state(reference, seed=3)
    reference.load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    z = torch.randn(2, cfg.latent_channels, 16, 12, generator=g)
    with torch.no_grad():
        mean, std = ours.encode(image)
        posterior = reference.encode(image).latent_dist
        decoded, want = ours.decode(z), reference.decode(z).sample
        roundtrip = ours(image)
    assert mean.shape == std.shape == (2, cfg.latent_channels, 16, 12)
    assert rel_err(mean, posterior.mean) <= PARITY_RTOL
    assert rel_err(std, posterior.std) <= PARITY_RTOL
    assert decoded.shape == (2, 3, 32, 24)
    assert rel_err(decoded, want) <= PARITY_RTOL
    torch.testing.assert_close(roundtrip, ours.decode(mean))


# ---- text encoder and tokenizer ----

@pytest.mark.parametrize(("name", "pad_id"), [("tiny-sd1", 49407), ("tiny-sd2", 0)])
def test_tokenizer_pads_and_encoder_runs(tmp_path, name, pad_id):
    spec = preset(name)
    write_tokenizer_files(tmp_path, spec.pad_token)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == pad_id
    ids = tokenizer("a photo of an astronaut riding a horse", padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True).input_ids
    # <|startoftext|> a photo of an astronaut riding a horse <|endoftext|>, then padding
    assert ids[:10] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids[10:] == [pad_id] * 67
    long_ids = tokenizer("word " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == 49407

    encoder = build_text_encoder(spec.text_encoder)
    with torch.no_grad():
        hidden = encoder(torch.tensor([ids])).last_hidden_state
    assert hidden.shape == (1, 77, spec.text_encoder["hidden_size"])
    assert torch.isfinite(hidden).all()


def test_tokenizer_rejects_unknown_pad(tmp_path):
    with pytest.raises(ValueError, match="pad token"):
        write_tokenizer_files(tmp_path, "<pad>")
    assert (CLIP_BPE_DIR / "vocab.json").is_file() and (CLIP_BPE_DIR / "merges.txt").is_file()
