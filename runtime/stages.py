"""The stages of one generation, each a function of its inputs with no hidden state:

    encode_prompt    prompts -> text embeddings (77-token chunks; conditional and unconditional)
    initial_noise    seeds -> the per-image random draws, in a fixed order
    encode_images    init images / masks -> latents (img2img, both kinds of inpainting)
    denoise          the sampler over a U-Net callable, with guidance and masking
    decode           latents -> images in [0, 1]

runtime/pipeline.py chains them for one request or a batch of compatible ones. Engines see only
NumPy arrays and cast them to their own dtypes (runtime/engines/base.py); between stages
everything is float32.

Randomness. Each image has its own `np.random.Generator(np.random.PCG64(seed))`, which draws, in
this fixed order, float32 standard normals of shape [latent_channels, lh, lw]: (1) the initial
noise, (2) for img2img / inpaint the VAE-encode noise of the init image, (3) for the 9-channel
inpainting U-Net the VAE-encode noise of the masked image. A draw is made even where an explicit
array replaces it, so the later draws do not move. Variation seeds and seed resizing
(runtime/sampling/variation.py) take their extra draws from separate generators (`PCG64(subseed)`, a fresh
`PCG64(seed)`) and only replace draw (1), so this order stays as it is. Stochastic samplers then draw their step noise
from the same generators, image by image (`BatchRNG`). The draws are NumPy's, never a backend's,
so one seed gives the same image on every backend, alone or in any batch.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.imaging import inpainting as a1111_inpainting
from runtime.imaging import images as imgs
from runtime.text import prompt_syntax as ps
from runtime import scheduler as sch
from runtime.text import tokens as text
from runtime.imaging import tiling as vae_tiling
from runtime.engines.base import Engine
from runtime.errors import ManifestError, PipelineError
from runtime.families import Conditioning, Family, TextEncoding
from runtime.folder.networks import ModelDims

if TYPE_CHECKING:
    from runtime.request import Request

UnetFn = Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray]], np.ndarray]  # (sample, timestep, inputs)


def warn_nonfinite(arr: np.ndarray, what: str, stage: str) -> bool:
    """Warn (RuntimeWarning naming the stage) if `arr` holds NaN or infinite values; return whether it did."""
    if np.isfinite(arr).all():
        return False
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    warnings.warn(
        f"stage {stage!r}: {what} hold {bad} NaN/infinite values of {np.size(arr)}; the images will not be "
        "valid (an fp16 engine overflowing? try an fp32 engine folder)", RuntimeWarning, stacklevel=3)
    return True


# --- prompt encoding ------------------------------------------------------------------------------------

__all__ = ["Conditioning"]  # defined with the families that read it (runtime/families.py); the text stage makes it


def expand_prompts(texts: Sequence[str], embeddings: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Multi-vector textual-inversion names written out as all their tokens (runtime/text/tokens.py)."""
    return [text.expand_embeddings(t, embeddings) for t in texts] if embeddings else list(texts)


def _weighted(texts: Sequence[str], syntax: str) -> bool:
    """Whether a request takes the A1111 weighting path: only when one of its texts uses the syntax,
    so a request without weighting syntax encodes exactly as runtime/text/tokens.py does."""
    return syntax == "a1111" and any(ps.has_weighting(t) for t in texts)


