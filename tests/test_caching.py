"""runtime/sampling/deepcache.py: the step-cache plans (DeepCache's uniform and non-uniform 1:N schedules) and
the U-Net callable that routes calls by a plan, on fake NumPy networks. Torch-free and fast.

The non-uniform schedule is checked against DeepCache's own `sample_from_quad_center`, read out of
the installed PyPI package's source (its module cannot be imported with diffusers 0.42), and
against values that function returned (pinned below, for machines without the package)."""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime import scheduler as sch
from runtime.sampling.deepcache import SCHEDULES, cached_unet, engine_calls, nonuniform_full_calls, plan
from runtime.errors import PipelineError

# full calls of horseee/DeepCache sample_from_quad_center(n, ceil(n / interval), center=15, pow=1.4),
# DeepCache 0.1.1 (PyPI), numpy 2.4
PINNED_NONUNIFORM = {
    (50, 5): [0, 5, 9, 13, 17, 21, 26, 31, 37, 43],
    (50, 3): [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46],
    (20, 3): [0, 4, 8, 11, 14, 15, 17],
    (10, 3): [0, 3, 6, 8],
    (4, 3): [0, 3],
}


def full_calls(p: tuple[bool, ...]) -> list[int]:
    return [i for i, full in enumerate(p) if full]


def deepcache_sample_from_quad_center():
    """The reference function, compiled from the installed DeepCache package's source file."""
    spec = importlib.util.find_spec("DeepCache")
    if spec is None:
        pytest.skip("the DeepCache package is not installed (pip install DeepCache==0.1.1); "
                    "the pinned values still ran")
    path = Path(spec.submodule_search_locations[0]) / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["sample_from_quad_center"]


# --- plans ---------------------------------------------------------------------------------------------

