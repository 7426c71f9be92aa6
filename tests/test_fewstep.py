"""Few-step models (issue 25): the TCD sampler end to end, and LCM-distilled U-Nets.

References are diffusers' own: StableDiffusionPipeline with TCDScheduler, and
LatentConsistencyModelPipeline over a U-Net that diffusers itself makes
(`UNet2DConditionModel(..., time_cond_proj_dim=...)` at the sizes of export/configs.py's tiny
preset, random weights), saved with the tiny VAE and text encoder as a diffusers folder and built
into an engine folder by `export.build.build_engine` (whose own export check compares the U-Net
graph, `timestep_cond` included, against our PyTorch reference). Images are compared at fp32 on
ONNX Runtime and OpenVINO (f32 inference precision) by PSNR over [0, 1] images: >= 90 dB, the bound
tests/test_pipeline_parity.py explains (a wrong sampler already fails it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB, assert_psnr
from runtime.compare import psnr
from runtime.families import SD_LCM, family_of, guidance_embedding
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import network_io

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
COND_DIM = 32  # the tiny LCM U-Net's time_cond_proj_dim (LCM-distilled SD 1.5: 256)
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]


def _load(folder: Path, cls: str):
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe: runtime.Pipeline, seed: int) -> np.ndarray:
    h, w = pipe.default_size
    s = pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, 4, h // s, w // s), dtype=np.float32)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory) -> Path:
    """The diffusers folder of random_model("tiny-sd1", seed=0): the weights of conftest's tiny_sd1_engine."""
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    return save_diffusers(random_model("tiny-sd1", seed=0), tmp_path_factory.mktemp("fewstep") / "tiny-sd1")


# ---------------------------------------------------------------------------------------------- TCD

@pytest.mark.parametrize("backend,options", BACKENDS)
def test_tcd_txt2img_matches_diffusers(sd1_folder, tiny_sd1_engine, backend, options):
    """TCD at 4 steps, eta (gamma) 0, guidance 7.5: StableDiffusionPipeline + TCDScheduler (configured
    from the folder's scheduler config; the pipeline hands its eta to TCDScheduler.step)."""
    ref_pipe = _load(sd1_folder, "StableDiffusionPipeline")
    config = json.loads((sd1_folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.TCDScheduler.from_config(config)
    with runtime.load(tiny_sd1_engine, backend=backend, **options) as ours:
        latents = _latents(ours, 5)
        h, w = ours.default_size
        ref = ref_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, eta=0.0,
                       latents=torch.from_numpy(latents), output_type="np", height=h, width=w).images
        got = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                           scheduler="tcd", eta=0.0, latents=latents, output_type="np", progress=False)
        assert_psnr(got.images, ref, f"tcd txt2img vs diffusers on {backend}")
        assert got.parameters["scheduler"] == "tcd"
        # eta is TCD's gamma: 0.3 re-noises between steps, a different image
        noisy = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                             scheduler="tcd", eta=0.3, latents=latents, output_type="np", progress=False).images
        assert np.isfinite(noisy).all() and psnr(noisy, got.images) < PARITY_PSNR_DB


def test_tcd_eta_is_checked_by_the_record(tiny_sd1_engine):
    """eta is validated by the sampler's record (Sampler.eta_max): tcd takes [0, 1], euler none."""
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        with pytest.raises(runtime.PipelineError, match=r"eta for 'tcd' must be in \[0, 1\]; got 1.5") as e:
            pipe.request("txt2img", PROMPT, scheduler="tcd", eta=1.5)
        assert e.value.field == "eta"
        with pytest.raises(runtime.PipelineError, match=r"eta applies to ddim, tcd \(at most 1\) only") as e:
            pipe.request("txt2img", PROMPT, scheduler="euler", eta=0.3)
        assert e.value.field == "eta"
        assert pipe.request("txt2img", PROMPT, scheduler="ddim", eta=2.0).eta == 2.0


def test_tcd_folder_defaults_to_tcd():
    from runtime.scheduler import default_sampler

    assert default_sampler({"_class_name": "TCDScheduler"}) == "tcd"
    assert default_sampler({"_class_name": "LCMScheduler"}) == "lcm"


# ---------------------------------------------------------------------------------------------- LCM

