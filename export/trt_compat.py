"""Offline TensorRT compatibility check of an ONNX graph, runnable without TensorRT or a GPU.

Every node's operator must be in the TensorRT ONNX parser's documented support matrix for the
graph's opset, every tensor's data type must be one TensorRT documents, and a few documented
restrictions that our exporters could plausibly hit are checked (Resize modes, constant reduce
axes, LayerNormalization/MaxPool extra outputs, ...).

The support matrix is `export/assets/trt_onnx_ops.json`, transcribed from onnx/onnx-tensorrt
`docs/operators.md` for TensorRT 10.15 ("TensorRT 10.15 supports operators in the inclusive range
of opset 9 to opset 24"); the file records its source. Passing this check does not prove that a
plan builds (shape-dependent limits only show up in the builder), but failing it names the
operator and node that will stop the parser.

Graphs with float16 inputs or outputs are also checked as the strongly typed networks TensorRT
builds from them (export/fp16.py): every normalization (InstanceNormalization, LayerNormalization,
GroupNormalization) must compute in float32, since a strongly typed network runs each operation in
the type the graph gives it and fp16 normalizations overflow. `require_fp32` adds operators (e.g.
Softmax for SD 2.x, whose attention must be upcast); `precision_summary` counts each operator's
float32 and float16 instances.

    python -m export.trt_compat text_encoder.onnx unet.onnx ...   # exit 1 on any error
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx
from onnx import TensorProto

SUPPORT_MATRIX = Path(__file__).parent / "assets" / "trt_onnx_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element type -> the name the support matrix uses (operators.md spells FP8 for E4M3 and FP4
# for E2M1, TensorRT's only FP8/FP4 formats).
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4",
}
# Matrix "data_types" spelling -> the short names above.
_DOC_TYPE_ALIASES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}
_QUANTIZED = {"INT8", "INT4", "FP8", "FP4"}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Operators that must compute in float32 inside an fp16 graph (see the module docstring).
NORMALIZATION_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")

# Inputs that the matrix says must be build-time constants: op -> (input index, input name). Before
# opset 13 (ReduceSum, Squeeze, Unsqueeze) or 18 (the other reductions) axes were attributes, and a
# node then simply has no such input.
_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
_CONST_INPUTS = {
    **{op: (1, "axes") for op in _REDUCE_OPS + ("Squeeze", "Unsqueeze")},
    "CumSum": (1, "axis"), "OneHot": (1, "depth"), "Dropout": (2, "training_mode"),
}
_RESIZE = {
    "mode": {"nearest", "linear"},
    "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                       "asymmetric", "align_corners"},
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
    "keep_aspect_ratio_policy": {"stretch"},
}
_RESIZE_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                    "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch"}


@dataclass(frozen=True)
class Problem:
    severity: str  # "error": the TensorRT parser or builder will reject it; "warning": may work
    op_type: str  # operator ("" for graph-level problems)
    node: str  # node name, or the tensor name for data-type problems
    message: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.op_type else repr(self.node)
        return f"{self.severity}: {where}: {self.message}"


@dataclass(frozen=True)
class SupportMatrix:
    tensorrt_version: str
    opset_min: int
    opset_max: int
    supported: dict  # op -> {"types": [...], "restrictions": "..."}
    unsupported: frozenset
    data_types: frozenset
    data_type_notes: dict
    source: dict


@lru_cache(maxsize=None)
def support_matrix(path: str | None = None) -> SupportMatrix:
    """The documented ONNX operator support of TensorRT's parser (see SUPPORT_MATRIX)."""
    d = json.loads(Path(path or SUPPORT_MATRIX).read_text())
    return SupportMatrix(
        tensorrt_version=d["tensorrt_version"], opset_min=int(d["opset_min"]), opset_max=int(d["opset_max"]),
        supported=d["supported"], unsupported=frozenset(d["unsupported"]),
        data_types=frozenset(_DOC_TYPE_ALIASES.get(t, t) for t in d["data_types"]),
        data_type_notes={_DOC_TYPE_ALIASES.get(k, k): v for k, v in d["data_type_notes"].items()},
        source=d["source"],
    )


