"""The samplers' front door: the registry (one `Sampler` record per sampler), schedule building,
sampling, classifier-free guidance and the inpainting U-Net's input.

NumPy and the standard library only. Public contract (docs/architecture.md, "Scheduler")::

    schedule = make_schedule(config, "euler", 30, strength=1.0, karras=None, prediction_type=None)
    latents = prepare_latents(schedule, noise, init_latents=None)
    latents = sample(schedule, model, latents, rng=rng, eta=0.0, callback=None, known=None)

Design (../shared/STYLE.md, "Schedulers"): ``make_schedule`` turns a diffusers ``scheduler_config.json``
dict into an immutable :class:`Schedule` of float64 arrays with the record's timestep builder
(``runtime/sampling/timesteps.py``); every sampler is a pure function ``sample_<name>(denoise, x,
<arrays>, *, after, ...) -> x`` (``runtime/sampling/samplers.py``) whose multistep history lives in
local variables, run through its record's ``step``. The network is adapted once
(:func:`make_denoiser`) into ``denoise(x, sigma, t) -> x0``. Noise schedules and timestep grids are
in ``runtime/sampling/schedules.py``. Each sampler reproduces the diffusers 0.42 scheduler class its
record names, including its timestep layout; ``tests/test_scheduler.py`` checks the final latents
against diffusers. Adding a sampler: its pure function in samplers.py (and a builder in
timesteps.py if no existing one fits), one record in ``REGISTRY`` (docs/architecture.md).

Latent spaces. Samplers of the Euler family (lms, euler, euler_a, heun) hold variance-exploding latents
x = x0 + sigma * eps and feed the network x / sqrt(1 + sigma^2), as k-diffusion does; the others hold
variance-preserving latents x = sqrt(ab) x0 + sqrt(1 - ab) eps and feed x unchanged. Throughout,
sigma = sqrt((1 - ab) / ab) with ab = alpha_bar_t, so both spaces share one noise-level coordinate.
"""

from __future__ import annotations

import math
import numbers
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from runtime.sampling import schedules as S
from runtime.sampling import timesteps
from runtime.sampling.samplers import (PREDICTION_TYPES, Model, ab_to_sigma, make_denoiser, no_after, sample_ddim,
                                       sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_ancestral,
                                       sample_heun, sample_lcm, sample_lms, sample_pndm, sample_tcd, sample_unipc,
                                       sigma_alpha)
from runtime.sampling.schedules import SchedulerError

__all__ = ["HAND_OVER_SAMPLERS", "REGISTRY", "SAMPLERS", "SCHEDULER_CLASSES", "Sampler", "Schedule", "SchedulerError",
           "default_sampler", "eta_refusal", "guidance", "inpaint_unet_input", "make_denoiser", "make_schedule",
           "prepare_latents", "sample", "stack_channels", "timestep_cutoff"]

BETA_SCHEDULES = S.BETA_SCHEDULES
SPACINGS = S.SPACINGS
_NONE: Mapping[str, Any] = MappingProxyType({})

# Defaults of the diffusers 0.42 scheduler classes for keys a config may omit; a record's
# `class_defaults` are its own class's differences from these.
_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": False, "use_karras_sigmas": False,
}
# Settings that change the result and are not implemented: refused rather than ignored.
_UNSUPPORTED = ("rescale_betas_zero_snr", "thresholding", "use_exponential_sigmas", "use_beta_sigmas",
                "use_lu_lambdas", "use_flow_sigmas")


@dataclass(frozen=True)
class Sampler:
    """One sampler, everything about it in one record (k-diffusion adds a sampler as one function).

    `step(denoise, x, schedule, *, rng, eta, after) -> x` runs it over a built `Schedule` (its pure
    function of runtime/sampling/samplers.py, fed the schedule's arrays); `build` makes its timesteps
    (runtime/sampling/timesteps.py). `diffusers_class` is the scheduler class it reproduces (a folder
    whose config names that class runs it by default), `class_defaults` that class's defaults beyond
    `_COMMON`, and `implemented` the values of that class's solver settings it implements (a config
    of that class setting another value is refused, not run as something else; keys a config omits
    take the first value). `a1111`: AUTOMATIC1111's display name then its aliases (v1.10
    modules/sd_samplers_*.py); `a1111_karras_default`: A1111 v1.9+ runs its "Automatic" schedule as
    Karras; `a1111_timesteps`: A1111 runs it on its own timesteps, ignoring the schedule type.
    `eta_max`: the `eta` it takes, in [0, eta_max] (DDIM's eta, arXiv:2010.02502 eq. 16, unbounded;
    TCD's gamma, arXiv:2402.19159 §4.3, at most 1 as diffusers' TCDScheduler.step asserts)."""

    name: str
    step: Callable[..., np.ndarray]
    build: Callable[..., tuple]
    diffusers_class: str | None = None
    class_defaults: Mapping[str, Any] = field(default_factory=lambda: _NONE)
    implemented: Mapping[str, tuple] = field(default_factory=lambda: _NONE)
    a1111: tuple[str, ...] = ()
    a1111_karras_default: bool = False
    a1111_timesteps: bool = False
    karras: bool = False  # takes Karras sigmas (karras=True)
    karras_only: bool = False  # always Karras sigmas
    ve: bool = False  # variance-exploding latents, k-diffusion style (module doc)
    stochastic: bool = False  # draws noise every step (ddim and tcd only when eta > 0)
    clipping: bool = False  # its diffusers class has clip_sample
    eta_max: float = 0.0  # the largest `eta` it takes (0: none); its step reads eta, noising when eta > 0


