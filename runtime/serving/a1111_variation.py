"""A1111's variation-seed fields on the wire (`subseed`, `subseed_strength`, `seed_resize_from_h/w`)
as `Pipeline.request` keywords (runtime/sampling/variation.py), and their entries in the response's info.

Seeds follow A1111 v1.10 modules/processing.py `process_images_inner`: with a `subseed_strength`
other than 0 every image of the request has the seed (`all_seeds = [seed + (x if strength == 0 else
0)]`) and image x (counting across `n_iter` batches) the subseed + x; -1 draws either at random.
`seed_resize_from_h/w` apply when both are positive (A1111's `ImageRNG.first`: a side at 0 or -1
turns resizing off).
"""

from __future__ import annotations

import secrets
from typing import Any

from runtime.request import Limits

from .codec import WireError

__all__ = ["info_fields", "job_seeds"]

MAX_SEED = 2**63 - 1  # as runtime/serving/a1111.py's seed bound


def _resize(req: Any, limits: Limits) -> tuple[int, int] | None:
    """(height, width) of seed_resize_from_h/w when both are positive, else None (A1111)."""
    h, w = req.seed_resize_from_h, req.seed_resize_from_w
    if h <= 0 or w <= 0:
        return None
    lo, hi = limits.vae_scale_factor, limits.max_image
    for name, value in (("seed_resize_from_h", h), ("seed_resize_from_w", w)):
        if not lo <= value <= hi:
            raise WireError(name, f"{value} is outside [{lo}, {hi}] pixels (send -1 for no seed resizing)")
    return h, w


def job_seeds(req: Any, limits: Limits, seed: int, images_per_job: int) -> list[dict[str, Any]]:
    """The seed keywords of each of the request's n_iter jobs of `images_per_job` images."""
    strength = req.subseed_strength
    if not 0 <= strength <= 1:
        raise WireError("subseed_strength", f"{strength} is outside [0, 1] (send 0 for no variation)")
    if not -1 <= req.subseed <= MAX_SEED:
        raise WireError("subseed", f"{req.subseed}: use -1 for a random subseed, else 0 to {MAX_SEED}")
    resize = _resize(req, limits)
    extra: dict[str, Any] = {} if resize is None else {"seed_resize_from": resize}
    if strength == 0:
        return [dict(extra, seed=seed + k * images_per_job) for k in range(req.n_iter)]
    subseed = secrets.randbits(32) if req.subseed == -1 else req.subseed
    return [dict(extra, seed=seed, subseed=subseed + k * images_per_job, subseed_strength=float(strength))
            for k in range(req.n_iter)]


def info_fields(req: Any, results: list[Any]) -> dict[str, Any]:
    """Processed.js()'s subseed entries: the subseeds the images used; with strength 0, the request's
    subseed + x where one was sent (A1111 reports it though it has no effect), else -1."""
    n = sum(len(r.seeds) for r in results)
    used = [s for r in results for s in r.parameters.get("subseeds", [])[:len(r.seeds)]]
    if len(used) != n:
        used = [req.subseed + x for x in range(n)] if req.subseed >= 0 else [-1] * n
    return {"subseed": used[0] if used else -1, "all_subseeds": used, "subseed_strength": req.subseed_strength,
            "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h}
