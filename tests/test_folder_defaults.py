"""A folder's recommended steps, guidance and sampler (issue 25; runtime/sampling/defaults.py): read
from the scheduler config at build (LCMScheduler; trailing-spacing Euler, as SD-Turbo ships), or set
with `build-engine --default-*`, recorded in the manifest's "defaults" and used by the Python API, the
CLI and the servers where the caller gives none. Explicit values always win.

The Turbo-style folder's image with its defaults is compared with diffusers' StableDiffusionPipeline
with EulerDiscreteScheduler(timestep_spacing="trailing") at 1 step, guidance 0 (the SD-Turbo model
card's call), >= 90 dB PSNR (psnr_bounds.PARITY_PSNR_DB).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.folder.manifest import Manifest, ManifestError, load_manifest
from runtime.request import Limits
from runtime.sampling.defaults import LCM_DEFAULTS, LCM_LORA_DEFAULTS, check_defaults, recommended
from runtime.scheduler import SchedulerError

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"


def test_recommended_from_scheduler_configs():
    assert recommended({"_class_name": "LCMScheduler"}, embeds_guidance=True) == LCM_DEFAULTS
    assert LCM_DEFAULTS == {"sampler": "lcm", "steps": 4, "guidance_scale": 8.5}
    assert recommended({"_class_name": "LCMScheduler"}) == LCM_LORA_DEFAULTS
    assert LCM_LORA_DEFAULTS["guidance_scale"] == 1.0
    trailing = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    assert recommended(trailing) == {"sampler": "euler", "steps": 1, "guidance_scale": 0.0}
    assert recommended({**trailing, "_class_name": "EulerAncestralDiscreteScheduler"})["sampler"] == "euler_a"
    assert recommended({**trailing, "timestep_spacing": "leading"}) == {}
    assert recommended({"_class_name": "PNDMScheduler", "timestep_spacing": "trailing"}) == {}


@pytest.mark.parametrize("value, message", [
    ({"steps": 0}, "defaults.steps"), ({"steps": True}, "defaults.steps"),
    ({"guidance_scale": -1}, "defaults.guidance_scale"), ({"guidance_scale": float("nan")}, "defaults.guidance_scale"),
    ({"sampler": "Euler a"}, "defaults.sampler"), ({"cfg": 2}, "unknown defaults keys"), ([], "must be an object"),
])
def test_defaults_are_checked(value, message):
    with pytest.raises(SchedulerError, match=message):
        check_defaults(value)


@pytest.fixture(scope="module")
def turbo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(diffusers folder with trailing Euler, its engine folder, the engine folder of the same model
    built with --default-steps 2 --default-sampler euler_a)."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("turbo")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "diffusers")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    engine = build_engine(str(folder), root / "engine", progress=lambda line: None)
    flagged = build_engine(str(folder), root / "flagged", default_steps=2, default_sampler="euler_a",
                           progress=lambda line: None)
    return folder, engine, flagged


def test_manifest_records_the_defaults(turbo, tiny_sd1_engine):
    _, engine, flagged = turbo
    assert load_manifest(engine).defaults == {"sampler": "euler", "steps": 1, "guidance_scale": 0.0}
    # the flags win over the config's; the guidance not given stays the config's
    assert load_manifest(flagged).defaults == {"sampler": "euler_a", "steps": 2, "guidance_scale": 0.0}
    plain = load_manifest(tiny_sd1_engine)
    assert plain.defaults == {} and "defaults" not in plain.to_dict()
    with pytest.raises(ManifestError, match="defaults.steps"):
        Manifest.from_dict({**plain.to_dict(), "defaults": {"steps": 0}})


def test_build_refuses_bad_defaults(tmp_path):
    from export.build import BuildError, build_engine

    with pytest.raises(BuildError, match="defaults.sampler"):
        build_engine("tiny-sd1", tmp_path / "x", default_sampler="nope", progress=lambda line: None)


def test_python_api_uses_the_folder_defaults(turbo):
    """No steps / guidance / sampler: the folder's; explicit values win."""
    _, engine, flagged = turbo
    with runtime.load(engine, backend="onnxruntime") as pipe:
        r = pipe.request("txt2img", PROMPT, seed=1)
        assert (r.steps, r.guidance_scale, r.sampler, r.guided) == (1, 0.0, "euler", False)
        r = pipe.request("txt2img", PROMPT, seed=1, num_inference_steps=3, guidance_scale=5.0, scheduler="ddim")
        assert (r.steps, r.guidance_scale, r.sampler) == (3, 5.0, "ddim")
    with runtime.load(flagged, backend="onnxruntime") as pipe:
        r = pipe.request("txt2img", PROMPT, seed=1)
        assert (r.steps, r.guidance_scale, r.sampler) == (2, 0.0, "euler_a")


