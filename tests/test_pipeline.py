"""Pipeline logic on small deterministic fake engines (NumPy functions behind the real `Engine`
interface) and the real NumPy scheduler: prompt chunking, casts at the engine boundary, seeds,
image/mask handling, validation messages, NaN warnings. Parity with real networks, other backends
and diffusers is in test_pipeline_parity.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.imaging import images as imgs
from runtime.text import tokens as text
from runtime.engines.base import Engine, EngineInputError
from runtime.folder.manifest import Manifest, ManifestError
from runtime.folder.networks import ModelDims, network_io
from runtime.pipeline import GenerationResult, Pipeline, PipelineError, default_sampler, load

ROOT = Path(__file__).resolve().parents[1]
BPE = ROOT / "export" / "assets" / "clip-bpe"
HIDDEN = 16
SIZE = 64  # default image size of the fake model; latents 8x8 (VAE scale factor 8)

# Stable Diffusion's scheduler config (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
}


class FakeEngine(Engine):
    """A NumPy function behind the real Engine interface (validation included); records its feeds."""

    backend = "fake"

    def __init__(self, name: str, dims: ModelDims, precision: str, fn):
        super().__init__(name, *network_io(name, dims, precision))
        self.fn = fn
        self.calls: list[dict[str, np.ndarray]] = []

    def _run(self, feeds):
        self.calls.append({k: np.array(v) for k, v in feeds.items()})
        f32 = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        out = self.fn(**f32)
        return {t.name: np.asarray(out[t.name]).astype(t.dtype) for t in self.outputs}


def _fake_engines(dims: ModelDims, precision: str) -> dict[str, Engine]:
    table = np.random.default_rng(0).standard_normal((49408, HIDDEN)).astype(np.float32) * 0.5
    pos = np.linspace(-0.2, 0.2, 77, dtype=np.float32)[:, None]
    s = dims.vae_scale_factor

    def text_encoder(input_ids):
        return {"last_hidden_state": np.cumsum(table[input_ids], axis=1) / 8.0 + pos}

    def unet(sample, timestep, encoder_hidden_states):
        ctx = np.tanh(encoder_hidden_states.mean(axis=(1, 2)))[:, None, None, None]
        out = 0.5 * sample[:, :4] + 0.2 * ctx + 0.01 * (timestep / 1000.0)[:, None, None, None]
        if sample.shape[1] == 9:
            out = out + 0.1 * sample[:, 4:5] + 0.05 * sample[:, 5:9]
        return {"noise_pred": out}

    def vae_decoder(latent):
        up = latent[:, :3].repeat(s, axis=2).repeat(s, axis=3)
        return {"image": np.tanh(up * 2.0)}

    def vae_encoder(image):
        b, c, h, w = image.shape
        pooled = image.reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5))
        mean = np.concatenate([pooled, pooled.mean(axis=1, keepdims=True)], axis=1)
        return {"latent_mean": mean, "latent_std": np.full_like(mean, 0.05)}

    fns = {"text_encoder": text_encoder, "unet": unet, "vae_decoder": vae_decoder, "vae_encoder": vae_encoder}
    return {name: FakeEngine(name, dims, precision, fn) for name, fn in fns.items()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(BPE / name, d / name)
    return d


def fake_pipeline(tokenizer_dir, *, in_channels: int = 4, precision: str = "fp32", max_batch: int = 4,
                  scheduler=None) -> Pipeline:
    dims = ModelDims(latent_channels=4, unet_in_channels=in_channels, vae_scale_factor=8, text_hidden_size=HIDDEN)
    manifest = Manifest(
        family="sd1-inpaint" if in_channels == 9 else "sd1", dims=dims, scaling_factor=0.18215,
        prediction_type="epsilon", scheduler=dict(scheduler or SD_SCHEDULER),
        tokenizer={"dir": "tokenizer", "pad_token": "<|endoftext|>"}, default_size=(SIZE, SIZE),
        shapes={"min_batch": 1, "opt_batch": 1, "max_batch": max_batch, "min_image": 32, "opt_image": 64,
                "max_image": 128},
        precision=precision, networks={})
    return Pipeline(tokenizer_dir.parent, manifest, "fake", _fake_engines(dims, precision),
                    text.load_tokenizer(tokenizer_dir, "<|endoftext|>"))


@pytest.fixture
def pipe(tokenizer_dir):
    return fake_pipeline(tokenizer_dir)


def _image(h=SIZE, w=SIZE, mode="RGB", seed=0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _mask(h=SIZE, w=SIZE) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return Image.fromarray(m)


FAST = dict(num_inference_steps=3, progress=False)

# ---------------------------------------------------------------------------------------- torch-free


def test_runtime_path_imports_no_torch():
    code = ("import sys, runtime, runtime.pipeline, runtime.cli, runtime.text.tokens, runtime.imaging.images\n"
            "from runtime import load\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'diffusers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------- text


def test_short_prompt_ids_equal_diffusers_tokenization(tokenizer_dir):
    tok = text.load_tokenizer(tokenizer_dir, "<|endoftext|>")
    ids = text.tokenize(tok, ["a photo of an astronaut riding a horse", ""])
    ref = tok(["a photo of an astronaut riding a horse", ""], padding="max_length", max_length=77,
              truncation=True)["input_ids"]
    assert ids.shape == (2, 1, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[:, 0], np.array(ref))


def test_long_prompt_is_chunked_and_negative_padded(pipe):
    long_prompt = " ".join(["a very detailed oil painting of a lighthouse"] * 14)  # > 75 tokens
    tok = pipe.tokenizer
    n_ids = len(text.token_ids(tok, long_prompt))
    assert n_ids > 75
    ids = text.tokenize(tok, [long_prompt, "short"])
    n = -(-n_ids // 75)
    assert ids.shape == (2, n, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert (ids[:, :, 0] == bos).all()
    body = [int(t) for k in range(n) for t in ids[0, k, 1:] if t not in (bos, eos, pad)]
    assert body == text.token_ids(tok, long_prompt)
    assert list(ids[1, 1, :3]) == [bos, eos, pad]  # the short prompt's extra chunk is empty

    result = pipe.txt2img(long_prompt, negative_prompt="blurry", output_type="latent", **FAST)
    unet_ctx = pipe.engines["unet"].calls[-1]["encoder_hidden_states"]
    assert unet_ctx.shape == (2, 77 * n, HIDDEN)  # [uncond, cond], n chunks each
    assert len(pipe.engines["text_encoder"].calls) == 2 * n  # one call per chunk, cond and uncond
    assert result.images.shape == (1, 4, SIZE // 8, SIZE // 8)


# ---------------------------------------------------------------------------------------- casts, seeds


def test_fp16_engines_get_fp16_feeds_and_float32_timesteps(tokenizer_dir):
    pipe = fake_pipeline(tokenizer_dir, precision="fp16")
    result = pipe.txt2img("a cat", output_type="np", seed=1, scheduler="euler", karras=True, **FAST)
    calls = pipe.engines["unet"].calls
    # the timestep is float32 in every graph: Euler's fractional timesteps are not rounded to float16
    assert all(c["sample"].dtype == np.float16 and c["timestep"].dtype == np.float32 for c in calls)
    timesteps = np.array([c["timestep"][0] for c in calls], dtype=np.float64)
    assert np.any(timesteps != np.round(timesteps)), timesteps
    assert not np.array_equal(timesteps.astype(np.float32), timesteps.astype(np.float16).astype(np.float32))
    assert pipe.engines["text_encoder"].calls[0]["input_ids"].dtype == np.int32
    assert result.images.dtype == np.float32 and np.isfinite(result.images).all()
    # the engine casts float feeds to its declared dtypes and hands back float32
    out = pipe.engines["vae_decoder"].run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
    assert out["image"].dtype == np.float32 and pipe.engines["vae_decoder"].calls[-1]["latent"].dtype == np.float16
    # what cannot be cast within its kind is refused
    with pytest.raises(EngineInputError, match=r"input 'latent' has dtype int64, expected float16"):
        pipe.engines["vae_decoder"].run({"latent": np.zeros((1, 4, 8, 8), np.int64)})


def test_same_seed_same_image_and_random_seed_reported(pipe):
    a = pipe.txt2img("a cat", seed=123, output_type="np", **FAST)
    b = pipe.txt2img("a cat", seed=123, output_type="np", **FAST)
    assert isinstance(a, GenerationResult) and a.seed == 123 and a.seeds == [123]
    np.testing.assert_array_equal(a.images, b.images)
    c = pipe.txt2img("a cat", seed=None, output_type="np", **FAST)
    assert isinstance(c.seed, int)
    d = pipe.txt2img("a cat", seed=c.seed, output_type="np", **FAST)
    np.testing.assert_array_equal(c.images, d.images)
    e = pipe.txt2img("a cat", seed=124, output_type="np", **FAST)
    assert not np.array_equal(a.images, e.images)
    assert set(a.timings) == {"text_encoder", "denoise", "vae_decode", "total"}
    assert a.backend == "fake" and a.parameters["scheduler"] == "pndm"


def test_initial_noise_is_pcg64_of_the_seed(pipe):
    seeded = pipe.txt2img("a cat", seed=5, output_type="latent", **FAST)
    noise = np.random.Generator(np.random.PCG64(5)).standard_normal((4, 8, 8), dtype=np.float32)[None]
    explicit = pipe.txt2img("a cat", seed=99, latents=noise, output_type="latent", **FAST)
    np.testing.assert_array_equal(seeded.images, explicit.images)


def test_batch_images_reproduce_alone_from_their_seeds(pipe):
    batch = pipe.txt2img(["a cat", "a dog"], seed=10, num_images_per_prompt=2, output_type="np", **FAST)
    assert batch.seeds == [10, 11, 12, 13] and batch.images.shape == (4, SIZE, SIZE, 3)
    alone = pipe.txt2img("a dog", seed=13, output_type="np", **FAST)
    np.testing.assert_allclose(batch.images[3], alone.images[0], atol=1e-6)
    # stochastic sampler: step noise comes from each image's own generator too
    batch = pipe.txt2img("a cat", seed=20, num_images_per_prompt=2, scheduler="ddim", eta=1.0,
                         output_type="np", **FAST)
    alone = pipe.txt2img("a cat", seed=21, scheduler="ddim", eta=1.0, output_type="np", **FAST)
    np.testing.assert_allclose(batch.images[1], alone.images[0], atol=1e-6)


def test_output_types_and_callback(pipe):
    steps = []
    pil = pipe.txt2img("a cat", seed=0, callback=lambda i, t, x: steps.append(i), **FAST)
    assert len(pil.images) == 1 and pil.images[0].size == (SIZE, SIZE) and pil.images[0].mode == "RGB"
    assert steps and steps[0] == 0
    arr = pipe.txt2img("a cat", seed=0, output_type="np", **FAST)
    np.testing.assert_array_equal(np.asarray(pil.images[0]), (arr.images[0] * 255).round().astype(np.uint8))
    with pytest.raises(PipelineError, match="output_type"):
        pipe.txt2img("a cat", output_type="tensor", **FAST)


def test_default_scheduler_from_manifest(tokenizer_dir):
    assert default_sampler({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert default_sampler({"_class_name": "DDIMScheduler"}) == "ddim"
    assert default_sampler({"_class_name": "PNDMScheduler"}) == "pndm"
    pipe = fake_pipeline(tokenizer_dir, scheduler={**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler"})
    assert pipe.txt2img("a cat", seed=0, output_type="latent", **FAST).parameters["scheduler"] == "euler"


# ---------------------------------------------------------------------------------------- images, masks


def test_image_modes_and_arrays_agree(pipe):
    rgb = _image()
    base = pipe.img2img("a cat", rgb, seed=3, output_type="np", **FAST).images
    rgba = rgb.convert("RGBA")
    np.testing.assert_array_equal(pipe.img2img("a cat", rgba, seed=3, output_type="np", **FAST).images, base)
    as_uint8 = np.asarray(rgb)
    np.testing.assert_array_equal(pipe.img2img("a cat", as_uint8, seed=3, output_type="np", **FAST).images, base)
    as_float = np.asarray(rgb).astype(np.float32) / 255.0
    np.testing.assert_allclose(pipe.img2img("a cat", as_float, seed=3, output_type="np", **FAST).images, base,
                               atol=1e-6)
    gray = pipe.img2img("a cat", rgb.convert("L"), seed=3, output_type="np", **FAST)
    assert gray.images.shape == base.shape
    with pytest.raises(imgs.ImageInputError, match=r"values in \[0, 1\]"):
        pipe.img2img("a cat", as_float * 2.0, **FAST)
    with pytest.raises(imgs.ImageInputError, match="PIL image or a numpy array"):
        pipe.img2img("a cat", "not an image", **FAST)


def test_image_size_policy(pipe):
    # default: the image's own size rounded down to a multiple of 8; explicit size: resized
    r = pipe.img2img("a cat", _image(70, 90), seed=0, output_type="np", **FAST)
    assert r.images.shape == (1, 64, 88, 3)
    r = pipe.img2img("a cat", _image(70, 90), height=48, width=96, seed=0, output_type="np", **FAST)
    assert r.images.shape == (1, 48, 96, 3)
    with pytest.raises(PipelineError, match=r"image range \[32, 128\]"):
        pipe.img2img("a cat", _image(200, 200), **FAST)


def test_latent_mask_matches_torch_nearest():
    torch = pytest.importorskip("torch")
    m = (np.random.default_rng(0).random((64, 48)) > 0.5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(8, 6)).numpy()
    np.testing.assert_array_equal(imgs.latent_mask(m, 8, 6), ref)


def test_mask_modes_binarized():
    m = np.zeros((16, 16, 4), np.uint8)
    m[:8] = 255
    m[8:, :, 0] = 200  # bright red: luma 0.23 < 0.5 -> keep
    out = imgs.load_mask(m, 16, 16)
    assert set(np.unique(out)) == {0.0, 1.0} and out[:8].all() and not out[8:].any()
    np.testing.assert_array_equal(imgs.load_mask(Image.fromarray(m), 16, 16), out)


def test_inpaint_9_channel_unet_input(tokenizer_dir):
    pipe = fake_pipeline(tokenizer_dir, in_channels=9)
    result = pipe.inpaint("a cat", _image(), _mask(), seed=0, output_type="np", **FAST)
    assert result.images.shape == (1, SIZE, SIZE, 3)
    sample = pipe.engines["unet"].calls[0]["sample"]
    assert sample.shape == (2, 9, 8, 8)
    expected = imgs.latent_mask(imgs.load_mask(_mask(), SIZE, SIZE), 8, 8)[0, 0]
    np.testing.assert_array_equal(sample[0, 4], expected)
    np.testing.assert_array_equal(sample[1, 4], expected)
    # the masked image is the image with the mask region set to 0 in [-1, 1]: the fake encoder's
    # mean is a pooled copy, so the masked latents vanish inside the (8-pixel aligned) mask
    inside = expected.astype(bool)
    masked_latents = sample[0, 5:9] / 0.18215
    assert np.abs(masked_latents[:, inside]).max() < 0.05 * 4  # only std * noise remains
    with pytest.raises(PipelineError, match="inpainting U-Net"):
        pipe.txt2img("a cat", **FAST)


def test_inpaint_4_channel_keeps_unmasked_region(pipe):
    image = _image()
    result = pipe.inpaint("a cat", image, _mask(), strength=1.0, seed=0, output_type="latent", **FAST)
    enc = pipe.img2img("a cat", image, strength=1.0, seed=0, output_type="latent", num_inference_steps=1,
                       progress=False)
    keep = imgs.latent_mask(imgs.load_mask(_mask(), SIZE, SIZE), 8, 8)[0, 0] == 0
    # outside the mask the last blend puts the clean image latents back: mean + std * encode noise
    pixels = imgs.to_network([imgs.load_image(image, SIZE, SIZE)])
    out = pipe.engines["vae_encoder"].run({"image": pixels})
    rng = np.random.Generator(np.random.PCG64(0))
    rng.standard_normal((4, 8, 8), dtype=np.float32)
    eps = rng.standard_normal((4, 8, 8), dtype=np.float32)
    clean = (out["latent_mean"][0] + out["latent_std"][0] * eps) * 0.18215
    np.testing.assert_allclose(result.images[0][:, keep], clean[:, keep], atol=1e-6)
    assert enc.images.shape == result.images.shape


# ---------------------------------------------------------------------------------------- bad input


def test_bad_sizes(pipe):
    with pytest.raises(PipelineError, match="multiples of the VAE scale factor 8; got 60x64"):
        pipe.txt2img("a cat", height=60, width=64, **FAST)
    with pytest.raises(PipelineError, match=r"within the engine's image range \[32, 128\] pixels; got 256x64"):
        pipe.txt2img("a cat", height=256, width=64, **FAST)
    with pytest.raises(PipelineError, match="exceed the engine's max batch 4"):
        pipe.txt2img("a cat", num_images_per_prompt=5, **FAST)


def test_mask_of_another_size(pipe):
    with pytest.raises(PipelineError, match="the mask is 32x32 .* but the image is 64x64"):
        pipe.inpaint("a cat", _image(), _mask(32, 32), **FAST)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_strength_outside_range(pipe, strength):
    with pytest.raises(PipelineError, match=r"strength must be in \(0, 1\]"):
        pipe.img2img("a cat", _image(), strength=strength, **FAST)
    with pytest.raises(PipelineError, match=r"strength must be in \(0, 1\]"):
        pipe.inpaint("a cat", _image(), _mask(), strength=strength, **FAST)


def test_unknown_scheduler_and_prompt(pipe):
    with pytest.raises(PipelineError, match="unknown scheduler 'nope'; expected one of"):
        pipe.txt2img("a cat", scheduler="nope", **FAST)
    with pytest.raises(PipelineError, match="prompt must be a string"):
        pipe.txt2img(None, **FAST)
    with pytest.raises(PipelineError, match="negative_prompt: got a list of 2"):
        pipe.txt2img("a cat", negative_prompt=["a", "b"], **FAST)


def test_empty_engine_folder(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load(tmp_path / "missing")


def test_nan_latents_warn_by_stage(pipe):
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 0, 0, 0] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe.txt2img("a cat", latents=latents, output_type="np", **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("stage 'input': latents hold 1 NaN" in m for m in messages), messages
    assert any("stage 'denoise'" in m for m in messages), messages
    assert any("stage 'vae_decode'" in m for m in messages), messages
    assert np.isnan(result.images).any()  # reported, not hidden behind a black image