# Step functions: each feeds one pure sampler the arrays its timestep builder planned.
def _ddim(denoise, x, s, *, rng, eta, after):
    return sample_ddim(denoise, x, s.timesteps, s.plan["ab"], s.plan["ab_to"], eta=eta, rng=rng, clip=s.clip,
                       after=after)


def _ddpm(denoise, x, s, *, rng, eta, after):
    return sample_ddpm(denoise, x, s.timesteps, s.plan["ab"], s.plan["ab_to"], rng=rng, clip=s.clip,
                       large=s.plan["large"], after=after)


def _pndm(denoise, x, s, *, rng, eta, after):
    return sample_pndm(denoise, x, s.timesteps, s.plan["ab"], s.plan["ab_from"], s.plan["ab_to"],
                       v_space=s.prediction_type == "v_prediction", after=after)


def _euler(denoise, x, s, *, rng, eta, after):
    return sample_euler(denoise, x, s.plan["grid_sigmas"][s.plan["start"]:], s.timesteps, after=after)


def _euler_a(denoise, x, s, *, rng, eta, after):
    return sample_euler_ancestral(denoise, x, s.plan["grid_sigmas"][s.plan["start"]:], s.timesteps, rng=rng,
                                  after=after)


def _heun(denoise, x, s, *, rng, eta, after):
    return sample_heun(denoise, x, s.plan["grid_sigmas"], s.plan["grid_t"], clip=s.clip, after=after)


def _lms(denoise, x, s, *, rng, eta, after):
    return sample_lms(denoise, x, s.plan["grid_sigmas"], s.timesteps, s.plan["start"], after=after)


def _dpmpp_2m(denoise, x, s, *, rng, eta, after):
    return sample_dpmpp_2m(denoise, x, s.plan["grid_sigmas"], s.timesteps, s.plan["start"], after=after)


def _unipc(denoise, x, s, *, rng, eta, after):
    return sample_unipc(denoise, x, s.plan["grid_sigmas"], s.timesteps, s.plan["start"], after=after)


def _lcm(denoise, x, s, *, rng, eta, after):
    p = s.plan
    return sample_lcm(denoise, x, s.timesteps, p["ab"], p["ab_to"], p["c_skip"], p["c_out"], p["last"], rng=rng,
                      clip=s.clip, after=after)


def _tcd(denoise, x, s, *, rng, eta, after):
    p = s.plan
    return sample_tcd(denoise, x, s.timesteps, p["ab"], p["ab_to"], p["t_to"], p["ac"], p["last"], eta=eta, rng=rng,
                      after=after)


_DPMPP_SETTINGS = {"solver_order": (2,), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",),
                   "lower_order_final": (True,), "euler_at_final": (False,), "final_sigmas_type": ("zero",),
                   "variance_type": (None,), "use_karras_sigmas": (False, True)}
_LEADING = {"timestep_spacing": "leading"}
# LCMScheduler's and TCDScheduler's defaults (diffusers 0.42: the two share their __init__ arguments)
_LCM_DEFAULTS = {**_LEADING, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "set_alpha_to_one": True, "original_inference_steps": 50, "timestep_scaling": 10.0}
# The registry, in the order samplers are listed (SAMPLERS; A1111's /sdapi/v1/samplers).
REGISTRY: Mapping[str, Sampler] = MappingProxyType({r.name: r for r in (
    Sampler("ddim", _ddim, timesteps.build_ddim, "DDIMScheduler",
            {**_LEADING, "clip_sample": True, "set_alpha_to_one": True}, a1111=("DDIM", "ddim"), a1111_timesteps=True,
            clipping=True, eta_max=math.inf),
    Sampler("ddpm", _ddpm, timesteps.build_ddpm, "DDPMScheduler",
            {**_LEADING, "clip_sample": True, "variance_type": "fixed_small"},
            a1111=("DDPM",), stochastic=True, clipping=True),  # DDPM: Forge's name; A1111 has none
    Sampler("pndm", _pndm, timesteps.build_pndm, "PNDMScheduler", _LEADING, {"skip_prk_steps": (True,)},
            a1111=("PLMS", "plms"), a1111_timesteps=True),
    Sampler("lms", _lms, functools.partial(timesteps.build_k, lms=True), "LMSDiscreteScheduler", a1111=("LMS", "k_lms"),
            karras=True, ve=True),
    Sampler("euler", _euler, timesteps.build_k, "EulerDiscreteScheduler",
            implemented={"interpolation_type": ("linear",), "final_sigmas_type": ("zero",)},
            a1111=("Euler", "k_euler"), karras=True, ve=True),
    Sampler("euler_a", _euler_a, timesteps.build_k, "EulerAncestralDiscreteScheduler",
            implemented={"final_sigmas_type": ("zero",)}, a1111=("Euler a", "k_euler_a", "k_euler_ancestral"),
            karras=True, ve=True, stochastic=True),
    Sampler("heun", _heun, timesteps.build_heun, "HeunDiscreteScheduler", {"beta_start": 0.00085, "beta_end": 0.012},
            a1111=("Heun", "k_heun"), karras=True, ve=True, clipping=True),
    Sampler("dpmpp_2m", _dpmpp_2m, timesteps.build_multistep, "DPMSolverMultistepScheduler", implemented=_DPMPP_SETTINGS,
            a1111=("DPM++ 2M", "k_dpmpp_2m"), a1111_karras_default=True, karras=True),
    Sampler("dpmpp_2m_karras", _dpmpp_2m, timesteps.build_multistep, "DPMSolverMultistepScheduler",
            implemented=_DPMPP_SETTINGS, karras=True, karras_only=True),
    Sampler("unipc", _unipc, functools.partial(timesteps.build_multistep, unipc=True), "UniPCMultistepScheduler",
            implemented={"solver_order": (2,), "solver_type": ("bh2",), "predict_x0": (True,),
                         "lower_order_final": (True,), "disable_corrector": ((), []), "solver_p": (None,),
                         "final_sigmas_type": ("zero",)},
            a1111=("UniPC", "unipc"), a1111_timesteps=True, karras=True),
    Sampler("lcm", _lcm, timesteps.build_lcm, "LCMScheduler", _LCM_DEFAULTS,
            a1111=("LCM", "k_lcm"), stochastic=True, clipping=True),
    # TCD: A1111 v1.10 and Forge have none; "TCD" / "tcd" are the names the A1111 extension
    # licyk/sd-webui-tcd-sampler (scripts: NAME = 'TCD', ALIAS = 'tcd') registers
    Sampler("tcd", _tcd, timesteps.build_tcd, "TCDScheduler", _LCM_DEFAULTS, a1111=("TCD", "tcd"), eta_max=1.0),
)})
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
# The samplers whose timesteps are picked from LCM's skeleton (runtime/sampling/timesteps.py `_skeleton_pick`)
SKELETON_SAMPLERS = ("lcm", "tcd")
# diffusers scheduler `_class_name` (the manifest's scheduler config) -> our sampler: the first record
# naming the class (dpmpp_2m before dpmpp_2m_karras)
SCHEDULER_CLASSES: Mapping[str, str] = MappingProxyType(
    {c: n for n, c in reversed([(r.name, r.diffusers_class) for r in REGISTRY.values() if r.diffusers_class])})
# What a config naming a scheduler class we have no sampler for runs instead (Stable Diffusion's own).
FALLBACK_SAMPLER = "pndm"


@dataclass(frozen=True)
class Schedule:
    """What a sampler needs, fixed at construction. Arrays are float64.

    ``timesteps``: the network timesteps evaluated, in order (one per network call; heun has two per
    step but one on the final step). ``sigmas``: noise level sigma of the latents fed at each of those
    calls. ``init_noise_sigma``: txt2img noise scale. ``start_sigma``: level img2img noises to.
    ``vp``: whether latents are variance-preserving (see the module docstring).
    """

    sampler: str
    prediction_type: str
    num_inference_steps: int
    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float
    vp: bool
    order: int
    clip: float | None = None
    plan: dict = field(default_factory=dict, repr=False)  # sampler-specific arrays, see make_schedule
    # img2img init latents are noised to the first level (False: they arrive already noisy, handed over
    # from another run at that level: diffusers' denoising_start, whose prepare_latents adds no noise)
    noised_init: bool = True

    @property
    def start_sigma(self) -> float:
        return float(self.sigmas[0])


# ----------------------------------------------------------------------------------------------
# Schedule construction


def eta_refusal(sampler: str, eta: float) -> str | None:
    """Why `eta` is refused for `sampler` (None where the record takes it): one message for the
    request layer and `sample`."""
    top = REGISTRY[sampler].eta_max
    if 0.0 <= eta <= top:
        return None
    if eta < 0:
        return f"eta must be >= 0; got eta={eta}"
    takers = ", ".join(f"{r.name} (at most {r.eta_max:g})" if math.isfinite(r.eta_max) else r.name
                       for r in REGISTRY.values() if r.eta_max > 0)
    if top == 0:
        return f"eta applies to {takers} only; got eta={eta} for {sampler!r}: leave it at 0"
    return f"eta for {sampler!r} must be in [0, {top:g}]; got {eta}"


def default_sampler(config: dict | None) -> str:
    """Our sampler for a diffusers scheduler config (its `_class_name`); for a class we have no
    sampler for, FALLBACK_SAMPLER with a RuntimeWarning naming the class."""
    import warnings

    cls = str((config or {}).get("_class_name", ""))
    name = SCHEDULER_CLASSES.get(cls)
    if name is None:
        warnings.warn(f"the engine's scheduler {cls or '(unnamed)'} has no NumPy sampler here; using "
                      f"{FALLBACK_SAMPLER!r}", RuntimeWarning, stacklevel=2)
        return FALLBACK_SAMPLER
    return name


def _check_implemented(cfg: dict, sampler: str) -> None:
    """Refuse solver settings of the sampler's own diffusers class that it does not implement. Only a
    config of that class is checked: other classes use the same keys for other things (UniPC's
    solver_type "bh2" means nothing to DPM-Solver++)."""
    record = REGISTRY[sampler]
    if str(cfg.get("_class_name", "")) != record.diffusers_class:
        return
    for key, allowed in record.implemented.items():
        value = cfg.get(key, allowed[0])
        value = list(value) if isinstance(value, tuple) else value
        if not any(value == (list(a) if isinstance(a, tuple) else a) for a in allowed):
            raise SchedulerError(f"config setting {key}={value!r} is not implemented by the {sampler!r} sampler "
                                 f"(it implements {key}={allowed[0]!r}); choose another sampler or change the config")


# Types and ranges of the config values the samplers compute with. A scheduler config comes from an
# engine folder's manifest, possibly a stranger's: a string, a list or num_train_timesteps = 10**12
# is refused here rather than failing deep in NumPy or allocating terabytes. The bounds are sanity
# limits far outside real configs (diffusers 0.42's SD schedulers: 1000 train timesteps, betas
# 0.00085-0.012, original_inference_steps 50, timestep_scaling 10). Betas stop at 0.999, diffusers'
# `betas_for_alpha_bar` max_beta.
MAX_TRAIN_TIMESTEPS = 100_000
MAX_BETA = 0.999
_VALUE_TYPES = {
    "num_train_timesteps": (int, 1, MAX_TRAIN_TIMESTEPS), "steps_offset": (int, 0, MAX_TRAIN_TIMESTEPS),
    "original_inference_steps": (int, 1, MAX_TRAIN_TIMESTEPS),
    "beta_start": (float, 0.0, MAX_BETA), "beta_end": (float, 0.0, MAX_BETA), "clip_sample_range": (float, 0.0, 1e6),
    "timestep_scaling": (float, 0.0, 1e6), "sigma_min": (float, 0.0, 1e6), "sigma_max": (float, 0.0, 1e6),
    "clip_sample": bool, "set_alpha_to_one": bool, "use_karras_sigmas": bool,
    "beta_schedule": str, "timestep_spacing": str, "prediction_type": str, "_class_name": str,
}


