"""The SDXL refiner (issue 26) and the base -> refiner hand-over, against diffusers.

The refiner is diffusers' own tiny random refiner: the sizes of diffusers 0.42's
tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py refiner-only
`get_dummy_components` (the tiny SDXL U-Net of tests/test_sdxl.py with cross_attention_dim 32, the
width of text_encoder_2 alone, and 5 time ids: add_embedding input 5 * 8 + 32 = 72), saved by
StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
.save_pretrained, so its model_index.json names no first text encoder, as
stabilityai/stable-diffusion-xl-refiner-1.0's does. The base is tests/test_sdxl.py's tiny SDXL. Both
are built into engine folders by `export.build.build_engine`, whose export check compares each graph
with our PyTorch reference. Images are compared with diffusers (StableDiffusionXLPipeline with
denoising_end, output_type "latent", then StableDiffusionXLImg2ImgPipeline with denoising_start) at
fp32 on ONNX Runtime and OpenVINO (f32): PSNR >= PARITY_PSNR_DB (tests/psnr_bounds.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB, assert_psnr
from runtime.compare import psnr, rel_err
from runtime.errors import PipelineError
from runtime.families import SDXL_REFINER, family_of
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import network_io

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_sdxl import SAMPLERS, SCHEDULER, TEXT, UNET, VAE, _components, _image, _torch_draws  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
STEPS = 6  # leading spacing: 831, 665, 499, 333, 167, 1; at 0.8 (cutoff 200) the base runs four, the refiner two
SWITCH = 0.8
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]
# diffusers get_dummy_components(skip_first_text_encoder=True, requires_aesthetics_score=True)
REFINER_UNET = {**UNET, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72}
# the samplers that split a schedule, with their diffusers classes (tests/test_sdxl.py SAMPLERS and these)
HAND_OVER = {**{k: v for k, v in SAMPLERS.items() if k != "heun"},
             "euler_a": ("EulerAncestralDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
             "ddpm": ("DDPMScheduler", {})}


def _refiner_components(root: Path) -> dict:
    from export.text_encoder import write_tokenizer_files

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**REFINER_UNET)
    vae = diffusers.AutoencoderKL(**VAE)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT))
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(root / "tok2", "!")))
    return dict(unet=unet, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER),
                requires_aesthetics_score=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{"base" | "refiner": (diffusers folder, engine folder)}."""
    from export.build import build_engine

    out = {}
    for name, cls, make in (("base", "StableDiffusionXLPipeline", _components),
                            ("refiner", "StableDiffusionXLImg2ImgPipeline", _refiner_components)):
        root = tmp_path_factory.mktemp(name)
        getattr(diffusers, cls)(**make(root)).save_pretrained(str(root / "diffusers"))
        engine = build_engine(str(root / "diffusers"), root / f"{name}-engine", progress=lambda s: None)
        out[name] = (root / "diffusers", engine)
    return out


