"""TensorRT backend: the pure parts (optimization profiles from the manifest's shape range, plan
cache keys and the rebuild decision, precision modes, ORT TensorRT EP options) and the clear error
where TensorRT or a GPU is missing run everywhere. Building and running plans needs `tensorrt`,
cuda-python and a CUDA device; those tests are skipped elsewhere with the reason."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.compare import rel_err
from runtime.errors import BackendError

from runtime.engines import tensorrt as rt_trt
from runtime.engines.base import EngineInputError
from runtime.engines.ort_tensorrt import (
    ORT_CACHE_SUBDIR,
    ort_tensorrt_provider_options,
    ort_tensorrt_providers,
    shapes_option,
)
from runtime.engines.tensorrt import StalePlanError, TensorRTUnavailable
from runtime.engines.trt_plans import (
    ProfileRangeError,
    ShapeRange,
    axis_ranges,
    check_profile,
    key_hash,
    network_profile,
    plan_key,
    plan_paths,
    runtime_mismatch,
    stale_reasons,
)
from runtime.folder.manifest import Manifest
from runtime.folder.networks import NETWORKS, ModelDims

SD15 = ModelDims(latent_channels=4, unet_in_channels=4, vae_scale_factor=8, text_hidden_size=768)
SHAPES = {"min_batch": 1, "opt_batch": 1, "max_batch": 4, "min_image": 256, "opt_image": 512, "max_image": 768}
AVAILABLE, UNAVAILABLE_REASON = rt_trt.is_available()
needs_gpu = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine tests need tensorrt, cuda-python and a CUDA "
                                                     f"device: {UNAVAILABLE_REASON}")


def manifest(precision: str = "fp32", networks=NETWORKS, shapes=SHAPES, dims=SD15, backends=None) -> Manifest:
    return Manifest(
        family="sd1", dims=dims, scaling_factor=0.18215, prediction_type="epsilon", scheduler={},
        tokenizer={"dir": "tokenizer", "pad_token": "<|endoftext|>"}, default_size=(512, 512), shapes=dict(shapes),
        precision=precision,
        networks={n: {"file": f"{n}.onnx", "external_data": None, "precision": precision, "sha256": ""}
                  for n in networks},
        backends=backends or {},
    )


# --- optimization profiles ---------------------------------------------------------------------------

def test_unet_profile_doubles_batch_under_guidance_and_spans_prompt_chunks():
    p = network_profile("unet", SD15, SHAPES)
    assert p["sample"] == ShapeRange((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 96, 96))
    assert p["timestep"] == ShapeRange((1,), (2,), (8,))
    assert p["encoder_hidden_states"] == ShapeRange((1, 77, 768), (2, 77, 768), (8, 77 * 3, 768))
    p = network_profile("unet", SD15, SHAPES, guidance=False, max_prompt_chunks=1)
    assert p["sample"] == ShapeRange((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 96, 96))
    assert p["encoder_hidden_states"].max == (4, 77, 768)


def test_other_networks_profiles():
    assert network_profile("text_encoder", SD15, SHAPES) == {"input_ids": ShapeRange((1, 77), (1, 77), (4, 77))}
    assert network_profile("vae_decoder", SD15, SHAPES) == {
        "latent": ShapeRange((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 96, 96))}
    assert network_profile("vae_encoder", SD15, SHAPES) == {
        "image": ShapeRange((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 768, 768))}
    inpaint = ModelDims(4, 9, 8, 1024)
    assert network_profile("unet", inpaint, SHAPES)["sample"].max == (8, 9, 96, 96)


def test_profile_rounds_image_bounds_to_whole_latents():
    r = axis_ranges("vae_decoder", SD15, {**SHAPES, "min_image": 260, "max_image": 770})
    assert r["latent_height"] == (33, 64, 96) and r["height"] == (264, 512, 768)


@pytest.mark.parametrize("bad", [{"min_batch": 2, "opt_batch": 1}, {"max_image": 128}, {"min_image": 4}])
def test_profile_rejects_inconsistent_ranges(bad):
    with pytest.raises(ValueError):
        axis_ranges("unet", SD15, {**SHAPES, **bad})


def test_check_profile_names_input_and_range():
    p = network_profile("unet", SD15, SHAPES)
    check_profile("unet", {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 154, 768)}, p)
    with pytest.raises(ProfileRangeError, match=r"'sample' has shape \(2, 4, 128, 128\).*max \(8, 4, 96, 96\)") as e:
        check_profile("unet", {"sample": (2, 4, 128, 128)}, p)
    assert isinstance(e.value, EngineInputError)  # callers catch one input-error type for every backend


# --- cache keys and the rebuild decision ---------------------------------------------------------------

def key(**over):
    args = dict(onnx_sha256="ab" * 32, tensorrt_version="10.15.1.29", compute_capability="9.0", precision="fp16",
                profile=network_profile("unet", SD15, SHAPES), strongly_typed=False, optimization_level=3)
    args.update(over)
    return plan_key("unet", **args)


def test_plan_key_hash_is_stable_and_names_the_files():
    assert key_hash(key()) == key_hash(json.loads(json.dumps(key())))
    plan, key_file = plan_paths("unet", key())
    h = key_hash(key())
    assert plan == f"tensorrt/unet.{h}.plan" and key_file == f"tensorrt/unet.{h}.json" and len(h) == 16


def test_same_key_is_reused():
    assert stale_reasons(json.loads(json.dumps(key())), key()) == []


@pytest.mark.parametrize("field, value, label", [
    ("tensorrt_version", "10.16.0.1", "TensorRT version"),
    ("compute_capability", "8.9", "GPU compute capability"),
    ("onnx_sha256", "cd" * 32, "ONNX graph"),
    ("precision", "bf16", "precision"),
    ("optimization_level", 5, "optimization level"),
    ("profile", network_profile("unet", SD15, {**SHAPES, "max_image": 1024}), "optimization profile"),
])
def test_any_difference_forces_a_rebuild(field, value, label):
    reasons = stale_reasons(key(), key(**{field: value}))
    assert len(reasons) == 1 and label in reasons[0]
    assert key_hash(key()) != key_hash(key(**{field: value}))


def test_missing_plan_is_built():
    assert stale_reasons(None, key()) == ["no plan has been built"]


def test_runtime_refuses_other_tensorrt_or_gpu():
    stored = key()
    assert runtime_mismatch(stored, "10.15.1.29", "9.0") == []
    (why,) = runtime_mismatch(stored, "10.16.0.1", "9.0")
    assert "TensorRT 10.15.1.29" in why and "10.16.0.1" in why
    (why,) = runtime_mismatch(stored, "10.15.1.29", "8.6")
    assert "compute capability 9.0" in why and "8.6" in why
    assert len(runtime_mismatch(stored, "10.0.0", "7.5")) == 2


# --- precision modes -----------------------------------------------------------------------------------

def test_build_mode_per_graph_precision():
    from export.tensorrt import build_mode

    # strongly typed: types exactly as the graph has them
    assert build_mode("fp16", "fp16", "fp16") == ("fp16", True, None)
    assert build_mode("fp32", "fp32", "fp32") == ("fp32", True, None)
    # an fp16 folder's fp32 graph (the force_upcast VAE) gives an fp32 plan, strongly typed
    assert build_mode("fp32", "fp16", "fp16") == ("fp32", True, None)
    # no weakly typed fp16 over fp32 graphs (deprecated in TensorRT 10.12, gone in 11)
    with pytest.raises(ValueError, match="fp16 TensorRT plans are built from fp16 graphs"):
        build_mode("fp32", "fp16", "fp32")
    assert build_mode("bf16", "bf16", "bf16") == ("bf16", False, "BF16")  # TensorRT 10 only, checked before parsing
    with pytest.raises(ValueError, match="graphs are fp16"):
        build_mode("fp16", "fp32", "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        build_mode("fp32", "int8")


def test_fp16_plans_over_an_fp32_folder_are_refused_before_the_gpu(tmp_path):
    from export.tensorrt import build_tensorrt_engines

    with pytest.raises(ValueError, match="fp16 TensorRT plans are built from fp16 graphs"):
        build_tensorrt_engines(tmp_path, manifest("fp32"), precision="fp16", progress=lambda _: None)
    assert not (tmp_path / "tensorrt").exists()


# --- without TensorRT or a GPU -------------------------------------------------------------------------

@pytest.mark.skipif(AVAILABLE, reason="TensorRT and a GPU are available here")
def test_build_without_tensorrt_says_what_is_missing(tmp_path):
    from export.tensorrt import build_tensorrt_engines

    with pytest.raises(TensorRTUnavailable) as e:
        build_tensorrt_engines(tmp_path, manifest(), precision="fp32", progress=lambda _: None)
    assert isinstance(e.value, BackendError)  # runtime/errors.py: cannot run on this machine
    msg = str(e.value)
    assert ("'tensorrt' Python module is not installed" in msg or "cuda-python" in msg or "CUDA device" in msg)
    assert "pip install 'sd-runtime[tensorrt-cu12]' (NVIDIA driver >= 525)" in msg
    assert not (tmp_path / "tensorrt").exists()  # nothing half-built
    ok, reason = rt_trt.is_available()
    assert not ok and reason == msg


def _fake_trt_without_gpu(monkeypatch):
    """tensorrt and cuda-python that import, on a machine whose CUDA runtime finds no device."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.15.1.29"))
    err = types.SimpleNamespace(cudaSuccess=0, cudaErrorNoDevice=100)
    cudart = types.SimpleNamespace(
        cudaError_t=err,
        cudaGetDeviceCount=lambda: (err.cudaErrorNoDevice, 0),
        cudaGetErrorString=lambda e: (0, b"no CUDA-capable device is detected"),
        cudaDriverGetVersion=lambda: (0, 12040),
        cudaRuntimeGetVersion=lambda: (0, 12090),
    )
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=types.SimpleNamespace(runtime=cudart)))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=cudart))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


