"""The external-data references of an ONNX file, read from its protobuf without loading any tensor.

ONNX stores large tensors outside the graph as `external_data` entries ("location", "offset",
"length"; onnx/onnx docs/ExternalData.md) that ONNX Runtime and OpenVINO resolve relative to the
graph's folder. A graph from a stranger can name any path there (`../../etc/passwd`, an absolute
path, ORT's in-memory marker `*/_ORT_MEM_ADDR_/*`): the ONNX path-traversal class of CVEs. The
engine folder check (runtime/folder/paths.py) reads every reference with `external_refs` and refuses the
graph before a backend opens it.

This is a minimal protobuf reader (the wire format of developers.google.com/protocol-buffers/docs/encoding)
over the messages of onnx/onnx `onnx/onnx.proto` (IR version 10) that can hold a tensor: the model's
graph, training-info graphs and functions; a graph's initializers, sparse initializers and nodes;
a node's attributes (tensors, sparse tensors and subgraphs, recursively). Tensor bytes are skipped by
their length prefix, never copied, so a 500 MB graph with its weights inside is walked in
milliseconds over a read-only memory map. It needs no `onnx` package: the runtime's dependencies
stay as they are. Every `location` entry is reported, whatever the tensor's `data_location` says.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import EngineLoadError

__all__ = ["ExternalRef", "external_refs", "parse_refs"]

# Message -> {field number: message type} of the length-delimited fields that lead to tensors
# (field numbers from onnx/onnx onnx/onnx.proto: ModelProto.graph = 7, training_info = 20,
# functions = 25; GraphProto.node = 1, initializer = 5, sparse_initializer = 15; NodeProto.attribute = 5;
# AttributeProto.t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23;
# SparseTensorProto.values = 1, indices = 2; TrainingInfoProto.initialization = 1, algorithm = 2;
# FunctionProto.node = 7, attribute_proto = 11; TensorProto.external_data = 13).
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL = 8, 13  # TensorProto.name, TensorProto.external_data
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto.key, value
# Nesting of messages (a subgraph inside a node inside a graph is three levels); real graphs use a
# handful, and the limit keeps a crafted file from exhausting the stack.
MAX_DEPTH = 64


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external-data reference: `location` relative to the graph's folder; offset and
    length as written (None where absent)."""

    tensor: str
    location: str
    offset: int | None
    length: int | None


class _Malformed(Exception):
    """The bytes are not an ONNX protobuf (internal: becomes EngineLoadError naming the file)."""


def external_refs(path: str | os.PathLike) -> list[ExternalRef]:
    """Every external-data reference in the ONNX file at `path`. Raises EngineLoadError naming the
    file when it is not a readable ONNX protobuf (truncated, corrupt, or not ONNX at all)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise EngineLoadError(f"{path}: the ONNX file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return parse_refs(buf, where=str(path))
    except OSError as e:
        raise EngineLoadError(f"{path}: cannot read the ONNX file: {e}") from e


def parse_refs(buf: bytes | mmap.mmap, where: str = "ONNX bytes") -> list[ExternalRef]:
    """The external-data references of a serialized ModelProto held in `buf`."""
    refs: list[ExternalRef] = []
    try:
        _walk(buf, 0, len(buf), "model", refs, 0)
    except _Malformed as e:
        raise EngineLoadError(f"{where}: not a valid ONNX file ({e}); it is truncated, corrupt or not ONNX") from None
    return refs


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"a varint runs past its message at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"a varint longer than 10 bytes at byte {pos}")


def _fields(buf, start: int, end: int):
    """(field number, wire type, (start, end) of a length-delimited value or None) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        span = None
        if field == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            span = (pos, pos + length)
            pos += length
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise _Malformed(f"wire type {wire} at byte {pos}")
        if pos > end:
            raise _Malformed(f"field {field} runs past its message (byte {pos} > {end})")
        yield field, wire, span


def _walk(buf, start: int, end: int, kind: str, refs: list[ExternalRef], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"messages nested deeper than {MAX_DEPTH} levels")
    if kind == "tensor":
        _tensor(buf, start, end, refs)
        return
    children = _SCHEMA[kind]
    for field, wire, span in _fields(buf, start, end):
        if wire == 2 and field in children:
            _walk(buf, span[0], span[1], children[field], refs, depth + 1)


def _tensor(buf, start: int, end: int, refs: list[ExternalRef]) -> None:
    name, entries = "", []
    for field, wire, span in _fields(buf, start, end):
        if wire != 2:
            continue
        if field == _TENSOR_NAME:
            name = _text(buf, span, "tensor name")
        elif field == _TENSOR_EXTERNAL:
            entry = {}
            for f, w, s in _fields(buf, *span):
                if w == 2 and f in (_ENTRY_KEY, _ENTRY_VALUE):
                    entry[f] = _text(buf, s, "external_data entry")
            entries.append((entry.get(_ENTRY_KEY, ""), entry.get(_ENTRY_VALUE, "")))
    locations = [value for key, value in entries if key == "location"]
    if not locations:
        if entries:
            raise _Malformed(f"tensor {name!r} has external_data entries but no location")
        return
    numbers = {key: _number(value, key, name) for key, value in entries if key in ("offset", "length")}
    for location in locations:
        refs.append(ExternalRef(name, location, numbers.get("offset"), numbers.get("length")))


def _text(buf, span: tuple[int, int], what: str) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} at byte {span[0]} is not UTF-8") from None


def _number(value: str, key: str, tensor: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise _Malformed(f"tensor {tensor!r}: external_data {key} {value[:40]!r} is not a non-negative integer")
    return int(value)