@dataclass(frozen=True)
class PromptTokens:
    """A request's prompts tokenized once (by `Pipeline.request`): ids [prompts, chunks, 77] int32
    of the prompts (`cond`) and, under guidance, of the negative prompts (`uncond`), all padded to
    one chunk count; with A1111 weighting, the per-token weights [prompts, chunks * 77] float32.
    `second`: SDXL's second tokenizer's tokens of prompt_2 / negative_prompt_2, at the same chunk
    count. `uncond_zeros`: per prompt, whether its unconditional embeddings are zeros instead (an empty
    negative prompt in a folder whose pipeline config sets force_zeros_for_empty_prompt), or None."""

    cond: np.ndarray
    uncond: np.ndarray | None = None
    cond_weights: np.ndarray | None = None
    uncond_weights: np.ndarray | None = None
    second: "PromptTokens | None" = None
    uncond_zeros: tuple[bool, ...] | None = None

    @property
    def n_chunks(self) -> int:
        return int(self.cond.shape[1])


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], negatives: Sequence[str], *, guided: bool,
                     max_length: int, syntax: str = "a1111",
                     embeddings: Mapping[str, Sequence[str]] | None = None,
                     second: tuple[Any, Sequence[str], Sequence[str]] | None = None,
                     zero_empty_negative: bool = False) -> PromptTokens:
    """Tokenize the prompts (and, under guidance, the negative prompts) in 77-token chunks, every text
    once; all of them take the chunk count of the longest (runtime/text/tokens.py), so cond and uncond
    share one shape. Textual-inversion names are expanded first; A1111 emphasis and BREAK
    (runtime/text/prompt_syntax.py) apply when `syntax` is "a1111" and a text uses them.

    `second` (SDXL): (the second tokenizer, prompts_2, negatives_2), tokenized the same way into
    `PromptTokens.second`, both at the larger chunk count (the hidden states are concatenated along
    the channels). `zero_empty_negative`: a prompt whose negative texts are all empty gets zero
    unconditional embeddings (`uncond_zeros`; A1111's sd_models_xl.py `force_zero_negative_prompt`,
    diffusers' force_zeros_for_empty_prompt)."""
    tokens = _tokenize(tokenizer, prompts, negatives, guided, max_length, syntax, embeddings, 1)
    zeros = None
    if guided and zero_empty_negative:
        negatives_2 = negatives if second is None else second[2]
        zeros = tuple(not a and not b for a, b in zip(negatives, negatives_2))
    if second is None:
        return dataclasses.replace(tokens, uncond_zeros=zeros)
    tokenizer_2, prompts_2, negatives_2 = second
    other = _tokenize(tokenizer_2, prompts_2, negatives_2, guided, max_length, syntax, embeddings, tokens.n_chunks)
    if other.n_chunks > tokens.n_chunks:
        tokens = _tokenize(tokenizer, prompts, negatives, guided, max_length, syntax, embeddings, other.n_chunks)
    return dataclasses.replace(tokens, second=other, uncond_zeros=zeros)


def _tokenize(tokenizer: Any, prompts: Sequence[str], negatives: Sequence[str], guided: bool, max_length: int,
              syntax: str, embeddings: Mapping[str, Sequence[str]] | None, min_chunks: int) -> PromptTokens:
    """One tokenizer's PromptTokens, at least `min_chunks` chunks (see `tokenize_prompts`)."""
    texts = expand_prompts(list(prompts) + (list(negatives) if guided else []), embeddings)
    n = len(prompts)
    if not _weighted(texts, syntax):
        ids = text.tokenize(tokenizer, texts, min_chunks, max_length)
        return PromptTokens(_frozen(ids[:n]), _frozen(ids[n:]) if guided else None)
    ids, weights = ps.tokenize_weighted(tokenizer, texts, min_chunks, max_length)
    if not guided:
        return PromptTokens(_frozen(ids), cond_weights=_frozen(weights))
    return PromptTokens(_frozen(ids[:n]), _frozen(ids[n:]), _frozen(weights[:n]), _frozen(weights[n:]))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def encode_prompt(encoders: Sequence[tuple[Engine, TextEncoding]], tokens: PromptTokens, *, images_per_prompt: int,
                  max_length: int, hidden_output: str = "last_hidden_state") -> Conditioning:
    """Run the text encoders (a family's `text_encoders`, with their engines) on a request's tokens:
    the prompts, then (under guidance) the negative prompts, each as one engine batch; A1111 weights,
    where the request has them, rescale each encoder's hidden states (runtime/text/prompt_syntax.py
    `apply_weights`; A1111 weights each SDXL embedder on its own), which are then concatenated along
    the channels. A pooled output comes from the first chunk (A1111 modules/sd_hijack_clip.py
    FrozenCLIPEmbedderWithCustomWordsBase.forward: `zs[0].pooled`), unweighted. Empty negative
    prompts marked in `tokens.uncond_zeros` give zeros. Rows repeat per image of a prompt."""
    parts = [_encode_one(engine, use, tokens.second if use.second else tokens, max_length, hidden_output)
             for engine, use in encoders]
    pooled = [p for use, p in zip((u for _, u in encoders), parts) if use.pooled]

    def rows(arrays: list[np.ndarray | None], zeros: tuple[bool, ...] | None) -> np.ndarray | None:
        if not arrays or arrays[0] is None:
            return None
        joined = np.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0]
        if zeros is not None and any(zeros):
            joined = np.where(np.array(zeros).reshape((-1,) + (1,) * (joined.ndim - 1)), 0, joined).astype(np.float32)
        return np.repeat(joined, images_per_prompt, axis=0)

    out = Conditioning(rows([p[0] for p in parts], None), rows([p[1] for p in parts], tokens.uncond_zeros),
                       rows([p[2] for p in pooled], None), rows([p[3] for p in pooled], tokens.uncond_zeros))
    warn_nonfinite(out.cond if out.uncond is None else np.concatenate([out.cond, out.uncond]), "text embeddings",
                   "text_encoder")
    return out