def test_build_without_gpu_says_no_cuda_device(tmp_path, monkeypatch):
    from export.tensorrt import build_tensorrt_engines

    _fake_trt_without_gpu(monkeypatch)
    with pytest.raises(TensorRTUnavailable, match="no CUDA device is available .*no CUDA-capable device") as e:
        build_tensorrt_engines(tmp_path, manifest(), precision="fp32", progress=lambda _: None)
    assert "sd-runtime[tensorrt-cu13]' (driver >= 580)" in str(e.value)
    assert rt_trt.is_available()[0] is False


def test_open_engine_without_plans_says_how_to_build(tmp_path):
    with pytest.raises(StalePlanError, match="build-engine SOURCE --out DIR --tensorrt"):
        rt_trt.open_engine(tmp_path, manifest(), "unet")
    entry = {"networks": {"vae_decoder": {"plan": "tensorrt/x.plan", "key": "tensorrt/x.json"}}}
    with pytest.raises(StalePlanError, match="no TensorRT plan for 'unet'"):
        rt_trt.open_engine(tmp_path, manifest(backends={"tensorrt": entry}), "unet")
    with pytest.raises(StalePlanError, match="missing"):
        rt_trt.open_engine(tmp_path, manifest(backends={"tensorrt": entry}), "vae_decoder")


