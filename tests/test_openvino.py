"""OpenVINO engine against ONNX Runtime on a tiny engine folder, network by network.

Tolerances (relative: max|ov - ort| / max|ort|):
  f32   1e-4, the same bound the export holds ONNX Runtime to against PyTorch (export/onnx_export.py);
        both run the same fp32 graph, so only kernel accumulation order differs (measured ~1e-6).
  bf16  5e-2. bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3); OpenVINO rounds weights
        and activations to bf16 at every matmul/convolution and accumulates in fp32, so the error of
        a deep network is a few times the unit roundoff: measured here up to ~1e-2 on the tiny
        networks and 2.6e-2 on the full-size SD 1.5 U-Net (docs/benchmarks.md). The bound leaves 2x
        headroom over the worst full-size figure; a wrong graph or a wrong output mapping gives O(1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
ort = pytest.importorskip("onnxruntime")

from benchmarks.worker import network_feeds  # noqa: E402
from runtime.engines import openvino as ov_engine  # noqa: E402
from runtime.engines.base import EngineInputError  # noqa: E402
from runtime.errors import BackendError, EngineLoadError  # noqa: E402
from runtime.manifest import load_manifest  # noqa: E402
from runtime.networks import NETWORKS, network_io  # noqa: E402

F32_TOL = 1e-4
BF16_TOL = 5e-2
RESOLUTION = 64

ok, why = ov_engine.is_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)
HAS_BF16 = ok and "BF16" in ov_engine.cpu_capabilities()


@pytest.fixture(scope="module")
def engine_dir(request, tmp_path_factory) -> Path:
    """A tiny-sd1 engine folder: the shared conftest fixture when there is one, else built here."""
    try:
        return Path(request.getfixturevalue("tiny_sd1_engine"))
    except pytest.FixtureLookupError:
        pass
    out = tmp_path_factory.mktemp("tiny-sd1") / "engine"
    try:
        from export.build import build_engine
    except ImportError:
        return _export_engine_folder("tiny-sd1", out)
    build_engine("tiny-sd1", out)
    return out


def _export_engine_folder(preset_name: str, out: Path) -> Path:
    """A minimal engine folder from the export functions (used only where export/build.py is absent)."""
    from export.loading import random_model
    from export.onnx_export import Shape, export_network
    from export.text_encoder import write_tokenizer_files
    from runtime.manifest import Manifest, write_manifest

    model = random_model(preset_name)
    spec = model.spec
    out.mkdir(parents=True)
    networks = {}
    for network in NETWORKS:
        r = export_network(network, model, out, parity_shapes=[Shape(1, RESOLUTION, RESOLUTION)])
        networks[network] = {"file": r.file, "external_data": r.external_data, "precision": "fp32", "parity": r.parity}
    write_tokenizer_files(out / "tokenizer", spec.pad_token)
    write_manifest(out, Manifest(
        family=spec.family, dims=spec.dims, scaling_factor=spec.vae.scaling_factor,
        prediction_type=spec.prediction_type, scheduler=spec.scheduler,
        tokenizer={"dir": "tokenizer", "pad_token": spec.pad_token}, default_size=(RESOLUTION, RESOLUTION),
        shapes={"min_batch": 1, "opt_batch": 1, "max_batch": 4, "min_image": 32, "opt_image": RESOLUTION,
                "max_image": 256},
        precision="fp32", networks=networks))
    return out


def _ort_run(engine_dir: Path, manifest, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(engine_dir / manifest.networks[network]["file"]),
                                   providers=["CPUExecutionProvider"])
    _, outputs = network_io(network, manifest.dims, manifest.precision)
    names = [t.name for t in outputs]
    return dict(zip(names, session.run(names, feeds)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-12))


@pytest.mark.parametrize("precision,tol", [("f32", F32_TOL), pytest.param(
    "bf16", BF16_TOL, marks=pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 hardware"))])
@pytest.mark.parametrize("network", NETWORKS)
def test_matches_onnxruntime(engine_dir, network, precision, tol, tmp_path):
    manifest = load_manifest(engine_dir)
    engine = ov_engine.open_engine(engine_dir, manifest, network, inference_precision=precision, cache_dir=tmp_path)
    assert engine.inference_precision == precision
    for batch in (1, 2):
        feeds = network_feeds(network, manifest.dims, batch, RESOLUTION, seed=batch)
        got = engine.run(feeds)
        want = _ort_run(engine_dir, manifest, network, feeds)
        assert set(got) == {t.name for t in engine.outputs}
        for name, value in want.items():
            assert got[name].shape == value.shape and got[name].dtype == value.dtype
            err = _rel(got[name], value)
            assert err <= tol, f"{network}/{name} at batch {batch}, {precision}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("static_shapes", [True, False])
def test_shapes_change_between_calls(engine_dir, static_shapes, tmp_path):
    manifest = load_manifest(engine_dir)
    engine = ov_engine.open_engine(engine_dir, manifest, "unet", inference_precision="f32",
                                   static_shapes=static_shapes, cache_dir=tmp_path)
    for batch, res in ((2, RESOLUTION), (1, RESOLUTION + 16), (2, RESOLUTION)):
        feeds = network_feeds("unet", manifest.dims, batch, res)
        out = engine.run(feeds)["noise_pred"]
        assert out.shape == feeds["sample"].shape[:1] + (manifest.dims.latent_channels,) + feeds["sample"].shape[2:]
        assert _rel(out, _ort_run(engine_dir, manifest, "unet", feeds)["noise_pred"]) <= F32_TOL


def test_model_cache_is_written_and_reused(engine_dir, tmp_path):
    manifest = load_manifest(engine_dir)
    feeds = network_feeds("vae_decoder", manifest.dims, 1, RESOLUTION)
    first = ov_engine.open_engine(engine_dir, manifest, "vae_decoder", inference_precision="f32", cache_dir=tmp_path)
    a = first.run(feeds)["image"]
    assert any(tmp_path.iterdir()), "OpenVINO wrote nothing to its cache dir"
    second = ov_engine.open_engine(engine_dir, manifest, "vae_decoder", inference_precision="f32", cache_dir=tmp_path)
    np.testing.assert_array_equal(second.run(feeds)["image"], a)


def test_default_cache_dir_is_inside_the_engine_folder(engine_dir):
    manifest = load_manifest(engine_dir)
    engine = ov_engine.open_engine(engine_dir, manifest, "text_encoder")
    engine.run(network_feeds("text_encoder", manifest.dims, 1, RESOLUTION))
    assert (engine_dir / ov_engine.CACHE_SUBDIR).is_dir()


def test_unwritable_cache_dir_falls_back_to_no_cache(engine_dir, tmp_path):
    """A folder whose cache cannot be created (here a file sits where the cache folder goes; as
    root, permissions alone would not stop the write) still runs, without a cache, with a warning."""
    folder = shutil.copytree(engine_dir, tmp_path / "engine", ignore=shutil.ignore_patterns(ov_engine.CACHE_SUBDIR))
    (folder / ov_engine.CACHE_SUBDIR).write_text("not a folder")
    manifest = load_manifest(folder)
    with pytest.warns(RuntimeWarning, match="cannot use the compile cache"):
        engine = ov_engine.open_engine(folder, manifest, "text_encoder", inference_precision="f32")
    assert engine.cache_dir is None
    feeds = network_feeds("text_encoder", manifest.dims, 1, RESOLUTION)
    got = engine.run(feeds)["last_hidden_state"]
    assert _rel(got, _ort_run(folder, manifest, "text_encoder", feeds)["last_hidden_state"]) <= F32_TOL


def test_default_precision_follows_the_cpu():
    assert ov_engine.default_precision(("BF16", "FP32")) == "bf16"
    assert ov_engine.default_precision(("FP32", "INT8")) == "f32"
    assert ov_engine.resolve_precision("fp32", ("FP32",)) == "f32"
    with pytest.raises(ValueError, match="not supported by this CPU"):
        ov_engine.resolve_precision("bf16", ("FP32", "INT8"))
    with pytest.raises(ValueError, match="unknown inference_precision"):
        ov_engine.resolve_precision("int4", ("FP32",))


def test_input_validation(engine_dir, tmp_path):
    manifest = load_manifest(engine_dir)
    engine = ov_engine.open_engine(engine_dir, manifest, "unet", inference_precision="f32", cache_dir=tmp_path)
    feeds = network_feeds("unet", manifest.dims, 2, RESOLUTION)
    with pytest.raises(EngineInputError, match="missing"):
        engine.run({k: v for k, v in feeds.items() if k != "timestep"})
    # float64 is cast to the declared float32 (the same result); a bool array is refused
    np.testing.assert_array_equal(engine.run({**feeds, "sample": feeds["sample"].astype(np.float64)})["noise_pred"],
                                  engine.run(feeds)["noise_pred"])
    with pytest.raises(EngineInputError, match="dtype bool, expected float32"):
        engine.run({**feeds, "sample": feeds["sample"] > 0})
    with pytest.raises(EngineInputError, match="expected"):
        engine.run({**feeds, "sample": feeds["sample"][:, :1]})  # wrong channel count
    with pytest.raises(EngineInputError, match="axis 'batch'"):
        engine.run({**feeds, "timestep": feeds["timestep"][:1]})


def test_bad_options(engine_dir):
    manifest = load_manifest(engine_dir)
    with pytest.raises(BackendError, match="unknown options providers; it takes inference_precision"):
        ov_engine.open_engine(engine_dir, manifest, "unet", providers=["CPU"])
    with pytest.raises(ValueError, match="unknown inference_precision"):
        ov_engine.open_engine(engine_dir, manifest, "unet", inference_precision="fp8")
    with pytest.raises(EngineLoadError, match="no network"):
        ov_engine.open_engine(engine_dir, manifest, "refiner")