def check_config(config: dict) -> None:
    """Refuse scheduler config values of the wrong type or outside sane ranges (SchedulerError naming
    the key); None stands for "the class default", as diffusers writes it."""
    if not isinstance(config, dict):
        raise SchedulerError(f"a scheduler config must be a JSON object; got {type(config).__name__}")
    for key, rule in _VALUE_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(rule, type):
            if not isinstance(value, rule):
                raise SchedulerError(f"config setting {key}={_short(value)} must be a {rule.__name__}")
            continue
        if not _in_range(value, *rule):
            kind, lo, hi = rule
            what = "an integer" if kind is int else "a finite number"
            raise SchedulerError(f"config setting {key}={_short(value)} must be {what} in "
                                 f"{'[' if kind is int else '('}{lo:g}, {hi:g}]")
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) > MAX_TRAIN_TIMESTEPS or not all(
            _in_range(b, float, 0.0, 1.0) and b < 1.0 or _in_range(b, int, 0, 0) for b in betas)):
        raise SchedulerError(f"config setting trained_betas must be a list of at most {MAX_TRAIN_TIMESTEPS} "
                             "numbers in [0, 1)")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(value: object, kind: type, lo: float, hi: float) -> bool:
    """A JSON number of `kind` within the bounds (lower bound exclusive for floats); exact for huge ints."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    if not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value) or (kind is int and not value.is_integer()):
            return False
    return lo < value <= hi if kind is float else lo <= value <= hi


def _settings(config: dict | None, sampler: str, prediction_type: str | None) -> dict:
    check_config(dict(config or {}))
    cfg = dict(_COMMON)
    cfg.update(REGISTRY[sampler].class_defaults)
    cfg.update({k: v for k, v in dict(config or {}).items() if v is not None})  # unknown keys are ignored
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise SchedulerError(f"unknown prediction_type {cfg['prediction_type']!r}; "
                             f"accepted: {', '.join(PREDICTION_TYPES)}")
    if cfg["beta_schedule"] not in BETA_SCHEDULES and cfg.get("trained_betas") is None:
        raise SchedulerError(f"unknown beta_schedule {cfg['beta_schedule']!r}; accepted: {', '.join(BETA_SCHEDULES)}")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise SchedulerError(f"config setting {key}={cfg[key]!r} is not supported by the NumPy samplers")
    _check_implemented(cfg, sampler)
    if cfg["timestep_spacing"] not in SPACINGS:
        raise SchedulerError(f"unknown timestep_spacing {cfg['timestep_spacing']!r}; accepted: {', '.join(SPACINGS)}")
    return cfg


def _alphas_cumprod(cfg: dict) -> np.ndarray:
    if cfg.get("trained_betas") is not None:
        if len(cfg["trained_betas"]) != int(cfg["num_train_timesteps"]):
            raise SchedulerError(f"trained_betas has {len(cfg['trained_betas'])} values but num_train_timesteps is "
                                 f"{cfg['num_train_timesteps']}")
        ac = np.cumprod(1.0 - np.asarray(cfg["trained_betas"], dtype=np.float64))
        return ac.astype(np.float32).astype(np.float64)  # float32 values, as S.alphas_cumprod
    return S.alphas_cumprod(cfg["beta_schedule"], cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])


# Samplers that run part of a schedule (denoising_start / denoising_end): those whose calls are the
# steps of their timestep grid, one each. Not heun (two calls a step), pndm (its repeated second
# timestep), lcm and tcd (skeleton timesteps)
HAND_OVER_SAMPLERS = ("ddim", "ddpm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")


def timestep_cutoff(num_train_timesteps: int, fraction: float) -> int:
    """The discrete timestep at which a hand-over splits a schedule: int(round(T - fraction * T))
    (diffusers 0.42 StableDiffusionXLPipeline / Img2ImgPipeline `discrete_timestep_cutoff`)."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def _check_fraction(value: Any, what: str, sampler: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise SchedulerError(f"{what} must be a number in (0, 1); got {value!r}")
    if sampler not in HAND_OVER_SAMPLERS:
        raise SchedulerError(f"{what} runs part of a schedule, which the {sampler!r} sampler does not split; "
                             f"use one of {', '.join(HAND_OVER_SAMPLERS)}")
    return float(value)


def _hand_over_start(record: Sampler, cfg: dict, n: int, ac: np.ndarray, train_sigmas: np.ndarray, karras: bool,
                     start: float) -> int:
    """The steps a run beginning at `start` skips: all but those of the whole schedule's timesteps
    below the cutoff (diffusers 0.42 StableDiffusionXLImg2ImgPipeline.get_timesteps with denoising_start)."""
    full = np.asarray(record.build(cfg, n, 0, ac, train_sigmas, karras)[0])
    left = int((full < timestep_cutoff(int(cfg["num_train_timesteps"]), start)).sum())
    if left == 0:
        raise SchedulerError(f"denoising_start {start} with {n} steps leaves no step below the cutoff; lower it or "
                             "raise the steps")
    return len(full) - left


def _hand_over_end(schedule: Schedule, T: int, end: float) -> Schedule:
    """`schedule` cut before its first timestep below the cutoff (diffusers 0.42 StableDiffusionXLPipeline
    with denoising_end: timesteps[:len(those >= cutoff)]); the final latents are then still noisy."""
    keep = int((schedule.timesteps >= timestep_cutoff(T, end)).sum())
    if keep == 0:
        raise SchedulerError(f"denoising_end {end} leaves no step of this schedule (it starts below the cutoff); "
                             "raise it")
    return replace(schedule, timesteps=schedule.timesteps[:keep], sigmas=schedule.sigmas[:keep])


