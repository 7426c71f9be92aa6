"""Tier-1 tests of runtime/scheduler.py: full denoising loops against diffusers' schedulers.

The U-Net is replaced by a fixed smooth nonlinear NumPy function of (x, t), so both sides see the same
network. diffusers (test-only reference, 0.42) runs its own scheduler loop the way
StableDiffusion(Img2Img|Inpaint)Pipeline does (set_timesteps, get_timesteps / set_begin_index,
scale_model_input, step, add_noise); we run make_schedule / prepare_latents / sample.

Noise of stochastic samplers (ddpm, euler_a, lcm; ddim and tcd with eta > 0): diffusers draws
``torch.randn(shape, generator=g)`` once per step from a seeded CPU ``torch.Generator``; our samplers
draw ``rng.standard_normal(shape, dtype=float32)`` once per step. The test passes our sampler a small
adapter whose ``standard_normal`` returns draws from an identically seeded torch generator, so both
consume the identical noise sequence; nothing in either library is patched.

Metric: relative error max|ours - ref| / max|ref| <= 1e-5 (REL_TOL).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from runtime import scheduler as R
from runtime.compare import rel_err
from runtime.sampling import schedules as S
from runtime.scheduler import SchedulerError

try:  # test-only reference; the tests that need it are marked and skip with a reason
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers + torch (test-only reference) not installed")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REL_TOL = 1e-5
SHAPE = (1, 4, 8, 8)
# Stable Diffusion 1.x scheduler_config.json values (PNDM config as shipped, minus its class name).
SD_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
}
CLASSES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "lcm": "LCMScheduler", "tcd": "TCDScheduler",
}
STOCHASTIC = ("ddpm", "euler_a", "lcm")


def unet(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in U-Net: smooth, nonlinear in x and t, float32 out."""
    x = np.asarray(x, dtype=np.float64)
    t = float(t)
    return (0.6 * np.tanh(x) * np.cos(t / 300.0) + 0.3 * np.sin(0.7 * x + t / 500.0) + 0.05 * x).astype(np.float32)


class TorchNoise:
    """np.random.Generator stand-in that yields the draws diffusers' randn_tensor makes."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape, dtype=np.float32):
        return torch.randn(tuple(shape), generator=self.g, dtype=torch.float32).numpy()


def arrays(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    image = (0.8 * rng.standard_normal(shape)).astype(np.float32)
    mask = np.zeros((shape[0], 1) + shape[2:], np.float32)
    mask[..., : shape[2] // 2, :] = 1.0
    return noise, image, mask


def reference(sampler, config, n, noise, *, strength=1.0, init=None, known=None, eta=0.0, karras=False, seed=0):
    """diffusers' scheduler driven as its SD pipelines drive it. Returns (latents, timesteps, start latents)."""
    cfg = dict(config)
    if karras or sampler == "dpmpp_2m_karras":
        cfg["use_karras_sigmas"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = getattr(diffusers, CLASSES[sampler]).from_config(cfg)
    sch.set_timesteps(n)
    init_timestep = min(int(n * strength), n)  # StableDiffusionImg2ImgPipeline.get_timesteps
    t_start = max(n - init_timestep, 0)
    ts = sch.timesteps[t_start * sch.order:]
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(t_start * sch.order)
    noise_t = torch.from_numpy(noise)
    x = noise_t * sch.init_noise_sigma if init is None else sch.add_noise(torch.from_numpy(init), noise_t, ts[:1])
    x_start = x.numpy().copy()
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"generator": gen} if sampler in STOCHASTIC else {}
    if R.REGISTRY[sampler].eta_max > 0:  # ddim, tcd: eta passed always (TCDScheduler.step's default is 0.3)
        kwargs = {"eta": eta, "generator": gen}
    for i, t in enumerate(ts):
        out = torch.from_numpy(unet(sch.scale_model_input(x, t).numpy(), float(t)))
        x = sch.step(out, t, x, **kwargs).prev_sample
        if known is not None:  # StableDiffusionInpaintPipeline, num_channels_unet == 4
            image, mask, kn = (torch.from_numpy(a) for a in known)
            proper = image
            if i < len(ts) - 1:
                proper = sch.add_noise(image, kn, torch.tensor([ts[i + 1]]))
            x = (1 - mask) * proper + mask * x
    return x.numpy(), ts.numpy().astype(np.float64), x_start


