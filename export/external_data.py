"""One external weights file for several ONNX graphs: identical tensors stored once.

ONNX keeps large tensors outside the protobuf as (location, offset, length) references
(onnx/onnx `docs/ExternalData.md`), so several graphs can point into one file. `share_weights`
rewrites graphs that way: every tensor of at least `size_threshold` bytes goes to the shared file,
each distinct content once, found by the sha256 of its bytes rather than by name (the exporter
names folded constants, e.g. transposed MatMul weights, differently in each graph). The step-cache
U-Nets (unet_deep, unet_shallow) then add almost nothing to a folder that holds `unet`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, TensorProto
from onnx.external_data_helper import ExternalDataInfo

# Offsets are multiples of the page size, so ONNX Runtime can memory-map each tensor
# (onnxruntime tensorprotoutils: an external tensor is mapped only when its offset is aligned to
# the allocation granularity, 4096 bytes on Linux).
ALIGNMENT = 4096
# Tensors below this size stay inside the graph (onnx.save_model's default size_threshold).
SIZE_THRESHOLD = 1024


class ExternalDataError(RuntimeError):
    """A graph's external data is missing or does not hold the bytes its reference promises."""


def graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor a graph holds: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from graph_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_tensors(g)


def tensor_bytes(tensor: TensorProto, folder: Path) -> bytes:
    """The raw bytes of a tensor, read from its external file where it has one."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor.raw_data
    info = ExternalDataInfo(tensor)
    path = folder / info.location
    if not path.is_file():
        raise ExternalDataError(f"tensor {tensor.name!r} names external data {info.location!r}, which is missing")
    with open(path, "rb") as f:
        f.seek(info.offset or 0)
        data = f.read(info.length) if info.length is not None else f.read()
    if info.length is not None and len(data) != info.length:
        raise ExternalDataError(f"tensor {tensor.name!r}: {info.location} holds {len(data)} bytes at offset "
                                f"{info.offset}, not the {info.length} its reference names")
    return data


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_weights(folder: str | os.PathLike, graphs: Sequence[str], data_name: str, *,
                  size_threshold: int = SIZE_THRESHOLD) -> dict[str, dict[str, int]]:
    """Rewrite the ONNX files `graphs` (names in `folder`) so their tensors of `size_threshold`
    bytes or more live in `folder/data_name`, each distinct content stored once (aligned to
    `ALIGNMENT`). The external files they used before and no longer need are removed; a graph may
    already use `data_name`. Returns per graph: graph_bytes (its .onnx file) and weights_bytes
    (the bytes of the shared file it reads). Everything is staged under temporary names and
    renamed only once all graphs are written, so a failure while writing leaves them as they were."""
    folder = Path(folder)
    tmp = {name: folder / f".{name}.tmp-{os.getpid()}" for name in (*graphs, data_name)}
    index: dict[bytes, tuple[int, int]] = {}  # sha256 of the content -> (offset, length)
    sizes, old = {}, set()
    try:
        with open(tmp[data_name], "wb") as out:
            for name in graphs:
                proto = onnx.load(str(folder / name), load_external_data=False)
                used = set()
                for tensor in graph_tensors(proto.graph):
                    external = tensor.data_location == TensorProto.EXTERNAL
                    if not external and len(tensor.raw_data) < size_threshold:
                        continue  # small, or stored in typed fields: stays in the graph
                    if external:
                        old.add(ExternalDataInfo(tensor).location)
                    blob = tensor_bytes(tensor, folder)
                    key = hashlib.sha256(blob).digest()
                    if key not in index:
                        offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
                        out.write(b"\0" * (offset - out.tell()))
                        out.write(blob)
                        index[key] = (offset, len(blob))
                    _point(tensor, data_name, *index[key])
                    used.add(index[key])
                onnx.save_model(proto, str(tmp[name]))
                sizes[name] = {"graph_bytes": tmp[name].stat().st_size, "weights_bytes": sum(n for _, n in used)}
        for name in (data_name, *graphs):
            os.replace(tmp[name], folder / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    for location in old - {data_name}:
        (folder / location).unlink(missing_ok=True)
    for name in graphs:
        onnx.checker.check_model(str(folder / name))  # references resolve inside the folder
    return sizes


def attach_weights(path: str | os.PathLike, weights: Mapping[str, np.ndarray], data_name: str, *,
                   size_threshold: int = SIZE_THRESHOLD) -> int:
    """Turn the graph inputs of `path` that `weights` names (a graph exported without its
    parameters: torch.onnx.export(export_params=False) lists them as inputs under their state-dict
    names) into initializers: tensors of `size_threshold` bytes or more are written to
    `path.parent/data_name` one at a time, straight from the arrays' memory (aligned to
    `ALIGNMENT`), the rest inline. The graph itself is rewritten in place. Nothing holds a second
    copy of the weights, which is what lets a 10 GB U-Net export on a 24 GiB machine. Returns the
    bytes written to the data file."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    taken = [i for i in graph.input if i.name in weights]
    with open(path.parent / data_name, "wb") as out:
        for info in taken:
            array = np.ascontiguousarray(weights[info.name])
            expected = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
            if array.dtype != expected:
                raise ExternalDataError(f"weight {info.name!r} is {array.dtype}, the graph declares {expected}")
            tensor = TensorProto(name=info.name, data_type=info.type.tensor_type.elem_type, dims=array.shape)
            if array.nbytes < size_threshold:
                tensor.raw_data = array.tobytes()
            else:
                offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
                out.write(b"\0" * (offset - out.tell()))
                out.write(memoryview(array).cast("B"))
                _point(tensor, data_name, offset, array.nbytes)
            graph.initializer.append(tensor)
        written = out.tell()
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    onnx.save_model(proto, str(path))
    return written
