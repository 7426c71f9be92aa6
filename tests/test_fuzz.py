"""Property-based fuzzing (Hypothesis) of what strangers hand the runtime and the build (issue 18).

Targets, each a bounded number of examples with a fixed seed (CI stays fast and reproducible;
SDRT_FUZZ_FACTOR=N runs N times as many, SDRT_FUZZ_RANDOM=1 draws fresh seeds, SDRT_FUZZ_REPORT=FILE
appends each target's outcome counts to FILE: the figures in docs/security.md):
- manifest:   a valid manifest.json mutated (types, missing keys, huge numbers, unicode, nested junk),
              then loaded and used for a one-step generation through the whole runtime, the engines
              being NumPy stand-ins (the backends' parsers are the next target);
- graph refs: the bytes of a small ONNX graph mutated, read by runtime/folder/onnx_refs.py, and compared
              with the onnx package's own parse wherever that succeeds;
- graph open: the same mutations through the folder check and the ONNX Runtime and OpenVINO engines;
- safetensors / ckpt: a tiny single-file checkpoint truncated, bit-flipped, its header rewritten
              (dtypes, shapes, offsets, a huge declared header length), then loaded by export/loading/read.py.
Every example must end in the target's own error kind or in a correct load, never in another
exception or a crash."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import runtime
from runtime.engines.base import Engine
from runtime.errors import EngineLoadError, EngineRunError, ManifestError, PipelineError
from runtime.folder.paths import inside
from runtime.folder.networks import concrete_shape, network_io

FACTOR = int(os.environ.get("SDRT_FUZZ_FACTOR", "1"))
RANDOM = os.environ.get("SDRT_FUZZ_RANDOM") == "1"  # explore with fresh random seeds instead of the fixed one
REPORT = os.environ.get("SDRT_FUZZ_REPORT")  # a JSON-lines file to append each target's outcome counts to


def _report(target: str, outcomes: dict[str, int]) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"target": target, "factor": FACTOR, **outcomes}) + "\n")


def fuzz_settings(examples: int):
    return settings(max_examples=examples * FACTOR, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --- mutations ----------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "../x", "/etc/hostname", "unet.onnx", "tokenizer", "fp16", "sd2", "\x00", "é⁂🙂", "*" * 300]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _at(node, path):
    for key in path:
        node = node[key]
    return node


@st.composite
def mutated_manifests(draw, base: dict):
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "insert", "swap"]))
        if not path:
            data = draw(JSON) if op == "replace" else data
            continue
        parent, key = _at(data, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(JSON)
        elif op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(JSON)
        elif op == "swap":
            parent[key] = copy.deepcopy(_at(data, draw(st.sampled_from(paths))))
        if not isinstance(data, dict):
            break
    return data


@st.composite
def mutated_bytes(draw, base: bytes, hot: int | None = None):
    """1-4 byte-level mutations; positions favour the first `hot` bytes (headers) when given."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        limit = min(len(data), hot) if hot and draw(st.booleans()) else len(data)
        at = draw(st.integers(0, limit - 1))
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "duplicate"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


# --- target: manifests through the runtime ------------------------------------------------------------------

CLIP_VOCAB = 49408  # rows of the text encoder's token embedding (openai/clip-vit-large-patch14 vocab.json)


