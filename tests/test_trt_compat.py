"""Offline TensorRT compatibility check (export/trt_compat.py): the project's exported graphs pass
it, graphs with an unsupported operator, type or attribute fail it naming the operator and node.
Runs without TensorRT. The full-size graphs are checked under SDRT_FULL=1."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.trt_compat import NORMALIZATION_OPS, Problem, check_graph, main, precision_summary, support_matrix

torch = pytest.importorskip("torch")

torch.set_num_threads(1)  # the CI machine's cores are shared

NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
FULL = os.environ.get("SDRT_FULL") == "1"
REPO = Path(__file__).resolve().parents[1]


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def export_graphs(preset: str, out: Path, precision: str, networks=NETWORKS,
                  image: int | None = None) -> dict[str, Path]:
    """The project's ONNX export (export/onnx_export.py) of a random-weight preset."""
    from export.loading.read import random_model
    from export.onnx_export import Shape, export_network

    model = random_model(preset)
    size = image or model.spec.unet.sample_size * model.spec.vae_scale_factor
    paths = {}
    for network in networks:
        result = export_network(network, model, out, precision=precision, parity_shapes=[Shape(1, size, size)],
                                threads=1)
        paths[network] = out / result.file
    return paths


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    graphs = {}
    for preset, precision, networks in (("tiny-sd1", "fp32", NETWORKS), ("tiny-sd1", "fp16", NETWORKS),
                                        ("tiny-sd2", "fp32", ("text_encoder", "unet")),
                                        ("tiny-sd2", "fp16", ("unet",)),
                                        ("tiny-inpaint", "fp32", ("unet",))):
        out = tmp_path_factory.mktemp(f"{preset}-{precision}")
        for network, path in export_graphs(preset, out, precision, networks).items():
            graphs[(preset, precision, network)] = path
    return graphs


def test_support_matrix_is_tensorrt_10_with_its_source():
    m = support_matrix()
    assert m.tensorrt_version.startswith("10.")
    assert m.opset_min <= 17 <= m.opset_max  # the project exports opset 17
    assert "operators.md" in m.source["document"]
    for op in ("Conv", "MatMul", "Softmax", "LayerNormalization", "InstanceNormalization", "Resize", "Gather"):
        assert op in m.supported
    assert "Unique" in m.unsupported and "Unique" not in m.supported


def test_tiny_graphs_pass(tiny_graphs):
    for (preset, precision, network), path in tiny_graphs.items():
        problems = check_graph(path)
        assert not errors(problems), f"{preset} {precision} {network}: " + "\n".join(map(str, problems))
        assert not problems, f"{preset} {precision} {network} warnings: " + "\n".join(map(str, problems))


def test_cli_passes_on_tiny_graphs(tiny_graphs, capsys):
    paths = [str(p) for p in tiny_graphs.values()]
    assert main(paths) == 0
    out = capsys.readouterr().out
    assert out.count("ok for TensorRT") == len(paths)


def test_external_data_is_not_read(tiny_graphs, tmp_path):
    """Full-size fp32 U-Nets keep their weights in unet.onnx.data; the check reads only the graph."""
    model = onnx.load(str(tiny_graphs[("tiny-sd1", "fp32", "unet")]))
    path = tmp_path / "unet.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.onnx.data", size_threshold=0)
    assert (tmp_path / "unet.onnx.data").stat().st_size > path.stat().st_size
    (tmp_path / "unet.onnx.data").unlink()  # would fail loudly if the check tried to read it
    assert check_graph(path) == []


# --- graphs that must fail -------------------------------------------------------------------------

def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    return model


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def unique_model() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
         helper.make_node("Unique", ["r"], ["y"], name="dedupe", sorted=1)],
        [_vi("x")], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def test_unsupported_operator_is_named():
    problems = errors(check_graph(unique_model()))
    assert len(problems) == 1
    p = problems[0]
    assert (p.op_type, p.node) == ("Unique", "dedupe")
    assert "Unique" in str(p) and "dedupe" in str(p) and "unsupported" in p.message