def test_turbo_defaults_match_diffusers(turbo):
    """The folder's own defaults give diffusers' 1-step, guidance-0 trailing-Euler image."""
    import torch
    diffusers = pytest.importorskip("diffusers")

    folder, engine, _ = turbo
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    assert type(ref_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert ref_pipe.scheduler.config.timestep_spacing == "trailing"
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(3).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        got = ours.txt2img(PROMPT, latents=latents, output_type="np", progress=False)
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, num_inference_steps=1,
                   guidance_scale=0.0, output_type="np").images
    value = psnr(got.images, ref)
    log.info("PSNR turbo-style folder defaults (1 step, guidance 0) vs diffusers: %.1f dB", value)
    assert value >= PARITY_PSNR_DB, f"{value:.1f} dB"
    assert got.parameters["steps"] == 1 and got.parameters["guidance_scale"] == 0.0


def test_cli_uses_the_folder_defaults(turbo, tmp_path, capsys):
    """`sd-generate FOLDER "prompt"`: the folder's 1 step; --steps wins."""
    from runtime.cli import main

    _, engine, _ = turbo
    assert main([str(engine), PROMPT, "--seed", "1", "--no-progress", "-o", str(tmp_path / "a.png")]) == 0
    assert "euler, 1 steps" in capsys.readouterr().out
    assert main([str(engine), PROMPT, "--seed", "1", "--steps", "2", "--no-progress",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert "euler, 2 steps" in capsys.readouterr().out


LIMITS = Limits(min_image=32, max_image=128, max_batch=4, vae_scale_factor=2, latent_channels=4,
                default_size=(64, 64), inpainting_unet=False, default_sampler="lcm",
                samplers=("euler", "euler_a", "lcm"), default_steps=4, default_guidance=1.0)


def test_wire_formats_use_the_folder_defaults():
    """A1111: steps, cfg_scale and sampler the client leaves out are the folder's (A1111's 50, 7.0,
    "Euler" for folders that recommend nothing); OpenAI's sd_runtime likewise."""
    from dataclasses import replace

    from runtime.serving import a1111, openai

    def first(limits, **body):
        return a1111.job_settings(a1111.Txt2ImgRequest(prompt="a cat", seed=1, **body), limits, max_steps=50,
                                  max_n_iter=4)[1][0]

    job = first(LIMITS)
    assert (job["num_inference_steps"], job["guidance_scale"], job["scheduler"]) == (4, 1.0, "lcm")
    job = first(LIMITS, steps=6, cfg_scale=2.0, sampler_name="Euler")
    assert (job["num_inference_steps"], job["guidance_scale"], job["scheduler"]) == (6, 2.0, "euler")
    assert first(LIMITS, sampler_index="Euler a")["scheduler"] == "euler_a"
    plain = replace(LIMITS, default_steps=None, default_guidance=None, default_sampler="euler")
    job = first(plain)
    assert (job["num_inference_steps"], job["guidance_scale"], job["scheduler"]) == (50, 7.0, "euler")
    job = openai.job_settings(openai.GenerationsRequest(prompt="a cat"), LIMITS, 50)[0]
    assert (job["num_inference_steps"], job["guidance_scale"], job["scheduler"]) == (4, 1.0, None)
    job = openai.job_settings(openai.GenerationsRequest(prompt="a cat", sd_runtime={"steps": 8}), LIMITS, 50)[0]
    assert (job["num_inference_steps"], job["guidance_scale"]) == (8, 1.0)
    job = openai.job_settings(openai.GenerationsRequest(prompt="a cat"), plain, 50)[0]
    assert (job["num_inference_steps"], job["guidance_scale"]) == (30, 7.5)


def _init_image(h: int, w: int):
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return Image.fromarray((np.stack([yy, xx, 0.5 * (yy + xx)], -1) * 255).astype(np.uint8))


def _img2img_draws(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(encode_noise, noise) as StableDiffusionImg2ImgPipeline draws them from one torch generator:
    the VAE's latent_dist.sample first, then the noise add_noise takes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).numpy(), torch.randn(shape, generator=g).numpy()


def test_turbo_img2img_two_steps_half_strength_is_one_step(turbo):
    """Turbo-style img2img, 2 steps at strength 0.5: one Euler step from timestep 499 (trailing), as
    diffusers' StableDiffusionImg2ImgPipeline runs it (get_timesteps keeps int(2 * 0.5) = 1 step)."""
    import torch
    diffusers = pytest.importorskip("diffusers")

    folder, engine, _ = turbo
    sd = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    ref_pipe.set_progress_bar_config(disable=True)
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        image = _init_image(h, w)
        encode_noise, noise = _img2img_draws((1, 4, h // s, w // s), 21)
        r = ours.request("img2img", PROMPT, image=image, strength=0.5, num_inference_steps=2)
        assert list(r.schedule.timesteps) == [499.0] and r.guidance_scale == 0.0
        got = ours.img2img(PROMPT, image, strength=0.5, num_inference_steps=2, noise=noise, encode_noise=encode_noise,
                           output_type="np", progress=False).images
    ref = ref_pipe(PROMPT, image=image, strength=0.5, num_inference_steps=2, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(21), output_type="np").images
    value = psnr(got, ref)
    log.info("PSNR turbo img2img 2 steps strength 0.5 vs diffusers: %.1f dB", value)
    assert value >= PARITY_PSNR_DB, f"{value:.1f} dB"
