"""ONNX export: parity of every network with the PyTorch reference (fp32 and fp16), dynamic axes,
external data, and no files left behind by a failed export."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from export.build import build_engine
from export.loading.read import random_model
from export.onnx_export import (
    VAE_PARITY_THRESHOLDS,
    PARITY_THRESHOLDS,
    ParityError,
    Shape,
    default_parity_shapes,
    export_network,
    sample_inputs,
    size_multiple,
)
from runtime.compare import rel_err
from runtime.engines import open_engines
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import NETWORKS, network_io


@pytest.fixture(scope="module")
def tiny_sd1():
    return random_model("tiny-sd1", seed=0)


def test_manifest_records_parity_at_two_shapes(tiny_sd1_engine):
    manifest = load_manifest(tiny_sd1_engine)
    for name in NETWORKS:
        parity = manifest.networks[name]["parity"]
        bound = VAE_PARITY_THRESHOLDS.get((name, "fp32"), PARITY_THRESHOLDS["fp32"])  # 5e-4: the VAE graphs
        assert parity["rel"] <= bound == parity["threshold"], name
        shapes = [c["shape"] for c in parity["cases"]]
        assert shapes[0] == [1, 64, 64] and shapes[1][:3] == [2, 64, 66]  # batch 2, non-square
        assert shapes[1][3] == 154  # two prompt chunks of text for the U-Net
    # 66 px: a multiple of the VAE factor (2) but not of the U-Net's size multiple (4), so its 33-wide
    # latent takes the upsamplers' crop path (the odd-sized skips)
    spec = random_model("tiny-sd1", seed=0).spec
    assert 66 % spec.vae_scale_factor == 0 and 66 % size_multiple(spec) != 0


def test_parity_inputs_have_fractional_timesteps(tiny_sd1):
    feeds = sample_inputs("unet", tiny_sd1.spec.dims, Shape(4, 64, 64), vocab_size=49408,
                          rng=np.random.default_rng(1))
    t = feeds["timestep"].astype(np.float64)
    assert feeds["timestep"].dtype == np.float32 and np.all(t != np.round(t)) and np.all((t > 0) & (t < 1000))


@pytest.mark.parametrize("shape", [Shape(2, 48, 80), Shape(3, 64, 40, 231)])
def test_onnxruntime_matches_torch_fp32(tiny_sd1_engine, shape):
    """Each network through open_engines at shapes other than the build's parity shapes."""
    _, ort = open_engines(tiny_sd1_engine, backend="onnxruntime", threads=2)
    _, pt = open_engines(tiny_sd1_engine, backend="torch")
    manifest = load_manifest(tiny_sd1_engine)
    rng = np.random.default_rng(7)
    for name in NETWORKS:
        feeds = sample_inputs(name, manifest.dims, shape, vocab_size=49408, rng=rng)
        got, want = ort[name].run(feeds), pt[name].run(feeds)
        for key in want:
            assert got[key].shape == want[key].shape
            assert rel_err(got[key], want[key]) <= 1e-4, (name, key)


def test_fp16_graphs_within_1e_2(tiny_sd1, tmp_path):
    shapes = default_parity_shapes(tiny_sd1.spec, 32, 32, 64, 2)
    for name in NETWORKS:
        result = export_network(name, tiny_sd1, tmp_path, precision="fp16", parity_shapes=shapes)
        assert result.parity["rel"] <= 1e-2, name
        graph = onnx.load(str(tmp_path / result.file), load_external_data=False)
        inputs, _ = network_io(name, tiny_sd1.spec.dims, "fp16")
        elem = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
        types = {"int32": onnx.TensorProto.INT32, "float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}
        for spec in inputs:
            assert elem[spec.name] == types[spec.dtype], (name, spec.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.onnx" for n in NETWORKS)
    # the timestep stays float32 in an fp16 graph: a fractional timestep is not rounded to float16's
    # grid (946.42 -> 946.5 there), so the two give different outputs, each matching PyTorch
    import onnxruntime as ort

    unet = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    feeds = sample_inputs("unet", tiny_sd1.spec.dims, Shape(1, 32, 32), vocab_size=49408, rng=np.random.default_rng(3))
    feeds = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds.items()}
    out = {t: unet.run(None, {**feeds, "timestep": np.array([t], np.float32)})[0] for t in (946.42, 946.5)}
    assert np.float16(946.42) == np.float16(946.5) and not np.array_equal(out[946.42], out[946.5])


def test_external_data_single_file(tiny_sd1, tmp_path):
    shapes = default_parity_shapes(tiny_sd1.spec, 32, 32, 64, 2)
    result = export_network("unet", tiny_sd1, tmp_path, parity_shapes=shapes, external_data=True)
    assert result.external_data == "unet.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert (tmp_path / "unet.onnx").stat().st_size * 4 < (tmp_path / "unet.onnx.data").stat().st_size
    graph = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"unet.onnx.data"}
    assert result.parity["rel"] <= 1e-4


