"""txt2img, img2img and inpainting over an engine folder: `runtime.load(engine_dir)` returns a
`Pipeline`. Torch-free: NumPy, the engines, the NumPy schedulers, PIL and the CLIP tokenizer.

Randomness. `seed` (an int, a list of one int per image, or None for a random one) seeds one
`np.random.Generator(np.random.PCG64(seed_i))` per image, image i of a batch taking `seed + i`.
Each image's generator draws, in this fixed order, float32 standard normals of shape
[latent_channels, lh, lw]: (1) the initial noise, (2) for img2img / inpaint the VAE-encode noise of
the init image, (3) for the 9-channel inpainting U-Net the VAE-encode noise of the masked image.
A draw is made even where an explicit array (`latents`, `noise`, `encode_noise`, ...) replaces it,
so the later draws do not move. Stochastic samplers (ancestral, DDIM with eta > 0) then draw their
step noise from the same generators, image by image. The draws are NumPy's, never a backend's, so
one seed gives the same image on every backend, and an image reproduces alone from its own seed.

Shapes and casts. Everything between engines is float32; each engine call casts its feeds to the
dtypes the engine declares (float16 for fp16 graphs, int32 ids) and its outputs back to float32.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime import images as imgs
from runtime import scheduler as sch
from runtime import text
from runtime.engines.base import Engine
from runtime.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
DEFAULT_STEPS = 50  # diffusers' StableDiffusionPipeline default
DEFAULT_GUIDANCE = 7.5  # diffusers' default

# diffusers scheduler `_class_name` (the manifest's scheduler config) -> our sampler name.
SCHEDULER_CLASSES = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LMSDiscreteScheduler": "lms",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_a",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
}


class PipelineError(ValueError):
    """A generation request the engine folder cannot serve (size, batch, strength, inputs...)."""


@dataclass
class GenerationResult:
    """images: a list of PIL images ("pil"), float32 NHWC in [0, 1] ("np") or the final latents
    [batch, 4, lh, lw] ("latent"). seeds: one per image. timings: seconds per stage that ran
    (text_encoder, vae_encode, denoise, vae_decode) and total. parameters: what reproduces the run."""

    images: Any
    seeds: list[int]
    timings: dict[str, float]
    backend: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.seeds[0]


def default_sampler(config: dict[str, Any]) -> str:
    """Our sampler name for a diffusers scheduler config (its `_class_name`)."""
    cls = config.get("_class_name", "")
    name = SCHEDULER_CLASSES.get(cls)
    if cls == "DPMSolverMultistepScheduler" and str(config.get("algorithm_type", "")).startswith("sde-"):
        name = "dpmpp_2m_sde"
    if name in sch.SAMPLERS:
        return name
    fallback = "pndm" if "pndm" in sch.SAMPLERS else sch.SAMPLERS[0]
    warnings.warn(f"the engine's scheduler {cls or '(unnamed)'} has no NumPy sampler here; using {fallback!r}",
                  RuntimeWarning, stacklevel=3)
    return fallback


def _cast_feeds(engine: Engine, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast feeds to the dtypes the engine declares (the fp16/fp32 boundary)."""
    dtypes = {t.name: t.dtype for t in engine.inputs}
    return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in arrays.items()}