def test_operator_missing_from_the_matrix_is_an_error():
    model = _model([helper.make_node("FrobnicateX", ["x"], ["y"], name="frob")], [_vi("x")], [_vi("y")])
    (p,) = errors(check_graph(model))
    assert (p.op_type, p.node) == ("FrobnicateX", "frob") and "not in the support matrix" in p.message


def test_cli_fails_naming_the_operator(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    onnx.save(unique_model(), str(path))
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "operators: Unique" in out and "'dedupe'" in out


def test_cli_as_module_exits_nonzero(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(unique_model(), str(path))
    proc = subprocess.run([sys.executable, "-m", "export.trt_compat", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Unique" in proc.stdout


def test_custom_domain_operator_is_an_error():
    model = _model([helper.make_node("FusedGelu", ["x"], ["y"], name="fg", domain="com.example")],
                   [_vi("x")], [_vi("y")], extra_opsets=[helper.make_opsetid("com.example", 1)])
    (p,) = errors(check_graph(model))
    assert p.op_type == "FusedGelu" and "com.example" in p.message and "plugin" in p.message


def test_opset_outside_documented_range():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x")], [_vi("y")], opset=8)
    (p,) = errors(check_graph(model))
    assert "opset 8" in p.message and "9..24" in p.message
    assert not errors(check_graph(model, opset=17))  # the override


def test_unsupported_data_type_is_an_error_and_double_a_warning():
    model = _model([helper.make_node("Cast", ["x"], ["u"], name="to_u16", to=TensorProto.UINT16),
                    helper.make_node("Cast", ["u"], ["y"], name="to_f32", to=TensorProto.FLOAT)],
                   [_vi("x")], [_vi("y")])
    (p,) = errors(check_graph(model))
    assert p.node == "u" and "UINT16" in p.message
    model = _model([helper.make_node("Add", ["x", "x"], ["y"], name="add64")],
                   [_vi("x", TensorProto.DOUBLE)], [_vi("y", TensorProto.DOUBLE)])
    problems = check_graph(model)
    assert not errors(problems)
    assert any(p.severity == "warning" and "DOUBLE" in p.message for p in problems)


def test_operator_type_outside_its_matrix_row_is_a_warning():
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="imatmul")],
                   [_vi("a", TensorProto.INT32, (2, 2)), _vi("b", TensorProto.INT32, (2, 2))],
                   [_vi("y", TensorProto.INT32, (2, 2))])
    (p,) = check_graph(model)
    assert p.severity == "warning" and p.op_type == "MatMul" and "INT32" in p.message


def test_resize_cubic_is_an_error():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")],
                   [_vi("x", shape=(1, 1, 4, 4))], [_vi("y", shape=(1, 1, 8, 8))], [scales])
    (p,) = errors(check_graph(model))
    assert p.op_type == "Resize" and "mode='cubic'" in p.message


def test_reduce_axes_must_be_constant():
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)],
                   [_vi("x"), _vi("axes", TensorProto.INT64, (1,))], [_vi("y", shape=(2, 1))], opset=18)
    (p,) = errors(check_graph(model))
    assert p.op_type == "ReduceMean" and "axes" in p.message and "constant" in p.message
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)],
                   [_vi("x")], [_vi("y", shape=(2, 1))], [axes], opset=18)
    assert not errors(check_graph(model))


def test_layernorm_extra_outputs_are_an_error():
    scale = numpy_helper.from_array(np.ones(3, np.float32), "scale")
    model = _model([helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], name="ln")],
                   [_vi("x")], [_vi("y"), helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)], [scale])
    (p,) = errors(check_graph(model))
    assert p.op_type == "LayerNormalization" and "mean" in p.message


