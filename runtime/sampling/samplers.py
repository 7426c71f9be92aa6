"""Pure NumPy samplers and the one network adapter they share (see ``runtime/scheduler.py``).

Every sampler is ``sample_<name>(denoise, x, <schedule arrays>, *, after, ...) -> x``: no objects, no
step counters; multistep history lives in local variables. ``denoise(x, sigma, t) -> x0`` comes from
:func:`make_denoiser`. NumPy and the standard library only.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from runtime.sampling import schedules as S
from runtime.sampling.schedules import SchedulerError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
Denoiser = Callable[[np.ndarray, float, float], np.ndarray]
Model = Callable[[np.ndarray, float], np.ndarray]


def ab_to_sigma(ab):
    """sigma = sqrt((1 - ab) / ab) of alpha_bar."""
    return np.sqrt((1.0 - ab) / ab)


def sigma_alpha(s: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(ab), sqrt(1 - ab)) of a VE noise level s."""
    a = 1.0 / math.sqrt(1.0 + s * s)
    return a, s * a


# ----------------------------------------------------------------------------------------------
# The network, adapted once


def make_denoiser(model: Model, prediction_type: str, *, vp: bool) -> Denoiser:
    """``denoise(x, sigma, t) -> x0`` (a new float64 array) around ``model(x_in, t) -> raw output``.

    x_in = c_in * x with c_in = 1 for VP latents and 1 / sqrt(1 + sigma^2) for VE latents
    (Karras et al. arXiv:2206.00364 Table 1, "VP" column); then with a = sqrt(ab), b = sqrt(1 - ab)
    (x_in = a x0 + b eps): eps -> x0 = (x_in - b eps) / a; v -> x0 = a x_in - b v (Salimans & Ho,
    arXiv:2202.00512 §4); sample -> x0 = output.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise SchedulerError(f"unknown prediction_type {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")

    def denoise(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        a, b = sigma_alpha(float(sigma))
        c_in = 1.0 if vp else a
        x_in = np.multiply(x, c_in, dtype=np.float32)
        out = model(x_in, float(t))
        if np.shape(out) != x.shape:
            raise SchedulerError(f"model output shape {np.shape(out)} differs from latents shape {x.shape}")
        x0 = np.array(out, dtype=np.float64)  # our own buffer: the arithmetic below is in place
        if prediction_type == "epsilon":  # x0 = (c_in x - b eps) / a
            x0 *= -b / c_in
            x0 += x
            x0 *= c_in / a
        elif prediction_type == "v_prediction":  # x0 = a c_in x - b v
            x0 *= -b / (a * c_in)
            x0 += x
            x0 *= a * c_in
        return x0

    return denoise


# ----------------------------------------------------------------------------------------------
# Samplers: pure functions. ``after(i, x) -> x`` runs after network call i (inpainting blend,
# callback); it never sees sampler history. Arithmetic is done in place on arrays the sampler itself
# just created (never on its inputs): 256 KiB temporaries are expensive to allocate, so each step
# creates as few as it can (benchmarks/scheduler_overhead.py).


def no_after(i: int, x: np.ndarray) -> np.ndarray:
    """The default ``after`` hook: latents unchanged."""
    return x


def _noise(rng, shape, scale: float) -> np.ndarray:
    """scale * N(0, 1) noise drawn as float32 (diffusers draws float32 too)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n *= np.float32(scale)
    return n


def _clip_(x0, clip):
    if clip is not None:
        np.clip(x0, -clip, clip, out=x0)
    return x0


def _combine(*terms):
    """sum(c * a for c, a in terms) as one new float64 array, built with a single scratch buffer."""
    (c, a), rest = terms[0], terms[1:]
    out = np.multiply(a, c, dtype=np.float64)
    tmp = np.empty_like(out) if rest else None
    for c, a in rest:
        np.multiply(a, c, out=tmp)
        out += tmp
    return out


def _axpby_(buf, a, b, y):
    """a * buf + b * y, written into buf's buffer."""
    buf *= a
    buf += b * y
    return buf


def _lerp_(x0, x, w):
    """x + w (x0 - x), written into x0's buffer."""
    x0 -= x
    x0 *= w
    x0 += x
    return x0


def _eps_(x0, x, a, b):
    """eps = (x - a x0) / b of VP latents, written into x0's buffer."""
    x0 *= -a
    x0 += x
    x0 /= b
    return x0


def sample_ddim(denoise, x, timesteps, ab, ab_to, *, eta=0.0, rng=None, clip=None, after=no_after):
    """DDIM, Song et al. arXiv:2010.02502 eq. 12 (sigma_t(eta) from eq. 16)."""
    for i, t in enumerate(timesteps):
        a_t, b_t = math.sqrt(ab[i]), math.sqrt(1.0 - ab[i])
        x0 = denoise(x, ab_to_sigma(ab[i]), t)
        std = eta * math.sqrt((1.0 - ab_to[i]) / (1.0 - ab[i]) * (1.0 - ab[i] / ab_to[i]))
        # x' = sqrt(ab') x0c + sqrt(1 - ab' - std^2) eps with eps = (x - a_t x0) / b_t (x0 unclipped)
        k = math.sqrt(max(1.0 - ab_to[i] - std * std, 0.0)) / b_t
        if clip is None:
            x_new = _axpby_(x0, math.sqrt(ab_to[i]) - k * a_t, k, x)
        else:
            x_new = _combine((math.sqrt(ab_to[i]), _clip_(x0.copy(), clip)), (k, x), (-k * a_t, x0))
        if eta > 0:
            x_new += _noise(rng, x.shape, std)
        x = after(i, x_new)
    return x


def sample_ddpm(denoise, x, timesteps, ab, ab_to, *, rng, clip=None, large=False, after=no_after):
    """Ancestral DDPM, Ho et al. arXiv:2006.11239 eqs. 6-7 (posterior mean and variance)."""
    for i, t in enumerate(timesteps):
        beta = 1.0 - ab[i] / ab_to[i]
        x0 = _clip_(denoise(x, ab_to_sigma(ab[i]), t), clip)
        x_new = _axpby_(x0, math.sqrt(ab_to[i]) * beta / (1.0 - ab[i]),
                        math.sqrt(1.0 - beta) * (1.0 - ab_to[i]) / (1.0 - ab[i]), x)
        if t > 0:
            var = beta if large else max((1.0 - ab_to[i]) / (1.0 - ab[i]) * beta, 1e-20)
            x_new += _noise(rng, x.shape, math.sqrt(var))
        x = after(i, x_new)
    return x


_PLMS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_pndm(denoise, x, timesteps, ab, ab_from, ab_to, *, v_space=False, after=no_after):
    """PLMS (pseudo linear multistep), Liu et al. arXiv:2202.09778 §3.3, without Runge-Kutta warm-up
    (``skip_prk_steps``): call 0 is a first-order step, call 1 redoes it with the mean of both outputs,
    later calls use Adams-Bashforth weights over up to 4 past outputs.

    Past outputs are extrapolated in the network's own space (v for v-prediction, else eps) and
    converted to eps at the step's start, as diffusers' PNDMScheduler does.
    """
    outs: list[np.ndarray] = []
    x_first = x
    for c, t in enumerate(timesteps):
        a_in, b_in = math.sqrt(ab[c]), math.sqrt(1.0 - ab[c])
        x0 = denoise(x, ab_to_sigma(ab[c]), t)
        if v_space:  # v = (a x - x0) / b
            x0 *= -1.0 / a_in
            x0 += x
            out = x0
            out *= a_in / b_in
        else:
            out = _eps_(x0, x, a_in, b_in)
        if c == 1:
            comb, x_from = _combine((0.5, out), (0.5, outs[-1])), x_first
        else:
            outs = outs[-3:] + [out]
            comb = _combine(*zip(_PLMS[len(outs)], reversed(outs)))
            x_from = x
            if c == 0:
                x_first = x
        a_s, a_p = ab_from[c], ab_to[c]
        # PNDM transfer part phi(x, eps, t -> t') of arXiv:2202.09778 §3, as diffusers writes it:
        # x' = sqrt(a'/a) x - (a' - a) / (a sqrt(1 - a') + sqrt(a (1 - a) a')) eps, with for v-prediction
        # eps = sqrt(a) v + sqrt(1 - a) x at the step's start.
        k_eps = -(a_p - a_s) / (a_s * math.sqrt(1.0 - a_p) + math.sqrt(a_s * (1.0 - a_s) * a_p))
        k_x = math.sqrt(a_p / a_s)
        if v_space:
            k_x, k_eps = k_x + k_eps * math.sqrt(1.0 - a_s), k_eps * math.sqrt(a_s)
        x = after(c, _combine((k_x, x_from), (k_eps, comb)))
    return x


def sample_euler(denoise, x, sigmas, timesteps, *, after=no_after):
    """Euler on the probability-flow ODE, Karras et al. arXiv:2206.00364 Alg. 1 (no churn):
    x' = x + (x - x0) / s * (s' - s) = x + (x0 - x) (1 - s'/s)."""
    for i, t in enumerate(timesteps):
        x0 = denoise(x, sigmas[i], t)
        x = after(i, _lerp_(x0, x, 1.0 - sigmas[i + 1] / sigmas[i]))
    return x