def _reference(folder: Path, cls: str, sampler: str):
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    name, overrides = HAND_OVER[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(SCHEDULER, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------- folder

def test_refiner_folder(folders):
    """The refiner's folder: text_encoder_2 and its tokenizer only (as the top tokenizer entry), the
    refiner family and its 5 time ids; the full-size preset's sizes."""
    from export.configs import preset

    folder, engine = folders["refiner"]
    m = load_manifest(engine)
    assert m.family == "sdxl-refiner" and family_of(m.family) is SDXL_REFINER
    assert set(m.networks) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in m.networks.items():  # build-engine's export check against our PyTorch reference
        parity = entry["parity"]
        assert len(parity["cases"]) >= 1 and parity["rel"] <= parity["threshold"], name
    assert (m.dims.text_hidden_size, m.dims.text_hidden_size_2, m.dims.text_embeds_size, m.dims.time_ids) == \
        (0, 32, 32, 5)
    assert m.tokenizer["dir"] == "tokenizer_2" and m.tokenizer["pad_token"] == "!" and "tokenizer_2" not in m.tokenizer
    assert not (engine / "tokenizer").exists() and (engine / "tokenizer_2" / "vocab.json").is_file()
    assert [t.shape for t in network_io("unet", m.dims)[0]][2:] == [("batch", "tokens", 32), ("batch", 32),
                                                                      ("batch", 5)]
    with pytest.raises(ValueError, match="no first text encoder"):
        network_io("text_encoder", m.dims)
    full = preset("sdxl-refiner")
    assert (full.dims.context_size, full.dims.text_embeds_size, full.dims.time_ids) == (1280, 1280, 5)
    assert full.text_encoder is None and full.force_zeros_for_empty_prompt is False
    assert preset("tiny-sdxl-refiner").unet.to_dict()["projection_class_embeddings_input_dim"] == 72


def test_refiner_preset_is_diffusers_config():
    """tiny-sdxl-refiner is diffusers' tiny refiner U-Net (one source of sizes); the full-size
    refiner U-Net diffusers builds from our config has our reference U-Net's keys and shapes."""
    from export.configs import UNetConfig, preset

    assert preset("tiny-sdxl-refiner").unet == \
        UNetConfig.from_dict(dict(diffusers.UNet2DConditionModel(**REFINER_UNET).config))
    from export.unet import UNet2DConditionModel

    config = preset("sdxl-refiner").unet
    with torch.device("meta"):
        full = diffusers.UNet2DConditionModel.from_config(config.to_dict())
        ours = UNet2DConditionModel(config)
    assert full.config.transformer_layers_per_block == 4 and full.config.cross_attention_dim == 1280
    assert full.add_embedding.linear_1.in_features == 2560
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in full.state_dict().items()}


def test_text_encoder_matches_diffusers_encode_prompt(folders):
    """text_encoder_2's penultimate hidden states and pooled projection, as the refiner's encode_prompt
    gives them (it reads `prompt` with tokenizer_2); an empty negative prompt gives zeros
    (force_zeros_for_empty_prompt, diffusers' default for the dummy pipeline)."""
    folder, engine = folders["refiner"]
    ref = _reference(folder, "StableDiffusionXLImg2ImgPipeline", "euler")
    with runtime.load(engine, backend="onnxruntime") as pipe:
        assert pipe.tokenizer_2 is None and not pipe.limits.second_prompt
        r = pipe.request("img2img", PROMPT, image=_image(64, 64), negative_prompt=NEGATIVE, guidance_scale=5.0)
        text = pipe.encode_prompt(r.tokens, 1)
        with torch.no_grad():
            want = ref.encode_prompt(PROMPT, None, "cpu", 1, True, NEGATIVE)
        for got, exp in zip((text.cond, text.uncond, text.pooled, text.uncond_pooled), want):
            np.testing.assert_allclose(got, exp.numpy(), rtol=0, atol=1e-5 * float(exp.abs().max()))
        empty = pipe.encode_prompt(pipe.request("img2img", PROMPT, image=_image(64, 64), guidance_scale=5.0).tokens, 1)
        assert not empty.uncond.any() and not empty.uncond_pooled.any()
        with pytest.raises(PipelineError) as e:
            pipe.request("img2img", PROMPT, image=_image(64, 64), prompt_2="x")
        assert e.value.field == "prompt_2"


# ---------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("sampler", sorted(HAND_OVER))
@pytest.mark.parametrize("start", [0.5, SWITCH, 0.95])
def test_denoising_start_timesteps_match_diffusers(sampler, start):
    """The timesteps a run from `denoising_start` evaluates are StableDiffusionXLImg2ImgPipeline
    .get_timesteps' (its own code, on its scheduler), for every sampler that splits a schedule."""
    from runtime.scheduler import SchedulerError, make_schedule

    cls, overrides = HAND_OVER[sampler]
    scheduler = getattr(diffusers, cls).from_config(SCHEDULER, **overrides)
    for steps in (STEPS, 25):
        scheduler.set_timesteps(steps)
        want, n = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), steps, 0.3, "cpu", denoising_start=start)
        if n == 0:  # diffusers would run no step (multistep grids end at 143 > the cutoff 50): we refuse
            with pytest.raises(SchedulerError, match="leaves no step"):
                make_schedule(SCHEDULER, sampler, steps, strength=0.3, denoising_start=start)
            continue
        got = make_schedule(SCHEDULER, sampler, steps, strength=0.3, denoising_start=start)
        assert not got.noised_init and len(got.timesteps) == n
        np.testing.assert_allclose(got.timesteps, want.numpy(), rtol=0, atol=1e-4)


def test_hand_over_refusals():
    from runtime.scheduler import SchedulerError, make_schedule

    with pytest.raises(SchedulerError, match="does not split"):
        make_schedule(SCHEDULER, "heun", STEPS, denoising_end=SWITCH)
    with pytest.raises(SchedulerError, match="in \\(0, 1\\)"):
        make_schedule(SCHEDULER, "euler", STEPS, denoising_start=1.0)
    with pytest.raises(SchedulerError, match="below denoising_end"):
        make_schedule(SCHEDULER, "euler", STEPS, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(SchedulerError, match="leaves no step"):
        make_schedule(SCHEDULER, "euler", STEPS, denoising_end=0.01)
    ends = make_schedule(SCHEDULER, "euler", STEPS, denoising_end=SWITCH)  # the timesteps >= 200 (diffusers' cutoff)
    np.testing.assert_array_equal(ends.timesteps, [831, 665, 499, 333])
    assert len(make_schedule(SCHEDULER, "dpmpp_2m", STEPS, denoising_end=0.7).timesteps) == 4  # 853 ... 427


# ---------------------------------------------------------------------------------------- images

def _diffusers_hand_over(folders, sampler: str, latents: np.ndarray, negative, switch: float = SWITCH):
    """(diffusers' base latents at the switch, its refined images)."""
    base = _reference(folders["base"][0], "StableDiffusionXLPipeline", sampler)
    refiner = _reference(folders["refiner"][0], "StableDiffusionXLImg2ImgPipeline", sampler)
    kw = dict(negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0)
    handed = base(PROMPT, latents=torch.from_numpy(latents), denoising_end=switch, output_type="latent",
                  **kw).images
    images = refiner(PROMPT, image=handed, denoising_start=switch, output_type="np", **kw).images
    return handed.numpy(), images


@pytest.mark.parametrize("negative", [None, NEGATIVE])
@pytest.mark.parametrize("backend,options", BACKENDS)
def test_hand_over_matches_diffusers(folders, backend, options, negative):
    """base.txt2img(refiner=, refiner_switch_at=0.8) against diffusers' base (denoising_end 0.8,
    latents out) then refiner (denoising_start 0.8); the two-call API (txt2img denoising_end with
    output_type "latent", then img2img of those latents with denoising_start) gives the same."""
    latents = np.random.default_rng(3).standard_normal((1, 4, 32, 32), dtype=np.float32)
    handed, want = _diffusers_hand_over(folders, "euler", latents, negative)
    kw = dict(negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0, scheduler="euler",
              progress=False)
    with runtime.load(folders["base"][1], backend=backend, **options) as base, \
            runtime.load(folders["refiner"][1], backend=backend, **options) as refiner:
        ours = base.txt2img(PROMPT, latents=latents, denoising_end=SWITCH, output_type="latent", **kw).images
        assert rel_err(ours, handed) < 1e-4
        two_calls = refiner.img2img(PROMPT, ours, denoising_start=SWITCH, output_type="np", **kw)
        one_call = base.txt2img(PROMPT, latents=latents, refiner=refiner, refiner_switch_at=SWITCH, output_type="np",
                                **kw)
    assert_psnr(one_call.images, want, f"sdxl base -> refiner at {SWITCH}, euler, negative {negative!r}, {backend}")
    np.testing.assert_array_equal(two_calls.images, one_call.images)
    assert two_calls.parameters["denoising_start"] == SWITCH and "strength" not in two_calls.parameters
    assert one_call.parameters["refiner_switch_at"] == SWITCH and "base_denoise" in one_call.timings


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim", "unipc"])
def test_hand_over_samplers_match_diffusers(folders, sampler):
    """The hand-over with multistep history cut at the switch (DPM++ 2M, UniPC: the refiner starts
    its history afresh, first order) and with DDIM's variance-preserving latents, at 0.7."""
    latents = np.random.default_rng(4).standard_normal((1, 4, 32, 32), dtype=np.float32)
    _, want = _diffusers_hand_over(folders, sampler, latents, NEGATIVE, 0.7)
    with runtime.load(folders["base"][1], backend="onnxruntime") as base, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as refiner:
        got = base.txt2img(PROMPT, negative_prompt=NEGATIVE, latents=latents, num_inference_steps=STEPS,
                           guidance_scale=5.0, scheduler=sampler, refiner=refiner, refiner_switch_at=0.7,
                           output_type="np", progress=False).images
    assert_psnr(got, want, f"sdxl base -> refiner at 0.7, {sampler}")


def test_ancestral_hand_over_matches_diffusers(folders, monkeypatch):
    """Euler a across the hand-over, image against image: diffusers' base draws its step noise from
    its generator (latents given), its refiner from a fresh generator of the same seed (denoising_start
    adds no noise); each of our requests samples from its seed's generator, here made to give those
    torch draws (runtime/stages.py `initial_noise`, whose own draws the given latents replace). The
    sigma_up / sigma_down of the last base step and the first refiner step are what this checks."""
    from runtime import stages
    from test_scheduler import TorchNoise  # the draws of diffusers' randn_tensor from a seeded torch.Generator

    seed, latents = 29, np.random.default_rng(6).standard_normal((1, 4, 32, 32), dtype=np.float32)
    base = _reference(folders["base"][0], "StableDiffusionXLPipeline", "euler_a")
    refiner = _reference(folders["refiner"][0], "StableDiffusionXLImg2ImgPipeline", "euler_a")
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0)
    handed = base(PROMPT, latents=torch.from_numpy(latents), denoising_end=SWITCH, output_type="latent",
                  generator=torch.Generator().manual_seed(seed), **kw).images
    want = refiner(PROMPT, image=handed, denoising_start=SWITCH, output_type="np",
                   generator=torch.Generator().manual_seed(seed), **kw).images
    original = stages.initial_noise

    def torch_draws(request, latent_shape, inpainting_unet):
        draws = original(request, latent_shape, inpainting_unet)
        return dataclasses.replace(draws, rngs=tuple(TorchNoise(s) for s in request.seeds))

    monkeypatch.setattr(stages, "initial_noise", torch_draws)
    with runtime.load(folders["base"][1], backend="onnxruntime") as ours, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as ours_refiner:
        got = ours.txt2img(PROMPT, latents=latents, seed=seed, scheduler="euler_a", refiner=ours_refiner,
                           refiner_switch_at=SWITCH, output_type="np", progress=False, **kw).images
        other = ours.txt2img(PROMPT, latents=latents, seed=seed + 1, scheduler="euler_a", refiner=ours_refiner,
                             refiner_switch_at=SWITCH, output_type="np", progress=False, **kw).images
    assert_psnr(got, want, f"sdxl base -> refiner at {SWITCH}, euler_a, torch's step noise")
    assert psnr(other, want) < PARITY_PSNR_DB - 20  # the step noise matters: another seed's is far off


@pytest.mark.parametrize("negative", [None, NEGATIVE])
@pytest.mark.parametrize("backend,options", BACKENDS)
def test_refiner_img2img_matches_diffusers(folders, backend, options, negative):
    """The refiner alone, img2img of an image (StableDiffusionXLImg2ImgPipeline with the refiner's 5
    time ids, aesthetic scores 6 and 2.5): its draws are the VAE-encode noise, then the added noise."""
    folder, engine = folders["refiner"]
    ref = _reference(folder, "StableDiffusionXLImg2ImgPipeline", "euler")
    image, seed, strength = _image(64, 96), 21, 0.6
    with runtime.load(engine, backend=backend, **options) as ours:
        enc, noise = _torch_draws(seed, (1, 4, 32, 48), 2)
        want = ref(PROMPT, image=image, strength=strength, negative_prompt=negative, num_inference_steps=STEPS,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np").images
        got = ours.img2img(PROMPT, image, strength=strength, negative_prompt=negative, num_inference_steps=STEPS,
                           guidance_scale=5.0, scheduler="euler", noise=noise, encode_noise=enc, output_type="np",
                           progress=False).images
    assert_psnr(got, want, f"sdxl refiner img2img euler 64x96, negative {negative!r}, {backend}")


def test_img2img_hand_over_matches_diffusers(folders):
    """The hand-over from an img2img run (what A1111's img2img with refiner_checkpoint runs):
    StableDiffusionXLImg2ImgPipeline on the base's components with strength and denoising_end
    (latents out), then the refiner from there; the base's draws are the VAE-encode noise, then the
    added noise."""
    base_ref = _reference(folders["base"][0], "StableDiffusionXLPipeline", "euler")
    base_img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**base_ref.components)
    base_img2img.set_progress_bar_config(disable=True)
    refiner_ref = _reference(folders["refiner"][0], "StableDiffusionXLImg2ImgPipeline", "euler")
    image, seed, strength = _image(64, 64), 13, 0.9
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0)
    handed = base_img2img(PROMPT, image=image, strength=strength, denoising_end=SWITCH, output_type="latent",
                          generator=torch.Generator().manual_seed(seed), **kw).images
    want = refiner_ref(PROMPT, image=handed, denoising_start=SWITCH, output_type="np", **kw).images
    enc, noise = _torch_draws(seed, (1, 4, 32, 32), 2)
    with runtime.load(folders["base"][1], backend="onnxruntime") as base, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as refiner:
        latents = base.img2img(PROMPT, image, strength=strength, denoising_end=SWITCH, output_type="latent",
                               scheduler="euler", noise=noise, encode_noise=enc, progress=False, **kw).images
        assert rel_err(latents, handed.numpy()) < 1e-4
        got = refiner.img2img(PROMPT, latents, denoising_start=SWITCH, output_type="np", scheduler="euler",
                              progress=False, **kw).images
    assert_psnr(got, want, f"sdxl base img2img (strength {strength}) -> refiner at {SWITCH}, euler")


