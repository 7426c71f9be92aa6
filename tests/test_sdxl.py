"""SDXL (issue 26): the reference U-Net and both text encoders against diffusers, and whole images
against diffusers' SDXL pipelines.

The models are diffusers' own tiny random SDXL components, at the sizes of diffusers 0.42's
tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py `get_dummy_components` (two blocks,
DownBlock2D first, transformer depths (1, 2), heads (2, 4), `addition_embed_type="text_time"` with
8-wide time-id embeddings, two 32-wide CLIP text encoders, the second with its projection), written
out here; only the CLIP vocabulary differs (ours, packaged: its 1000-token test tokenizer is a
download). They are saved as diffusers folders by `save_pretrained` and built into engine folders by
`export.build.build_engine`, whose own export check compares every graph (text_encoder_2's
`text_embeds`, the U-Net's `text_embeds` / `time_ids`) with our PyTorch reference. Images are
compared with StableDiffusionXLPipeline / Img2ImgPipeline / InpaintPipeline at fp32 on ONNX Runtime
and OpenVINO (f32) by PSNR over [0, 1] images: >= PARITY_PSNR_DB (tests/psnr_bounds.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from psnr_bounds import MIN_PSNR_DB, PARITY_PSNR_DB, assert_psnr
from runtime.compare import psnr
from runtime.errors import PipelineError
from runtime.families import SDXL, SDXL_INPAINT, family_of
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import network_io
from runtime.request import make_request

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
STEPS = 4
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]

# diffusers get_dummy_components (test_stable_diffusion_xl.py), diffusers 0.42
UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
VAE = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=128,
           scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE config values (stable-diffusion-xl-base-1.0 vae/)
# its CLIPTextConfig, with the CLIP BPE vocabulary's size and special ids (49406 BOS, 49407 EOS)
TEXT = dict(bos_token_id=49406, eos_token_id=49407, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408, hidden_act="gelu",
            projection_dim=32)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
# our sampler -> diffusers scheduler class and overrides (as tests/test_pipeline_parity.py)
SAMPLERS = {"euler": ("EulerDiscreteScheduler", {}), "ddim": ("DDIMScheduler", {}),
            "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
            "unipc": ("UniPCMultistepScheduler", {}), "heun": ("HeunDiscreteScheduler", {})}


def _components(root: Path, in_channels: int = 4) -> dict:
    from export.text_encoder import write_tokenizer_files

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**UNET, "in_channels": in_channels})
    vae = diffusers.AutoencoderKL(**VAE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT))
    # SDXL's tokenizer pads with <|endoftext|>, its tokenizer_2 with "!" (stable-diffusion-xl-base-1.0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(root / "tok")))
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(root / "tok2", "!")))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER))


def _build(root: Path, cls: str, in_channels: int) -> tuple[Path, Path]:
    from export.build import build_engine

    pipe = getattr(diffusers, cls)(**_components(root, in_channels))
    pipe.save_pretrained(str(root / "diffusers"))
    return root / "diffusers", build_engine(str(root / "diffusers"), root / "engine", progress=lambda line: None)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, engine folder) of the tiny SDXL base model."""
    return _build(tmp_path_factory.mktemp("sdxl"), "StableDiffusionXLPipeline", 4)


@pytest.fixture(scope="module")
def sdxl_inpaint(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, engine folder) of a tiny 9-channel SDXL inpainting model."""
    return _build(tmp_path_factory.mktemp("sdxl-inpaint"), "StableDiffusionXLInpaintPipeline", 9)


def _reference(folder: Path, cls: str, sampler: str = "euler"):
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    name, overrides = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(SCHEDULER, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy], axis=-1) * 0.4 + 0.5
    return Image.fromarray((np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8))


def _mask(h: int, w: int) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3: 5 * w // 6] = 255
    return Image.fromarray(m)


def _torch_draws(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    """diffusers' draws from `torch.Generator().manual_seed(seed)` on CPU, in order (each VAE
    `latent_dist.sample(generator)` and each `randn_tensor` is one `torch.randn`)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for _ in range(n)]


def _latent_shape(pipe: runtime.Pipeline) -> tuple[int, int, int, int]:
    h, w = pipe.default_size
    return 1, 4, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor


# --------------------------------------------------------------------------------------- reference

def test_reference_unet_matches_diffusers():
    """Our U-Net, strictly loaded with a diffusers SDXL U-Net's state dict (per-block depths, heads,
    a down block without attention, text_time add_embedding), gives its noise prediction; its config
    round-trips through to_dict; SD 1.x configs gain no keys."""
    from export.configs import UNetConfig, infer_family, preset
    from export.unet import UNet2DConditionModel

    torch.manual_seed(1)
    ref = diffusers.UNet2DConditionModel(**UNET).eval()
    config = UNetConfig.from_dict(dict(ref.config))
    assert infer_family(config) == "sdxl" and config.depths == (1, 2)
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t = torch.randn(2, 4, 16, 24), torch.tensor([500.0, 21.5])
    context, pooled = torch.randn(2, 77, 64), torch.randn(2, 32)
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [128.0, 128.0, 8.0, 16.0, 64.0, 64.0]])
    with torch.no_grad():
        want = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, context, text_embeds=pooled, time_ids=time_ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert UNetConfig.from_dict(config.to_dict()) == config
    assert diffusers.UNet2DConditionModel.from_config(config.to_dict()).config.transformer_layers_per_block == [1, 2]
    assert not {"addition_embed_type", "addition_time_embed_dim"} & set(preset("tiny-sd1").unet.to_dict())
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        ours(x, t, context)


def test_tiny_preset_is_diffusers_config():
    """export/configs.py's tiny-sdxl preset is this module's diffusers config (one source of sizes)."""
    from export.configs import UNetConfig, preset

    assert preset("tiny-sdxl").unet == UNetConfig.from_dict(dict(diffusers.UNet2DConditionModel(**UNET).config))
    dims = preset("tiny-sdxl").dims
    assert (dims.context_size, dims.text_embeds_size, dims.time_ids) == (64, 32, 6)


# ---------------------------------------------------------------------------------------- folder

def test_manifest_and_contract(sdxl):
    folder, engine = sdxl
    m = load_manifest(engine)
    assert m.family == "sdxl" and family_of(m.family) is SDXL
    assert set(m.networks) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert (m.dims.text_hidden_size, m.dims.text_hidden_size_2, m.dims.text_embeds_size, m.dims.time_ids) == \
        (32, 32, 32, 6)
    assert m.pipeline == {"force_zeros_for_empty_prompt": True}
    assert m.tokenizer["pad_token"] == "<|endoftext|>" and m.tokenizer["tokenizer_2"]["pad_token"] == "!"
    assert (engine / "tokenizer_2" / "vocab.json").is_file()
    unet_in, _ = network_io("unet", m.dims)
    assert [t.name for t in unet_in] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in network_io("text_encoder", m.dims)[1]] == ["hidden_states"]
    assert [t.name for t in network_io("text_encoder_2", m.dims)[1]] == ["hidden_states", "text_embeds"]
    with runtime.load(engine, backend="onnxruntime") as pipe:
        assert pipe.tokenizer_2.pad_token == "!" and pipe.limits.second_prompt


def test_text_encoders_match_diffusers_encode_prompt(sdxl):
    """Both encoders' penultimate hidden states concatenated, and text_encoder_2's pooled projection,
    as diffusers' StableDiffusionXLPipeline.encode_prompt gives them (prompt_2 / negative_prompt_2
    to the second encoder); an empty negative prompt gives zeros (force_zeros_for_empty_prompt)."""
    folder, engine = sdxl
    ref = _reference(folder, "StableDiffusionXLPipeline")
    with runtime.load(engine, backend="onnxruntime") as pipe:
        for kw in ({}, {"prompt_2": "an oil painting of a harbour", "negative_prompt_2": "grainy"}):
            r = pipe.request("txt2img", PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, **kw)
            text = pipe.encode_prompt(r.tokens, 1)
            with torch.no_grad():
                want = ref.encode_prompt(PROMPT, kw.get("prompt_2"), "cpu", 1, True, NEGATIVE,
                                         kw.get("negative_prompt_2"))
            for got, exp in zip((text.cond, text.uncond, text.pooled, text.uncond_pooled), want):
                np.testing.assert_allclose(got, exp.numpy(), rtol=0, atol=1e-5 * float(exp.abs().max()))
        empty = pipe.encode_prompt(pipe.request("txt2img", PROMPT, guidance_scale=5.0).tokens, 1)
        assert not empty.uncond.any() and not empty.uncond_pooled.any() and empty.pooled.any()