def test_lean_export_matches_the_plain_graph(tiny_sd1, tmp_path):
    """The lean path (graph exported without weights, weights streamed to the external file) gives
    a graph with the contract's inputs only, every large weight in one aligned file, parity with
    PyTorch, and the plain graph's outputs in ONNX Runtime and OpenVINO."""
    import onnxruntime as ort
    import openvino as ov

    from export.external_data import ALIGNMENT

    shapes = default_parity_shapes(tiny_sd1.spec, 32, 32, 64, 2)
    lean_dir, plain_dir = tmp_path / "lean", tmp_path / "plain"
    lean_dir.mkdir()
    plain_dir.mkdir()
    lean = export_network("unet", tiny_sd1, lean_dir, parity_shapes=shapes, lean=True)
    export_network("unet", tiny_sd1, plain_dir, parity_shapes=shapes)
    assert lean.external_data == "unet.onnx.data" and lean.parity["rel"] <= PARITY_THRESHOLDS["fp32"]
    graph = onnx.load(str(lean_dir / "unet.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == [t.name for t in network_io("unet", tiny_sd1.spec.dims, "fp32")[0]]
    offsets = [int(e.value) for t in graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % ALIGNMENT == 0 for o in offsets)
    params = {f"unet.{n}": p.detach().numpy() for n, p in tiny_sd1.unet.named_parameters()}
    stored = onnx.load(str(lean_dir / "unet.onnx")).graph.initializer  # with the external data
    assert len(stored) > len(params) // 2
    for tensor in stored:  # each a parameter, bit for bit (the exporter merges equal-valued ones)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), params[tensor.name])
    inputs, _ = network_io("unet", tiny_sd1.spec.dims, "fp32")
    feeds = sample_inputs("unet", tiny_sd1.spec.dims, Shape(2, 48, 40), vocab_size=1000,
                          rng=np.random.default_rng(5))
    feeds = {t.name: feeds[t.name].astype(t.dtype) for t in inputs}
    want = ort.InferenceSession(str(plain_dir / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got_ort = ort.InferenceSession(str(lean_dir / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got_ov = ov.Core().compile_model(str(lean_dir / "unet.onnx"), "CPU",
                                     {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    assert rel_err(got_ort, want) < 1e-5
    assert rel_err(got_ov, want) < 1e-5


def test_parity_failure_leaves_nothing(tiny_sd1, tmp_path):
    shapes = default_parity_shapes(tiny_sd1.spec, 32, 32, 64, 2)
    with pytest.raises(ParityError, match=r"vae_encoder \(fp32\): ONNX Runtime differs from PyTorch by relative "
                                          r"error .* threshold 0"):
        export_network("vae_encoder", tiny_sd1, tmp_path, parity_shapes=shapes, threshold=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.full
def test_full_size_sd15_fp32_parity(tmp_path):
    """SD 1.5 architecture, random weights, exported and compared at 256 px. Measured: 128-322 s on
    two shared CPU cores (depending on the load), about 7 GB resident; relative errors 1.1e-6 (text encoder, U-Net), 4.4e-6
    (VAE decoder), 3.5e-6 (VAE encoder)."""
    lines: list[str] = []
    start = time.perf_counter()
    out = build_engine("sd15", tmp_path / "sd15", min_image=256, opt_image=256, max_image=512, max_batch=2,
                       progress=lines.append)
    seconds = time.perf_counter() - start
    manifest = load_manifest(out)
    report = {name: (manifest.networks[name]["parity"]["max_abs"], manifest.networks[name]["parity"]["rel"])
              for name in NETWORKS}
    print(f"\nsd15 fp32 build in {seconds:.0f} s; parity (max abs, rel): {report}\n" + "\n".join(lines))
    # every full-size network keeps its weights outside the graph, where engines map them
    assert {n: manifest.networks[n]["external_data"] for n in NETWORKS} == {n: f"{n}.onnx.data" for n in NETWORKS}
    for name, (_, rel) in report.items():
        assert rel <= 1e-4, name


@pytest.mark.full
def test_full_size_sd15_fp16_parity(tmp_path):
    """fp16 graphs of the SD 1.5 architecture against the fp32 reference at 256 px. Measured: 170-254 s
    on two shared CPU cores; relative errors 1.0e-3 (text encoder), 8.9e-4 (U-Net), 9.6e-4 (VAE
    decoder), 1.3e-3 (VAE encoder)."""
    out = build_engine("sd15", tmp_path / "sd15-fp16", precision="fp16", min_image=256, opt_image=256,
                       max_image=512, max_batch=2, progress=lambda line: None)
    manifest = load_manifest(out)
    assert manifest.networks["unet"]["external_data"] == "unet.onnx.data"  # 1.7 GB: past the 32 MiB rule
    for name in NETWORKS:
        assert manifest.networks[name]["precision"] == "fp16"
        assert manifest.networks[name]["parity"]["rel"] <= 1e-2, name
