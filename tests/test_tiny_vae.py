"""The tiny autoencoder (TAESD: diffusers `AutoencoderTiny`) as a folder's VAE (issue 25).

The reference is diffusers' own: an `AutoencoderTiny` that diffusers makes (random weights, at a size
whose downsampling equals the tiny preset's VAE scale factor, 2), put into the tiny-sd1 diffusers
folder in place of its KL VAE with `StableDiffusionPipeline.save_pretrained`, then built into an
engine folder by `export.build.build_engine` (whose export check compares both TAESD graphs with
export/tiny_vae.py). Images are compared at fp32 on ONNX Runtime and OpenVINO (f32 inference
precision) by PSNR over [0, 1] images: >= 90 dB, the bound tests/test_pipeline_parity.py explains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr, rel_err
from runtime.folder.manifest import load_manifest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]
# Non-default latent constants: they must be read from the config (and, as in diffusers' pipelines,
# not applied by encode / decode).
TINY_VAE = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 2), latent_channels=4, latent_magnitude=2, latent_shift=0.4)


def _load(folder: Path, cls: str = "StableDiffusionPipeline"):
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def taesd_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(diffusers folder with an AutoencoderTiny, its engine folder, the same folder with the KL VAE)."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("taesd")
    kl_folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "kl")
    pipe = _load(kl_folder)
    torch.manual_seed(4)
    pipe.vae = diffusers.AutoencoderTiny(**TINY_VAE)
    pipe.register_modules(vae=pipe.vae)
    pipe.save_pretrained(str(root / "diffusers"))
    engine = build_engine(str(root / "diffusers"), root / "engine", progress=lambda line: None)
    return root / "diffusers", engine, kl_folder


def _latents(pipe: runtime.Pipeline, seed: int) -> np.ndarray:
    h, w = pipe.default_size
    s = pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, 4, h // s, w // s), dtype=np.float32)


def test_folder_config_and_reference(taesd_model):
    """The folder's vae/ is an AutoencoderTiny; its config is read (not assumed) and its weights load
    strictly into export/tiny_vae.py, which matches diffusers' encode / decode."""
    from export.loading.read import load_model
    from export.tiny_vae import AutoencoderTiny

    folder, _, _ = taesd_model
    assert json.loads((folder / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    model = load_model(folder)
    cfg = model.spec.vae
    assert isinstance(model.vae, AutoencoderTiny)
    assert (cfg.latent_magnitude, cfg.latent_shift, cfg.scaling_factor) == (2, 0.4, 1.0)
    assert cfg.num_decoder_blocks == (1, 2) and model.spec.vae_scale_factor == 2
    ref = _load(folder).vae
    image = torch.rand(2, 3, 16, 24) * 2 - 1
    latent = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        mean, std = model.vae.encode(image)
        assert rel_err(mean.numpy(), ref.encode(image).latents.numpy()) < 1e-6
        assert not std.any()
        assert rel_err(model.vae.decode(latent).numpy(), ref.decode(latent).sample.numpy()) < 1e-6


def test_manifest_records_the_tiny_vae(taesd_model, tiny_sd1_engine):
    _, engine, _ = taesd_model
    manifest = load_manifest(engine)
    assert manifest.scaling_factor == 1.0  # the AutoencoderTiny config's, not SD's 0.18215
    for name in ("vae_decoder", "vae_encoder"):
        entry = manifest.networks[name]
        assert entry["vae"] == "tiny"
        assert entry["parity"]["rel"] <= entry["parity"]["threshold"] == 1e-4
    assert "vae" not in load_manifest(tiny_sd1_engine).networks["vae_decoder"]  # KL folders unchanged


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_graphs_match_diffusers(taesd_model, backend, options):
    """Both TAESD graphs, through the engine, against diffusers' AutoencoderTiny at a shape the build
    did not check: decode(latent / scaling_factor) and the deterministic encode (std zeros)."""
    from runtime.engines import open_engines

    folder, engine, _ = taesd_model
    ref = _load(folder).vae
    rng = np.random.default_rng(2)
    latent = rng.standard_normal((3, 4, 10, 14), dtype=np.float32)
    image = rng.uniform(-1, 1, (3, 3, 20, 28)).astype(np.float32)
    _, engines = open_engines(engine, load_manifest(engine), backend, networks=("vae_decoder", "vae_encoder"), **options)
    try:
        got = engines["vae_decoder"].run({"latent": latent})["image"]
        enc = engines["vae_encoder"].run({"image": image})
    finally:
        for e in engines.values():
            e.close()
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(latent) / ref.config.scaling_factor).sample.numpy()
        want_latents = ref.encode(torch.from_numpy(image)).latents.numpy()
    assert rel_err(got, want) < 1e-4
    assert rel_err(enc["latent_mean"], want_latents) < 1e-4
    assert not enc["latent_std"].any()


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_txt2img_matches_diffusers(taesd_model, backend, options):
    """8 Euler steps, guidance 7.5, against StableDiffusionPipeline with the AutoencoderTiny; the
    same U-Net with the KL VAE gives a different image (the tiny VAE is the one decoding)."""
    folder, engine, kl_folder = taesd_model
    ref_pipe = _load(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, output_type="np")
    with runtime.load(engine, backend=backend, **options) as ours:
        latents = _latents(ours, 5)
        h, w = ours.default_size
        ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
        got = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    value = psnr(got, ref)
    log.info("PSNR taesd txt2img vs diffusers on %s: %.1f dB", backend, value)
    assert got.shape == ref.shape and value >= PARITY_PSNR_DB, f"{value:.1f} dB"
    assert got.std() > 0.01
    kl_pipe = _load(kl_folder)
    kl_pipe.scheduler = ref_pipe.scheduler
    kl = kl_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
    assert psnr(kl, ref) < PARITY_PSNR_DB - 40


def test_img2img_with_the_tiny_encoder(taesd_model):
    """img2img encodes with the TAESD encoder: finite, and equal to StableDiffusionImg2ImgPipeline,
    which draws only the noise from its generator (AutoencoderTiny's output has no distribution to
    sample: diffusers' `retrieve_latents` takes `.latents`)."""
    folder, engine, _ = taesd_model
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**_load(folder).components)
    ref_pipe.set_progress_bar_config(disable=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        image = Image.fromarray((np.stack([yy, xx, 0.5 * (yy + xx)], -1) * 255).astype(np.uint8))
        noise = torch.randn((1, 4, h // s, w // s), generator=torch.Generator().manual_seed(21)).numpy()
        got = ours.img2img(PROMPT, image, strength=0.6, num_inference_steps=8, guidance_scale=7.5, scheduler="euler",
                           noise=noise, encode_noise=np.ones_like(noise), output_type="np", progress=False).images
    ref = ref_pipe(PROMPT, image=image, strength=0.6, num_inference_steps=8, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(21), output_type="np").images
    assert np.isfinite(got).all() and got.std() > 0.01
    value = psnr(got, ref)
    log.info("PSNR taesd img2img vs diffusers: %.1f dB", value)
    assert value >= PARITY_PSNR_DB, f"{value:.1f} dB"


def test_config_is_checked():
    """What Stable Diffusion pipelines would not run as they are is refused, naming the key."""
    from export.tiny_vae import TinyVAEConfig

    base = diffusers.AutoencoderTiny(**TINY_VAE).config
    assert TinyVAEConfig.from_dict(dict(base)).vae_scale_factor == 2
    with pytest.raises(ValueError, match="shift_factor"):
        TinyVAEConfig.from_dict({**base, "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="encoder downsamples by 2 and the decoder upsamples by 4"):
        TinyVAEConfig.from_dict({**base, "upsampling_scaling_factor": 4})
    with pytest.raises(ValueError, match=r"unsupported AutoencoderTiny config keys \['extra'\]"):
        TinyVAEConfig.from_dict({**base, "extra": 1})


def test_single_file_save_is_refused(taesd_model):
    from export.loading.read import CheckpointError, load_model
    from export.loading.save import to_single_file_state_dict

    with pytest.raises(CheckpointError, match="AutoencoderTiny"):
        to_single_file_state_dict(load_model(taesd_model[0]))