def test_long_prompts_and_weighting_over_both_encoders(sdxl):
    """A prompt past 75 tokens is two chunks for both encoders (their hidden states concatenated
    chunk by chunk); the pooled output is the first chunk's (A1111); A1111 weights of 1 change
    nothing, and other weights change both encoders' halves."""
    _, engine = sdxl
    long = ", ".join(["a lighthouse on a cliff above a stormy sea"] * 10)
    with runtime.load(engine, backend="onnxruntime") as pipe:
        r = pipe.request("txt2img", long, prompt_2="a cat", guidance_scale=5.0)
        assert r.prompt_chunks == 2 and r.tokens.second.n_chunks == 2
        text = pipe.encode_prompt(r.tokens, 1)
        assert text.cond.shape == (1, 154, 64)
        first = pipe.engine("text_encoder_2").run({"input_ids": r.tokens.second.cond[:, 0]})
        np.testing.assert_array_equal(text.pooled, first["text_embeds"])
        np.testing.assert_array_equal(text.cond[:, :77, 32:], first["hidden_states"])
        plain = pipe.encode_prompt(pipe.request("txt2img", "a red fox", guidance_scale=5.0).tokens, 1)
        same = pipe.encode_prompt(pipe.request("txt2img", "a (red:1.0) fox", guidance_scale=5.0).tokens, 1)
        np.testing.assert_array_equal(plain.cond, same.cond)
        heavy = pipe.encode_prompt(pipe.request("txt2img", "a (red:1.4) fox", guidance_scale=5.0).tokens, 1)
        assert not np.array_equal(heavy.cond[..., :32], plain.cond[..., :32])
        assert not np.array_equal(heavy.cond[..., 32:], plain.cond[..., 32:])


def test_prompt_2_refused_without_second_encoder(sdxl):
    _, engine = sdxl
    with runtime.load(engine, backend="onnxruntime") as pipe:
        limits = dataclasses.replace(pipe.limits, second_prompt=False)
        with pytest.raises(PipelineError, match="second text encoder") as e:
            make_request(limits, "txt2img", PROMPT, prompt_2="x")
        assert e.value.field == "prompt_2"
        with pytest.raises(PipelineError, match="one per prompt"):
            pipe.request("txt2img", [PROMPT, PROMPT], prompt_2=["a", "b", "c"])


# ---------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("negative", [None, NEGATIVE])
@pytest.mark.parametrize("backend,options", BACKENDS)
def test_txt2img_matches_diffusers(sdxl, backend, options, negative):
    folder, engine = sdxl
    ref = _reference(folder, "StableDiffusionXLPipeline")
    with runtime.load(engine, backend=backend, **options) as ours:
        latents = np.random.default_rng(3).standard_normal(_latent_shape(ours), dtype=np.float32)
        h, w = ours.default_size
        want = ref(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0,
                   latents=torch.from_numpy(latents), output_type="np", height=h, width=w).images
        got = ours.txt2img(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0,
                           scheduler="euler", latents=latents, output_type="np", progress=False).images
        assert_psnr(got, want, f"sdxl txt2img euler, negative {negative!r}, {backend}")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "heun"])
def test_txt2img_samplers_match_diffusers(sdxl, sampler):
    folder, engine = sdxl
    ref = _reference(folder, "StableDiffusionXLPipeline", sampler)
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = 64, 96  # not square: time_ids carry (H, W) in that order
        latents = np.random.default_rng(4).standard_normal((1, 4, h // 2, w // 2), dtype=np.float32)
        kw = dict(negative_prompt=NEGATIVE, prompt_2="an oil painting", num_inference_steps=STEPS, guidance_scale=6.0,
                  output_type="np", height=h, width=w)
        want = ref(PROMPT, latents=torch.from_numpy(latents), **kw).images
        got = ours.txt2img(PROMPT, scheduler=sampler, latents=latents, progress=False, **kw).images
        assert_psnr(got, want, f"sdxl txt2img {sampler} 64x96 with prompt_2")


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_img2img_matches_diffusers(sdxl, backend, options):
    """StableDiffusionXLImg2ImgPipeline draws (1) the VAE-encode noise, (2) the added noise."""
    folder, engine = sdxl
    base = _reference(folder, "StableDiffusionXLPipeline")
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    with runtime.load(engine, backend=backend, **options) as ours:
        h, w = ours.default_size
        image, seed, strength = _image(h, w), 21, 0.6
        enc, noise = _torch_draws(seed, _latent_shape(ours), 2)
        want = ref(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np").images
        got = ours.img2img(PROMPT, image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                           guidance_scale=5.0, scheduler="euler", noise=noise, encode_noise=enc, output_type="np",
                           progress=False).images
        assert_psnr(got, want, f"sdxl img2img euler, strength {strength}, {backend}")


@pytest.mark.parametrize("unet_channels", [9, 4])
@pytest.mark.parametrize("backend,options", BACKENDS)
def test_inpaint_matches_diffusers(sdxl, sdxl_inpaint, backend, options, unet_channels):
    """StableDiffusionXLInpaintPipeline: the 9-channel U-Net (mask and masked-image latents stacked on
    the sample), or the base U-Net with the known region blended back every step. Its draws: the
    image's VAE-encode noise (when it needs the image latents), the initial noise, the masked image's
    VAE-encode noise."""
    folder, engine = sdxl_inpaint if unet_channels == 9 else sdxl
    if unet_channels == 9:
        ref = _reference(folder, "StableDiffusionXLInpaintPipeline", "ddim")
        assert family_of(load_manifest(engine).family) is SDXL_INPAINT
    else:
        ref = diffusers.StableDiffusionXLInpaintPipeline(**_reference(folder, "StableDiffusionXLPipeline",
                                                                      "ddim").components)
        ref.set_progress_bar_config(disable=True)
    strength = 0.75
    with runtime.load(engine, backend=backend, **options) as ours:
        h, w = ours.default_size
        image, mask, seed = _image(h, w, 5), _mask(h, w), 33
        enc, noise, masked_enc = _torch_draws(seed, _latent_shape(ours), 3)
        want = ref(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                   output_type="np", height=h, width=w).images
        got = ours.inpaint(PROMPT, image, mask, strength=strength, negative_prompt=NEGATIVE,
                           num_inference_steps=STEPS, guidance_scale=5.0, scheduler="ddim", noise=noise,
                           encode_noise=enc, masked_encode_noise=masked_enc if unet_channels == 9 else None,
                           output_type="np", progress=False).images
        assert_psnr(got, want, f"sdxl inpaint {unet_channels}-channel, strength {strength}, {backend}")


def test_fp16_folder_keeps_the_vae_f32(sdxl, tmp_path):
    """force_upcast in the VAE config: an fp16 build keeps vae_decoder / vae_encoder fp32 (SDXL's VAE
    overflows in fp16), the other graphs fp16."""
    from export.build import network_precision
    from export.loading import load_model

    folder, _ = sdxl
    spec = load_model(folder).spec
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True
    assert {n: network_precision(spec, n, "fp16") for n in ("text_encoder", "text_encoder_2", "unet",
                                                               "vae_decoder", "vae_encoder")} == \
        {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}


# ------------------------------------------------------------------------------------------ LoRA

def _kohya_lora(path: Path, layers: dict) -> Path:
    """The same LoRA in kohya-ss' SDXL layout: the U-Net under its original (LDM) module names
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; export/convert_ldm.py's rules, which
    diffusers' own kohya/sgm reader checks here), the second text encoder under lora_te2_, alpha = rank.
    The first text encoder's layers are left out: diffusers 0.42 under transformers 5 drops kohya's
    lora_te1_ attention layers (its CLIPTextModel lost the text_model. prefix; a load report lists
    them as unexpected), so it is no reference for them (tests/test_lora.py checks lora_te_ names)."""
    import safetensors.torch

    from export import convert_ldm

    modules = {key.partition(".lora_")[0] for key in layers["unet"]}
    ldm = {ours.removesuffix(".weight"): key.removesuffix(".weight")
           for key, ours in convert_ldm.unet_to_ldm({f"{m}.weight": f"{m}.weight" for m in modules}).items()}
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder_2", "lora_te2_")):
        for key, value in layers[component].items():
            module, _, rest = key.partition(".lora_")
            if component != "unet" and not module.startswith("text_model."):  # transformers 5 flattened it away
                module = f"text_model.{module}"
            name = prefix + ldm.get(module, module).replace(".", "_")
            tensors[f"{name}.{'lora_down' if rest.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if rest.startswith("A") else value.shape[1]))
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_lora_matches_diffusers_load_lora_weights(sdxl, tmp_path, layout):
    """A LoRA on the U-Net and both text encoders (made with PEFT; saved by diffusers' own
    StableDiffusionXLPipeline.save_lora_weights, or in kohya's SDXL layout with LDM U-Net names and
    the second text encoder only: `_kohya_lora`),
    fused at build (`build_engine(loras=...)`), against diffusers' `load_lora_weights` of the same
    file; the LoRA itself moves the image well below the bound."""
    import copy

    peft = pytest.importorskip("peft")
    from export.build import build_engine

    folder, engine = sdxl
    ref = _reference(folder, "StableDiffusionXLPipeline")
    layers = {}
    for seed, (name, targets) in enumerate((("unet", ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]),
                                            ("text_encoder", ["q_proj", "v_proj", "fc1"]),
                                            ("text_encoder_2", ["k_proj", "out_proj", "fc2"]))):
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian")
        model = peft.inject_adapter_in_model(config, copy.deepcopy(getattr(ref, name)))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # PEFT starts lora_B at zero, a no-op
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        layers[name] = peft.get_peft_model_state_dict(model)
    if layout == "peft":
        diffusers.StableDiffusionXLPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
            text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name="lora.safetensors")
    else:
        _kohya_lora(tmp_path / "lora.safetensors", layers)
    lora_engine = build_engine(str(folder), tmp_path / "engine", loras=[str(tmp_path / "lora.safetensors")],
                               progress=lambda line: None)
    ref.load_lora_weights(str(tmp_path / "lora.safetensors"))
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    latents = np.random.default_rng(8).standard_normal((1, 4, 32, 32), dtype=np.float32)
    want = ref(PROMPT, latents=torch.from_numpy(latents), **kw).images
    with runtime.load(lora_engine, backend="onnxruntime") as ours, runtime.load(engine, backend="onnxruntime") as plain:
        got = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
        without = plain.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    assert_psnr(got, want, f"sdxl {layout} LoRA vs diffusers load_lora_weights")
    assert psnr(without, want) < PARITY_PSNR_DB - 20


# ------------------------------------------------------------------------------------ single file

def _original_layout(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """An SDXL single file (Stability-AI/generative-models layout) of diffusers modules: the U-Net and
    VAE through export/convert_ldm.py's LDM rules (diffusers' from_single_file checks them below), both
    text encoders written here by hand: embedders.0 in Hugging Face keys, embedders.1 as OpenCLIP's
    text tower (in_proj = q, k, v stacked; text_projection = the Linear weight transposed)."""
    from export import convert_ldm

    sd = {convert_ldm.UNET_PREFIX + k: v for k, v in convert_ldm.unet_to_ldm(unet.state_dict()).items()}
    sd |= {convert_ldm.VAE_PREFIX + k: v for k, v in convert_ldm.vae_to_ldm(vae.state_dict()).items()}
    sd |= {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in text_encoder.state_dict().items()}
    t2, g = text_encoder_2.state_dict(), "conditioner.embedders.1.model."
    sd |= {g + "token_embedding.weight": t2["text_model.embeddings.token_embedding.weight"],
           g + "positional_embedding": t2["text_model.embeddings.position_embedding.weight"],
           g + "ln_final.weight": t2["text_model.final_layer_norm.weight"],
           g + "ln_final.bias": t2["text_model.final_layer_norm.bias"],
           g + "text_projection": t2["text_projection.weight"].T}
    names = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
             ("attn.out_proj", "self_attn.out_proj"))
    for i in range(text_encoder_2.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"{g}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"{theirs}attn.in_proj_{kind}"] = torch.cat([t2[f"{ours}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            sd |= {f"{theirs}{a}.{kind}": t2[f"{ours}{b}.{kind}"] for a, b in names}
    return {k: v.contiguous() for k, v in sd.items()}


def test_single_file_checkpoint_loads_the_same_weights(tmp_path):
    """A single-file SDXL checkpoint (conditioner.embedders.0/1.*) of a tiny SDXL with SDXL's 64-wide
    heads: diffusers' own single-file readers (from_single_file; convert_open_clip_checkpoint for the
    OpenCLIP tower, whose from_single_file leaves text_projection on the meta device under
    transformers 5) read it as the diffusers folder it came from, and so does load_model, config
    included (but the sample size, which no tensor tells)."""
    import safetensors.torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from export.configs import UNetConfig
    from export.loading import load_model
    from export.text_encoder import write_tokenizer_files

    torch.manual_seed(5)
    unet_config = {**UNET, "block_out_channels": (64, 128), "attention_head_dim": (1, 2), "cross_attention_dim": 128,
                   "projection_class_embeddings_input_dim": 64 + 6 * 8, "norm_num_groups": 32}
    text = {**TEXT, "hidden_size": 64, "num_attention_heads": 1, "num_hidden_layers": 2, "projection_dim": 64}
    parts = dict(unet=diffusers.UNet2DConditionModel(**unet_config), vae=diffusers.AutoencoderKL(**VAE),
                 text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**text, "hidden_act": "quick_gelu"})),
                 text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)))
    pipe = diffusers.StableDiffusionXLPipeline(
        **parts, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(tmp_path / "t1"))),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(tmp_path / "t2", "!"))),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER))
    pipe.save_pretrained(str(tmp_path / "diffusers"))
    checkpoint = _original_layout(**parts)
    safetensors.torch.save_file(checkpoint, str(tmp_path / "xl.safetensors"))

    def same(got: dict, want: dict) -> None:
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)

    ref = diffusers.StableDiffusionXLPipeline.from_single_file(str(tmp_path / "xl.safetensors"),
                                                                config=str(tmp_path / "diffusers"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        same(getattr(ref, name).state_dict(), parts[name].state_dict())
    same(convert_open_clip_checkpoint(parts["text_encoder_2"], checkpoint, prefix="conditioner.embedders.1.model."),
         parts["text_encoder_2"].state_dict())
    model = load_model(tmp_path / "xl.safetensors")
    assert model.spec.family == "sdxl" and model.spec.pad_token_2 == "!"
    assert model.spec.unet == dataclasses.replace(UNetConfig.from_dict(dict(parts["unet"].config)), sample_size=128)
    assert model.spec.dims.time_ids == 6 and model.spec.text_encoder_2["hidden_act"] == "gelu"
    for name in parts:
        same(getattr(model, name).state_dict(), parts[name].state_dict())


# ------------------------------------------------------------------------------------ embeddings

def test_embedding_matches_diffusers_load_textual_inversion(sdxl, tmp_path):
    """An SDXL textual-inversion file (clip_l for the first text encoder, clip_g for the second; two
    vectors) added at build, against diffusers' load_textual_inversion into each encoder and
    tokenizer, as diffusers' SDXL docs load such a file; an SD 1.x embedding is refused."""
    import safetensors.torch

    from export.build import build_engine
    from export.embeddings import EmbeddingError

    folder, _ = sdxl
    g = torch.Generator().manual_seed(9)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    safetensors.torch.save_file(vectors, str(tmp_path / "xl-style.safetensors"))
    token = "<xl-style>"
    engine = build_engine(str(folder), tmp_path / "engine", embeddings=[(str(tmp_path / "xl-style.safetensors"), token)],
                          progress=lambda line: None)
    ref = _reference(folder, "StableDiffusionXLPipeline")
    ref.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    prompt = f"a lighthouse in the style of {token}"
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    latents = np.random.default_rng(12).standard_normal((1, 4, 32, 32), dtype=np.float32)
    want = ref(prompt, latents=torch.from_numpy(latents), **kw).images
    with runtime.load(engine, backend="onnxruntime") as ours:
        assert load_manifest(engine).tokenizer["embeddings"] == {token: [token, f"{token}_1"]}
        got = ours.txt2img(prompt, scheduler="euler", latents=latents, progress=False, **kw).images
        plain = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    assert_psnr(got, want, "sdxl embedding (clip_l, clip_g) vs diffusers load_textual_inversion")
    assert psnr(plain, want) < PARITY_PSNR_DB
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(EmbeddingError, match="not an SDXL embedding"):
        build_engine(str(folder), tmp_path / "engine-sd1", embeddings=[str(tmp_path / "sd1.safetensors")],
                     progress=lambda line: None)


def test_cli_takes_prompt_2(sdxl, tmp_path):
    """`python -m runtime txt2img --prompt-2 / --negative-prompt-2` reach the request."""
    from runtime.cli import main

    _, engine = sdxl
    out = tmp_path / "x.png"
    main(["txt2img", str(engine), "a fox", "--prompt-2", "an oil painting", "--negative-prompt-2", "grainy",
          "--steps", "2", "--output", str(out), "--backend", "onnxruntime", "--no-progress"])
    assert out.is_file()


# ----------------------------------------------------------------------------- step caching

@pytest.mark.parametrize("backend,options", BACKENDS)
def test_step_cache_matches_deepcache_helper(sdxl, tmp_path_factory, backend, options):
    """`build-engine --step-cache` on SDXL (unet_deep / unet_shallow take text_embeds and time_ids, as
    the unet does), then `txt2img(cache_interval=3)` against StableDiffusionXLPipeline with DeepCache's
    own DeepCacheSDHelper (interval 3, branch 0) on the same weights and latents; the cached image
    differs from the uncached one by far more than the bound, so the comparison can fail."""
    from export.build import build_engine

    helper_cls = pytest.importorskip("DeepCache", reason="pip install DeepCache==0.1.1 (its DeepCacheSDHelper "
                                                         "is the independent reference)").DeepCacheSDHelper
    folder, _ = sdxl
    engine = tmp_path_factory.getbasetemp() / "sdxl-step-cache"
    if not (engine / "manifest.json").is_file():
        build_engine(str(folder), engine, step_cache=True, progress=lambda line: None)
    ref = _reference(folder, "StableDiffusionXLPipeline", "ddim")
    with runtime.load(engine, backend=backend, **options) as ours:
        latents = np.random.default_rng(5).standard_normal(_latent_shape(ours), dtype=np.float32)
        kw = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, output_type="np")
        helper = helper_cls(ref)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        try:
            want = ref(PROMPT, latents=torch.from_numpy(latents), **kw).images
        finally:
            helper.disable()
        uncached = ref(PROMPT, latents=torch.from_numpy(latents), **kw).images
        got = ours.txt2img(PROMPT, latents=latents, scheduler="ddim", cache_interval=3, progress=False, **kw).images
    assert_psnr(got, want, f"sdxl txt2img ddim, cache interval 3, {backend}")
    gap = psnr(uncached, want)
    log.info("sdxl: DeepCache vs uncached %.1f dB", gap)
    assert gap < MIN_PSNR_DB, gap  # caching changes this image: the comparison above can fail
