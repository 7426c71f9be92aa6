"""The backend registry and the ONNX Runtime / PyTorch engines: selection, clear errors for bad
folders, files and feeds, and the session metadata check."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from runtime.engines import BACKENDS, BackendError, EngineLoadError, available_backends, backend_module, open_engines
from runtime.engines.base import EngineInputError
from runtime.engines.onnxruntime import OrtEngine, open_engine
from runtime.folder.manifest import Manifest, ManifestError, load_manifest, write_manifest
from runtime.folder.networks import network_io


@pytest.fixture
def engine_copy(tiny_sd1_engine, tmp_path):
    """A private copy of the tiny engine folder, for tests that damage it."""
    return shutil.copytree(tiny_sd1_engine, tmp_path / "engine")


def _unet_feeds(batch=2, size=16, dtype=np.float32):
    return {"sample": np.zeros((batch, 4, size, size), dtype), "timestep": np.full((batch,), 500, dtype),
            "encoder_hidden_states": np.zeros((batch, 77, 32), dtype)}


def test_available_backends_reports_reasons():
    available = available_backends()
    assert tuple(available) == BACKENDS
    assert available["onnxruntime"] is None and available["torch"] is None
    assert all(why is None or isinstance(why, str) and why for why in available.values())


def test_default_backend_skips_tensorrt_without_plans(tiny_sd1_engine):
    name, engines = open_engines(tiny_sd1_engine)
    assert name in BACKENDS and name != "tensorrt"
    assert set(engines) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    out = engines["unet"].run(_unet_feeds())
    assert out["noise_pred"].shape == (2, 4, 16, 16) and out["noise_pred"].dtype == np.float32


def test_unknown_and_unusable_backends(tiny_sd1_engine):
    with pytest.raises(BackendError, match=r"unknown backend 'cuda'; expected one of tensorrt, openvino, "
                                           r"onnxruntime, torch \(available here: .*onnxruntime"):
        open_engines(tiny_sd1_engine, backend="cuda")
    with pytest.raises(BackendError, match=r"backend 'tensorrt' cannot run .*Usable here: .*onnxruntime"):
        open_engines(tiny_sd1_engine, backend="tensorrt")


def test_options_of_another_backend_are_refused_before_opening(tiny_sd1_engine):

    # picked automatically: the message says so and lists what the picked backend takes
    picked, _ = open_engines(tiny_sd1_engine)
    taken = backend_module(picked).OPTIONS
    with pytest.raises(BackendError, match=rf"backend '{picked}' \(picked as the first usable of tensorrt, "
                                           rf"openvino, onnxruntime, torch\) does not take the option\(s\) "
                                           rf"bogus_option; it takes {', '.join(taken)}\. Pass backend="):
        open_engines(tiny_sd1_engine, bogus_option=1)
    # named: ONNX Runtime's providers are not the torch engine's
    with pytest.raises(BackendError, match=r"backend 'torch' \(requested\) does not take the option\(s\) "
                                           r"providers; it takes device, threads"):
        open_engines(tiny_sd1_engine, backend="torch", providers=["CPUExecutionProvider"])
    # every backend declares its options, and the ones it declares are accepted
    for backend in BACKENDS:
        module = backend_module(backend)
        assert module.OPTIONS and all(isinstance(o, str) for o in module.OPTIONS)
    name, engines = open_engines(tiny_sd1_engine, backend="onnxruntime", threads=1, optimization_level="basic")
    assert name == "onnxruntime" and set(engines) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_corrupt_onnx_file_names_the_file(engine_copy):
    (engine_copy / "unet.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    manifest = load_manifest(engine_copy)
    with pytest.raises(EngineLoadError, match=r"unet: cannot load ONNX file .*unet\.onnx: it is corrupt"):
        open_engine(engine_copy, manifest, "unet")


def test_unknown_manifest_version(engine_copy):
    path = engine_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"unknown format_version 99; this runtime reads version 1"):
        open_engines(engine_copy, backend="onnxruntime")


def test_missing_network_file(engine_copy):
    manifest = load_manifest(engine_copy)
    (engine_copy / "vae_decoder.onnx").unlink()
    with pytest.raises(ManifestError, match=r"network 'vae_decoder' names file 'vae_decoder.onnx', which is missing"):
        open_engines(engine_copy, backend="onnxruntime")
    # with a manifest read before the file went: the folder check refuses it the same way (issue 18)
    with pytest.raises(ManifestError, match=r"network 'vae_decoder' names file 'vae_decoder.onnx', which is missing"):
        open_engines(engine_copy, manifest, backend="onnxruntime")


def test_wrong_shape_and_dtype_inputs(tiny_sd1_engine):
    _, engines = open_engines(tiny_sd1_engine, backend="onnxruntime")
    unet = engines["unet"]
    # a float feed of another precision is cast (run() casts, callers do not); other kinds are refused
    cast = unet.run({**_unet_feeds(), "sample": np.ones((2, 4, 16, 16), np.float16)})["noise_pred"]
    exact = unet.run({**_unet_feeds(), "sample": np.ones((2, 4, 16, 16), np.float32)})["noise_pred"]
    assert cast.dtype == np.float32 and np.array_equal(cast, exact)
    with pytest.raises(EngineInputError, match=r"input 'sample' has dtype int32, expected float32 "
                                               r"\(any floating-point dtype is cast to it\)"):
        unet.run({**_unet_feeds(), "sample": np.zeros((2, 4, 16, 16), np.int32)})
    with pytest.raises(EngineInputError, match=r"input 'sample' has shape \(2, 3, 16, 16\), expected "
                                               r"\[batch, 4, latent_height, latent_width\]"):
        unet.run({**_unet_feeds(), "sample": np.zeros((2, 3, 16, 16), np.float32)})
    with pytest.raises(EngineInputError, match=r"axis 'batch' is 2 in one input and 1 in 'timestep'"):
        unet.run({**_unet_feeds(), "timestep": np.zeros((1,), np.float32)})
    ids64 = engines["text_encoder"].run({"input_ids": np.zeros((1, 77), np.int64)})["last_hidden_state"]
    ids32 = engines["text_encoder"].run({"input_ids": np.zeros((1, 77), np.int32)})["last_hidden_state"]
    assert np.array_equal(ids64, ids32)
    with pytest.raises(EngineInputError, match=r"input 'input_ids' holds values outside int32"):
        engines["text_encoder"].run({"input_ids": np.full((1, 77), 2**40, np.int64)})
    with pytest.raises(EngineInputError, match=r"input_ids.*dtype float32, expected int32"):
        engines["text_encoder"].run({"input_ids": np.zeros((1, 77), np.float32)})


def test_graph_not_matching_contract(tiny_sd1_engine):
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims)
    with pytest.raises(EngineLoadError, match=r"does not match the network contract .*inputs are \['latent'\], "
                                              r"expected \['encoder_hidden_states', 'sample', 'timestep'\]"):
        OrtEngine(tiny_sd1_engine / "vae_decoder.onnx", "unet", inputs, outputs)
    inputs16, outputs16 = network_io("unet", manifest.dims, "fp16")
    with pytest.raises(EngineLoadError, match=r"input 'sample' has type float32, expected float16"):
        OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs16, outputs16)


def test_unavailable_provider(tiny_sd1_engine):
    with pytest.raises(EngineLoadError, match=r"execution provider 'NoSuchExecutionProvider' is not available .*"
                                              r"installed: .*CPUExecutionProvider"):
        open_engines(tiny_sd1_engine, backend="onnxruntime", providers=["NoSuchExecutionProvider"])


def test_optimized_model_cache(tiny_sd1_engine, tmp_path):
    manifest = load_manifest(tiny_sd1_engine)
    first = open_engine(tiny_sd1_engine, manifest, "unet", providers=["cpu"], cache_dir=tmp_path)
    cached = list(tmp_path.glob("unet-*.onnx"))
    assert len(cached) == 1
    second = open_engine(tiny_sd1_engine, manifest, "unet", providers=["cpu"], cache_dir=tmp_path)
    feeds = _unet_feeds()
    feeds["sample"] = np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(first.run(feeds)["noise_pred"], second.run(feeds)["noise_pred"], rtol=1e-5, atol=1e-6)


def test_manifest_round_trip_is_readable_by_others(tiny_sd1_engine, tmp_path):
    manifest = load_manifest(tiny_sd1_engine)
    old_umask = os.umask(0o022)
    try:
        path = write_manifest(tmp_path, manifest)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert Manifest.from_dict(json.loads(path.read_text())) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind
