"""The runtime's architecture (issue 12): requests and stages, batching, threads, engine lifecycle and
errors, per-network options, layering, and the correctness fixes found by reading.

Bit-identity claims are checked on both CPU backends (ONNX Runtime, OpenVINO) with real tiny graphs."""

from __future__ import annotations

import ast
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import scheduler as sch
from runtime.engines import open_engines
from runtime.engines.base import Engine
from runtime.errors import (BackendError, EngineClosedError, EngineLoadError, EngineRunError, PipelineError,
                            SDRuntimeError)
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import network_io
from runtime.request import Limits

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ("onnxruntime", "openvino")
STEPS = 4


def _requests(pipe):
    """Mixed requests: prompts, seeds, samplers and guidance differ."""
    return [
        dict(prompt="a red circle", seed=1, scheduler="euler_a"),
        dict(prompt="a blue square on green", seed=2, scheduler="dpmpp_2m", guidance_scale=5.0),
        dict(prompt="a yellow triangle", negative_prompt="blurry", seed=3, scheduler="ddim"),
        dict(prompt=["two cats", "a dog"], seed=[4, 9], scheduler="unipc", guidance_scale=1.0),
    ]


def _run(pipe, kwargs):
    return pipe.txt2img(**kwargs, num_inference_steps=STEPS, output_type="np", progress=False).images


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_four_threads_share_one_pipeline_bit_identically(tiny_sd1_engine, backend):
    with runtime.load(tiny_sd1_engine, backend=backend) as pipe:
        requests = _requests(pipe) * 2  # 8 calls over 4 threads
        serial = [_run(pipe, r) for r in requests]
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def worker(k: int) -> None:
            try:
                barrier.wait()
                for i in range(k, len(requests), 4):
                    results[i] = _run(pipe, requests[i])
            except BaseException as e:  # report in the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, expected in enumerate(serial):
            np.testing.assert_array_equal(results[i], expected, err_msg=f"request {i} on {backend}")
        assert pipe.engines["unet"].info.parallel is True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_of_three_requests_matches_each_alone(tiny_sd1_engine, backend):
    with runtime.load(tiny_sd1_engine, backend=backend) as pipe:
        prompts = [("a red circle", 11), ("a large blue square on a green field", 22), ("tiny yellow stars", 33)]
        settings = dict(num_inference_steps=STEPS, scheduler="euler_a", guidance_scale=6.0, output_type="np")
        alone = [pipe.txt2img(p, seed=s, progress=False, **settings).images[0] for p, s in prompts]
        requests = [pipe.request("txt2img", p, seed=s, **settings) for p, s in prompts]
        seen: list[tuple[int, int]] = []
        callbacks = [lambda i, t, x, k=k: seen.append((k, x.shape[0])) for k in range(3)]
        batched = pipe.generate(requests, callbacks=callbacks, progress=False)
        assert [r.seeds for r in batched] == [[11], [22], [33]]
        for (p, _), got, want in zip(prompts, batched, alone):
            np.testing.assert_array_equal(got.images[0], want, err_msg=f"{p!r} on {backend}")
        assert seen.count((0, 1)) == seen.count((1, 1)) == seen.count((2, 1)) == STEPS
        # the three images differ from each other (the batch did not collapse them)
        assert not np.array_equal(alone[0], alone[1]) and not np.array_equal(alone[1], alone[2])


def test_batch_of_inpaint_requests_matches_each_alone(tiny_sd1_engine):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)]
    masks[0][16:48, 16:48] = 255
    masks[1][:, 32:] = 255
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        settings = dict(num_inference_steps=STEPS, strength=0.8, output_type="np")
        alone = [pipe.inpaint("a cat", im, mk, seed=5 + k, progress=False, **settings).images[0]
                 for k, (im, mk) in enumerate(zip(images, masks))]
        requests = [pipe.request("inpaint", "a cat", image=im, mask_image=mk, seed=5 + k, **settings)
                    for k, (im, mk) in enumerate(zip(images, masks))]
        for got, want in zip(pipe.generate(requests, progress=False), alone):
            np.testing.assert_array_equal(got.images[0], want)