def test_unsupported_operator_inside_a_subgraph_is_found():
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    branch = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)
    model = _model([branch], [_vi("c", TensorProto.BOOL, ()), _vi("x")],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    (p,) = errors(check_graph(model))
    assert (p.op_type, p.node) == ("Unique", "inner_unique")


# --- strongly typed fp16 graphs (issue 16) ------------------------------------------------------------

def test_fp16_graphs_keep_their_normalizations_in_fp32(tiny_graphs):
    """The project's fp16 export (export/fp16.py) writes graphs a strongly typed TensorRT network can
    run as written: every GroupNorm (InstanceNormalization) and LayerNorm computes in float32."""
    fp16 = {k: v for k, v in tiny_graphs.items() if k[1] == "fp16"}
    assert len(fp16) == 5
    for (preset, _, network), path in fp16.items():
        summary = precision_summary(path)
        norms = {op: counts for op, counts in summary.items() if op in NORMALIZATION_OPS}
        assert norms and all(set(counts) == {"FLOAT"} for counts in norms.values()), (preset, network, summary)
        assert not errors(check_graph(path)), (preset, network)
    # SD 2.x upcasts its attention (QK^T and softmax in float32); SD 1.x keeps it fp16, as diffusers does
    assert precision_summary(tiny_graphs[("tiny-sd2", "fp16", "unet")])["Softmax"] == {"FLOAT": 8}
    assert precision_summary(tiny_graphs[("tiny-sd1", "fp16", "unet")])["Softmax"] == {"FLOAT16": 8}
    assert not errors(check_graph(tiny_graphs[("tiny-sd2", "fp16", "unet")], require_fp32=("Softmax",)))
    sd1 = errors(check_graph(tiny_graphs[("tiny-sd1", "fp16", "unet")], require_fp32=("Softmax",)))
    assert len(sd1) == 8 and {p.op_type for p in sd1} == {"Softmax"}


def _export_tiny_norm_block(path, fp32_norms: bool) -> None:
    """Conv -> GroupNorm -> SiLU -> LayerNorm in float16, exported as the project exports (opset 17)."""
    from export.fp16 import reduced_precision

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn, self.ln = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), \
                torch.nn.LayerNorm(6)

        def forward(self, x):
            return self.ln(torch.nn.functional.silu(self.gn(self.conv(x))))

    block = Block().eval()
    block = reduced_precision(block, torch.float16) if fp32_norms else block.half()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(block, (torch.zeros(1, 4, 6, 6, dtype=torch.float16),), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False)


def test_weakly_typed_fp16_normalizations_fail_the_check(tmp_path, capsys):
    """A plain `.half()` export (the recipe before issue 16) leaves the normalizations in float16."""
    plain, mixed = tmp_path / "plain.onnx", tmp_path / "mixed.onnx"
    _export_tiny_norm_block(plain, fp32_norms=False)
    _export_tiny_norm_block(mixed, fp32_norms=True)
    bad = errors(check_graph(plain))
    assert {p.op_type for p in bad} == {"InstanceNormalization", "LayerNormalization"}
    assert all("computes in FLOAT16 inside an fp16 graph" in p.message for p in bad)
    assert precision_summary(mixed) == {"InstanceNormalization": {"FLOAT": 1}, "LayerNormalization": {"FLOAT": 1}}
    assert check_graph(mixed) == []
    assert main([str(plain)]) == 1 and "operators: InstanceNormalization, LayerNormalization" in capsys.readouterr().out


# --- full size (opt-in) ------------------------------------------------------------------------------

@pytest.mark.full
@pytest.mark.skipif(not FULL, reason="full-size SD 1.5 export (minutes, ~12 GB RAM); set SDRT_FULL=1")
def test_full_size_sd15_graphs_pass(tmp_path):
    # 64 x 64 pixels keeps the parity run of the export cheap; the graphs have dynamic axes anyway.
    paths = export_graphs("sd15", tmp_path, "fp16", image=64)
    for network, path in paths.items():
        problems = check_graph(path)
        assert not problems, f"sd15 fp16 {network}: " + "\n".join(map(str, problems))
