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
from runtime.compare import rel_err  # noqa: E402
from runtime.engines import openvino as ov_engine  # noqa: E402
from runtime.engines.base import EngineInputError  # noqa: E402
from runtime.errors import BackendError, EngineLoadError  # noqa: E402
from runtime.folder.manifest import load_manifest  # noqa: E402
from runtime.folder.networks import NETWORKS, network_io  # noqa: E402

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
    from export.loading.read import random_model
    from export.onnx_export import Shape, export_network
    from export.text_encoder import write_tokenizer_files
    from runtime.folder.manifest import Manifest, write_manifest

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
            err = rel_err(got[name], value)
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
        assert rel_err(out, _ort_run(engine_dir, manifest, "unet", feeds)["noise_pred"]) <= F32_TOL


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
    assert rel_err(got, _ort_run(folder, manifest, "text_encoder", feeds)["last_hidden_state"]) <= F32_TOL


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


# --- layout-free GroupNorm (runtime/engines/ov_group_norm.py) ----------------------------------------

def _compiled_output(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request().infer(feeds)[compiled.outputs[0]].copy()


def test_group_norm_rewrite_on_the_exported_decoder(engine_dir):
    import openvino as ov
    import torch

    from export.configs import preset
    from export.vae import AutoencoderKL
    from runtime.engines.ov_group_norm import layout_free_group_norms

    manifest = load_manifest(engine_dir)
    feeds = network_feeds("vae_decoder", manifest.dims, 2, RESOLUTION, seed=4)
    path = str(engine_dir / manifest.networks["vae_decoder"]["file"])
    want = _compiled_output(ov.Core().read_model(path), feeds)
    for static in (True, False):
        model = ov.Core().read_model(path)
        if static:
            model.reshape({k: list(v.shape) for k, v in feeds.items()})
        rewritten = layout_free_group_norms(model)
        # every GroupNorm of the decoder (resnets, mid-block attention, conv_norm_out)
        groupnorms = sum(isinstance(m, torch.nn.GroupNorm) for m in AutoencoderKL(preset("tiny-sd1").vae).decoder.modules())
        assert rewritten == groupnorms > 0
        assert not [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]
        got = _compiled_output(model, feeds)
        assert rel_err(got, want) <= 1e-5, (static, rel_err(got, want))
        assert layout_free_group_norms(model) == 0  # nothing left to rewrite


def _group_norm_graph(scale: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                      extra_output: bool = False):
    """x [1, C, 5, 6] -> GroupNorm written as the exporter writes it, with the InstanceNormalization's
    per-group scale and bias set to `scale` / `bias` (the exporter writes ones and zeros)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = gamma.size
    nodes = [
        helper.make_node("Reshape", ["x", "grouped_shape"], ["grouped"]),
        helper.make_node("InstanceNormalization", ["grouped", "scale", "bias"], ["normed"], epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Reshape", ["normed", "x_shape"], ["back"]),
        helper.make_node("Mul", ["back", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, groups, -1], np.int64), "grouped_shape"),
             numpy_helper.from_array(scale.astype(np.float32), "scale"),
             numpy_helper.from_array(bias.astype(np.float32), "bias"),
             numpy_helper.from_array(gamma.reshape(c, 1, 1).astype(np.float32), "gamma"),
             numpy_helper.from_array(beta.reshape(c, 1, 1).astype(np.float32), "beta")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 5, 6])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("normed", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 5, 6])],
                              outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _read_onnx(model_proto, tmp_path: Path):
    import onnx
    import openvino as ov

    path = tmp_path / "gn.onnx"
    onnx.save(model_proto, str(path))
    return ov.Core().read_model(str(path))


def test_group_norm_rewrite_folds_per_group_scale_and_keeps_variants_it_does_not_know(tmp_path):
    from runtime.engines.ov_group_norm import layout_free_group_norms

    rng = np.random.default_rng(0)
    c, groups = 12, 3
    x = (rng.standard_normal((1, c, 5, 6)) * 4 + 7).astype(np.float32)  # mean far from zero
    args = (rng.uniform(0.5, 2, groups), rng.standard_normal(groups), rng.standard_normal(c), rng.standard_normal(c))
    proto = _group_norm_graph(*args, groups)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # numpy reference of the same GroupNorm (biased variance, eps inside the root)
    g = x.astype(np.float64).reshape(1, groups, -1)
    n = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5))
    n = n * args[0][None, :, None] + args[1][None, :, None]
    ref = n.reshape(x.shape) * args[2][None, :, None, None] + args[3][None, :, None, None]
    assert rel_err(want, ref) < 1e-5
    model = _read_onnx(proto, tmp_path)
    assert layout_free_group_norms(model) == 1
    assert rel_err(_compiled_output(model, {"x": x}), ref) < 1e-5
    # the normalized tensor used elsewhere too: not the exporter's GroupNorm, left alone
    model = _read_onnx(_group_norm_graph(*args, groups, extra_output=True), tmp_path)
    assert layout_free_group_norms(model) == 0
    assert any(op.get_type_name() == "MVN" for op in model.get_ordered_ops())