# long: argument checks, then the builder (each step of it short)
def make_schedule(config: dict | None, sampler: str, num_inference_steps: int, *, strength: float = 1.0,
                  karras: bool | None = None, prediction_type: str | None = None,
                  strength_in_schedule: bool = False, denoising_start: float | None = None,
                  denoising_end: float | None = None) -> Schedule:
    """Build the schedule of ``sampler`` from a diffusers scheduler config dict.

    ``strength`` < 1 starts img2img part-way (diffusers ``StableDiffusionImg2ImgPipeline.get_timesteps``):
    init = min(int(steps * strength), steps), the first ``steps - init`` steps are skipped (times the
    sampler order: 2 for heun); with ``strength_in_schedule`` the skeleton samplers (lcm, tcd) instead
    pick all ``n`` timesteps from the first int(original_inference_steps * strength) of their skeleton
    (diffusers ``LCMScheduler.set_timesteps(n, strength=)``, as LatentConsistencyModelImg2ImgPipeline runs it). ``karras`` (None: the config's ``use_karras_sigmas``) selects Karras
    sigmas for the samplers in the sigma family. ``prediction_type`` overrides the config's.

    A hand-over between two runs (SDXL base -> refiner; diffusers' ``denoising_end`` /
    ``denoising_start``, each a fraction in (0, 1) of the training timesteps, HAND_OVER_SAMPLERS):
    ``denoising_end`` keeps the calls down to the cutoff ``timestep_cutoff``; ``denoising_start``
    (which replaces ``strength``) skips the steps above it and takes its init latents as they come
    (``noised_init`` False).

    Keys the config omits take the default of the matching diffusers class (DDIM: clip_sample and
    set_alpha_to_one true, which Stable Diffusion's config turns off); unknown keys are ignored.
    ``pndm`` is always PLMS without Runge-Kutta warm-up (``skip_prk_steps``, as SD configures it);
    ``dpmpp_2m`` is diffusers' default DPM-Solver++ (order 2, midpoint, lower_order_final); ``unipc``
    is bh2, order 2.
    """
    if sampler not in SAMPLERS:
        raise SchedulerError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
            or num_inference_steps < 1):
        raise SchedulerError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise SchedulerError(f"strength must be in (0, 1], got {strength!r}")
    cfg = _settings(config, sampler, prediction_type)
    T = int(cfg["num_train_timesteps"])
    if n > T:
        raise SchedulerError(f"num_inference_steps {n} exceeds num_train_timesteps {T}")
    record = REGISTRY[sampler]
    if karras is None:
        karras = record.karras_only or bool(cfg["use_karras_sigmas"])
    if karras and not record.karras:
        raise SchedulerError(f"karras sigmas do not apply to {sampler!r}; they apply to: "
                             f"{', '.join(r.name for r in REGISTRY.values() if r.karras)}")
    if not karras and record.karras_only:
        raise SchedulerError(f"sampler {sampler!r} always uses Karras sigmas; use "
                             f"{sampler.removesuffix('_karras')!r} for karras=False")
    clip = float(cfg["clip_sample_range"]) if (record.clipping and cfg["clip_sample"]) else None

    start, end = (None if v is None else _check_fraction(v, what, sampler)
                  for v, what in ((denoising_start, "denoising_start"), (denoising_end, "denoising_end")))
    if start is not None and end is not None and start >= end:
        raise SchedulerError(f"denoising_start {start} must be below denoising_end {end}")
    init = min(int(n * strength), n)
    t_start = n - init
    if strength_in_schedule and sampler in SKELETON_SAMPLERS:
        cfg, init, t_start = {**cfg, "skeleton_strength": float(strength)}, n, 0
    if init == 0 and start is None:
        raise SchedulerError(f"strength {strength} with {n} steps leaves no denoising step; raise strength or steps")

    ac = _alphas_cumprod(cfg)
    train_sigmas = ab_to_sigma(ac)
    if start is not None:
        t_start = _hand_over_start(record, cfg, n, ac, train_sigmas, karras, start)
    ts, sig, plan, init_sigma, order = record.build(cfg, n, t_start, ac, train_sigmas, karras)
    schedule = Schedule(sampler=sampler, prediction_type=cfg["prediction_type"], num_inference_steps=n,
                        timesteps=np.asarray(ts, dtype=np.float64), sigmas=np.asarray(sig, dtype=np.float64),
                        init_noise_sigma=float(init_sigma), vp=not record.ve, order=order,
                        clip=clip, plan=plan, noised_init=start is None)
    return schedule if end is None else _hand_over_end(schedule, int(cfg["num_train_timesteps"]), end)