def check_graph(graph: str | Path | onnx.ModelProto, opset: int | None = None,
                matrix: SupportMatrix | None = None, require_fp32: tuple[str, ...] = ()) -> list[Problem]:
    """Problems TensorRT's ONNX parser would have with `graph` (a path or a loaded model), and, for
    a graph with float16 I/O, normalizations (and the `require_fp32` operators) computed in float16.

    `opset` overrides the model's default-domain opset import. Weights in external data files
    are not read (only names, types and shapes are needed)."""
    m = matrix or support_matrix()
    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    problems: list[Problem] = []
    declared = {imp.domain: imp.version for imp in model.opset_import}
    version = opset if opset is not None else declared.get("", declared.get("ai.onnx"))
    if version is None:
        problems.append(Problem("error", "", "opset_import", "the model imports no default-domain (ai.onnx) opset"))
    elif not m.opset_min <= version <= m.opset_max:
        problems.append(Problem(
            "error", "", "opset_import",
            f"opset {version} is outside TensorRT {m.tensorrt_version}'s supported range "
            f"{m.opset_min}..{m.opset_max}; re-export with an opset in that range"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model  # types are then known only where the graph declares them
    types = _tensor_types(inferred.graph)
    io_names = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    functions = {(f.domain, f.name): f for f in model.functions}
    constants = _constant_names(model.graph)
    _check_nodes(model.graph.node, m, types, constants, functions, problems, set())
    _check_types(types, io_names, _qdq_tensors(model.graph), m, problems)
    if is_fp16_graph(model):
        problems += _check_fp32_islands(model.graph.node, types, NORMALIZATION_OPS + tuple(require_fp32))
    return problems


def is_fp16_graph(model: onnx.ModelProto) -> bool:
    """Whether the graph's float inputs or outputs are float16 (the project's fp16 graphs)."""
    return any(v.type.tensor_type.elem_type == TensorProto.FLOAT16
               for v in list(model.graph.input) + list(model.graph.output))


def _check_fp32_islands(nodes, types: dict, ops: tuple[str, ...]) -> list[Problem]:
    problems = []
    for node in nodes:
        if node.op_type not in ops or not node.input:
            continue
        elem = types.get(node.input[0])
        if elem != TensorProto.FLOAT:
            name = node.name or f"<unnamed {node.op_type} -> {', '.join(node.output)}>"
            problems.append(Problem(
                "error", node.op_type, name,
                f"computes in {_type_str(elem) if elem else 'an unknown type'} inside an fp16 graph; a strongly typed "
                f"TensorRT network runs it as written, and {node.op_type} overflows in float16. Re-export: the "
                "project's fp16 export keeps it in float32 (export/fp16.py)"))
    return problems


def precision_summary(graph: str | Path | onnx.ModelProto,
                      ops: tuple[str, ...] = NORMALIZATION_OPS + ("Softmax",)) -> dict[str, dict[str, int]]:
    """For each operator of `ops` in the graph: how many instances compute in each float type
    (the type of their first input), e.g. {"Softmax": {"FLOAT16": 16}}."""
    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        pass
    types = _tensor_types(model.graph)
    summary: dict[str, dict[str, int]] = {}
    for node in model.graph.node:
        if node.op_type in ops and node.input:
            kind = _type_str(types[node.input[0]]) if node.input[0] in types else "unknown"
            counts = summary.setdefault(node.op_type, {})
            counts[kind] = counts.get(kind, 0) + 1
    return summary


def _check_nodes(nodes, m: SupportMatrix, types: dict, constants: set, functions: dict,
                 problems: list, seen_functions: set) -> None:
    for node in nodes:
        name = node.name or f"<unnamed {node.op_type} -> {', '.join(node.output)}>"
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                inner = constants | _constant_names(sub)
                _check_nodes(sub.node, m, {**types, **_tensor_types(sub)}, inner, functions, problems, seen_functions)
        if node.domain not in DEFAULT_DOMAINS:
            fn = functions.get((node.domain, node.op_type))
            if fn is None:
                problems.append(Problem(
                    "error", node.op_type, name,
                    f"operator {node.op_type!r} of domain {node.domain!r} is not an ONNX operator; TensorRT's "
                    "parser needs a plugin for it"))
            elif (fn.domain, fn.name) not in seen_functions:
                seen_functions.add((fn.domain, fn.name))
                _check_nodes(fn.node, m, types, constants, functions, problems, seen_functions)
            continue
        if node.op_type in m.unsupported or node.op_type not in m.supported:
            why = "documented as unsupported by" if node.op_type in m.unsupported else "not in the support matrix of"
            problems.append(Problem(
                "error", node.op_type, name,
                f"operator {node.op_type!r} is {why} TensorRT {m.tensorrt_version}'s ONNX parser "
                f"(onnx-tensorrt docs/operators.md)"))
            continue
        _check_restrictions(node, name, constants, problems)
        _check_node_type(node, name, m, types, problems)


def _check_node_type(node, name: str, m: SupportMatrix, types: dict, problems: list) -> None:
    """The support matrix lists the types of an operator's data input (its first input)."""
    tensor = node.input[0] if node.input and node.input[0] else (node.output[0] if node.output else "")
    elem = types.get(tensor)
    if elem is None:
        return
    tname = _TYPE_NAMES.get(elem)
    allowed = m.supported[node.op_type]["types"]
    if tname is not None and (tname in allowed or tname == "DOUBLE" or tname in _QUANTIZED):
        return  # DOUBLE and quantized types are reported once per tensor by _check_types
    problems.append(Problem(
        "warning", node.op_type, name,
        f"input {tensor!r} is {_type_str(elem)}; the support matrix lists {', '.join(allowed)} for {node.op_type}"))


def _check_restrictions(node, name: str, constants: set, problems: list) -> None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Resize":
        for key, allowed in _RESIZE.items():
            value = attrs.get(key, _RESIZE_DEFAULTS[key])
            value = value.decode() if isinstance(value, bytes) else value
            if value not in allowed:
                problems.append(Problem("error", op, name, f"Resize {key}={value!r} is unsupported; "
                                                           f"TensorRT supports {', '.join(sorted(allowed))}"))
        if attrs.get("antialias", 0):
            problems.append(Problem("error", op, name, "Resize antialias=1 is unsupported"))
    elif op in ("LayerNormalization", "MaxPool"):
        extra = [o for o in node.output[1:] if o]
        if extra:
            problems.append(Problem("error", op, name, f"only the first output of {op} is supported; "
                                                       f"extra outputs {extra} are used"))
    elif op == "Constant":
        bad = sorted(set(attrs) & {"sparse_value", "value_string", "value_strings"})
        if bad:
            problems.append(Problem("error", op, name, f"Constant attribute {bad[0]!r} is unsupported"))
    elif op == "TopK" and attrs.get("sorted", 1) != 1:
        problems.append(Problem("error", op, name, "TopK requires sorted=1"))
    elif op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        problems.append(Problem("error", op, name, "ScatterND reduction other than 'none' is unsupported"))
    if op in _CONST_INPUTS:
        index, what = _CONST_INPUTS[op]
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            problems.append(Problem("error", op, name, f"{op} input {what} ({node.input[index]!r}) must be a "
                                                       "build-time constant (an initializer or Constant output)"))


def _check_types(types: dict, io_names: set, qdq: set, m: SupportMatrix, problems: list) -> None:
    for tensor, elem in sorted(types.items()):
        tname = _TYPE_NAMES.get(elem)
        if tname is None or tname not in m.data_types:
            supported = ", ".join(sorted(m.data_types))
            problems.append(Problem("error", "", tensor, f"data type {_type_str(elem)} is not supported by TensorRT "
                                                         f"{m.tensorrt_version} (supported: {supported})"))
        elif tname == "DOUBLE":
            problems.append(Problem("warning", "", tensor, f"DOUBLE: {m.data_type_notes['DOUBLE']}"))
        elif tname == "UINT8" and tensor not in io_names:
            problems.append(Problem("error", "", tensor, f"UINT8 inside the network: {m.data_type_notes['UINT8']}"))
        elif tname in _QUANTIZED and tensor not in qdq:
            problems.append(Problem("warning", "", tensor, f"{tname} outside Q/DQ: {m.data_type_notes[tname]}"))


def _tensor_types(graph) -> dict[str, int]:
    types: dict[str, int] = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _constant_names(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS}
    return names


def _qdq_tensors(graph) -> set[str]:
    names: set[str] = set()
    for n in graph.node:
        if n.op_type in _QDQ_OPS:
            names |= set(n.input) | set(n.output)
    return names


def _type_str(elem: int) -> str:
    try:
        return TensorProto.DataType.Name(elem)
    except ValueError:
        return f"element type {elem}"


def main(argv: list[str] | None = None) -> int:
    m = support_matrix()
    parser = argparse.ArgumentParser(
        prog="python -m export.trt_compat",
        description=f"Check ONNX graphs against TensorRT {m.tensorrt_version}'s documented ONNX operator support "
                    f"({m.source['document']}).")
    parser.add_argument("graphs", nargs="+", type=Path, help="ONNX files")
    parser.add_argument("--opset", type=int, default=None, help="check as this opset instead of the model's")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors")
    parser.add_argument("--require-fp32", action="append", default=[], metavar="OP",
                        help="in fp16 graphs, also require OP (e.g. Softmax) to compute in float32 (repeatable)")
    args = parser.parse_args(argv)
    failed = False
    for path in args.graphs:
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            failed = True
            continue
        problems = check_graph(path, opset=args.opset, require_fp32=tuple(args.require_fp32))
        bad = [p for p in problems if p.severity == "error" or args.strict]
        for p in problems:
            print(f"{path}: {p}")
        if bad:
            ops = sorted({p.op_type for p in bad if p.op_type})
            print(f"{path}: FAIL: {len(bad)} problem(s)" + (f"; operators: {', '.join(ops)}" if ops else ""))
            failed = True
        else:
            print(f"{path}: ok for TensorRT {m.tensorrt_version} ({len(problems)} warning(s))")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