class _ZeroEngine(Engine):
    """A NumPy stand-in for a backend's engine: validates feeds like every engine, returns zeros of the
    declared output shapes."""

    backend = "fuzz"

    def __init__(self, name, inputs, outputs, scale):
        super().__init__(name, inputs, outputs)
        self.scale = scale

    def _run(self, feeds):
        axes = self.validate(feeds)
        if "input_ids" in feeds and not 0 <= feeds["input_ids"].min() <= feeds["input_ids"].max() < CLIP_VOCAB:
            raise IndexError(f"input_ids outside the embedding table of {CLIP_VOCAB} rows")  # as the graph's Gather
        for big, small in (("height", "latent_height"), ("width", "latent_width")):
            if small in axes:
                axes.setdefault(big, axes[small] * self.scale)
            if big in axes:
                axes.setdefault(small, axes[big] // self.scale)
        return {t.name: np.zeros(concrete_shape(t, axes), t.dtype) for t in self.outputs}


def _fuzz_backend() -> types.ModuleType:
    module = types.ModuleType("sdrt_fuzz_backend")
    module.OPTIONS = ()
    module.is_available = lambda: (True, "")

    def open_engine(engine_dir, manifest, network, **options):
        entry = manifest.networks[network]
        inside(engine_dir, entry["file"], f"network {network!r} names file")  # as every backend opens it
        inputs, outputs = network_io(network, manifest.dims, entry.get("precision", manifest.precision))
        return _ZeroEngine(network, inputs, outputs, manifest.dims.vae_scale_factor)

    module.open_engine = open_engine
    return module


@pytest.fixture
def fuzz_backend(monkeypatch):
    from runtime.engines import registry as engines
    from runtime.text import tokens as text

    monkeypatch.setitem(sys.modules, "sdrt_fuzz_backend", _fuzz_backend())
    monkeypatch.setattr(engines, "_registered", lambda: {"fuzz": "sdrt_fuzz_backend"})
    # the CLIP tokenizer takes ~0.2 s to build; the same folder and pad token give the same tokenizer
    monkeypatch.setattr(text, "load_tokenizer", functools.lru_cache(maxsize=8)(text.load_tokenizer))


@pytest.fixture(scope="module")
def manifest_folder(tiny_sd1_engine, tmp_path_factory) -> Path:
    return shutil.copytree(tiny_sd1_engine, tmp_path_factory.mktemp("fuzz") / "engine",
                           ignore=shutil.ignore_patterns("openvino-cache"))


MANIFEST_ERRORS = (ManifestError, EngineLoadError, PipelineError)


def _use(folder: Path) -> None:
    """Load the folder and run what a user runs: txt2img (img2img where the U-Net allows)."""
    with runtime.load(folder, backend="fuzz", calibrate=False, max_memory_gb=2) as pipe:
        size = pipe.limits.min_image
        out = pipe.txt2img("a cat", height=size, width=size, num_inference_steps=1, guidance_scale=2.0, seed=0,
                           output_type="np", progress=False) if not pipe.is_inpainting_unet else None
        image = np.zeros((size, size, 3), np.uint8)
        mask = np.full((size, size), 255, np.uint8)
        out = pipe.inpaint("a cat", image, mask, height=size, width=size, num_inference_steps=1, seed=0,
                           output_type="np", progress=False)
        assert out.images.shape == (1, size, size, 3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an unknown scheduler class or NaN images warn, as they should
def test_fuzz_manifests(manifest_folder, fuzz_backend):
    base = json.loads((manifest_folder / "manifest.json").read_text())
    _use(manifest_folder)  # the unmutated folder loads and runs
    outcomes = {"loaded": 0, "refused": 0}

    @fuzz_settings(300)
    @given(mutated_manifests(base))
    def check(data):
        (manifest_folder / "manifest.json").write_text(json.dumps(data))
        try:
            _use(manifest_folder)
            outcomes["loaded"] += 1
        except MANIFEST_ERRORS:
            outcomes["refused"] += 1

    try:
        check()
    finally:
        (manifest_folder / "manifest.json").write_text(json.dumps(base))
    _report("manifest", outcomes)
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes  # both kinds of example were tried


ENGINE_VALUES = st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 32, 64, 77, 768, "fp16", "fp32", "bf16", "unet.onnx",
                                 "vae_decoder.onnx", "!", "<|endoftext|>", "a</w>", "epsilon", "v_prediction",
                                 0.18215, 1e-9]) | SCALARS


@st.composite
def engine_mutations(draw, base: dict):
    """Mutations of the fields the real engines see: dims, precisions, which graph a network names, the
    pad token, sizes."""
    data = copy.deepcopy(base)
    fields = ([("dims", k) for k in base["dims"]] + [("precision",), ("default_size", 0), ("scaling_factor",),
              ("shapes", "min_image"), ("shapes", "max_batch"), ("tokenizer", "pad_token"), ("prediction_type",)]
              + [("networks", n, k) for n in base["networks"] for k in ("precision", "file")])
    for path in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
        _at(data, path[:-1])[path[-1]] = draw(ENGINE_VALUES)
    return data


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fuzz_manifests_on_a_real_backend(manifest_folder):
    """What the NumPy stand-ins cannot see: a manifest that disagrees with its graphs."""
    base = json.loads((manifest_folder / "manifest.json").read_text())
    outcomes = {"loaded": 0, "refused": 0}

    @fuzz_settings(25)
    @given(engine_mutations(base))
    def check(data):
        (manifest_folder / "manifest.json").write_text(json.dumps(data))
        try:
            with runtime.load(manifest_folder, backend="onnxruntime", calibrate=False, max_memory_gb=2) as pipe:
                size = pipe.limits.min_image
                image, mask = np.zeros((size, size, 3), np.uint8), np.full((size, size), 255, np.uint8)
                out = pipe.inpaint("a cat", image, mask, num_inference_steps=1, seed=0, output_type="np",
                                   progress=False)
                assert out.images.shape == (1, size, size, 3)  # the image asked for, not another size
            outcomes["loaded"] += 1
        except MANIFEST_ERRORS:
            outcomes["refused"] += 1

    try:
        check()
    finally:
        (manifest_folder / "manifest.json").write_text(json.dumps(base))
    _report("manifest, real backend", outcomes)
    assert outcomes["refused"] > 0, outcomes


