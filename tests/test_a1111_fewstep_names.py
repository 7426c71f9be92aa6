"""A1111 sampler names people send for few-step models (issue 25): "LCM", "TCD", and "Euler a" / "Euler"
with the schedule type "SGM Uniform" (A1111 modules/sd_schedulers.py `sgm_uniform`), which runs our
sampler with timestep_spacing "trailing" (diffusers' scheduler overview maps sgm_uniform to it;
runtime/sampling/names.py SPACING_SCHEDULES). Checked against diffusers' schedulers configured with
that spacing: the schedule's timesteps and sigmas, and the Euler image (>= 90 dB PSNR, fp32 ORT).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.request import Limits
from runtime.sampling import names

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"


@pytest.mark.parametrize("name, schedule, want", [
    ("LCM", None, ("lcm", False, None)), ("TCD", "Automatic", ("tcd", False, None)),
    ("Euler a", "SGM Uniform", ("euler_a", False, "trailing")), ("Euler", "sgm_uniform", ("euler", False, "trailing")),
    ("Euler a SGM Uniform", None, ("euler_a", False, "trailing")), ("LCM", "SGM Uniform", ("lcm", False, "trailing")),
    ("DDIM", "SGM Uniform", ("ddim", False, None)),  # A1111's timestep samplers ignore the schedule
    ("Euler a", "Uniform", ("euler_a", False, None)), ("Euler a", "Turbo", ("euler_a", False, "trailing")),
    ("Euler", "turbo", ("euler", False, "trailing")), ("DPM++ 2M", "Karras", ("dpmpp_2m", True, None)),
])
def test_names(name, schedule, want):
    assert (*names.from_a1111(name, schedule), names.spacing_from_a1111(name, schedule)) == want


def test_unimplemented_schedules_still_refused():
    with pytest.raises(names.SamplerNameError, match="SGM Uniform"):
        names.from_a1111("Euler a", "Exponential")


def test_wire_sends_the_spacing():
    from runtime.serving import a1111

    limits = Limits(min_image=32, max_image=128, max_batch=4, vae_scale_factor=2, latent_channels=4,
                    default_size=(64, 64), inpainting_unet=False, default_sampler="pndm",
                    samplers=("euler", "euler_a", "lcm", "tcd"))
    job = a1111.job_settings(a1111.Txt2ImgRequest(prompt="a cat", steps=4, sampler_name="Euler a",
                                                   scheduler="SGM Uniform"), limits, max_steps=50, max_n_iter=4)[1][0]
    assert (job["scheduler"], job["timestep_spacing"]) == ("euler_a", "trailing")
    job = a1111.job_settings(a1111.Txt2ImgRequest(prompt="a cat", steps=4, sampler_name="Euler a"), limits,
                             max_steps=50, max_n_iter=4)[1][0]
    assert "timestep_spacing" not in job


@pytest.mark.parametrize("sampler, cls", [("euler_a", "EulerAncestralDiscreteScheduler"),
                                          ("euler", "EulerDiscreteScheduler")])
@pytest.mark.parametrize("steps", [1, 4])
def test_schedule_matches_diffusers_trailing(tiny_sd1_engine, sampler, cls, steps):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        assert pipe.manifest.scheduler.get("timestep_spacing") != "trailing"
        r = pipe.request("txt2img", PROMPT, scheduler=sampler, num_inference_steps=steps, timestep_spacing="trailing")
        config = dict(pipe.manifest.scheduler)
    ref = getattr(diffusers, cls).from_config({**config, "timestep_spacing": "trailing"})
    ref.set_timesteps(steps)
    assert np.allclose(r.schedule.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-4)
    assert np.allclose(r.schedule.sigmas[:steps], ref.sigmas.numpy()[:steps], rtol=1e-5)
    assert r.parameters()["timestep_spacing"] == "trailing"


def test_euler_sgm_uniform_image_matches_diffusers(tiny_sd1_engine, tmp_path):
    """Euler with trailing spacing on a folder whose config says otherwise: diffusers'
    StableDiffusionPipeline with EulerDiscreteScheduler(timestep_spacing="trailing"), 4 steps."""
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    folder = save_diffusers(random_model("tiny-sd1", seed=0), tmp_path / "tiny-sd1")  # tiny_sd1_engine's weights
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config({**config, "timestep_spacing": "trailing"})
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np")
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(4).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        got = ours.txt2img(PROMPT, scheduler="euler", timestep_spacing="trailing", latents=latents, progress=False,
                           **kw).images
        leading = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
    value = psnr(got, ref)
    log.info("PSNR euler trailing (A1111 SGM Uniform) vs diffusers: %.1f dB", value)
    assert value >= PARITY_PSNR_DB, f"{value:.1f} dB"
    assert psnr(leading, ref) < value - 20  # the spacing is what changed


def test_png_info_round_trips_sgm_uniform():
    """Our infotext writes a request's trailing spacing as A1111's "Schedule type: SGM Uniform", and
    reading it back gives the sampler and the spacing (sd-generate --from-png, --timestep-spacing)."""
    from runtime.imaging import png_info

    params = {"prompt": "a cat", "negative_prompt": "", "steps": 4, "scheduler": "euler_a", "karras": False,
              "guidance_scale": 1.0, "seeds": [3], "width": 64, "height": 64, "timestep_spacing": "trailing"}
    text = png_info.infotext_from_parameters(params)
    assert "Sampler: Euler a, Schedule type: SGM Uniform" in text
    settings, _ = png_info.settings_from_fields(png_info.parse_infotext(text))
    assert (settings["scheduler"], settings["timestep_spacing"]) == ("euler_a", "trailing")
    plain = png_info.infotext_from_parameters({k: v for k, v in params.items() if k != "timestep_spacing"})
    assert "SGM Uniform" not in plain
    assert "timestep_spacing" not in png_info.settings_from_fields(png_info.parse_infotext(plain))[0]
