"""A tiny autoencoder (TAESD) beside the full VAE: `build-engine --tiny-vae PATH`, `vae="tiny"` (issue 25).

The reference is diffusers' own `AutoencoderTiny` (random weights, made by diffusers at the tiny
preset's VAE scale factor, 2). It reaches the build as madebyollin's single files: the test rebuilds
madebyollin/taesd taesd.py's `Encoder` / `Decoder` layouts (bare `nn.Sequential`s, the decoder led by
its weightless `Clamp`; commit 2a1b414) at the test's sizes, fills them from the diffusers model by the
inverse of the key map (encoder `encoder.layers.N` -> `N`, decoder `decoder.layers.N` -> `N + 1`),
checks that they compute what diffusers computes, and saves their state dicts as
`taesd_encoder.safetensors` / `taesd_decoder.safetensors`, as madebyollin ships them. The engine
folder's images with vae="tiny" are compared with diffusers' StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline using that AutoencoderTiny as their VAE (the folder's own KL VAE stays
the default), at fp32 on ONNX Runtime and OpenVINO: >= 90 dB PSNR (psnr_bounds.PARITY_PSNR_DB).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.errors import PipelineError
from runtime.folder.manifest import load_manifest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

log = logging.getLogger(__name__)
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]
TINY_VAE = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 2), latent_channels=4, latent_magnitude=2, latent_shift=0.4)


# --- madebyollin/taesd taesd.py's layout, at the test's sizes -------------------------------------------

def _conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def _taesd_encoder(c):
    layers = []
    for i, (n, ch) in enumerate(zip(c["num_encoder_blocks"], c["encoder_block_out_channels"])):
        layers.append(_conv(3, ch) if i == 0 else _conv(ch, ch, stride=2, bias=False))
        layers += [_Block(ch, ch) for _ in range(n)]
    return nn.Sequential(*layers, _conv(c["encoder_block_out_channels"][-1], c["latent_channels"]))


def _taesd_decoder(c):
    chs = c["decoder_block_out_channels"]
    layers = [_Clamp(), _conv(c["latent_channels"], chs[0]), nn.ReLU()]
    for i, (n, ch) in enumerate(zip(c["num_decoder_blocks"], chs)):
        layers += [_Block(ch, ch) for _ in range(n)]
        layers += [nn.Upsample(scale_factor=2), _conv(ch, ch, bias=False)] if i < len(chs) - 1 else [_conv(ch, 3)]
    return nn.Sequential(*layers)


def _single_files(ref, folder: Path) -> Path:
    """madebyollin's two files of the diffusers AutoencoderTiny `ref`, checked against it first."""
    sd = ref.state_dict()
    enc, dec = _taesd_encoder(TINY_VAE), _taesd_decoder(TINY_VAE)
    enc.load_state_dict({k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")},
                        strict=True)
    dec_sd = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            index, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec_sd[f"{int(index) + 1}.{rest}"] = v
    dec.load_state_dict(dec_sd, strict=True)
    x, z = torch.rand(1, 3, 12, 16), torch.randn(1, 4, 6, 8)
    with torch.no_grad():  # taesd.py works on [0, 1] images, diffusers on [-1, 1]
        assert torch.allclose(enc(x), ref.encode(x * 2 - 1).latents, atol=1e-6)
        assert torch.allclose(dec(z) * 2 - 1, ref.decode(z).sample, atol=1e-6)
    folder.mkdir(parents=True)
    safetensors_torch.save_file(enc.state_dict(), str(folder / "taesd_encoder.safetensors"))
    safetensors_torch.save_file(dec.state_dict(), str(folder / "taesd_decoder.safetensors"))
    return folder


def _load(folder: Path, cls: str = "StableDiffusionPipeline", **components):
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, local_files_only=True,
                                                   dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """(diffusers folder with the KL VAE, the AutoencoderTiny, its single files, the engine folder
    built from the diffusers folder with --tiny-vae the single files)."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("taesd-added")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "diffusers")
    torch.manual_seed(7)
    tiny = diffusers.AutoencoderTiny(**TINY_VAE).eval()
    files = _single_files(tiny, root / "taesd")
    engine = build_engine(str(folder), root / "engine", tiny_vae=files, progress=lambda line: None)
    return folder, tiny, files, engine


def test_manifest_records_both_vaes(added):
    folder, tiny, files, engine = added
    m = load_manifest(engine)
    assert "vae" not in m.networks["vae_decoder"] and m.scaling_factor == pytest.approx(0.18215)
    for name in ("vae_decoder_tiny", "vae_encoder_tiny"):
        e = m.networks[name]
        # single files carry no config: taesd.py's latent constants, diffusers AutoencoderTiny's scaling
        assert (e["vae"], e["scaling_factor"], e["latent_magnitude"], e["latent_shift"]) == ("tiny", 1.0, 3, 0.5)
        assert e["source"]["kind"] == "single_files" and e["source"]["prefix"] == "taesd"
        assert e["parity"]["rel"] <= e["parity"]["threshold"]
    assert m.tiny_vae == "added" and m.vae_graph("vae_decoder", "tiny") == "vae_decoder_tiny"
    assert m.vae_scaling_factor("vae_encoder_tiny") == 1.0 and m.vae_scaling_factor("vae_encoder") == m.scaling_factor


def test_loader_reads_a_diffusers_folder_and_either_file(added, tmp_path):
    """An AutoencoderTiny folder's config is read (its latent constants, not taesd.py's); either
    single file names the pair; the reference computes what diffusers does."""
    from export.loading.taesd import load_tiny_vae

    _, tiny, files, _ = added
    tiny.save_pretrained(str(tmp_path / "taesd-diffusers"))
    from_folder = load_tiny_vae(tmp_path / "taesd-diffusers")
    assert (from_folder.config.latent_magnitude, from_folder.config.latent_shift) == (2, 0.4)
    from_file = load_tiny_vae(files / "taesd_decoder.safetensors")
    assert from_file.config.num_decoder_blocks == (1, 2) and from_file.identity["kind"] == "single_files"
    z = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        want = tiny.decode(z).sample
        assert torch.allclose(from_file.vae.decode(z), want, atol=1e-6)
        assert torch.allclose(from_folder.vae.decode(z), want, atol=1e-6)


def test_loader_refusals(tmp_path):
    from export.convert_ldm import CheckpointError
    from export.loading.taesd import load_tiny_vae

    with pytest.raises(CheckpointError, match="does not exist"):
        load_tiny_vae(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    safetensors_torch.save_file({"0.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "half" / "taesd_encoder.safetensors"))
    with pytest.raises(CheckpointError, match="taesd_decoder.safetensors is missing"):
        load_tiny_vae(tmp_path / "half")


def _txt2img_ref(folder: Path, tiny, latents: np.ndarray, h: int, w: int, kw: dict) -> np.ndarray:
    import json

    ref_pipe = _load(folder, vae=tiny)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    return ref_pipe(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_txt2img_tiny_matches_diffusers(added, backend, options):
    """vae="tiny" equals StableDiffusionPipeline with the AutoencoderTiny as its VAE; the default
    (the full KL VAE) does not."""
    folder, tiny, _, engine = added
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, output_type="np")
    with runtime.load(engine, backend=backend, **options) as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(5).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        got = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, vae="tiny", **kw)
        full = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    ref = _txt2img_ref(folder, tiny, latents, h, w, kw)
    value = psnr(got.images, ref)
    log.info("PSNR txt2img vae=tiny (--tiny-vae) vs diffusers on %s: %.1f dB", backend, value)
    assert got.images.shape == ref.shape and value >= PARITY_PSNR_DB, f"{value:.1f} dB"
    assert got.images.std() > 0.01 and got.parameters["vae"] == "tiny"
    assert psnr(full, ref) < PARITY_PSNR_DB - 40


def test_img2img_tiny_encoder_matches_diffusers(added):
    """img2img with vae="tiny" encodes with the tiny encoder (its own scaling, 1.0, not the folder's
    0.18215) and decodes with the tiny decoder: StableDiffusionImg2ImgPipeline with the AutoencoderTiny."""
    import json

    folder, tiny, _, engine = added
    ref_pipe = _load(folder, "StableDiffusionImg2ImgPipeline", vae=tiny)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    with runtime.load(engine, backend="onnxruntime") as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        image = Image.fromarray((np.stack([yy, xx, 0.5 * (yy + xx)], -1) * 255).astype(np.uint8))
        noise = torch.randn((1, 4, h // s, w // s), generator=torch.Generator().manual_seed(21)).numpy()
        got = ours.img2img(PROMPT, image, strength=0.6, num_inference_steps=8, guidance_scale=7.5, scheduler="euler",
                           noise=noise, encode_noise=np.ones_like(noise), output_type="np", progress=False,
                           vae="tiny").images
    ref = ref_pipe(PROMPT, image=image, strength=0.6, num_inference_steps=8, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(21), output_type="np").images
    value = psnr(got, ref)
    log.info("PSNR img2img vae=tiny (--tiny-vae) vs diffusers: %.1f dB", value)
    assert np.isfinite(got).all() and value >= PARITY_PSNR_DB, f"{value:.1f} dB"


def test_vae_choice_is_validated_and_keyed(added, tiny_sd1_engine):
    _, _, _, engine = added
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as plain:
        with pytest.raises(PipelineError, match="build-engine --tiny-vae") as e:
            plain.request("txt2img", PROMPT, vae="tiny", num_inference_steps=2)
        assert e.value.field == "vae"
    with runtime.load(engine, backend="onnxruntime") as ours:
        with pytest.raises(PipelineError, match="vae must be one of full, tiny") as e:
            ours.request("txt2img", PROMPT, vae="taesd", num_inference_steps=2)
        assert e.value.field == "vae"
        a = ours.request("txt2img", PROMPT, num_inference_steps=2, seed=1)
        b = ours.request("txt2img", PROMPT, num_inference_steps=2, seed=1, vae="tiny")
        assert a.vae == "full" and a.batch_key() != b.batch_key()
        with pytest.raises(PipelineError):
            ours.generate([a, b], progress=False)


def test_wire_fields_select_the_tiny_vae():
    """A1111's override_settings.sd_vae ("taesd" / "tiny" vs "Automatic" / "None") and the OpenAI
    route's sd_runtime.vae become the request's `vae`; other sd_vae values are refused by name."""
    from runtime.request import Limits
    from runtime.serving import a1111, openai
    from runtime.serving.codec import WireError

    limits = Limits(min_image=32, max_image=128, max_batch=4, vae_scale_factor=2, latent_channels=4,
                    default_size=(64, 64), inpainting_unet=False, default_sampler="euler", samplers=("euler",),
                    tiny_vae="added")

    def jobs(settings):
        req = a1111.Txt2ImgRequest(prompt="a cat", steps=2, seed=1, override_settings=settings)
        a1111.check_override_settings(settings, ("tiny",))
        return a1111.job_settings(req, limits, max_steps=50, max_n_iter=4)[1]

    assert all(j["vae"] == "tiny" for name in a1111.TINY_VAE_NAMES for j in jobs({"sd_vae": name}))
    assert all("vae" not in j for name in ("Automatic", "None") for j in jobs({"sd_vae": name}))
    assert "vae" not in jobs(None)[0]
    with pytest.raises(WireError, match="override_settings.sd_vae"):
        jobs({"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"})
    assert a1111.FIELDS["vae"] == "override_settings.sd_vae"
    body = openai.GenerationsRequest(prompt="a cat", sd_runtime={"vae": "tiny"})
    assert openai.job_settings(body, limits, 50)[0]["vae"] == "tiny"
    assert openai.job_settings(openai.GenerationsRequest(prompt="a cat"), limits, 50)[0]["vae"] == "full"


def test_server_sd_vae(added, tiny_sd1_engine):
    """GET /sdapi/v1/sd-vae lists the tiny VAE; a txt2img with override_settings.sd_vae "taesd" is the
    Python API's vae="tiny" image; a folder without one answers 422 naming override_settings.sd_vae."""
    pytest.importorskip("fastapi")
    from test_serve_support import LiveServer, pixels

    engine = added[3]
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "sampler_name": "Euler", "width": 64, "height": 64,
            "cfg_scale": 7.0, "override_settings": {"sd_vae": "taesd"}}
    with runtime.load(engine, backend="onnxruntime") as pipe:
        want = pipe.txt2img("a cat", num_inference_steps=2, seed=3, scheduler="euler", guidance_scale=7.0,
                            vae="tiny", output_type="np", progress=False).images[0]
        live = LiveServer(pipe)
        try:
            assert live.get("/sdapi/v1/sd-vae").json() == [{"model_name": "taesd", "filename": "vae_decoder_tiny.onnx"}]
            r = live.post("/sdapi/v1/txt2img", body)
            assert r.status_code == 200, r.text[:300]
            got = pixels(r.json()["images"][0])
        finally:
            live.stop()
    assert np.abs(got.astype(np.float32) - np.rint(want * 255)).max() <= 1
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as plain:
        live = LiveServer(plain)
        try:
            assert live.get("/sdapi/v1/sd-vae").json() == []
            r = live.post("/sdapi/v1/txt2img", {**body, "width": 32, "height": 32})
            assert r.status_code == 422 and "override_settings.sd_vae" in r.json()["detail"], r.text[:300]
        finally:
            live.stop()