def _infer(engine: Engine, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    out = engine.run(_cast_feeds(engine, arrays))
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def _warn_nonfinite(arr: np.ndarray, what: str, stage: str) -> bool:
    if np.isfinite(arr).all():
        return False
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    warnings.warn(
        f"stage {stage!r}: {what} hold {bad} NaN/infinite values of {np.size(arr)}; the images will not be "
        "valid (an fp16 engine overflowing? try an fp32 engine folder)", RuntimeWarning, stacklevel=4)
    return True


def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise PipelineError(f"{what}: got a list of {len(value)}, expected one per prompt ({n})")
        return list(value)
    return [value] * n


class _BatchRNG:
    """The per-image generators seen by a sampler as one generator: a draw of shape [batch, ...]
    takes row i from image i's generator, so an image's stochastic steps do not depend on its batch."""

    def __init__(self, rngs: Sequence[np.random.Generator]):
        self._rngs = list(rngs)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        if size is None or np.ndim(size) == 0 or tuple(np.atleast_1d(size))[0] != len(self._rngs):
            raise ValueError(f"a batched draw must have the batch ({len(self._rngs)}) as its first axis; got {size}")
        size = tuple(np.atleast_1d(size))
        res = np.stack([g.standard_normal(size[1:], dtype=dtype) for g in self._rngs])
        if out is not None:
            out[...] = res
            return out
        return res

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc + scale * self.standard_normal(size)


class Pipeline:
    """A loaded engine folder. Use `runtime.load(engine_dir, backend=None)`."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, backend: str, engines: dict[str, Engine],
                 tokenizer):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.engines = engines
        self.tokenizer = tokenizer

    # -- properties ------------------------------------------------------------------------------

    @property
    def default_size(self) -> tuple[int, int]:
        return tuple(self.manifest.default_size)

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest.dims.vae_scale_factor

    @property
    def is_inpainting_unet(self) -> bool:
        return self.manifest.dims.unet_in_channels == 9

    @property
    def default_scheduler(self) -> str:
        return default_sampler(self.manifest.scheduler)

    def __repr__(self) -> str:
        return f"<Pipeline {self.manifest.family} {self.manifest.precision} on {self.backend} from {self.engine_dir}>"

    # -- public API ------------------------------------------------------------------------------

    def txt2img(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                guidance_rescale: float = 0.0, scheduler: str | None = None, karras: bool | None = None,
                seed=None, latents: np.ndarray | None = None, num_images_per_prompt: int = 1,
                eta: float = 0.0, output_type: str = "pil", callback: Callable | None = None,
                progress: bool = True) -> GenerationResult:
        """Text to image. `latents` ([batch, 4, lh, lw], unscaled standard-normal noise, as diffusers'
        `latents`) replaces the seeded initial noise."""
        if self.is_inpainting_unet:
            raise PipelineError(f"{self.engine_dir} holds an inpainting U-Net (9 input channels): use inpaint()")
        return self._generate("txt2img", prompt, negative_prompt, height, width, num_inference_steps,
                              guidance_scale, guidance_rescale, scheduler, karras, seed, num_images_per_prompt,
                              eta, output_type, callback, progress, noise=latents)

    def img2img(self, prompt, image, strength: float = 0.75, negative_prompt=None, height: int | None = None,
                width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                scheduler: str | None = None, karras: bool | None = None, seed=None,
                num_images_per_prompt: int = 1, eta: float = 0.0, output_type: str = "pil",
                callback: Callable | None = None, progress: bool = True, noise: np.ndarray | None = None,
                encode_noise: np.ndarray | None = None) -> GenerationResult:
        """Image to image: the init image is encoded, noised to the level `strength` gives
        (1.0 = pure noise), and denoised over the remaining int(steps * strength) steps.
        `noise` replaces the seeded noise added to the init latents; `encode_noise` the seeded
        VAE-encode sample noise (each [batch, 4, lh, lw])."""
        if self.is_inpainting_unet:
            raise PipelineError(f"{self.engine_dir} holds an inpainting U-Net (9 input channels): use inpaint()")
        return self._generate("img2img", prompt, negative_prompt, height, width, num_inference_steps,
                              guidance_scale, guidance_rescale, scheduler, karras, seed, num_images_per_prompt,
                              eta, output_type, callback, progress, image=image, strength=strength, noise=noise,
                              encode_noise=encode_noise)

    def inpaint(self, prompt, image, mask_image, strength: float = 1.0, negative_prompt=None,
                height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                scheduler: str | None = None, karras: bool | None = None, seed=None,
                num_images_per_prompt: int = 1, eta: float = 0.0, output_type: str = "pil",
                callback: Callable | None = None, progress: bool = True, noise: np.ndarray | None = None,
                encode_noise: np.ndarray | None = None,
                masked_encode_noise: np.ndarray | None = None) -> GenerationResult:
        """Repaint where `mask_image` is white (>= 0.5). With the 9-channel inpainting U-Net the
        mask and the masked image's latents go into the U-Net (diffusers'
        StableDiffusionInpaintPipeline); with a plain 4-channel U-Net the known region is blended back
        after every step. `encode_noise` / `masked_encode_noise` replace the seeded VAE-encode noise
        of the image / of the masked image (the latter only used by the 9-channel U-Net)."""
        return self._generate("inpaint", prompt, negative_prompt, height, width, num_inference_steps,
                              guidance_scale, guidance_rescale, scheduler, karras, seed, num_images_per_prompt,
                              eta, output_type, callback, progress, image=image, mask_image=mask_image,
                              strength=strength, noise=noise, encode_noise=encode_noise,
                              masked_encode_noise=masked_encode_noise)

    # -- validation ------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        s = self.vae_scale_factor
        if int(height) != height or int(width) != width or height <= 0 or width <= 0:
            raise PipelineError(f"height and width must be positive integers; got {height}x{width}")
        if height % s or width % s:
            raise PipelineError(f"height and width must be multiples of the VAE scale factor {s}; got {height}x{width}")
        lo, hi = self.manifest.shapes["min_image"], self.manifest.shapes["max_image"]
        if not (lo <= height <= hi and lo <= width <= hi):
            raise PipelineError(f"height and width must be within the engine's image range [{lo}, {hi}] pixels; "
                                f"got {height}x{width} (rebuild the engine folder with a wider shape range)")

    def _engine(self, name: str, what: str) -> Engine:
        if name not in self.engines:
            raise PipelineError(f"{what} needs the {name} network, which engine folder {self.engine_dir} lacks")
        return self.engines[name]

    def _resolve_sampler(self, scheduler: str | None) -> str:
        name = self.default_scheduler if scheduler is None else scheduler
        if name not in sch.SAMPLERS:
            raise PipelineError(f"unknown scheduler {name!r}; expected one of {', '.join(sch.SAMPLERS)}")
        return name

    def _seeds(self, seed, batch: int) -> list[int]:
        if seed is None:
            seed = secrets.randbits(32)
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise PipelineError(f"seed: got a list of {len(seed)} seeds for {batch} images")
            seeds = [int(s) for s in seed]
        else:
            seeds = [int(seed) + i for i in range(batch)]
        if any(s < 0 for s in seeds):
            raise PipelineError(f"seeds must be non-negative integers; got {seeds}")
        return seeds

    @staticmethod
    def _explicit(arr, shape: tuple[int, ...], what: str) -> np.ndarray | None:
        if arr is None:
            return None
        a = np.asarray(arr, dtype=np.float32)
        if a.ndim == len(shape) - 1 and shape[0] == 1:
            a = a[None]
        if a.shape != shape:
            raise PipelineError(f"{what} must have shape {list(shape)} (batch, channels, latent height, "
                                f"latent width); got {list(a.shape)}")
        _warn_nonfinite(a, what, "input")
        return a

    # -- the loop --------------------------------------------------------------------------------

    def _generate(self, mode: str, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                  guidance_rescale, scheduler, karras, seed, num_images_per_prompt, eta, output_type, callback,
                  progress, *, image=None, mask_image=None, strength: float = 1.0, noise=None, encode_noise=None,
                  masked_encode_noise=None) -> GenerationResult:
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        m = self.manifest

        # ---- requests -> validated settings
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise PipelineError("prompt must be a string or a non-empty list of strings")
        negatives = _as_list("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
        if not all(isinstance(p, str) for p in negatives):
            raise PipelineError("negative_prompt must be a string or a list of strings")
        if int(num_images_per_prompt) != num_images_per_prompt or num_images_per_prompt < 1:
            raise PipelineError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt}")
        n_per = int(num_images_per_prompt)
        batch = len(prompts) * n_per
        max_batch = m.shapes["max_batch"]
        if batch > max_batch:
            raise PipelineError(f"{batch} images in one call exceed the engine's max batch {max_batch}")
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps must be a positive integer; got {num_inference_steps}")
        if not np.isfinite(guidance_scale) or not np.isfinite(guidance_rescale):
            raise PipelineError(f"guidance_scale and guidance_rescale must be finite; got {guidance_scale}, {guidance_rescale}")
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if mode != "txt2img" and not (0.0 < float(strength) <= 1.0):
            raise PipelineError(f"strength must be in (0, 1]; got {strength}")
        sampler = self._resolve_sampler(scheduler)
        if not np.isfinite(eta) or eta < 0 or (eta > 0 and sampler != "ddim"):
            raise PipelineError(f"eta must be >= 0 and applies to the ddim sampler only; got eta={eta} for {sampler!r}")

        init_images = masks = None
        if mode != "txt2img":
            if image is None:
                raise PipelineError(f"{mode} needs an image")
            init_images = _as_list(image, len(prompts), "image")
            sizes = {imgs.image_size(im) for im in init_images}
            if len(sizes) > 1:
                raise PipelineError(f"the images of one call must share one size; got {sorted(sizes)}")
            img_size = sizes.pop()
            if mode == "inpaint":
                if mask_image is None:
                    raise PipelineError("inpaint needs a mask_image")
                masks = _as_list(mask_image, len(prompts), "mask_image")
                for mk in masks:
                    if imgs.image_size(mk) != img_size:
                        h0, w0 = img_size
                        h1, w1 = imgs.image_size(mk)
                        raise PipelineError(f"the mask is {w1}x{h1} (width x height) but the image is {w0}x{h0}; "
                                            "they must have the same size")
            s = self.vae_scale_factor
            dh, dw = (d - d % s for d in img_size)  # diffusers' get_default_height_width
        else:
            dh, dw = self.default_size
        height = dh if height is None else height
        width = dw if width is None else width
        self._check_size(height, width)
        height, width = int(height), int(width)

        try:
            schedule = sch.make_schedule(m.scheduler, sampler, int(num_inference_steps),
                                         strength=float(strength) if mode != "txt2img" else 1.0,
                                         karras=karras, prediction_type=m.prediction_type)
        except sch.SchedulerError as e:
            raise PipelineError(f"scheduler {sampler!r}: {e}") from None
        if len(schedule.timesteps) == 0:
            raise PipelineError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step; "
                                "raise strength or num_inference_steps")

        # ---- randomness: one generator per image, fixed draw order (module doc)
        seeds = self._seeds(seed, batch)
        rngs = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
        lc, s = m.dims.latent_channels, self.vae_scale_factor
        lshape = (lc, height // s, width // s)
        bshape = (batch, *lshape)

        def draw() -> np.ndarray:
            return np.stack([g.standard_normal(lshape, dtype=np.float32) for g in rngs])

        seeded_noise = draw()
        noise = self._explicit(noise, bshape, "latents" if mode == "txt2img" else "noise")
        noise = seeded_noise if noise is None else noise
        use_masked_latents = mode == "inpaint" and self.is_inpainting_unet
        if mode != "txt2img":
            seeded_enc = draw()
            encode_noise = self._explicit(encode_noise, bshape, "encode_noise")
            encode_noise = seeded_enc if encode_noise is None else encode_noise
        if use_masked_latents:
            seeded_masked = draw()
            masked_encode_noise = self._explicit(masked_encode_noise, bshape, "masked_encode_noise")
            masked_encode_noise = seeded_masked if masked_encode_noise is None else masked_encode_noise
        sampler_rng = rngs[0] if batch == 1 else _BatchRNG(rngs)

        # ---- text
        t0 = time.perf_counter()
        do_cfg = guidance_scale > 1.0
        te = self._engine("text_encoder", mode)
        n_chunks = text.count_chunks(self.tokenizer, prompts + (negatives if do_cfg else []),
                                     m.dims.text_max_length)
        cond = text.encode(te, text.tokenize(self.tokenizer, prompts, n_chunks, m.dims.text_max_length))
        cond = np.repeat(cond, n_per, axis=0)
        uncond = None
        if do_cfg:
            uncond = text.encode(te, text.tokenize(self.tokenizer, negatives, n_chunks, m.dims.text_max_length))
            uncond = np.repeat(uncond, n_per, axis=0)
        _warn_nonfinite(cond if uncond is None else np.concatenate([cond, uncond]), "text embeddings", "text_encoder")
        timings["text_encoder"] = time.perf_counter() - t0

        # ---- images -> latents
        src = [i // n_per for i in range(batch)]  # expanded batch index -> prompt index
        image_latents = mask_lat = masked_latents = None
        if mode != "txt2img":
            t0 = time.perf_counter()
            vae_enc = self._engine("vae_encoder", mode)
            pixels = imgs.to_network([imgs.load_image(im, height, width) for im in init_images])
            # the 9-channel U-Net at strength 1 starts from pure noise and never needs the image's
            # own latents (as diffusers, which skips that encode too)
            if not (use_masked_latents and float(strength) == 1.0):
                image_latents = self._encode(vae_enc, pixels, src, encode_noise)
            if mode == "inpaint":
                mask_hw = np.stack([imgs.load_mask(mk, height, width) for mk in masks])  # [P, H, W]
                mask_lat = np.concatenate([imgs.latent_mask(mk, height // s, width // s) for mk in mask_hw])[src]
                if use_masked_latents:
                    # diffusers: masked_image = init_image * (mask < 0.5), in [-1, 1] (masked pixels -> 0)
                    masked = pixels * (mask_hw < 0.5)[:, None].astype(np.float32)
                    masked_latents = self._encode(vae_enc, masked, src, masked_encode_noise)
            timings["vae_encode"] = time.perf_counter() - t0

        # ---- denoise
        t0 = time.perf_counter()
        unet = self._engine("unet", mode)

        def unet_fn(x, t, context):
            x = np.asarray(x)
            t = np.asarray(t, dtype=np.float32).reshape(-1)
            if t.size == 1:
                t = np.full((x.shape[0],), t[0], dtype=np.float32)
            return _infer(unet, sample=x, timestep=t, encoder_hidden_states=context)["noise_pred"]

        guided = sch.guidance(unet_fn, cond, uncond, float(guidance_scale), float(guidance_rescale))
        bar = _progress(len(schedule.timesteps), progress, f"{mode} ({sampler}, {self.backend})")

        def model(x_in, t):
            if masked_latents is not None:
                x_in = sch.inpaint_unet_input(x_in, mask_lat, masked_latents)
            out = guided(x_in, t)
            bar.update(1)
            return out

        init = image_latents
        if mode == "inpaint" and float(strength) == 1.0:
            init = None  # diffusers: at strength 1 inpainting starts from pure noise
        latents = sch.prepare_latents(schedule, noise, init)
        known = (image_latents, mask_lat, noise) if mode == "inpaint" and not use_masked_latents else None
        try:
            latents = sch.sample(schedule, model, latents, rng=sampler_rng, eta=float(eta), callback=callback,
                                 known=known)
        finally:
            bar.close()
        latents = np.asarray(latents, dtype=np.float32)
        timings["denoise"] = time.perf_counter() - t0
        _warn_nonfinite(latents, "latents", "denoise")

        # ---- latents -> images
        if output_type == "latent":
            images = latents
        else:
            t0 = time.perf_counter()
            decoded = _infer(self._engine("vae_decoder", mode), latent=latents)["image"]
            timings["vae_decode"] = time.perf_counter() - t0
            _warn_nonfinite(decoded, "decoded images", "vae_decode")
            images = imgs.from_network(decoded)
            if output_type == "pil":
                images = imgs.to_pil(images)
        timings["total"] = time.perf_counter() - t_start

        params = {
            "mode": mode, "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": negatives if len(negatives) > 1 else negatives[0],
            "steps": int(num_inference_steps), "scheduler": sampler, "karras": karras,
            "guidance_scale": float(guidance_scale), "guidance_rescale": float(guidance_rescale),
            "eta": float(eta), "height": height, "width": width, "seeds": seeds,
            "engine": str(self.engine_dir), "backend": self.backend, "precision": m.precision,
        }
        if getattr(unet, "quantized", False):  # build-engine --quantize int8, run by OpenVINO
            params["unet"] = "int8"
        if mode != "txt2img":
            params["strength"] = float(strength)
        return GenerationResult(images=images, seeds=seeds, timings=timings, backend=self.backend, parameters=params)

    def _encode(self, vae_enc: Engine, pixels: np.ndarray, src: list[int], eps: np.ndarray) -> np.ndarray:
        """VAE-encode [P, 3, H, W] pixels and sample one latent per expanded image:
        (mean + std * eps) * scaling_factor, as diffusers' `latent_dist.sample(generator)`."""
        out = _infer(vae_enc, image=pixels)
        mean, std = out["latent_mean"][src], out["latent_std"][src]
        _warn_nonfinite(np.concatenate([mean, std]), "encoded latents", "vae_encode")
        return (mean + std * eps) * np.float32(self.manifest.scaling_factor)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


def load(engine_dir: str | Path, backend: str | None = None, **engine_options) -> Pipeline:
    """Open an engine folder. `backend` names the engine backend ("onnxruntime", "torch", ...);
    None takes the best available. `engine_options` go to the backend (providers, threads, ...).
    `pipe.backend` says which backend was taken."""
    manifest = load_manifest(engine_dir)
    from runtime.engines import open_engines

    name, engines = open_engines(engine_dir, manifest=manifest, backend=backend, **engine_options)
    tok = manifest.tokenizer
    tokenizer = text.load_tokenizer(Path(engine_dir) / tok.get("dir", "tokenizer"), tok.get("pad_token"))
    int8 = " (int8 U-Net)" if getattr(engines.get("unet"), "quantized", False) else ""
    log.info("engine folder %s: %s %s on backend %s%s", engine_dir, manifest.family, manifest.precision, name, int8)
    return Pipeline(engine_dir, manifest, name, engines, tokenizer)
