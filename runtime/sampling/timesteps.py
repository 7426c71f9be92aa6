"""Timestep builders, one per sampler family: from a diffusers scheduler config (already merged with
the class defaults by runtime/scheduler.py) to the timesteps and noise levels a sampler evaluates.

Each is ``build(cfg, n, t_start, ac, train_sigmas, karras) -> (timesteps, sigmas, plan, init_sigma,
order)``: ``n`` steps, of which the first ``t_start`` are skipped (img2img strength), ``ac`` the
training alphas_cumprod and ``train_sigmas`` their sigmas; ``plan`` holds the sampler-specific arrays
its step function reads. Each reproduces the ``set_timesteps`` of the diffusers 0.42 class its
registry record names (runtime/scheduler.py). NumPy and the standard library only.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.sampling import schedules as S
from runtime.sampling.samplers import ab_to_sigma
from runtime.sampling.schedules import SchedulerError

LCM_SIGMA_DATA = 0.5  # arXiv:2310.04378 (LCM) boundary-condition scalings, sigma_data = 0.5


def _final_ab(cfg, ac) -> float:
    return 1.0 if cfg["set_alpha_to_one"] else float(ac[0])


def _ab_at(t: float, ac: np.ndarray, final: float) -> float:
    return float(ac[int(t)]) if t >= 0 else final


def build_ddim(cfg, n, t_start, ac, train_sigmas, karras):
    # Target of each step is t - T // n (also for trailing / linspace spacing), as diffusers' DDIMScheduler.
    T = cfg["num_train_timesteps"]
    ts = S.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])[t_start:]
    final = _final_ab(cfg, ac)
    ab = np.array([_ab_at(t, ac, final) for t in ts])
    ab_to = np.array([_ab_at(t - T // n, ac, final) for t in ts])
    return ts, ab_to_sigma(ab), {"ab": ab, "ab_to": ab_to}, 1.0, 1


def build_ddpm(cfg, n, t_start, ac, train_sigmas, karras):
    # Target of each step is the next evaluated timestep (alpha_bar = 1 after the last).
    T = cfg["num_train_timesteps"]
    ts = S.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])[t_start:]
    ab = ac[ts.astype(np.int64)]
    ab_to = np.append(ab[1:], 1.0)
    if cfg["variance_type"] not in ("fixed_small", "fixed_large"):
        raise SchedulerError(f"unsupported variance_type {cfg['variance_type']!r}; accepted: fixed_small, fixed_large")
    return ts, ab_to_sigma(ab), {"ab": ab, "ab_to": ab_to, "large": cfg["variance_type"] == "fixed_large"}, 1.0, 1


def build_pndm(cfg, n, t_start, ac, train_sigmas, karras):
    # PLMS as Stable Diffusion runs it (skip_prk_steps): n + 1 calls, the second timestep repeated.
    # Call c moves t -> t - T // n, except call 1 which redoes the first step t0 -> t1 (diffusers'
    # PNDMScheduler.step_plms counter logic).
    T = cfg["num_train_timesteps"]
    grid = S.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])  # descending
    full = np.concatenate([grid[:1], grid[1:2], grid[1:]]) if n > 1 else grid
    ts = full[t_start:]
    ratio = T // n
    final = _final_ab(cfg, ac)
    ab = np.array([_ab_at(t, ac, final) for t in ts])
    t_from = np.array([t + ratio if c == 1 else t for c, t in enumerate(ts)])
    t_to = np.array([t if c == 1 else t - ratio for c, t in enumerate(ts)])
    ab_from = np.array([_ab_at(t, ac, final) for t in t_from])
    ab_to = np.array([_ab_at(t, ac, final) for t in t_to])
    return ts, ab_to_sigma(ab), {"ab": ab, "ab_from": ab_from, "ab_to": ab_to}, 1.0, 1


def _ve_grid(cfg, n, train_sigmas, karras, *, karras_bounds_from_grid: bool):
    """Euler-family grid: fractional timesteps, sigmas interpolated linearly in t, optional Karras."""
    ts = S.spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"], integer=False)
    sig = S.interp_sigmas(ts, train_sigmas)
    if karras:
        lo, hi = float(sig[-1]), float(sig[0])
        if not karras_bounds_from_grid:
            lo = float(cfg.get("sigma_min") or lo)
            hi = float(cfg.get("sigma_max") or hi)
        sig = S.sigmas_karras(n, lo, hi)
        ts = S.sigma_to_t(sig, train_sigmas)
    sig = np.append(sig, 0.0)
    init = sig.max() if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sig.max() ** 2 + 1.0)
    return ts, sig, init


def build_k(cfg, n, t_start, ac, train_sigmas, karras, *, lms=False):
    ts, sig, init = _ve_grid(cfg, n, train_sigmas, karras, karras_bounds_from_grid=lms)
    return ts[t_start:], sig[t_start:-1], {"grid_sigmas": sig, "grid_t": ts, "start": t_start}, init, 1


def build_heun(cfg, n, t_start, ac, train_sigmas, karras):
    ts, sig, init = _ve_grid(cfg, n, train_sigmas, karras, karras_bounds_from_grid=False)
    calls_t = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])  # t0, t1, t1, t2, t2, ...
    calls_s = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2)])
    k = 2 * t_start
    return calls_t[k:], calls_s[k:], {"grid_sigmas": sig[t_start:], "grid_t": ts[t_start:]}, init, 2


def build_multistep(cfg, n, t_start, ac, train_sigmas, karras, *, unipc=False):
    # DPMSolverMultistepScheduler / UniPCMultistepScheduler: integer timesteps; Karras sigmas span the
    # whole training range and their timesteps are whole numbers.
    T = cfg["num_train_timesteps"]
    if karras:
        sig = S.sigmas_karras(n, float(train_sigmas[0]), float(train_sigmas[-1]))
        ts = S.sigma_to_t(sig, train_sigmas)
        # rounded; DPM-Solver skips the rounding for squaredcos_cap_v2, and its int64 cast then truncates
        ts = ts.round() if unipc or cfg["beta_schedule"] != "squaredcos_cap_v2" else np.floor(ts)
    else:
        ts = S.spaced_timesteps_multistep(cfg["timestep_spacing"], T, n, cfg["steps_offset"])
        sig = S.interp_sigmas(ts, train_sigmas)
    sig = np.append(sig, 0.0)
    return ts[t_start:], sig[t_start:-1], {"grid_sigmas": sig, "grid_t": ts, "start": t_start}, 1.0, 1


def build_lcm(cfg, n, t_start, ac, train_sigmas, karras):
    # LCMScheduler.set_timesteps: n timesteps picked evenly from the original_inference_steps skeleton
    # k * i - 1 (k = T // original_inference_steps); the target of each step is the next timestep.
    ts = _skeleton_pick(cfg, n, "lcm")
    ab_full = ac[ts.astype(np.int64)]
    ab_to = np.append(ab_full[1:], ab_full[-1])
    scaled = ts * float(cfg["timestep_scaling"])
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / np.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
    last = np.arange(n) == n - 1
    sl = slice(t_start, None)
    plan = {"ab": ab_full[sl], "ab_to": ab_to[sl], "c_skip": c_skip[sl], "c_out": c_out[sl], "last": last[sl]}
    return ts[sl], ab_to_sigma(ab_full[sl]), plan, 1.0, 1


def _skeleton_pick(cfg, n, name):
    """n timesteps picked evenly (floored indices) from the original_inference_steps skeleton
    k * i - 1, k = T // original_inference_steps, in descending order: the timesteps of diffusers'
    LCMScheduler.set_timesteps and TCDScheduler.set_timesteps."""
    T = cfg["num_train_timesteps"]
    orig = int(cfg["original_inference_steps"])
    if not 1 <= orig <= T:
        raise SchedulerError(f"{name} original_inference_steps must be in [1, {T}], got {orig}")
    k = T // orig
    # img2img of an LCM-distilled folder: the skeleton's first int(orig * strength) (set_timesteps' strength)
    kept = int(orig * cfg.get("skeleton_strength", 1.0))
    skeleton = (np.arange(1, kept + 1) * k - 1)[::-1]
    if len(skeleton) // n < 1:
        raise SchedulerError(f"{name} supports at most original_inference_steps={orig} steps, got {n}" if kept == orig
                             else f"{name} at this strength picks from {kept} skeleton timesteps "
                                  f"(int({orig} x strength)): at most {kept} steps, got {n}")
    return skeleton[np.floor(np.linspace(0, len(skeleton), n, endpoint=False)).astype(np.int64)].astype(np.float64)


def build_tcd(cfg, n, t_start, ac, train_sigmas, karras):
    # TCDScheduler: LCM's timesteps; each step targets the next timestep, the last one timestep 0
    # (alphas_cumprod[0], not final_alpha_cumprod: its prev_timestep is 0 there). The intermediate
    # timestep s depends on eta, so the step function derives it (samplers.tcd_noised_timesteps).
    ts = _skeleton_pick(cfg, n, "tcd")
    t_to = np.append(ts[1:], 0.0)
    ab = ac[ts.astype(np.int64)]
    sl = slice(t_start, None)
    plan = {"ab": ab[sl], "ab_to": ac[t_to.astype(np.int64)][sl], "t_to": t_to[sl], "ac": ac,
            "last": (np.arange(n) == n - 1)[sl]}
    return ts[sl], ab_to_sigma(ab[sl]), plan, 1.0, 1
