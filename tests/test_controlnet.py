"""ControlNet (issue 27): export, loading and the runtime against diffusers 0.42.

References are diffusers' own: ControlNetModel.from_unet over the tiny SD 1.x U-Net (export/configs.py
"tiny-sd1", random weights) with its zero-initialised output convolutions (controlnet_down_blocks,
controlnet_mid_block, the conditioning embedding's conv_out) given random weights so that a wrong
ControlNet cannot pass; StableDiffusionControlNetPipeline, its Img2Img and Inpaint variants and
MultiControlNetModel. One engine folder per module (two ControlNets: "a" from a diffusers folder,
"b" from an A1111-style single file); images compared at fp32 on ONNX Runtime and OpenVINO (f32
inference precision) by PSNR over [0, 1] images (tests/psnr_bounds.py). The single-file key map
is checked against diffusers' own converter (`convert_controlnet_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image

import runtime
from psnr_bounds import assert_psnr
from runtime.compare import psnr

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
STEPS = 4
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]
TINY_EMBEDDING = (16, 32)  # the tiny VAE downsamples x2: a two-level control image embedding (diffusers' tests)
CONTROL_CHANGES_DB = 50.0  # with vs without a control image: well under this


def _randomize(cn, seed: int):
    """Give the zero-initialised convolutions random weights (else the residuals are all zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return cn.eval()


def _make_controlnet(unet, seed: int, embedding=TINY_EMBEDDING):
    torch.manual_seed(seed)
    return _randomize(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding), seed)