def _encode_one(engine: Engine, use: TextEncoding, tokens: PromptTokens, max_length: int,
                hidden_output: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One encoder's (cond hidden, uncond hidden or None, cond pooled, uncond pooled), weighted."""

    def encode(ids: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        hidden, pooled = text.encode_outputs(engine, ids, hidden_output, use.pooled)
        return (hidden if weights is None else ps.apply_weights(hidden, weights, max_length)), pooled

    cond, pooled = encode(tokens.cond, tokens.cond_weights)
    uncond = uncond_pooled = None
    if tokens.uncond is not None:
        uncond, uncond_pooled = encode(tokens.uncond, tokens.uncond_weights)
    return cond, uncond, pooled, uncond_pooled


# --- randomness -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Draws:
    """The seeded draws of a request (or an explicit array where one was given), [batch, C, lh, lw]."""

    rngs: tuple[np.random.Generator, ...]
    noise: np.ndarray
    encode_noise: np.ndarray | None = None
    masked_encode_noise: np.ndarray | None = None


def initial_noise(request: "Request", latent_shape: tuple[int, int, int], inpainting_unet: bool) -> Draws:
    """Per-image generators and their first draws, in the order of the module doc."""
    rngs = tuple(np.random.Generator(np.random.PCG64(s)) for s in request.seeds)

    def draw(explicit: np.ndarray | None, what: str) -> np.ndarray:
        seeded = np.stack([g.standard_normal(latent_shape, dtype=np.float32) for g in rngs])
        if explicit is None:
            return seeded
        warn_nonfinite(explicit, what, "input")
        return np.array(explicit)

    noise = draw(request.noise, "latents" if request.mode == "txt2img" else "noise")
    if request.variation is not None:  # variation seeds / seed resizing: runtime/sampling/variation.py
        noise = request.variation.noise(request.seeds, noise, request.height // latent_shape[1])
    encode = masked = None
    if request.mode != "txt2img":
        encode = draw(request.encode_noise, "encode_noise")
    if request.mode == "inpaint" and inpainting_unet:
        masked = draw(request.masked_encode_noise, "masked_encode_noise")
    return Draws(rngs, noise, encode, masked)


class BatchRNG:
    """The per-image generators seen by a sampler as one generator: a draw of shape [batch, ...]
    takes row i from image i's generator, so an image's stochastic steps do not depend on its batch."""

    def __init__(self, rngs: Sequence[np.random.Generator]):
        self._rngs = list(rngs)

    def standard_normal(self, size=None, dtype=np.float64):
        if size is None or np.ndim(size) == 0 or tuple(np.atleast_1d(size))[0] != len(self._rngs):
            raise ValueError(f"a batched draw must have the batch ({len(self._rngs)}) as its first axis; got {size}")
        size = tuple(np.atleast_1d(size))
        return np.stack([g.standard_normal(size[1:], dtype=dtype) for g in self._rngs])


# --- images -> latents ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageLatents:
    """What the init images contribute to denoising, [batch, ...] each (all None for txt2img).

    init: latents denoising starts from, noised to the first level (None: pure noise).
    keep: 4-channel inpainting: clean image latents blended back outside the mask after each step.
    mask: inpainting: [batch, 1, lh, lw], 1 = repaint.
    masked: 9-channel inpainting: the masked image's latents, fed to the U-Net with the mask.
    keep_mask: the blend's mask where it is not `mask` (A1111's inpainting on the 9-channel U-Net)."""

    init: np.ndarray | None = None
    keep: np.ndarray | None = None
    mask: np.ndarray | None = None
    masked: np.ndarray | None = None
    keep_mask: np.ndarray | None = None


def encode_images(vae_encoder: Engine | None, request: "Request", draws: Draws, *, scaling_factor: float,
                  vae_scale_factor: int, inpainting_unet: bool, tile: int | None = None) -> ImageLatents:
    """VAE-encode the request's init images (and masked images for the 9-channel U-Net), as
    diffusers' img2img and inpainting pipelines do."""
    if request.mode == "txt2img":
        return ImageLatents()
    if request.init_latents is not None:  # img2img of latents (a hand-over: runtime/request.py): no VAE encode
        return ImageLatents(init=np.array(request.init_latents))
    if vae_encoder is None:
        raise PipelineError(f"{request.mode} needs the vae_encoder network, which this engine folder lacks")
    src = [i // request.images_per_prompt for i in range(request.batch)]  # image -> prompt index
    pixels = imgs.to_network(request.images)
    nine = request.mode == "inpaint" and inpainting_unet
    if request.inpainting is not None:  # A1111's inpainting (runtime/imaging/inpainting.py)
        def encode(px: np.ndarray, eps: np.ndarray) -> np.ndarray:
            return _sample_latents(vae_encoder, px, src, eps, scaling_factor, tile, vae_scale_factor)

        return ImageLatents(**a1111_inpainting.image_latents(
            request, draws.noise, encode, draws.encode_noise, draws.masked_encode_noise, vae_scale_factor, nine))
    image_latents = None
    # the 9-channel U-Net at strength 1 starts from pure noise and never needs the image's own
    # latents (as diffusers, which skips that encode too)
    if not (nine and request.strength == 1.0):
        image_latents = _sample_latents(vae_encoder, pixels, src, draws.encode_noise, scaling_factor, tile,
                                        vae_scale_factor)
    if request.mode == "img2img":
        return ImageLatents(init=image_latents)
    s = vae_scale_factor
    masks = np.stack(request.masks)  # [P, H, W]
    mask = np.concatenate([imgs.latent_mask(mk, request.height // s, request.width // s) for mk in masks])[src]
    init = None if request.strength == 1.0 else image_latents  # diffusers: strength 1 starts from pure noise
    if not nine:
        return ImageLatents(init=init, keep=image_latents, mask=mask)
    # diffusers: masked_image = init_image * (mask < 0.5), in [-1, 1] (masked pixels -> 0)
    masked_pixels = pixels * (masks < 0.5)[:, None].astype(np.float32)
    masked = _sample_latents(vae_encoder, masked_pixels, src, draws.masked_encode_noise, scaling_factor, tile,
                             vae_scale_factor)
    return ImageLatents(init=init, mask=mask, masked=masked)


def _sample_latents(vae_encoder: Engine, pixels: np.ndarray, src: list[int], eps: np.ndarray,
                    scaling_factor: float, tile: int | None = None, scale: int = 8) -> np.ndarray:
    """(mean + std * eps) * scaling_factor per expanded image, as diffusers' `latent_dist.sample(generator)`."""
    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = vae_encoder.run({"image": x})
        return out["latent_mean"], out["latent_std"]

    mean, std = run(pixels) if tile is None else \
        vae_tiling.encode_tiled(run, pixels, tile=tile, overlap=tile // 4, scale=scale)
    mean, std = mean[src], std[src]
    if mean.shape[-2:] != eps.shape[-2:]:  # the graph's axes are symbolic: only its output can tell
        raise ManifestError(f"the VAE encoder made {mean.shape[-2:]} latents of {pixels.shape[-2:]} images, not the "
                            f"{eps.shape[-2:]} the manifest's vae_scale_factor implies: the manifest does not "
                            "describe its graphs")
    warn_nonfinite(np.concatenate([mean, std]), "encoded latents", "vae_encode")
    return (mean + std * eps) * np.float32(scaling_factor)


# --- denoising ------------------------------------------------------------------------------------------

def engine_unet(unet: Engine) -> UnetFn:
    """The U-Net engine as a (sample, timestep, inputs) -> noise_pred callable; `inputs` are the
    family's conditioning inputs by contract name (runtime/families.py)."""

    def run(sample: np.ndarray, timestep: np.ndarray, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return unet.run({"sample": sample, "timestep": timestep, **inputs})["noise_pred"]

    return run


def denoise(unet: UnetFn, schedule: sch.Schedule, family: Family, text_embeddings: Conditioning,
            noise: np.ndarray, image_latents: ImageLatents, *, guidance_scale: float, guidance_rescale: float,
            eta: float, rng: Any, callback: Callable[[int, float, np.ndarray], None] | None = None,
            on_call: Callable[[int], None] | None = None, dims: ModelDims | None = None) -> np.ndarray:
    """Run the sampler from `noise` (and the init latents, if any) to the final latents.

    The family (runtime/families.py) turns the text embeddings into the U-Net's conditioning inputs
    and names the image latents stacked onto its sample. `unet(sample, timestep[batch], inputs)` is
    called once per sampler evaluation, on the guidance batch [uncond..., cond...]; `on_call(i)` runs
    before network call i (progress, cancellation); `callback(i, t, latents)` after it. `dims`: the
    folder's model dims, for families whose inputs need them (an LCM U-Net's guidance embedding)."""
    size = tuple(d * (dims.vae_scale_factor if dims else 1) for d in noise.shape[-2:])  # pixels (SDXL's time_ids)
    cond, uncond = family.unet_inputs(text_embeddings, guidance_scale=guidance_scale, dims=dims, size=size)
    # a family without a guidance batch takes the scale in its inputs: the U-Net runs once, conditional only
    guided = sch.guidance(unet, cond, uncond, guidance_scale if family.guidance_batch else 1.0, guidance_rescale)
    extras = {name: getattr(image_latents, name) for name in family.sample_extras}
    if any(v is None for v in extras.values()):
        raise PipelineError(f"the {family.name} U-Net takes {', '.join(family.sample_extras)} with its latents: "
                            f"use {'inpaint()' if 'mask' in extras else 'another mode'}")
    calls = iter(range(len(schedule.timesteps)))

    def model(x_in: np.ndarray, t: float) -> np.ndarray:
        if on_call is not None:
            on_call(next(calls))
        if extras:
            x_in = sch.stack_channels(x_in, extras)
        return guided(x_in, t)

    latents = sch.prepare_latents(schedule, noise, image_latents.init)
    keep_mask = image_latents.mask if image_latents.keep_mask is None else image_latents.keep_mask
    known = None if image_latents.keep is None else (image_latents.keep, keep_mask, noise)
    latents = sch.sample(schedule, model, latents, rng=rng, eta=eta, callback=callback, known=known)
    latents = np.asarray(latents, dtype=np.float32)
    warn_nonfinite(latents, "latents", "denoise")
    return latents


# --- latents -> images ----------------------------------------------------------------------------------

def decode(vae_decoder: Engine, latents: np.ndarray, *, tile: int | None = None, scale: int = 8) -> np.ndarray:
    """Latents (scaled, as the loop holds them) to float32 NHWC images in [0, 1]; `tile` (latent
    pixels) decodes overlapping tiles and blends them (runtime/imaging/tiling.py: bounded memory for big
    images, at a small cost in exactness)."""
    def run(z: np.ndarray) -> np.ndarray:
        return vae_decoder.run({"latent": z})["image"]

    if tile is None:
        decoded = run(latents)
    else:
        decoded = vae_tiling.decode_tiled(run, latents, tile=tile, overlap=tile // 4, scale=scale)
    warn_nonfinite(decoded, "decoded images", "vae_decode")
    return imgs.from_network(decoded)