def test_uniform_plan_every_interval_from_call_0():
    assert full_calls(plan(10, 3)) == [0, 3, 6, 9]
    assert full_calls(plan(7, 2)) == [0, 2, 4, 6]
    assert plan(5, 1) == (True,) * 5  # interval 1: caching off
    assert plan(0, 3) == ()
    assert plan(1, 4) == (True,)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_call_0_is_full_and_full_count(schedule):
    unplaceable = 0
    for n in range(1, 60):
        for interval in range(1, 8):
            try:
                p = plan(n, interval, schedule)
            except PipelineError as e:  # DeepCache's non-uniform placement fails for a few (n, interval)
                assert schedule == "nonuniform" and "cannot place" in str(e)
                unplaceable += 1
                continue
            assert len(p) == n and p[0], (n, interval)
            assert sum(p) == -(-n // interval), (n, interval)  # ceil(n / interval) full calls
    assert unplaceable <= 5


def test_nonuniform_pinned_deepcache_values():
    for (n, interval), want in PINNED_NONUNIFORM.items():
        assert full_calls(plan(n, interval, "nonuniform")) == want, (n, interval)
    # denser around call 15 than at the end (50 calls, interval 3): gaps of 2 from call 11 to 17, 3-4 at the end
    gaps = np.diff(PINNED_NONUNIFORM[(50, 3)])
    assert max(gaps[4:7]) == 2 < min(gaps[-3:])


def test_nonuniform_matches_deepcache_function():
    ref = deepcache_sample_from_quad_center()
    checked = failures = 0
    for n in range(1, 121):
        for interval in range(2, 9):
            for center, power in ((15, 1.4), (10, 1.2), (25, 1.6), (0, 1.3)):
                k = -(-n // interval)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # its int32 cast of complex values warns
                        want = sorted(set(int(i) for i in ref(n, k, center, pow=power)[0]))
                except ValueError:
                    failures += 1
                    with pytest.raises(PipelineError, match="cannot place"):
                        plan(n, interval, "nonuniform", center=center, power=power)
                    continue
                assert full_calls(plan(n, interval, "nonuniform", center=center, power=power)) == want, \
                    (n, interval, center, power)
                checked += 1
    assert checked > 3000 and failures < 10


def test_plan_rejects_bad_arguments():
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(PipelineError, match="interval must be an integer >= 1"):
            plan(10, bad)
    with pytest.raises(PipelineError, match="n_calls must be an integer >= 0"):
        plan(-1, 2)
    with pytest.raises(PipelineError, match="unknown cache schedule 'quadratic'; expected one of uniform, nonuniform"):
        plan(10, 2, "quadratic")
    with pytest.raises(PipelineError, match="power must be > 1"):
        plan(10, 2, "nonuniform", power=1.0)
    with pytest.raises(PipelineError, match="cannot place 3 full calls among 2"):
        nonuniform_full_calls(2, 3, 15, 1.4)


# --- routing ---------------------------------------------------------------------------------------------

class FakeSplit:
    """A deterministic fake U-Net split over NumPy: deep -> (noise, feature), shallow(feature) -> noise,
    logging each call. `exact`: the shallow result of the same inputs equals the deep one (as the
    real graphs do); otherwise it mixes in the (stale) feature so caching changes results."""

    def __init__(self, exact: bool):
        self.exact, self.log = exact, []

    def noise(self, x, t, inputs):
        c = inputs["encoder_hidden_states"]
        return np.tanh(0.5 * x + 1e-3 * t[:, None, None, None] + c.mean(axis=(1, 2))[:, None, None, None])

    def deep(self, x, t, c):
        self.log.append(("deep", float(t[0]), x.shape[0]))
        return self.noise(x, t, c), x * 2.0 + t[:, None, None, None]  # the feature remembers its inputs

    def shallow(self, x, t, c, feature):
        self.log.append(("shallow", float(t[0]), x.shape[0]))
        if self.exact:
            return self.noise(x, t, c)
        return self.noise(x, t, c) + 0.01 * np.sin(feature)


def test_cached_unet_routes_by_plan_and_reuses_the_last_full_feature():
    fake = FakeSplit(exact=False)
    x = np.ones((2, 4, 3, 5), np.float32)
    c = {"encoder_hidden_states": np.zeros((2, 7, 8), np.float32)}
    seen = []
    real_shallow = fake.shallow

    def spy(xs, t, cs, feature):
        seen.append(feature.copy())
        return real_shallow(xs, t, cs, feature)

    unet = cached_unet(fake.deep, spy, plan(5, 2))
    for i, t in enumerate((900.0, 800.0, 700.0, 600.0, 500.0)):
        unet(x + i, np.full(2, t, np.float32), c)
    assert [kind for kind, _, _ in fake.log] == ["deep", "shallow", "deep", "shallow", "deep"]
    # call 1 used call 0's feature (x=1, t=900), call 3 call 2's (x=3, t=700)
    np.testing.assert_array_equal(seen[0], (x + 0) * 2.0 + 900.0)
    np.testing.assert_array_equal(seen[1], (x + 2) * 2.0 + 700.0)
    with pytest.raises(PipelineError, match="U-Net call 5 is past the cache plan of 5 calls"):
        unet(x, np.full(2, 400.0, np.float32), c)


def test_cached_unet_refuses_a_batch_change_and_a_plan_without_a_first_full_call():
    fake = FakeSplit(exact=True)
    unet = cached_unet(fake.deep, fake.shallow, (True, False))
    unet(np.zeros((2, 4, 3, 3)), np.zeros(2), {"encoder_hidden_states": np.zeros((2, 7, 8))})
    with pytest.raises(PipelineError, match=r"batch and latent size \(1, 3, 3\) differ from those of the cached "
                                            r"feature's call \(2, 3, 3\)"):
        unet(np.zeros((1, 4, 3, 3)), np.zeros(1), {"encoder_hidden_states": np.zeros((1, 7, 8))})
    with pytest.raises(PipelineError, match="must start with a full call"):
        cached_unet(fake.deep, fake.shallow, (False, True))


SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False}


@pytest.mark.parametrize("sampler", [s for s in sch.SAMPLERS if s not in ("ddpm", "euler_a", "lcm")] + ["euler_a"])
def test_every_sampler_plans_one_entry_per_network_call(sampler):
    """Under guidance, through the scheduler: the plan of len(schedule.timesteps) calls is used up
    exactly (Heun's second evaluations and PNDM's repeated timestep are calls), the deep network
    runs on exactly the planned calls with the doubled batch, and with an exact shallow path the
    cached run equals the uncached one."""
    schedule = sch.make_schedule(SD_CONFIG, sampler, 7)
    n = len(schedule.timesteps)
    p = plan(n, 3)
    cond, uncond = np.full((1, 77, 8), 0.5, np.float32), np.zeros((1, 77, 8), np.float32)
    latents = np.random.default_rng(0).standard_normal((1, 4, 6, 5), dtype=np.float32)
    runs = {}
    for name, exact in (("plain", None), ("exact", True), ("stale", False)):
        fake = FakeSplit(exact=bool(exact))
        unet = (lambda x, t, c: fake.noise(x, t, c)) if exact is None else cached_unet(fake.deep, fake.shallow, p)
        model = sch.guidance(unet, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 7.5)
        rng = np.random.default_rng(1)
        runs[name] = sch.sample(schedule, model, sch.prepare_latents(schedule, latents), rng=rng)
        if exact is not None:
            assert [kind == "deep" for kind, _, _ in fake.log] == list(p), sampler
            assert {b for _, _, b in fake.log} == {2}  # [uncond, cond]
            with pytest.raises(PipelineError, match="past the cache plan"):
                unet(np.zeros((2, 4, 6, 5)), np.zeros(2), {"encoder_hidden_states": np.zeros((2, 77, 8))})
    np.testing.assert_allclose(runs["exact"], runs["plain"], rtol=0, atol=1e-6)
    assert np.abs(runs["stale"] - runs["plain"]).max() > 1e-4  # the stale feature does reach the output


def test_engine_calls_feed_the_contract_names():
    class Engine:
        def __init__(self):
            self.feeds = None

        def run(self, feeds):
            self.feeds = dict(feeds)
            return {"noise_pred": feeds["sample"] + 1, "cache_feature": feeds["sample"] * 3}

    deep_engine, shallow_engine = Engine(), Engine()
    deep, shallow = engine_calls(deep_engine, shallow_engine)
    x, t, c = np.ones((2, 4, 2, 2)), np.zeros(2), {"encoder_hidden_states": np.zeros((2, 77, 8))}
    noise, feature = deep(x, t, c)
    assert set(deep_engine.feeds) == {"sample", "timestep", "encoder_hidden_states"}
    np.testing.assert_array_equal(feature, 3 * x)
    shallow(x, t, c, feature)
    assert set(shallow_engine.feeds) == {"sample", "timestep", "encoder_hidden_states", "cache_feature"}
    assert shallow_engine.feeds["cache_feature"] is feature
