"""End-to-end parity on tiny random models (tier 2 of STYLE.md):

- one engine folder through the PyTorch reference engine and the ONNX Runtime engine, fp32:
  txt2img, img2img and inpainting agree to PSNR >= 60 dB;
- a tiny model that diffusers loads too (export.loading.save.save_diffusers of random_model, then
  export.build.build_engine from that folder) against diffusers' StableDiffusionPipeline for every
  deterministic sampler, and StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline with
  their random draws matched, at PSNR >= 60 dB;
- one seed, one backend: bit-identical images across runs.

PSNR is over float images in [0, 1] (output_type "np"): 10 log10(1 / MSE). 60 dB is an RMS error of
1e-3, a tenth of one 8-bit level. On these random tiny models 60 dB alone does not discriminate: two
different samplers (ddim vs euler, 4 steps) already agree to ~69 dB, because a random U-Net's noise
prediction moves the image little. fp32 parity measures 120-135 dB here, so every comparison must also
reach PARITY_PSNR_DB = 90 dB (tests/psnr_bounds.py), which a wrong sampler fails (test_threshold_tells_samplers_apart). The
measured values are logged (pytest -o log_cli=true --log-cli-level=INFO shows them).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from psnr_bounds import PARITY_PSNR_DB, assert_psnr
from runtime import scheduler as sch
from runtime.compare import psnr

log = logging.getLogger(__name__)

BACKEND_STEPS = 3  # the PyTorch engine is the slow side of backend comparisons
STEPS = 4
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth image (gradients + a disc), closer to a photo than uniform noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(y - h / 2, x - w / 3) < min(h, w) / 4
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y + seed) / 7.0)], axis=2)
    rgb[r] = [0.9, 0.2, 0.1]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def make_mask(h: int, w: int) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3: w - w // 8] = 255
    return Image.fromarray(m)


# ---------------------------------------------------------------------------------------- backends


def _pipes(engine_dir):
    return runtime.load(engine_dir, backend="torch"), runtime.load(engine_dir, backend="onnxruntime")


def test_torch_vs_onnxruntime_txt2img_img2img(tiny_sd1_engine):
    pt, ort = _pipes(tiny_sd1_engine)
    assert (pt.backend, ort.backend) == ("torch", "onnxruntime")
    h, w = pt.default_size
    common = dict(num_inference_steps=BACKEND_STEPS, output_type="np", progress=False, seed=7)
    for name, call in (
        ("txt2img", lambda p: p.txt2img(PROMPT, negative_prompt=NEGATIVE, **common)),
        ("img2img", lambda p: p.img2img(PROMPT, make_image(h, w), strength=0.7, **common)),
        ("inpaint 4-channel", lambda p: p.inpaint(PROMPT, make_image(h, w), make_mask(h, w), strength=0.9, **common)),
    ):
        a, b = call(pt), call(ort)
        assert a.backend == "torch" and b.backend == "onnxruntime"
        assert_psnr(a.images, b.images, f"torch vs onnxruntime, {name}")


def test_torch_vs_onnxruntime_inpaint(tiny_inpaint_engine):
    pt, ort = _pipes(tiny_inpaint_engine)
    h, w = pt.default_size
    for strength in (1.0, 0.75):
        args = (PROMPT, make_image(h, w), make_mask(h, w))
        kw = dict(strength=strength, num_inference_steps=BACKEND_STEPS, output_type="np", progress=False, seed=3)
        assert_psnr(pt.inpaint(*args, **kw).images, ort.inpaint(*args, **kw).images,
                    f"torch vs onnxruntime, inpaint 9-channel, strength {strength}")


def test_torch_vs_onnxruntime_sd2_long_prompt(tiny_sd2_engine):
    """SD 2.x: v-prediction, "!" padding, and a prompt over 77 tokens (two chunks)."""
    pt, ort = _pipes(tiny_sd2_engine)
    assert ort.tokenizer.pad_token == "!" and ort.tokenizer.pad_token_id == 0
    long_prompt = ", ".join(["a lighthouse on a cliff at dusk, dramatic clouds, oil on canvas"] * 7)
    kw = dict(negative_prompt="blurry", num_inference_steps=2, output_type="np", progress=False, seed=5)
    a, b = pt.txt2img(long_prompt, **kw), ort.txt2img(long_prompt, **kw)
    assert np.isfinite(b.images).all()
    assert_psnr(a.images, b.images, "torch vs onnxruntime, sd2 v-prediction, 2-chunk prompt")


def test_generation_imports_no_torch(tiny_sd1_engine):
    """The whole runtime path (best available backend, a full txt2img) runs without importing torch."""
    code = ("import sys, runtime\n"
            f"pipe = runtime.load({str(tiny_sd1_engine)!r})\n"
            "r = pipe.txt2img('a cat', num_inference_steps=2, progress=False)\n"
            "assert r.backend == pipe.backend != 'torch'\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_same_seed_bit_identical(tiny_sd1_engine):
    pipe = runtime.load(tiny_sd1_engine, backend="onnxruntime")
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=1234)
    a, b = pipe.txt2img(PROMPT, **kw), pipe.txt2img(PROMPT, **kw)
    assert a.seed == b.seed == 1234
    np.testing.assert_array_equal(a.images, b.images)
    c = pipe.txt2img(PROMPT, **{**kw, "seed": 1235})
    assert not np.array_equal(a.images, c.images)


def test_threshold_tells_samplers_apart(tiny_sd1_engine):
    pipe = runtime.load(tiny_sd1_engine, backend="onnxruntime")
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False, seed=3)
    ddim, euler = (pipe.txt2img(PROMPT, scheduler=s, **kw).images for s in ("ddim", "euler"))
    value = psnr(ddim, euler)
    log.info("PSNR ddim vs euler (must differ): %.1f dB", value)
    assert value < PARITY_PSNR_DB


# ---------------------------------------------------------------------------------------- diffusers

# our sampler -> (diffusers scheduler class, config overrides, karras). Every diffusers scheduler is
# configured from the model folder's own scheduler config (SD's: steps_offset 1, "leading" spacing,
# clip_sample False, set_alpha_to_one False), exactly what our make_schedule reads from the manifest,
# so no class falls back to its own defaults (DDIM's clip_sample=True, for one).
DIFFUSERS_SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, None),
    "pndm": ("PNDMScheduler", {}, None),
    "lms": ("LMSDiscreteScheduler", {}, None),
    "euler": ("EulerDiscreteScheduler", {}, None),
    "heun": ("HeunDiscreteScheduler", {}, None),
    "dpm2": ("KDPM2DiscreteScheduler", {}, None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, None),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, True),
    "unipc": ("UniPCMultistepScheduler", {}, None),
    "deis": ("DEISMultistepScheduler", {}, None),
}


def _our_sampler(name: str) -> tuple[str, bool | None]:
    """(sampler, karras) for runtime: `dpmpp_2m_karras` is its own name or dpmpp_2m + karras."""
    if name in sch.SAMPLERS:
        return name, DIFFUSERS_SAMPLERS[name][2]
    base = name.removesuffix("_karras")
    return base, True


DETERMINISTIC = [n for n in DIFFUSERS_SAMPLERS if n in sch.SAMPLERS or n.removesuffix("_karras") in sch.SAMPLERS]


@pytest.fixture(scope="module")
def diffusers_models(tmp_path_factory, tiny_inpaint_engine):
    """{preset: (diffusers folder, engine folder)}. tiny-sd1: save_diffusers(random_model), then
    build_engine from that diffusers folder (the path a user takes). tiny-inpaint: the session's
    engine folder of the preset, which build_engine made from the same random_model(preset, seed=0)
    weights (a mismatch would fail the comparison loudly); this saves a second build."""
    pytest.importorskip("diffusers")
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("diffusers-parity")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "tiny-sd1" / "diffusers")
    engine = build_engine(str(folder), root / "tiny-sd1" / "engine", progress=lambda line: None)
    inpaint = save_diffusers(random_model("tiny-inpaint", seed=0), root / "tiny-inpaint" / "diffusers")
    return {"tiny-sd1": (folder, engine), "tiny-inpaint": (inpaint, tiny_inpaint_engine)}


def _diffusers(folder, cls_name: str = "StableDiffusionPipeline"):
    import diffusers
    import torch

    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                               feature_extractor=None, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_scheduler(pipe, sampler: str, folder):
    """Give `pipe` the diffusers scheduler of `sampler`, configured from the model folder's
    scheduler_config.json (never from another scheduler's config, whose extra keys would carry over)."""
    import diffusers

    cls_name, overrides, _ = DIFFUSERS_SAMPLERS[sampler]
    base = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base, **overrides)
    return pipe