def ours(sampler, config, n, noise, *, strength=1.0, init=None, known=None, eta=0.0, karras=None, seed=0,
         prediction_type=None):
    sch = R.make_schedule(config, sampler, n, strength=strength, karras=karras, prediction_type=prediction_type)
    x0 = R.prepare_latents(sch, noise, init)
    return R.sample(sch, unet, x0, rng=TorchNoise(seed), eta=eta, known=known), sch, x0


def check(sampler, config, n, *, ours_config=None, tol=REL_TOL, **kw):
    noise, image, mask = arrays()
    karras = kw.pop("karras", False)
    a, sch, a0 = ours(sampler, ours_config or config, n, noise, karras=karras or None, **kw)
    b, ts, b0 = reference(sampler, config, n, noise, karras=karras, **kw)
    assert len(sch.timesteps) == len(ts), (sch.timesteps, ts)
    np.testing.assert_allclose(sch.timesteps, ts, rtol=0, atol=2e-3)
    assert rel_err(a0, b0) <= REL_TOL
    err = rel_err(a, b)
    assert err <= tol, f"{sampler}: relative error {err:.2e}"
    return sch


# ---------------------------------------------------------------------------------------------- parity

GRID = [("leading", 1), ("leading", 10), ("trailing", 4), ("linspace", 25)]


@needs_diffusers
@pytest.mark.parametrize("spacing,steps", GRID)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", R.SAMPLERS)
def test_txt2img_parity(sampler, prediction_type, spacing, steps):
    check(sampler, dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing), steps)