@pytest.fixture(scope="module")
def lcm_model(sd1_folder, tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, engine folder) of a tiny LCM-distilled model: diffusers' own U-Net with a
    guidance embedding, the tiny VAE and text encoder, LCMScheduler, LatentConsistencyModelPipeline."""
    from export.build import build_engine
    from export.configs import preset

    sd = _load(sd1_folder, "StableDiffusionPipeline")
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel.from_config({**preset("tiny-sd1").unet.to_dict(),
                                                       "time_cond_proj_dim": COND_DIM})
    with torch.no_grad():  # wider than nn.Linear's default init, so the guidance embedding moves the image clearly
        unet.time_embedding.cond_proj.weight.normal_(0.0, 0.5)
    lcm = diffusers.LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
        scheduler=diffusers.LCMScheduler.from_config(sd.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    root = tmp_path_factory.mktemp("lcm")
    lcm.save_pretrained(str(root / "diffusers"))
    engine = build_engine(str(root / "diffusers"), root / "engine", progress=lambda line: None)
    return root / "diffusers", engine


def test_lcm_folder_manifest_and_contract(lcm_model):
    folder, engine = lcm_model
    m = load_manifest(engine)
    assert m.family == "sd1-lcm" and family_of(m.family) is SD_LCM
    assert m.dims.time_cond_proj_dim == COND_DIM
    assert json.loads((engine / "manifest.json").read_text())["dims"]["time_cond_proj_dim"] == COND_DIM
    names = [t.name for t in network_io("unet", m.dims)[0]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    # the build's own check of the U-Net graph against the PyTorch reference, timestep_cond fed
    parity = m.networks["unet"]["parity"]
    assert parity["rel"] <= parity["threshold"]
    with runtime.load(engine, backend="onnxruntime") as pipe:
        assert pipe.default_scheduler == "lcm"  # from its LCMScheduler config
        r = pipe.request("txt2img", PROMPT, negative_prompt=NEGATIVE, guidance_scale=8.0, num_inference_steps=1)
        assert not r.guided and r.tokens.uncond is None  # no guidance batch: the negative prompt is not encoded
        with pytest.raises(runtime.PipelineError, match="guidance_rescale") as e:
            pipe.request("txt2img", PROMPT, guidance_rescale=0.5)
        assert e.value.field == "guidance_rescale"


def test_manifest_family_and_guidance_embedding_agree(lcm_model):
    from runtime.errors import ManifestError
    from runtime.folder.manifest import Manifest

    _, engine = lcm_model
    d = json.loads((engine / "manifest.json").read_text())
    with pytest.raises(ManifestError, match=r"family 'sd1' with dims.time_cond_proj_dim 32"):
        Manifest.from_dict(dict(d, family="sd1"))
    dims = {k: v for k, v in d["dims"].items() if k != "time_cond_proj_dim"}
    with pytest.raises(ManifestError, match=r"family 'sd1-lcm' with dims.time_cond_proj_dim 0"):
        Manifest.from_dict(dict(d, dims=dims))


def test_reference_unet_matches_diffusers_with_timestep_cond(lcm_model):
    """Our PyTorch reference, loaded from the folder (strict keys: time_embedding.cond_proj.weight),
    against diffusers' U-Net on the same inputs."""
    from export.loading.read import load_model

    folder, _ = lcm_model
    ours = load_model(str(folder)).unet.eval()
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999.0, 259.0])
    cond = torch.from_numpy(guidance_embedding(np.array([7.0, 2.0], np.float32), COND_DIM))
    with torch.no_grad():
        want = ref(x, t, ctx, timestep_cond=cond).sample
        got = ours(x, t, ctx, cond)
        plain = ref(x, t, ctx).sample  # diffusers without the embedding: what a dropped input would give
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, err
    assert (plain - want).abs().max() / want.abs().max() > 1e-3


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_lcm_one_step_matches_diffusers(lcm_model, backend, options):
    """1 LCM step at guidance 8 and 3 against LatentConsistencyModelPipeline (which embeds w = scale - 1
    and runs no unconditional batch); the two guidances give different images."""
    folder, engine = lcm_model
    ref_pipe = _load(folder, "LatentConsistencyModelPipeline")
    images = {}
    with runtime.load(engine, backend=backend, **options) as ours:
        latents = _latents(ours, 7)
        h, w = ours.default_size
        for scale in (8.0, 3.0):
            ref = ref_pipe(PROMPT, num_inference_steps=1, guidance_scale=scale, latents=torch.from_numpy(latents),
                           output_type="np", height=h, width=w).images
            got = ours.txt2img(PROMPT, num_inference_steps=1, guidance_scale=scale, latents=latents,
                               output_type="np", progress=False)
            assert got.parameters["scheduler"] == "lcm"
            assert_psnr(got.images, ref, f"lcm 1 step guidance {scale} vs diffusers on {backend}")
            images[scale] = got.images
    gap = psnr(images[8.0], images[3.0])
    log.info("PSNR guidance 8 vs 3: %.1f dB", gap)
    assert gap < PARITY_PSNR_DB - 30, f"guidance 8 and 3 give nearly the same image ({gap:.1f} dB)"