def control_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """An edge-map-like control image: white strokes on black."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y, :] = 255
        m[:, x] = 255
    return Image.fromarray(np.stack([m] * 3, axis=2))


def make_image(h: int, w: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def make_mask(h: int, w: int) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3: w - w // 8] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """The diffusers folder of tiny-sd1, two ControlNets (a: a diffusers folder; b: a single file of
    `control_model.*` keys) and the engine folder built with both."""
    from export.build import build_engine
    from export.controlnet import to_ldm
    from export.loading.read import random_model
    from export.loading.save import save_diffusers
    import safetensors.torch

    root = tmp_path_factory.mktemp("controlnet")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "tiny-sd1")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    a, b = _make_controlnet(unet, 1), _make_controlnet(unet, 2)
    a.save_pretrained(str(root / "cn_a"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in to_ldm(b.state_dict()).items()}, str(root / "b.safetensors"))
    engine = build_engine(folder, root / "engine", controlnets=[f"{root / 'cn_a'}:a", str(root / "b.safetensors")],
                          max_batch=2, progress=log.info)
    return {"folder": folder, "engine": engine, "a": a, "b": b, "root": root}


@pytest.fixture(scope="module")
def pipes(model):
    """The engine folder loaded once per backend (OpenVINO compiles each graph once)."""
    opened = {backend: runtime.load(model["engine"], backend=backend, **options) for backend, options in BACKENDS}
    yield opened
    for pipe in opened.values():
        pipe.close()


def _pipe(model: dict, cls: str, controlnet):
    pipe = getattr(diffusers, cls).from_pretrained(str(model["folder"]), controlnet=controlnet, safety_checker=None,
                                                   requires_safety_checker=False, feature_extractor=None,
                                                   local_files_only=True, dtype=torch.float32)
    config = json.loads((model["folder"] / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe: runtime.Pipeline, seed: int) -> np.ndarray:
    h, w = pipe.default_size
    s = pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, 4, h // s, w // s), dtype=np.float32)


# Each case: (our keyword arguments, diffusers' keyword arguments), ControlNets as names / models
TXT2IMG_CASES = {
    "scale 1.0": ({"controlnet": "a"}, {}),
    "scale 0.5": ({"controlnet": "a", "controlnet_conditioning_scale": 0.5}, {"controlnet_conditioning_scale": 0.5}),
    "guidance end 0.5": ({"controlnet": "a", "control_guidance_end": 0.5}, {"control_guidance_end": 0.5}),
    "guess mode": ({"controlnet": "a", "guess_mode": True, "guidance_scale": 5.0},
                   {"guess_mode": True, "guidance_scale": 5.0}),
    "guidance off": ({"controlnet": "b", "guidance_scale": 1.0}, {"guidance_scale": 1.0}),
    "guess mode, guidance off": ({"controlnet": "b", "guess_mode": True, "guidance_scale": 1.0},
                                 {"guess_mode": True, "guidance_scale": 1.0}),
}


@pytest.mark.parametrize("backend,options", BACKENDS)
@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_matches_diffusers(model, pipes, backend, options, case):
    ours_kw, ref_kw = TXT2IMG_CASES[case]
    net = model["a"] if ours_kw["controlnet"] == "a" else model["b"]
    ref_pipe = _pipe(model, "StableDiffusionControlNetPipeline", net)
    with nullcontext(pipes[backend]) as ours:
        h, w = ours.default_size
        latents, cimg = _latents(ours, 5), control_image(h, w)
        ref = ref_pipe(PROMPT, image=cimg, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=h, width=w,
                       latents=torch.from_numpy(latents), output_type="np", **{"guidance_scale": 7.5, **ref_kw}).images
        got = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, scheduler="ddim",
                           latents=latents, output_type="np", progress=False, control_image=cimg,
                           **{"guidance_scale": 7.5, **ours_kw})
        assert_psnr(got.images, ref, f"controlnet txt2img {case} vs diffusers on {backend}")
        assert got.parameters["controlnet"][0]["model"] == ours_kw["controlnet"]
        if case == "scale 1.0":  # the control image changes the picture
            plain = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, scheduler="ddim",
                                 latents=latents, output_type="np", progress=False, guidance_scale=7.5).images
            value = psnr(plain, got.images)
            print(f"PSNR with vs without control image on {backend}: {value:.1f} dB")
            assert value < CONTROL_CHANGES_DB


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_two_controlnets_match_multicontrolnet(model, pipes, backend, options):
    """Two ControlNets, their residuals summed (MultiControlNetModel), with their own scales and ranges."""
    ref_pipe = _pipe(model, "StableDiffusionControlNetPipeline", [model["a"], model["b"]])
    with nullcontext(pipes[backend]) as ours:
        h, w = ours.default_size
        latents, images = _latents(ours, 6), [control_image(h, w, 1), control_image(h, w, 2)]
        settings = {"controlnet_conditioning_scale": [0.8, 0.6], "control_guidance_start": [0.0, 0.25],
                    "control_guidance_end": [1.0, 0.75]}
        ref = ref_pipe(PROMPT, image=images, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=h, width=w,
                       latents=torch.from_numpy(latents), output_type="np", guidance_scale=7.5, **settings).images
        got = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, scheduler="ddim",
                           latents=latents, output_type="np", progress=False, guidance_scale=7.5,
                           control_image=images, controlnet=["a", "b"], **settings).images
        assert_psnr(got, ref, f"two ControlNets vs MultiControlNetModel on {backend}")


def _torch_draws(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    """diffusers' draws from torch.Generator().manual_seed(seed), in order (VAE-encode samples and noise)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for _ in range(n)]


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_img2img_matches_diffusers(model, pipes, backend, options):
    ref_pipe = _pipe(model, "StableDiffusionControlNetImg2ImgPipeline", model["a"])
    with nullcontext(pipes[backend]) as ours:
        h, w = ours.default_size
        image, cimg, seed = make_image(h, w), control_image(h, w, 3), 21
        # StableDiffusionControlNetImg2ImgPipeline draws the VAE-encode sample noise, then the added noise
        enc, noise = _torch_draws(seed, (1, 4, h // ours.vae_scale_factor, w // ours.vae_scale_factor), 2)
        ref = ref_pipe(PROMPT, image=image, control_image=cimg, strength=0.7, num_inference_steps=STEPS,
                       guidance_scale=7.5, controlnet_conditioning_scale=0.9, height=h, width=w,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images
        got = ours.img2img(PROMPT, image, strength=0.7, num_inference_steps=STEPS, guidance_scale=7.5,
                           scheduler="ddim", noise=noise, encode_noise=enc, output_type="np", progress=False,
                           control_image=cimg, controlnet_conditioning_scale=0.9, controlnet="a").images
        assert_psnr(got, ref, f"controlnet img2img vs diffusers on {backend}")


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_inpaint_matches_diffusers(model, pipes, backend, options):
    """The plain 4-channel U-Net in StableDiffusionControlNetInpaintPipeline (the known region blended
    back each step), strength 0.8."""
    ref_pipe = _pipe(model, "StableDiffusionControlNetInpaintPipeline", model["b"])
    with nullcontext(pipes[backend]) as ours:
        h, w = ours.default_size
        image, mask, cimg, seed = make_image(h, w), make_mask(h, w), control_image(h, w, 4), 33
        # its generator draws the init image's VAE-encode noise, the initial noise, the masked image's
        enc, noise, _ = _torch_draws(seed, (1, 4, h // ours.vae_scale_factor, w // ours.vae_scale_factor), 3)
        # (its controlnet_conditioning_scale defaults to 0.5, the other pipelines' to 1.0 and 0.8: explicit)
        ref = ref_pipe(PROMPT, image=image, mask_image=mask, control_image=cimg, strength=0.8,
                       num_inference_steps=STEPS, guidance_scale=7.5, height=h, width=w, controlnet_conditioning_scale=1.0,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images
        got = ours.inpaint(PROMPT, image, mask, strength=0.8, num_inference_steps=STEPS, guidance_scale=7.5,
                           scheduler="ddim", noise=noise, encode_noise=enc, output_type="np", progress=False,
                           control_image=cimg, controlnet="b").images
        assert_psnr(got, ref, f"controlnet inpaint vs diffusers on {backend}")


# ------------------------------------------------------------------------------- requests and batching

def test_requests_are_validated(model):
    with runtime.load(model["engine"], backend="onnxruntime") as pipe:
        assert pipe.controlnets == ("a", "b")
        h, w = pipe.default_size
        cimg = control_image(h, w)
        for kwargs, field in (({"control_image": cimg}, "controlnet"),  # two ControlNets: name one
                              ({"control_image": cimg, "controlnet": "c"}, "controlnet"),
                              ({"control_image": cimg, "controlnet": "a", "control_guidance_start": 0.6,
                                "control_guidance_end": 0.5}, "control_guidance_start"),
                              ({"control_image": [cimg, cimg], "controlnet": ["a"]}, "controlnet"),
                              ({"control_image": cimg, "controlnet": "a", "cache_interval": 2}, "cache_interval"),
                              ({"control_image": cimg, "controlnet": "a", "control_resize_mode": "x"},
                               "control_resize_mode"),
                              ({"controlnet": "a"}, "control_image")):
            with pytest.raises(runtime.PipelineError) as e:
                pipe.request("txt2img", PROMPT, **kwargs)
            assert e.value.field == field, (kwargs, e.value)
        # arrays (uint8 and float) at another size are resized to the request size
        arr = np.asarray(control_image(2 * h, w))
        r = pipe.request("txt2img", PROMPT, control_image=arr, controlnet="a")
        assert r.control.units[0].image.shape == (h, w, 3) and not r.control.units[0].image.flags.writeable
        same = pipe.request("txt2img", PROMPT, control_image=arr.astype(np.float32) / 255, controlnet="a")
        assert same.batch_key() == r.batch_key()
        assert pipe.request("txt2img", PROMPT).batch_key() != r.batch_key()


def test_batch_equals_single_requests(model):
    """Two requests with different control images in one engine batch: each image as alone."""
    with runtime.load(model["engine"], backend="onnxruntime") as pipe:
        h, w = pipe.default_size
        reqs = [pipe.request("txt2img", PROMPT, num_inference_steps=STEPS, seed=s, output_type="np", controlnet="a",
                             control_image=control_image(h, w, s)) for s in (7, 8)]
        together = pipe.generate(reqs, progress=False)
        for r, res in zip(reqs, together):
            alone = pipe.generate([r], progress=False)[0]
            np.testing.assert_array_equal(res.images, alone.images)


def test_folder_without_controlnet_refuses(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        assert pipe.controlnets == ()
        with pytest.raises(runtime.PipelineError, match="no ControlNet") as e:
            pipe.request("txt2img", PROMPT, control_image=np.zeros((64, 64, 3), np.uint8))
        assert e.value.field == "control_image"


# ------------------------------------------------------------------------------------ export and loading

def test_manifest_records_controlnets(model):
    from runtime.folder.manifest import load_manifest

    m = load_manifest(model["engine"])
    assert {"controlnet.a", "controlnet.b", "unet_control"} <= set(m.networks)
    a, b = m.networks["controlnet.a"]["controlnet"], m.networks["controlnet.b"]["controlnet"]
    assert (a["name"], a["source"]["kind"], a["conditioning_channels"]) == ("a", "diffusers", 3)
    assert (b["name"], b["source"]["kind"]) == ("b", "single_file")
    # unet_control shares the unet's weights file
    assert m.networks["unet_control"]["external_data"] == m.networks["unet"]["external_data"] == "unet.onnx.data"
    assert m.dims.block_out_channels == (32, 64) and m.dims.layers_per_block == 1


def test_single_file_keys_match_diffusers_converter(model, tmp_path):
    """Our key map, written out as a single file (.safetensors and a weights-only .pth), read back by
    diffusers' own converter (convert_controlnet_checkpoint) gives diffusers' state dict; and our
    reference equals diffusers' ControlNetModel on the same inputs (the SD 1.5 embedding, x8)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from export.controlnet import load_controlnet, to_ldm
    from export.loading.read import load_model

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model["folder"] / "unet"))
    cn = _make_controlnet(unet, 3, embedding=(16, 32, 96, 256))  # diffusers' converter expects SD's 4 levels
    ldm = to_ldm(cn.state_dict())
    assert all(k.startswith("control_model.") for k in ldm) and "control_model.input_hint_block.14.weight" in ldm
    converted = convert_controlnet_checkpoint({k: v for k, v in ldm.items()}, cn.config)
    ref = cn.state_dict()
    assert set(converted) == set(ref)
    assert all(torch.equal(converted[k], ref[k]) for k in ref)
    torch.save(ldm, tmp_path / "cn.pth")
    base = load_model(model["folder"]).spec.unet
    ours = load_controlnet(tmp_path / "cn.pth", base)
    b, h, w = 2, 32, 48
    x, t = torch.randn(b, 4, h // 8, w // 8), torch.tensor([901.0, 17.5])
    e, c = torch.randn(b, 77, 32), torch.rand(b, 3, h, w)
    with torch.no_grad():
        down, mid = cn(x, t, e, c, conditioning_scale=0.7, return_dict=False)
        got = ours(x, t, e, c, torch.full((b, len(down) + 1), 0.7))
    for r, g in zip([*down, mid], got):
        assert torch.allclose(r, g, rtol=1e-5, atol=1e-6)


def test_build_refuses_controlnet_of_another_family(model, tmp_path):
    from export.build import BuildError, build_engine
    from export.convert_ldm import CheckpointError
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    sd2 = save_diffusers(random_model("tiny-sd2", seed=0), tmp_path / "tiny-sd2")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd2 / "unet"))
    _make_controlnet(unet, 4).save_pretrained(str(tmp_path / "cn_sd2"))
    with pytest.raises(CheckpointError, match=r"ControlNet 'x' \(sd2-like.*does not fit the sd1 model.*"
                                              r"use_linear_projection True \(model: False\)"):
        build_engine(model["folder"], tmp_path / "out", controlnets=[f"{tmp_path / 'cn_sd2'}:x"], progress=log.info)
    assert not (tmp_path / "out").exists()
    with pytest.raises(BuildError, match="given twice"):
        build_engine(model["folder"], tmp_path / "out", controlnets=[f"{tmp_path / 'cn_sd2'}:x"] * 2)


def test_step_caching_tiling_and_hires_are_refused(model):
    """No graph takes ControlNet residuals with step caching, circular padding or a hires pass."""
    from dataclasses import replace

    from runtime.hires import HiresFix
    from runtime.request import make_request

    with runtime.load(model["engine"], backend="onnxruntime") as pipe:
        limits = replace(pipe.limits, step_cache=True, tiling=True)
        h, w = pipe.default_size
        for kwargs, field in (({"cache_interval": 2}, "cache_interval"), ({"tiling": True}, "tiling"),
                              ({"hires": HiresFix(scale=2.0)}, "hires")):
            with pytest.raises(runtime.PipelineError, match="ControlNet does not combine") as e:
                make_request(limits, "txt2img", PROMPT, control_image=control_image(h, w), controlnet="a", **kwargs)
            assert e.value.field == field


def test_tensorrt_profiles_cover_control_networks(model):
    """The TensorRT plans' profiles (runtime/engines/trt_plans.py) come from the contract: every input
    of a ControlNet and of unet_control has a range, the batch doubled for guidance."""
    from runtime.engines.trt_plans import network_profile
    from runtime.folder.manifest import load_manifest
    from runtime.folder.networks import network_io

    m = load_manifest(model["engine"])
    for network in ("controlnet.a", "unet_control"):
        profile = network_profile(network, m.dims, m.shapes)
        inputs, _ = network_io(network, m.dims)
        assert [t.name for t in inputs] == list(profile)
        assert profile["sample"].max[0] == 2 * m.shapes["max_batch"]
    cn = network_profile("controlnet.a", m.dims, m.shapes)
    assert cn["controlnet_cond"].max == (2 * m.shapes["max_batch"], 3, m.shapes["max_image"], m.shapes["max_image"])
    assert cn["conditioning_scale"].opt[1] == 5  # the tiny U-Net: 4 down residuals and the mid one
    unet = network_profile("unet_control", m.dims, m.shapes)
    lat = m.shapes["max_image"] // m.dims.vae_scale_factor
    assert unet["mid_residual"].max == (2 * m.shapes["max_batch"], 64, lat // 2, lat // 2)


def test_cli_control_image(model, tmp_path):
    from runtime.cli import control_from_args, main

    h, w = 64, 64
    control_image(h, w).save(tmp_path / "edges.png")
    parsed = control_from_args([f"{tmp_path / 'edges.png'}:b:0.5", str(tmp_path / "edges.png")])
    assert parsed["controlnet"] == ["b", None] and parsed["controlnet_conditioning_scale"] == [0.5, 1.0]
    out = tmp_path / "out.png"
    assert main(["txt2img", str(model["engine"]), PROMPT, "--steps", "2", "--seed", "1", "--backend", "onnxruntime",
                 "--control-image", f"{tmp_path / 'edges.png'}:a:0.7", "--no-progress", "-o", str(out)]) == 0
    with runtime.load(model["engine"], backend="onnxruntime") as pipe:
        ref = pipe.txt2img(PROMPT, num_inference_steps=2, seed=1, control_image=Image.open(tmp_path / "edges.png"),
                           controlnet="a", controlnet_conditioning_scale=0.7, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref))


def test_new_graphs_pass_the_offline_tensorrt_check(model):
    """export/trt_compat.py: TensorRT's ONNX parser would take the ControlNet and unet_control graphs."""
    from export.trt_compat import check_graph

    for network in ("controlnet.a", "controlnet.b", "unet_control"):
        assert check_graph(model["engine"] / f"{network}.onnx") == [], network
