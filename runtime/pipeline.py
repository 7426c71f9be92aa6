"""txt2img, img2img and inpainting over an engine folder: `runtime.load(engine_dir)` returns a
`Pipeline`. Torch-free: NumPy, the engines, the NumPy schedulers, PIL and the CLIP tokenizer.

    with runtime.load("engines/sd15") as pipe:
        result = pipe.txt2img("a watercolor fox", seed=1)

A call builds a `Request` (runtime/request.py: validated once, frozen) and runs the stage chain
of runtime/stages.py. `generate(requests)` runs several compatible requests as one engine batch
(same `Request.batch_key()` and prompt chunk count); each image is the one its request gives alone,
bit for bit, because every image has its own seeded generator and the engines compute batch rows
independently (tests/test_architecture.py checks both CPU backends).

Threads: one Pipeline may be called from many threads at once. Its own state is read-only after
`load`, except the tokenizer (guarded by a lock) and the optional networks opened on first use
(guarded by a lock); the engines are thread-safe (runtime/engines/base.py says which run calls
in parallel and which serialize). `close()` waits for calls in flight and releases the engines.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.imaging import images as imgs
from runtime import hires as hires_fix
from runtime import scheduler as sch
from runtime import control, handover, stages
from runtime.imaging import inpainting, preview as live_preview
from runtime.sampling import deepcache as caching
from runtime.text import lora_tags
from runtime.text import tokens as text
from runtime.text.tokens import embeddings_used
from runtime.engines.registry import backend_module, close_all, network_options, open_engines_why, open_network
from runtime.engines.base import Engine
from runtime.families import family_of
from runtime.errors import EngineClosedError, ManifestError, PipelineError, SDRuntimeError
from runtime.folder.networks import (CONTROL_UNET, base_network, control_residual_specs, controlnet_network,
                                     tiled_network)
from runtime.folder.paths import inside
from runtime.folder.manifest import Manifest, load_manifest
from runtime.memory import MemoryModel, memory_limit
from runtime.request import (DEFAULT_GUIDANCE, DEFAULT_STEPS, OUTPUT_TYPES, Limits, Request, check_memory,
                             make_request)

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS", "GenerationCancelled", "GenerationResult", "OUTPUT_TYPES",
           "Pipeline", "PipelineError", "default_sampler", "load"]

log = logging.getLogger(__name__)
default_sampler = sch.default_sampler  # the sampler a manifest's scheduler config names
EAGER_NETWORKS = ("text_encoder", "unet", "vae_decoder")  # opened by load(); the others on first use
# (a folder's first text encoder is its family's: text_encoder_2 for the SDXL refiner, `eager_networks`)
Callback = Callable[[int, float, np.ndarray], None]


class GenerationCancelled(SDRuntimeError):
    """Every request of a batch asked to stop (its `should_stop` returned True) before the last step."""


@dataclass
class GenerationResult:
    """images: a list of PIL images ("pil"), float32 NHWC in [0, 1] ("np") or the final latents
    [batch, 4, lh, lw] ("latent"). seeds: one per image. timings: seconds per stage that ran
    (text_encoder, vae_encode, denoise, vae_decode) and total; requests run as one batch share them.
    parameters: what reproduces the run."""

    images: Any
    seeds: list[int]
    timings: dict[str, float]
    backend: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.seeds[0]


@dataclass
class _Prepared:
    """One request after its own stages (text, draws, image latents), before the shared batch."""

    request: Request
    text: stages.Conditioning
    draws: stages.Draws
    latents: stages.ImageLatents


class Pipeline:
    """A loaded engine folder. Use `runtime.load(engine_dir, backend=None)`."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, backend: str, engines: dict[str, Engine],
                 tokenizer: Any, *, options: dict[str, Any] | None = None, backend_reason: str = "",
                 max_memory_gb: float | None = None, tokenizer_2: Any = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.backend_reason = backend_reason  # why this backend: "requested", or how it was chosen
        self.engines = engines
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2  # SDXL's second tokenizer (manifest tokenizer.tokenizer_2), else None
        self.family = family_of(manifest.family)  # how prompts become U-Net inputs (runtime/families.py)
        self.limits = replace(Limits.from_manifest(manifest, default_sampler(manifest.scheduler), sch.SAMPLERS),
                              memory=MemoryModel.from_folder(engine_dir, manifest, backend),
                              max_memory=memory_limit(max_memory_gb))
        self._options = dict(options or {})  # per-network options, for networks opened later
        self._tokenizer_lock = threading.Lock()
        # textual-inversion names -> their tokens (build-engine --embedding; export/embeddings.py)
        self._embeddings = dict(manifest.tokenizer.get("embeddings") or {})
        self.loras = lora_tags.folder_loras(manifest.source or {})  # LoRAs fused at build: {name: scale}
        self._engines_lock = threading.Lock()

    # -- properties ------------------------------------------------------------------------------

    @property
    def default_size(self) -> tuple[int, int]:
        return self.limits.default_size

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest.dims.vae_scale_factor

    @property
    def is_inpainting_unet(self) -> bool:
        return self.limits.inpainting_unet

    @property
    def controlnets(self) -> tuple[str, ...]:
        """The names of the folder's ControlNets (build-engine --controlnet PATH[:NAME])."""
        return self.limits.controlnets

    @property
    def default_scheduler(self) -> str:
        return self.limits.default_sampler

    def __repr__(self) -> str:
        return f"<Pipeline {self.manifest.family} {self.manifest.precision} on {self.backend} from {self.engine_dir}>"

    # -- public API ------------------------------------------------------------------------------

    # long: the public signature; the docstring documents every keyword
    def txt2img(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                num_inference_steps: int | None = None, guidance_scale: float | None = None,
                guidance_rescale: float = 0.0, scheduler: str | None = None, karras: bool | None = None,
                seed=None, latents: np.ndarray | None = None, num_images_per_prompt: int = 1,
                eta: float = 0.0, output_type: str = "pil", callback: Callback | None = None,
                progress: bool = True, cache_interval: int = 1, cache_schedule: str = "uniform",
                prompt_syntax: str = "a1111", vae_tiling: bool | int | None = None, subseed=None,
                subseed_strength: float = 0.0, seed_resize_from=None,
                hires: hires_fix.HiresFix | None = None,
                tiling: bool = False, vae: str = "full",
                timestep_spacing: str | None = None, control_image: Any = None, controlnet: Any = None,
                controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
                control_guidance_end: Any = 1.0, guess_mode: bool = False,
                control_resize_mode: Any = "just_resize", prompt_2=None,
                negative_prompt_2=None, denoising_end: float | None = None, refiner: "Pipeline | None" = None,
                refiner_switch_at: float | None = None) -> GenerationResult:
        """Text to image. `latents` ([batch, 4, lh, lw], unscaled standard-normal noise, as diffusers'
        `latents`) replaces the seeded initial noise. `cache_interval` N > 1 (all three modes) runs the
        whole U-Net on every N-th network call and only its shallow part in between, reusing the deep
        feature (DeepCache; the folder needs `build-engine --step-cache`); `cache_schedule` is
        "uniform" or DeepCache's "nonuniform" (runtime/sampling/deepcache.py). `prompt_syntax` "a1111" (default)
        applies A1111's emphasis and BREAK to prompts that use them (runtime/text/prompt_syntax.py; a
        prompt without them encodes exactly as before), "none" reads prompts literally. `vae_tiling`
        True (or a tile size in pixels) decodes and encodes in blended tiles, for big images in
        bounded memory (runtime/imaging/tiling.py); None tiles only where the folder's VAE cannot take
        the size whole or the whole-image pass would exceed `max_memory_gb` and tiles would not. Variation seeds (all three modes; A1111's, runtime/sampling/variation.py): `subseed_strength`
        in [0, 1] mixes the noise of `subseed` (an int gives image i subseed + i; a list one per image;
        None a random one) into the seed's by A1111's slerp, and a single `seed` is then every image's
        seed; `seed_resize_from` (height, width) draws the seed's noise at that size and pastes it
        centred. Strength 0 without a resize changes nothing. `hires` (a `HiresFix`) adds A1111's
        hires fix: the image is upscaled and denoised again as img2img at the larger size, in this
        one call (runtime/hires.py). `num_inference_steps`, `guidance_scale` and `scheduler` left at None
        are the folder's recommended ones (an LCM or Turbo folder's; manifest "defaults",
        runtime/sampling/defaults.py), else 50 steps, 7.5 and its scheduler's sampler. `tiling` True makes a seamless
        texture: the U-Net and VAE run with circular padding (A1111's `tiling`; the folder needs
        `build-engine --tiling`). `vae` "tiny" decodes (and img2img / inpaint encode) with the folder's
        tiny autoencoder (TAESD: `build-engine --tiny-vae`, or a folder whose VAE is one); "full", the
        default, with its own VAE. `timestep_spacing` ("leading", "trailing", "linspace") replaces the
        folder's scheduler config's for this request (A1111's "SGM Uniform" is "trailing").
        ControlNet (all three modes; the folder needs `build-engine --controlnet`;
        runtime/control.py): `control_image` (PIL or [H, W, 3] uint8 / float array, or a list: one per
        ControlNet), `controlnet` (the folder's ControlNet name, or a list; default: the folder's only
        one), `controlnet_conditioning_scale`, `control_guidance_start`, `control_guidance_end` (each one
        value or a list) and `guess_mode`, as diffusers' StableDiffusionControlNetPipeline;
        `control_resize_mode` (runtime/control.py RESIZE_MODES) brings each control image to the
        request size. `Pipeline.controlnets` lists the folder's ControlNets.

        `prompt_2` / `negative_prompt_2` (all three modes; SDXL folders):
        the second text encoder's prompts, as diffusers' (None: the same as prompt / negative_prompt);
        in a folder whose pipeline config sets force_zeros_for_empty_prompt, an empty negative prompt
        (both of them) gives zero unconditional embeddings (A1111's rule; diffusers zeros only a None one).

        The SDXL base -> refiner hand-over (runtime/handover.py): `denoising_end` F in (0, 1) stops at that
        fraction of the schedule (diffusers' denoising_end; use output_type "latent" and hand the latents to
        another folder's `img2img(image=latents, denoising_start=F)`); `refiner` (another Pipeline, e.g. an
        SDXL refiner folder) with `refiner_switch_at` F does both in this call: this folder runs the first F
        of the steps, the refiner the rest, on the same seeds, steps, sampler and guidance."""
        if refiner is not None or refiner_switch_at is not None:
            denoising_end = handover.switch_point(self, refiner, refiner_switch_at, denoising_end)
        request = self.request("txt2img", prompt, negative_prompt=negative_prompt, height=height, width=width,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, scheduler=scheduler, karras=karras, seed=seed,
                               num_images_per_prompt=num_images_per_prompt, eta=eta, output_type=output_type,
                               noise=latents, cache_interval=cache_interval, cache_schedule=cache_schedule,
                               prompt_syntax=prompt_syntax, vae_tiling=vae_tiling, subseed=subseed,
                               subseed_strength=subseed_strength, seed_resize_from=seed_resize_from, hires=hires,
                               tiling=tiling, vae=vae,
                               timestep_spacing=timestep_spacing, control_image=control_image, controlnet=controlnet,
                               controlnet_conditioning_scale=controlnet_conditioning_scale,
                               control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                               guess_mode=guess_mode, control_resize_mode=control_resize_mode,
                               prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, denoising_end=denoising_end)
        if refiner is not None:
            return handover.refine(self, refiner, request, callback=callback, progress=progress)
        return self.generate([request], callbacks=[callback], progress=progress)[0]

    def img2img(self, prompt, image, strength: float = 0.75, negative_prompt=None, height: int | None = None,
                width: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                scheduler: str | None = None, karras: bool | None = None, seed=None,
                num_images_per_prompt: int = 1, eta: float = 0.0, output_type: str = "pil",
                callback: Callback | None = None, progress: bool = True, noise: np.ndarray | None = None,
                encode_noise: np.ndarray | None = None, cache_interval: int = 1,
                cache_schedule: str = "uniform",
                prompt_syntax: str = "a1111", vae_tiling: bool | int | None = None, subseed=None,
                subseed_strength: float = 0.0, seed_resize_from=None,
                initial_noise_multiplier: float = 1.0,
                tiling: bool = False, vae: str = "full",
                timestep_spacing: str | None = None, control_image: Any = None, controlnet: Any = None,
                controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
                control_guidance_end: Any = 1.0, guess_mode: bool = False,
                control_resize_mode: Any = "just_resize", prompt_2=None,
                negative_prompt_2=None, denoising_start: float | None = None,
                denoising_end: float | None = None) -> GenerationResult:
        """Image to image: the init image is encoded, noised to the level `strength` gives
        (1.0 = pure noise), and denoised over the remaining int(steps * strength) steps.
        `noise` replaces the seeded noise added to the init latents; `encode_noise` the seeded
        VAE-encode sample noise (each [batch, 4, lh, lw]). `initial_noise_multiplier` scales that
        noise (A1111's). `subseed`, `subseed_strength`, `seed_resize_from`: as txt2img's (the
        VAE-encode noise stays the seed's). `image` may be latents instead ([batch or 1, 4, lh, lw], as
        txt2img's output_type "latent" gives them): no VAE encode. `denoising_start` F in (0, 1) (diffusers'):
        the hand-over's second half, from latents a run with `denoising_end` F left noisy, taken as they are
        and denoised from that point of the schedule (strength is then ignored); `denoising_end` stops early."""
        request = self.request("img2img", prompt, image=image, strength=strength, negative_prompt=negative_prompt,
                               height=height, width=width, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, scheduler=scheduler,
                               karras=karras, seed=seed, num_images_per_prompt=num_images_per_prompt, eta=eta,
                               output_type=output_type, noise=noise, encode_noise=encode_noise,
                               cache_interval=cache_interval, cache_schedule=cache_schedule,
                               prompt_syntax=prompt_syntax, vae_tiling=vae_tiling, subseed=subseed,
                               subseed_strength=subseed_strength, seed_resize_from=seed_resize_from,
                               initial_noise_multiplier=initial_noise_multiplier, tiling=tiling,
                               vae=vae,
                               timestep_spacing=timestep_spacing, control_image=control_image, controlnet=controlnet,
                               controlnet_conditioning_scale=controlnet_conditioning_scale,
                               control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                               guess_mode=guess_mode, control_resize_mode=control_resize_mode,
                               prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                               denoising_start=denoising_start, denoising_end=denoising_end)
        return self.generate([request], callbacks=[callback], progress=progress)[0]

    def inpaint(self, prompt, image, mask_image, strength: float = 1.0, negative_prompt=None,
                height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                scheduler: str | None = None, karras: bool | None = None, seed=None,
                num_images_per_prompt: int = 1, eta: float = 0.0, output_type: str = "pil",
                callback: Callback | None = None, progress: bool = True, noise: np.ndarray | None = None,
                encode_noise: np.ndarray | None = None, masked_encode_noise: np.ndarray | None = None,
                cache_interval: int = 1, cache_schedule: str = "uniform",
                prompt_syntax: str = "a1111", vae_tiling: bool | int | None = None, subseed=None,
                subseed_strength: float = 0.0, seed_resize_from=None,
                masked_content: str | None = None, padding_mask_crop: int | None = None,
                mask_blur: int | tuple[int, int] = 0, soft_mask: bool = False, overlay: bool | None = None,
                initial_noise_multiplier: float = 1.0,
                tiling: bool = False, vae: str = "full",
                timestep_spacing: str | None = None, control_image: Any = None, controlnet: Any = None,
                controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
                control_guidance_end: Any = 1.0, guess_mode: bool = False,
                control_resize_mode: Any = "just_resize", prompt_2=None,
                negative_prompt_2=None) -> GenerationResult:
        """Repaint where `mask_image` is white (>= 0.5). With the 9-channel inpainting U-Net the
        mask and the masked image's latents go into the U-Net (diffusers'
        StableDiffusionInpaintPipeline); with a plain 4-channel U-Net the known region is blended back
        after every step. `encode_noise` / `masked_encode_noise` replace the seeded VAE-encode noise
        of the image / of the masked image (the latter only used by the 9-channel U-Net). `subseed`,
        `subseed_strength`, `seed_resize_from`: as txt2img's (the VAE-encode noise stays the seed's).

        A1111's inpainting (runtime/imaging/inpainting.py), taken when any of these is given: `masked_content`
        "fill" | "original" | "latent_noise" | "latent_nothing" (A1111's inpainting_fill 0-3);
        `padding_mask_crop` N: only masked (the mask's box plus N pixels, at the request's aspect
        ratio, generated at the request size and pasted back; diffusers' name); `mask_blur` (x, y)
        or one sigma in pixels; `soft_mask` (the latent mask keeps grey levels: A1111 mask_round
        false); `overlay` (default True: the original composited back outside the mask)."""
        request = self.request("inpaint", prompt, image=image, mask_image=mask_image, strength=strength,
                               negative_prompt=negative_prompt, height=height, width=width,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, scheduler=scheduler, karras=karras, seed=seed,
                               num_images_per_prompt=num_images_per_prompt, eta=eta, output_type=output_type,
                               noise=noise, encode_noise=encode_noise, masked_encode_noise=masked_encode_noise,
                               cache_interval=cache_interval, cache_schedule=cache_schedule,
                               prompt_syntax=prompt_syntax, vae_tiling=vae_tiling, subseed=subseed,
                               subseed_strength=subseed_strength, seed_resize_from=seed_resize_from,
                               masked_content=masked_content, padding_mask_crop=padding_mask_crop, mask_blur=mask_blur,
                               soft_mask=soft_mask, overlay=overlay, initial_noise_multiplier=initial_noise_multiplier,
                               tiling=tiling, vae=vae,
                               timestep_spacing=timestep_spacing, control_image=control_image, controlnet=controlnet,
                               controlnet_conditioning_scale=controlnet_conditioning_scale,
                               control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                               guess_mode=guess_mode, control_resize_mode=control_resize_mode,
                               prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)
        return self.generate([request], callbacks=[callback], progress=progress)[0]

    def request(self, mode: str, prompt: Any, *, prompt_tags: lora_tags.TaggedPrompts | None = None,
                **settings: Any) -> Request:
        """A validated `Request` for this folder (the keyword arguments of txt2img/img2img/inpaint;
        `noise` is txt2img's `latents`), prepared once for the stages: checked against the folder's
        limits (its memory estimate included), its sampler schedule built (so steps x strength
        leaving no step, or Karras sigmas for a sampler without them, fail here) and its prompts
        tokenized (the chunk count is part of `batch_key()`). Nothing downstream recomputes these.
        A1111 LoRA tags (`<lora:NAME:WEIGHT>`, runtime/text/lora_tags.py) are honoured when this
        folder was built with that LoRA at that weight (the encoder then reads the prompt without
        them), else refused; `prompt_tags` is their parse when the caller (the server's routing)
        has it already."""
        r = make_request(self.limits, mode, prompt, **settings)
        r = self._prepare_request(r, text=self._lora_text(r, prompt_tags))
        if r.hires is not None:  # the hires fix's second pass: its own schedule (and prompts' tokens)
            hr = r.hires.request
            same = hr.prompts == r.prompts and hr.negative_prompts == r.negative_prompts
            try:
                hr = self._prepare_request(hr, tokens=r.tokens if same else None,
                                           text=None if same else self._lora_text(hr, None))
            except PipelineError as e:
                if e.field in ("prompt", "negative_prompt"):
                    raise PipelineError(f"hires {e.field}: {e}", field=f"hires.{e.field}") from e
                raise PipelineError(f"hires: {e}", field="hires.scheduler") from e
            r = dataclasses.replace(r, hires=dataclasses.replace(r.hires, request=hr))
        return r

    def _lora_text(self, r: Request, tagged: lora_tags.TaggedPrompts | None) -> tuple[str, ...]:
        """The prompts the text encoder reads: without their LoRA tags, each one checked against the
        LoRAs this folder was built with."""
        if tagged is None:
            tagged = lora_tags.parse_prompts(r.prompts, r.negative_prompts)
        elif tagged.source != r.prompts:
            raise PipelineError("prompt_tags were parsed from other prompts than this request's", field="prompt")
        bad = lora_tags.missing(tagged.tags, self.loras)
        if bad:
            raise PipelineError(f"LoRA tag {bad[0].text} cannot be honoured: engine folder {self.engine_dir.name} "
                                f"was built with {lora_tags.describe_offer(self.loras)} (LoRAs are fused at build "
                                "time: build-engine --lora FILE:WEIGHT)", field="prompt")
        return tagged.text

    def _prepare_request(self, r: Request, tokens: Any = None, text: tuple[str, ...] | None = None) -> Request:
        try:
            config = self.manifest.scheduler if r.timestep_spacing is None else {
                **self.manifest.scheduler, "timestep_spacing": r.timestep_spacing}  # A1111's "SGM Uniform"
            schedule = sch.make_schedule(config, r.sampler, r.steps, strength=r.strength,
                                         strength_in_schedule=self.family.strength_in_schedule,
                                         karras=r.karras, prediction_type=self.manifest.prediction_type,
                                         denoising_start=r.denoising_start, denoising_end=r.denoising_end)
        except sch.SchedulerError as e:
            raise PipelineError(f"scheduler {r.sampler!r}: {e}", field="scheduler") from e
        used = embeddings_used([*(r.prompts if text is None else text), *r.negative_prompts], self._embeddings)
        if tokens is not None:
            return dataclasses.replace(r, tokens=tokens, schedule=schedule, embeddings_used=used)
        second = None if self.tokenizer_2 is None else (self.tokenizer_2, r.prompts_2 or r.prompts,
                                                         r.negative_prompts_2 or r.negative_prompts)
        with self._tokenizer_lock:
            tokens = stages.tokenize_prompts(self.tokenizer, r.prompts if text is None else text, r.negative_prompts,
                                             guided=r.guided, max_length=self.manifest.dims.text_max_length,
                                             syntax=r.prompt_syntax, embeddings=self._embeddings, second=second,
                                             zero_empty_negative=self.manifest.pipeline.get(
                                                 "force_zeros_for_empty_prompt", False))
        return dataclasses.replace(r, tokens=tokens, schedule=schedule, embeddings_used=used)

    def encode_prompt(self, tokens: stages.PromptTokens, images_per_prompt: int) -> stages.Conditioning:
        """The text stage over the family's text encoders (runtime/families.py `text_encoders`)."""
        encoders = [(self.engine(use.network), use) for use in self.family.text_encoders]
        dims = self.manifest.dims
        return stages.encode_prompt(encoders, tokens, images_per_prompt=images_per_prompt,
                                    max_length=dims.text_max_length, hidden_output=dims.hidden_output)

    def generate(self, requests: Sequence[Request], *, callbacks: Sequence[Callback | None] | None = None,
                 should_stop: Sequence[Callable[[], bool] | None] | None = None,
                 progress: bool = True) -> list[GenerationResult]:
        """Run compatible requests as one engine batch; one result per request, each identical to what
        the request gives alone. `callbacks[i](step, t, latents_i)` follows request i's progress;
        `should_stop[i]()` is asked before each network call, and once every request of the batch
        asks to stop, the run ends with GenerationCancelled."""
        requests = list(requests)
        callbacks = list(callbacks) if callbacks is not None else [None] * len(requests)
        should_stop = list(should_stop) if should_stop is not None else [None] * len(requests)
        if not requests or len(callbacks) != len(requests) or len(should_stop) != len(requests):
            raise PipelineError("generate needs at least one request, and one callback / should_stop entry "
                                "per request when given")
        self._check_batch(requests)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        prepared = self._prepare(requests, timings)
        latents = self._denoise(prepared, callbacks, should_stop, progress, timings)
        final = requests[0]
        if final.hires is not None:  # equal batch keys: every request has the same hires pass
            latents = hires_fix.second_pass(self, prepared, latents, callbacks, should_stop, progress, timings)
            final = final.hires.request
        images = self._decode(latents, final, timings)
        timings["total"] = time.perf_counter() - t_start
        return self._results(requests, images, timings)

    # -- lifecycle -------------------------------------------------------------------------------

    def engine(self, network: str) -> Engine:
        """The engine of `network`, opening an optional network of the folder on first use."""
        engine = self.engines.get(network)
        if engine is not None:
            return engine
        if network not in self.manifest.networks:
            raise PipelineError(f"this needs the {network} network, which engine folder {self.engine_dir} lacks")
        with self._engines_lock:
            if network not in self.engines:
                module = backend_module(self.backend)
                # a tiled variant takes its base network's options (runtime/folder/networks.py)
                self.engines[network] = open_network(module, self.backend, self.engine_dir, self.manifest, network,
                                                     network_options(self._options, {}, base_network(network)))
            return self.engines[network]

    def close(self) -> None:
        """Close every engine (waiting for calls in flight). Idempotent."""
        with self._engines_lock:
            close_all(self.engines)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the chain -------------------------------------------------------------------------------

    def _check_batch(self, requests: list[Request]) -> None:
        keys = {r.batch_key() for r in requests}
        if len(keys) > 1:
            chunks = sorted({r.prompt_chunks for r in requests if r.prompt_chunks is not None})
            detail = f" (their prompts encode to {chunks} 77-token chunks)" if len(chunks) > 1 else ""
            raise PipelineError("requests of one batch must share mode, size, steps, sampler, guidance, eta, strength, "
                                f"output type, step caching and prompt chunk count; got {len(keys)} different "
                                f"settings{detail}")
        total = sum(r.batch for r in requests)
        if total > self.limits.max_batch:
            raise PipelineError(f"{total} images in one batch exceed the engine's max batch {self.limits.max_batch}")
        if any(r.tokens is None or r.schedule is None for r in requests):
            raise PipelineError("requests must be made by Pipeline.request (it tokenizes the prompts and builds the "
                                "schedule once)")
        if len(requests) > 1:  # each request was checked alone; together they must fit in memory too
            r = requests[0]
            check_memory(self.limits, total, r.height, r.width, guided=r.guided, encodes=r.mode != "txt2img",
                         vae_tile=r.vae_tile)
        if any(self.engines.get(n) is not None and self.engines[n].closed for n in self.engines):
            raise EngineClosedError(f"the pipeline over {self.engine_dir} is closed")

    def _prepare(self, requests: list[Request], timings: dict[str, float]) -> list[_Prepared]:
        m, s = self.manifest, self.vae_scale_factor
        out = []
        for r in requests:
            t0 = time.perf_counter()
            cond = self.encode_prompt(r.tokens, r.images_per_prompt)
            _add(timings, "text_encoder", time.perf_counter() - t0)
            draws = stages.initial_noise(r, (m.dims.latent_channels, r.height // s, r.width // s),
                                         self.is_inpainting_unet)
            t0 = time.perf_counter()
            graph = m.vae_graph("vae_encoder", r.vae, r.tiling)  # the tiny or circular-padded one where asked
            encoder = self.engine(graph) if r.mode != "txt2img" and r.init_latents is None else None
            latents = stages.encode_images(encoder, r, draws, scaling_factor=m.vae_scaling_factor(graph), vae_scale_factor=s,
                                           inpainting_unet=self.is_inpainting_unet, tile=r.vae_tile)
            if r.mode != "txt2img":
                _add(timings, "vae_encode", time.perf_counter() - t0)
            if r.initial_noise_multiplier != 1.0:  # A1111 Img2Img.sample: x *= initial_noise_multiplier
                draws = replace(draws, noise=draws.noise * np.float32(r.initial_noise_multiplier))
            out.append(_Prepared(r, cond, draws, latents))
        return out

    def _denoise(self, prepared: list[_Prepared], callbacks: list[Callback | None],
                 should_stop: list[Callable[[], bool] | None], progress: bool, timings: dict[str, float]) -> np.ndarray:
        r = prepared[0].request
        schedule = r.schedule  # equal batch keys: one schedule serves the batch
        cond = _concat([p.text for p in prepared], stages.Conditioning)
        latents = _concat([p.latents for p in prepared], stages.ImageLatents)
        noise = np.concatenate([p.draws.noise for p in prepared])
        rngs = [g for p in prepared for g in p.draws.rngs]
        rng = rngs[0] if len(rngs) == 1 else stages.BatchRNG(rngs)
        bar = _progress(len(schedule.timesteps), progress, f"{r.mode} ({r.sampler}, {self.backend})")
        t0 = time.perf_counter()
        try:
            out = stages.denoise(self._unet_fn(r, len(schedule.timesteps), [p.request for p in prepared]), schedule, self.family, cond, noise,
                                 latents, guidance_scale=r.guidance_scale, guidance_rescale=r.guidance_rescale, eta=r.eta,
                                 rng=rng, callback=_split_callback(prepared, callbacks),
                                 on_call=_on_call(bar, should_stop), dims=self.manifest.dims)
        finally:
            bar.close()
        timings["denoise"] = time.perf_counter() - t0
        return out

    def _unet_fn(self, request: Request, n_calls: int, requests: Sequence[Request] = ()) -> stages.UnetFn:
        """The U-Net callable of one run: the unet engine, or with step caching the unet_deep /
        unet_shallow pair routed by the request's plan (runtime/sampling/deepcache.py), or with
        ControlNets the ControlNet engines feeding unet_control (runtime/control.py; `requests`: the
        batch, whose control images are stacked by row)."""
        if request.control is not None:
            return self._control_fn(request, n_calls, list(requests) or [request])
        if request.cache_interval == 1:
            return stages.engine_unet(self.engine(tiled_network("unet", request.tiling)))
        deep, shallow = caching.engine_calls(self.engine("unet_deep"), self.engine("unet_shallow"))
        return caching.cached_unet(deep, shallow, caching.plan(n_calls, request.cache_interval,
                                                               request.cache_schedule))

    def _control_fn(self, request: Request, n_calls: int, requests: list[Request]) -> stages.UnetFn:
        units = request.control.units  # equal batch keys: the same ControlNets, scales and guidance range
        images = [np.concatenate([np.repeat(r.control.units[k].image.transpose(2, 0, 1)[None], r.batch, axis=0)
                                  for r in requests]) for k in range(len(units))]  # [batch, 3, H, W] in [0, 1]
        dims = self.manifest.dims
        return control.controlled_unet(
            self.engine("unet"), self.engine(CONTROL_UNET), [self.engine(controlnet_network(u.name)) for u in units],
            images, request.control, n_calls=n_calls, guided=request.guided, latent_channels=dims.latent_channels,
            residual_names=[t.name for t in control_residual_specs(dims)])

    def _decode(self, latents: np.ndarray, request: Request, timings: dict[str, float]) -> Any:
        if request.output_type == "latent":
            return latents
        t0 = time.perf_counter()
        images = self.decode(request, latents)
        timings["vae_decode"] = time.perf_counter() - t0
        return images

    def decode(self, request: Request, latents: np.ndarray) -> np.ndarray:
        """Latents of `request`'s run (the final ones, or those of an interrupted run) to float32 NHWC
        images in [0, 1], tiled as the request says."""
        s = self.vae_scale_factor
        decoder = self.engine(self.manifest.vae_graph("vae_decoder", request.vae, request.tiling))
        images = stages.decode(decoder, latents, tile=request.vae_tile, scale=s)
        want = tuple(d * s for d in latents.shape[-2:])
        if tuple(images.shape[1:3]) != want:  # the graph's axes are symbolic: only its output can tell
            raise ManifestError(f"{self.engine_dir}: the VAE decoder made {tuple(images.shape[1:3])} images of "
                                f"{tuple(latents.shape[-2:])} latents, not the {want} the manifest's vae_scale_factor "
                                f"{s} implies: the manifest does not describe its graphs")
        return images

    def preview(self, latents: np.ndarray) -> np.ndarray:
        """uint8 RGB live previews [batch, H, W, 3] of latents [batch, C, h, w] as the loop holds them:
        decoded by the folder's tiny VAE where it has one (image size), else A1111's cheap linear
        preview (latent size; runtime/imaging/preview.py)."""
        if self.limits.tiny_vae is None:
            return live_preview.latents_to_rgb(latents)
        decoder = self.engine(self.manifest.vae_graph("vae_decoder", "tiny"))
        return live_preview.decoded_preview(lambda z: stages.decode(decoder, z, scale=self.vae_scale_factor), latents)

    def _results(self, requests: list[Request], images: Any, timings: dict[str, float]) -> list[GenerationResult]:
        unet = self.engine("unet").info
        results, start = [], 0
        for r in requests:
            own = images[start:start + r.batch]
            start += r.batch
            if r.inpainting is not None and r.output_type != "latent":  # A1111's overlay (runtime/imaging/inpainting.py)
                own = inpainting.composite(r, own)
            if r.output_type == "pil":
                own = imgs.to_pil(own)
            params = {**r.parameters(), "engine": str(self.engine_dir), "backend": self.backend,
                      "precision": self.manifest.precision}
            if unet.weights == "int8":  # build-engine --quantize int8 | int8-weights, run by OpenVINO
                params["unet"] = "int8"
                params["quantization"] = self.manifest.quantization
            results.append(GenerationResult(images=own, seeds=list(r.seeds), timings=dict(timings),
                                            backend=self.backend, parameters=params))
        return results


# --- helpers ----------------------------------------------------------------------------------------------

def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def _concat(parts: list[Any], cls: type) -> Any:
    """Concatenate the array fields of per-request stage outputs along the batch axis."""
    fields = {}
    for name in cls.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        fields[name] = None if values[0] is None else np.concatenate(values)
    return cls(**fields)


def _split_callback(prepared: list[_Prepared], callbacks: list[Callback | None]) -> Callback | None:
    """One sampler callback that hands each request its own rows of the batch latents."""
    if not any(callbacks):
        return None
    bounds, start = [], 0
    for p in prepared:
        bounds.append((start, start + p.request.batch))
        start += p.request.batch

    def callback(i: int, t: float, latents: np.ndarray) -> None:
        for cb, (a, b) in zip(callbacks, bounds):
            if cb is not None:
                cb(i, t, latents[a:b])

    return callback


def _on_call(bar: Any, should_stop: list[Callable[[], bool] | None]) -> Callable[[int], None]:
    def on_call(i: int) -> None:
        if all(stop is not None and stop() for stop in should_stop):
            raise GenerationCancelled(f"cancelled before network call {i + 1}")
        bar.update(1)

    return on_call


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


def load(engine_dir: str | Path, backend: str | None = None, options: dict[str, dict[str, Any]] | None = None, *,
         calibrate: bool = True, verify: bool = False, max_memory_gb: float | None = None,
         **engine_options: Any) -> Pipeline:
    """Open an engine folder. `backend` names the engine backend ("openvino", "onnxruntime",
    "tensorrt", "torch"); None takes the best here: TensorRT where its plans match the GPU, else the
    CPU backend measured fastest for this folder on this machine (measured once and remembered,
    runtime/engines/calibration.py; `calibrate=False` takes the first usable instead).
    `pipe.backend` says which, `pipe.backend_reason` why; both are logged.
    `options` maps a network ("text_encoder", "unet", "vae_decoder", "vae_encoder", or "*" for all)
    to its backend options; plain keyword options are shorthand for "*". If anything fails, what was
    opened is closed again.

    Before anything opens, every path of the folder must stay inside it and every file must match the
    manifest's size and fingerprint (first and last MiB); `verify=True` checks every file's full
    sha256 instead (docs/security.md says what each guarantees and costs). `max_memory_gb` (GiB)
    bounds a request's estimated memory (runtime/memory.py): larger requests raise PipelineError
    before they run; None (default) is this machine's memory, float("inf") no limit."""
    memory_limit(max_memory_gb)  # a bad value fails before anything opens
    manifest = load_manifest(engine_dir)
    # the VAE encoder opens on first use (img2img, inpainting): a txt2img process never holds it
    name, why, engines = open_engines_why(engine_dir, manifest, backend, options, calibrate=calibrate, verify=verify,
                                          networks=eager_networks(manifest), **engine_options)
    try:
        tokenizer, tokenizer_2 = (_tokenizer(engine_dir, t) for t in (manifest.tokenizer,
                                                                       manifest.tokenizer.get("tokenizer_2")))
    except (OSError, ValueError) as e:
        close_all(engines)
        raise ManifestError(f"{engine_dir}: cannot load the tokenizer: {e}") from e
    except BaseException:
        close_all(engines)
        raise
    per_network = {**{k: dict(v) for k, v in (options or {}).items()}}
    if engine_options:
        per_network["*"] = {**per_network.get("*", {}), **engine_options}
    unet = engines["unet"].info
    log.info("engine folder %s: %s %s on backend %s (%s; U-Net %s weights, %s compute)", engine_dir, manifest.family,
             manifest.precision, name, why, unet.weights, unet.compute)
    return Pipeline(engine_dir, manifest, name, engines, tokenizer, options=per_network, backend_reason=why,
                    max_memory_gb=max_memory_gb, tokenizer_2=tokenizer_2)


def eager_networks(manifest: Manifest) -> tuple[str, ...]:
    """The networks `load` opens: EAGER_NETWORKS with the family's first text encoder for text_encoder."""
    first = family_of(manifest.family).text_encoders[0].network
    return tuple(first if n == "text_encoder" else n for n in EAGER_NETWORKS)


def _tokenizer(engine_dir: str | Path, tok: dict[str, Any] | None) -> Any:
    """The tokenizer a manifest tokenizer entry names (None for no entry: a folder without tokenizer_2)."""
    if tok is None:
        return None
    return text.load_tokenizer(inside(engine_dir, tok.get("dir", "tokenizer"), "the tokenizer names folder", kind="dir"),
                               tok.get("pad_token"))
