"""LCM-LoRA (issue 25): `build-engine SRC --lora lcm_lora.safetensors` (with the recommended settings
recorded by `--default-sampler lcm --default-steps 4 --default-guidance 1`), then the lcm sampler at
guidance 1-2, against diffusers' own recipe: StableDiffusionPipeline + `load_lora_weights` +
`LCMScheduler.from_config(pipe.scheduler.config)`.

The LoRA is made here with PEFT on the tiny SD 1.x U-Net (random non-zero lora_B, as tests/test_lora.py
does; U-Net only, as lcm-lora-sdv1-5 is) and saved by diffusers' `save_lora_weights`. One LCM step
returns the model's denoised estimate (no noise is drawn), so it is compared with diffusers at fp32
on ONNX Runtime: >= 90 dB PSNR (psnr_bounds.PARITY_PSNR_DB) at guidance 1 (no guidance batch on
either side) and 1.5 (a guidance batch on both). Later LCM steps add noise from each side's own
generator, so 4 steps are checked to run with the folder's defaults, finite and unlike 1 step.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.folder.manifest import load_manifest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


def _pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lcm_lora(tmp_path_factory):
    """(diffusers folder, the LoRA file, the engine folder built with it and the LCM settings)."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("lcm-lora")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "diffusers")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    unet = peft.inject_adapter_in_model(config, copy.deepcopy(_pipe(folder).unet))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    lora = root / "lcm_lora.safetensors"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root, unet_lora_layers=peft.get_peft_model_state_dict(unet), weight_name=lora.name,
        unet_lora_adapter_metadata=config.to_dict())
    engine = build_engine(str(folder), root / "engine", loras=[str(lora)], default_sampler="lcm", default_steps=4,
                          default_guidance=1.0, progress=lambda line: None)
    return folder, lora, engine


def test_folder_records_the_lcm_settings(lcm_lora):
    _, _, engine = lcm_lora
    m = load_manifest(engine)
    assert m.defaults == {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0}
    assert m.scheduler["_class_name"] == "PNDMScheduler"  # the source's: it does not say LCM itself
    assert [r["scale"] for r in m.source["loras"]] == [1.0]


def test_one_step_matches_diffusers_lcm_lora(lcm_lora):
    folder, lora, engine = lcm_lora
    ref_pipe = _pipe(folder)
    ref_pipe.load_lora_weights(str(lora))
    ref_pipe.scheduler = diffusers.LCMScheduler.from_config(ref_pipe.scheduler.config)
    plain_pipe = _pipe(folder)  # the same model without the LoRA
    plain_pipe.scheduler = diffusers.LCMScheduler.from_config(plain_pipe.scheduler.config)
    images = {}
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(6).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        for scale in (1.0, 1.5):
            kw = dict(num_inference_steps=1, guidance_scale=scale, output_type="np")
            got = ours.txt2img(PROMPT, latents=latents, progress=False, **kw)
            ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
            value = psnr(got.images, ref)
            log.info("PSNR LCM-LoRA 1 step guidance %.1f vs diffusers: %.1f dB", scale, value)
            assert got.parameters["scheduler"] == "lcm" and value >= PARITY_PSNR_DB, f"{value:.1f} dB"
            without = plain_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
            assert psnr(without, ref) < PARITY_PSNR_DB - 30  # the LoRA is what the image shows
            images[scale] = got.images
    assert psnr(images[1.0], images[1.5]) < PARITY_PSNR_DB - 30


def test_four_steps_with_the_folder_defaults(lcm_lora):
    _, _, engine = lcm_lora
    with runtime.load(engine, backend="onnxruntime") as ours:
        got = ours.txt2img(PROMPT, seed=3, output_type="np", progress=False)
        one = ours.txt2img(PROMPT, seed=3, num_inference_steps=1, output_type="np", progress=False)
    p = got.parameters
    assert (p["scheduler"], p["steps"], p["guidance_scale"]) == ("lcm", 4, 1.0)
    assert np.isfinite(got.images).all() and got.images.std() > 0.01
    assert psnr(got.images, one.images) < PARITY_PSNR_DB - 30
    assert json.dumps(p)  # the parameters stay serializable (PNG info)