def test_request_refusals(folders):
    with runtime.load(folders["base"][1], backend="onnxruntime") as base, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as refiner:
        latents = np.zeros((1, 4, 32, 32), np.float32)
        cases = [
            (lambda: base.request("txt2img", PROMPT, denoising_start=0.5), "denoising_start"),
            (lambda: base.request("txt2img", PROMPT, denoising_end=1.5), "denoising_end"),
            (lambda: refiner.request("img2img", PROMPT, image=latents, denoising_start=0.8, denoising_end=0.5),
             "denoising_start"),
            (lambda: refiner.request("img2img", PROMPT, image=np.zeros((1, 3, 32, 32), np.float32)), "image"),
            (lambda: refiner.request("img2img", PROMPT, image=latents, height=128), "height"),
            (lambda: base.request("txt2img", PROMPT, scheduler="heun", denoising_end=0.5), "scheduler"),
            (lambda: base.txt2img(PROMPT, refiner=refiner, denoising_end=0.5), "denoising_end"),
            (lambda: base.txt2img(PROMPT, refiner_switch_at=0.5), "refiner"),
            (lambda: base.txt2img(PROMPT, refiner=refiner, refiner_switch_at=1), "refiner_switch_at"),
        ]
        for call, field in cases:
            with pytest.raises(PipelineError) as e:
                call()
            assert e.value.field == field, (field, str(e.value))
        r = refiner.request("img2img", [PROMPT, NEGATIVE], image=latents, denoising_start=0.8)
        assert r.init_latents.shape == (2, 4, 32, 32) and r.images is None and r.schedule.noised_init is False


def test_cli_refiner(folders, tmp_path):
    """`python -m runtime txt2img BASE PROMPT --refiner DIR --refiner-switch-at F`."""
    from runtime.cli import main

    out = tmp_path / "x.png"
    assert main(["txt2img", str(folders["base"][1]), "a fox", "--refiner", str(folders["refiner"][1]),
                 "--refiner-switch-at", "0.7", "--steps", "4", "--output", str(out), "--backend", "onnxruntime",
                 "--no-progress"]) == 0
    assert out.is_file()
    assert main(["img2img", str(folders["base"][1]), "a fox", "--image", str(out), "--refiner",
                 str(folders["refiner"][1])]) == 2


def test_a1111_refiner_checkpoint(folders):
    """`serve BASE REFINER`: A1111's refiner_checkpoint / refiner_switch_at run the hand-over (one folder
    resident at a time), bit for bit the Python API's; a refiner that is not served is a 422 naming it."""
    from runtime.serving.models import Models
    from test_serve_support import LiveServer, as_array, pixels

    server = LiveServer(Models.from_folders([folders["base"][1], folders["refiner"][1]],
                                            lambda f: runtime.load(f, backend="onnxruntime"), max_resident=1))
    try:
        body = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=STEPS, cfg_scale=5.0, width=64, height=64,
                    sampler_name="Euler", refiner_checkpoint="refiner-engine", refiner_switch_at=0.7)
        r = server.post("/sdapi/v1/txt2img", body)
        assert r.status_code == 200, r.text
        got = pixels(r.json()["images"][0])
        assert "Refiner: refiner-engine, Refiner switch at: 0.7" in r.json()["info"]
        bad = server.post("/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "sd_xl_refiner_1.0"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("refiner_checkpoint: model "
                                                                          "'sd_xl_refiner_1.0' is not served here")
    finally:
        server.stop()
    with runtime.load(folders["base"][1], backend="onnxruntime") as base, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as refiner:
        want = base.txt2img(PROMPT, negative_prompt=NEGATIVE, seed=7, num_inference_steps=STEPS, guidance_scale=5.0,
                            scheduler="euler", karras=False, height=64, width=64, refiner=refiner,
                            refiner_switch_at=0.7, progress=False).images[0]
    np.testing.assert_array_equal(got, as_array(want))