def test_build_rejects_bad_arguments_before_touching_the_gpu(tmp_path):
    from export.tensorrt import build_tensorrt_engines

    with pytest.raises(ValueError, match="unknown precision"):
        build_tensorrt_engines(tmp_path, manifest(), precision="int8")
    with pytest.raises(ValueError, match="optimization_level"):
        build_tensorrt_engines(tmp_path, manifest(), optimization_level=7)


# --- ONNX Runtime TensorRT EP options ------------------------------------------------------------------

def test_ort_tensorrt_options(tmp_path):
    opts = ort_tensorrt_provider_options(tmp_path, manifest("fp32"), "unet", precision="fp16", workspace_gib=4)
    assert opts["trt_engine_cache_enable"] is True and opts["trt_timing_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / "ort-cache") == opts["trt_timing_cache_path"]
    assert opts["trt_fp16_enable"] is True and "trt_bf16_enable" not in opts
    assert opts["trt_max_workspace_size"] == 4 << 30
    assert opts["trt_profile_min_shapes"] == "sample:1x4x32x32,timestep:1,encoder_hidden_states:1x77x768"
    assert opts["trt_profile_opt_shapes"] == "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768"
    assert opts["trt_profile_max_shapes"] == "sample:8x4x96x96,timestep:8,encoder_hidden_states:8x231x768"
    bf16 = ort_tensorrt_provider_options(tmp_path, manifest("bf16"), "vae_decoder", ort_version="1.23.0")
    assert bf16["trt_bf16_enable"] is True and bf16["trt_fp16_enable"] is False
    assert bf16["trt_profile_max_shapes"] == "latent:4x4x96x96"
    with pytest.raises(ValueError, match="graphs are fp16"):
        ort_tensorrt_provider_options(tmp_path, manifest("fp16"), "unet", precision="fp32")
    # an fp16 folder's fp32 graphs (the force_upcast VAE) get fp32 TensorRT, not fp16 over fp32
    m = manifest("fp16")
    m.networks["vae_decoder"]["precision"] = "fp32"
    assert ort_tensorrt_provider_options(tmp_path, m, "vae_decoder")["trt_fp16_enable"] is False
    assert ort_tensorrt_provider_options(tmp_path, m, "unet")["trt_fp16_enable"] is True


def test_ort_tensorrt_providers_order_and_cache_folder(tmp_path):
    providers = ort_tensorrt_providers(tmp_path, manifest("fp16"), "text_encoder", device_id=1)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers[0][1]["device_id"] == 1 and providers[1][1] == {"device_id": 1}
    assert (tmp_path / ORT_CACHE_SUBDIR).is_dir()


def test_shapes_option_rejects_unknown_bound():
    with pytest.raises(ValueError):
        shapes_option({"x": ShapeRange((1,), (1,), (2,))}, "mid")


# --- on a GPU with TensorRT ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory) -> tuple[Path, Manifest, object]:
    """Tiny fp32 graphs from the project's exporter, with a manifest (no plans yet)."""
    pytest.importorskip("torch")
    from export.loading.read import random_model
    from export.onnx_export import Shape, export_network

    model = random_model("tiny-sd1")
    out = tmp_path_factory.mktemp("tiny-trt")
    size = model.spec.unet.sample_size * model.spec.vae_scale_factor  # 64
    shapes = {"min_batch": 1, "opt_batch": 1, "max_batch": 2, "min_image": size // 2, "opt_image": size,
              "max_image": 2 * size}
    networks = {}
    for network in NETWORKS:
        r = export_network(network, model, out, precision="fp32", parity_shapes=[Shape(1, size, size)])
        networks[network] = {"file": r.file, "external_data": r.external_data, "precision": "fp32", "sha256": ""}
    m = manifest("fp32", dims=model.spec.dims, shapes=shapes)
    m = Manifest(**{**vars(m), "networks": networks})
    return out, m, model


def _ort_reference(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _feeds(engine, shape: dict, rng) -> dict:
    feeds = {}
    for spec in engine.inputs:
        size = tuple(d if isinstance(d, int) else shape[d] for d in spec.shape)
        if spec.dtype == "int32":
            feeds[spec.name] = rng.integers(0, 1000, size=size, dtype=np.int32)
        else:
            feeds[spec.name] = rng.standard_normal(size).astype(spec.dtype)
    return feeds


# Relative error of TensorRT plans against ONNX Runtime CPU on the same graph (fp32 plans; TF32
# tensor cores are on by default in TensorRT, hence not 1e-5).
TRT_FP32_RTOL = 1e-2


@pytest.mark.gpu
@needs_gpu
def test_build_run_and_reuse(tiny_engine_dir):
    from export.tensorrt import build_tensorrt_engines

    engine_dir, m, _ = tiny_engine_dir
    log: list[str] = []
    entry = build_tensorrt_engines(engine_dir, m, precision="fp32", progress=log.append)
    assert set(entry["networks"]) == set(NETWORKS) and (engine_dir / "tensorrt" / "timing.cache").is_file()
    assert any("building" in line for line in log)
    log.clear()
    again = build_tensorrt_engines(engine_dir, m, precision="fp32", progress=log.append)
    assert again["networks"] == entry["networks"] and all("reusing" in line for line in log)

    m = Manifest(**{**vars(m), "backends": {"tensorrt": entry}})
    assert rt_trt.plans_problem(engine_dir, m) is None
    rng = np.random.default_rng(0)
    axes = {"batch": 2, "latent_height": 16, "latent_width": 24, "height": 32, "width": 48, "tokens": 154}
    for network in NETWORKS:
        engine = rt_trt.open_engine(engine_dir, m, network)
        feeds = _feeds(engine, axes, rng)
        ref = _ort_reference(engine_dir / m.networks[network]["file"], feeds)
        for _ in range(2):  # the second call reuses the buffers
            got = engine.run(feeds)
            for name, r in ref.items():
                err = rel_err(got[name], r)
                assert err < TRT_FP32_RTOL, f"{network}.{name}: relative error {err:.3g}"
        engine.close()


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_matches_and_shape_range_is_checked(tiny_engine_dir):
    from export.tensorrt import build_tensorrt_engines

    engine_dir, m, _ = tiny_engine_dir
    entry = build_tensorrt_engines(engine_dir, m, precision="fp32", networks=["vae_decoder"], progress=lambda _: None)
    m = Manifest(**{**vars(m), "backends": {"tensorrt": entry}})
    plain = rt_trt.open_engine(engine_dir, m, "vae_decoder")
    graphed = rt_trt.open_engine(engine_dir, m, "vae_decoder", cuda_graph=True)
    rng = np.random.default_rng(1)
    for shape in ((1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32), (2, 4, 16, 16), (2, 4, 16, 16)):
        latent = rng.standard_normal(shape).astype(np.float32)
        a, b = plain.run({"latent": latent})["image"], graphed.run({"latent": latent})["image"]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ProfileRangeError, match="outside the plan's optimization profile"):
        plain.run({"latent": np.zeros((1, 4, 128, 128), np.float32)})


@pytest.mark.gpu
@needs_gpu
def test_plan_from_another_tensorrt_version_is_refused(tiny_engine_dir):
    from export.tensorrt import build_tensorrt_engines

    engine_dir, m, _ = tiny_engine_dir
    entry = build_tensorrt_engines(engine_dir, m, precision="fp32", networks=["vae_decoder"], progress=lambda _: None)
    key_file = engine_dir / entry["networks"]["vae_decoder"]["key"]
    stored = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**stored, "tensorrt_version": "9.0.0"}))
    m2 = Manifest(**{**vars(m), "backends": {"tensorrt": entry}})
    try:
        with pytest.raises(StalePlanError, match="built with TensorRT 9.0.0"):
            rt_trt.open_engine(engine_dir, m2, "vae_decoder")
        log: list[str] = []
        build_tensorrt_engines(engine_dir, m, precision="fp32", networks=["vae_decoder"], progress=log.append)
        assert any("building" in line and "TensorRT version" in line for line in log)
    finally:
        key_file.write_text(json.dumps(stored))