def sample_euler_ancestral(denoise, x, sigmas, timesteps, *, rng, after=no_after):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, eta = 1): step to sigma_down, add
    sigma_up noise, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        s_down = math.sqrt(s_next**2 - s_up**2)
        x0 = denoise(x, s, t)
        x = _lerp_(x0, x, 1.0 - s_down / s)
        x += _noise(rng, x.shape, s_up)
        x = after(i, x)
    return x


def sample_heun(denoise, x, sigmas, timesteps, *, clip=None, after=no_after):
    """Heun's 2nd-order method, Karras et al. arXiv:2206.00364 Alg. 1 (Euler on the final step to 0)."""
    call = 0
    for i in range(len(timesteps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _clip_(denoise(x, s, timesteps[i]), clip)  # d = (x - x0) / s
        d -= x
        d *= -1.0 / s
        x_euler = d * (s_next - s)
        x_euler += x
        x_euler = after(call, x_euler)
        call += 1
        if s_next == 0:
            x = x_euler
            continue
        d2 = _clip_(denoise(x_euler, s_next, timesteps[i + 1]), clip)
        d2 -= x_euler
        d2 *= -1.0 / s_next
        d += d2
        d *= (s_next - s) / 2.0
        d += x
        x = after(call, d)
        call += 1
    return x


def sample_lms(denoise, x, sigmas, timesteps, start, *, after=no_after):
    """Linear multistep (order 4), k-diffusion ``sample_lms``: weights are integrals of Lagrange basis
    polynomials over past sigmas. Like diffusers, the order counts grid steps from the grid start, so
    an img2img run at first uses fewer derivatives than weights."""
    ds: list[np.ndarray] = []
    for i, t in enumerate(timesteps):
        k = start + i
        s = sigmas[k]
        d = denoise(x, s, t)
        d -= x
        d *= -1.0 / s
        ds = ds[-3:] + [d]
        coeffs = S.lms_coefficients(sigmas, k, min(k + 1, 4))
        x = after(i, _combine((1.0, x), *zip(coeffs, reversed(ds))))
    return x


def sample_dpmpp_2m(denoise, x, sigmas, timesteps, start, *, after=no_after):
    """DPM-Solver++(2M), Lu et al. arXiv:2211.01095 Alg. 2 (multistep, midpoint form as diffusers'
    ``solver_type="midpoint"``); first order on the first step and on the final step to sigma = 0.
    lambda = log(alpha / sigma_t) = -log(sigma)."""
    prev = None
    for i, t in enumerate(timesteps):
        k = start + i
        s, s_next = sigmas[k], sigmas[k + 1]
        x0 = denoise(x, s, t)
        if s_next == 0:
            x_new = x0.copy()
        else:
            a_n, b_n = sigma_alpha(s_next)
            _, b_s = sigma_alpha(s)
            h = math.log(s / s_next)
            K = -a_n * math.expm1(-h)  # x' = (b_n / b_s) x + K D
            if prev is None:  # D = x0
                x_new = _combine((b_n / b_s, x), (K, x0))
            else:  # D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h
                r = math.log(sigmas[k - 1] / s) / h
                x_new = _combine((b_n / b_s, x), (K * (1.0 + 0.5 / r), x0), (-K * 0.5 / r, prev))
        prev = x0
        x = after(i, x_new)
    return x


def _unipc_rhos(h: float, rks: list[float], order: int) -> np.ndarray:
    """UniPC coefficients with B(h) = expm1(-h) ("bh2"), Zhao et al. arXiv:2302.04867 §3 / App.: solve
    R rho = b with R[j] = r_k^j and b[j] = j! phi_{j+1}(h) / B(h)."""
    hh = -h
    phi = math.expm1(hh) / hh - 1.0
    fact = 1.0
    R, b = [], []
    for j in range(1, order + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(phi * fact / math.expm1(hh))
        fact *= j + 1
        phi = phi / hh - 1.0 / fact
    return np.linalg.solve(np.array(R), np.array(b))


def sample_unipc(denoise, x, sigmas, timesteps, start, *, after=no_after):
    """UniPC (bh2, order 2, data prediction), Zhao et al. arXiv:2302.04867: UniP predictor after each
    call, UniC corrector of the previous step once the next network output is known (diffusers'
    UniPCMultistepScheduler defaults: lower_order_final, no disabled correctors)."""
    n = len(sigmas) - 1
    lam = [(-math.log(s) if s > 0 else math.inf) for s in sigmas]
    x0s: list[np.ndarray] = []
    x_last, order_last = None, 0
    for i, t in enumerate(timesteps):
        k = start + i
        x0 = denoise(x, sigmas[k], t)
        if x_last is not None:  # UniC: correct the step k-1 -> k with the output at k
            a_t, b_t = sigma_alpha(sigmas[k])
            _, b_s = sigma_alpha(sigmas[k - 1])
            h = lam[k] - lam[k - 1]
            m0 = x0s[-1]
            if order_last == 1:
                rho_prev, rho_t = 0.0, 0.5
            else:
                r1 = (lam[k - 2] - lam[k - 1]) / h
                rhos = _unipc_rhos(h, [r1, 1.0], 2)
                rho_prev, rho_t = float(rhos[0]) / r1, float(rhos[1])
            # x_c = (b_t/b_s) x_last + K [m0 + rho_prev (m_prev - m0) + rho_t (x0 - m0)], K = -a_t expm1(-h)
            K = -a_t * math.expm1(-h)
            terms = [(b_t / b_s, x_last), (K * (1.0 - rho_t - rho_prev), m0), (K * rho_t, x0)]
            if rho_prev:
                terms.append((K * rho_prev, x0s[-2]))
            x = _combine(*terms)
        x0s = x0s[-1:] + [x0]
        order = min(2, n - k, i + 1)
        x_last, order_last = x, order
        s_next = sigmas[k + 1]
        if s_next == 0:
            x = x0.copy()  # order 1 to sigma = 0: x_t = alpha_t * x0 with alpha_t = 1
        else:  # UniP: x_t = (b_t/b_s) x + K [x0 + (x0_prev - x0) / (2 r1)], K = -a_t expm1(-h)
            a_t, b_t = sigma_alpha(s_next)
            _, b_s = sigma_alpha(sigmas[k])
            h = lam[k + 1] - lam[k]
            K = -a_t * math.expm1(-h)
            if order == 2:
                w = 0.5 / ((lam[k - 1] - lam[k]) / h)
                x = _combine((b_t / b_s, x), (K * (1.0 - w), x0), (K * w, x0s[-2]))
            else:
                x = _combine((b_t / b_s, x), (K, x0))
        x = after(i, x)
    return x


def sample_lcm(denoise, x, timesteps, ab, ab_to, c_skip, c_out, last, *, rng, clip=None, after=no_after):
    """Latent Consistency Model multistep sampling, Luo et al. arXiv:2310.04378: consistency
    function f = c_skip x + c_out x0, then re-noise to the next timestep (not after the last)."""
    for i, t in enumerate(timesteps):
        x0 = _clip_(denoise(x, ab_to_sigma(ab[i]), t), clip)
        k = 1.0 if last[i] else math.sqrt(ab_to[i])  # re-noise: x' = sqrt(ab') f + sqrt(1 - ab') z
        x_new = _axpby_(x0, k * c_out[i], k * c_skip[i], x)
        if not last[i]:
            x_new += _noise(rng, x.shape, math.sqrt(1.0 - ab_to[i]))
        x = after(i, x_new)
    return x


def tcd_noised_timesteps(t_to: np.ndarray, eta: float) -> np.ndarray:
    """s = floor((1 - gamma) t') of TCD's strategic stochastic sampling, Zheng et al. arXiv:2402.19159
    §4.3 (gamma = eta), as integer timesteps. float32 product, as diffusers 0.42 TCDScheduler.step
    computes it (a Python float times a long tensor), so s equals its timestep_s."""
    return np.floor(np.float32(1.0 - eta) * np.asarray(t_to, dtype=np.float32)).astype(np.int64)


def sample_tcd(denoise, x, timesteps, ab, ab_to, t_to, ac, last, *, eta, rng, after=no_after):
    """Trajectory Consistency Distillation sampling, Zheng et al. arXiv:2402.19159 §4.3: from x0 and
    eps predicted at t, move deterministically to s = floor((1 - gamma) t') (x_s = sqrt(ab_s) x0 +
    sqrt(1 - ab_s) eps), then, for gamma > 0 and not after the last step, re-noise forward from s to
    the next timestep t': x' = sqrt(ab'/ab_s) x_s + sqrt(1 - ab'/ab_s) z. gamma = 0 is deterministic."""
    ab_s = ac[tcd_noised_timesteps(t_to, eta)]
    for i, t in enumerate(timesteps):
        a_t, b_t = math.sqrt(ab[i]), math.sqrt(1.0 - ab[i])
        x0 = denoise(x, ab_to_sigma(ab[i]), t)
        k = math.sqrt(1.0 - ab_s[i]) / b_t  # eps = (x - a_t x0) / b_t
        x_new = _axpby_(x0, math.sqrt(ab_s[i]) - k * a_t, k, x)
        if eta > 0 and not last[i]:
            ratio = ab_to[i] / ab_s[i]
            x_new *= math.sqrt(ratio)
            x_new += _noise(rng, x.shape, math.sqrt(1.0 - ratio))
        x = after(i, x_new)
    return x
