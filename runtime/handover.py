"""The SDXL base -> refiner hand-over in one call (Podell et al. arXiv:2307.01952 §2.5, "ensemble of
expert denoisers"), as diffusers runs it:

    latents = base(prompt, denoising_end=0.8, output_type="latent").images            # StableDiffusionXLPipeline
    image = refiner(prompt, image=latents, denoising_start=0.8).images                # ...Img2ImgPipeline

    with runtime.load("engines/sdxl") as base, runtime.load("engines/sdxl-refiner") as refiner:
        image = base.txt2img("a lion", refiner=refiner, refiner_switch_at=0.8).images[0]

The base folder runs its schedule down to the switch point (`Request.denoising_end`; the timesteps at
or above diffusers' `discrete_timestep_cutoff`, runtime/scheduler.py `timestep_cutoff`) and returns its
latents still noisy; the refiner folder runs img2img of those latents from the same point
(`Request.denoising_start`: the schedule's timesteps below the cutoff, no noise added) with the same
prompts, seeds, steps, sampler, guidance and eta. Both requests are prepared (validated, tokenized,
scheduled) before either runs; the refiner's init latents are filled in once the base has made them,
as the hires fix fills in its images (runtime/hires.py). The refiner reads `prompt` and
`negative_prompt` (diffusers' refiner zips prompt_2 away with its missing first encoder); a
textual-inversion name they use (`Request.embeddings_used`) must be one of the refiner folder's too, or
the hand-over is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import PipelineError

if TYPE_CHECKING:
    from runtime.pipeline import GenerationResult, Pipeline
    from runtime.request import Request

__all__ = ["DEFAULT_SWITCH", "check_embeddings", "continued", "merged", "refine", "refiner_request", "switch_point"]

# diffusers' SDXL documentation runs the hand-over at high_noise_frac = 0.8 (docs/source/en/using-diffusers/sdxl.md,
# "Base to refiner model"); A1111's refiner_switch_at defaults to 0.8 too (modules/processing.py)
DEFAULT_SWITCH = 0.8


def switch_point(base: "Pipeline", refiner: Any, switch_at: Any, denoising_end: Any) -> float:
    """The fraction of the schedule where `refiner` takes over from `base` (None: DEFAULT_SWITCH),
    checked: a refiner Pipeline whose latents are the base's (channels, VAE scale), no denoising_end too."""
    from runtime.pipeline import Pipeline  # this module is imported by runtime/pipeline.py

    if not isinstance(refiner, Pipeline):
        raise PipelineError(f"refiner must be a Pipeline (runtime.load(refiner_folder)); got {type(refiner).__name__}",
                            field="refiner")
    if denoising_end is not None:
        raise PipelineError("a refiner takes over at refiner_switch_at: leave denoising_end unset", field="denoising_end")
    switch = DEFAULT_SWITCH if switch_at is None else switch_at
    if isinstance(switch, bool) or not isinstance(switch, numbers.Real) or not 0.0 < float(switch) < 1.0:
        raise PipelineError(f"refiner_switch_at must be a number in (0, 1); got {switch_at!r}", field="refiner_switch_at")
    ours, theirs = base.manifest.dims, refiner.manifest.dims
    if (ours.latent_channels, ours.vae_scale_factor) != (theirs.latent_channels, theirs.vae_scale_factor):
        raise PipelineError(f"refiner {refiner.engine_dir} works on latents of {theirs.latent_channels} channels at 1/"
                            f"{theirs.vae_scale_factor} scale, this folder makes {ours.latent_channels} at 1/"
                            f"{ours.vae_scale_factor}: it cannot continue them", field="refiner")
    return float(switch)