def test_plans_problem_explains_without_loading(tmp_path):
    why = rt_trt.plans_problem(tmp_path, manifest())
    assert why is not None
    if not AVAILABLE:
        assert why == UNAVAILABLE_REASON


def _fake_trt_with_gpu(monkeypatch, version: str, capability: tuple[int, int]):
    """tensorrt and cuda-python stand-ins that report a version and one GPU, for the key checks that
    happen before anything is deserialized. They cannot build or run anything."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    attr = types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor")
    values = {"major": capability[0], "minor": capability[1]}
    cudart = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaDeviceAttr=attr,
        cudaDriverGetVersion=lambda: (0, 13000),
        cudaRuntimeGetVersion=lambda: (0, 13000),
        cudaGetDeviceCount=lambda: (0, 1),
        cudaDeviceGetAttribute=lambda a, device: (0, values[a]),
        cudaGetDeviceProperties=lambda device: (0, types.SimpleNamespace(name=b"Fake GPU")),
    )
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=types.SimpleNamespace(runtime=cudart)))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=cudart))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


def test_stale_plan_is_refused_before_deserializing(tmp_path, monkeypatch):
    stored = key()  # TensorRT 10.15.1.29, compute capability 9.0
    plan_rel, key_rel = plan_paths("unet", stored)
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / plan_rel).write_bytes(b"not a plan")
    (tmp_path / key_rel).write_text(json.dumps(stored))
    m = manifest(backends={"tensorrt": {"networks": {"unet": {"plan": plan_rel, "key": key_rel}}}})

    _fake_trt_with_gpu(monkeypatch, "10.15.1.29", (8, 9))
    assert rt_trt.cuda_environment().compute_capability == "8.9"
    why = rt_trt.plans_problem(tmp_path, m, ("unet",))
    assert "compute capability 9.0" in why and "8.9" in why
    with pytest.raises(StalePlanError, match="cannot be used here: .*compute capability 9.0, this GPU has 8.9"):
        rt_trt.open_engine(tmp_path, m, "unet")

    _fake_trt_with_gpu(monkeypatch, "10.15.1.29", (9, 0))
    assert rt_trt.plans_problem(tmp_path, m, ("unet",)) is None


# --- the driver, the logger, the calling thread (issue 16) -------------------------------------------

NVIDIA_550 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"


def _fake_cuda_stack(monkeypatch, tmp_path, *, count_error: int, driver: int, runtime: int, wheels=None):
    """tensorrt and cuda-python stand-ins on a machine whose driver supports CUDA `driver` (e.g. 12040)."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1.11"))
    err = types.SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)
    cudart = types.SimpleNamespace(
        cudaError_t=err,
        cudaGetDeviceCount=lambda: (count_error, 0 if count_error else 1),
        cudaGetErrorString=lambda e: (0, b"CUDA driver version is insufficient for CUDA runtime version"),
        cudaDriverGetVersion=lambda: (0, driver),
        cudaRuntimeGetVersion=lambda: (0, runtime),
    )
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=types.SimpleNamespace(runtime=cudart)))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=cudart))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    version_file = tmp_path / "nvidia-version"
    version_file.write_text(NVIDIA_550)
    monkeypatch.setattr(rt_trt.cuda_stack, "DRIVER_VERSION_FILE", version_file)
    monkeypatch.setattr(rt_trt.cuda_stack, "installed", lambda: dict(wheels or {}))