def test_single_file_refiner_loads_the_same_weights(tmp_path):
    """A refiner single file (sgm layout: its one embedder, the OpenCLIP tower, as
    conditioner.embedders.0.model.*) of a tiny refiner with SDXL's 64-wide heads and, as the real
    refiner, a last level without attention whose depth the mid block's is: load_model reads it as
    family sdxl-refiner with diffusers' config and weights; diffusers' own OpenCLIP converter reads
    the text tower at that prefix to the same weights."""
    import safetensors.torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from export.configs import UNetConfig
    from export.loading import load_model
    from test_sdxl import _original_layout

    torch.manual_seed(6)
    unet_config = {**UNET, "block_out_channels": (64, 128, 128), "attention_head_dim": (1, 2, 2),
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   "transformer_layers_per_block": (1, 2, 2), "cross_attention_dim": 64,
                   "projection_class_embeddings_input_dim": 64 + 5 * 8, "norm_num_groups": 32}
    text = {**TEXT, "hidden_size": 64, "num_attention_heads": 1, "num_hidden_layers": 2, "projection_dim": 64}
    parts = dict(unet=diffusers.UNet2DConditionModel(**unet_config), vae=diffusers.AutoencoderKL(**VAE),
                 text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)))
    first = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))  # dropped: the refiner has none
    base_layout = _original_layout(parts["unet"], parts["vae"], first, parts["text_encoder_2"])
    checkpoint = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in base_layout.items()
                  if not k.startswith("conditioner.embedders.0.")}
    safetensors.torch.save_file(checkpoint, str(tmp_path / "refiner.safetensors"))
    theirs = convert_open_clip_checkpoint(parts["text_encoder_2"], checkpoint, prefix="conditioner.embedders.0.model.")
    model = load_model(tmp_path / "refiner.safetensors")
    assert model.spec.family == "sdxl-refiner" and model.text_encoder is None and model.spec.dims.time_ids == 5
    assert model.spec.unet == dataclasses.replace(UNetConfig.from_dict(dict(parts["unet"].config)), sample_size=128)
    for name in parts:
        got, want = getattr(model, name).state_dict(), parts[name].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    assert all(torch.equal(theirs[k], v) for k, v in parts["text_encoder_2"].state_dict().items())


# ------------------------------------------------------------------------------- LoRAs, embeddings

def _refiner_lora(folder: Path, path: Path) -> Path:
    """A LoRA on the refiner's U-Net and its one text encoder (text_encoder_2), made with PEFT and saved
    by diffusers' own StableDiffusionXLImg2ImgPipeline.save_lora_weights (as tests/test_sdxl.py's)."""
    import copy

    peft = pytest.importorskip("peft")
    ref = _reference(folder, "StableDiffusionXLImg2ImgPipeline", "euler")
    layers, metadata = {}, {}
    for seed, (name, targets) in enumerate((("unet", ["to_q", "to_v", "to_out.0", "proj_in", "conv1"]),
                                            ("text_encoder_2", ["k_proj", "out_proj", "fc2"]))):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")
        model = peft.inject_adapter_in_model(config, copy.deepcopy(getattr(ref, name)))
        g = torch.Generator().manual_seed(seed + 30)
        with torch.no_grad():  # PEFT starts lora_B at zero, a no-op
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        layers[name], metadata[name] = peft.get_peft_model_state_dict(model), config.to_dict()
    diffusers.StableDiffusionXLImg2ImgPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers["unet"], text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"],
        weight_name=path.name)
    return path


