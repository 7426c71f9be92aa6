"""Step caching: which U-Net calls of a denoising run evaluate the whole network and which only
its shallow part, reusing the deep feature of the last full call (DeepCache: Ma, Fang and Wang,
"DeepCache: Accelerating Diffusion Models for Free", CVPR 2024, arXiv:2312.00858), and a U-Net
callable that routes calls by such a plan over the `unet_deep` / `unet_shallow` engines
(runtime/folder/networks.py; export/unet.py `cache_split` says where the U-Net is cut).

A plan counts network calls, not sampler steps: `plan(len(schedule.timesteps), ...)`, since
`Schedule.timesteps` lists one timestep per call. So Heun's second evaluation of a step is a call
of its own, and so is PNDM's repeated timestep (the PLMS warm-up evaluates its second timestep
twice: diffusers PNDMScheduler with skip_prk_steps). DeepCache's own SD pipeline counts the same
way (horseee/DeepCache `DeepCache/sd/pipeline_stable_diffusion.py`: `for i, t in
enumerate(timesteps)`, full where `i in interval_seq`). Its later `DeepCacheSDHelper`
(`DeepCache/extension/deepcache.py`, the PyPI package) numbers a call by the first position of its
timestep in `scheduler.timesteps` instead, so where timesteps repeat its full calls fall
differently: Heun's (and KDPM2's) second evaluations take the number of the step's first one
(uniform interval 3 over Heun: full calls 0, 3, 4, 9, 10, ... there, 0, 3, 6, 9, ... here); PNDM's
one repeated timestep changes the plan at interval 2 only. For samplers with one call per step
(DDIM, Euler, LMS, DPM++, UniPC, ...) both give the same plan. Call 0 is always full: nothing is
cached before it. Multistep samplers see one model output per call either way, cached or not.

Under classifier-free guidance each call carries the doubled batch [uncond, cond], and with batched
requests the batch of all images; the cached feature has that call's batch, and a shallow call must
match it (and its latent size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from runtime.errors import PipelineError

SCHEDULES = ("uniform", "nonuniform")
# DeepCache's non-uniform schedule for SD 1.5 (horseee/DeepCache `stable_diffusion.py`, commit
# 1691a3a: pipe(..., cache_interval=5, uniform=False, pow=1.4, center=15)): full calls are densest
# around call `center`, spread by the exponent `power`.
NONUNIFORM_CENTER = 15
NONUNIFORM_POWER = 1.4
# DeepCache lowers the exponent by this much until the full calls are distinct (sample_from_quad_center)
_POWER_STEP = 0.02

Inputs = Mapping[str, np.ndarray]  # the family's conditioning inputs by U-Net contract name
UnetFn = Callable[[np.ndarray, np.ndarray, Inputs], np.ndarray]
DeepFn = Callable[[np.ndarray, np.ndarray, Inputs], tuple[np.ndarray, np.ndarray]]
ShallowFn = Callable[[np.ndarray, np.ndarray, Inputs, np.ndarray], np.ndarray]


def plan(n_calls: int, interval: int, schedule: str = "uniform", *, center: int = NONUNIFORM_CENTER,
         power: float = NONUNIFORM_POWER) -> tuple[bool, ...]:
    """Which of `n_calls` U-Net calls run the full network (True; it refreshes the cache) and which
    the shallow one (False). `interval` 1 turns caching off (every call full).

    "uniform": every `interval`-th call, from call 0 (DeepCache's uniform 1:N strategy, sec. 3.3;
    its pipelines' `range(0, n, cache_interval)`). "nonuniform": ceil(n_calls / interval) full
    calls, densest around call `center` (DeepCache's non-uniform 1:N, `nonuniform_full_calls`)."""
    for name, value, least in (("n_calls", n_calls, 0), ("interval", interval, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise PipelineError(f"{name} must be an integer >= {least}; got {value!r}")
    if schedule not in SCHEDULES:
        raise PipelineError(f"unknown cache schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if interval == 1 or n_calls == 0:
        return (True,) * n_calls
    if schedule == "uniform":
        return tuple(i % interval == 0 for i in range(n_calls))
    full = set(nonuniform_full_calls(n_calls, math.ceil(n_calls / interval), center, power))
    return tuple(i in full for i in range(n_calls))


def nonuniform_full_calls(n_calls: int, n_full: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform placement of `n_full` full calls among `n_calls` (horseee/DeepCache,
    `DeepCache/sd/pipeline_stable_diffusion.py` `sample_from_quad_center`, commit 1691a3a).

    With p = `power` and c = `center`: n_full + 1 points u evenly spaced from (-c)^(1/p) to
    (n_calls - c)^(1/p), mapped to c + trunc(Re(u^p)); the distinct values but the smallest and the
    largest, after call 0, are the full calls. Roots of negative numbers are the principal complex
    roots (Python's `**`) and only the real part of u^p counts, exactly as in the reference, so the
    map is flattest, and full calls densest, around c. If that does not give n_full calls, p is
    lowered by 0.02 and tried again while p > 1."""
    if n_calls < 1 or not 1 <= n_full <= n_calls:
        raise PipelineError(f"cannot place {n_full} full calls among {n_calls}")
    if not power > 1:
        raise PipelineError(f"the non-uniform schedule's power must be > 1; got {power!r}")
    p = float(power)
    while p > 1:
        lo, hi = (-center) ** (1 / p), (n_calls - center) ** (1 / p)
        mapped = np.trunc(np.real(np.linspace(lo, hi, n_full + 1) ** p)).astype(np.int64)
        calls = [0] + [int(v) + center for v in np.unique(mapped)[1:-1]]
        if len(calls) == n_full:
            return calls
        p -= _POWER_STEP
    raise PipelineError(f"the non-uniform cache schedule cannot place {n_full} full calls among {n_calls} around "
                        f"call {center} with a power in (1, {power}]; use another interval or center, or "
                        "the uniform schedule")


def cached_unet(deep: DeepFn, shallow: ShallowFn, full_calls: Sequence[bool]) -> UnetFn:
    """A `unet(sample, timestep, inputs) -> noise` callable for ONE denoising run (`inputs`: the
    family's conditioning inputs by contract name): call i runs `deep(sample, timestep, inputs) ->
    (noise, feature)` and keeps the feature where `full_calls[i]`, else `shallow(sample, timestep,
    inputs, feature)` with the feature of the last
    full call. It counts its calls, so make a new one per run. Raises PipelineError if called more
    often than the plan covers, or if a shallow call's batch or latent size differs from the
    cached feature's call."""
    steps = tuple(bool(x) for x in full_calls)
    if steps and not steps[0]:
        raise PipelineError("a cache plan must start with a full call: nothing is cached before call 0")
    calls, feature, cached_shape = 0, None, None

    def unet(sample: np.ndarray, timestep: np.ndarray, inputs: Inputs) -> np.ndarray:
        nonlocal calls, feature, cached_shape
        i, calls = calls, calls + 1
        if i >= len(steps):
            raise PipelineError(f"U-Net call {i} is past the cache plan of {len(steps)} calls; plan "
                                "len(schedule.timesteps) calls")
        shape = (sample.shape[0],) + tuple(sample.shape[2:])
        if steps[i]:
            noise, feature = deep(sample, timestep, inputs)
            cached_shape = shape
            return noise
        if shape != cached_shape:
            raise PipelineError(f"U-Net call {i}: batch and latent size {shape} differ from those of the cached "
                                f"feature's call {cached_shape}; a shallow call must repeat the full call's batch")
        return shallow(sample, timestep, inputs, feature)

    return unet


def engine_calls(deep_engine: Any, shallow_engine: Any) -> tuple[DeepFn, ShallowFn]:
    """`deep` and `shallow` callables over the unet_deep and unet_shallow engines (`Engine.run`,
    names from runtime/folder/networks.py), for `cached_unet`."""

    def deep(sample: np.ndarray, timestep: np.ndarray, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        out = deep_engine.run({"sample": sample, "timestep": timestep, **inputs})
        return out["noise_pred"], out["cache_feature"]

    def shallow(sample: np.ndarray, timestep: np.ndarray, inputs: Inputs, feature: np.ndarray) -> np.ndarray:
        return shallow_engine.run({"sample": sample, "timestep": timestep, **inputs, "cache_feature": feature})["noise_pred"]

    return deep, shallow