def test_an_old_driver_is_reported_as_an_old_driver(tmp_path, monkeypatch):
    """cuda-python 13 on a 550 driver (CUDA 12.4): every call fails with cudaErrorInsufficientDriver."""
    _fake_cuda_stack(monkeypatch, tmp_path, count_error=35, driver=12040, runtime=13000)
    with pytest.raises(TensorRTUnavailable) as e:
        rt_trt.cuda_environment()
    msg = str(e.value)
    assert "the NVIDIA driver is too old: driver 550.54.15 supports CUDA up to 12.4" in msg
    assert "built for CUDA 13.0 and needs a driver >= 580" in msg
    assert "pip install 'sd-runtime[tensorrt-cu12]'" in msg  # the set that fits the driver found
    assert "no CUDA device" not in msg
    assert rt_trt.is_available() == (False, msg)


def test_tensorrt_wheels_newer_than_the_driver_are_named(tmp_path, monkeypatch):
    """cuda-python 12 runs on the 550 driver, but tensorrt-cu13 (what `tensorrt>=10.16` pulls) cannot."""
    _fake_cuda_stack(monkeypatch, tmp_path, count_error=0, driver=12040, runtime=12090,
                     wheels={"tensorrt-cu13": "10.16.1.11", "tensorrt-cu13-libs": "10.16.1.11"})
    with pytest.raises(TensorRTUnavailable, match=r"driver 550\.54\.15 supports CUDA up to 12\.4, but TensorRT "
                                                  r"\(tensorrt-cu13\) is built for CUDA 13\.0 and needs a driver >= 580"):
        rt_trt.cuda_environment()