def test_refiner_lora_matches_diffusers_load_lora_weights(folders, tmp_path):
    """A refiner LoRA (U-Net and text_encoder_2, alpha 8 at rank 4 in diffusers' adapter metadata) fused
    at build, against StableDiffusionXLImg2ImgPipeline.load_lora_weights of the same file on refiner
    img2img; the LoRA moves the image well below the bound. A LoRA for the first text encoder, which
    the refiner lacks, is refused naming its keys."""
    import safetensors.torch

    from export.build import build_engine
    from export.lora import LoraError

    folder, engine = folders["refiner"]
    lora = _refiner_lora(folder, tmp_path / "refiner-lora.safetensors")
    lora_engine = build_engine(str(folder), tmp_path / "engine", loras=[str(lora)], progress=lambda line: None)
    ref = _reference(folder, "StableDiffusionXLImg2ImgPipeline", "euler")
    ref.load_lora_weights(str(lora))
    image, seed, strength = _image(64, 64), 17, 0.7
    kw = dict(strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0,
              output_type="np")
    want = ref(PROMPT, image=image, generator=torch.Generator().manual_seed(seed), **kw).images
    enc, noise = _torch_draws(seed, (1, 4, 32, 32), 2)
    with runtime.load(lora_engine, backend="onnxruntime") as ours, runtime.load(engine, backend="onnxruntime") as plain:
        got, without = (p.img2img(PROMPT, image, scheduler="euler", noise=noise, encode_noise=enc, progress=False,
                                  **kw).images for p in (ours, plain))
    assert_psnr(got, want, "sdxl refiner PEFT LoRA (U-Net, text_encoder_2) vs diffusers load_lora_weights")
    assert psnr(without, want) < PARITY_PSNR_DB - 20
    assert [r["file"] for r in load_manifest(lora_engine).source["loras"]] == ["refiner-lora.safetensors"]
    first = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}
    safetensors.torch.save_file(first, str(tmp_path / "te1.safetensors"))
    with pytest.raises(LoraError, match=r"match no layer of this model's U-Net or second text encoder"):
        build_engine(str(folder), tmp_path / "engine-te1", loras=[str(tmp_path / "te1.safetensors")],
                     progress=lambda line: None)
    assert not (tmp_path / "engine-te1").exists()


def test_embedding_through_the_hand_over_matches_diffusers(folders, tmp_path):
    """An SDXL embedding (clip_l, clip_g; two vectors) in the base folder and in the refiner folder
    (which takes the clip_g vectors into text_encoder_2), against diffusers' base with
    load_textual_inversion into both encoders handing over to its refiner with the clip_g vectors in
    text_encoder_2. A refiner folder without the embedding is refused before anything runs (it would
    read the name as words); a prompt without the name hands over to it as before."""
    import safetensors.torch

    from export.build import build_engine

    g = torch.Generator().manual_seed(19)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    safetensors.torch.save_file(vectors, str(tmp_path / "xl-style.safetensors"))
    token = "<xl-style>"
    embedding = [(str(tmp_path / "xl-style.safetensors"), token)]
    engines = {name: build_engine(str(folders[name][0]), tmp_path / name, embeddings=embedding,
                                  progress=lambda line: None) for name in ("base", "refiner")}
    assert load_manifest(engines["refiner"]).tokenizer["embeddings"] == {token: [token, f"{token}_1"]}
    base = _reference(folders["base"][0], "StableDiffusionXLPipeline", "euler")
    base.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=base.text_encoder_2,
                                tokenizer=base.tokenizer_2)
    base.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=base.text_encoder, tokenizer=base.tokenizer)
    refiner = _reference(folders["refiner"][0], "StableDiffusionXLImg2ImgPipeline", "euler")
    refiner.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=refiner.text_encoder_2,
                                   tokenizer=refiner.tokenizer_2)
    prompt = f"a lighthouse in the style of {token}"
    latents = np.random.default_rng(23).standard_normal((1, 4, 32, 32), dtype=np.float32)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0)
    handed = base(prompt, latents=torch.from_numpy(latents), denoising_end=SWITCH, output_type="latent", **kw).images
    want = refiner(prompt, image=handed, denoising_start=SWITCH, output_type="np", **kw).images
    ours_kw = dict(latents=latents, scheduler="euler", refiner_switch_at=SWITCH, output_type="np", progress=False, **kw)
    with runtime.load(engines["base"], backend="onnxruntime") as ours, \
            runtime.load(engines["refiner"], backend="onnxruntime") as ours_refiner, \
            runtime.load(folders["base"][1], backend="onnxruntime") as plain, \
            runtime.load(folders["refiner"][1], backend="onnxruntime") as plain_refiner:
        got = ours.txt2img(prompt, refiner=ours_refiner, **ours_kw).images
        words = plain.txt2img(prompt, refiner=plain_refiner, **ours_kw).images  # the name read as words
        with pytest.raises(PipelineError, match=f"embedding.*{token}.*refiner folder lacks") as e:
            ours.txt2img(prompt.upper(), refiner=plain_refiner, **ours_kw)
        assert e.value.field == "refiner"
        assert ours.txt2img(PROMPT, refiner=plain_refiner, **ours_kw).images.shape == got.shape
    assert_psnr(got, want, "sdxl base -> refiner with an SDXL embedding in both vs diffusers")
    assert psnr(words, want) < PARITY_PSNR_DB - 20
    from runtime.serving.models import Models
    from test_serve_support import LiveServer

    # A1111's refiner_checkpoint: refused from the refiner's manifest before the checkpoint runs
    server = LiveServer(Models.from_folders([engines["base"], folders["refiner"][1]],
                                            lambda f: runtime.load(f, backend="onnxruntime"), max_resident=1))
    try:
        body = dict(prompt=prompt, seed=7, steps=STEPS, cfg_scale=5.0, width=64, height=64, sampler_name="Euler",
                    refiner_checkpoint="refiner-engine", refiner_switch_at=SWITCH)
        bad = server.post("/sdapi/v1/txt2img", body)
        assert bad.status_code == 422 and bad.json()["detail"].startswith(
            f"refiner_checkpoint: refiner refiner-engine: the prompts use the embedding(s) {token}"), bad.text
        assert server.post("/sdapi/v1/txt2img", {**body, "prompt": PROMPT}).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- int8 weights