@needs_diffusers
@pytest.mark.parametrize("sampler", ["lms", "euler", "heun", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("spacing,steps", [("linspace", 7), ("leading", 20)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_karras_parity(sampler, spacing, steps, prediction_type):
    check(sampler, dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type), steps, karras=True)


@needs_diffusers
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp_2m", "unipc"])
def test_beta_schedule_parity(sampler, beta_schedule):
    cfg = {"beta_schedule": beta_schedule, "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "trailing",
           "skip_prk_steps": True}  # our pndm is PLMS only, as Stable Diffusion configures it
    if beta_schedule == "linear":
        check(sampler, cfg, 12)
        return
    # squaredcos_cap_v2 ends at alpha_bar ~ 2e-9 (beta capped at 0.999); there diffusers' float32 cumprod
    # drifts ~1e-5 relative from the exact product, which the first (t = 999) step amplifies. So: (1) our
    # betas equal diffusers' (float32) betas; (2) end to end within 1e-4 from the config alone; (3) at
    # REL_TOL when our schedule is given diffusers' alpha_bar (as trained_betas = 1 - ab_t / ab_{t-1}).
    ref = diffusers.DDIMScheduler.from_config(cfg)
    np.testing.assert_allclose(S.betas(beta_schedule, 1000, 0.0001, 0.02), ref.betas.numpy(), rtol=1e-6)
    check(sampler, cfg, 12, tol=1e-4)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    check(sampler, cfg, 12, ours_config=dict(cfg, trained_betas=list(1.0 - ac / np.append(1.0, ac[:-1]))))


@needs_diffusers
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "lcm"])
def test_clip_sample_defaults(sampler):
    """A config without clip_sample gets the diffusers class default (True for DDIM / DDPM)."""
    cfg = {"prediction_type": "sample", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    check(sampler, cfg, 8)
    check(sampler, dict(cfg, clip_sample=True, clip_sample_range=0.5), 8)


@needs_diffusers
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_parity(eta):
    check("ddim", dict(SD_CONFIG, timestep_spacing="trailing"), 10, eta=eta)


@needs_diffusers
@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_eta_parity(eta, steps):
    """TCD's gamma (eta): s = floor((1 - gamma) t') and the forward re-noising, its draws fed as diffusers'."""
    check("tcd", dict(SD_CONFIG, _class_name="TCDScheduler"), steps, eta=eta)
    if steps > 1:
        check("tcd", dict(SD_CONFIG, _class_name="TCDScheduler"), steps, eta=eta, strength=0.6, init=arrays()[1])


@needs_diffusers
def test_prediction_type_argument_overrides_config():
    cfg = dict(SD_CONFIG, prediction_type="epsilon")
    noise, _, _ = arrays()
    a, sch, _ = ours("euler", cfg, 6, noise, prediction_type="v_prediction")
    b, _, _ = reference("euler", dict(cfg, prediction_type="v_prediction"), 6, noise)
    assert sch.prediction_type == "v_prediction" and rel_err(a, b) <= REL_TOL


@needs_diffusers
def test_sample_prediction_parity():
    for sampler in ("ddim", "euler", "dpmpp_2m", "unipc"):
        check(sampler, dict(SD_CONFIG, prediction_type="sample", clip_sample=False), 6)


# ---------------------------------------------------------------------------------------------- img2img


@needs_diffusers
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sampler", R.SAMPLERS)
def test_img2img_parity(sampler, strength):
    """Start step, noised start latents and final latents equal diffusers' img2img."""
    _, image, _ = arrays()
    sch = check(sampler, dict(SD_CONFIG, timestep_spacing="leading"), 10, strength=strength, init=image)
    steps = min(int(10 * strength), 10)  # network calls: heun 2 per step but 1 on the last, PLMS one extra
    assert len(sch.timesteps) == {"heun": 2 * steps - 1, "pndm": steps + 1}.get(sampler, steps)


# ---------------------------------------------------------------------------------------------- inpainting


@needs_diffusers
@pytest.mark.parametrize("sampler", R.SAMPLERS)
def test_inpaint_known_blend_parity(sampler):
    noise, image, mask = arrays()
    blend_noise = arrays(seed=1)[0]
    known = (image, mask, blend_noise)
    check(sampler, dict(SD_CONFIG, timestep_spacing="leading"), 8, known=known)
    check(sampler, dict(SD_CONFIG, timestep_spacing="leading"), 8, known=known, strength=0.6, init=image)


def test_inpaint_known_region_is_image_latents():
    noise, image, mask = arrays()
    sch = R.make_schedule(SD_CONFIG, "euler", 5)
    out = R.sample(sch, unet, R.prepare_latents(sch, noise), known=(image, mask, noise))
    np.testing.assert_array_equal(out[:, :, 4:, :], image[:, :, 4:, :])


def test_inpaint_unet_input():
    x = np.ones((2, 4, 8, 8), np.float32)
    mask = np.full((1, 1, 8, 8), 0.5, np.float32)
    masked = np.full((1, 4, 8, 8), 3.0, np.float32)
    out = R.inpaint_unet_input(x, mask, masked)
    assert out.shape == (2, 9, 8, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :4], 1.0)
    np.testing.assert_array_equal(out[:, 4], 0.5)
    np.testing.assert_array_equal(out[:, 5:], 3.0)
    with pytest.raises(SchedulerError, match="mask"):
        R.inpaint_unet_input(x, np.ones((1, 1, 4, 4), np.float32), masked)


# ---------------------------------------------------------------------------------------------- guidance


def _unet3(x, t, inputs):
    """Stand-in conditional U-Net: output depends on x, t and a per-sample context scalar (input "c")."""
    return (np.tanh(x) * inputs["c"].reshape(-1, 1, 1, 1) + 0.01 * t[:, None, None, None] + x * x * 0.1).astype(np.float32)


def test_guidance_formula_and_single_batched_call():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    cond, uncond = np.array([0.7, -0.2], np.float32), np.array([0.1, 0.1], np.float32)
    calls = []

    def fn(xb, tb, ctx):
        calls.append((xb.shape[0], tb.dtype, tb.shape))
        return _unet3(xb, tb, ctx)

    t = np.full(2, 500.0, np.float32)
    u, c = _unet3(x, t, {"c": uncond}), _unet3(x, t, {"c": cond})
    out = R.guidance(fn, {"c": cond}, {"c": uncond}, 7.5)(x, 500.0)
    np.testing.assert_allclose(out, u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)
    assert calls == [(4, np.float32, (4,))]


def test_guidance_rescale_matches_formula():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    cond, uncond = np.array([0.7, -0.2], np.float32), np.array([0.1, 0.3], np.float32)
    t = np.full(2, 300.0, np.float32)
    u, c = _unet3(x, t, {"c": uncond}).astype(np.float64), _unet3(x, t, {"c": cond}).astype(np.float64)
    g = u + 5.0 * (c - u)
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731
    expected = 0.7 * g * std(c) / std(g) + 0.3 * g  # arXiv:2305.08891 §3.4
    out = R.guidance(_unet3, {"c": cond}, {"c": uncond}, 5.0, guidance_rescale=0.7)(x, 300.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    if diffusers is not None:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        ref = rescale_noise_cfg(torch.from_numpy(g), torch.from_numpy(c), guidance_rescale=0.7).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_guidance_scale_at_most_one_runs_conditional_only(scale):
    x = np.ones((1, 4, 8, 8), np.float32)
    seen = []

    def fn(xb, tb, ctx):
        seen.append(xb.shape[0])
        return _unet3(xb, tb, ctx)

    out = R.guidance(fn, {"c": np.array([0.5], np.float32)}, None, scale)(x, 10.0)
    assert seen == [1]
    np.testing.assert_allclose(out, _unet3(x, np.full(1, 10.0, np.float32), {"c": np.array([0.5], np.float32)}))


# ---------------------------------------------------------------------------------------------- contract


def test_inputs_not_modified_and_deterministic():
    noise, image, mask = arrays()
    copies = [a.copy() for a in (noise, image, mask)]
    for sampler in R.SAMPLERS:
        sch = R.make_schedule(SD_CONFIG, sampler, 5)
        lat = R.prepare_latents(sch, noise)
        lat_copy = lat.copy()
        a = R.sample(sch, unet, lat, rng=np.random.default_rng(0), known=(image, mask, noise))
        b = R.sample(sch, unet, lat, rng=np.random.default_rng(0), known=(image, mask, noise))
        np.testing.assert_array_equal(lat, lat_copy)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and a.shape == SHAPE
    for a, c in zip((noise, image, mask), copies):
        np.testing.assert_array_equal(a, c)


def test_callback_sees_every_network_call():
    seen = []
    sch = R.make_schedule(SD_CONFIG, "heun", 4)
    R.sample(sch, unet, R.prepare_latents(sch, arrays()[0]), callback=lambda i, t, x: seen.append((i, t, x.dtype)))
    assert [s[0] for s in seen] == list(range(len(sch.timesteps))) == list(range(7))
    assert [s[1] for s in seen] == list(sch.timesteps) and all(s[2] == np.float32 for s in seen)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sampler", ["euler", "lms", "heun", "ddim", "dpmpp_2m"])
def test_init_noise_sigma_and_unknown_keys(sampler, spacing):
    """Unknown config keys are ignored; init_noise_sigma is diffusers' (sqrt(sigma_max^2 + 1) for leading)."""
    cfg = dict(SD_CONFIG, timestep_spacing=spacing)
    sch = R.make_schedule({"some_future_key": 1, **cfg}, sampler, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, CLASSES[sampler]).from_config(cfg)
    ref.set_timesteps(20)
    assert sch.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    ({"sampler": "k_euler"}, r"unknown sampler 'k_euler'; accepted: ddim, ddpm, pndm, lms, euler"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be an integer >= 1, got 0"),
    ({"num_inference_steps": 2.5}, r"num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": 1001}, r"exceeds num_train_timesteps 1000"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\], got 0.0"),
    ({"strength": 1.5}, r"strength must be in \(0, 1\], got 1.5"),
    ({"strength": 0.05}, r"leaves no denoising step"),
    ({"config": {"beta_schedule": "sigmoid"}},
     r"unknown beta_schedule 'sigmoid'; accepted: scaled_linear, linear, squaredcos_cap_v2"),
    ({"config": {"timestep_spacing": "uniform"}},
     r"unknown timestep_spacing 'uniform'; accepted: leading, trailing, linspace"),
    ({"prediction_type": "flow"}, r"unknown prediction_type 'flow'; accepted: epsilon, v_prediction, sample"),
    ({"config": {"prediction_type": "x0"}}, r"unknown prediction_type 'x0'"),
    ({"sampler": "ddim", "karras": True}, r"karras sigmas do not apply to 'ddim'"),
    ({"sampler": "dpmpp_2m_karras", "karras": False}, r"always uses Karras sigmas"),
    ({"sampler": "lcm", "num_inference_steps": 60}, r"lcm supports at most original_inference_steps=50"),
    ({"config": {"steps_offset": 5}, "sampler": "ddim", "num_inference_steps": 1000},
     r"steps_offset 5 puts leading timesteps outside \[0, 999\]"),
    ({"config": {"rescale_betas_zero_snr": True}}, r"rescale_betas_zero_snr=True is not supported"),
    ({"config": {"trained_betas": [0.01] * 10}}, r"trained_betas has 10 values but num_train_timesteps is 1000"),
])
def test_make_schedule_errors(kwargs, match):
    args = {"config": SD_CONFIG, "sampler": "euler", "num_inference_steps": 10}
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("strength", "karras", "prediction_type") if k in args}
    with pytest.raises(SchedulerError, match=match):
        R.make_schedule(args["config"], args["sampler"], args["num_inference_steps"], **extra)