def test_driver_rules_and_release_parsing():
    from runtime.engines import cuda

    assert cuda.driver_problem(13000, 13000) is None and cuda.driver_problem(13020, 12090) is None
    assert "needs a driver >= 525" in cuda.driver_problem(11080, 12090)
    assert cuda.driver_problem(0, 12090).startswith("no NVIDIA driver is installed")
    assert cuda.parse_driver_release(NVIDIA_550) == "550.54.15"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)"
    assert cuda.parse_driver_release(open_module) == "580.65.06"
    assert rt_trt.tensorrt_cuda_major({"tensorrt-cu12": "10.12.0.36", "cuda-python": "12.9.4"}) == 12
    assert rt_trt.tensorrt_cuda_major({"tensorrt": "10.16.1.11"}) is None


def test_one_logger_for_the_process(monkeypatch):
    made = []

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            made.append(level)

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.1.0.106", Logger=Logger))
    monkeypatch.setattr(rt_trt, "_LOGGER", None)
    first = rt_trt.trt_logger()
    assert rt_trt.trt_logger() is first and made == ["warning"]


def test_step_cache_networks_get_profiles():
    dims = ModelDims(4, 4, 8, 768, cache_channels=640, cache_level=1)
    deep = network_profile("unet_deep", dims, SHAPES)
    shallow = network_profile("unet_shallow", dims, SHAPES)
    assert deep["sample"] == ShapeRange((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 96, 96))  # the guidance batch
    assert shallow["cache_feature"] == ShapeRange((1, 640, 16, 16), (2, 640, 32, 32), (8, 640, 48, 48))


