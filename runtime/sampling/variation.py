"""Variation seeds and seed resizing: AUTOMATIC1111's "Variation seed", "Variation strength" and
"Resize seed from width/height" (v1.10: modules/rng.py `ImageRNG.first` and `slerp`, the seed lists
of modules/processing.py `process_images_inner`).

An image's initial noise is, as in A1111's `ImageRNG.first`:

    noise    = the seed's noise at the "resize from" size (latent size (h // s, w // s)), else at the
               request's size
    subnoise = the subseed's noise, at the same size as `noise`      (only when the strength is not 0)
    noise    = slerp(strength, noise, subnoise)                       (only when the strength is not 0)
    noise    = pasted centred into the seed's noise at the request's size (only when resizing)

Our noise is NumPy's (runtime/stages.py, "Randomness"): "the seed's noise" at the request's size is
the first draw of the image's own generator `PCG64(seed)`, which it draws anyway, so every later draw
of that generator (VAE-encode noise, a stochastic sampler's step noise) is where it always was. The
subseed's noise is the first draw of a separate `PCG64(subseed)`, and the seed's noise at the other
size (seed resizing) the first draw of a separate `PCG64(seed)`: both are new generators, each used
for that one draw, as A1111 draws them with `randn(subseed, shape)` / `randn(seed, shape)` apart from
the image's generator. So:

- strength 0 and no resize: no `Variation` at all; every image is what it was, bit for bit.
- strength 1: the initial noise is exactly the subseed's (slerp at 1 gives `high`); the later draws
  still come from the seed, as A1111's `ImageRNG.next` draws them from the seed's generator. A txt2img
  with a deterministic sampler then equals the run with seed = subseed bit for bit; a stochastic
  sampler, img2img and inpainting equal the run with seed = seed and the subseed's noise given as
  explicit `latents` / `noise`.

Seeds (A1111 `process_images_inner`): with a strength other than 0, a single seed is the seed of every
image of the call (variations of one picture) and a single subseed gives image i the subseed + i.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import PipelineError

__all__ = ["SLERP_LINEAR_ABOVE", "Variation", "make_variation", "paste_centred", "slerp"]

# A1111 modules/rng.py `slerp`: above this mean cosine the two noises are taken as parallel and mixed linearly
SLERP_LINEAR_ABOVE = 0.9995


@dataclass(frozen=True)
class Variation:
    """A request's variation settings. subseeds: one per image (None with only a resize);
    strength: the subseed strength in [0, 1]; resize_from: (height, width) in pixels the seed's noise
    is drawn at before it is pasted centred (None: the request's size)."""

    subseeds: tuple[int, ...] | None
    strength: float
    resize_from: tuple[int, int] | None

    def parameters(self) -> dict[str, Any]:
        """The settings as `Request.parameters()` reports them (only those in use)."""
        out: dict[str, Any] = {}
        if self.strength != 0:
            out["subseeds"], out["subseed_strength"] = list(self.subseeds), self.strength
        if self.resize_from is not None:
            out["seed_resize_from"] = list(self.resize_from)
        return out

    def noise(self, seeds: tuple[int, ...], first: np.ndarray, scale: int) -> np.ndarray:
        """The initial noise of a batch, [batch, C, lh, lw] float32, from `first` (each image's first
        draw of its own generator, the noise without variation); `scale`: the VAE scale factor."""
        return np.stack([self._image(i, seed, first[i], scale) for i, seed in enumerate(seeds)])

    def _image(self, i: int, seed: int, first: np.ndarray, scale: int) -> np.ndarray:
        shape = first.shape
        if self.resize_from is not None:
            shape = (first.shape[0], self.resize_from[0] // scale, self.resize_from[1] // scale)
        resized = shape != first.shape
        noise = _draw(seed, shape) if resized else first
        if self.strength != 0:
            noise = slerp(self.strength, noise, _draw(self.subseeds[i], shape))
        return paste_centred(noise, first) if resized else noise


def _draw(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The first draw of a fresh `PCG64(seed)`: what runtime/stages.py draws first for that seed."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's `slerp` (modules/rng.py) of one image's noises [C, H, W]: the vectors it interpolates
    are the columns along axis 1 (A1111 normalises with `torch.norm(dim=1)` of the per-image tensor),
    each turned by `val` of its angle from `low` towards `high`. Where the columns are parallel on
    average (mean cosine > SLERP_LINEAR_ABOVE) A1111 returns `low * val + high * (1 - val)`, weights as
    written there. Computed in float64, returned as float32."""
    lo, hi = low.astype(np.float64), high.astype(np.float64)
    dot = ((lo / np.linalg.norm(lo, axis=1, keepdims=True)) * (hi / np.linalg.norm(hi, axis=1, keepdims=True))).sum(1)
    if dot.mean() > SLERP_LINEAR_ABOVE:
        return (lo * val + hi * (1 - val)).astype(np.float32)
    omega = np.arccos(dot)
    so = np.sin(omega)
    mixed = (np.sin((1.0 - val) * omega) / so)[:, None] * lo + (np.sin(val * omega) / so)[:, None] * hi
    return mixed.astype(np.float32)


def paste_centred(small: np.ndarray, full: np.ndarray) -> np.ndarray:
    """`small` [C, h, w] centred on a copy of `full` [C, H, W], cropped where it is larger, with A1111's
    offsets (`ImageRNG.first`): the floor of half the size difference on each axis, and a larger
    source cropped by twice that on the axis (so an odd excess leaves the last row/column of `full`)."""
    out = np.array(full, copy=True)
    dst, src = [], []
    for big, little in zip(full.shape[1:], small.shape[1:]):
        d = (big - little) // 2
        n = little if d >= 0 else little + 2 * d
        dst.append(slice(max(d, 0), max(d, 0) + n))
        src.append(slice(max(-d, 0), max(-d, 0) + n))
    out[:, dst[0], dst[1]] = small[:, src[0], src[1]]
    return out


# --- validation (runtime/request.py make_request) -------------------------------------------------------

def make_variation(seeds: tuple[int, ...], seed: Any, subseed: Any, subseed_strength: Any, seed_resize_from: Any,
                   *, scale: int, max_image: int) -> tuple[tuple[int, ...], Variation | None]:
    """(the images' seeds, the Variation or None) of a request whose seeds are `seeds` (from its `seed`
    argument). None when the strength is 0 and no resize is asked: such a request is unchanged."""
    strength = subseed_strength
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 <= strength <= 1:
        raise PipelineError(f"subseed_strength must be a number in [0, 1] (0: no variation); got {strength!r}",
                            field="subseed_strength")
    resize = _resize(seed_resize_from, scale, max_image)
    if strength == 0:
        _subseeds(subseed, len(seeds))  # checked all the same: a bad value is a mistake
        return seeds, (None if resize is None else Variation(None, 0.0, resize))
    if not isinstance(seed, (list, tuple)):  # A1111: one seed for every image of a variation call
        seeds = (seeds[0],) * len(seeds)
    return seeds, Variation(_subseeds(subseed, len(seeds)), float(strength), resize)


def _subseeds(subseed: Any, batch: int) -> tuple[int, ...]:
    """One subseed per image: a list as given, an int + i for image i, None a random one + i."""
    if subseed is None:
        subseed = secrets.randbits(32)
    values = list(subseed) if isinstance(subseed, (list, tuple)) else [subseed]
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise PipelineError(f"subseed must be a non-negative integer or a list of one per image; got {subseed!r}",
                                field="subseed")
    if isinstance(subseed, (list, tuple)):
        if len(values) != batch:
            raise PipelineError(f"subseed: got a list of {len(values)} subseeds for {batch} images", field="subseed")
        return tuple(int(s) for s in values)
    return tuple(int(subseed) + i for i in range(batch))


def _resize(value: Any, scale: int, max_image: int) -> tuple[int, int] | None:
    """seed_resize_from as (height, width) pixels, each in [scale, max_image] (A1111 floors them to
    latent pixels, `// 8`; so do we, by the folder's scale factor)."""
    if value is None:
        return None
    sides = list(value) if isinstance(value, (list, tuple)) else []
    ok = len(sides) == 2 and all(not isinstance(v, bool) and isinstance(v, numbers.Integral) for v in sides)
    if not ok or not all(scale <= v <= max_image for v in sides):
        raise PipelineError(f"seed_resize_from must be (height, width) in pixels, each in [{scale}, {max_image}], or "
                            f"None; got {value!r}", field="seed_resize_from")
    return int(sides[0]), int(sides[1])