@pytest.mark.parametrize("name,networks", [("base", {"unet", "text_encoder", "text_encoder_2"}),
                                           ("refiner", {"unet", "text_encoder_2"}),
                                           ("base-lean", {"unet", "text_encoder", "text_encoder_2"})])
def test_int8_weights_compress_every_text_encoder(folders, tmp_path, monkeypatch, name, networks):
    """`build-engine --quantize int8-weights` on the SDXL folders: the U-Net and each text encoder the
    folder has (the base's two, the refiner's text_encoder_2) get int8-weight IRs of about a quarter
    of their fp32 weights, each checked against its fp32 graph on the feeds a held-out run gave it;
    the OpenVINO engine runs them, and the image stays close to the fp32 graphs' (close, not equal:
    the weights really are int8). "base-lean": every graph exported lean, as the full-size SDXL U-Net
    is (export/onnx_export.py LEAN_EXPORT_BYTES: each Linear's weight reaches its MatMul through a
    Transpose), built with --quantize in one go."""
    import shutil

    pytest.importorskip("nncf", reason="int8 weights need sd-runtime[quantize] (nncf)")
    from export import onnx_export
    from export.build import build_engine
    from export.hashing import file_sha256

    source, engine = folders[name.removesuffix("-lean")]
    if name.endswith("-lean"):
        monkeypatch.setattr(onnx_export, "LEAN_EXPORT_BYTES", 0)
        folder = build_engine(str(source), tmp_path / "engine", quantize="int8-weights", progress=lambda line: None)
    else:
        folder = shutil.copytree(engine, tmp_path / "engine")
        assert build_engine(str(source), folder, quantize="int8-weights", progress=lambda line: None) == folder
    manifest = load_manifest(folder)
    entry = manifest.weights_int8
    assert set(entry["networks"]) == networks and manifest.quantization == "int8-weights"
    for network, net in entry["networks"].items():
        assert file_sha256(folder / net["weights"]) == net["weights_sha256"]
        assert 0 < net["rms_rel"] <= 0.05, (network, net["rms_rel"])
        graph = manifest.networks[network]
        fp32 = sum((folder / f).stat().st_size for f in (graph["file"], graph.get("external_data")) if f)
        # int8 weights plus per-channel scales and zero points: a bit over a quarter of fp32
        assert (folder / net["weights"]).stat().st_size < 0.4 * fp32, (network, fp32)
    if name.endswith("-lean"):
        assert manifest.networks["unet"]["external_data"] == "unet.onnx.data"
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np", progress=False)
    latents = np.random.default_rng(2).standard_normal((1, 4, 32, 32), dtype=np.float32)
    images = []
    for quantized in (None, False):
        with runtime.load(folder, backend="openvino", inference_precision="f32", quantized=quantized) as pipe:
            assert {n: pipe.engine(n).info.weights for n in networks} == \
                {n: "fp32" if quantized is False else "int8" for n in networks}
            if name == "base":
                images.append(pipe.txt2img(PROMPT, latents=latents, **kw).images)
            else:
                images.append(pipe.img2img(PROMPT, _image(64, 64), strength=0.6, seed=4, **kw).images)
    value = psnr(images[0], images[1])
    assert 30 < value < 100, value