def test_weakly_typed_bf16_is_refused_on_tensorrt_11_before_parsing(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from export.tensorrt import TensorRTBuildError, check_before_parsing

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    trt10 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(BF16="bf16", FP16="fp16", TF32="tf32"))
    trt11 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32="tf32"))  # pyCore.cpp at 11.1
    check_before_parsing(trt10, path, "g", "fp32", "BF16", "10.16.1.11")
    with pytest.raises(TensorRTBuildError, match="TensorRT 11.1.0.106 has no BuilderFlag.BF16"):
        check_before_parsing(trt11, path, "g", "fp32", "BF16", "11.1.0.106")
    with pytest.raises(TensorRTBuildError, match="manifest says the graph is fp16, but g.onnx has float32"):
        check_before_parsing(trt11, path, "g", "fp16", None, "11.1.0.106")


class _FakeCudaRuntime:
    """cuda-python's runtime module as far as TensorRTEngine uses it; records what each thread does."""

    def __init__(self):
        import threading

        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal="global",
                                                          cudaStreamCaptureModeThreadLocal="thread-local")
        self.calls: list[tuple[str, object]] = []
        self._threading, self._next = threading, 0x1000

    def _log(self, name, value=None):
        self.calls.append((name, value))
        return 0

    def cudaSetDevice(self, device):
        return self._log("cudaSetDevice", (device, self._threading.get_ident()))

    def cudaMalloc(self, n):
        self._next += n
        return 0, self._next

    def cudaFree(self, ptr): return self._log("cudaFree", ptr)
    def cudaMemcpyAsync(self, dst, src, n, kind, stream): return 0
    def cudaStreamCreate(self): return 0, 7  # cudaStream_t converts to int, as execute_async_v3 takes it
    def cudaStreamSynchronize(self, stream): return 0
    def cudaStreamDestroy(self, stream): return self._log("cudaStreamDestroy")
    def cudaStreamBeginCapture(self, stream, mode): return self._log("cudaStreamBeginCapture", mode)
    def cudaStreamEndCapture(self, stream): return 0, "graph"
    def cudaGraphInstantiate(self, graph, flags): return 0, "graph-exec"
    def cudaGraphLaunch(self, graph_exec, stream): return self._log("cudaGraphLaunch")
    def cudaGraphDestroy(self, graph): return 0
    def cudaGraphExecDestroy(self, graph_exec): return 0