def refiner_request(refiner: "Pipeline", first: "Request", output_type: str | None = None) -> "Request":
    """The refiner's img2img request continuing `first` (a request with `denoising_end`), prepared by
    the refiner (its tokenizer, its scheduler config); one prompt per image, each image keeping its
    seed; `output_type` None: first's. Its init latents are a placeholder until the base has run
    (`continued`)."""
    n = first.images_per_prompt

    def per_image(texts: tuple[str, ...]) -> list[str]:
        return [t for t in texts for _ in range(n)]

    check_embeddings(refiner.manifest, refiner.engine_dir.name, first)
    s = refiner.vae_scale_factor
    placeholder = np.zeros((first.batch, refiner.manifest.dims.latent_channels, first.height // s, first.width // s),
                           dtype=np.float32)
    tile = None if first.vae_tile is None else first.vae_tile * s
    try:
        return refiner.request(
            "img2img", per_image(first.prompts), image=placeholder, negative_prompt=per_image(first.negative_prompts),
            num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
            guidance_rescale=first.guidance_rescale, scheduler=first.sampler, karras=first.karras,
            seed=list(first.seeds), eta=first.eta, output_type=output_type or first.output_type,
            prompt_syntax=first.prompt_syntax,
            vae_tiling=tile, timestep_spacing=first.timestep_spacing, denoising_start=first.denoising_end)
    except PipelineError as e:
        raise PipelineError(f"refiner {refiner.engine_dir.name}: {e}", field=e.field) from e


def check_embeddings(manifest: Any, name: str, first: "Request") -> None:
    """Refuse a hand-over to the refiner folder `name` (its `manifest`) whose prompts use a
    textual-inversion name of the base folder (`first.embeddings_used`) that the refiner lacks: it
    would read the name as words. A server checks this from the manifest before the base runs."""
    ours = {n.lower() for n in manifest.tokenizer.get("embeddings") or {}}
    missing = [e for e in first.embeddings_used if e.lower() not in ours]
    if missing:
        raise PipelineError(f"refiner {name}: the prompts use the embedding(s) {', '.join(missing)}, which the refiner "
                            "folder lacks, so it would read them as words; build it with --embedding FILE:NAME (an "
                            "SDXL embedding's clip_g vectors)", field="refiner")


def refine(base: "Pipeline", refiner: "Pipeline", first: "Request", *, callback: Any = None,
           progress: bool = True) -> "GenerationResult":
    """Run `first` (prepared by `base`, with its denoising_end) to its noisy latents, then the refiner
    from there; one result: the refiner's images, the base's timings prefixed "base_", and parameters
    naming the refiner and the switch point."""
    second = refiner_request(refiner, first)  # prepared before anything runs: its errors cost nothing
    latents = base.generate([dataclasses.replace(first, output_type="latent")], callbacks=[callback],
                            progress=progress)[0]
    result = refiner.generate([continued(second, latents)], callbacks=[callback], progress=progress)[0]
    return merged(latents, result, refiner, first.denoising_end)


def continued(second: "Request", first_result: "GenerationResult") -> "Request":
    """The refiner's prepared request with the base run's latents (output_type "latent") as its init latents."""
    handed = np.array(first_result.images, dtype=np.float32)
    if handed.shape != second.init_latents.shape:
        raise PipelineError(f"the base run made latents of shape {list(handed.shape)}, the refiner's request expects "
                            f"{list(second.init_latents.shape)}")
    handed.flags.writeable = False
    return dataclasses.replace(second, init_latents=handed)


def merged(first: "GenerationResult", second: "GenerationResult", refiner: "Pipeline",
           switch: float) -> "GenerationResult":
    """One result of a hand-over: the refiner's images, the base's timings prefixed "base_" before the
    refiner's, the base request's parameters (one prompt per prompt, not per image) naming the refiner
    folder and the switch point."""
    second.timings = {**{f"base_{k}": v for k, v in first.timings.items()}, **second.timings}
    stop = {k: v for k, v in second.parameters.items() if k == "interrupted_at_step"}  # a stopped server job's
    second.parameters = {**{k: v for k, v in first.parameters.items() if k != "denoising_end"},
                         "refiner": str(refiner.engine_dir), "refiner_switch_at": switch, **stop}
    return second