def test_live_preview_decodes_with_the_tiny_vae(added, tiny_sd1_engine):
    """With a tiny VAE the live preview (Pipeline.preview; the server's progress current_image) is
    diffusers' AutoencoderTiny decode of the latents at the image's size, rounded as a final image;
    without one, the cheap linear preview at the latents' size."""
    import base64
    import io
    from types import SimpleNamespace

    from runtime.imaging.preview import latents_to_rgb
    from runtime.serving.app import _preview

    _, tiny, _, engine = added
    latents = np.random.default_rng(9).standard_normal((2, 4, 16, 12), dtype=np.float32)
    with torch.no_grad():
        ref = tiny.decode(torch.from_numpy(latents) / tiny.config.scaling_factor).sample.numpy()
    want = (np.clip(ref.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) * 255).round()
    with runtime.load(engine, backend="onnxruntime") as pipe:
        got = pipe.preview(latents)
        wire = _preview(pipe, latents)
    assert got.dtype == np.uint8 and got.shape == (2, 32, 24, 3)
    assert np.abs(got.astype(np.float32) - want).max() <= 1
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(wire))))
    assert np.array_equal(served, got[0])
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as plain:
        assert np.array_equal(plain.preview(latents), latents_to_rgb(latents))


def test_torch_reference_engine_runs_the_tiny_vae(added):
    """The PyTorch reference engine rebuilds vae_decoder_tiny from the recorded tiny VAE files (not
    the folder's KL VAE): it equals diffusers' AutoencoderTiny decode."""
    from export.torch_engine import open_engine

    _, tiny, _, engine = added
    latent = np.random.default_rng(1).standard_normal((1, 4, 8, 10), dtype=np.float32)
    e = open_engine(engine, load_manifest(engine), "vae_decoder_tiny")
    try:
        got = e.run({"latent": latent})["image"]
    finally:
        e.close()
    with torch.no_grad():
        want = tiny.decode(torch.from_numpy(latent)).sample.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