@pytest.fixture(scope="module")
def sd1_pair(diffusers_models):
    folder, engine = diffusers_models["tiny-sd1"]
    return _diffusers(folder), runtime.load(engine, backend="onnxruntime"), folder


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_txt2img_matches_diffusers(sd1_pair, sampler):
    import torch

    ref_pipe, ours, folder = sd1_pair
    _with_scheduler(ref_pipe, sampler, folder)
    h, w = ours.default_size
    latents = np.random.default_rng(11).standard_normal(
        (1, 4, h // ours.vae_scale_factor, w // ours.vae_scale_factor), dtype=np.float32)
    # the same initial noise into both: diffusers' `latents` is the unscaled noise, as ours
    ref = ref_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   latents=torch.from_numpy(latents), output_type="np", height=h, width=w).images
    name, karras = _our_sampler(sampler)
    got = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                       scheduler=name, karras=karras, latents=latents, output_type="np", progress=False).images
    assert_psnr(got, ref, f"txt2img vs diffusers, {sampler}")


def _torch_draws(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    """diffusers' draws from `torch.Generator().manual_seed(seed)` on CPU, in order: each
    `randn_tensor(shape, generator)` (and each VAE `latent_dist.sample(generator)`) is one
    `torch.randn(shape, generator=g)`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for _ in range(n)]


@pytest.mark.parametrize("sampler", [s for s in ("ddim", "euler", "dpmpp_2m") if s in DETERMINISTIC])
def test_img2img_matches_diffusers(sd1_pair, sampler):
    import diffusers
    import torch

    sd, ours, folder = sd1_pair
    ref_pipe = _with_scheduler(diffusers.StableDiffusionImg2ImgPipeline(**sd.components), sampler, folder)
    ref_pipe.set_progress_bar_config(disable=True)
    h, w = ours.default_size
    image, seed, strength = make_image(h, w), 21, 0.6
    # StableDiffusionImg2ImgPipeline draws from its generator (1) the VAE-encode sample noise,
    # (2) the noise added to the init latents. Reproduce both with the same torch seed and hand
    # them to ours explicitly (encode_noise, noise).
    enc, noise = _torch_draws(seed, (1, 4, h // ours.vae_scale_factor, w // ours.vae_scale_factor), 2)
    ref = ref_pipe(PROMPT, image=image, strength=strength, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed), output_type="np").images
    name, karras = _our_sampler(sampler)
    got = ours.img2img(PROMPT, image, strength=strength, num_inference_steps=STEPS, guidance_scale=7.5,
                       scheduler=name, karras=karras, noise=noise, encode_noise=enc, output_type="np",
                       progress=False).images
    assert_psnr(got, ref, f"img2img vs diffusers, {sampler}, strength {strength}")


@pytest.fixture(scope="module")
def inpaint_pair(diffusers_models):
    folder, engine = diffusers_models["tiny-inpaint"]
    return _diffusers(folder, "StableDiffusionInpaintPipeline"), runtime.load(engine, backend="onnxruntime"), folder


@pytest.mark.parametrize("unet_channels", [9, 4])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpaint_matches_diffusers(inpaint_pair, sd1_pair, unet_channels, strength):
    import diffusers
    import torch

    if unet_channels == 9:
        ref_pipe, ours, folder = inpaint_pair
    else:  # a plain SD U-Net in the inpainting pipeline: diffusers blends the known region per step
        sd, ours, folder = sd1_pair
        ref_pipe = diffusers.StableDiffusionInpaintPipeline(**sd.components)
        ref_pipe.set_progress_bar_config(disable=True)
    sampler = "ddim"
    _with_scheduler(ref_pipe, sampler, folder)
    h, w = ours.default_size
    image, mask, seed = make_image(h, w, 5), make_mask(h, w), 33
    shape = (1, 4, h // ours.vae_scale_factor, w // ours.vae_scale_factor)
    # StableDiffusionInpaintPipeline's generator draws: the init image's VAE-encode noise (only when
    # it needs the image latents: 4-channel U-Net, or strength < 1), the initial noise, then the
    # masked image's VAE-encode noise (always). Reproduce them with the same torch seed.
    needs_image_latents = unet_channels == 4 or strength < 1.0
    draws = _torch_draws(seed, shape, 3 if needs_image_latents else 2)
    enc = draws.pop(0) if needs_image_latents else None
    noise, masked_enc = draws
    ref = ref_pipe(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(seed), output_type="np",
                   height=h, width=w).images
    got = ours.inpaint(PROMPT, image, mask, strength=strength, num_inference_steps=STEPS, guidance_scale=7.5,
                       scheduler=sampler, noise=noise, encode_noise=enc, masked_encode_noise=masked_enc,
                       output_type="np", progress=False).images
    assert_psnr(got, ref, f"inpaint vs diffusers, {unet_channels}-channel U-Net, strength {strength}")