# --- target: ONNX graph bytes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_graph(tmp_path_factory) -> Path:
    """A vae_decoder-contract graph of a few hundred bytes: latent [b, 4, h, w] -> image [b, 3, 2h, 2w]
    through a 1x1 convolution whose weights are external data, and a Resize."""
    folder = tmp_path_factory.mktemp("graph")
    weights = helper.make_tensor("conv.weight", TensorProto.FLOAT, [3, 4, 1, 1],
                                 np.linspace(-1, 1, 12, dtype=np.float32).tobytes(), raw=True)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    nodes = [helper.make_node("Conv", ["latent", "conv.weight"], ["rgb"]),
             helper.make_node("Resize", ["rgb", "", "scales"], ["image"], mode="nearest")]
    graph = helper.make_graph(
        nodes, "vae_decoder",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 4, "latent_height", "latent_width"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        initializer=[weights, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(folder / "vae_decoder.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=16)
    return folder / "vae_decoder.onnx"


def _onnx_locations(data: bytes) -> set[tuple[str, str]] | None:
    """(tensor, location) pairs as the onnx package's protobuf parser sees them; None if it refuses."""
    from export.external_data import graph_tensors

    try:
        model = onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - any refusal of the reference parser
        return None
    tensors = list(graph_tensors(model.graph))
    for f in model.functions:
        for node in f.node:
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return {(t.name, e.value) for t in tensors for e in t.external_data if e.key == "location"}


def test_fuzz_graph_external_data_references(small_graph):
    from runtime.folder.onnx_refs import parse_refs

    base = small_graph.read_bytes()
    assert {(r.tensor, r.location) for r in parse_refs(base)} == {("conv.weight", "weights.bin")}
    outcomes = {"read": 0, "refused": 0, "agrees": 0}

    @fuzz_settings(500)
    @given(mutated_bytes(base))
    def check(data):
        try:
            ours = {(r.tensor, r.location) for r in parse_refs(data)}
            outcomes["read"] += 1
        except EngineLoadError:
            outcomes["refused"] += 1
            return
        theirs = _onnx_locations(data)
        if theirs is not None:  # every location the protobuf parser sees, we see
            assert theirs <= ours, (theirs, ours)
            outcomes["agrees"] += 1

    check()
    _report("graph refs", outcomes)
    assert min(outcomes.values()) > 0, outcomes


def test_fuzz_graph_bytes_through_the_engines(small_graph, tmp_path):
    from runtime.engines.onnxruntime import OrtEngine
    from runtime.engines.openvino import OpenVinoEngine
    from runtime.folder.paths import check_graph
    from runtime.folder.manifest import ModelDims

    folder = shutil.copytree(small_graph.parent, tmp_path / "engine")
    graph = folder / "vae_decoder.onnx"
    base = graph.read_bytes()
    dims = ModelDims(latent_channels=4, unet_in_channels=4, vae_scale_factor=2, text_hidden_size=32)
    inputs, outputs = network_io("vae_decoder", dims)
    feeds = {"latent": np.ones((1, 4, 4, 4), np.float32)}
    outcomes = {"folder check refused": 0, "opened and ran": 0, "backend refused": 0, "run error": 0}

    def open_and_run(make):
        try:
            engine = make()
        except (ManifestError, EngineLoadError):
            outcomes["backend refused"] += 1
            return
        try:
            assert engine.run(feeds)["image"].dtype == np.float32
            outcomes["opened and ran"] += 1
        except EngineRunError:
            outcomes["run error"] += 1

    @fuzz_settings(150)
    @given(mutated_bytes(base))
    def check(data):
        graph.write_bytes(data)
        try:
            check_graph(folder, graph, "vae_decoder.onnx")  # what open_engines runs first
        except (ManifestError, EngineLoadError):
            outcomes["folder check refused"] += 1
        # the backends get every mutation, refused or not (an engine opened directly, a legacy folder)
        open_and_run(lambda: OrtEngine(graph, "vae_decoder", inputs, outputs, providers=["cpu"]))
        open_and_run(lambda: OpenVinoEngine(graph, "vae_decoder", inputs, outputs, cache_dir=None,
                                            inference_precision="f32"))

    check()
    _report("graph open", outcomes)
    assert outcomes["opened and ran"] > 0 and outcomes["backend refused"] > 0, outcomes


# --- target: checkpoints (export/loading/) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    import torch

    from export.loading.read import random_model
    from export.loading.save import save_single_file, to_single_file_state_dict

    folder = tmp_path_factory.mktemp("checkpoints")
    model = random_model("tiny-sd1")
    torch.save(to_single_file_state_dict(model), folder / "tiny.ckpt")
    return {"safetensors": save_single_file(model, folder / "tiny.safetensors"), "ckpt": folder / "tiny.ckpt"}


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_safetensors(header: dict, body: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + body


@st.composite
def mutated_safetensors(draw, base: bytes):
    header, body = _split_safetensors(base)
    kind = draw(st.sampled_from(["bytes", "header", "header", "length"]))
    if kind == "bytes":
        return draw(mutated_bytes(base, hot=8 + len(json.dumps(header))))
    if kind == "length":  # header bombs and lies: a huge or wrong declared header length
        declared = draw(st.sampled_from([2**64 - 1, 2**63, 2**40, 100_000_001, 0, 7])
                        | st.integers(0, len(base) + 64))
        return _join_safetensors(header, body, declared)
    header = copy.deepcopy(header)
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "junk"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "C64",
                                               "X9", 7]))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1]), max_size=5)
                              | st.just(list(reversed(entry["shape"]))))
    elif field == "data_offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**64), min_size=0, max_size=3))
    elif field == "delete":
        del header[name]
    else:
        header[name] = draw(JSON)
    return _join_safetensors(header, body)


