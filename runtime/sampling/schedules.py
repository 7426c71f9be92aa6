"""Noise schedules and timestep grids as small pure functions returning float64 arrays.

NumPy and the standard library only. Each function follows the diffusers 0.42 scheduler it names, so
that a sampler in ``runtime/scheduler.py`` reproduces that scheduler; formulas are re-derived here, not
copied. References:

- DDPM betas (linear 1e-4 -> 2e-2 over 1000 steps): Ho et al. 2020, arXiv:2006.11239 §4.
- Scaled-linear betas (linear in sqrt(beta), SD uses 0.00085 -> 0.012): CompVis latent-diffusion
  ``make_beta_schedule("linear")`` as configured by Stable Diffusion's ``v1-inference.yaml``.
- ``squaredcos_cap_v2``: Nichol & Dhariwal 2021, arXiv:2102.09672 eq. 17 (s = 0.008, beta <= 0.999).
- Timestep spacing "linspace" / "leading" / "trailing" (+ ``steps_offset``): Lin et al. 2023,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891, Table 2.
- Karras sigmas (rho = 7): Karras et al. 2022, arXiv:2206.00364 eq. 5.
"""

from __future__ import annotations

import math

import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0  # arXiv:2206.00364 eq. 5 / Table 1


class SchedulerError(ValueError):
    """Invalid scheduler input; the message names the value and what is accepted.
    (Re-exported by ``runtime.scheduler``, the public module.)"""


def betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Training betas [num_train_timesteps] (float64)."""
    n = int(num_train_timesteps)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:  # arXiv:2102.09672 eq. 17, s = 0.008
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise SchedulerError(f"unknown beta_schedule {schedule!r}; accepted: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), [num_train_timesteps]: computed in float64, then rounded
    to float32 values (returned as float64), as the CompVis LDM code (float32 buffers) and diffusers
    (float32 tensors) hold them; near t = 0, 1 - alpha_bar is only float32-accurate in both, and the
    noise levels here follow them."""
    ac = np.cumprod(1.0 - betas(schedule, num_train_timesteps, beta_start, beta_end))
    return ac.astype(np.float32).astype(np.float64)


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0, *,
                     integer: bool = True) -> np.ndarray:
    """n descending timesteps per arXiv:2305.08891 Table 2 (float64 values).

    linspace: round(linspace(0, T-1, n)); leading: arange(n) * (T // n) + steps_offset;
    trailing: round(arange(T, 0, -T/n)) - 1. ``integer=False`` keeps linspace unrounded (diffusers'
    Euler / LMS / Heun family evaluates the network at those fractional timesteps).
    """
    T = int(num_train_timesteps)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        if integer:
            ts = ts.round()
        return ts[::-1].copy()
    if spacing == "leading":
        return _offset((np.arange(n) * (T // n))[::-1].astype(np.float64), steps_offset, T)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1.0
    raise SchedulerError(f"unknown timestep_spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")


def spaced_timesteps_multistep(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps of diffusers' DPM-Solver / UniPC: linspace and leading are laid out over n + 1
    points and the last (t = 0) dropped; trailing is as in :func:`spaced_timesteps`."""
    T = int(num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        return _offset((np.arange(n + 1) * (T // (n + 1)))[::-1][:-1].astype(np.float64), steps_offset, T)
    return spaced_timesteps(spacing, T, n, steps_offset)


def _offset(ts: np.ndarray, steps_offset: int, T: int) -> np.ndarray:
    ts = ts + int(steps_offset)
    if ts.size and (ts.max() > T - 1 or ts.min() < 0):
        raise SchedulerError(f"steps_offset {steps_offset} puts leading timesteps outside [0, {T - 1}]")
    return ts


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """n descending sigmas, arXiv:2206.00364 eq. 5 (no trailing zero)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep of a sigma: piecewise-linear in log(sigma) between training timesteps,
    clamped to [0, T-1] (diffusers' ``_sigma_to_t``)."""
    log_train = np.log(train_sigmas)
    return np.interp(np.log(np.maximum(sigma, 1e-10)), log_train, np.arange(len(train_sigmas), dtype=np.float64))


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linear in t."""
    return np.interp(timesteps, np.arange(len(train_sigmas), dtype=np.float64), train_sigmas)


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Linear-multistep weights for step i -> i+1 (Karras et al. / k-diffusion ``sample_lms``): the
    integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of each node
    sigmas[i - j], j < order. Polynomials are integrated exactly."""
    P = np.polynomial.polynomial
    nodes = [float(sigmas[i - k]) for k in range(order)]
    out = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        denom = float(np.prod([nodes[j] - s for s in others])) if others else 1.0
        poly = P.polyint(P.polyfromroots(others) if others else np.array([1.0]))
        out.append(float((P.polyval(sigmas[i + 1], poly) - P.polyval(sigmas[i], poly)) / denom))
    return out