def _fake_tensorrt_plan(shapes: dict[str, tuple[int, ...]]):
    """A tensorrt module whose one plan is a vae_decoder (latent -> image, float32)."""
    io = {"latent": "input", "image": "output"}
    mode = types.SimpleNamespace(INPUT="input", OUTPUT="output")

    class Context:
        def set_input_shape(self, name, shape): shapes[name] = tuple(shape); return True
        def infer_shapes(self): return []
        def get_tensor_shape(self, name):
            b, _, h, w = shapes["latent"]
            return (b, 3, 8 * h, 8 * w)
        def set_tensor_address(self, name, ptr): pass
        def execute_async_v3(self, stream): return True

    class CudaEngine:
        num_io_tensors = 2
        def get_tensor_name(self, i): return list(io)[i]
        def get_tensor_mode(self, name): return io[name]
        def get_tensor_dtype(self, name): return "float32"
        def get_tensor_profile_shape(self, name, index): return [(1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16)]
        def create_execution_context(self): return Context()

    return types.SimpleNamespace(
        __version__="10.15.1.29", TensorIOMode=mode, nptype=lambda t: np.float32,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: CudaEngine()))


def test_every_run_sets_the_device_in_its_thread_and_captures_thread_locally(tmp_path, monkeypatch):
    import threading

    _fake_trt_with_gpu(monkeypatch, "10.15.1.29", (9, 0))
    cudart = _FakeCudaRuntime()
    env_cudart = sys.modules["cuda.bindings.runtime"]
    for name in ("cudaDeviceAttr", "cudaDeviceGetAttribute", "cudaGetDeviceProperties",
                 "cudaDriverGetVersion", "cudaRuntimeGetVersion"):
        setattr(cudart, name, getattr(env_cudart, name))
    cudart.cudaGetDeviceCount = lambda: (0, 2)  # two GPUs; the engine runs on the second
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=cudart))
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_plan({}))
    monkeypatch.setattr(rt_trt, "_LOGGER", None)
    stored = dict(key(), network="vae_decoder", compute_capability="9.0", precision="fp32")
    plan_rel, key_rel = plan_paths("vae_decoder", stored)
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / plan_rel).write_bytes(b"plan")
    (tmp_path / key_rel).write_text(json.dumps(stored))
    m = manifest(backends={"tensorrt": {"networks": {"vae_decoder": {"plan": plan_rel, "key": key_rel}}}})
    engine = rt_trt.open_engine(tmp_path, m, "vae_decoder", device_id=1, cuda_graph=True)
    latent = np.zeros((1, 4, 8, 8), np.float32)
    threads, errors = [], []

    def call():
        try:
            engine.run({"latent": latent})
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    for _ in range(3):  # three calls at one shape, each from its own thread
        t = threading.Thread(target=call)
        t.start()
        t.join()
        threads.append(t.ident)
    assert errors == []
    set_device = [v for name, v in cudart.calls if name == "cudaSetDevice"]
    assert [v[1] for v in set_device[1:]] == threads and {v[0] for v in set_device} == {1}
    assert [v for name, v in cudart.calls if name == "cudaStreamBeginCapture"] == ["thread-local"]
    assert [name for name, _ in cudart.calls].count("cudaGraphLaunch") == 2  # captured on call 2, replayed on 3
    engine.close()