def test_scheduler_error_is_value_error():
    assert issubclass(SchedulerError, ValueError)


def test_sample_errors():
    noise, image, mask = arrays()
    sch = R.make_schedule(SD_CONFIG, "euler", 4)
    lat = R.prepare_latents(sch, noise)
    with pytest.raises(SchedulerError,
                       match=r"known image_latents shape \(1, 4, 4, 4\) differs from latents shape \(1, 4, 8, 8\)"):
        R.sample(sch, unet, lat, known=(image[..., :4, :4], mask, noise))
    with pytest.raises(SchedulerError, match=r"known noise shape"):
        R.sample(sch, unet, lat, known=(image, mask, noise[:, :2]))
    with pytest.raises(SchedulerError, match=r"mask shape \(1, 1, 4, 8\) does not broadcast"):
        R.sample(sch, unet, lat, known=(image, mask[..., :4, :], noise))
    with pytest.raises(SchedulerError, match=r"init_latents shape \(1, 4, 4, 4\) differs from noise shape"):
        R.prepare_latents(sch, noise, image[..., :4, :4])
    with pytest.raises(SchedulerError, match=r"model output shape"):
        R.sample(sch, lambda x, t: x[:, :2], lat)
    with pytest.raises(SchedulerError, match=r"draws noise: pass rng"):
        R.sample(R.make_schedule(SD_CONFIG, "euler_a", 4), unet, lat)
    with pytest.raises(SchedulerError, match=r"eta applies to ddim, tcd \(at most 1\) only; got eta=0.5 for 'eul"):
        R.sample(sch, unet, lat, eta=0.5)
    with pytest.raises(SchedulerError, match=r"eta for 'tcd' must be in \[0, 1\]; got 1.5"):
        R.sample(R.make_schedule(SD_CONFIG, "tcd", 4), unet, lat, eta=1.5, rng=np.random.default_rng(0))
    with pytest.raises(SchedulerError, match=r"uncond shape"):
        R.guidance(_unet3, {"c": np.zeros(2, np.float32)}, None, 7.5)


def test_overhead_benchmark_smoke():
    from benchmarks.scheduler_overhead import measure_scheduler_overhead

    r = measure_scheduler_overhead("dpmpp_2m", 3, shape=(1, 4, 8, 8), repeats=2)
    assert r["calls_per_run"] == 3 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]


def test_runtime_scheduler_imports_numpy_and_stdlib_only():
    import ast
    import sys
    from pathlib import Path

    allowed = {"numpy", "runtime"} | set(sys.stdlib_module_names) | {"__future__"}
    for name in ("scheduler.py", "sampling/schedules.py", "sampling/samplers.py", "sampling/deepcache.py"):
        tree = ast.parse((Path(R.__file__).parent / name).read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert mods <= allowed, (name, mods - allowed)