# ----------------------------------------------------------------------------------------------
# Public entry points


def _add_noise(schedule: Schedule, x0: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """Latents at level sigma in the sampler's space (diffusers ``scheduler.add_noise``)."""
    if not schedule.vp:
        return x0 + sigma * noise
    a, b = sigma_alpha(sigma)
    return a * x0 + b * noise


def prepare_latents(schedule: Schedule, noise: np.ndarray, init_latents: np.ndarray | None = None) -> np.ndarray:
    """Starting latents (float32). txt2img: noise * init_noise_sigma. img2img: ``init_latents`` noised
    to the first evaluated level (diffusers ``scheduler.add_noise(init, noise, timesteps[:1])``).
    Inpainting at strength 1 passes ``init_latents=None`` (pure noise, as diffusers does)."""
    noise64 = np.asarray(noise, dtype=np.float64)
    if init_latents is None:
        return (noise64 * schedule.init_noise_sigma).astype(np.float32)
    init = np.asarray(init_latents, dtype=np.float64)
    if init.shape != noise64.shape:
        raise SchedulerError(f"init_latents shape {init.shape} differs from noise shape {noise64.shape}")
    if not schedule.noised_init:  # handed over already noisy (denoising_start)
        return init.astype(np.float32)
    return _add_noise(schedule, init, noise64, schedule.start_sigma).astype(np.float32)


def sample(schedule: Schedule, model: Model, latents: np.ndarray, *, rng: np.random.Generator | None = None,
           eta: float = 0.0, callback: Callable[[int, float, np.ndarray], None] | None = None,
           known: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Run the sampler; returns the final latents (float32). ``latents`` is not modified.

    ``model(x_in, t)``: raw network output for input-scaled latents x_in (float32) at timestep t (float).
    ``rng``: noise source of ddpm, euler_a, lcm, and ddim and tcd with eta > 0 (``rng.standard_normal(shape,
    dtype=np.float32)`` per step). ``known=(image_latents, mask, noise)``: after each network call,
    x = (1 - mask) * image_latents noised to the next call's level + mask * x, and the clean image
    latents after the last call (diffusers' inpainting pipeline for 4-channel U-Nets; mask 1 = repaint).
    ``callback(i, t, latents)`` after network call i with a float32 copy.
    """
    x = np.array(latents, dtype=np.float64)
    if x.ndim != 4:
        raise SchedulerError(f"latents must be [batch, channels, height, width], got shape {x.shape}")
    record = REGISTRY[schedule.sampler]
    if eta_refusal(schedule.sampler, eta):
        raise SchedulerError(eta_refusal(schedule.sampler, eta))
    if rng is None and (record.stochastic or eta > 0):
        raise SchedulerError(f"sampler {schedule.sampler!r} draws noise: pass rng=np.random.Generator")
    after = _make_after(schedule, x.shape, known, callback)
    denoise = make_denoiser(model, schedule.prediction_type, vp=schedule.vp)
    x = record.step(denoise, x, schedule, rng=rng, eta=eta, after=after)
    return x.astype(np.float32)


def _make_after(schedule, shape, known, callback):
    if known is None and callback is None:
        return no_after
    if known is not None:
        if len(known) != 3:
            raise SchedulerError("known must be (image_latents, mask, noise)")
        image = np.asarray(known[0], dtype=np.float64)
        mask = np.asarray(known[1], dtype=np.float64)
        noise = np.asarray(known[2], dtype=np.float64)
        for what, arr in (("image_latents", image), ("noise", noise)):
            if arr.shape != tuple(shape):
                raise SchedulerError(f"known {what} shape {arr.shape} differs from latents shape {tuple(shape)}")
        try:
            fits = mask.ndim == 4 and np.broadcast_shapes(mask.shape, tuple(shape)) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise SchedulerError(f"mask shape {mask.shape} does not broadcast to latents shape {tuple(shape)}")
        keep = 1.0 - mask
    sigmas, ts = schedule.sigmas, schedule.timesteps

    def after(i: int, x: np.ndarray) -> np.ndarray:
        if known is not None:
            # clean image latents after the last call, else noised to the next call's level
            ref = _add_noise(schedule, image, noise, float(sigmas[i + 1]) if i + 1 < len(sigmas) else 0.0)
            ref *= keep
            ref += mask * x
            x = ref
        if callback is not None:
            callback(i, float(ts[i]), x.astype(np.float32))
        return x

    return after


def guidance(unet_fn: Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray]], np.ndarray],
             cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray] | None, guidance_scale: float,
             guidance_rescale: float = 0.0) -> Model:
    """Classifier-free guidance (Ho & Salimans, arXiv:2207.12598) as a ``model(x, t)`` closure.

    ``cond`` / ``uncond``: the U-Net's conditioning inputs by contract name (``encoder_hidden_states``;
    runtime/families.py says which a family has), each [batch, ...]. One U-Net call on the batch
    [uncond, cond] (every input concatenated so); out = u + s (c - u). With ``guidance_rescale`` =
    phi > 0, the result is rescaled toward the conditional output's per-sample std (Lin et al.
    arXiv:2305.08891 §3.4, as diffusers' ``rescale_noise_cfg``: unbiased std over all but the
    batch axis): out = phi * out * std(c) / std(out) + (1 - phi) * out. When s <= 1 only the
    conditional pass runs (``uncond`` may be None). Timesteps are passed as float32 [batch].
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise SchedulerError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    cond = {k: np.asarray(v) for k, v in cond.items()}
    if guidance_scale <= 1.0:

        def model_cond(x, t):
            return unet_fn(x, np.full((x.shape[0],), t, dtype=np.float32), cond)

        return model_cond
    shapes = {k: v.shape for k, v in cond.items()}
    if uncond is None or {k: np.shape(v) for k, v in uncond.items()} != shapes:
        raise SchedulerError(f"uncond shapes {None if uncond is None else {k: np.shape(v) for k, v in uncond.items()}} "
                             f"must equal cond shapes {shapes} when guidance_scale > 1")
    inputs = {k: np.concatenate([np.asarray(uncond[k], dtype=v.dtype), v]) for k, v in cond.items()}
    scale, phi = float(guidance_scale), float(guidance_rescale)

    def model(x, t):
        n = x.shape[0]
        out = np.asarray(unet_fn(np.concatenate([x, x]), np.full((2 * n,), t, dtype=np.float32), inputs))
        u, c = out[:n].astype(np.float64), out[n:].astype(np.float64)
        g = u + scale * (c - u)
        if phi > 0:
            axes = tuple(range(1, g.ndim))
            ratio = c.std(axis=axes, ddof=1, keepdims=True) / g.std(axis=axes, ddof=1, keepdims=True)
            g = phi * (g * ratio) + (1.0 - phi) * g
        return g.astype(out.dtype)

    return model


def inpaint_unet_input(x_in: np.ndarray, mask: np.ndarray, masked_image_latents: np.ndarray) -> np.ndarray:
    """9-channel input of an inpainting U-Net: concat([x_in (4), mask (1), masked_image_latents (4)], axis 1)
    (diffusers ``StableDiffusionInpaintPipeline``, ``num_channels_unet == 9``). mask and masked latents
    of batch 1, or of a batch dividing x_in's (e.g. doubled by guidance), are tiled to x_in's batch."""
    x_in, mask, masked = np.asarray(x_in), np.asarray(mask), np.asarray(masked_image_latents)
    if x_in.ndim != 4 or mask.ndim != 4 or masked.ndim != 4:
        raise SchedulerError("x_in, mask and masked_image_latents must be 4-D [batch, channels, height, width]")
    if mask.shape[1] != 1 or masked.shape[1] != x_in.shape[1]:
        raise SchedulerError(f"mask must have 1 channel and masked_image_latents {x_in.shape[1]}; "
                             f"got {mask.shape}, {masked.shape}")
    return stack_channels(x_in, {"mask": mask, "masked_image_latents": masked})


def stack_channels(x_in: np.ndarray, extras: Mapping[str, np.ndarray]) -> np.ndarray:
    """x_in with `extras` (name -> [b, c, h, w]) concatenated after it along the channel axis, in
    order; an extra of batch 1, or of a batch dividing x_in's (e.g. doubled by guidance), is tiled to
    x_in's batch. How a family's U-Net takes image conditioning in its latents (runtime/families.py)."""
    x_in = np.asarray(x_in)
    b = x_in.shape[0]
    parts = [x_in]
    for what, arr in extras.items():
        arr = np.asarray(arr)
        if arr.ndim != 4 or arr.shape[2:] != x_in.shape[2:] or b % arr.shape[0] != 0:
            raise SchedulerError(f"{what} shape {arr.shape} does not match x_in shape {x_in.shape}")
        parts.append(np.tile(arr, (b // arr.shape[0], 1, 1, 1)).astype(x_in.dtype, copy=False))
    return np.concatenate(parts, axis=1)