def test_incompatible_requests_are_refused_as_a_batch(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        a = pipe.request("txt2img", "a cat", num_inference_steps=3, seed=1)
        b = pipe.request("txt2img", "a cat", num_inference_steps=4, seed=1)
        with pytest.raises(PipelineError, match="must share mode, size, steps"):
            pipe.generate([a, b])
        long = pipe.request("txt2img", "a cat " * 60, num_inference_steps=3, seed=1)
        assert (a.prompt_chunks, long.prompt_chunks) == (1, 2) and a.batch_key() != long.batch_key()
        with pytest.raises(PipelineError, match=r"prompt chunk count; got 2 different settings \(their prompts "
                                                r"encode to \[1, 2\] 77-token chunks\)"):
            pipe.generate([a, long])
        with pytest.raises(PipelineError, match="leaves no denoising step"):
            pipe.request("img2img", "a cat", image=np.zeros((32, 32, 3), np.uint8), strength=0.1,
                         num_inference_steps=5)
        big = [pipe.request("txt2img", "a cat", num_inference_steps=3, seed=1, num_images_per_prompt=3)] * 2
        with pytest.raises(PipelineError, match="6 images in one batch exceed the engine's max batch 4"):
            pipe.generate(big)


def test_request_is_frozen_and_owns_its_arrays(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        noise = np.zeros((1, 4, 32, 32), np.float32)
        r = pipe.request("txt2img", "a cat", noise=noise, seed=3)
        noise[...] = 1.0  # the caller's array changes; the request's copy does not
        assert r.noise is not None and not r.noise.any() and not r.noise.flags.writeable
        with pytest.raises(AttributeError):
            r.steps = 3  # type: ignore[misc]


def test_cancellation_stops_the_batch(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        calls = []
        r = pipe.request("txt2img", "a cat", num_inference_steps=10, seed=1)
        with pytest.raises(runtime.GenerationCancelled, match="before network call 3"):
            pipe.generate([r], should_stop=[lambda: len(calls) >= 2], callbacks=[lambda i, t, x: calls.append(i)],
                          progress=False)
        assert calls == [0, 1]


# --- engine lifecycle and errors ---------------------------------------------------------------------------

def test_close_and_context_manager(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        unet = pipe.engines["unet"]
        pipe.txt2img("a cat", num_inference_steps=2, seed=0, progress=False)
    assert all(e.closed for e in pipe.engines.values())
    with pytest.raises(EngineClosedError, match="closed"):
        unet.run({"sample": np.zeros((1, 4, 32, 32), np.float32), "timestep": np.zeros(1, np.float32),
                  "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)})
    with pytest.raises(EngineClosedError, match="is closed"):
        pipe.txt2img("a cat", num_inference_steps=2, seed=0, progress=False)
    pipe.close()  # idempotent


def test_a_failing_network_closes_the_ones_already_opened(tiny_sd1_engine, monkeypatch):
    from runtime.engines import onnxruntime as ort_engine

    closed: list[str] = []
    original_close, original_open = ort_engine.OrtEngine._close, ort_engine.open_engine
    monkeypatch.setattr(ort_engine.OrtEngine, "_close", lambda self: (closed.append(self.name), original_close(self)))

    def open_engine(engine_dir, manifest, network, **options):  # the 3rd of the four networks fails to open
        if network == "vae_decoder":
            raise RuntimeError("simulated: device out of memory while loading")
        return original_open(engine_dir, manifest, network, **options)

    monkeypatch.setattr(ort_engine, "open_engine", open_engine)
    with pytest.raises(EngineLoadError, match="vae_decoder \\(onnxruntime\\): cannot open it .*simulated") as e:
        open_engines(tiny_sd1_engine, backend="onnxruntime")
    assert closed == ["text_encoder", "unet"] and isinstance(e.value.__cause__, RuntimeError)


class _Exploding(Engine):
    backend = "fake"

    def __init__(self, dims, error):
        super().__init__("vae_decoder", *network_io("vae_decoder", dims))
        self.error = error

    def _run(self, feeds):
        raise self.error


def test_backend_failures_become_engine_run_errors_chained(tiny_sd1_engine):
    dims = load_manifest(tiny_sd1_engine).dims
    boom = MemoryError("out of memory allocating 3.4 GB")
    engine = _Exploding(dims, boom)
    with pytest.raises(EngineRunError, match=r"vae_decoder \(fake\): inference failed .*MemoryError: out of memory") as e:
        engine.run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
    assert e.value.__cause__ is boom and isinstance(e.value, SDRuntimeError)


def test_openvino_runtime_errors_are_run_errors_not_input_errors(tiny_sd1_engine, monkeypatch):
    """Before: any OpenVINO RuntimeError, out-of-memory included, became an input error `from None`."""
    from runtime.engines import openvino as ov_engine

    _, engines = open_engines(tiny_sd1_engine, backend="openvino", inference_precision="f32", cache_dir=None)
    failure = RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp: std::bad_alloc")
    monkeypatch.setattr(ov_engine._Variant, "infer", lambda self, feeds: (_ for _ in ()).throw(failure))
    with pytest.raises(EngineRunError, match="bad_alloc") as e:
        engines["vae_decoder"].run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
    assert e.value.__cause__ is failure and not isinstance(e.value, ValueError)


def test_engines_describe_themselves(tiny_sd1_engine):
    _, ort = open_engines(tiny_sd1_engine, backend="onnxruntime")
    _, ov = open_engines(tiny_sd1_engine, backend="openvino", inference_precision="f32", cache_dir=None)
    assert (ort["unet"].info.backend, ort["unet"].info.weights, ort["unet"].info.file) == ("onnxruntime", "fp32",
                                                                                          "unet.onnx")
    assert (ov["unet"].info.weights, ov["unet"].info.compute, ov["unet"].info.parallel) == ("fp32", "fp32", True)


def test_options_per_network(tiny_sd1_engine):
    import onnxruntime as ort

    options = {"unet": {"optimization_level": "basic", "threads": 2}, "*": {"threads": 1}}
    with runtime.load(tiny_sd1_engine, backend="onnxruntime", options=options) as pipe:
        unet = pipe.engines["unet"].session.get_session_options()
        text = pipe.engines["text_encoder"].session.get_session_options()
        assert unet.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert text.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert (unet.intra_op_num_threads, text.intra_op_num_threads) == (2, 1)
    with pytest.raises(BackendError, match=r"options: unknown network\(s\) unett"):
        runtime.load(tiny_sd1_engine, backend="onnxruntime", options={"unett": {"threads": 1}})
    with pytest.raises(BackendError, match=r"does not take the option\(s\) inference_precision"):
        runtime.load(tiny_sd1_engine, backend="onnxruntime", options={"vae_decoder": {"inference_precision": "f32"}})


# --- layering and size ------------------------------------------------------------------------------------

def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return names


def test_runtime_imports_nothing_from_export_or_torch():
    offenders = [(p.relative_to(ROOT).as_posix(), name) for p in sorted((ROOT / "runtime").rglob("*.py"))
                 for name in _imports(p) if name.split(".")[0] in ("export", "torch", "benchmarks")]
    assert offenders == []
    # the walk sees imports at all (it is not vacuous)
    assert "runtime.engines.base" in _imports(ROOT / "runtime" / "pipeline.py") or \
        any(n.startswith("runtime") for n in _imports(ROOT / "runtime" / "pipeline.py"))


MAX_LINES = 60
LONG_MARK = "# long:"  # written on the def line (or the line above) with the reason


def test_no_long_functions_without_a_reason():
    long = []
    for pkg in ("runtime", "export", "benchmarks", "tools"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    marked = any(LONG_MARK in lines[i] for i in (node.lineno - 2, node.lineno - 1) if i >= 0)
                    if n > MAX_LINES and not marked:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


# --- correctness fixes found by reading ------------------------------------------------------------------

def test_lcm_configs_run_lcm_and_unmapped_classes_are_gone():
    assert sch.default_sampler({"_class_name": "LCMScheduler"}) == "lcm"
    assert set(sch.SCHEDULER_CLASSES.values()) <= set(sch.SAMPLERS)
    with pytest.warns(RuntimeWarning, match="DPMSolverSinglestepScheduler has no NumPy sampler"):
        assert sch.default_sampler({"_class_name": "DPMSolverSinglestepScheduler"}) == sch.FALLBACK_SAMPLER


@pytest.mark.parametrize("setting", [{"solver_order": 3}, {"algorithm_type": "dpmsolver"},
                                     {"algorithm_type": "sde-dpmsolver++"}, {"solver_type": "heun"}])
def test_unimplemented_scheduler_settings_are_refused(setting):
    config = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", **setting}
    key, value = next(iter(setting.items()))
    with pytest.raises(sch.SchedulerError, match=re.escape(f"{key}={value!r} is not implemented by the 'dpmpp_2m' sampler")):
        sch.make_schedule(config, "dpmpp_2m", 10)
    # the same keys in another class's config mean nothing to dpmpp_2m... but refuse for their own class
    sch.make_schedule({**config, "_class_name": "EulerDiscreteScheduler"}, "dpmpp_2m", 10)
    with pytest.raises(sch.SchedulerError, match="solver_order=3 is not implemented by the 'unipc' sampler"):
        sch.make_schedule({"_class_name": "UniPCMultistepScheduler", "solver_order": 3}, "unipc", 10)


def test_default_size_is_clamped_into_the_shape_range(tmp_path):
    from export.build import build_engine

    folder = build_engine("tiny-sd1", tmp_path / "small", opt_image=32, max_image=48, progress=lambda s: None)
    with runtime.load(folder, backend="onnxruntime") as pipe:
        assert tuple(pipe.manifest.default_size) == (64, 64)  # the model's native size, outside [16, 48]
        assert pipe.default_size == (48, 48)
        out = pipe.txt2img("a cat", num_inference_steps=2, seed=0, output_type="np", progress=False)
        assert out.images.shape == (1, 48, 48, 3)


def test_limits_clamp_from_below_too(tiny_sd1_engine):
    from dataclasses import replace

    m = load_manifest(tiny_sd1_engine)
    m = replace(m, shapes={**m.shapes, "min_image": 96, "opt_image": 96, "max_image": 128})
    assert Limits.from_manifest(m, "pndm", sch.SAMPLERS).default_size == (96, 96)


def test_fp16_folder_keeps_a_force_upcast_vae_in_fp32(tmp_path):
    from export.build import build_engine

    folder = build_engine("tiny-sd1", tmp_path / "fp16", precision="fp16", progress=lambda s: None)
    m = load_manifest(folder)
    assert {n: e["precision"] for n, e in m.networks.items()} == {
        "text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    with runtime.load(folder, backend="onnxruntime") as pipe:
        assert pipe.engines["vae_decoder"].inputs[0].dtype == "float32"
        assert pipe.engines["unet"].inputs[0].dtype == "float16"
        out = pipe.txt2img("a cat", num_inference_steps=2, seed=0, output_type="np", progress=False)
        assert np.isfinite(out.images).all()