def test_lcm_four_steps_run_and_are_finite(lcm_model):
    _, engine = lcm_model
    with runtime.load(engine, backend="onnxruntime") as pipe:
        calls = []
        out = pipe.txt2img(PROMPT, num_inference_steps=4, guidance_scale=8.0, seed=3, output_type="np",
                           progress=False, callback=lambda i, t, x: calls.append((i, t, x.shape[0])))
    assert np.isfinite(out.images).all() and out.images.std() > 0
    assert [c[1] for c in calls] == [999.0, 759.0, 499.0, 259.0]  # LCMScheduler's 4 of 50 skeleton steps
    assert all(c[2] == 1 for c in calls)  # one image's latents, one U-Net batch per step


def test_guidance_embedding_matches_diffusers():
    """diffusers' float32 recipe rounds arguments of thousands of radians: agreement to 1e-3."""
    for dim in (32, 33, 256):
        w = torch.tensor([7.0, 2.0, 0.0])
        ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).numpy()
        got = guidance_embedding(w.numpy(), dim)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------- img2img, few steps

def _init_image(h: int, w: int):
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return Image.fromarray((np.stack([yy, xx, 0.5 * (yy + xx)], -1) * 255).astype(np.uint8))


def test_lcm_img2img_strength_picks_within_the_skeleton(lcm_model):
    """An LCM-distilled folder's img2img runs all its steps inside the strength's part of the skeleton,
    as LatentConsistencyModelImg2ImgPipeline does (LCMScheduler.set_timesteps(n, strength=)): 4 steps at
    strength 0.5 are 499, 379, 259, 139 (StableDiffusionImg2ImgPipeline's slicing would run 499, 259);
    1 step at strength 0.5 (deterministic: the denoised estimate) equals diffusers' image; 4 steps run,
    finite."""
    folder, engine = lcm_model
    ref_pipe = _load(folder, "LatentConsistencyModelImg2ImgPipeline")
    sched = diffusers.LCMScheduler.from_config(ref_pipe.scheduler.config)
    sched.set_timesteps(4, strength=0.5)
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        image = _init_image(h, w)
        r = ours.request("img2img", PROMPT, image=image, strength=0.5, num_inference_steps=4, guidance_scale=8.0)
        assert list(r.schedule.timesteps) == [float(t) for t in sched.timesteps] == [499.0, 379.0, 259.0, 139.0]
        g = torch.Generator().manual_seed(21)  # diffusers' order: the VAE's sample first, then the noise
        encode_noise = torch.randn((1, 4, h // s, w // s), generator=g).numpy()
        noise = torch.randn((1, 4, h // s, w // s), generator=g).numpy()
        got = ours.img2img(PROMPT, image, strength=0.5, num_inference_steps=1, guidance_scale=8.0, noise=noise,
                           encode_noise=encode_noise, output_type="np", progress=False).images
        four = ours.img2img(PROMPT, image, strength=0.5, num_inference_steps=4, guidance_scale=8.0, seed=2,
                            output_type="np", progress=False).images
    ref = ref_pipe(PROMPT, image=image, strength=0.5, num_inference_steps=1, guidance_scale=8.0,
                   generator=torch.Generator().manual_seed(21), output_type="np").images
    assert_psnr(got, ref, "lcm img2img 1 step strength 0.5 vs LatentConsistencyModelImg2ImgPipeline")
    assert np.isfinite(four).all() and four.std() > 0.01