def _load_checkpoint(path: Path) -> str:
    from export.loading.read import CheckpointError, load_model

    try:
        model = load_model(path)
    except CheckpointError:
        return "refused"
    assert model.spec.family == "sd1"
    for module in (model.unet, model.vae, model.text_encoder):
        assert all(p.dtype.is_floating_point for p in module.parameters())
    return "loaded"


def test_fuzz_safetensors_checkpoints(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["safetensors"].read_bytes()
    path = tmp_path / "model.safetensors"
    outcomes = {"loaded": 0, "refused": 0}

    @fuzz_settings(150)
    @given(mutated_safetensors(base))
    def check(data):
        path.write_bytes(data)
        outcomes[_load_checkpoint(path)] += 1

    check()
    _report("safetensors", outcomes)
    assert outcomes["refused"] > 0, outcomes


def test_fuzz_ckpt_checkpoints(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["ckpt"].read_bytes()
    path = tmp_path / "model.ckpt"
    outcomes = {"loaded": 0, "refused": 0}

    @fuzz_settings(100)
    @given(mutated_bytes(base, hot=4096))
    def check(data):
        path.write_bytes(data)
        outcomes[_load_checkpoint(path)] += 1

    check()
    _report("ckpt", outcomes)
    assert outcomes["refused"] > 0, outcomes


# Run in a fresh interpreter, whose peak resident size is its own: the pytest process's high-water mark
# was raised by earlier tests past anything the loader could add. Linux's VmHWM (/proc/self/status) is
# the peak of this process's own memory map; ru_maxrss would not do, since Linux carries the parent's
# peak into it across fork and exec.
_BOMB_LOADS = r"""
import json, sys
from export.loading.read import CheckpointError, load_model
def kib(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1])
rss, peak = kib("VmRSS"), kib("VmHWM")
refused = []
for path in sys.argv[1:]:
    try:
        load_model(path)
    except CheckpointError as e:
        refused.append(str(e))
print(json.dumps({"refused": refused, "headroom_kib": peak - rss, "grew_kib": kib("VmHWM") - peak}))
"""
BOMB_GROWTH_KIB = 64 * 1024  # a bound far below the smallest claim, 100_000_001 bytes (95 MiB)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident size from Linux's /proc")
def test_a_header_bomb_is_refused_without_allocating(tiny_checkpoints, tmp_path):
    import subprocess

    header, body = _split_safetensors(tiny_checkpoints["safetensors"].read_bytes())
    bombs = []
    for declared in (2**64 - 1, 2**40, 100_000_001):
        bombs.append(tmp_path / f"bomb-{declared}.safetensors")
        bombs[-1].write_bytes(_join_safetensors(header, body, declared))
    proc = subprocess.run([sys.executable, "-c", _BOMB_LOADS, *map(str, bombs)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["refused"]) == len(bombs), out
    assert all("not a readable .safetensors file" in why for why in out["refused"]), out
    # the fresh process's peak is its resident size when the loads start, so an allocation of the claim
    # would raise it by about the claim: the bound can fail
    assert out["headroom_kib"] < BOMB_GROWTH_KIB // 4, out
    assert out["grew_kib"] < BOMB_GROWTH_KIB, f"the loader's peak grew by {out['grew_kib']} KiB: {out}"


def test_integer_weights_are_refused(tiny_checkpoints, tmp_path):
    from export.loading.read import CheckpointError, load_model

    header, body = _split_safetensors(tiny_checkpoints["safetensors"].read_bytes())
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"  # same byte size: the file reads, the tensor is not a weight
    (tmp_path / "ints.safetensors").write_bytes(_join_safetensors(header, body))
    with pytest.raises(CheckpointError, match=rf"{name.split('.')[-2]}.*int32, not a floating-point weight"):
        load_model(tmp_path / "ints.safetensors")
